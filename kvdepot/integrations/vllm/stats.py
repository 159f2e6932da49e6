"""Connector statistics, reported through vLLM's get_kv_connector_stats.

vLLM sums them over workers and over the scheduler (``aggregate``), logs them with its other
periodic stats ("KV Transfer metrics: ..."), and exports them to Prometheus through
``KVDepotPromMetrics`` (counters named ``vllm:kvdepot_*``), so vLLM's own metrics show what
the cache did (the counters: kvdepot.connector.counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvdepot.connector.counters import COUNTERS, empty_counters


@dataclass
class KVDepotStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=empty_counters)

    def reset(self) -> None:
        self.data = empty_counters()

    def aggregate(self, other: KVConnectorStats) -> "KVDepotStats":
        for k, v in (other.data or {}).items():
            if isinstance(v, (int, float)):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: v for k, v in self.data.items() if v}
        for k in ("loaded_bytes", "stored_bytes"):
            if k in out:
                out[k.replace("_bytes", "_MB")] = round(out.pop(k) / 1e6, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVDepotPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, Any] = {}
        for name, doc in COUNTERS.items():
            metric = self._counter_cls(
                name=f"vllm:kvdepot_{name}", documentation=doc, labelnames=labelnames
            )
            self._counters[name] = {
                idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            per_engine = self._counters.get(name)
            if per_engine and value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)
