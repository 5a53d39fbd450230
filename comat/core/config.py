"""Typed configuration: dataclasses loaded from TOML or YAML, overridden by ``key.sub=value`` strings.

The fully resolved config is written next to every output (``write_resolved``) so a number can always
be traced to the settings that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import tomllib
import yaml

from comat.core.errors import ComatError

T = TypeVar("T")
RESOLVED_NAME = "config.resolved.yaml"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ComatError(f"config file '{path}' does not exist; pass a .toml or .yaml file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ComatError(f"config file '{path}': unknown format '{path.suffix}'; use .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ComatError(f"config file '{path}' is malformed ({where}{problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ComatError(f"config file '{path}' must hold a mapping of fields at the top level, got {type(data).__name__}")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _flow(text: str, kind: type, where: str) -> Any:
    """A list or table written inline on the command line: JSON or YAML flow style (``[a, b]``, ``{k: v}``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, kind):
        example = "[a, b] or a,b" if kind is list else "{key: value}"
        raise ComatError(f"{where}: '{text}' is not a {'list' if kind is list else 'table'}; write it as {example}")
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from a file or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ComatError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if not value.startswith("[") else _flow(value, list, where)
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return _flow(value, dict, where) if isinstance(value, str) else dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ComatError(f"{where}: expected a table of fields, got '{value}'")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ComatError(f"{where}: '{value}' is not a boolean; use true or false")
    if tp in (int, float, str):
        try:
            return tp(value)
        except ValueError:
            raise ComatError(f"{where}: '{value}' is not a valid {tp.__name__}") from None
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ComatError(
            f"{where}: unknown field '{sorted(unknown)[0]}'; valid fields are {', '.join(types_)}"
        )
    base = cls()
    kwargs = {}
    for name, tp in types_.items():
        if name not in data:
            continue
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(data[name], dict):
            kwargs[name] = _build(type(current), {**dataclasses.asdict(current), **data[name]}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{where}.{name}")
    return dataclasses.replace(base, **kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise ComatError(f"override '{dotted}': '{p}' is not a table of fields")
    data[leaf] = value


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (), base: T | None = None
) -> T:
    """Build ``cls`` from ``base`` (or its defaults), then the file at ``path``, then ``key.sub=value`` overrides."""
    data: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
    where = cls.__name__
    if path is not None:
        file_data = read_config_file(path)
        where = str(path)
        data = deep_merge(data, file_data)
    for item in overrides:
        if "=" not in item:
            raise ComatError(f"override '{item}' must look like field=value (e.g. lora.rank=64)")
        key, value = item.split("=", 1)
        _set_path(data, key.strip(), value.strip())
    return _build(cls, data, where)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top: nested tables merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write_resolved(cfg: Any, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write the resolved config (plus provenance in ``extra``) as YAML next to the outputs."""
    from comat.core.io import atomic_write_text

    out = Path(out_dir) / RESOLVED_NAME
    payload = {"config": config_to_dict(cfg), **(extra or {})}
    atomic_write_text(out, yaml.safe_dump(payload, sort_keys=False))
    return out
