"""Benchmark: legacy partimage -> partimage-ng conversion versus its floor and the tool route.

Prints, in one run, for a partimage (gzip) image of an ext3 filesystem with
mixed data (text, random, zeros):

  (a) decode floor  -- zlib-decompressing the volume(s) in one process, output discarded;
  (b) imgfarm       -- convert_legacy() of the same image (in a child process, for its RSS),
                       with verify="written" (the default), "stream" (+ zstd round trip)
                       and "full" (+ read-back);
                       the ratio is to the best floor measured so far (re-measured after
                       each variant, as the machine's load changes; the final figures
                       are the last floor line);
  (c) tool route    -- partimage restore to a loop device, then
                       partclone.ext3 -c -s DEV -o - | zstd -T0 > file;
  (d) the command   -- `imgfarm image convert IMAGE --out DIR` as a user runs it, timed
                       from the process start to its exit (start-up included), against
                       the floor of the same volume, for partimage's own -z1 image and
                       for Clonezilla's recipe of the same file system
                       (partimage -z0 ... stdout | gzip -c | split -a 2 -b 4096MB).

Needs root (loop devices, mount).  The legacy image is cached under
/var/tmp/imgfarm-bench/ so reruns are quick.

    python bench/convert.py                 # 512 MiB filesystem
    python bench/convert.py --size-mib 1024 # twice the size: RSS must stay flat
    python bench/convert.py --compare --levels=-5,-1,1,2,3   # the choices, documented
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

CACHE = Path("/var/tmp/imgfarm-bench")
MiB = 1 << 20
ENV = {**os.environ, "TERM": os.environ.get("TERM") or "xterm"}


def sh(*args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), check=True, capture_output=True, **kw)  # type: ignore


def _fill(mnt: Path, size_mib: int) -> None:
    """~80 % of the fs: 1/3 text (log-like lines), 1/3 random, 1/6 zeros, rest small files."""
    budget = size_mib * MiB * 8 // 10
    text_b, rand_b, zero_b = budget // 3, budget // 3, budget // 6
    with open(mnt / "log.txt", "w") as fh:
        i = 0
        written = 0
        while written < text_b:
            line = (f"2026-11-26T17:{i % 60:02d}:{i % 59:02d}Z node{i % 977:03d} imgfarm[{i}]: "
                    f"restore job {i * 7919 % 100003} block {i * 31} ok rate {i % 113} MB/s\n")
            fh.write(line)
            written += len(line)
            i += 1
    with open(mnt / "random.bin", "wb") as fh:
        for _ in range(rand_b // (4 * MiB)):
            fh.write(os.urandom(4 * MiB))
    with open(mnt / "zeros.bin", "wb") as fh:
        for _ in range(zero_b // (4 * MiB)):
            fh.write(bytes(4 * MiB))
    small = mnt / "small"
    small.mkdir()
    for i in range(2000):
        (small / f"f{i}.txt").write_text(f"small file {i}\n" * (i % 50 + 1))


def make_image(size_mib: int) -> Path:
    """The legacy image (``.000``) of a filled ext3 fs, cached under CACHE."""
    d = CACHE / f"ext3-{size_mib}"
    img = d / "legacy" / "bench.000"
    fs = d / "fs.img"
    if img.exists() and (d / "ok").exists():
        return img
    shutil.rmtree(d, ignore_errors=True)
    (d / "legacy").mkdir(parents=True)
    with open(fs, "wb") as fh:
        fh.truncate(size_mib * MiB)
    sh("mkfs.ext3", "-q", "-F", str(fs))
    dev = sh("losetup", "-f", "--show", str(fs)).stdout.decode().strip()
    mnt = d / "mnt"
    mnt.mkdir()
    try:
        sh("mount", dev, str(mnt))
        try:
            _fill(mnt, size_mib)
        finally:
            sh("umount", str(mnt))
        print(f"saving {size_mib} MiB ext3 with partimage -z1 ...", flush=True)
        subprocess.run(["partimage", "-b", "-z1", "-o", "-d", "-f3", "-M", "save", dev,
                        str(d / "legacy" / "bench")], env=ENV, stdin=subprocess.DEVNULL,
                       capture_output=True, check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        fs.unlink()
    (d / "ok").write_text("")
    return img


CLONEZILLA_RECIPE = ("partimage -M -f3 -o -d -b -c -z0 --volume=0 -B gui=no save {dev} stdout "
                     "| gzip -c | split -a 2 -b 4096MB - '{out}.'")


def make_clonezilla(img: Path, size_mib: int) -> list[Path]:
    """The same file system saved with Clonezilla's partimage recipe (cached next to it)."""
    d = img.parent.parent / "clonezilla"
    if (d / "ok").exists():
        return sorted(d.glob("sda1.a?"))
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    fs = d / "fs.img"
    with open(fs, "wb") as fh:
        fh.truncate(size_mib * MiB)
    dev = sh("losetup", "-f", "--show", str(fs)).stdout.decode().strip()
    try:
        print("saving the same file system with Clonezilla's recipe ...", flush=True)
        subprocess.run(["partimage", "-b", "-f3", "restore", dev, str(img)], env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, check=True)
        subprocess.run(["bash", "-o", "pipefail", "-c",
                        CLONEZILLA_RECIPE.format(dev=dev, out=d / "sda1")], env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        fs.unlink()
    (d / "ok").write_text("")
    return sorted(d.glob("sda1.a?"))


def cli_convert(source: Path, repeat: int, *extra: str) -> float:
    """Best wall time of `imgfarm image convert SOURCE --out DIR`, process start to exit."""
    exe = Path(sys.executable).parent / "imgfarm"
    best = None
    for _ in range(repeat):
        dest = Path(tempfile.mkdtemp(prefix="cli-", dir=CACHE))
        try:
            t = time.perf_counter()
            subprocess.run([str(exe), "image", "convert", str(source), "--out", str(dest), *extra],
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)
            dt = time.perf_counter() - t
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        best = dt if best is None else min(best, dt)
    assert best is not None
    return best


def volumes(img: Path) -> list[Path]:
    base = img.with_suffix("")
    out = []
    n = 0
    while (p := base.with_name(f"{base.name}.{n:03d}")).exists():
        out.append(p)
        n += 1
    return out


def decode_floor(vols: list[Path]) -> tuple[float, int]:
    """Best of a few runs of plain zlib decompression (the output is discarded)."""
    best = None
    for _ in range(3):
        r = _decode_once(vols)
        best = r if best is None or r[0] < best[0] else best
    assert best is not None
    return best


def decode_floor_isal(vols: list[Path]) -> float | None:
    """The same floor with ISA-L's inflate (python-isal), if installed."""
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return min(_decode_once(vols, isal_zlib)[0] for _ in range(3))


def _decode_once(vols: list[Path], mod: object = zlib) -> tuple[float, int]:
    t = time.perf_counter()
    total = 0
    for v in vols:
        with open(v, "rb") as fh:
            d = mod.decompressobj(31)  # type: ignore[attr-defined]
            while chunk := fh.read(MiB):
                while chunk:
                    out = d.decompress(chunk, 4 * MiB)
                    total += len(out)
                    chunk = d.unconsumed_tail
    return time.perf_counter() - t, total


def zstd_levels(vols: list[Path], levels: list[int]) -> None:
    """Ratio and single-thread time of each zstd level on the logical stream (in memory)."""
    import zstandard

    data = bytearray()
    for v in vols:
        with open(v, "rb") as fh:
            d = zlib.decompressobj(31)
            while chunk := fh.read(MiB):
                data += d.decompress(chunk)
    for level in levels:
        c = zstandard.ZstdCompressor(level=level)
        best = None
        for _ in range(2):
            t = time.perf_counter()
            n = len(c.compress(data))
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        assert best is not None
        print(f"    zstd level {level:3d}: ratio {len(data) / n:4.2f}, {best:5.2f} s "
              f"({len(data) / MiB / best:5.0f} MiB/s), {n / MiB:.0f} MiB")
    del data


_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from imgfarm.imageformats.convert import convert_legacy
kw = json.loads(sys.argv[3])
t = time.perf_counter()
m = convert_legacy(Path(sys.argv[1]), Path(sys.argv[2]), name="bench", **kw)
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": dt, "rss_kib": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime,
                  "stream_bytes": m.partitions[0].stream_bytes,
                  "used_bytes": m.partitions[0].used_bytes}))
