"""Waking a waiting job task when its job changes, without polling.

The API publishes every agent report and every cancel on the Redis channel
`imgfarm:job:<id>`; each worker process holds ONE pub/sub connection (a
pattern subscription) and wakes the thread waiting on that job. Waiting
costs no CPU and no connection per job, which is what lets one worker host
hold hundreds of jobs. Without Redis, waiting degrades to a timed re-read
of the job row (the database stays the truth either way).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from imgfarm.config.settings import get_settings

log = logging.getLogger(__name__)

CHANNEL = "imgfarm:job:{}"
PATTERN = "imgfarm:job:*"
POLL_FALLBACK = 2.0


def _prefix() -> str:
    return get_settings().broker_prefix


_pub_lock = threading.Lock()
_pub_clients: dict[str, Any] = {}


def notify(redis_url: str, job_id: int, payload: dict[str, Any]) -> None:
    """Tell whoever waits on `job_id` that it changed (best effort)."""
    if not redis_url:
        return
    try:
        import redis

        with _pub_lock:
            client = _pub_clients.get(redis_url)
            if client is None:
                client = _pub_clients[redis_url] = redis.Redis.from_url(
                    redis_url, socket_timeout=5, socket_connect_timeout=5
                )
        client.publish(_prefix() + CHANNEL.format(job_id), json.dumps(payload))
    except Exception as exc:  # noqa: BLE001 - the waiter re-reads the row anyway
        log.warning("could not publish wake-up for job %s: %s", job_id, exc)


class _Slot:
    __slots__ = ("event", "last", "urgent")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.last: dict[str, Any] | None = None
        self.urgent = False  # a non-progress message (result, cancel) came: never lose it


class Waker:
    """One per process: a pub/sub listener thread and a slot per waiting job."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._slots: dict[int, list[_Slot]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ok = False
        self.stopping = threading.Event()  # set: the listener ends at its next lost connection

    def start(self) -> None:
        if not self.redis_url or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._listen, name="imgfarm-waker", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        import redis

        lost = False
        while True:
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(_prefix() + PATTERN)
                self._ok = True
                if lost:
                    # what was published while the listener was away is gone: every waiting
                    # job looks at its row once, instead of at its next safety re-read
                    self._wake_all()
                    lost = False
                for msg in pubsub.listen():
                    if msg.get("type") != "pmessage":
                        continue
                    self._dispatch(msg)
            except Exception as exc:  # noqa: BLE001 - reconnect; waiters poll meanwhile
                self._ok = False
                lost = True
                if self.stopping.is_set():
                    return
                log.warning("wake-up listener lost Redis (%s); retrying", exc)
                time.sleep(1.0)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
        try:
            job_id = int(channel.rsplit(":", 1)[1])
            payload = json.loads(msg["data"])
        except (ValueError, IndexError):
            return
        with self._lock:
            for slot in self._slots.get(job_id, ()):
                slot.last = payload
                if payload.get("kind") != "progress":
                    slot.urgent = True
                slot.event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for slots in self._slots.values():
                for slot in slots:
                    slot.urgent = True
                    slot.event.set()

    def waiting(self) -> int:
        """How many jobs of this process wait on a wake-up."""
        return len(self._slots)

    def register(self, job_id: int) -> _Slot:
        slot = _Slot()
        with self._lock:
            self._slots.setdefault(job_id, []).append(slot)
        return slot

    def unregister(self, job_id: int, slot: _Slot) -> None:
        with self._lock:
            slots = self._slots.get(job_id, [])
            if slot in slots:
                slots.remove(slot)
            if not slots:
                self._slots.pop(job_id, None)

    def wait(self, slot: _Slot, timeout: float) -> dict[str, Any] | None:
        """Block until a wake-up for the slot's job or `timeout`; return its payload."""
        if not self._ok:
            timeout = min(timeout, POLL_FALLBACK)
        if slot.event.wait(max(0.0, timeout)):
            with self._lock:
                slot.event.clear()
                payload, slot.last = slot.last, None
                if slot.urgent:
                    slot.urgent = False
                    return {"kind": "check"}
            return payload
        return None


_waker: Waker | None = None
_waker_lock = threading.Lock()


def get_waker(redis_url: str) -> Waker:
    global _waker
    with _waker_lock:
        if _waker is None or _waker.redis_url != redis_url:
            _waker = Waker(redis_url)
            _waker.start()
        return _waker
