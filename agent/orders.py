"""Reading the agent's orders from the kernel command line."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


class OrdersError(Exception):
    pass


@dataclass(frozen=True)
class Orders:
    api_url: str
    job_id: int
    token: str
    disk: str = ""
    delay: float = 0.0  # debugging/test aid: wait before running the tool


def parse_cmdline(text: str) -> Orders:
    params: dict[str, str] = {}
    for word in shlex.split(text):
        if word.startswith("imgfarm.") and "=" in word:
            key, _, value = word.partition("=")
            params[key[len("imgfarm."):]] = value
    missing = [k for k in ("api", "job", "token") if not params.get(k)]
    if missing:
        raise OrdersError(
            "kernel command line lacks " + ", ".join(f"imgfarm.{k}=" for k in missing)
        )
    try:
        job_id = int(params["job"])
    except ValueError as exc:
        raise OrdersError(f"imgfarm.job={params['job']!r} is not a job number") from exc
    return Orders(
        api_url=params["api"].rstrip("/"),
        job_id=job_id,
        token=params["token"],
        disk=params.get("disk", ""),
        delay=float(params.get("delay", "0") or 0),
    )