"""


def imgfarm_convert(img: Path, kw: dict[str, object], inflate: str = "") -> dict[str, float]:
    """One convert_legacy(**kw) in a child process; `inflate="zlib"` disables ISA-L."""
    dest = Path(tempfile.mkdtemp(prefix="convert-", dir=CACHE))
    env = {**os.environ, "IMGFARM_INFLATE": inflate} if inflate else None
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD, str(img), str(dest), json.dumps(kw)],
                           check=True, capture_output=True, text=True, env=env)
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def tool_route(img: Path, size_mib: int) -> tuple[float, float, int]:
    work = Path(tempfile.mkdtemp(prefix="tools-", dir=CACHE))
    target = work / "target.img"
    with open(target, "wb") as fh:
        fh.truncate(size_mib * MiB)
    dev = sh("losetup", "-f", "--show", str(target)).stdout.decode().strip()
    try:
        t0 = time.perf_counter()
        subprocess.run(["partimage", "-b", "-f3", "restore", dev, str(img)], env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, check=True)
        t1 = time.perf_counter()
        out = work / "out.ptcl.zst"
        subprocess.run(f"partclone.ext3 -c -s {dev} -o - 2>/dev/null | zstd -q -T0 > '{out}'",
                       shell=True, check=True, env=ENV)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out.stat().st_size
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--no-tools", action="store_true", help="skip the (slow) tool route")
    ap.add_argument("--cli-only", action="store_true",
                    help="only the floor and the command-line figures (d)")
    ap.add_argument("--repeat", type=int, default=3, help="conversions per variant (best kept)")
    ap.add_argument("--compare", action="store_true",
                    help="also time zlib inflate, zstd level 3 and other zstd threading")
    ap.add_argument("--levels", default="",
                    help="comma-separated zstd levels: print ratio and time of each (e.g. -5,-1,1,3)")
    ap.add_argument("--grow", action="store_true",
                    help="also convert an image of twice --size-mib (made once, cached) and "
                         "print both peak RSS figures: memory must stay flat as images grow")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, mount)")
    CACHE.mkdir(parents=True, exist_ok=True)
    img = make_image(args.size_mib)
    vols = volumes(img)
    comp = sum(v.stat().st_size for v in vols)
    print(f"image: {img} ({len(vols)} volume(s), {comp / MiB:.0f} MiB gzip), "
          f"cores: {os.cpu_count()}")
    subprocess.run(["cat", *map(str, vols)], stdout=subprocess.DEVNULL)  # warm the page cache
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    floor_s, raw_bytes = decode_floor(vols)
    print(f"(a) decode floor (zlib, 1 process):   {floor_s:6.2f} s  "
          f"({raw_bytes / MiB / floor_s:5.0f} MiB/s of {raw_bytes / MiB:.0f} MiB logical stream)")
    isal_s = decode_floor_isal(vols)
    if isal_s is not None:
        print(f"    (same with ISA-L inflate, for reference: {isal_s:6.2f} s)")
    variants: list[tuple[str, dict[str, object], str]] = [
        ("default (verify='written')         ", {}, ""),
    ]
    if not args.cli_only:
        variants += [
            ("verify='stream' (+ zstd round trip)", {"verify": "stream"}, ""),
            ("verify='full' (read-back)          ", {"verify": "full"}, ""),
        ]
    if args.compare:
        from imgfarm.imageformats import partimage

        if partimage.INFLATE == "isal":
            variants.append(("default, zlib inflate (no ISA-L)   ", {}, "zlib"))
        variants += [
            ("default, zstd level 3 (old default)", {"level": 3}, ""),
            ("default, zstd in the caller thread ", {"zstd_threads": 0}, ""),
            ("default, zstd_threads=2            ", {"zstd_threads": 2}, ""),
        ]
    results = {}
    for label, kw, inflate in variants:
        runs = [imgfarm_convert(img, kw, inflate) for _ in range(args.repeat)]
        r = min(runs, key=lambda x: x["seconds"])
        results[label] = {**r, "rss_max_kib": max(x["rss_kib"] for x in runs)}
        floor_s = min(floor_s, decode_floor(vols)[0])  # the load changes: re-measure
        print(f"(b) imgfarm convert, {label}: {r['seconds']:5.2f} s = "
              f"{r['seconds'] / floor_s:4.2f}x floor {floor_s:.2f} s (CPU {r['cpu']:.2f} s); "
              f"peak RSS "
              f"{max(x['rss_kib'] for x in runs) / 1024:.0f} MiB; "
              f"{r['stream_bytes'] / MiB:.0f} MiB zst", flush=True)
    r = results[variants[0][0]]
    ratio = r["seconds"] / floor_s
    print(f"goal (b) <= 1.5x the decode floor: {'met' if ratio <= 1.5 else 'NOT met'} "
          f"({ratio:.2f}x)")
    # an installed package has its bytecode compiled; an editable checkout run with
    # PYTHONDONTWRITEBYTECODE=1 would recompile every module at each start instead
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    *[str(p) for p in root.iterdir() if (p / "__init__.py").is_file()]],
                   check=True, capture_output=True)
    for what, src, vs in (("partimage -z1 image", img, vols),
                          ("Clonezilla gzip recipe", None, None)):
        if src is None:
            pieces = make_clonezilla(img, args.size_mib)
            src, vs = pieces[0], pieces
            subprocess.run(["cat", *map(str, vs)], stdout=subprocess.DEVNULL)
        assert vs is not None
        f = decode_floor(vs)[0]
        t_cli = cli_convert(src, args.repeat)
        t_stream = cli_convert(src, args.repeat, "--verify", "stream")
        f = min(f, decode_floor(vs)[0])
        q = t_cli / f
        print(f"(d) `imgfarm image convert {src.name} --out DIR` ({what}, "
              f"{sum(v.stat().st_size for v in vs) / MiB:.0f} MiB gzip): {t_cli:5.2f} s "
              f"start-up included = {q:4.2f}x its floor {f:.2f} s; with --verify stream "
              f"{t_stream:5.2f} s = {t_stream / f:4.2f}x", flush=True)
        print(f"goal (d) <= 1.5x the decode floor, {what}: "
              f"{'met' if q <= 1.5 else 'NOT met'} ({q:.2f}x)")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.no_tools:
        t_restore, t_clone, size = tool_route(img, args.size_mib)
        total = t_restore + t_clone
        print(f"(c) tool route: partimage restore {t_restore:6.2f} s + partclone|zstd "
              f"{t_clone:6.2f} s = {total:6.2f} s ({size / MiB:.0f} MiB zst); "
              f"imgfarm (default) is {total / r['seconds']:.1f}x faster")
        print(f"goal (c)/(b) >= 4x: {'met' if total / r['seconds'] >= 4 else 'NOT met'}")
    if args.grow:
        big = make_image(2 * args.size_mib)
        subprocess.run(["cat", *map(str, volumes(big))], stdout=subprocess.DEVNULL)
        runs = [imgfarm_convert(big, {}, "") for _ in range(args.repeat)]
        rb = min(runs, key=lambda x: x["seconds"])
        rss_small = r["rss_max_kib"] / 1024
        rss_big = max(x["rss_kib"] for x in runs) / 1024
        print(f"memory as the image grows (default variant): {args.size_mib} MiB fs -> peak RSS "
              f"{rss_small:.0f} MiB; {2 * args.size_mib} MiB fs ({rb['used_bytes'] / MiB:.0f} "
              f"MiB used, {rb['seconds']:.2f} s) -> peak RSS {rss_big:.0f} MiB "
              f"({'flat' if rss_big <= rss_small * 1.25 else 'GROWS'})")
    if args.levels:  # last: it holds the logical stream in memory (children would inherit
        # the bench's peak RSS in their ru_maxrss)
        print("zstd levels on the logical stream (1 thread, in memory):")
        zstd_levels(vols, [int(x) for x in args.levels.split(",")])
    print(f"bench process peak RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
