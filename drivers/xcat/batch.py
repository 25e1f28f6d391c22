"""Gather per-node driver calls from many threads into one peer command.

Why: every job is a thread in one worker process and calls its driver for
its own node. xCAT's commands take a node list and cost a round trip to
xcatd each (plus a Perl start-up), so 200 jobs each running
`nodeset NODE boot` would be 200 processes where one `nodeset n1,n2,... boot`
does. A `Coalescer` holds calls that arrive within `window` seconds for the
same command (the *key*), runs the command once for up to `size` nodes, and
hands each caller its own node's result, or its own node's exception.

The first caller of a batch is its *leader*: it waits the window (or until
the batch is full), runs the command in its own thread, and wakes the others.
No background thread is needed, so nothing outlives the calls that need it.

The xcat drivers share one coalescer per process (`submit`); a batch's key
is `(op, *args)`, and `op(payloads, *args)` runs it, so each driver keeps
its own commands and the batcher knows none of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.errors import DriverError

# run(key, {node: payload}) -> {node: result or Exception}
BatchRunner = Callable[[Hashable, Mapping[str, Any]], Mapping[str, Any]]


@dataclass
class _Batch:
    payloads: dict[str, Any] = field(default_factory=dict)
    waiters: dict[str, list[Future[Any]]] = field(default_factory=dict)
    closed: bool = False
    full: threading.Event = field(default_factory=threading.Event)


class Coalescer:
    """Per-process batcher; thread-safe; one open batch per key at a time."""

    def __init__(
        self,
        run: BatchRunner,
        window: Callable[[], float],
        size: Callable[[], int],
        limit: Callable[[], float] = lambda: 3600.0,
    ) -> None:
        # window/size are callables so a settings change (tests) takes effect.
        self._run = run
        self._window = window
        self._size = size
        self._limit = limit  # a waiter's last resort if its leader never reports
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self.batches_run = 0  # for tests and metrics

    def submit(self, key: Hashable, node: str, payload: Any = None) -> Any:
        """Block until `node`'s part of a batched command is done; return its result."""
        fut: Future[Any] = Future()
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = _Batch()
                self._open[key] = batch
            # The same node twice in one batch (a retry racing a reconcile)
            # shares one result; the latest payload wins.
            batch.payloads[node] = payload
            batch.waiters.setdefault(node, []).append(fut)
            if len(batch.payloads) >= max(1, self._size()):
                self._close(key, batch)
        if leader:
            batch.full.wait(max(0.0, self._window()))
            with self._lock:
                self._close(key, batch)
            self._execute(key, batch)
        try:
            return fut.result(timeout=self._limit())
        except TimeoutError as exc:
            raise DriverError(
                f"{_describe(key)} for {node}: no result after {self._limit():g}s",
                hint="the batch's commands hung; check xcatd",
            ) from exc

    def run_now(self, key: Hashable, payloads: Mapping[str, Any]) -> dict[str, Any]:
        """Run a caller's own many-node request directly, in chunks of `size`.

        Returns {node: result or Exception}; used by `boot_local_many`, which
        already has all its nodes and need not wait for a window.
        """
        names = list(payloads)
        size = max(1, self._size())
        out: dict[str, Any] = {}
        for i in range(0, len(names), size):
            chunk = {n: payloads[n] for n in names[i : i + size]}
            out.update(self._safe_run(key, chunk))
        return out

    def _close(self, key: Hashable, batch: _Batch) -> None:
        # Called with the lock held.
        if not batch.closed:
            batch.closed = True
            if self._open.get(key) is batch:
                del self._open[key]
            batch.full.set()

    def _safe_run(self, key: Hashable, payloads: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.batches_run += 1
        try:
            results = dict(self._run(key, payloads))
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: tell every caller
            results = {node: exc for node in payloads}
        for node in payloads:
            if node not in results:
                results[node] = DriverError(
                    f"{_describe(key)} gave no answer for node {node}",
                    hint="check the peer's log; the node may be unknown to it",
                )
        return results

    def _execute(self, key: Hashable, batch: _Batch) -> None:
        # The batch is closed: nobody adds to it any more.
        results = self._safe_run(key, batch.payloads)
        for node, futures in batch.waiters.items():
            result = results[node]
            for fut in futures:
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


def _describe(key: Hashable) -> str:
    parts = key if isinstance(key, tuple) else (key,)
    return " ".join(str(getattr(k, "__name__", k)) for k in parts)


# --- the xcat drivers' batcher ---------------------------------------------------

# op({node: payload}, *args) -> {node: result or Exception}
BatchOp = Callable[..., Mapping[str, Any]]


def _dispatch(key: Hashable, payloads: Mapping[str, Any]) -> Mapping[str, Any]:
    assert isinstance(key, tuple)
    op, *args = key
    result: Mapping[str, Any] = op(payloads, *args)
    return result


_batcher = Coalescer(
    _dispatch,
    window=lambda: get_settings().xcat.batch_window,
    size=lambda: get_settings().xcat.batch_size,
    # A batch runs at most 4 commands, each bounded by command_timeout.
    limit=lambda: 5 * get_settings().xcat.command_timeout + get_settings().xcat.batch_window,
)


def batcher() -> Coalescer:
    """The process's coalescer (tests read `batches_run`)."""
    return _batcher


def submit(op: BatchOp, *args: Hashable, node: str, payload: Any = None) -> Any:
    """Run `node`'s part of `op(..., *args)` in the next batch; its result or its error."""
    return _batcher.submit((op, *args), node, payload)


def run_now(op: BatchOp, *args: Hashable, payloads: Mapping[str, Any]) -> dict[str, Any]:
    """Run `op` for many nodes now, in chunks of batch_size (no window to wait)."""
    return _batcher.run_now((op, *args), payloads)

