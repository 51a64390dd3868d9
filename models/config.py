"""Typed, range-checked configs. Every config (model, task, training, profile, suite entry) is a frozen
dataclass built from user input (TOML, `--model-arg KEY=VALUE`) by `make_config`, which checks each value
against its field's type annotation before the dataclass sees it; each dataclass's `__post_init__` then checks
ranges with `check`. Both name the key, the value and what is valid, so a bad value fails before any training,
never as a stray TypeError deep in a model or as a silent `ok` row with zero parameters.

Types understood: bool (only true/false: a bool is not taken for a number), int (not a float, not a bool),
float (an int is widened; must be finite), str, `X | None`, `tuple[X, ...]` (a non-empty list), `dict[...]`,
`Any`, and another config dataclass, whose options are given dotted (`memory.chunk=8`) or as a table. A TOML
list arrives as a list and is stored as a tuple.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the key, the value and what is valid."""


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    valid: str


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"> {low}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}")


def each(rule: Rule) -> Rule:
    return Rule(lambda vs: all(rule.ok(v) for v in vs), f"a list of values each {rule.valid}")


def check(config: Any, **rules: Rule) -> None:
    """Range checks for __post_init__: `check(self, d_model=at_least(1))`. None (an unset option) passes."""
    for key, rule in rules.items():
        value = getattr(config, key)
        if value is not None and not rule.ok(value):
            raise ConfigError(f"{key}={_show(value)}: must be {rule.valid}")


def require(ok: bool, message: str) -> None:
    """A check across fields (`d_model` divisible by `n_heads`); the message names the keys and values."""
    if not ok:
        raise ConfigError(message)


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is tuple:
        return f"a non-empty list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict or kind is dict or dataclasses.is_dataclass(kind):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "unset"}.get(kind, str(kind))


def _coerce(value: Any, kind: Any) -> tuple[bool, Any]:
    """(matches, value as stored) for one annotation."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True, value
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if kind is type(None):
        return value is None, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value), float(value) if number else value
    if kind is str:
        return isinstance(value, str), value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple) or not value:
            return False, value
        items = [_coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is tuple:  # fixed length, e.g. a (low, high) range
        if not isinstance(value, list | tuple) or len(value) != len(args):
            return False, value
        items = [_coerce(v, a) for v, a in zip(value, args, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is dict or kind is dict:
        return isinstance(value, dict), value
    if dataclasses.is_dataclass(kind):  # a nested config given built (its options as a table go to _build)
        return isinstance(value, kind), value
    raise TypeError(f"make_config does not know the annotation {kind!r}")


def make_config(config_cls: type, overrides: dict[str, Any], what: str, noun: str = "option") -> Any:
    """Build a frozen config from overrides: unknown or missing keys, wrong types and out-of-range values raise
    ConfigError naming `what` and `noun` (e.g. "model 'lmm' option"), the key, the value and what is valid.

    A field whose type is itself a config dataclass (TitansConfig's `memory: MemoryConfig`) takes its options
    as dotted keys (`{"memory.chunk": 8}`, as `--model-arg memory.chunk=8` gives them) or as a table
    (`{"memory": {"chunk": 8}}`, as TOML gives them), or both; they are checked the same way, and errors name
    them dotted."""
    return _build(config_cls, overrides, what, noun, "")


def _nested(config_cls: type) -> dict[str, type]:
    """The fields of config_cls that are config dataclasses themselves, with their classes."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if dataclasses.is_dataclass(hints[f.name])}


def _keys(config_cls: type, prefix: str = "") -> list[str]:
    """Every key config_cls takes, nested ones dotted."""
    nested = _nested(config_cls)
    return sorted(key for f in dataclasses.fields(config_cls)
                  for key in (_keys(nested[f.name], f"{prefix}{f.name}.") if f.name in nested else [prefix + f.name]))


def _build(config_cls: type, overrides: dict[str, Any], what: str, noun: str, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    nested = _nested(config_cls)
    tables: dict[str, dict[str, Any]] = {}
    flat = {}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if head in nested and (dot or isinstance(value, dict)):
            tables.setdefault(head, {}).update({rest: value} if dot else value)
        else:
            flat[key] = value
    unknown = sorted(prefix + key for key in set(flat) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what} {noun}(s) {unknown}; valid: {', '.join(_keys(config_cls, prefix))}")
    missing = sorted(prefix + name for name, f in fields.items() if name not in overrides and f.init
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{what}: {noun}(s) {missing} missing; give a value for each")
    hints = typing.get_type_hints(config_cls)
    values = {name: _build(nested[name], table, what, noun, f"{prefix}{name}.") for name, table in tables.items()}
    for key, value in flat.items():
        ok, values[key] = _coerce(value, hints[key])
        if not ok:
            raise ConfigError(f"{what} {noun} {prefix}{key}={_show(value)}: must be {_describe(hints[key])}")
    try:
        return config_cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{what} {noun} {prefix}{err}") from None
    except ValueError as err:  # a __post_init__ that words its own message
        raise ConfigError(f"{what}: {err}") from None
