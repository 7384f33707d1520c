"""Shared pieces of the property-based fuzz tests (tests/test_fuzz_*.py; not a test module).

Profiles (PIXELSEG_FUZZ, default `ci`):
    ci    fixed seed (derandomize), a modest number of examples per test: every fuzz test together runs in CI
          within a couple of minutes on 2 cores, and a failure reproduces exactly.
    long  random seed, PIXELSEG_FUZZ_SCALE (default 10) times the ci examples per test: the benchmark run
          docs/reliability.md counts.
Each example also runs under a watchdog (`no_hang`): an input that makes a reader loop is a failure, not a CI
hang. The watchdog is a safety net with a limit far above any normal time, not a speed assertion.

PIXELSEG_FUZZ_COUNTS=FILE appends "<entry point> <examples>" lines, which docs/reliability.md sums.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pixelseg.core.errors import PixelsegError

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, max_examples=40, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE = os.environ.get("PIXELSEG_FUZZ", "ci")
settings.load_profile(PROFILE)


SCALE = float(os.environ.get("PIXELSEG_FUZZ_SCALE", "10"))


def examples(ci: int) -> settings:
    """@examples(n): n examples per test in the ci profile; in the long one n × PIXELSEG_FUZZ_SCALE (default 10)."""
    if PROFILE == "ci":
        return settings(max_examples=ci)
    return settings(max_examples=max(1, int(ci * SCALE)))


HANG_S = 60  # far above any example's normal time; only a loop or a runaway allocation gets near it


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def no_hang(what: str, seconds: int = HANG_S):
    def fire(*_):
        raise Hang(f"{what}: still running after {seconds} s (hang)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_counts: dict[str, int] = {}


def count(entry: str) -> None:
    """One more input tried on `entry` (written at exit when PIXELSEG_FUZZ_COUNTS names a file)."""
    _counts[entry] = _counts.get(entry, 0) + 1


def _write_counts():
    path = os.environ.get("PIXELSEG_FUZZ_COUNTS")
    if path and _counts:
        with open(path, "a") as f:
            for k, v in sorted(_counts.items()):
                f.write(f"{k} {v}\n")


import atexit  # noqa: E402

atexit.register(_write_counts)


def one_line_naming(exc: BaseException, *names) -> str:
    """The message of a PixelsegError, checked: one line, naming one of `names` (a file, a flag, a field)."""
    assert isinstance(exc, PixelsegError), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)
    assert any(str(n) in msg for n in names), f"{msg!r} names none of {names}"
    return msg


# ---- hostile values -----------------------------------------------------------------------------------
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, -1.0, 1e308, -1e308, 1e-320, math.nan, math.inf, -math.inf, 0.5]))
INTS = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, -(2 ** 63), 255, 256]))
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "a b.jpg", "ünï cødé.png", "../a.jpg", "a.jpg ",
                                                        "/data/upload/1/0123abcd-a.jpg", "nan", "inf", "1e999",
                                                        "-5", "0x10", "\x00", "C:\\a.jpg", "http://x/a.jpg"]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
HOSTILE = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                         st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)


def paths(doc, prefix=()):
    """Every (key/index path) inside a JSON-like document, containers included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def _parent(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw, base, max_edits: int = 3):
    """`base` (a JSON-like document) with 1..max_edits edits at drawn places: a value replaced by a hostile
    one, a key deleted, or a list element duplicated."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        all_paths = [p for p in paths(doc) if p]
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = _parent(doc, path)
        how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate"]))
        if how == "delete":
            del parent[path[-1]]
        elif how == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        else:
            parent[path[-1]] = draw(HOSTILE)
    return doc


def names_in(exc_msg: str, root: Path) -> bool:
    return str(root) in exc_msg
