"""Config values from text and JSON: `--set` parsing and type checks against the annotations."""

from __future__ import annotations

import ast
import json
import types
import typing
from pathlib import Path
from typing import Any

from lmtrain.errors import ConfigError


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Checks `value` against annotation `typ`, allowing int->float, integral float->int,
    "true"/"false" in any case -> bool, and list->tuple."""
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)  # --set train.steps=1e3
    if typ is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"  # --set train.progress=false
    if typ in (int, float, str, bool):
        if type(value) is typ:
            return value
        raise ConfigError(f"{key} must be {typ.__name__}, got {type(value).__name__} {value!r}")
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key} must be a tuple, got {type(value).__name__} {value!r}")
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key} needs {len(args)} entries, got {len(value)}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(typ):
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} has the wrong type: {value!r} is not {typ}")
    if typ is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be None, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    """Python literal if it parses as one, else the raw string (so paths need no quotes)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """Parses ["a.b=v", ...] from the command line."""
    out = {}
    for s in sets:
        key, eq, text = s.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set expects section.key=value, got {s!r}")
        out[key.strip()] = _parse_value(text.strip())
    return out


def read_mapping(path: Path) -> dict:
    """The mapping in a .json, .yaml or .yml config file; a clear ConfigError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must be .json, .yaml or .yml")
    try:
        text = path.read_text()
        if suffix == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except Exception as e:  # JSON, YAML and decoding errors alike
        kind = "JSON" if suffix == ".json" else "YAML"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {path} is not valid {kind}: {first}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not a {type(d).__name__}"
        )
    return d


def flat_dict(d: dict[str, Any], prefix: str = "", moved: dict | None = None) -> dict[str, Any]:
    """{"a.b": v} from {"a": {"b": v}}; keys in `moved` (config.MOVED) read at their new place."""
    moved = moved or {}
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}.", moved))
        else:
            out[moved.get(f"{prefix}{k}", f"{prefix}{k}")] = v
    return out
