"""Bulk reimaging windows: the schedule, each opening of it, and each node's outcome.

A Window is the standing order ("Saturdays 02:00 for 4 h, restore @lab1 to
win7-base, at most 20 at a time"). A WindowRun is one opening of it, keyed
by the slot it belongs to (`scheduled_for`), so the database itself refuses
to open the same slot twice whatever number of beats tick. A WindowRunNode
is one target node in one run: its status, attempts and last job. All the
runner's state lives here, not in beat's memory, so beat can restart (or a
second one can run by mistake) mid-window without harm.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, select
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models.images import get_image
from imgfarm.models.jobs import check_multicast
from imgfarm.models.nodes import check_node_name, resolve_nodes
from imgfarm.models.states import ON_CLOSE, ON_CLOSE_FINISH
from imgfarm.models.tables import Base, Group, utcnow
from imgfarm.protocol import ImageFormat

# WindowRun.state
RUN_OPEN = "open"  # inside the window: jobs are being started
RUN_DRAINING = "draining"  # past its end, waiting for started jobs to end
RUN_CLOSED = "closed"  # every node has its outcome
RUN_STATES = (RUN_OPEN, RUN_DRAINING, RUN_CLOSED)

# WindowRunNode.status
NODE_PENDING = "pending"  # still to do
NODE_QUEUED = "queued"  # claimed by a tick / its job is queued
NODE_RUNNING = "running"  # its job has started
NODE_SUCCEEDED = "succeeded"
NODE_FAILED = "failed"  # failed after its last allowed attempt (or cancelled at close)
NODE_SKIPPED = "skipped"  # busy with another job or not available, every time it was tried
NODE_NOT_REACHED = "not_reached"  # the window ended before its turn
NODE_STATUSES = (NODE_PENDING, NODE_QUEUED, NODE_RUNNING, NODE_SUCCEEDED, NODE_FAILED,
                 NODE_SKIPPED, NODE_NOT_REACHED)
NODE_IN_FLIGHT = (NODE_QUEUED, NODE_RUNNING)
NODE_FINAL = (NODE_SUCCEEDED, NODE_FAILED, NODE_NOT_REACHED)

# How large a window may be: its nodes are capped by max_range_nodes like any range.
MAX_DURATION_MINUTES = 31 * 24 * 60
MAX_STORE_CAP = 100_000  # active jobs farm-wide
MAX_RETRIES = 100
MAX_RUNS_SHOWN = 1000


class Window(Base):
    __tablename__ = "windows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    cron: Mapped[str] = mapped_column(String(128))  # when a window opens, e.g. "0 2 * * 6"
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")  # the cron's zone
    duration_minutes: Mapped[int] = mapped_column(Integer)
    nodes: Mapped[str] = mapped_column(Text, default="")  # a node range, may hold @groups
    groups: Mapped[str] = mapped_column(Text, default="")  # comma-separated group names
    image: Mapped[str] = mapped_column(String(128))
    convert: Mapped[bool] = mapped_column(Boolean, default=False)
    max_concurrent: Mapped[int] = mapped_column(Integer, default=20)
    # Cap on active jobs farm-wide (the one image store) before this window adds more.
    store_cap: Mapped[int | None] = mapped_column(Integer, nullable=True)
    on_close: Mapped[str] = mapped_column(String(16), default=ON_CLOSE_FINISH)
    max_retries: Mapped[int] = mapped_column(Integer, default=1)
    # Restore by multicast: the nodes each tick starts share one udpcast session
    # (tasks/window_runner.py); max_wait 0 and max_bitrate '' take the farm's defaults.
    multicast: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    multicast_max_wait: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    multicast_max_bitrate: Mapped[str] = mapped_column(String(16), default="", server_default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    runs: Mapped[list[WindowRun]] = relationship(
        back_populates="window", order_by="WindowRun.id", cascade="all, delete-orphan",
        lazy="select",
    )

    @property
    def target_expr(self) -> str:
        """The node range this window restores: its range plus its groups."""
        parts = [self.nodes.strip()] if self.nodes.strip() else []
        parts += [f"@{g.strip()}" for g in self.groups.split(",") if g.strip()]
        return ",".join(parts)


class WindowRun(Base):
    __tablename__ = "window_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    window_id: Mapped[int] = mapped_column(ForeignKey("windows.id", ondelete="CASCADE"), index=True)
    scheduled_for: Mapped[datetime] = mapped_column()  # the slot's start (cron fire time)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closes_at: Mapped[datetime] = mapped_column()
    closed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=RUN_OPEN, index=True)
    image: Mapped[str] = mapped_column(String(128))  # what this run restores (after convert)
    convert_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trigger: Mapped[str] = mapped_column(String(16), default="cron")  # cron | run-now
    message: Mapped[str] = mapped_column(Text, default="")

    window: Mapped[Window] = relationship(back_populates="runs")
    nodes: Mapped[list[WindowRunNode]] = relationship(
        back_populates="run", order_by="WindowRunNode.id", cascade="all, delete-orphan",
        lazy="selectin",
    )

    __table_args__ = (UniqueConstraint("window_id", "scheduled_for", name="uq_window_run_slot"),)


class WindowRunNode(Base):
    __tablename__ = "window_run_nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("window_runs.id", ondelete="CASCADE"), index=True)
    node_name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=NODE_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    run: Mapped[WindowRun] = relationship(back_populates="nodes")

    __table_args__ = (UniqueConstraint("run_id", "node_name", name="uq_window_run_node"),)


# -- validation, lookup and views (shared by the CLI and the HTTP API) ------------------


def check_cron(expr: str) -> str:
    """A 5-field cron expression, or InvalidInput naming it with an example."""
    expr = " ".join(expr[:1024].split())
    if len(expr) > 128 or len(expr.split()) != 5 or not croniter.is_valid(expr):
        raise InvalidInput(
            f"bad cron expression {expr!r}",
            hint="e.g. '0 2 * * 6' (Saturdays 02:00): minute hour day-of-month month weekday",
        )
    return expr


def check_timezone(tz: str) -> str:
    try:
        if len(tz) > 64 or "\x00" in tz:
            raise ValueError(tz)
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"unknown time zone {tz!r}",
            hint="an IANA name such as UTC, Europe/Berlin or America/New_York") from None
    return tz


def get_window(session: Session, name: str) -> Window:
    window = session.scalar(select(Window).where(Window.name == name))
    if window is None:
        raise NotFound(f"unknown window {name!r}", hint="see `imgfarm window list`")
    return window


def add_window(session: Session, name: str, cron: str, duration_minutes: int, image: str,
               nodes: str = "", groups: list[str] | None = None, timezone: str = "UTC",
               convert: bool = False, max_concurrent: int = 20, store_cap: int | None = None,
               on_close: str = ON_CLOSE_FINISH, max_retries: int = 1,
               enabled: bool = True, multicast: bool = False, max_wait: float = 0,
               max_bitrate: str = "") -> Window:
    """Validate everything a window names now (cron, zone, image, nodes, groups), then add it.

    With `multicast`, each batch of nodes the window starts (up to max_concurrent) shares one
    udpcast session, which waits at most `max_wait` seconds for them and sends at most
    `max_bitrate`; a node that misses the stream restores by unicast on its own.
    """
    check_node_name(name)
    if session.scalar(select(Window.id).where(Window.name == name)) is not None:
        raise Conflict(f"window {name} exists already",
                       hint=f"remove it first with `imgfarm window remove {name}`")
    cron = check_cron(cron)
    check_timezone(timezone)
    cap = get_settings().max_range_nodes
    if not 1 <= duration_minutes <= MAX_DURATION_MINUTES:
        raise InvalidInput(f"bad duration {duration_minutes}",
                           hint=f"minutes, from 1 to {MAX_DURATION_MINUTES} (31 days)")
    if not 1 <= max_concurrent <= cap:
        raise InvalidInput(f"bad max_concurrent {max_concurrent}",
                           hint=f"from 1 to {cap} (IMGFARM_MAX_RANGE_NODES)")
    if store_cap is not None and not 1 <= store_cap <= MAX_STORE_CAP:
        raise InvalidInput(f"bad store_cap {store_cap}",
                           hint=f"from 1 to {MAX_STORE_CAP}, or leave it unset")
    if not 0 <= max_retries <= MAX_RETRIES:
        raise InvalidInput(f"bad max_retries {max_retries}", hint=f"from 0 to {MAX_RETRIES}")
    if on_close not in ON_CLOSE:
        raise InvalidInput(f"bad on_close {on_close!r}", hint=f"one of {', '.join(ON_CLOSE)}")
    max_bitrate = check_multicast(max_wait, max_bitrate)
    if (max_wait or max_bitrate) and not multicast:
        raise InvalidInput("--max-wait and --max-bitrate are for --multicast windows")
    img = get_image(session, image)
    if multicast and not convert and img.format != ImageFormat.NG:
        raise InvalidInput(f"image {image!r} is {img.format}; multicast sends partimage-ng streams",
                           hint="add the window with --convert, or without --multicast")
    if convert and img.format != ImageFormat.PARTIMAGE:
        raise InvalidInput(f"image {image!r} is {img.format} already",
                           hint="--convert is for legacy partimage images")
    groups = [g.strip().lstrip("@") for g in groups or [] if g.strip()]
    known = set(session.scalars(select(Group.name)))
    for g in groups:
        if g not in known:
            raise NotFound(f"unknown group {g!r}",
                           hint=f"known groups: {', '.join(sorted(known)) or 'none yet'}")
    window = Window(name=name, cron=cron, timezone=timezone, duration_minutes=duration_minutes,
                    nodes=nodes.strip(), groups=",".join(groups), image=image, convert=convert,
                    max_concurrent=max_concurrent, store_cap=store_cap, on_close=on_close,
                    max_retries=max_retries, enabled=enabled, multicast=multicast,
                    multicast_max_wait=float(max_wait), multicast_max_bitrate=max_bitrate)
    if not window.target_expr:
        raise InvalidInput("a window needs target nodes",
                           hint="give --nodes RANGE and/or --group G")
    resolve_nodes(session, window.target_expr)  # every node must exist now
    session.add(window)
    session.flush()
    return window


def _ts(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def next_open(window: Window, after: datetime | None = None) -> datetime | None:
    """When the window next opens (UTC), for listings."""
    try:
        zone = ZoneInfo(window.timezone)
        base = (after or utcnow()).astimezone(zone)
        nxt: datetime = croniter(window.cron, base).get_next(datetime)
        return nxt.astimezone(ZoneInfo("UTC"))
    except Exception:  # noqa: BLE001 - a listing must not fail on one bad row
        return None


def window_view(window: Window) -> dict[str, Any]:
    return {
        "name": window.name, "cron": window.cron, "timezone": window.timezone,
        "duration_minutes": window.duration_minutes, "nodes": window.nodes,
        "groups": [g for g in window.groups.split(",") if g], "target": window.target_expr,
        "image": window.image, "convert": window.convert,
        "max_concurrent": window.max_concurrent, "store_cap": window.store_cap,
        "on_close": window.on_close, "max_retries": window.max_retries,
        "multicast": window.multicast, "multicast_max_wait": window.multicast_max_wait,
        "multicast_max_bitrate": window.multicast_max_bitrate,
        "enabled": window.enabled, "next_open": _ts(next_open(window)) if window.enabled else None,
        "created_at": _ts(window.created_at),
    }


def run_view(run: WindowRun, nodes: bool = True) -> dict[str, Any]:
    counts: dict[str, int] = {s: 0 for s in NODE_STATUSES}
    for rn in run.nodes:
        counts[rn.status] = counts.get(rn.status, 0) + 1
    out: dict[str, Any] = {
        "id": run.id, "window": run.window.name if run.window else None, "trigger": run.trigger,
        "state": run.state, "scheduled_for": _ts(run.scheduled_for),
        "opened_at": _ts(run.opened_at),
        "closes_at": _ts(run.closes_at), "closed_at": _ts(run.closed_at), "image": run.image,
        "convert_job_id": run.convert_job_id, "message": run.message, "counts": counts,
    }
    if nodes:
        out["nodes"] = [{"node": rn.node_name, "status": rn.status, "attempts": rn.attempts,
                         "last_job_id": rn.last_job_id, "reason": rn.reason} for rn in run.nodes]
    return out


def window_views(session: Any) -> list[dict[str, Any]]:
    """Every window by name: `imgfarm window list` and GET /api/v1/windows."""
    return [window_view(w) for w in session.scalars(select(Window).order_by(Window.name))]


def window_detail(session: Any, name: str, runs: bool = False, limit: int = 10) -> dict[str, Any]:
    """A window's view; with runs, its `limit` latest runs node by node (newest first)."""
    window = get_window(session, name)
    view = window_view(window)
    limit = max(1, min(limit, MAX_RUNS_SHOWN))
    if runs:
        q = (select(WindowRun).where(WindowRun.window_id == window.id)
             .order_by(WindowRun.id.desc()).limit(limit))
        view["runs"] = [run_view(r) for r in session.scalars(q)]
    return view


def set_enabled(session: Any, name: str, enabled: bool) -> dict[str, Any]:
    """Enable or disable a window; a disabled one opens no more and its open run starts no jobs."""
    window = get_window(session, name)
    window.enabled = enabled
    return window_view(window)


def remove_window(session: Any, name: str) -> None:
    """Remove a window and its run history (its jobs stay); refused while a run is not closed."""
    window = get_window(session, name)
    if any(r.state != RUN_CLOSED for r in window.runs):
        raise Conflict(f"window {name} has a run in progress",
                       hint=f"`imgfarm window disable {name}` and wait for it to close")
    session.delete(window)
