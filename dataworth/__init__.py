"""dataworth: LoGra influence functions for valuing the training data of language models.

Pure PyTorch; no Dagster. See `dataworth.logra.LoGra` for the front door.
"""

from dataworth.capture import BatchCapture, GradientCapture
from dataworth.config import CurvatureConfig, ProjectionConfig
from dataworth.curvature import Curvature, Preconditioner
from dataworth.errors import ConfigError, DataworthError, MismatchError, NonFiniteError
from dataworth.layers import LayerSpec, find_layers
from dataworth.logra import LoGra
from dataworth.projection import GradientLayout, Projection
from dataworth.scoring import InfluenceResult, InfluenceScorer
from dataworth.statistics import CurvatureStatistics
from dataworth.task import CausalLMTask, Task, batches

__all__ = [
    "BatchCapture", "CausalLMTask", "ConfigError", "Curvature", "CurvatureConfig", "CurvatureStatistics",
    "DataworthError", "GradientCapture", "GradientLayout", "InfluenceResult", "InfluenceScorer", "LayerSpec",
    "LoGra", "MismatchError", "NonFiniteError", "Preconditioner", "Projection", "ProjectionConfig", "Task",
    "batches", "find_layers",
]
