"""Find boot and power drivers by name, and check a node against them.

Every driver, the farm's own included, is an entry point in the group
`imgfarm.boot_drivers` or `imgfarm.power_drivers` (the farm's are listed in
its pyproject.toml), so the lookup is one and the same for all, and a site
adds a driver by installing a package, without editing the farm. Instances
are cached: drivers that batch calls (xcat) keep their batcher per process.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from imgfarm.drivers.base import BootInterface, DriverInterface, NodeInfo, PowerInterface
from imgfarm.drivers.properties import check_keys, known_keys
from imgfarm.errors import ImgfarmError, InvalidInput

KINDS = ("boot", "power")
PROJECT = "imgfarm"  # the distribution whose entry points are the built-in drivers
_BASES: dict[str, type[DriverInterface]] = {"boot": BootInterface, "power": PowerInterface}

_cache: dict[tuple[str, str], DriverInterface] = {}
_points: dict[str, dict[str, list[EntryPoint]]] = {}
_lock = threading.Lock()


def group(kind: str) -> str:
    return f"imgfarm.{kind}_drivers"


def _registered(kind: str) -> dict[str, list[EntryPoint]]:
    """{name: its entry points} of one group, read once per process."""
    with _lock:
        if kind not in _points:
            found: dict[str, list[EntryPoint]] = {}
            for ep in entry_points(group=group(kind)):
                same = found.setdefault(ep.name, [])
                if all(e.value != ep.value for e in same):  # one package seen twice on the path
                    same.append(ep)
            _points[kind] = found
        return _points[kind]


def _entry_point(kind: str, name: str) -> EntryPoint:
    found = _registered(kind)
    eps = found.get(name)
    if not eps:
        if not found:
            raise ImgfarmError(
                f"no {kind} drivers are registered (entry point group {group(kind)})",
                hint="the imgfarm package's metadata is missing or stale: reinstall it "
                "(`make venv`, or `pip install -e .`)",
            )
        raise InvalidInput(
            f"unknown {kind} driver {name!r}", hint=f"choose one of: {', '.join(sorted(found))}"
        )
    if len(eps) > 1:
        where = "; ".join(f"{e.value} ({e.dist.name if e.dist else '?'})" for e in eps)
        raise ImgfarmError(
            f"{kind} driver {name!r} is registered more than once: {where}",
            hint="uninstall one of these packages, or rename its driver",
        )
    return eps[0]


def driver(kind: str, name: str) -> DriverInterface:
    """The (cached) `kind` driver called `name`; InvalidInput names the known ones."""
    if kind not in KINDS:
        raise ValueError(f"no driver kind {kind!r}")
    key = (kind, name)
    with _lock:
        if key in _cache:
            return _cache[key]
    ep = _entry_point(kind, name)
    try:
        cls = ep.load()
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"{kind} driver {name!r} is not available here: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, _BASES[kind])):
        raise InvalidInput(
            f"{kind} driver {name!r} ({ep.value}) is not a {_BASES[kind].__name__}",
            hint=f"its package's entry point in {group(kind)} must name the driver class",
        )
    with _lock:
        return _cache.setdefault(key, cls())


def boot_driver(name: str) -> BootInterface:
    drv = driver("boot", name)
    assert isinstance(drv, BootInterface)
    return drv


def power_driver(name: str) -> PowerInterface:
    drv = driver("power", name)
    assert isinstance(drv, PowerInterface)
    return drv


def known_drivers() -> tuple[list[str], list[str]]:
    """The names of every registered (boot, power) driver."""
    boot, power = (sorted(_registered(kind)) for kind in KINDS)
    return boot, power


def all_drivers(built_in_only: bool = False) -> list[DriverInterface]:
    """Every registered driver, boot ones first; `built_in_only`: the farm's own."""
    out = []
    for kind in KINDS:
        for name, eps in sorted(_registered(kind).items()):
            if built_in_only and not any(e.dist and e.dist.name == PROJECT for e in eps):
                continue
            out.append(driver(kind, name))
    return out


def validate_node(node: NodeInfo) -> None:
    """Check a node's driver names and settings now, not when a job runs.

    Unknown drivers, keys neither driver declares, missing or malformed
    values and each driver's own rules: the first problem is raised as a
    DriverSettingsError (or InvalidInput for a driver name) naming it.
    """
    boot, power = boot_driver(node.boot_driver), power_driver(node.power_driver)
    check_keys(node.name, (boot, power), node.driver_info)
    boot.validate(node)
    power.validate(node)


def left_behind(info: Mapping[str, Any], old: tuple[str, str], new: tuple[str, str]) -> list[str]:
    """Keys of `info` that only the node's old (boot, power) drivers take.

    When a node switches drivers, these belong to nothing any more: the
    caller drops them (and says so) rather than refuse the switch.
    """
    def keys(pair: tuple[str, str]) -> set[str]:
        return set(known_keys((boot_driver(pair[0]), power_driver(pair[1]))))

    try:
        before = keys(old)
    except InvalidInput:  # the old driver is gone: nothing is known to be its
        return []
    after = keys(new)
    return [k for k in info if k in before and k not in after]


def reset_cache() -> None:
    """Forget driver instances and entry points (tests that change settings call this)."""
    with _lock:
        _cache.clear()
        _points.clear()


__all__ = ["KINDS", "all_drivers", "boot_driver", "driver", "known_drivers", "left_behind",
           "power_driver", "reset_cache", "validate_node"]
