"""Find boot and power drivers by name.

Built-in drivers are listed here; a site adds its own through the entry
point groups `imgfarm.boot_drivers` and `imgfarm.power_drivers` without
editing the farm. Instances are cached: drivers that batch calls (xcat) keep
their batcher per process.
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points

from imgfarm.drivers.base import BootInterface, PowerInterface
from imgfarm.errors import InvalidInput

BUILTIN_BOOT = {
    "sim": "imgfarm.drivers.sim:SimBoot",
    "pxe": "imgfarm.drivers.pxe:PxeBoot",
    "xcat": "imgfarm.drivers.xcat:XcatBoot",
}
BUILTIN_POWER = {
    "sim": "imgfarm.drivers.sim:SimPower",
    "ipmi": "imgfarm.drivers.ipmi:IpmiPower",
    "xcat": "imgfarm.drivers.xcat:XcatPower",
}

_cache: dict[tuple[str, str], object] = {}
_lock = threading.Lock()


def _load(kind: str, name: str, builtin: dict[str, str]) -> object:
    key = (kind, name)
    with _lock:
        if key in _cache:
            return _cache[key]
        target = builtin.get(name)
        if target is None:
            for ep in entry_points(group=f"imgfarm.{kind}_drivers"):
                if ep.name == name:
                    target = ep.value
                    break
        if target is None:
            boot, power = known_drivers()
            known = boot if kind == "boot" else power
            raise InvalidInput(
                f"unknown {kind} driver {name!r}", hint=f"choose one of: {', '.join(known)}"
            )
        module, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidInput(f"{kind} driver {name!r} is not available here: {exc}") from exc
        _cache[key] = cls()
        return _cache[key]


def boot_driver(name: str) -> BootInterface:
    drv = _load("boot", name, BUILTIN_BOOT)
    assert isinstance(drv, BootInterface)
    return drv


def power_driver(name: str) -> PowerInterface:
    drv = _load("power", name, BUILTIN_POWER)
    assert isinstance(drv, PowerInterface)
    return drv


def known_drivers() -> tuple[list[str], list[str]]:
    boot = set(BUILTIN_BOOT) | {e.name for e in entry_points(group="imgfarm.boot_drivers")}
    power = set(BUILTIN_POWER) | {e.name for e in entry_points(group="imgfarm.power_drivers")}
    return sorted(boot), sorted(power)


def reset_cache() -> None:
    """Forget driver instances (tests that change settings call this)."""
    with _lock:
        _cache.clear()
