"""Typed config trees: dataclasses <-> dicts <-> YAML, and dotted ``key=value`` overrides.

A config is a tree of dataclasses. YAML is only its serialisation. Every unknown key is an error that
names the key with its full dotted path; a required field (no default) missing from the input is an
error too. Values are checked against the field's annotation (int, float, bool, str, tuples/lists of
those, nested dataclasses, Optional[...] and Literal[...]).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that the schema does not accept."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, path: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {tp})")
    tp = inner
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _path=path)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, _path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown and missing keys raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{_path}." if _path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} (valid keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        full = f"{_path}.{name}" if _path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {full}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_path or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config tree (tuples become lists), suitable for YAML and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). The value is parsed as YAML (1e-4, [8,8], null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Set dotted keys in a nested dict (a copy); schema checks happen in ``from_dict``."""
    out = _deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level ``base: OTHER.yaml`` (relative to this file's folder) is loaded first and
    this file's keys are merged over it, section by section (a list or a scalar replaces the base's)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _chain or base_path == path.resolve():
        cycle = (*_chain, path.resolve(), base_path)
        raise ConfigError(f"{path}: base {base!r} makes a cycle ({' -> '.join(map(str, cycle))})")
    return merge_dicts(load_yaml(base_path, (*_chain, path.resolve())), data)


def merge_dicts(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = _deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = _deepcopy(value)
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: typing.Iterable[str] = ()) -> T:
    """YAML file (or nothing) + dotted overrides -> typed config ``cls``."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
