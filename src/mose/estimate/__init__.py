"""`mose estimate`: parameters and memory per GPU of every stage of a training recipe.

Parameter counts come from the model built on the meta device and converted as the
recipe converts it (exact, no memory); activation bytes from the shape
(`mose.estimate.activations`); sharding arithmetic in `mose.estimate.sharding`.
"""

from mose.estimate.activations import ActivationBytes, MicroBatch, activation_bytes, forward_bytes
from mose.estimate.models import ModelFacts, active_params, count, meta_model, model_facts
from mose.estimate.sharding import GPU_GB, STRATEGIES, PerGPU, StateBytes, per_gpu, state_bytes
from mose.estimate.stages import StageEstimate, estimate_recipe, estimate_stage
from mose.estimate.table import estimate_path, estimate_table, needs_line, render

__all__ = [
    "GPU_GB", "STRATEGIES", "ActivationBytes", "MicroBatch", "ModelFacts", "PerGPU", "StageEstimate",
    "StateBytes", "activation_bytes", "active_params", "count", "estimate_path", "estimate_recipe",
    "estimate_stage", "estimate_table", "forward_bytes", "meta_model", "model_facts", "needs_line",
    "per_gpu", "render", "state_bytes",
]
