"""LMM: the neural long-term memory alone, as a sequence model. Blocks of
(norm -> neural memory -> residual, norm -> MLP -> residual); no attention, no persistent tokens."""

from __future__ import annotations

from models.layers import ResidualBlock
from models.memory import NeuralMemory
from models.titans import TitansConfig, TitansStack


class LMM(TitansStack):
    def __init__(self, config: TitansConfig):
        c = config
        blocks = [ResidualBlock(c.d_model, NeuralMemory(c.d_model, c.memory), c.mlp_ratio) for _ in range(c.n_layers)]
        super().__init__(config, blocks, n_prefix=0)
