"""What every fuzz target shares: reading decisions from the fuzzer's bytes, running under
atheris, and a deep snapshot of plain state for "a refused request changes nothing".

A target is a module ``fuzz_<name>.py`` with ``TestOneInput(data: bytes) -> None`` that raises
on a failure (an unexpected exception, a broken invariant). Run as a script it fuzzes under
atheris (libFuzzer flags pass through); imported, it replays inputs with no atheris at all
(tests/test_fuzz.py, tests/test_fuzz_regressions.py).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import operator
import os
import shlex
import sys
import types
from collections import deque
from collections.abc import Callable

import msgspec

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


# Open findings, each reproduced by an xfail test in tests/test_fuzz_regressions.py. A run
# steps around them (the check, or the setup that reaches it) so that it goes on to find
# others; KVDEPOT_FUZZ_STRICT=1 checks them too. Delete an entry once its fix is in.
# Open findings: issue name -> its regression test (tests/test_fuzz_regressions.py). All six
# the first runs found are fixed (docs/fuzzing.md).
KNOWN_ISSUES: dict[str, str] = {}
STRICT = os.environ.get("KVDEPOT_FUZZ_STRICT") == "1"


def checked(issue: str) -> bool:
    """Is the check (or the setup) that meets ``issue`` on in this run? Always, unless the
    issue is a known open one (and the run is not strict)."""
    return STRICT or issue not in KNOWN_ISSUES


def instrumented(module_name: str) -> contextlib.AbstractContextManager:
    """Around a harness's imports: atheris instruments kvdepot's modules and the harness's
    own helpers (their coverage guides the fuzzer) when the harness runs as a fuzzer;
    nothing happens on replay."""
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["kvdepot", "core_world", "rpc_support"])


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """Run ``test_one_input`` under atheris with this process's libFuzzer flags. The
    harness's own functions are instrumented too: its checks' branches are features."""
    import atheris

    main = sys.modules["__main__"]
    for obj in list(vars(main).values()):
        functions = [obj] if inspect.isfunction(obj) else (
            [f for f in vars(obj).values() if inspect.isfunction(f)] if inspect.isclass(obj) else []
        )
        for function in functions:
            if function.__module__ == "__main__":
                atheris.instrument_func(function)
    # libFuzzer's -merge and -fork run argv[0] again through the shell: this interpreter
    # with this script, whatever the script's mode bits.
    again = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(sys.argv[0]))}"
    atheris.Setup([again, *sys.argv[1:]], test_one_input)
    atheris.Fuzz()


class Reader:
    """Decisions read from the fuzzer's bytes, front to back. Past the end every read is 0,
    so any prefix of an input is an input too (libFuzzer's mutations cut and splice)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def below(self, n: int) -> int:
        """An int in [0, n): one byte for n <= 256, two for more."""
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return (self.byte() << 8 | self.byte()) % n

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def pick(self, options):
        return options[self.below(len(options))]

    def sized(self, max_len: int = 255) -> bytes:
        """A length byte, then that many bytes (fewer at the end)."""
        return self.take(min(self.byte(), max_len))


def snapshot(obj, unordered: frozenset[str] = frozenset(), skip: frozenset[str] = frozenset()):
    """A comparable value of everything reachable from ``obj`` through plain containers,
    dataclasses, slotted objects and msgspec structs: what differs between two snapshots is
    state that changed. Dict order counts (eviction orders and "oldest first" dicts are
    orders) except in attributes named in ``unordered`` (tables whose order nothing reads);
    attributes named in ``skip`` are left out (an observer's metrics count refusals too);
    functions are left out; an object met again (a chain's parent link, the index every
    evictor shares) is named by its key, not walked again."""
    return _snap(obj, set(), 0, unordered, False, skip)


# Behaviour, not state: factories, callbacks, key functions.
_BEHAVIOUR = (
    type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial,
    operator.attrgetter,
)
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})
_SEQUENCES = frozenset({list, tuple, deque})
_names_of: dict[type, tuple[tuple[str, ...], bool]] = {}  # per type: slots, has __dict__


def _snap(obj, seen: set[int], depth: int, unordered: frozenset[str], sort: bool,
          skip: frozenset[str]):
    kind = type(obj)
    if kind in _PLAIN or isinstance(obj, (enum.Enum, msgspec.Struct)):
        return obj  # msgspec structs here are immutable values (locations, slots, effects)
    if isinstance(obj, _BEHAVIOUR):
        return ("<callable>", getattr(obj, "__qualname__", kind.__name__))
    if id(obj) in seen or depth > 64:
        key = getattr(obj, "key", None)
        return ("<ref>", key if key is not None else kind.__name__)
    seen.add(id(obj))  # walked once: the index is shared by every evictor and the tiers
    d = depth + 1
    if isinstance(obj, dict):
        items = tuple(
            (_snap(k, seen, d, unordered, False, skip), _snap(v, seen, d, unordered, False, skip))
            for k, v in obj.items()
        )
        return ("dict", tuple(sorted(items, key=repr)) if sort else items)
    if kind in _SEQUENCES:
        return tuple([_snap(v, seen, d, unordered, False, skip) for v in obj])
    if isinstance(obj, (set, frozenset)):
        return ("set", tuple(sorted((_snap(v, seen, d, unordered, False, skip) for v in obj), key=repr)))
    fields = _fields(obj)
    if not fields:
        return ("<opaque>", kind.__name__)
    return (kind.__name__, tuple([
        (n, _snap(v, seen, d, unordered, n in unordered, skip)) for n, v in fields if n not in skip
    ]))


def _fields(obj) -> list[tuple[str, object]]:
    kind = type(obj)
    known = _names_of.get(kind)
    if known is None:
        slots: list[str] = []
        for klass in kind.__mro__:
            names = getattr(klass, "__slots__", ())
            slots += [s for s in ((names,) if isinstance(names, str) else names) if s not in slots]
        known = _names_of[kind] = (tuple(slots), hasattr(obj, "__dict__"))
    slots, has_dict = known
    out = [(n, getattr(obj, n)) for n in slots if n != "__weakref__" and hasattr(obj, n)]
    if has_dict:
        out += [item for item in vars(obj).items() if item[0] not in slots]
    return out


def diff(before, after, path: str = "") -> str:
    """Where two snapshots first differ, for a failure message."""
    if type(before) is not type(after) or not isinstance(before, tuple):
        return f"{path or '<root>'}: {before!r:.300} -> {after!r:.300}"
    if len(before) != len(after):
        return f"{path or '<root>'}: {len(before)} items -> {len(after)}: {before!r:.300} -> {after!r:.300}"
    for i, (a, b) in enumerate(zip(before, after)):
        if a != b:
            name = a[0] if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) else i
            return diff(a, b, f"{path}/{name}")
    return f"{path}: equal"


def inputs_in(root: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every input file in ``root`` (none when it does not exist)."""
    out = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isfile(path) and not name.startswith("."):
                with open(path, "rb") as f:
                    out.append((name, f.read()))
    return out
