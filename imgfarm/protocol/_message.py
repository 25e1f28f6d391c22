"""Checked messages: a `Rule` per field, read from the type annotations.

A message is a frozen, keyword-only dataclass subclassing `Message`. Its
annotations say what each field holds (``Annotated[int, Rule(lo=0)]``, a nested
message, a tuple of them, an object of strings, ``X | None``); creating one
checks every field, and turns JSON shapes (objects, lists, enum values) into
the typed values, so `from_json` is "refuse unknown and missing keys, then
create". Errors are `ProtocolError`, whose `field` is the path of the bad field.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from typing import Annotated, Any, ClassVar, Self

from imgfarm.protocol._vocabulary import (
    IMAGE_NAME,
    IMAGE_NAME_MEANS,
    MAX_FILES,
    MAX_ID,
    MAX_INT,
    MAX_JSON,
    MAX_TEXT,
    PLAIN_FILE,
    SAFE_FILE,
    SHA256,
    cut_text,
)

_INT = MAX_INT


class ProtocolError(ValueError):
    """A message that breaks the contract; `field` is the bad field's path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem

    def within(self, outer: str) -> ProtocolError:
        inner = self.field
        path = outer if not inner else f"{outer}{inner}" if inner.startswith("[") else f"{outer}.{inner}"
        return ProtocolError(path, self.problem)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type, and how it is written."""

    lo: float | None = None
    hi: float | None = None
    max_len: int = MAX_TEXT  # characters of a string; items of a list or object
    pattern: re.Pattern[str] | None = None
    means: str = ""  # what `pattern` accepts, in words, for the error
    raw: bool = False  # a string may hold any character (a tool's output)
    omit: bool = False  # to_json leaves the field out while it holds its default
    cut: str = ""  # "head"/"tail": a longer string is shortened (keeping that end), not refused


_PLAIN = Rule()
_OMIT = Rule(omit=True)
Count = Annotated[int, Rule(lo=0)]
Seconds = Annotated[float, Rule(lo=0)]
JobId = Annotated[int, Rule(lo=1, hi=MAX_ID)]
Sha256 = Annotated[str, Rule(pattern=SHA256, means="64 lowercase hex digits")]
ImageName = Annotated[str, Rule(pattern=IMAGE_NAME, max_len=128, means=IMAGE_NAME_MEANS)]
SafeFile = Annotated[str, Rule(pattern=SAFE_FILE, means="a plain file name of letters, digits, '.', '_', '-'")]
PlainFile = Annotated[str, Rule(pattern=PLAIN_FILE, means="a plain file name (no '/')")]
Path4k = Annotated[str, Rule(max_len=4096)]
FileSums = Annotated[dict[PlainFile, Sha256], Rule(max_len=MAX_FILES)]


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _what(v: object) -> str:
    """What a JSON value is, for an error."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, dict | list | str):
        return "an object" if isinstance(v, dict) else "a list" if isinstance(v, list) else "a string"
    return _show(v)


