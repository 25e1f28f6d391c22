"""The CLI's command tree loads no heavy library, and still offers every command.

Scripts call `imgfarm` in loops and windows call it from cron, so start-up is
paid on every call (bench/cli_start.py times it). What keeps it short is that
the command modules import SQLAlchemy, Celery, the servers and the image
formats only inside the command that runs; these tests fail when an import at
the top of a CLI module (or of something it imports) brings one back. Each runs
a fresh interpreter and reads its sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Never at import or for --help: the job database, the broker, the servers, the
# settings' pydantic, the image formats and their compressors.
HEAVY = ("sqlalchemy", "alembic", "celery", "kombu", "fastapi", "starlette", "uvicorn", "httpx",
         "pydantic", "pydantic_settings", "zstandard", "isal", "ClusterShell", "croniter",
         "imgfarm.imageformats", "imgfarm.tasks", "imgfarm.worker", "imgfarm.api",
         "imgfarm.models.db", "imgfarm.models.tables", "imgfarm.config.settings")

GROUPS = ("db", "node", "image", "window", "bootimage")
COMMANDS = ("capture", "restore", "convert", "jobs", "job", "cancel", "worker", "beat", "api",
            "flower", "reconcile")

_PROBE = """
import json, sys
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["imgfarm", *args]
import imgfarm.cli.main
if args:
    try:
        imgfarm.cli.main.main()
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
print(json.dumps([h for h in heavy if h in sys.modules]), file=sys.stderr)
"""


def _loaded(args: list[str], env: dict[str, str] | None = None,
            heavy: tuple[str, ...] = HEAVY) -> tuple[list[str], str]:
    """Run the CLI with args in a new interpreter; (`heavy` modules it loaded, its stdout)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(heavy)],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    return json.loads(out.stderr.strip().splitlines()[-1]), out.stdout


def test_importing_the_cli_loads_no_heavy_module() -> None:
    loaded, _ = _loaded([])
    assert loaded == [], f"`import imgfarm.cli.main` loads {loaded}: import them inside the command"


@pytest.mark.parametrize("args", [["--help"], ["node", "--help"], ["image", "convert", "--help"]])
def test_help_loads_no_heavy_module(args: list[str]) -> None:
    loaded, _ = _loaded(args)
    assert loaded == [], f"`imgfarm {' '.join(args)}` loads {loaded}"


def test_help_lists_every_command_group_and_command() -> None:
    _, out = _loaded(["--help"])
    listed = {line.split()[1] for line in out.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    missing = [name for name in (*GROUPS, *COMMANDS) if name not in listed]
    assert not missing, f"`imgfarm --help` does not list {missing}:\n{out}"


def test_jobs_on_sqlite_reads_without_sqlalchemy(tmp_path: Path) -> None:
    """`imgfarm jobs --json` is what scripts poll: on SQLite it reads through sqlite3 only."""
    env = {"IMGFARM_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "imgfarm.cli.main", "db", "upgrade"], env=env, check=True,
                   capture_output=True, timeout=120)
    loaded, out = _loaded(["jobs", "--json"], env=env)
    assert json.loads(out) == []
    assert not {"sqlalchemy", "imgfarm.models.db", "celery"} & set(loaded), loaded


def test_convert_into_a_pipe_loads_no_rich(tmp_path: Path) -> None:
    """`image convert` run by a script (stdout not a terminal) prints plain lines only, so
    Rich, a fifth of the command's start-up, is never imported (bench/README.md, convert)."""
    sample = Path(__file__).parent / "data" / "legacy" / "sample-ext2.000"
    loaded, out = _loaded(["image", "convert", str(sample), "--out", str(tmp_path)],
                          heavy=("rich", "sqlalchemy", "pydantic"))
    assert "converted sample-ext2.000 ->" in out, out
    assert (tmp_path / "sample-ext2-ng" / "manifest.json").is_file()
    assert loaded == [], f"`imgfarm image convert ... --out DIR` loads {loaded}"

