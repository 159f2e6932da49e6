"""The connector's BlockCopier on a CUDA GPU: partial-chunk loads (blocks vLLM already holds
are marked -1 and never written) and their ordering after the model's queued work.

Runs on the GPU machine (needs CUDA); skipped elsewhere. The same copier on CPU is covered by test_vllm_connector_units.py.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_gpu_transfer import _layout  # noqa: E402
from test_layout import CHUNK, make_arena  # noqa: E402

from kvdepot.connector.copier import BlockCopier  # noqa: E402
from kvdepot.transfer.base import ChunkCopy  # noqa: E402

BS = 16
BPC = CHUNK // BS


@pytest.mark.parametrize("kind", ["v026", "BLHNC"])
def test_partial_chunk_load_waits_for_the_model_and_spares_held_blocks(kind):
    layout, _, bufs = _layout(kind, layers=4, heads=2, head_dim=64, device="cuda",
                              num_blocks=3 * BPC + 5)
    arena = make_arena(8 << 20)
    copier = BlockCopier(layout, arena, CHUNK)
    try:
        source = list(range(BPC))
        copier.store([ChunkCopy(0, source)]).wait()
        saved = [p[source].clone() for p in layout.planes]

        target = list(range(BPC, 2 * BPC))
        held = 5  # vLLM's own prefix cache has the chunk's first 5 blocks
        for p in layout.planes:
            p[target] = 0x11
        plan = [(0, [-1] * held + target[held:])]
        # The model's queued work still uses the target blocks (their previous owner): a slow
        # kernel, then a write of 0x22 into them. The load must land after it.
        torch.cuda._sleep(50_000_000)
        for p in layout.planes:
            p[target] = 0x22
        after = torch.cuda.Event()
        after.record()
        handle = copier.load(plan, after=after)
        handle.stream_wait()  # the model's stream reads only after the load
        torch.cuda.synchronize()
        for p, want in zip(layout.planes, saved):
            assert bool((p[target[:held]] == 0x22).all()), "a held block was written"
            assert torch.equal(p[target[held:]], want[held:]), "loaded blocks differ"
    finally:
        copier.close()
