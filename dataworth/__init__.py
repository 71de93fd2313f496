"""dataworth: LoGra influence functions for valuing the training data of language models.

Pure PyTorch; no Dagster. See `dataworth.logra.LoGra` for the front door, `dataworth.adapters` for
LoRA adapters, `dataworth.checkpointing` for long sequences and `dataworth.trainer` (imported on its
own: it imports transformers) for valuation from a training loop.
"""

from dataworth.adapters import lora_include, lora_layers, lora_projection_config
from dataworth.capture import BatchCapture, GradientCapture
from dataworth.checkpointing import checkpointed_blocks
from dataworth.config import CurvatureConfig, ProjectionConfig
from dataworth.curvature import Curvature, Preconditioner
from dataworth.errors import ConfigError, DataworthError, MismatchError, NonFiniteError
from dataworth.layers import LayerSpec, batch_shared_layers, find_layers, tied_layers
from dataworth.logra import LoGra
from dataworth.projection import GradientLayout, Projection
from dataworth.scoring import InfluenceResult, InfluenceScorer, merge_results
from dataworth.statistics import CurvatureStatistics
from dataworth.task import CausalLMTask, Task, batches

__all__ = [
    "BatchCapture",
    "CausalLMTask",
    "ConfigError",
    "Curvature",
    "CurvatureConfig",
    "CurvatureStatistics",
    "DataworthError",
    "GradientCapture",
    "GradientLayout",
    "InfluenceResult",
    "InfluenceScorer",
    "LayerSpec",
    "LoGra",
    "MismatchError",
    "NonFiniteError",
    "Preconditioner",
    "Projection",
    "ProjectionConfig",
    "Task",
    "batch_shared_layers",
    "batches",
    "checkpointed_blocks",
    "find_layers",
    "merge_results",
    "tied_layers",
    "lora_include",
    "lora_layers",
    "lora_projection_config",
]
