"""The agent's side of the farm API: every call carries the job's token.

Retries with jittered backoff: the API may restart, and hundreds of nodes
booting at once must not hammer it in lock step.
"""

from __future__ import annotations

import json
import random
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
    def __init__(self, orders: Orders, timeout: float = 30.0, attempts: int = 6) -> None:
        self.orders = orders
        self.timeout = timeout
        self.attempts = attempts
        self.base = f"{orders.api_url}/agent/v1/jobs/{orders.job_id}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        delay = 0.5
        for attempt in range(self.attempts):
            req = urllib.request.Request(
                self.base + path,
                data=data,
                method=method,
                headers={
                    "Authorization": f"Bearer {self.orders.token}",
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
            if attempt == self.attempts - 1:
                raise ApiError(f"{method} {path or '/'}: {err}")
            time.sleep(delay * random.uniform(0.7, 1.3))
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def spec(self) -> JobSpec:
        """The job spec; ProtocolError (naming the field) if it is not one this agent reads."""
        return JobSpec.from_json(self._call("GET", ""))

    def progress(self, report: ProgressReport) -> None:
        self._call("POST", "/progress", report.to_json())

    def result(self, report: ResultReport) -> None:
        self._call("POST", "/result", report.to_json())
