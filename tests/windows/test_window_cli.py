"""`imgfarm window ...` and the windows migration, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from imgfarm.cli.main import app

runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["window", *args], env={"COLUMNS": "300"})
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def test_window_cli_round_trip_and_errors(win_db: str) -> None:
    code, out = _cli("add", "lab1-weekly", "--cron", "0 2 * * 6", "--duration", "240",
                     "--group", "lab1", "--image", "base", "--max-concurrent", "2",
                     "--tz", "Europe/Berlin", "--json")
    assert code == 0, out
    view = json.loads(out)
    assert view["target"] == "@lab1" and view["timezone"] == "Europe/Berlin"
    assert view["next_open"].endswith("01:00:00Z")  # 02:00 CET

    code, out = _cli("add", "x", "--cron", "61 2 * * *", "--duration", "5", "-g", "lab1",
                     "-i", "base")
    assert code == 2 and "bad cron expression '61 2 * * *'" in out and "0 2 * * 6" in out
    code, out = _cli("add", "x", "--cron", "0 2 * * 6", "--duration", "5", "-g", "lab1",
                     "-i", "base", "--tz", "Moon/Base")
    assert code == 2 and "unknown time zone 'Moon/Base'" in out
    code, out = _cli("add", "x", "--cron", "0 2 * * 6", "--duration", "5", "-g", "lab7",
                     "-i", "base")
    assert code == 3 and "unknown group 'lab7'" in out
    code, out = _cli("add", "x", "--cron", "0 2 * * 6", "--duration", "5", "-g", "lab1",
                     "-i", "gone")
    assert code == 3 and "image 'gone' not found" in out
    code, out = _cli("add", "x", "--cron", "0 2 * * 6", "--duration", "5", "-n", "n[1-9]",
                     "-i", "base")
    assert code == 3 and "unknown nodes" in out

    code, out = _cli("list", "--json")
    assert code == 0 and [w["name"] for w in json.loads(out)] == ["lab1-weekly"]
    assert json.loads(_cli("disable", "lab1-weekly", "--json")[1])["enabled"] is False
    assert json.loads(_cli("enable", "lab1-weekly", "--json")[1])["enabled"] is True

    code, out = _cli("run-now", "lab1-weekly", "--json")
    assert code == 0, out
    started = json.loads(out)
    assert len(started["submitted"]) == 2, json.dumps(started)
    code, out = _cli("show", "lab1-weekly", "--runs", "--json")
    run = json.loads(out)["runs"][0]
    assert run["trigger"] == "run-now" and run["counts"]["queued"] == 2
    assert run["counts"]["pending"] == 4
    code, out = _cli("show", "lab1-weekly", "--runs")  # the table form
    assert code == 0 and "run-now" in out and "n1" in out
    code, out = _cli("remove", "lab1-weekly")
    assert code == 4 and "in progress" in out
    assert _cli("show", "nope")[0] == 3


def test_window_cli_multicast_setting(win_db: str) -> None:
    code, out = _cli("add", "mc", "--cron", "0 2 * * 6", "--duration", "60", "-g", "lab1", "-i", "base",
                     "--multicast", "--max-wait", "30", "--max-bitrate", "600m", "--json")
    assert code == 0, out
    view = json.loads(out)
    assert (view["multicast"], view["multicast_max_wait"], view["multicast_max_bitrate"]) == (True, 30, "600m")
    code, out = _cli("show", "mc")
    assert code == 0 and "multicast: True" in out and "multicast_max_bitrate: 600m" in out
    code, out = _cli("add", "uc", "--cron", "0 2 * * 6", "--duration", "60", "-g", "lab1", "-i", "base",
                     "--max-bitrate", "600m")
    assert code == 2 and "--multicast" in out


def test_windows_migration_downgrades_and_upgrades(win_db: str) -> None:
    import sqlalchemy as sa
    from alembic import command
    from alembic.script import ScriptDirectory

    from imgfarm.models.migrate import alembic_config, current, upgrade

    # Later migrations stack on the windows one, so the database is at the script's head.
    rev = ScriptDirectory.from_config(alembic_config(win_db)).get_current_head()
    assert current(win_db) == rev
    # a window made before windows could multicast stays unicast
    command.downgrade(alembic_config(win_db), "6fa3dc81e530")
    eng = sa.create_engine(win_db)
    try:
        with eng.begin() as c:
            c.execute(sa.text("INSERT INTO windows (name, cron, timezone, duration_minutes, nodes, groups, image, "
                              "convert, max_concurrent, on_close, max_retries, enabled, created_at, updated_at) "
                              "VALUES ('old', '0 2 * * 6', 'UTC', 60, 'n1', '', 'base', false, 2, 'finish', 1, "
                              "true, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        upgrade(win_db)
        with eng.connect() as c:
            assert c.execute(sa.text("SELECT multicast, multicast_max_wait, multicast_max_bitrate FROM windows "
                                     "WHERE name = 'old'")).one() == (False, 0, "")
    finally:
        eng.dispose()
    command.downgrade(alembic_config(win_db), "bc3372d8606d")
    eng = sa.create_engine(win_db)
    try:
        assert "windows" not in sa.inspect(eng).get_table_names()
        upgrade(win_db)
        tables = set(sa.inspect(eng).get_table_names())
        assert {"windows", "window_runs", "window_run_nodes"} <= tables
    finally:
        eng.dispose()
    assert current(win_db) == rev
