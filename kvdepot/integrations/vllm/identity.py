"""What the KV namespace says about the weights: digests of checkpoints and LoRA adapters.

KV bytes depend on the weights that computed them, not on the name or the path an engine serves
them under. A fine-tune replaced in place (same path, same config, same served name) or two
adapters registered under the same ``LoRARequest`` label must never share chunks, while
byte-identical copies of one checkpoint on two paths or two nodes should. So the identity is a
digest of the files' contents, never of paths, names, inodes or mtimes.

Checkpoints (``kvdepot.model_identity``):

- ``"auto"`` (default): per file, its name in the folder and size, then: files up to 1 MiB (configs, the
  shard index, quantization configs, remote code) whole; safetensors files their header (every
  tensor's name, dtype, shape and offsets) plus the first and last 4 KiB of every tensor plus
  one 4 KiB block every 16 MiB; other weight files (``.bin``, ``.pt``, ``.gguf``) their first
  64 KiB, one 4 KiB block every 16 MiB and the last 4 KiB. Two fine-tunes of one architecture
  share headers and sizes but differ in every trained tensor's first bytes; the cost is a few
  thousand small reads, under 0.1% of the bytes. Measured on this project's 2-core VM: a
  3.1 GiB safetensors file of 200 tensors of 16 MiB, 2.5 MB read in 401 ranges, 5 ms from the
  page cache (where vLLM's load just left it), 45 ms with the file dropped from it; a 30 GB
  checkpoint costs ~10x that. What it misses: an edit of a few bytes inside a tensor that no
  sampled block covers; use ``"full"`` for that.
- ``"full"``: every byte of every file (blake3): the same 3.1 GiB file 1.0 s from the page
  cache, 4.3 s from disk, so ~10-45 s per 30 GB, on every TP rank at start.
- any other string: the identity as given, for users who know their copies are identical (the
  same weights saved with different shard sizes or formats, say).

Serving options that change the KV of the same files are always part of the identity: the
weights' dtype, the quantization method, the load format, ``hf_overrides`` and the model
implementation. A model pulled from the Hugging Face hub is named by the commit vLLM resolved
(a git commit covers every file's content); weights that are not local files (object storage,
an unknown loader) cannot be identified, and get a namespace private to the engine instance
(a warning says to set ``kvdepot.model_identity``).

LoRA adapters: their ``adapter_config.json`` and weight files hashed whole (adapters are small),
cached per file path, size, mtime, ctime and inode so that a scheduler step never rehashes. An
adapter that cannot be identified (no path, not on disk, unreadable) makes its requests
uncacheable; it is never keyed by its name.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import blake3

log = logging.getLogger("vllm.kvdepot")

MODEL_IDENTITY_MODES = ("auto", "full")

WHOLE_FILE_BYTES = 1 << 20  # files up to this size are hashed whole in "auto"
BLOCK_BYTES = 4096  # one sampled block
STRIDE_BYTES = 16 << 20  # one sampled block per this many bytes of a weight file
HEAD_BYTES = 64 << 10  # the part of a non-safetensors weight file that holds its metadata
READ_BYTES = 8 << 20  # read size of "full"
# safetensors caps its JSON header at 100 MB; anything bigger is not a safetensors header.
MAX_SAFETENSORS_HEADER = 100_000_000

# What a checkpoint folder holds that can change KV: weights, their index and quantization
# configs, the model config, remote modeling code. Tokenizer and generation settings cannot (the
# keys are token ids), so editing them keeps the cache.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".tensors")
CONFIG_SUFFIXES = (".json", ".py")
NOT_WEIGHTS = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "generation_config.json",
        "chat_template.json",
    }
)
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_model.pt",
)


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint that the identity covers, sorted by name.

    ``path`` is a folder (its top-level files with a weight or config suffix, where vLLM's
    loaders look, tokenizer and generation files left out) or a single weight file (GGUF).
    Raises FileNotFoundError when it is neither, or holds no such file.
    """
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    files = sorted(
        p
        for p in root.iterdir()
        if not p.name.startswith(".")
        and p.name not in NOT_WEIGHTS
        and p.suffix in WEIGHT_SUFFIXES + CONFIG_SUFFIXES
        and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"no weight or config files in {path}")
    return files


def sample_ranges(path: str | os.PathLike, size: int) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges "auto" reads of a file of ``size`` bytes: sorted,
    merged, deterministic in the file's size and (for safetensors) its header."""
    if size <= WHOLE_FILE_BYTES:
        return [(0, size)] if size else []
    ranges = [(0, min(HEAD_BYTES, size))]
    if str(path).endswith(".safetensors"):
        ranges = _safetensors_ranges(path, size) or ranges
    ranges += [(off, min(BLOCK_BYTES, size - off)) for off in range(0, size, STRIDE_BYTES)]
    ranges.append((size - BLOCK_BYTES, BLOCK_BYTES))
    ranges.sort()
    merged = [ranges[0]]
    for off, n in ranges[1:]:
        last_off, last_n = merged[-1]
        if off <= last_off + last_n:
            merged[-1] = (last_off, max(last_n, off + n - last_off))
        else:
            merged.append((off, n))
    return merged