def _number(v: Any, tp: type, rule: Rule) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float) or (tp is int and not isinstance(v, int)):
        raise ProtocolError("", f"must be {'a whole number' if tp is int else 'a number'}, not {_what(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ProtocolError("", f"must be a finite number, not {v}")
    lo = -_INT if rule.lo is None else rule.lo
    hi = _INT if rule.hi is None else rule.hi
    if not lo <= v <= hi:
        bound = f"at least {lo:g}" if v < lo else f"at most {hi:g}"
        raise ProtocolError("", f"must be {bound}, not {v:g}")
    return float(v) if tp is float else v


def _text(value: Any, rule: Rule) -> str:
    if not isinstance(value, str):
        raise ProtocolError("", f"must be a string, not {_what(value)}")
    v: str = value
    if len(v) > rule.max_len:
        if not rule.cut:
            raise ProtocolError("", f"is {len(v)} characters long, at most {rule.max_len} allowed")
        v = cut_text(v, rule.max_len, rule.cut)
    if not rule.raw and any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ProtocolError("", "holds a control character")
    if rule.pattern is not None and not rule.pattern.match(v):
        raise ProtocolError("", f"{_show(v)} is not {rule.means or 'of the accepted form'}")
    return v


def _json_value(v: Any, depth: int = 0) -> None:
    if depth > 16:
        raise ProtocolError("", "is nested too deeply")
    if isinstance(v, dict):
        for k, item in v.items():
            if not isinstance(k, str):
                raise ProtocolError("", f"has a key that is not a string: {_show(k)}")
            _json_value(item, depth + 1)
    elif isinstance(v, list | tuple):
        for item in v:
            _json_value(item, depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        raise ProtocolError("", f"holds {v}; JSON numbers are finite")
    elif not (v is None or isinstance(v, str | int | float | bool)):
        raise ProtocolError("", f"holds {_what(v)}, which is not JSON")


def _rule(tp: Any) -> tuple[Any, Rule]:
    """The type under an annotation, and its Rules merged (an outer one adds to an inner one)."""
    if typing.get_origin(tp) is not Annotated:
        return tp, _PLAIN
    base, *meta = typing.get_args(tp)
    changes: dict[str, Any] = {}
    for m in meta:
        if isinstance(m, Rule):
            changes.update({f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                            if getattr(m, f.name) != f.default})
    return base, dataclasses.replace(_PLAIN, **changes)


def _coerce(v: Any, tp: Any) -> Any:
    """`v` checked against the annotation `tp`; JSON shapes become typed values."""
    tp, rule = _rule(tp)
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            if len(options) < len(typing.get_args(tp)):
                return None
            raise ProtocolError("", "must not be null")
        if len(options) == 1:
            return _coerce(v, Annotated[options[0], rule])
        return v if type(v) in options else _tagged(v, options)
    if tp is bool:
        if not isinstance(v, bool):
            raise ProtocolError("", f"must be true or false, not {_what(v)}")
        return v
    if tp is int or tp is float:
        return _number(v, tp, rule)
    if tp is str:
        return _text(v, rule)
    if tp is Any:
        _json_value(v)
        return v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(v)
        except ValueError:
            raise ProtocolError("", f"must be one of {', '.join(str(m.value) for m in tp)}, "
                                f"not {_show(v)}") from None
    if isinstance(tp, type) and issubclass(tp, Message):
        return v if isinstance(v, tp) else tp.from_json(v)
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise ProtocolError("", f"must be a list, not {_what(v)}")
        if len(v) > rule.max_len:
            raise ProtocolError("", f"has {len(v)} items, at most {rule.max_len} allowed")
        item = typing.get_args(tp)[0]
        return tuple(_at(f"[{i}]", _coerce, x, item) for i, x in enumerate(v))
    if origin is dict:
        if not isinstance(v, dict):
            raise ProtocolError("", f"must be an object, not {_what(v)}")
        if len(v) > rule.max_len:
            raise ProtocolError("", f"has {len(v)} entries, at most {rule.max_len} allowed")
        kt, vt = typing.get_args(tp)
        out = {_at(f"[{k!r}]", _coerce, k, kt): _at(f"[{k!r}]", _coerce, x, vt) for k, x in v.items()}
        if vt is Any and len(json.dumps(out)) > MAX_JSON:
            raise ProtocolError("", f"is larger than {MAX_JSON} bytes of JSON")
        return out
    raise TypeError(f"protocol: no rule for the annotation {tp!r}")


def _at(where: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ProtocolError as exc:
        raise exc.within(where) from None


def _tagged(v: Any, options: list[Any]) -> Message:
    """One of several messages, told apart by their tag field (`type`, `kind`)."""
    if not isinstance(v, dict):
        raise ProtocolError("", f"must be an object, not {_what(v)}")
    key = options[0].TAG
    tags = {str(_field_default(cls, key)): cls for cls in options}
    cls = tags.get(str(v.get(key)))
    if cls is None:
        raise ProtocolError(key, f"must be one of {', '.join(tags)}, not {_show(v.get(key))}")
    return typing.cast(Message, cls.from_json(v))


def _field_default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


_Schema = tuple[tuple[dataclasses.Field[Any], Any, Rule], ...]
_schemas: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    """(field, annotation, merged rule) of each field of a message class, computed once."""
    schema = _schemas.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        schema = tuple((f, hints[f.name], _rule(hints[f.name])[1]) for f in dataclasses.fields(cls))
        _schemas[cls] = schema
    return schema


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _dump(v: Any) -> Any:
    if isinstance(v, Message):
        return v.to_json()
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list | tuple):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


class Message:
    """Base of every message: checked on creation, to_json() and from_json()."""

    TAG: ClassVar[str] = ""  # the field that tells this message from its siblings in a union

    def __post_init__(self) -> None:
        for f, tp, _r in _schema(type(self)):
            v, default = getattr(self, f.name), _default(f)
            if type(v) is not type(default) or v != default:  # a default holds by definition
                object.__setattr__(self, f.name, _at(f.name, _coerce, v, tp))
        if self.TAG and getattr(self, self.TAG) != _field_default(type(self), self.TAG):
            raise ProtocolError(self.TAG, f"must be {_field_default(type(self), self.TAG)} "
                                f"for a {type(self).__name__}")
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ProtocolError naming the field."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f, _tp, rule in _schema(type(self)):
            v = getattr(self, f.name)
            if not (rule.omit and v == _default(f)):
                out[f.name] = _dump(v)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        if not isinstance(data, dict):
            raise ProtocolError("", f"must be a JSON object, not {_what(data)}")
        schema = _schema(cls)
        known = [f.name for f, _tp, _r in schema]
        for key in data:
            if key not in known:
                raise ProtocolError(str(key), f"unknown field (known: {', '.join(known)})")
        for f, _tp, _r in schema:
            if f.name not in data and _default(f) is dataclasses.MISSING:
                raise ProtocolError(f.name, "missing")
        make: Any = cls  # a dataclass: its fields are the keywords
        return typing.cast(Self, make(**data))


