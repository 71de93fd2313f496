"""Front door: value training data for a model from any training loop.

logra = LoGra(model, task, ProjectionConfig(rank_in=16, rank_out=16))
stats = logra.new_statistics()
train = logra.capture(train_examples, statistics=stats)          # (N, D) projected gradients
curvature = Curvature.fit(stats, "ekfac")
scorer = logra.scorer(query_examples, curvature, CurvatureConfig())
result = scorer.stream(train.split(1024), top_k=5, groups={"provider": provider_ids})
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dataworth.capture import GradientCapture, input_output_covariances
from dataworth.config import CurvatureConfig, ProjectionConfig
from dataworth.curvature import Curvature
from dataworth.layers import find_layers
from dataworth.projection import Projection
from dataworth.scoring import InfluenceScorer
from dataworth.statistics import CurvatureStatistics
from dataworth.task import Task, batches

Progress = Callable[[int, int], None]  # (examples done, examples total)


class LoGra:
    """A model, its task and one projection; every pass it runs batches `batch_size` examples, with
    `checkpoint_blocks` under activation checkpointing (long sequences: `dataworth.checkpointing`)."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: ProjectionConfig | None = None,
        *,
        projection: Projection | None = None,
        pca_examples: Sequence | None = None,
        batch_size: int = 8,
        checkpoint_blocks: bool = False,
    ):
        self.model, self.task, self.batch_size = model, task, batch_size
        self.checkpoint_blocks = checkpoint_blocks
        if projection is None:
            config = config or ProjectionConfig()
            layers = find_layers(model, config.include, config.exclude, config.embeddings, config.shared_weights)
            covariances = None
            if config.init == "pca":
                covariances = input_output_covariances(
                    model,
                    task,
                    layers,
                    self._batches(pca_examples or []),
                    bias=config.bias,
                    checkpoint_blocks=checkpoint_blocks,
                )
            projection = Projection.create(config, layers, covariances)
        self.projection = projection

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self, examples: Sequence):
        return batches(self.task, examples, self.batch_size, self.device)

    def _capture(self) -> GradientCapture:
        return GradientCapture(self.model, self.projection, self.task, checkpoint_blocks=self.checkpoint_blocks)

    def new_statistics(self, *, second_moment: bool = True, dtype: torch.dtype = torch.float64) -> CurvatureStatistics:
        return CurvatureStatistics(self.projection.layout, second_moment=second_moment, dtype=dtype)

    def capture(
        self,
        examples: Sequence,
        *,
        query: bool = False,
        statistics: CurvatureStatistics | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """(N, D) float32 projected gradients on CPU, in example order; with `statistics`, the
        same pass also accumulates empirical-Fisher curvature statistics into it."""
        rows, done = [], 0
        with self._capture() as capture:
            for batch in self._batches(examples):
                result = capture.capture(batch, query=query)
                if statistics is not None:
                    statistics.update(result)
                rows.append(result.gradients.cpu())
                done += result.gradients.shape[0]
                if progress:
                    progress(done, len(examples))
        return torch.cat(rows) if rows else torch.zeros(0, self.projection.layout.dim)

    def statistics(
        self, examples: Sequence, *, fisher: str = "empirical", second_moment: bool = True
    ) -> CurvatureStatistics:
        """Curvature statistics alone; fisher="sampled" draws labels from the model (true Fisher)."""
        stats = self.new_statistics(second_moment=second_moment)
        with self._capture() as capture:
            for batch in self._batches(examples):
                stats.update(capture.capture(batch, sample_labels=fisher == "sampled"))
        return stats

    def scorer(
        self, query_examples: Sequence, curvature: Curvature, config: CurvatureConfig, normalize: str = "none"
    ) -> InfluenceScorer:
        """Capture the queries' gradients and precondition them once; `config.kind` must be the
        kind `curvature` was fitted as (ConfigError before any capture otherwise)."""
        curvature.check_kind(config)
        queries = self.capture(query_examples, query=True)
        return InfluenceScorer(queries, curvature.preconditioner(config), normalize)
