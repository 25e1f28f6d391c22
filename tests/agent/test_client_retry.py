"""The agent's client against an API that is away: the result outlives it, progress does not."""

from __future__ import annotations

import time

import pytest

from imgfarm.agent.client import ApiError, FarmClient
from imgfarm.protocol import Orders, ProgressReport, ResultReport
from tests.farm import free_port


def _client() -> FarmClient:
    port = free_port()  # nothing listens there: every call is refused
    return FarmClient(Orders(api_url=f"http://127.0.0.1:{port}", job_id=7, token="abc"), timeout=2)


def test_the_result_is_retried_until_the_jobs_deadline() -> None:
    client = _client()
    client.deadline = time.monotonic() + 3.0
    started = time.monotonic()
    with pytest.raises(ApiError, match="until the job's deadline"):
        client.result(ResultReport(ok=True))
    # it kept trying for the whole horizon (well past 6 quick attempts), then stopped there
    assert 2.9 <= time.monotonic() - started < 6.0


def test_progress_gives_up_after_its_attempts() -> None:
    client = _client()
    client.attempts = 2
    client.deadline = time.monotonic() + 3600
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        client.progress(ProgressReport(percent=5.0))
    assert "deadline" not in str(err.value)
    assert time.monotonic() - started < 3.0
