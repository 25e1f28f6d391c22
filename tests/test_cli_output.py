"""What the CLI prints from outside is text: never Rich markup, never a raw control character.

Agent error texts, job event messages, image headers and names in error
messages come from agents, files and operators. `disk gone [/]` once made
`imgfarm jobs` exit with a MarkupError, and `\\x1b[2J` from an agent cleared
the operator's screen. Also: the job views read through the DB-API
(models/views.py) are the same on SQLite's bare sqlite3 path and through
SQLAlchemy, on both backends.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import typer
from typer.testing import CliRunner

from imgfarm.cli.main import app
from imgfarm.cli.output import plain
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.dbapi import reader
from imgfarm.models.tables import Job, JobEvent
from imgfarm.models.views import read_job, read_jobs
from imgfarm.tasks.nodes import add_node

runner = CliRunner()
ERROR = "disk gone [/]\x1b[2J"
MESSAGE = "[bold]tail[/bold] \x1b]0;owned\x07 \u202eevil"


def test_plain_escapes_control_characters_and_keeps_brackets() -> None:
    assert plain(ERROR) == "disk gone [/]\\x1b[2J"
    assert plain("a\nb\tc\rd\x00\x7f\x9b") == "a\\nb\\tc\\rd\\x00\\x7f\\x9b"
    assert plain("\u202eevil\u2028") == "\\u202eevil\\u2028"
    assert plain("[red]x[/] café 東京") == "[red]x[/] café 東京"


def _failed_job() -> int:
    started = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    with session_scope() as s:
        node = add_node(s, "n1", disk="/tmp/n1.img")
        job = Job(kind="restore", node_id=node.id, image_name="base", state=states.FAILED, error=ERROR,
                  progress=12.345, started_at=started, finished_at=started + timedelta(seconds=90),
                  result={"tail": ["x"]}, options={"disk": "/dev/sdb"})
        s.add(job)
        s.flush()
        s.add(JobEvent(job_id=job.id, kind="report", state=states.FAILED, message=MESSAGE,
                       data={"exit": 1}))
        return job.id


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_agent_texts_print_as_text(settings_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = _failed_job()
    code, out = _run("jobs")
    assert code == 0, out
    assert "disk gone [/]\\x1b[2J" in out and "\x1b" not in out
    code, out = _run("job", str(job_id))
    assert code == 0, out
    assert "disk gone [/]\\x1b[2J" in out and "[bold]tail[/bold] \\x1b]0;owned\\x07 \\u202eevil" in out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    code, out = _run("jobs", "--json")
    assert json.loads(out)[0]["error"] == ERROR  # scripts get the exact text, JSON-escaped

    from imgfarm.cli.jobs import report_and_exit

    with reader(bare_sqlite=True) as db:
        views = read_jobs(db, [job_id])
    with pytest.raises(typer.Exit):
        report_and_exit(views, json_out=False)
    assert "n1 failed: disk gone [/]\\x1b[2J" in capsys.readouterr().out


def test_names_in_error_messages_print_as_text(settings_env: str) -> None:
    code, out = _run("node", "show", "[/]")
    assert code == 3 and "unknown node '[/]'" in out and "Traceback" not in out
    code, out = _run("image", "inspect", "[bold]x\x1b[2J")
    assert code == 2 and "bad image name '[bold]x\\x1b[2J'" in out and "\x1b" not in out


def test_image_headers_print_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    from imgfarm.cli.images import _print_tree

    _print_tree({"label": "[/]", "volumes": [{"description": "\x1b[2Jx"}], "size_bytes": 4096})
    out = capsys.readouterr().out
    assert "[/]" in out and "\\x1b[2Jx" in out and "\x1b" not in out and "4096 (4.0 KiB)" in out


def test_job_views_are_the_same_through_sqlite3_and_sqlalchemy(settings_env: str) -> None:
    job_id = _failed_job()
    with reader(bare_sqlite=True) as db:
        bare = read_job(db, job_id)
    with reader() as db:
        pooled = read_job(db, job_id)
    assert bare == pooled
    assert bare["started_at"] == "2026-01-02T03:04:05.123456Z"
    assert bare["finished_at"] == "2026-01-02T03:05:35.123456Z" and bare["duration"] == 90.0
    assert bare["node"] == "n1" and bare["progress"] == 12.35 and bare["error"] == ERROR
    assert bare["result"] == {"tail": ["x"]} and bare["options"] == {"disk": "/dev/sdb"}
    assert [(e["kind"], e["message"], e["data"]) for e in bare["events"]] == [("report", MESSAGE, {"exit": 1})]
    assert bare["events"][0]["at"].endswith("Z")


def test_job_filters_and_order_through_both_read_paths(settings_env: str) -> None:
    from imgfarm.errors import InvalidInput, NotFound
    from imgfarm.models.views import list_jobs

    first = _failed_job()
    with session_scope() as s:
        node = add_node(s, "n2", disk="/tmp/n2.img")
        s.add(Job(kind="capture", node_id=node.id, image_name="cap", state=states.RUNNING))
        s.add(Job(kind="convert", node_id=None, image_name="old", state=states.SUCCEEDED))
    for bare in (True, False):
        with reader(bare_sqlite=bare) as db:
            assert [v["id"] for v in list_jobs(db)] == [first + 2, first + 1, first]  # newest first
            assert [v["kind"] for v in list_jobs(db, state=states.RUNNING)] == ["capture"]
            assert [v["image"] for v in list_jobs(db, kind="convert")] == ["old"]
            assert [v["node"] for v in list_jobs(db, node="n1")] == ["n1"]
            assert [v["id"] for v in list_jobs(db, limit=1)] == [first + 2]
            assert list_jobs(db, node="n2", state=states.FAILED) == []
            with pytest.raises(NotFound, match="unknown node 'n9'"):
                list_jobs(db, node="n9")
            with pytest.raises(InvalidInput, match="unknown state 'x'"):
                list_jobs(db, state="x")
            assert [v["id"] for v in read_jobs(db, [first + 1, first, 999])] == [first, first + 1]


def test_lazy_consoles_work_in_rich_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's consoles are made at their first use (cli/output.py). Rich's Live, under
    `--wait`'s progress bars and the terminal spinner, enters its console as a context
    manager, which Python looks up on the type and not through __getattr__."""
    import sys

    from rich.progress import Progress

    from imgfarm.cli import output

    with Progress(console=output.console, auto_refresh=False) as prog:
        task = prog.add_task("restore", total=2)
        prog.update(task, advance=2)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # status() shows Rich's spinner
    with output.status("converting x.000 ...") as update:
        update("converting x.000: 50%")
