"""The farm's settings: environment variables with one prefix, optionally a file.

Defaults run on one machine with nothing installed (SQLite under the data
directory, a local image store, sim drivers); production points the same
settings at Redis, PostgreSQL and the NFS export. Precedence: environment
(`IMGFARM_...`, nested with `__`, e.g. `IMGFARM_IPMI__RETRIES`) over the
file named by `IMGFARM_CONFIG` (TOML) over the defaults below.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "imgfarm"


class XcatSettings(BaseModel):
    """How the xcat drivers call xCAT's commands."""

    bin_dir: str = ""  # empty: find nodeset/rpower/... on PATH
    osimage: str = "imgfarm-agent"  # the osimage that boots the farm's agent
    command_timeout: float = 120.0
    batch_window: float = 0.2  # seconds to gather calls into one nodeset/rpower
    batch_size: int = 500
    use_site_table: bool = True  # read IMAGELIBSERVER/IMAGELIBINSTALLDIR
    site_cache_seconds: float = 300.0  # how long a `tabdump site` answer is reused
    agent_kcmdline: str = ""  # extra kernel params for the agent osimage (beside the job's)


class PxeSettings(BaseModel):
    """Where the pxe boot driver writes per-node boot files."""

    tftp_root: Path = Path("/srv/tftp")
    loader: str = "pxelinux"  # pxelinux | ipxe | grub, per node overridable
    kernel: str = "imgfarm/vmlinuz"
    initrd: str = "imgfarm/initrd.img"
    extra_cmdline: str = ""
    ipxe_base_url: str = ""  # e.g. "http://10.0.0.1/tftp/"; empty: paths relative to the script


class IpmiSettings(BaseModel):
    """ipmitool defaults; per-node BMC address/user live on the node."""

    interface: str = "lanplus"
    username: str = ""
    password_file: str = ""  # read by ipmitool -f, never put on a command line
    port: int = 623  # per node: driver_info bmc_port
    ipmitool: str = "ipmitool"  # the ipmitool executable (name on PATH or a path)
    cipher_suite: str = ""  # ipmitool -C; empty: negotiate (costs a round trip per call)
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 2.0
    sync_interval: float = 300.0


class MulticastSettings(BaseModel):
    """udpcast sessions: where udp-sender runs and how it treats receivers."""

    interface: str = "eth0"  # udp-sender --interface: the store host's interface towards the nodes
    portbase: int = 9000  # first session's port; each partition of a session uses two ports
    max_wait: float = 60.0  # s after the first receiver joined: start with whoever is there
    retries_until_drop: int = 20  # REQACKs before a silent receiver is dropped (~0.75 s each: ~15 s)
    blocksize: int = 0  # udp-sender --blocksize (bytes per packet); 0: udpcast's default (1456)
    max_bitrate: str = ""  # udp-sender --max-bitrate (e.g. 600m); empty: no cap
    start_timeout: float = 300.0  # s a session waits for its first receiver before giving up


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMGFARM_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""  # default: sqlite file under data_dir
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""  # default: the broker
    redis_url: str = ""  # for job wake-ups; default: the broker if it is redis
    broker_prefix: str = ""  # key prefix, so several farms (or test runs) can share one Redis

    image_store: Path | None = None  # default: data_dir/images
    image_store_nfs: str = ""  # "server:/export" that agents mount; empty: local path
    # the store's .incoming directory as an export of its own ("server:/export/.incoming"):
    # captures mount only it, read-write, so the image export can be read-only on the server
    image_store_nfs_incoming: str = ""
    # Mount options the agent adds to its own (vers=4.1,proto=tcp,soft,...); later wins,
    # e.g. "port=20490" for a server on another port, or "vers=3,nolock" for NFSv3.
    image_store_nfs_options: str = ""
    # How agents reach the store: "nfs" (the export above, or the local path of sim nodes),
    # or "http" (the API serves it, with Range, behind the job's token).
    image_transport: Literal["nfs", "http"] = "nfs"

    api_url: str = "http://127.0.0.1:8470"  # as agents and the CLI reach the API
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    api_token: str = ""  # a bootstrap admin credential (prefer `imgfarm token create`)
    api_meta_access: Literal["public", "read"] = "read"  # who may read /metrics, /docs, /openapi.json
    api_certfile: str = ""  # TLS: the API serves https with this certificate chain ...
    api_keyfile: str = ""  # ... and this key (uvicorn's ssl_certfile / ssl_keyfile)

    default_boot_driver: str = "sim"
    default_power_driver: str = "sim"
    sim_dir: Path | None = None  # default: data_dir/sim

    # Deadlines of a job, in seconds.
    boot_timeout: float = 600.0  # power-cycle -> the agent's first report
    heartbeat_timeout: float = 180.0  # between two agent reports
    job_timeout: float = 4 * 3600.0  # whole job
    progress_interval: float = 5.0  # agent: seconds between progress reports
    power_cycle_after: bool = True  # after success too: the node comes up in its (new) local OS

    # Worker liveness, used to resume jobs whose waiting task died.
    worker_heartbeat: float = 10.0
    worker_dead_after: float = 45.0
    reconcile_interval: float = 30.0
    visibility_timeout: int = 12 * 3600
    job_concurrency: int = 600  # threads in the job worker: one per waiting job
    window_tick_interval: float = 30.0  # seconds between bulk-window ticks (beat)

    # Bounds on what one request may make the farm do or store.
    max_range_nodes: int = Field(10_000, ge=1)  # nodes one range may name, counted before expanding
    max_request_bytes: int = Field(1 << 20, ge=1024)  # an operator request's body (agents: 64 KiB)
    progress_event_every: float = Field(60.0, gt=0)  # seconds between the progress events kept

    xcat: XcatSettings = XcatSettings()
    pxe: PxeSettings = PxeSettings()
    ipmi: IpmiSettings = IpmiSettings()
    multicast: MulticastSettings = MulticastSettings()

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'imgfarm.db'}"
        if not self.result_backend:
            self.result_backend = self.broker_url
        if not self.redis_url and self.broker_url.startswith("redis"):
            self.redis_url = self.broker_url
        if self.image_store is None:
            self.image_store = self.data_dir / "images"
        if self.sim_dir is None:
            self.sim_dir = self.data_dir / "sim"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("IMGFARM_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def store_path(self) -> Path:
        assert self.image_store is not None
        return self.image_store

    @property
    def sim_path(self) -> Path:
        assert self.sim_dir is not None
        return self.sim_dir


@lru_cache(maxsize=1)
def get_settings(**overrides: Any) -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()`."""
    return Settings(**overrides)
