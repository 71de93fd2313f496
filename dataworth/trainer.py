"""Valuation from a training loop: log projected gradients and curvature statistics of the final model.

Two front doors write the same artifacts into one directory:

    GradientLogger  a plain-loop helper: after (or at the end of) training,
                        logger = GradientLogger(model, task, ProjectionConfig(rank_in=16, rank_out=16))
                        logger.log(train_examples)          # call as often as needed, rows append
                        logger.save("valuation/")
    ValuationCallback  a `transformers.TrainerCallback` that does the same at `on_train_end`:
                        Trainer(..., callbacks=[ValuationCallback(task, "valuation/", config, examples=train_examples)])

and `load_valuation_log(directory)` reads them back. The directory holds
    projection.safetensors + projection.json   `Projection.save`, the format the pipeline reads
    gradients.safetensors                      "gradients" (N, D) float32, "example_ids" (N,) int64
    statistics.safetensors                     `CurvatureStatistics.to_tensors()` (optional)
    valuation_log.json                         counts, projection hash, step/epoch; written last

WHEN gradients are captured. Influence functions are evaluated at the final parameters, so the
capture pass runs once, after the last optimizer step, over the training examples: every row is
then exactly `LoGra.capture` of that example on the final model. Capturing each batch at
`on_step_end` during the last epoch would log each example at a different, intermediate parameter
value (the weights move after every step), and a Trainer callback is not handed the batch anyway;
so the callback re-runs over the data at `on_train_end`. The cost is one forward plus an
activation-only backward per training example, once: on a small CPU benchmark 0.4-0.5 of a
2-epoch run, i.e. 0.8-0.9 of one training epoch, statistics and saving included (a 1.4-1.5x run;
see benchmarks/RESULTS_capture.md, trainer callback overhead). Capture runs in eval mode (dropout
off: the deterministic final model), the model's train/eval mode and requires_grad flags are
restored afterwards, and parameters are never changed. With several processes (DDP), only world
process zero captures, over all examples; a model sharded across processes (FSDP, DeepSpeed ZeRO-3)
cannot run on one process alone: save it and value it with the pipeline instead.

The module imports transformers (for the callback) and never Dagster.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from dataworth.config import ProjectionConfig
from dataworth.errors import ConfigError, MismatchError
from dataworth.logra import LoGra
from dataworth.projection import Projection
from dataworth.statistics import CurvatureStatistics
from dataworth.task import Task

GRADIENTS_FILE = "gradients.safetensors"
STATISTICS_FILE = "statistics.safetensors"
META_FILE = "valuation_log.json"
FORMAT = 1


@dataclass
class ValuationLog:
    """What `load_valuation_log` returns."""

    projection: Projection
    gradients: torch.Tensor  # (N, D) float32 projected per-example gradients
    example_ids: torch.Tensor  # (N,) int64: row i is the gradient of example example_ids[i]
    statistics: CurvatureStatistics | None  # curvature statistics over the same examples, if logged
    meta: dict  # valuation_log.json


class GradientLogger:
    """Captures projected gradients (and curvature statistics) of `model` as it is now, and saves them.

    `config` or `projection` fixes the projection (as for `LoGra`); `fisher="sampled"` accumulates the
    statistics with labels drawn from the model (a second pass), "empirical" in the capture pass.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: ProjectionConfig | None = None,
        *,
        projection: Projection | None = None,
        batch_size: int = 8,
        statistics: bool = True,
        fisher: str = "empirical",
        second_moment: bool = True,
    ):
        if fisher not in ("empirical", "sampled"):
            raise ConfigError(f"fisher {fisher!r} is not one of ('empirical', 'sampled')")
        self.model, self.fisher = model, fisher
        self.logra = LoGra(model, task, config, projection=projection, batch_size=batch_size)
        self.statistics = self.logra.new_statistics(second_moment=second_moment) if statistics else None
        self._rows: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._next_id = 0

    @property
    def projection(self) -> Projection:
        return self.logra.projection

    def log(self, examples: Sequence, ids: Sequence[int] | None = None) -> torch.Tensor:
        """Capture `examples` at the model's current parameters (eval mode); returns their (n, D)
        rows, also kept for `save`. ids default to a running count from 0."""
        if ids is not None and len(ids) != len(examples):
            raise ConfigError(f"{len(ids)} ids for {len(examples)} examples")
        ids = list(range(self._next_id, self._next_id + len(examples))) if ids is None else list(ids)
        was_training = self.model.training
        self.model.eval()
        try:
            empirical = self.statistics if self.fisher == "empirical" else None
            rows = self.logra.capture(examples, statistics=empirical)
            if self.statistics is not None and self.fisher == "sampled":
                self.statistics.merge(
                    self.logra.statistics(examples, fisher="sampled", second_moment=self.statistics.has_second_moment)
                )
        finally:
            self.model.train(was_training)
        self._rows.append(rows)
        self._ids.append(torch.as_tensor(ids, dtype=torch.int64))
        self._next_id = max(self._next_id, max(ids, default=-1) + 1)
        return rows

    @property
    def gradients(self) -> torch.Tensor:
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.projection.layout.dim)

    def save(self, directory: str | Path, **meta) -> Path:
        """Write the artifacts (see the module docstring); `meta` adds JSON-able fields to valuation_log.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)  # present only once every file is complete
        digest = self.projection.save(directory)
        ids = torch.cat(self._ids) if self._ids else torch.zeros(0, dtype=torch.int64)
        save_file(
            {"gradients": self.gradients.contiguous(), "example_ids": ids.contiguous()}, directory / GRADIENTS_FILE
        )
        if self.statistics is not None:
            save_file({k: v.contiguous() for k, v in self.statistics.to_tensors().items()}, directory / STATISTICS_FILE)
        record = {
            "format": FORMAT,
            "examples": int(ids.numel()),
            "dim": self.projection.layout.dim,
            "projection_hash": digest,
            "statistics": None
            if self.statistics is None
            else {"fisher": self.fisher, "tokens": self.statistics.tokens, "examples": self.statistics.examples},
            "model": type(self.model).__name__,
            **meta,
        }
        (directory / META_FILE).write_text(json.dumps(record, indent=2))
        return directory


def load_valuation_log(directory: str | Path) -> ValuationLog:
    """Read what `GradientLogger.save` (or `ValuationCallback`) wrote; MismatchError if the files
    do not belong together, FileNotFoundError if the log is incomplete."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: no complete valuation log in {directory}")
    meta = json.loads(meta_path.read_text())
    projection = Projection.load(directory)
    if projection.content_hash() != meta["projection_hash"]:
        raise MismatchError(f"the projection in {directory} is not the one its gradients were logged with")
    tensors = load_file(directory / GRADIENTS_FILE)
    gradients, ids = tensors["gradients"], tensors["example_ids"]
    if gradients.shape != (meta["examples"], projection.layout.dim) or ids.shape != (meta["examples"],):
        raise MismatchError(
            f"gradients {tuple(gradients.shape)} in {directory} do not match its log "
            f"({meta['examples']} x {projection.layout.dim})"
        )
    statistics = None
    if meta.get("statistics") is not None:
        statistics = CurvatureStatistics.from_tensors(projection.layout, load_file(directory / STATISTICS_FILE))
    return ValuationLog(projection, gradients, ids, statistics, meta)


