"""The agent's side of the farm API: the first call takes the job's token, every later one
carries it.

Retries with jittered backoff: the API may restart, and hundreds of nodes
booting at once must not hammer it in lock step. Most calls give up after a
few attempts (a lost progress report is replaced by the next one), but the
result is the work itself: it is retried until the job's deadline, however
long the API is away.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from imgfarm.protocol import JobSpec, Orders, ProgressReport, ResultReport


class ApiError(Exception):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class FarmClient:
    DEFAULT_HORIZON = 3600.0  # how long a result is retried when the farm gave no deadline
    MAX_DELAY = 10.0  # between two attempts: how late a result arrives after the API is back

    def __init__(self, orders: Orders, timeout: float = 30.0, attempts: int = 6) -> None:
        self.orders = orders
        self.timeout = timeout
        self.attempts = attempts
        self.base = f"{orders.api_url}/agent/v1/jobs/{orders.job_id}"
        self.deadline: float | None = None  # time.monotonic() of the job's deadline, once known
        self.token = orders.token  # empty until claim(): the boot files hold none

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              until: float | None = None) -> Any:
        """One call, retried `attempts` times, or until time.monotonic() reaches `until`."""
        data = json.dumps(body).encode() if body is not None else None
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            req = urllib.request.Request(
                self.base + path,
                data=data,
                method=method,
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/json",
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code < 500:  # the farm refused: retrying will not help
                    raise ApiError(f"{method} {path or '/'}: HTTP {exc.code}: {detail}", exc.code) from exc
                err: Exception = exc
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                err = exc
            pause = delay * random.uniform(0.7, 1.3)
            if until is None:
                if attempt >= self.attempts:
                    raise ApiError(f"{method} {path or '/'}: {err}")
            else:
                left = until - time.monotonic()
                if left <= 0:
                    raise ApiError(f"{method} {path or '/'}: {err} (retried {attempt} times, "
                                   "until the job's deadline)")
                pause = min(pause, left)
                if attempt == 1 or attempt % 10 == 0:
                    print(f"imgfarm-agent: {method} {path or '/'} failed ({err}); retrying for "
                          f"{left:.0f}s more, until the job's deadline", file=sys.stderr, flush=True)
            time.sleep(pause)
            delay = min(delay * 2, self.MAX_DELAY)

    def claim(self, macs: list[str]) -> None:
        """The job's token, from the farm's answer to this first call (given once per job)."""
        answer = self._call("POST", "/token", {"macs": macs[:64]})
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError("POST /token: the farm's answer holds no token")
        self.token = token

    def spec(self) -> JobSpec:
        """The job spec; ProtocolError (naming the field) if it is not one this agent reads.

        Also learns the job's deadline, counted from now on this node's own clock
        (the farm's and the node's clocks need not agree).
        """
        asked = time.monotonic()
        spec = JobSpec.from_json(self._call("GET", ""))
        horizon = spec.deadline_in or self.DEFAULT_HORIZON
        self.deadline = asked + horizon
        return spec

    def progress(self, report: ProgressReport) -> None:
        self._call("POST", "/progress", report.to_json())

    def result(self, report: ResultReport) -> None:
        """Post the result, retrying until the job's deadline: the farm must not lose it."""
        until = self.deadline if self.deadline is not None else time.monotonic() + self.DEFAULT_HORIZON
        self._call("POST", "/result", report.to_json(), until=until)
