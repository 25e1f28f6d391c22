"""The worker's Celery app registers every task with its options, and a process that
only sends gets the same configuration: both checked in fresh processes, since the
app is process-wide state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REGISTERED = """
import json
from imgfarm.worker.app import app
app.loader.import_default_modules()  # what `celery -A imgfarm.worker.app worker` does at start
out = {}
for name in sorted(n for n in app.tasks if n.startswith("imgfarm.")):
    t = app.tasks[name]
    out[name] = [app.amqp.router.route({}, name)["queue"].name, t.acks_late,
                 t.reject_on_worker_lost, t.ignore_result, [e.__name__ for e in t.throws]]
print(json.dumps(out))
"""

SENDER = """
import json, threading
from celery import current_app
from imgfarm.tasks import submit  # what the API and the CLI import to send jobs
from imgfarm.tasks.broker import farm_app
app = farm_app()
seen = []
t = threading.Thread(target=lambda: seen.append(current_app._get_current_object() is app))
t.start(); t.join()
print(json.dumps({"broker": app.conf.broker_url, "default_in_a_thread": seen[0],
                  "restore": app.tasks["imgfarm.restore"].name, "worker_loaded": "imgfarm.worker.app"
                  in __import__("sys").modules}))
"""


def _run(code: str, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_worker_app_registers_every_task(tmp_path: Path) -> None:
    tasks = _run(REGISTERED, {"IMGFARM_DATA_DIR": str(tmp_path)})
    job = ["JobEnded"]
    assert tasks == {
        "imgfarm.capture": ["imgfarm.jobs", True, True, False, job],
        "imgfarm.restore": ["imgfarm.jobs", True, True, False, job],
        "imgfarm.convert": ["imgfarm.cpu", True, True, False, job],
        "imgfarm.reconcile": ["imgfarm.jobs", True, True, True, []],
        "imgfarm.power_sync": ["imgfarm.jobs", True, True, True, []],
        "imgfarm.window_tick": ["imgfarm.jobs", True, True, True, []],
    }


def test_a_sender_uses_the_configured_broker_without_the_worker(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6399/7"
    got = _run(SENDER, {"IMGFARM_DATA_DIR": str(tmp_path), "IMGFARM_BROKER_URL": url})
    assert got == {"broker": url, "default_in_a_thread": True, "restore": "imgfarm.restore",
                   "worker_loaded": False}