def examples_from_dataset(dataset) -> list[list[int]]:
    """Token-id lists from a dataset of {"input_ids": ..., "attention_mask"?: ...} items, padding
    (attention_mask 0) removed, in dataset order."""
    examples = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, dict) or "input_ids" not in item:
            raise ConfigError(
                "the train dataset's items are not dicts with 'input_ids'; pass examples= to ValuationCallback"
            )
        ids = torch.as_tensor(item["input_ids"]).flatten()
        if item.get("attention_mask") is not None:
            ids = ids[torch.as_tensor(item["attention_mask"]).flatten().bool()]
        examples.append(ids.tolist())
    return examples


class ValuationCallback(TrainerCallback):
    """At the end of `Trainer.train`, capture projected gradients and curvature statistics of the
    final model over the training examples and save them into `directory` (see the module docstring).

    examples: what the `task` collates (e.g. token-id lists for `CausalLMTask`), in the order the
    rows should have; by default the Trainer's train dataset, read through `examples_from_dataset`.
    The other arguments are those of `GradientLogger`. After training, `.log_dir` is the directory
    written (None on processes other than world process zero) and `.seconds` the capture time.
    """

    def __init__(
        self,
        task: Task,
        directory: str | Path,
        config: ProjectionConfig | None = None,
        *,
        projection: Projection | None = None,
        examples: Sequence | None = None,
        example_ids: Sequence[int] | None = None,
        batch_size: int = 8,
        statistics: bool = True,
        fisher: str = "empirical",
    ):
        self.task, self.directory = task, Path(directory)
        self.config, self.projection = config, projection
        self.examples, self.example_ids = examples, example_ids
        self.options = {"batch_size": batch_size, "statistics": statistics, "fisher": fisher}
        self.log_dir: Path | None = None
        self.seconds: float | None = None

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        started = time.perf_counter()
        examples = self.examples
        if examples is None:
            if train_dataloader is None:
                raise ConfigError("ValuationCallback has no examples= and the Trainer gave no train dataloader")
            examples = examples_from_dataset(train_dataloader.dataset)
        logger = GradientLogger(model, self.task, self.config, projection=self.projection, **self.options)
        logger.log(examples, self.example_ids)
        self.log_dir = logger.save(
            self.directory, global_step=state.global_step, epoch=state.epoch, when="on_train_end (final parameters)"
        )
        self.seconds = time.perf_counter() - started
