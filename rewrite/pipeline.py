"""Pipeline specs: ``"gqa{kv_heads=4},prune-heads{ratio=0.25}"`` <-> a list of Pass objects."""
from __future__ import annotations

import dataclasses
import re
import typing

from .errors import SpecError
from .pass_base import REGISTRY, Pass

__all__ = ["parse", "to_spec", "make_pass", "available"]


def available() -> dict:
    """name -> pass class, importing the bundled passes first."""
    import rewrite.passes  # noqa: F401  (registers them)
    return dict(REGISTRY)


def _split_top(spec: str) -> list:
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced '}}' in pipeline spec {spec!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise SpecError(f"unbalanced '{{' in pipeline spec {spec!r}")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _convert(value: str, typ, where: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:
        errors = []
        for t in args:
            if t is type(None):
                continue
            try:
                return _convert(value, t, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if errors else f"{where}: bad value {value!r}")
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            raise SpecError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is dict or origin is dict:  # heads={0:1/2;3:0}
        out = {}
        if value.startswith("{") and value.endswith("}"):
            value = value[1:-1]
        for item in filter(None, value.split(";")):
            if ":" not in item:
                raise SpecError(f"{where}: expected layer:h1/h2;layer:h3, got {value!r}")
            k, v = item.split(":", 1)
            try:
                out[int(k)] = tuple(int(x) for x in v.split("/") if x != "")
            except ValueError:
                raise SpecError(f"{where}: expected integer layers and heads as layer:h1/h2;layer:h3, got "
                                f"{value!r}") from None
        return out
    return value


def make_pass(name: str, options: dict) -> Pass:
    """Build a pass from its name and string/typed options, with errors that list what is valid."""
    passes = available()
    if name not in passes:
        raise SpecError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(passes))}")
    cls = passes[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            valid = ", ".join(fields) or "(none)"
            raise SpecError(f"unknown option {key!r} for pass {name!r}; valid options: {valid}")
        kwargs[key] = _convert(value, hints[key], f"{name}{{{key}}}") if isinstance(value, str) else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SpecError(f"pass {name!r}: {e}") from None


_ITEM = re.compile(r"^([A-Za-z][\w-]*)\s*(?:\{(.*)\})?$", re.S)


def parse(spec) -> list:
    """A pipeline from a string spec, a list of strings/passes, or None."""
    if spec is None:
        return []
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            out.extend(parse(item))
        return out
    out = []
    for item in _split_top(spec):
        m = _ITEM.match(item)
        if not m:
            raise SpecError(f"cannot parse {item!r}; expected name or name{{key=value,...}}")
        name, body = m.group(1), m.group(2)
        options = {}
        for kv in filter(None, (s.strip() for s in (body or "").split(","))):
            if "=" not in kv:
                raise SpecError(f"option {kv!r} of pass {name!r} needs the form key=value")
            k, v = kv.split("=", 1)
            options[k.strip()] = v.strip()
        out.append(make_pass(name, options))
    return out


def to_spec(passes: list) -> str:
    return ",".join(p.spec() for p in passes)
