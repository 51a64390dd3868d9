"""Model registry: a new model is one file plus one line in MODELS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import lmm, mac, mag, mal, titans, transformer
from models.base import SequenceModel
from models.config import make_config  # noqa: F401  (typed, range-checked configs; re-exported for callers)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_cls: type[SequenceModel]
    config_cls: type
    summary: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("transformer", transformer.Transformer, transformer.TransformerConfig,
                  "full causal attention, rotary, pre-norm"),
        ModelSpec("transformer-naive", transformer.Transformer, transformer.NaiveTransformerConfig,
                  "the Transformer with the n x n score matrix materialised (textbook O(n^2) memory)"),
        ModelSpec("swa", transformer.Transformer, transformer.SWAConfig,
                  "the Transformer with sliding-window attention only (blockwise, O(n w))"),
        ModelSpec("lmm", lmm.LMM, titans.TitansConfig, "Titans neural long-term memory alone, no attention"),
        ModelSpec("mac", mac.MAC, titans.TitansConfig, "Titans memory as context: segment attention over retrieval"),
        ModelSpec("mag", mag.MAG, titans.TitansConfig, "Titans memory as gate: SWA branch x memory branch"),
        ModelSpec("mal", mal.MAL, titans.TitansConfig, "Titans memory as layer: memory, then SWA"),
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
