"""KVDepotConnector: vLLM's V1 KV connector backed by a node-level kvdepot server.

vLLM builds one instance in the scheduler (role SCHEDULER) and one per worker (role WORKER);
this class only routes vLLM's hooks to SchedulerSide / WorkerSide (vLLM's side of things),
which drive the engine-neutral connector layer (kvdepot.connector) and are driven directly by
the unit tests.

Best effort by design: ``requires_kv_delivery`` is False, failed loads are recomputed (the
connector sets vLLM's kv_load_failure_policy to "recompute" unless told otherwise), and with
the server away every hook degrades to "no cache".
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvdepot.connector.specs import NamespaceSpec
from kvdepot.integrations.vllm.compat import check_connector_api, check_vllm_version
from kvdepot.integrations.vllm.config import settings_from_extra_config
from kvdepot.integrations.vllm.identity import namespace_model
from kvdepot.integrations.vllm.metadata import KVDepotHandshake, KVDepotMetadata
from kvdepot.integrations.vllm.scheduler_side import SchedulerSide
from kvdepot.integrations.vllm.stats import KVDepotPromMetrics, KVDepotStats
from kvdepot.integrations.vllm.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("vllm.kvdepot")

# Worker namespace specs by vLLM engine id, for a scheduler in the same process (TP=1 runs its
# worker in the engine-core process) when this vLLM never delivers the handshake metadata.
_LOCAL_SPECS: dict[str, NamespaceSpec] = {}


def _timed(fn):
    """Count the time a hook spends on vLLM's own thread (the connector's critical-path cost,
    reported as the hook_us statistic)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            side = self._worker if self._worker is not None else self._sched
            if side is not None:
                side.add_counter("hook_us", int((time.perf_counter() - t0) * 1e6))

    return wrapper


class KVDepotConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        check_vllm_version()
        check_connector_api(KVConnectorBase_V1)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self._settings = settings_from_extra_config(ktc.kv_connector_extra_config)
        self._engine_id = str(ktc.engine_id or "")
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._disabled = ""

        parallel = vllm_config.parallel_config
        tp = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        pp = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
        block_size, groups = _block_size_and_groups(vllm_config, kv_cache_config)
        if pp > 1:
            self._disabled = "pipeline parallelism is not supported"
        elif groups > 1:
            self._disabled = f"{groups} KV cache groups (hybrid attention) are not supported"
        if self._disabled:
            log.warning("kvdepot: %s; the connector does nothing for this engine", self._disabled)

        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(
                self._settings,
                block_size=block_size,
                engine_id=self._engine_id,
                load=bool(getattr(ktc, "is_kv_consumer", True)),
                store=bool(getattr(ktc, "is_kv_producer", True)),
            )
            self._world_size = tp
            self._apply_failure_policy(ktc)
        else:
            model_config = vllm_config.model_config
            self._worker = WorkerSide(
                self._settings,
                # Which weights, not which name or path: a checkpoint replaced in place must
                # not share chunks with the old one (identity.py).
                model=namespace_model(
                    self._settings.model, model_config, vllm_config.load_config,
                    self._engine_id, self._settings.model_identity,
                ),
                rank=_tp_rank() if tp > 1 else 0,
                world_size=tp,
                block_size=block_size,
                num_blocks=getattr(kv_cache_config, "num_blocks", None),
                is_mla=bool(getattr(model_config, "use_mla", False)),
                engine_id=self._engine_id,
            )

    def _apply_failure_policy(self, ktc: Any) -> None:
        # vLLM reads this after building the scheduler's connector. Its default, "fail", would
        # turn a cache hiccup into a failed request; a cache must recompute instead.
        want = self._settings.load_failure_policy
        if hasattr(ktc, "kv_load_failure_policy") and ktc.kv_load_failure_policy != want:
            log.info("kvdepot: kv_load_failure_policy %s -> %s", ktc.kv_load_failure_policy, want)
            ktc.kv_load_failure_policy = want

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped store is a future miss, nothing more

    # --- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if self._worker is None or self._disabled:
            return
        self._worker.register_kv_caches(kv_caches)
        if self._worker.spec is not None and self._worker.world_size == 1:
            _LOCAL_SPECS[self._engine_id] = self._worker.spec

    def get_handshake_metadata(self) -> KVDepotHandshake | None:
        if self._worker is None or self._disabled:
            return None
        w = self._worker
        return KVDepotHandshake(rank=w.rank, spec=w.spec, error=w.layout_error)

    def _meta(self) -> KVDepotMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KVDepotMetadata) else None

    @_timed
    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None:
            meta = kv_connector_metadata
            self._worker.handle_preemptions(meta if isinstance(meta, KVDepotMetadata) else None)

    @_timed
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: done before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # whole chunks are stored after the step, in wait_for_save

    @_timed
    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.wait_for_save(self._meta())

    @_timed
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.get_finished(finished_req_ids, self._meta())

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return self._worker.get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.close()

    # --- scheduler side ---------------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        if self._sched is None or self._disabled:
            return
        hs = [m for m in metadata.values() if isinstance(m, KVDepotHandshake)]
        if not hs:
            return
        specs = [h.spec for h in hs]
        errors = [h.error for h in hs if h.spec is None]
        if errors:
            log.warning("kvdepot: a worker could not read its KV layout (%s); cache off", errors[0])
            return
        if any(s != specs[0] for s in specs):
            log.error("kvdepot: tensor-parallel ranks report different KV layouts; cache off")
            return
        if len(hs) != self._world_size:
            log.warning("kvdepot: %d of %d ranks reported their layout", len(hs), self._world_size)
        self._sched.set_namespace_spec(specs[0])

    def _ensure_spec(self) -> None:
        if self._sched is not None and self._sched.spec is None and self._world_size == 1:
            spec = _LOCAL_SPECS.get(self._engine_id)
            if spec is not None:
                self._sched.set_namespace_spec(spec)

    @_timed
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._sched is None or self._disabled:
            return 0, False
        self._ensure_spec()
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    @_timed
    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._sched is not None and not self._disabled:
            self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    @_timed
    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if self._sched is None or self._disabled:
            return KVDepotMetadata()
        return self._sched.build_connector_meta(scheduler_output)

    @_timed
    def update_connector_output(self, connector_output: Any) -> None:
        if self._sched is not None and not self._disabled:
            self._sched.update_connector_output(connector_output)

    @_timed
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._sched is None or self._disabled:
            return False, None
        return self._sched.request_finished(request, block_ids)

    # --- statistics -------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVDepotStats | None:
        side = self._worker if self._worker is not None else self._sched
        if side is None:
            return None
        stats = KVDepotStats(data=side.take_counters())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVDepotStats:
        return KVDepotStats(data=dict(data)) if data is not None else KVDepotStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVDepotPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _block_size_and_groups(vllm_config: Any, kv_cache_config: Any) -> tuple[int, int]:
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if groups:
        return int(groups[0].kv_cache_spec.block_size), len(groups)
    return int(vllm_config.cache_config.block_size), 1


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())
