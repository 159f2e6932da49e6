"""Digests that name the weights in the KV namespace (kvdepot/integrations/vllm/identity.py).

Real files throughout: seeded random checkpoints written with transformers, safetensors files
written byte by byte, LoRA adapters in PEFT format, a Hugging Face hub cache laid out as
huggingface_hub lays it out, and vLLM's own ModelConfig, LoRARequest and Request objects.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
import vllm_lora_support as vls  # noqa: E402
import vllm_support as vs  # noqa: E402
from vllm.config import LoadConfig, ModelConfig  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from kvdepot.integrations.vllm import identity as ident  # noqa: E402
from kvdepot.integrations.vllm.config import settings_from_extra_config  # noqa: E402
from kvdepot.integrations.vllm.request_keys import cacheable, request_root  # noqa: E402

NS = bytes(range(16))  # a namespace digest


def safetensors_header(path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def write_safetensors(path, tensors: dict[str, bytes]) -> None:
    """A safetensors file of raw U8 tensors (any bytes), laid out in the given order."""
    header, offset = {}, 0
    for name, data in tensors.items():
        span = [offset, offset + len(data)]
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": span}
        offset += len(data)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in tensors.values():
            f.write(data)


def big_tensors(seed: int, n: int = 12, size: int = 3 << 20) -> dict[str, bytes]:
    import random

    rng = random.Random(seed)
    return {f"layers.{i}.weight": rng.randbytes(size) for i in range(n)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return vs.write_tiny_llama(tmp_path_factory.mktemp("ft") / "m", seed=1)


# --- checkpoints ------------------------------------------------------------------------------


def test_replaced_weights_differ_and_copies_match(ckpt, tmp_path):
    d1 = ident.checkpoint_digest(ckpt)
    copy = shutil.copytree(ckpt, tmp_path / "elsewhere" / "copy")  # new inodes, new mtimes
    os.utime(copy / "model.safetensors", (1, 1))
    assert ident.checkpoint_digest(copy) == d1
    assert ident.checkpoint_digest(copy, "full") == ident.checkpoint_digest(ckpt, "full")

    other = vs.write_tiny_llama(tmp_path / "other", seed=2)
    a, b = os.path.join(ckpt, "model.safetensors"), os.path.join(other, "model.safetensors")
    # The fault's premise: same config, same safetensors header, same size ...
    config = [open(os.path.join(m, "config.json")).read() for m in (ckpt, other)]
    assert config[0] == config[1]
    assert safetensors_header(a) == safetensors_header(b)
    assert os.path.getsize(a) == os.path.getsize(b)
    # ... and yet other weights.
    assert ident.checkpoint_digest(other) != d1


def test_auto_sees_one_retrained_tensor_and_full_sees_every_byte(tmp_path):
    base = big_tensors(seed=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_safetensors(tmp_path / "a" / "model.safetensors", base)
    d_auto = ident.checkpoint_digest(tmp_path / "a")
    d_full = ident.checkpoint_digest(tmp_path / "a", "full")

    # A fine-tune that trained one tensor of twelve (all its elements move).
    tuned = dict(base, **{"layers.7.weight": big_tensors(seed=2)["layers.7.weight"]})
    write_safetensors(tmp_path / "b" / "model.safetensors", tuned)
    assert ident.checkpoint_digest(tmp_path / "b") != d_auto

    # 16 bytes in the middle of a 3 MiB tensor, far from every sampled block: "auto" cannot
    # see it (documented), "full" does.
    poked = dict(base)
    mid = len(base["layers.5.weight"]) // 2 + 12345
    t = bytearray(base["layers.5.weight"])
    t[mid : mid + 16] = bytes(16)
    poked["layers.5.weight"] = bytes(t)
    write_safetensors(tmp_path / "b" / "model.safetensors", poked)
    path = tmp_path / "b" / "model.safetensors"
    header_end = 8 + len(safetensors_header(path))
    poked_at = header_end + 5 * (3 << 20) + mid
    assert not any(o <= poked_at < o + n for o, n in ident.sample_ranges(path, path.stat().st_size))
    assert ident.checkpoint_digest(tmp_path / "b") == d_auto
    assert ident.checkpoint_digest(tmp_path / "b", "full") != d_full


def test_configs_and_index_count_tokenizer_does_not(ckpt, tmp_path):
    m = shutil.copytree(ckpt, tmp_path / "m")
    d = ident.checkpoint_digest(m)
    (m / "tokenizer.json").write_text('{"version": "1.0"}')
    (m / "generation_config.json").write_text('{"temperature": 0.3}')
    (m / "README.md").write_text("notes")
    assert ident.checkpoint_digest(m) == d
    (m / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    d_index = ident.checkpoint_digest(m)
    assert d_index != d
    (m / "quantize_config.json").write_text('{"bits": 4}')
    assert ident.checkpoint_digest(m) != d_index
    cfg = json.loads((m / "config.json").read_text())
    cfg["rope_theta"] = 20000.0
    (m / "config.json").write_text(json.dumps(cfg))
    assert ident.checkpoint_digest(m) not in (d, d_index)


def test_other_weight_formats_and_single_files(tmp_path):
    import random

    blob = random.Random(3).randbytes(5 << 20)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(blob)
    d = ident.checkpoint_digest(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(blob[:100] + b"x" + blob[101:])  # in the head
    assert ident.checkpoint_digest(tmp_path / "bin") != d

    gguf = tmp_path / "model.gguf"  # vLLM's GGUF models are a single file
    gguf.write_bytes(blob)
    renamed = shutil.copy(gguf, tmp_path / "copy.gguf")
    assert ident.checkpoint_digest(gguf) == ident.checkpoint_digest(renamed)

    # A header that is not safetensors: sampled as an opaque file, never an error.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + blob)
    assert len(ident.checkpoint_digest(bad)) == 64


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        ident.checkpoint_digest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no weight or config files"):
        ident.checkpoint_digest(tmp_path / "empty")
    with pytest.raises(ValueError, match="mode"):
        ident.checkpoint_digest(tmp_path, "fast")


def test_a_30_gb_checkpoint_costs_milliseconds(tmp_path):
    """A sparse 30 GB safetensors file (holes read as zeros, so this times the plan and the
    hashing, not a disk): "auto" reads a few MB in a few thousand ranges."""
    n_tensors, tensor_bytes = 1800, 16 << 20  # 1800 tensors of 16 MiB: 30.2 GB
    header = {
        f"t.{i}": {
            "dtype": "BF16",
            "shape": [tensor_bytes // 2],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
        for i in range(n_tensors)
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n_tensors * tensor_bytes)
    size = path.stat().st_size
    ranges = ident.sample_ranges(path, size)
    read = sum(n for _, n in ranges)
    assert len(ranges) <= 2 * n_tensors + 2 and read < size / 1000
    t0 = time.perf_counter()
    ident.checkpoint_digest(tmp_path)
    assert time.perf_counter() - t0 < 5  # ~0.1 s here; generous for a shared 2-core machine


# --- the namespace model string -------------------------------------------------------------


def test_namespace_model_is_path_free_and_covers_serving_options(ckpt, tmp_path):
    def ns(model, label=None, setting="auto", load_format="auto", **kw):
        dtype = kw.pop("dtype", "bfloat16")
        mc = ModelConfig(model=str(model), dtype=dtype, skip_tokenizer_init=True, **kw)
        return ident.namespace_model(label, mc, LoadConfig(load_format=load_format), "engine-1", setting)

    base = ns(ckpt)
    assert base.startswith("LlamaForCausalLM@auto:")
    assert ckpt not in base
    assert ns(shutil.copytree(ckpt, tmp_path / "copy")) == base
    assert ns(ckpt, dtype="float16") != base
    assert ns(ckpt, load_format="dummy") != base
    assert ns(ckpt, hf_overrides={"rope_theta": 20000.0}) != base
    assert ns(ckpt, label="prod-ft").startswith("prod-ft@auto:")
    assert ns(ckpt, setting="full").startswith("LlamaForCausalLM@full:")

    # An identity given by the user is taken as is: different files, same namespace.
    other = vs.write_tiny_llama(tmp_path / "other", seed=7)
    assert ns(other) != base
    assert ns(other, setting="ft-v3") == ns(ckpt, setting="ft-v3")
    assert ns(other, setting="ft-v3").startswith("LlamaForCausalLM@given:")
    assert ns(ckpt, setting="ft-v3", dtype="float16") != ns(ckpt, setting="ft-v3")


def test_hub_models_are_named_by_their_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--acme--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text(commit)

    assert ident.weights_identity("acme/tiny", download_dir=str(tmp_path)) == ("hf-commit", commit)
    assert ident.weights_identity("acme/tiny", download_dir=str(tmp_path), setting="full") == (
        "full", ident.checkpoint_digest(snap, "full"))
    assert ident.weights_identity("acme/absent", download_dir=str(tmp_path)) is None
    assert ident.weights_identity("s3://bucket/m", model_weights="s3://bucket/m") is None
    assert ident.weights_identity("acme/absent", setting="mine") == ("given", "mine")


def test_weights_outside_the_folder_are_not_identified(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert ident.weights_identity(str(tmp_path)) is None  # e.g. a tensorizer URI holds them
    # vLLM's dummy weights come from the config alone: the config is their identity.
    assert ident.weights_identity(str(tmp_path), load_format="dummy")[0] == "auto"


def test_unidentified_weights_get_an_engine_private_namespace(tmp_path, ckpt):
    mc = ModelConfig(model=ckpt, dtype="bfloat16", skip_tokenizer_init=True)
    mc.model_weights = "s3://bucket/model"  # as vLLM sets it for weights streamed from storage
    assert ident.namespace_model(None, mc, LoadConfig(), "e-42") == "LlamaForCausalLM@engine:e-42"


def test_setting(ckpt):
    assert settings_from_extra_config({}).model_identity == "auto"
    assert settings_from_extra_config({"kvdepot.model_identity": " FULL "}).model_identity == "full"
    assert settings_from_extra_config({"kvdepot.model_identity": "ft-v3"}).model_identity == "ft-v3"
    with pytest.raises(ValueError, match="model_identity"):
        settings_from_extra_config({"kvdepot.model_identity": "  "})


# --- LoRA adapters --------------------------------------------------------------------------


def request(lora: LoRARequest | None = None, salt: str | None = None, rid: str = "r") -> Request:
    return Request(rid, list(range(10, 300)), SamplingParams(max_tokens=4), None, lora_request=lora,
                   cache_salt=salt)


def test_adapters_are_named_by_their_weights(tmp_path):
    a = vls.write_lora_adapter(tmp_path / "a", seed=1)
    b = vls.write_lora_adapter(tmp_path / "b", seed=2)
    a_copy = shutil.copytree(a, tmp_path / "elsewhere" / "a")

    # The fault: another adapter under the same ("a", 1) label.
    root_a = request_root(NS, request(LoRARequest("a", 1, a)))
    assert request_root(NS, request(LoRARequest("a", 1, b))) != root_a
    # The same weights under another label and id, at another path: the same chains.
    assert request_root(NS, request(LoRARequest("other", 7, str(a_copy)))) == root_a
    assert root_a != request_root(NS, request())  # the base model's chains
    assert request_root(NS, request(LoRARequest("a", 1, a), salt="t1")) not in (root_a, NS)
    assert cacheable(request(LoRARequest("a", 1, a)))

    # Relative paths resolve as vLLM's workers resolve them (the working folder).
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert request_root(NS, request(LoRARequest("a", 1, "a"))) == root_a
    finally:
        os.chdir(cwd)


def test_unidentifiable_adapters_are_not_cached(tmp_path):
    gone = LoRARequest("x", 3, str(tmp_path / "nowhere"))
    assert ident.adapter_identity(gone) is None and not cacheable(request(gone))
    hub = LoRARequest("x", 3, "acme/not-downloaded-adapter")
    assert ident.adapter_identity(hub) is None and not cacheable(request(hub))

    cfg_only = tmp_path / "cfg-only"
    cfg_only.mkdir()
    (cfg_only / "adapter_config.json").write_text("{}")
    assert not cacheable(request(LoRARequest("x", 3, str(cfg_only))))

    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "adapter_config.json").write_text("{}")
    (unreadable / "adapter_model.safetensors").mkdir()  # stat works, reading fails
    assert ident.adapter_identity(LoRARequest("x", 3, str(unreadable))) is None
    assert not cacheable(request(LoRARequest("x", 3, str(unreadable))))
    assert cacheable(request())  # the base model still is


def test_adapter_digests_are_cached_per_file_stat(tmp_path):
    ids = ident.AdapterIdentities()
    path = vls.write_lora_adapter(tmp_path / "a", seed=1)
    lora = LoRARequest("a", 1, path)
    first = ids.identity(lora)
    t0 = time.perf_counter()
    for _ in range(1000):
        assert ids.identity(lora) == first
    per_call = (time.perf_counter() - t0) / 1000
    assert ids.hashed == 1 and per_call < 1e-3  # a few stat calls, ~20 us here

    # Retrained in place (same size, same names): rehashed once, a new identity.
    vls.write_lora_adapter(path, seed=5)
    second = ids.identity(lora)
    assert second != first and ids.hashed == 2
    assert ids.identity(LoRARequest("renamed", 9, path)) == second and ids.hashed == 2
