"""What else the farm reads from xCAT: the site table's image store, nodestat progress."""

from __future__ import annotations

import csv
import io
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import NodeInfo
from imgfarm.drivers.xcat import batch
from imgfarm.drivers.xcat import commands as xc
from imgfarm.drivers.xcat.common import xcat_name
from imgfarm.errors import DriverError


@dataclass(frozen=True)
class NodeStatus:
    text: str  # what nodestat said: "sshd", "noping", "partimage-ng: 43%"
    percent: int | None  # progress when the node's listener reports one


_PERCENT = re.compile(r"(\d{1,3})\s*%")


def nodestat(payloads: Mapping[str, Any]) -> dict[str, Any]:
    return xc.nodes_cmd("nodestat", list(payloads))


def xcat_node_status(node: NodeInfo) -> NodeStatus:
    """Progress fallback: the old plugin's listener let `nodestat` show "tool: 43%"."""
    text = str(batch.submit(nodestat, node=xcat_name(node)))
    m = _PERCENT.search(text)
    pct = int(m.group(1)) if m and int(m.group(1)) <= 100 else None
    return NodeStatus(text, pct)


_site_lock = threading.Lock()
_site_cache: tuple[float, dict[str, str]] | None = None


def site_table(refresh: bool = False) -> dict[str, str]:
    """xCAT's site table as {key: value}, from `tabdump site` (CSV), cached."""
    global _site_cache
    ttl = get_settings().xcat.site_cache_seconds
    with _site_lock:
        if not refresh and _site_cache and time.monotonic() - _site_cache[0] < ttl:
            return dict(_site_cache[1])
    result = xc.run("tabdump", ["site"])
    if result.returncode != 0:
        raise DriverError(
            f"tabdump site failed (exit {result.returncode}): {result.tail()}",
            hint="is xcatd running, and may this user read the site table?",
        )
    table: dict[str, str] = {}
    rows = csv.reader(io.StringIO(result.stdout))
    for row in rows:
        if not row or row[0].startswith("#") or len(row) < 2:
            continue
        if len(row) >= 4 and row[3].strip() in ("1", "yes"):
            continue  # disabled row
        table[row[0]] = row[1]
    with _site_lock:
        _site_cache = (time.monotonic(), table)
    return dict(table)


def xcat_image_store() -> str | None:
    """The image store's NFS location "server:/dir" from IMAGELIBSERVER/IMAGELIBINSTALLDIR.

    None when the site table does not name both (or use_site_table is off):
    the farm then uses its own `image_store_nfs` setting.
    """
    if not get_settings().xcat.use_site_table:
        return None
    site = site_table()
    server = site.get("IMAGELIBSERVER", "").strip()
    directory = site.get("IMAGELIBINSTALLDIR", "").strip()
    if not server or not directory:
        return None
    return f"{server}:{directory if directory.startswith('/') else '/' + directory}"


def _reset_for_tests() -> None:
    global _site_cache
    with _site_lock:
        _site_cache = None


__all__ = ["NodeStatus", "site_table", "xcat_image_store", "xcat_node_status"]
