"""YAML -> typed ``Config``: parsing, dotted overrides, type checking, saving.

Every user mistake becomes a ``ConfigError`` whose message is one line naming the dotted key,
the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from llm.config.defaults import Config
from llm.config.errors import ConfigError
from llm.config.validation import validate_config

log = logging.getLogger(__name__)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (None = all defaults), apply ``"a.b.c=value"`` overrides, type-check, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    config = from_dict(Config, raw)
    validate_config(config)
    return config


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train_config.lr=3e-4"`` -> ``("train_config.lr", 0.0003)``; the value is parsed as YAML."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse override value {value_text!r} as YAML") from None
    return key, value


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted_key}")
        node = child
    node[parts[-1]] = value


# Keys earlier versions wrote that nothing reads any more: accepted with a warning, so their configs and
# checkpoints still load. Every other unknown key is an error.
RETIRED_KEYS = {
    "eval_config.metrics": "removed; it had no effect",
    "eval_config.evals": "removed; it had no effect",
    "eval_config.lm_eval_tasks": "removed; it had no effect",
}


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or "config"
    if data is None and prefix:  # a section whose keys are all commented out: its defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            dotted = _join(prefix, str(key))
            if dotted in RETIRED_KEYS:  # written by an older version (e.g. in a checkpoint's config.yaml)
                log.warning("%s: no longer used (%s); ignored", dotted, RETIRED_KEYS[dotted])
                continue
            raise ConfigError(f"{dotted}: unknown key{_suggest(str(key), names)}")
    kwargs = {name: _coerce(hints[name], data[name], _join(prefix, name)) for name in names if name in data}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (every field, defaults included)."""
    stream = io.StringIO()
    yaml.safe_dump(to_dict(config), stream, sort_keys=False, default_flow_style=None, width=100)
    return stream.getvalue()


def save_config(config: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_config(config), encoding="utf-8")
    tmp.replace(path)
    return path


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    flat_a, flat_b = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = _join(prefix, key)
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def dotted_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key under dataclass ``cls`` (lists of dataclasses stop at the list)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = _join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(dotted_keys(hints[f.name], dotted))
        else:
            keys.append(dotted)
    return keys


# ----------------------------------------------------------------------------------------


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for option in non_none:
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _yaml_float(value)
        if number is not None and number.is_integer():
            return int(number)  # 5e9 or 1.0e6 (a float, or a string to PyYAML): fine when integral
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _yaml_float(value)
        if number is not None:
            return number
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_show(value)}")
    raise AssertionError(f"unsupported config type {tp!r} at {key}")


def _yaml_float(value: Any) -> float | None:
    """A float from a float, or from a string such as '3e-4' that YAML 1.1 leaves unparsed."""
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; allowed: {', '.join(names)}"
