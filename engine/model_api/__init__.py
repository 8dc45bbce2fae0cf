"""The engine as a model sees it: everything `models/` may import from `engine`.

- `contract`: `ModelBase` (what the engine calls on a model), `ModelContext` (what its
  constructor gets: the parallel layout and the MoE settings), `MoeSettings`.
- `forward_batch`: `ForwardBatch`, `ForwardMode` (one step's rows and the plan's facts).
- `parallel`: `ParallelState`, `RankGroup` and the tensor collectives over a group.
- `communicator`: `LayerCommunicator`, the scatter modes between attention and MLP.
- `weights`: `WeightSource`, `load_params`, `CheckpointError` (loading a checkpoint).
- `config`: helpers that read a config.json namespace the way transformers does.
- attention: `AttentionSpec` / `MLASpec` (what a layer asks the backend to compute) and
  the `AttentionBackend` interface a layer calls through `batch.attn_backend`.

Importing this package imports torch; nothing here imports `models`.
"""

from engine.attention.base import AttentionBackend, AttentionSpec, MLASpec
from engine.model_api.contract import (
    Divides,
    KVBufferSpec,
    ModelBase,
    ModelContext,
    MoeSettings,
)
from engine.model_api.forward_batch import ForwardBatch, ForwardMode
from engine.model_api.parallel import ParallelState, RankGroup
from engine.model_api.weights import CheckpointError, Weights, WeightSource, load_params

__all__ = [
    "AttentionBackend",
    "AttentionSpec",
    "CheckpointError",
    "Divides",
    "ForwardBatch",
    "ForwardMode",
    "KVBufferSpec",
    "MLASpec",
    "ModelBase",
    "ModelContext",
    "MoeSettings",
    "ParallelState",
    "RankGroup",
    "WeightSource",
    "Weights",
    "load_params",
]
