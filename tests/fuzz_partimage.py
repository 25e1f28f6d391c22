"""Fuzz the legacy partimage reader: mutated copies of a real volume, under a memory and time cap.

Run by tests/test_fuzz.py in a child process (``python -m tests.fuzz_partimage N``), so the
address-space cap (RLIMIT_AS) and the per-input alarm bound only this run. Inputs are
tests/data/legacy/sample-ext2.000 (made by partimage 0.6.9, gzip) with bytes flipped,
zeroed, cut, repeated or inserted -- in the gzip stream itself, and in the decompressed
volume written back uncompressed or gzipped again, so the mutations reach the headers,
the bitmap, the CHK records and the tail, not only inflate. Hypothesis is derandomized:
the same N inputs every run.

Every input must convert or be refused with the reader's own ImageError. Anything
else -- another exception, MemoryError (the cap), or an input that takes longer than the
alarm -- fails the run and prints the input's recipe.
"""

from __future__ import annotations

import gzip
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from imgfarm.errors import ImageError
from imgfarm.imageformats.partimage import PartimageReader

SAMPLE = Path(__file__).parent / "data" / "legacy" / "sample-ext2.000"
MEMORY_CAP = 1 << 30  # bytes of address space for the whole child (Python and threads included)
PER_INPUT = 10  # seconds one input may take
RAW = gzip.decompress(SAMPLE.read_bytes())
PACKED = SAMPLE.read_bytes()


class Hang(Exception):
    pass


def _alarm(_sig: int, _frame: Any) -> None:
    raise Hang(f"one input took more than {PER_INPUT} s")


def _offset(draw: Any, size: int, header_bias: bool) -> int:
    # Half the mutations hit the first 4 KiB: the volume, main and partition headers.
    return int(draw(st.integers(0, min(size, 4096) - 1 if header_bias else size - 1)))


@st.composite
def mutated(draw: Any) -> tuple[str, bytes, list[str]]:
    layer = draw(st.sampled_from(["raw", "regzip", "gzip-bytes"]))
    buf = bytearray(PACKED if layer == "gzip-bytes" else RAW)
    recipe: list[str] = [layer]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "zero", "cut", "repeat", "insert"]))
        at = _offset(draw, len(buf), draw(st.booleans()))
        n = draw(st.integers(1, 64))
        if op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
                                                   b"\xff\xff\xff\x7f", b"\x01\x00\x00\x00"]))
        elif op == "zero":
            buf[at:at + n] = bytes(len(buf[at:at + n]))
        elif op == "cut":
            del buf[at:]
        elif op == "repeat":
            buf[at:at] = buf[at:at + n] * draw(st.integers(1, 8))
        else:
            buf[at:at] = draw(st.binary(min_size=1, max_size=n))
        recipe.append(f"{op}@{at}/{n}")
        if not buf:
            buf = bytearray(b"\0")
    out = bytes(buf)
    if layer == "regzip":
        out = gzip.compress(out, compresslevel=1, mtime=0)
    return layer, out, recipe


def run(examples: int) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    signal.signal(signal.SIGALRM, _alarm)
    tally: dict[str, int] = {"converted": 0, "refused": 0}
    slowest = [0.0]
    work = Path(tempfile.mkdtemp(prefix="imgfarm-fuzz-"))

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
              print_blob=False)
    @given(mutated())
    def one(case: tuple[str, bytes, list[str]]) -> None:
        _layer, data, recipe = case
        path = work / "fuzz.000"
        path.write_bytes(data)
        t0 = time.monotonic()
        signal.alarm(PER_INPUT)
        try:
            with PartimageReader(path) as reader:
                for _piece in reader.data():
                    pass
            tally["converted"] += 1
        except ImageError:
            tally["refused"] += 1
        except BaseException as exc:
            raise AssertionError(f"input {' '.join(recipe)}: {type(exc).__name__}: {exc}") from exc
        finally:
            signal.alarm(0)
            slowest[0] = max(slowest[0], time.monotonic() - t0)

    try:
        one()
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"fuzzed {examples} inputs: {tally['converted']} converted, {tally['refused']} refused "
          f"with ImageError; slowest {slowest[0]:.2f} s, peak RSS {peak} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
