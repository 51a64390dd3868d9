"""Typed, range-checked configs: make_config checks every value against its field's annotation, every config's
__post_init__ checks ranges, and both name the key, the value and what is valid. The registry sweeps cover
every model and task config, present and future, by their field types."""

import dataclasses
import typing
from typing import Any

import pytest

import models
import tasks
from bench.measuring.profile import ProfileConfig
from bench.measuring.train import TrainConfig
from models.config import ConfigError, make_config

CONFIGS = ([(f"model '{name}'", spec.config_cls) for name, spec in models.MODELS.items()]
           + [(f"task '{name}'", spec.config_cls) for name, spec in tasks.TASKS.items()]
           + [("train", TrainConfig), ("profile", ProfileConfig)])


@dataclasses.dataclass(frozen=True)
class Example:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    lengths: tuple[int, ...] = (1,)
    window: int | None = None
    span: tuple[int, int] = (0, 1)


@pytest.mark.parametrize("key,value,expected", [
    ("rate", 2, 2.0),  # an int is widened to float
    ("lengths", [3, 4], (3, 4)),  # a TOML list is stored as a tuple
    ("window", None, None),
    ("window", 5, 5),
    ("span", [2, 9], (2, 9)),  # a fixed-length range
])
def test_values_of_the_right_type_are_taken_and_normalised(key, value, expected):
    got = getattr(make_config(Example, {key: value}, "example"), key)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key,value,valid", [
    ("count", True, "an integer"),  # a bool is not a number
    ("count", 2.0, "an integer"),
    ("count", "abc", "an integer"),
    ("rate", float("nan"), "a finite number"),
    ("rate", "fast", "a finite number"),
    ("flag", 1, "true or false"),
    ("name", 3, "a string"),
    ("lengths", 8, "a non-empty list of integers"),
    ("lengths", [], "a non-empty list of integers"),
    ("lengths", [1, "2"], "a non-empty list of integers"),
    ("window", "64", "an integer or unset"),
    ("span", [1, 2, 3], "a list of 2 integers"),
    ("span", [1.5, 2], "a list of 2 integers"),
])
def test_a_value_of_the_wrong_type_names_key_value_and_what_is_valid(key, value, valid):
    with pytest.raises(ConfigError) as err:
        make_config(Example, {key: value}, "example")
    assert str(err.value) == f"example option {key}={value!r}: must be {valid}"


def test_unknown_and_missing_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown example option\(s\) \['widht'\]; valid: count, flag"):
        make_config(Example, {"widht": 3}, "example")

    @dataclasses.dataclass(frozen=True)
    class Needs:
        task: str

    with pytest.raises(ConfigError, match=r"entry: key\(s\) \['task'\] missing"):
        make_config(Needs, {}, "entry", noun="key")


def wrong_value(kind: Any) -> Any:
    """A value no field of this annotation accepts."""
    args = typing.get_args(kind)
    return [] if typing.get_origin(kind) is tuple else ("text" if str not in (kind, *args) else 12)


@pytest.mark.parametrize("what,cls", CONFIGS, ids=[w for w, _ in CONFIGS])
def test_every_field_of_every_registered_config_is_type_checked(what, cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        with pytest.raises(ConfigError, match=rf"^{what} option {f.name}=.*: must be "):
            make_config(cls, {f.name: wrong_value(hints[f.name])}, what)


@pytest.mark.parametrize("what,cls", CONFIGS, ids=[w for w, _ in CONFIGS])
def test_every_registered_config_builds_from_its_defaults(what, cls):
    make_config(cls, {}, what)


@pytest.mark.parametrize("cls,key,value,valid", [
    (models.MODELS["transformer"].config_cls, "d_model", 0, ">= 1"),
    (models.MODELS["transformer"].config_cls, "n_layers", -1, ">= 1"),
    (models.MODELS["lmm"].config_cls, "d_model", 0, ">= 1"),
    (models.MODELS["lmm"].config_cls, "memory.chunk", 0, ">= 1"),
    (models.MODELS["mag"].config_cls, "memory.rule", "sgd", "one of titans, seed, seed_corrected"),
    (TrainConfig, "lr", -1.0, "> 0"),
    (TrainConfig, "steps", 0, ">= 1"),
    (ProfileConfig, "batch", 0, ">= 1"),
    (ProfileConfig, "repeats", 0, ">= 1"),
])
def test_out_of_range_values_are_refused_naming_key_value_and_range(cls, key, value, valid):
    with pytest.raises(ConfigError) as err:
        make_config(cls, {key: value}, "cfg")
    assert str(err.value) == f"cfg option {key}={value!r}: must be {valid}"


def test_memory_options_are_nested_and_reached_dotted_or_as_a_table():
    titans = models.MODELS["lmm"].config_cls
    dotted = make_config(titans, {"memory.kernel": "torch", "memory.chunk": 8}, "cfg")
    table = make_config(titans, {"memory": {"kernel": "torch", "chunk": 8}}, "cfg")
    both = make_config(titans, {"memory": {"kernel": "torch"}, "memory.chunk": 8}, "cfg")
    assert dotted == table == both and (dotted.memory.kernel, dotted.memory.chunk) == ("torch", 8)
    assert make_config(titans, {"memory.read_chunk": 4, "memory.seed_gamma": 2.0}, "cfg").memory.read_chunk == 4


def test_the_memory_has_the_attention_heads_unless_told_otherwise():
    titans = models.MODELS["mag"].config_cls
    assert make_config(titans, {"n_heads": 2}, "cfg").memory.n_heads == 2
    assert make_config(titans, {"n_heads": 2, "memory.n_heads": 8}, "cfg").memory.n_heads == 8
    with pytest.raises(ConfigError, match="d_model=64 must be divisible by memory.n_heads=3"):
        make_config(titans, {"memory.n_heads": 3}, "cfg")


@pytest.mark.parametrize("overrides,message", [
    ({"memory.kernl": "torch"}, "unknown cfg option(s) ['memory.kernl']; valid: memory.block, memory.chunk, "),
    ({"memory": {"kernl": "torch"}}, "unknown cfg option(s) ['memory.kernl']; valid: memory.block, memory.chunk, "),
    ({"chunk": 8}, "unknown cfg option(s) ['chunk']; valid: attention, d_model, mac_path, memory.block, "),
    ({"memory.chunk": 2.5}, "cfg option memory.chunk=2.5: must be an integer"),
    ({"memory": 3}, "cfg option memory=3: must be a table"),
])
def test_bad_nested_options_name_the_dotted_key_and_what_is_valid(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config(models.MODELS["lmm"].config_cls, overrides, "cfg")
    assert str(err.value).startswith(message)


def test_cross_field_rules_name_both_keys():
    with pytest.raises(ConfigError, match="d_model=66 must be divisible by n_heads=4"):
        models.build("transformer", d_model=66)
