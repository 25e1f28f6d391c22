"""The job database: nodes, groups, images, jobs, job events, workers.

(Windows and window runs live in `windows.py`.) A node has at most one
active job: a partial unique index on jobs(node_id) over the active states
makes the database refuse a second one, whatever process asks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from imgfarm.models import states
from imgfarm.models.names import is_secret_key
from imgfarm.protocol import BootTarget, ImageFormat, PowerState


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, int: BigInteger}


node_groups = Table(
    "node_groups",
    Base.metadata,
    Column("node_id", ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("group_id", ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
)


class Group(Base):
    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)


class Node(Base):
    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    mac: Mapped[str] = mapped_column(String(32), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    boot_driver: Mapped[str] = mapped_column(String(32), default="sim")
    power_driver: Mapped[str] = mapped_column(String(32), default="sim")
    driver_info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    disk: Mapped[str] = mapped_column(String(512), default="")
    admin_state: Mapped[str] = mapped_column(String(16), default=states.NODE_AVAILABLE)
    boot_target: Mapped[str] = mapped_column(String(16), default=BootTarget.UNKNOWN)
    power_state: Mapped[str] = mapped_column(String(16), default=PowerState.UNKNOWN)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    groups: Mapped[list[Group]] = relationship(secondary=node_groups, lazy="selectin")
    secrets: Mapped[list[NodeSecret]] = relationship(lazy="selectin", cascade="all, delete-orphan")

    @property
    def group_names(self) -> list[str]:
        return sorted(g.name for g in self.groups)


class Image(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    format: Mapped[str] = mapped_column(String(32))
    location: Mapped[str] = mapped_column(String(1024))  # relative to the image store
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    checksums: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    origin: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"), nullable=True)
    image_name: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(32), default=ImageFormat.NG)
    state: Mapped[str] = mapped_column(String(16), default=states.QUEUED, index=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rate: Mapped[float] = mapped_column(Float, default=0.0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_report_at: Mapped[datetime | None] = mapped_column(nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    celery_task_id: Mapped[str] = mapped_column(String(64), default="")
    submitted_by: Mapped[str] = mapped_column(String(256), default="")
    token_hash: Mapped[str] = mapped_column(String(64), default="")
    waiter: Mapped[str] = mapped_column(String(128), default="")
    boot_calls: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    window_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)

    node: Mapped[Node | None] = relationship(lazy="joined")
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", lazy="select", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index(
            "uq_one_active_job_per_node",
            "node_id",
            unique=True,
            sqlite_where=text("state IN ('queued','booting','running','finalizing')"),
            postgresql_where=text("state IN ('queued','booting','running','finalizing')"),
        ),
    )

    @property
    def node_name(self) -> str:
        return self.node.name if self.node else ""


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # state | progress | report | note
    state: Mapped[str] = mapped_column(String(16), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    job: Mapped[Job] = relationship(back_populates="events")


class NodeEvent(Base):
    """Things that happen to a node outside a job: power drift, admin changes."""

    __tablename__ = "node_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Worker(Base):
    """A worker process's heartbeat: jobs it waits on are resumed when it goes quiet."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """An operator's API token: its scope, and the hash of its secret (never the secret).

    The presented token is `imgf_<key_id>_<secret>`: the key id finds the row, the
    secret's hash is compared in constant time, so a lookup never depends on how
    much of a guess was right.
    """

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256), default="")
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)


class NodeSecret(Base):
    """A driver setting marked secret (a BMC password), kept out of the node row.

    Why a table of its own: every listing, view and export reads `nodes`; a
    secret that is not in that row cannot come back through any of them, whatever
    the key's spelling. Only the drivers read this table, when they act.
    """

    __tablename__ = "node_secrets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("node_id", "key", name="uq_node_secret"),)


def secret_values(node: Node) -> dict[str, str]:
    """The node's secret settings, for its drivers only (never for a view)."""
    return {sec.key: sec.value for sec in node.secrets}


def store_driver_info(node: Node, info: dict[str, Any]) -> None:
    """All of a node's driver settings: the secret ones go to node_secrets, the rest to the row.

    `info` is the whole set (secrets included); a secret not in it is removed.
    """
    public = {k: v for k, v in info.items() if not is_secret_key(k)}
    wanted = {k: str(v) for k, v in info.items() if is_secret_key(k)}
    if node.driver_info != public:
        node.driver_info = public
    existing = {sec.key: sec for sec in node.secrets}
    for key, value in wanted.items():
        if key in existing:
            if existing[key].value != value:
                existing[key].value = value
        else:
            node.secrets.append(NodeSecret(key=key, value=value))
    for key, sec in existing.items():
        if key not in wanted:
            node.secrets.remove(sec)


@event.listens_for(Session, "before_flush")
def _secrets_out_of_node_rows(session: Session, _ctx: Any, _instances: Any) -> None:
    """Whatever code set a node's driver_info, no secret is written into the node row."""
    for obj in list(session.new) + list(session.dirty):
        if isinstance(obj, Node) and any(is_secret_key(k) for k in (obj.driver_info or {})):
            store_driver_info(obj, {**secret_values(obj), **obj.driver_info})