def _safetensors_ranges(path: str | os.PathLike, size: int) -> list[tuple[int, int]] | None:
    """The header, and the first and last block of every tensor; None if not a valid header
    (the file is then sampled as an opaque weight file)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return None
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            return None
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return None
    if not isinstance(header, dict):
        return None
    ranges = [(0, 8 + n)]
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        try:
            begin, end = (8 + n + int(x) for x in info.get("data_offsets", (0, 0)))
        except (TypeError, ValueError):
            return None
        end = min(end, size)
        if end <= begin:
            continue
        ranges.append((begin, min(BLOCK_BYTES, end - begin)))
        ranges.append((max(begin, end - BLOCK_BYTES), min(BLOCK_BYTES, end - begin)))
    return ranges


def file_digest(path: str | os.PathLike, mode: str = "auto") -> bytes:
    """32-byte digest of one file's contents: its size and sampled ranges ("auto") or every
    byte ("full"). Raises OSError when the file cannot be read."""
    size = os.stat(path).st_size
    h = blake3.blake3()
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb", buffering=0) as f:
        if mode == "full":
            buf = bytearray(READ_BYTES)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
        else:
            fd = f.fileno()
            for off, n in sample_ranges(path, size):
                data = os.pread(fd, n, off)
                if len(data) != n:
                    raise OSError(f"{path} shrank while being read")
                h.update(data)
    return h.digest()


def checkpoint_digest(path: str | os.PathLike, mode: str = "auto") -> str:
    """Hex digest of a checkpoint folder (or single weight file): equal for byte-identical
    copies anywhere (under any name), different when any covered file's name in the folder,
    size or sampled bytes differ.

    Raises ValueError for a mode other than "auto" / "full", FileNotFoundError when there is
    no checkpoint at ``path``, OSError when a file cannot be read.
    """
    if mode not in MODEL_IDENTITY_MODES:
        raise ValueError(f"mode must be one of {MODEL_IDENTITY_MODES}, not {mode!r}")
    h = blake3.blake3()
    single = Path(path).is_file()
    for f in checkpoint_files(path):
        # Names inside a folder matter (the shard index refers to them); a single file's own
        # name is part of its path, which identifies nothing.
        name = b"" if single else f.name.encode()
        h.update(len(name).to_bytes(4, "little") + name)
        h.update(file_digest(f, mode))
    return h.hexdigest()


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local snapshot folder of a hub model vLLM already downloaded, without the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - not a hub id, not cached: the caller says so
        return None


def _options(model_config: Any, load_config: Any) -> dict[str, str]:
    """Serving options that change the KV computed from the same files."""
    overrides = getattr(model_config, "hf_overrides", None) or {}
    if callable(overrides):  # a function's repr holds its address: name it instead
        overrides = f"{overrides.__module__}.{overrides.__qualname__}"
    return {
        "dtype": str(getattr(model_config, "dtype", "")),
        "quantization": str(getattr(model_config, "quantization", None)),
        "load_format": str(getattr(load_config, "load_format", "")),
        "hf_overrides": json.dumps(overrides, sort_keys=True, default=str),
        "model_impl": str(getattr(model_config, "model_impl", "")),
    }


def weights_identity(
    model: str,
    *,
    setting: str = "auto",
    revision: str | None = None,
    download_dir: str | None = None,
    model_weights: str = "",
    load_format: str = "auto",
) -> tuple[str, str] | None:
    """(kind, identity) of the weights of vLLM's ``model`` (a folder, a weight file or a hub
    id), before the serving options are added: ("given", setting), ("auto" | "full",
    checkpoint digest), ("hf-commit", commit) for a hub model in "auto", or None when they
    cannot be identified (``model_weights``: pulled from object storage; a folder without
    weight files, whose loader reads them elsewhere; a hub id not in the local cache).
    Raises OSError when a checkpoint file cannot be read."""
    if setting not in MODEL_IDENTITY_MODES:
        return "given", setting
    if model_weights:
        return None  # the local folder holds the configs only; the weights stream from storage
    if os.path.exists(model):
        files = checkpoint_files(model)
        # "dummy" weights are made from the config alone; any other loader with no weight file
        # here reads them from somewhere this digest cannot see (a tensorizer URI, say).
        if load_format != "dummy" and not any(f.suffix in WEIGHT_SUFFIXES for f in files):
            return None
        return setting, checkpoint_digest(model, setting)
    snapshot = _hub_snapshot(model, revision, download_dir)
    if snapshot is None:
        return None
    if setting == "auto":
        return "hf-commit", snapshot.name  # the snapshot folder is named by the commit
    return setting, checkpoint_digest(snapshot, setting)


def namespace_model(
    label: str | None, model_config: Any, load_config: Any, engine_id: str, setting: str = "auto"
) -> str:
    """The model string a worker registers its namespace under: ``"<label>@<kind>:<digest>"``.

    ``label`` (``kvdepot.model``) names the model in the server's logs and also separates
    namespaces; by default the architecture from vLLM's ``model_config``. The digest covers
    the weights' identity (``weights_identity``, per ``setting``) and the serving options, so
    engines share chunks exactly when both are equal, whatever the path. Weights that cannot
    be identified (not local files, unreadable) get ``"<label>@engine:<engine_id>"``, private
    to this engine instance (all its ranks agree on it), with a warning.
    """
    if not label:
        archs = getattr(getattr(model_config, "hf_config", None), "architectures", None) or ["model"]
        label = str(archs[0])
    t0 = time.perf_counter()
    try:
        ident = weights_identity(
            str(model_config.model),
            setting=setting,
            revision=getattr(model_config, "revision", None),
            download_dir=getattr(load_config, "download_dir", None),
            model_weights=getattr(model_config, "model_weights", ""),
            load_format=str(getattr(load_config, "load_format", "auto")),
        )
        why = "not local files"
    except OSError as exc:  # replaced or removed while vLLM runs: no reason to fail the engine
        ident, why = None, str(exc)
    if ident is None:
        log.warning(
            "kvdepot: the weights of %s cannot be identified (%s); this engine shares no cached "
            "KV with others. Set kvdepot.model_identity to share.", model_config.model, why,
        )
        return f"{label}@engine:{engine_id or os.getpid()}"
    kind, value = ident
    options = _options(model_config, load_config)
    h = blake3.blake3(json.dumps({"kind": kind, "weights": value, **options}, sort_keys=True).encode())
    model = f"{label}@{kind}:{h.hexdigest()[:32]}"
    log.info("kvdepot: model identity %s (%.0f ms)", model, (time.perf_counter() - t0) * 1e3)
    return model


# --- LoRA adapters ----------------------------------------------------------------------------


def adapter_dir(lora_request: Any) -> Path | None:
    """The local folder of a LoRA request's adapter, resolved as vLLM's workers resolve it
    (absolute, ``~``, relative to the working folder, else a hub id already downloaded);
    None when it is not on this machine."""
    path = getattr(lora_request, "lora_path", None) or getattr(lora_request, "path", None)
    if not path:
        return None
    path = os.path.expanduser(str(path))
    if os.path.isabs(path) or os.path.exists(path):
        return Path(os.path.abspath(path))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "adapter_config.json")
    except Exception:  # noqa: BLE001 - not a hub id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


class AdapterIdentities:
    """Digests of LoRA adapters, cached per file stat so a scheduler step never rehashes.

    ``identity(lora_request)`` costs a few ``stat`` calls when cached. ``hashed`` counts the
    adapters actually read (for tests and logs). Thread-safe.
    """

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self.hashed = 0
        self._cache: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def identity(self, lora_request: Any) -> str | None:
        """Hex digest of the adapter's config and weight files, or None (with one warning per
        path) when it cannot be identified: no path, no adapter_config.json, no weight file,
        or unreadable."""
        folder = adapter_dir(lora_request)
        if folder is None:
            return self._unidentified(lora_request, "its path is not on this machine")
        stats = []
        for name in ADAPTER_FILES:
            try:
                st = os.stat(folder / name)
            except OSError:
                continue
            stats.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
        names = {s[0] for s in stats}
        if "adapter_config.json" not in names or len(names) < 2:
            return self._unidentified(lora_request, "no adapter_config.json and weights there")
        key = (str(folder), tuple(stats))
        with self._lock:
            digest = self._cache.get(key)
            if digest is not None:
                self._cache.move_to_end(key)
                return digest
        h = blake3.blake3()
        try:
            for name, *_ in stats:
                h.update(name.encode() + b"\0")
                h.update(file_digest(folder / name, "full"))
        except OSError as exc:
            return self._unidentified(lora_request, str(exc))
        digest = h.hexdigest()
        with self._lock:
            self.hashed += 1
            self._cache[key] = digest
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return digest

    def _unidentified(self, lora_request: Any, why: str) -> None:
        path = str(getattr(lora_request, "lora_path", None) or getattr(lora_request, "path", ""))
        with self._lock:
            first = path not in self._warned
            if len(self._warned) >= self.max_entries:
                self._warned.clear()
            self._warned.add(path)
        if first:
            log.warning(
                "kvdepot: LoRA adapter %r at %r cannot be identified (%s); its requests are not "
                "cached", getattr(lora_request, "lora_name", ""), path, why,
            )
        return None


ADAPTERS = AdapterIdentities()


def adapter_identity(lora_request: Any) -> str | None:
    """The process-wide cached ``AdapterIdentities.identity``."""
    return ADAPTERS.identity(lora_request)
