"""Bench: how long the `imgfarm` CLI takes to start, against the floor of typer + Rich.

Why: scripts call the CLI in loops and windows call it from cron, so its
start-up is paid on every call. The floor is what any Typer + Rich CLI pays:
`python -c "import typer, rich.console"`. Goals (median of --runs, all
measured in the same run, interleaved so a change of load hits all alike):

    imgfarm --help, imgfarm node --help        within 2.5x the floor
    imgfarm jobs --json (empty SQLite, migrated)   within 4x the floor

Also printed, without a goal here: `imgfarm image convert --help`, and
`imgfarm image convert` of the small legacy sample in tests/data, to a temp
dir (--out) and into the registry (--name) -- the start-up the legacy-archive
conversions pay (the sample's conversion itself takes a few milliseconds).

    .venv/bin/python bench/cli_start.py [--runs 15]

Exits 1 when a goal is not met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "legacy" / "sample-ext2.000"


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="runs of each command (the median counts)")
    args = ap.parse_args(argv)

    py = sys.executable
    script = Path(py).parent / "imgfarm"  # the console script people run
    cli = [str(script)] if script.exists() else [py, "-m", "imgfarm.cli.main"]
    tmp = Path(tempfile.mkdtemp(prefix="cli-start-"))
    env = {**os.environ, "IMGFARM_DATA_DIR": str(tmp / "data"),
           "IMGFARM_DATABASE_URL": f"sqlite:///{tmp / 'data' / 'imgfarm.db'}"}
    env.pop("IMGFARM_CONFIG", None)
    try:
        subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
        out = tmp / "converted"
        cases: list[tuple[str, list[str], float | None]] = [
            ("floor: python -c 'import typer, rich.console'", [py, "-c", "import typer, rich.console"], None),
            ("imgfarm --help", [*cli, "--help"], 2.5),
            ("imgfarm node --help", [*cli, "node", "--help"], 2.5),
            ("imgfarm jobs --json (empty SQLite)", [*cli, "jobs", "--json"], 4.0),
            ("imgfarm image convert --help", [*cli, "image", "convert", "--help"], None),
            (f"imgfarm image convert {SAMPLE.name} --out DIR", [*cli, "image", "convert", str(SAMPLE), "--out",
                                                                str(out), "--json"], None),
            (f"imgfarm image convert {SAMPLE.name} --name N", [*cli, "image", "convert", str(SAMPLE), "--name",
                                                               "bench-{run}", "--json"], None),
        ]
        times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for run in range(args.runs):
            for label, command, _goal in cases:
                shutil.rmtree(out, ignore_errors=True)
                times[label].append(_time([a.format(run=run) for a in command], env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    floor = statistics.median(times[cases[0][0]])
    width = max(len(label) for label, _, _ in cases)
    print(f"cli_start: median of {args.runs} runs each, interleaved; python {sys.version.split()[0]}, "
          f"load {os.getloadavg()[0]:.2f}")
    ok = True
    for label, _command, goal in cases:
        median = statistics.median(times[label])
        ratio = median / floor
        verdict = ""
        if goal is not None:
            met = ratio <= goal
            ok &= met
            verdict = f"goal <= {goal:.1f}x: {'met' if met else 'NOT met'}"
        print(f"  {label:{width}}  {median * 1000:6.0f} ms  {ratio:4.2f}x  {verdict}")
    print(f"cli_start: {'all goals met' if ok else 'goals NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
