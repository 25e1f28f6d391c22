"""The settings a driver takes from a node: one table per driver, read by everyone.

A driver declares its `driver_info` keys as `Property` rows (Ironic's
REQUIRED_PROPERTIES / OPTIONAL_PROPERTIES and `get_properties()`). That one
table is what `imgfarm node add` / `node set` / `node import` and the API
check a node against, what `imgfarm node add --help` and `imgfarm driver show`
print, and what docs/drivers.md is generated from, so the three cannot drift
apart. Checks a table cannot express (one of two keys, a MAC) stay in the
driver's `validate()`, after the table's.

Values come from the CLI as strings and from the API as JSON; either way a
value is one bounded line of text (or a JSON number or boolean), never a
control character, since several of them end up in boot files and on
command lines.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from imgfarm.errors import DriverSettingsError

if TYPE_CHECKING:
    from imgfarm.config.settings import Settings

MAX_VALUE_CHARS = 1024
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class Kind(enum.StrEnum):
    """What a value must look like; checked by the table, shown in the docs."""

    TEXT = "text"
    INTEGER = "integer"
    PORT = "port"  # 1-65535
    BOOLEAN = "boolean"  # true/false, yes/no, on/off, 1/0


@dataclass(frozen=True)
class Property:
    """One `driver_info` key a driver reads.

    `default` is the value used when the node does not set the key;
    `setting` names the site-wide setting (dotted, e.g. "ipmi.port") that
    supplies it instead, so `lookup()` and the docs agree on where a value
    comes from. `secret` marks values that must never be shown back.
    """

    name: str
    description: str  # one line: what the key is for
    required: bool = False
    default: str = ""
    setting: str = ""
    choices: tuple[str, ...] = ()  # allowed values, matched without case
    kind: Kind = Kind.TEXT
    example: str = ""
    secret: bool = False

    def problem(self, value: Any) -> str | None:
        """Why `value` is not acceptable for this key, or None."""
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str):
            return f"must be text, not {type(value).__name__}"
        if len(value) > MAX_VALUE_CHARS:
            return f"is {len(value)} characters long (at most {MAX_VALUE_CHARS})"
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            return "contains a control character (a newline, a tab ...)"
        text = value.strip()
        if not text:
            return None  # empty: the key is unset
        if self.choices and text.lower() not in self.choices:
            return f"is {text!r}, not one of {', '.join(self.choices)}"
        if self.kind in (Kind.INTEGER, Kind.PORT) and not text.isdigit():
            return f"is {text!r}, not a whole number"
        if self.kind is Kind.PORT and not 1 <= int(text) <= 65535:
            return f"is {text}, not a port number (1-65535)"
        if self.kind is Kind.BOOLEAN and text.lower() not in _TRUE + _FALSE:
            return f"is {text!r}, not true or false"
        return None


    @property
    def env_var(self) -> str:
        """The environment variable of `setting`: "ipmi.port" -> IMGFARM_IPMI__PORT."""
        return "IMGFARM_" + "__".join(self.setting.split(".")).upper() if self.setting else ""

    def fallback(self, settings: Settings | None = None) -> str:
        """The value a node without this key gets: the site setting, else `default`."""
        if not self.setting:
            return self.default
        # lazy: pydantic-settings loads only when a default comes from a site setting
        from imgfarm.config.settings import get_settings

        obj: Any = settings if settings is not None else get_settings()
        for part in self.setting.split("."):
            obj = getattr(obj, part)
        return as_text(obj)


Properties = tuple[Property, ...]


class Declares(Protocol):
    """A driver as the table sees it (BootInterface / PowerInterface)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...  # "boot" or "power"

    @property
    def properties(self) -> Properties: ...


def built_in_settings() -> Settings:
    """The settings as shipped, ignoring this machine's environment (for the docs)."""
    from imgfarm.config.settings import Settings  # lazy: pydantic-settings, as in fallback()

    return Settings.model_construct()


def value_of(info: Mapping[str, Any], prop: Property, settings: Settings | None = None) -> str:
    """The node's value of `prop` as text, else the site's, else the default."""
    return as_text(info.get(prop.name)) or prop.fallback(settings)


def as_text(value: Any) -> str:
    """A stored value as the drivers read it: JSON true/false/numbers become text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value).strip()


def is_true(value: Any) -> bool:
    return as_text(value).lower() in _TRUE


def check_values(node_name: str, driver: Declares, info: Mapping[str, Any]) -> None:
    """Required keys present, every declared key's value well formed.

    Raises DriverSettingsError naming every missing key at once, or the first
    bad value, each with the `--set` that fixes it.
    """
    missing = [p for p in driver.properties if p.required and not as_text(info.get(p.name))]
    if missing:
        flags = " ".join(f"--set {p.name}={p.example or '...'}" for p in missing)
        raise DriverSettingsError(
            f"node {node_name}: the {driver.name} {driver.kind} driver needs "
            f"{', '.join(p.name for p in missing)}",
            hint=f"give it with `{flags}` (on `imgfarm node add`, or `imgfarm node set "
            f"{node_name}`)",
        )
    for prop in driver.properties:
        if prop.name not in info:
            continue
        why = prop.problem(info[prop.name])
        if why:
            raise DriverSettingsError(
                f"node {node_name}: {prop.name} {why}",
                hint=f"{prop.name}: {prop.description}"
                + (f"; e.g. --set {prop.name}={prop.example}" if prop.example else ""),
            )


def known_keys(drivers: Iterable[Declares]) -> dict[str, Property]:
    """The keys a node with these drivers may carry, in declaration order."""
    out: dict[str, Property] = {}
    for drv in drivers:
        for prop in drv.properties:
            out.setdefault(prop.name, prop)
    return out


def check_keys(node_name: str, drivers: Iterable[Declares], info: Mapping[str, Any]) -> None:
    """Refuse a key no driver of the node declares: a typo must not pass silently."""
    drivers = list(drivers)
    known = known_keys(drivers)
    for key in info:
        if key in known:
            continue
        named = " and ".join(f"the {d.name} {d.kind} driver" for d in drivers)
        close = difflib.get_close_matches(str(key), list(known), n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        valid = ", ".join(known) if known else "none"
        shows = " / ".join(dict.fromkeys(f"`imgfarm driver show {d.name}`" for d in drivers))
        raise DriverSettingsError(
            f"node {node_name}: {str(key)[:64]!r} is not a setting of {named}",
            hint=f"{guess}valid settings: {valid} (see {shows}); a stored one goes with "
            f"`imgfarm node set {node_name} --unset KEY`",
        )


def secret_keys(drivers: Iterable[Declares]) -> set[str]:
    """The keys whose values are secret, for whoever shows driver_info back."""
    return {p.name for d in drivers for p in d.properties if p.secret}


__all__ = [
    "Declares",
    "Kind",
    "MAX_VALUE_CHARS",
    "Properties",
    "Property",
    "as_text",
    "built_in_settings",
    "check_keys",
    "check_values",
    "is_true",
    "known_keys",
    "secret_keys",
    "value_of",
]
