"""Model registry: a new model is one file plus one line in MODELS.

Each spec names its `family`, which is what the claims ledger iterates (never a list of names):
`attention` (the Transformer side of the paper's comparison), `memory` (a Titans memory with no attention),
`hybrid` (a Titans memory combined with attention: MAC, MAG, MAL) and `reference` (baselines that are on
neither side, such as sliding-window attention). A model's declared `Complexity` comes from the model itself
(`SequenceModel.complexity`), since it may depend on its config (a window makes attention linear)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import lmm, mac, mag, mal, titans, transformer
from models.base import Complexity, SequenceModel
from models.config import make_config  # noqa: F401  (typed, range-checked configs; re-exported for callers)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_cls: type[SequenceModel]
    config_cls: type
    summary: str
    family: str

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model {self.name!r}: family {self.family!r} not in {FAMILIES}")


FAMILIES = ("attention", "memory", "hybrid", "reference")
TITANS_FAMILIES = ("memory", "hybrid")  # the Titans side of the paper's comparison


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("transformer", transformer.Transformer, transformer.TransformerConfig,
                  "full causal attention, rotary, pre-norm", "attention"),
        ModelSpec("transformer-naive", transformer.Transformer, transformer.NaiveTransformerConfig,
                  "the Transformer with the n x n score matrix materialised (textbook O(n^2) memory)", "attention"),
        ModelSpec("swa", transformer.Transformer, transformer.SWAConfig,
                  "the Transformer with sliding-window attention only (blockwise, O(n w))", "reference"),
        ModelSpec("lmm", lmm.LMM, titans.TitansConfig, "Titans neural long-term memory alone, no attention",
                  "memory"),
        ModelSpec("mac", mac.MAC, titans.TitansConfig, "Titans memory as context: segment attention over retrieval",
                  "hybrid"),
        ModelSpec("mag", mag.MAG, titans.TitansConfig, "Titans memory as gate: SWA branch x memory branch", "hybrid"),
        ModelSpec("mal", mal.MAL, titans.TitansConfig, "Titans memory as layer: memory, then SWA", "hybrid"),
    ]
}


def names() -> list[str]:
    return list(MODELS)


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def build(name: str, **overrides: Any) -> SequenceModel:
    s = spec(name)
    return s.model_cls(make_config(s.config_cls, overrides, f"model '{name}'"))


def in_family(*families: str) -> list[str]:
    """Registered model names whose family is one of `families`, in registry order."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise KeyError(f"unknown families {sorted(unknown)}; valid families: {', '.join(FAMILIES)}")
    return [name for name, s in MODELS.items() if s.family in families]


def first(family: str) -> str:
    """The first registered model of a family: the one that stands for it where a command needs a single model
    (the profile command's default models, the parts a hybrid is timed against, the report's baseline)."""
    members = in_family(family)
    if not members:
        raise KeyError(f"no registered model of family {family!r}")
    return members[0]


def declared(name: str, **overrides: Any) -> Complexity:
    """The complexity the model declares under this config (built on the CPU; the configs here are small)."""
    return build(name, **overrides).complexity
