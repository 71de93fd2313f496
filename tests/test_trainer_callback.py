"""Valuation from a training loop: a tiny Hugging Face Trainer run with ValuationCallback, and a plain
loop with GradientLogger, write artifacts whose gradients and statistics equal LoGra.capture on the
final model."""

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from dataworth import CausalLMTask, ConfigError, LoGra, MismatchError, ProjectionConfig
from dataworth.trainer import GradientLogger, ValuationCallback, examples_from_dataset, load_valuation_log
from tests.test_engine_architectures import VOCAB, build

CONFIG = ProjectionConfig(rank_in=4, rank_out=4, exclude=("lm_head",))


def tiny_llama():
    return build("llama")  # the seeded tiny Llama of the architecture tests


def train_sequences(n: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return {"input_ids": self.sequences[i]}


def collate(items):
    """The engine's own padding: labels -100 on padding, attention mask 0."""
    return CausalLMTask(pad_token_id=0).collate([item["input_ids"] for item in items])


def trainer(model, sequences, tmp_path, callbacks, **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **extra,
    )
    return Trainer(
        model=model, args=args, train_dataset=TokenDataset(sequences), data_collator=collate, callbacks=callbacks
    )


def test_trainer_callback_logs_the_final_models_gradients(tmp_path):
    model, sequences = tiny_llama(), train_sequences()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    callback = ValuationCallback(CausalLMTask(pad_token_id=0), tmp_path / "valuation", CONFIG, batch_size=3)
    trainer(model, sequences, tmp_path, [callback]).train()
    assert callback.log_dir == tmp_path / "valuation" and callback.seconds > 0
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # it trained
    assert model.training and all(p.requires_grad for p in model.parameters())  # state restored

    log = load_valuation_log(tmp_path / "valuation")
    final = LoGra(model.eval(), CausalLMTask(pad_token_id=0), CONFIG, batch_size=5)
    stats = final.new_statistics()
    expected = final.capture(sequences, statistics=stats)  # the final model, another batching
    assert log.projection.content_hash() == final.projection.content_hash()
    assert log.example_ids.tolist() == list(range(len(sequences)))  # dataset order
    torch.testing.assert_close(log.gradients, expected, rtol=1e-5, atol=1e-6)
    assert (log.statistics.tokens, log.statistics.examples) == (stats.tokens, stats.examples)
    for name, sums in stats.sums.items():
        for key, value in sums.items():
            torch.testing.assert_close(log.statistics.sums[name][key], value, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "valuation" / "valuation_log.json").read_text())
    assert meta["global_step"] == 6 and meta["epoch"] == 2 and meta["examples"] == len(sequences)


def test_trainer_callback_reads_the_train_dataset_by_default(tmp_path):
    """Without examples=, the train dataset's input_ids (attention mask applied) are valued; gradient
    checkpointing in training does not disturb the capture (it runs in eval mode, where the layers are
    not recomputed)."""
    model, sequences = tiny_llama(), train_sequences(6)
    padded = [
        {"input_ids": s + [0] * (10 - len(s)), "attention_mask": [1] * len(s) + [0] * (10 - len(s))} for s in sequences
    ]
    assert examples_from_dataset(padded) == sequences
    callback = ValuationCallback(CausalLMTask(pad_token_id=0), tmp_path / "valuation", CONFIG, statistics=False)
    trainer(model, sequences, tmp_path, [callback], gradient_checkpointing=True).train()
    log = load_valuation_log(tmp_path / "valuation")
    assert log.statistics is None
    expected = LoGra(model.eval(), CausalLMTask(pad_token_id=0), CONFIG).capture(sequences)
    torch.testing.assert_close(log.gradients, expected, rtol=1e-5, atol=1e-6)


def test_plain_loop_logger(tmp_path):
    """A hand-written loop: a few optimizer steps, then the logger on the final parameters, in two calls."""
    model, sequences = tiny_llama(), train_sequences(8)
    task = CausalLMTask(pad_token_id=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, 8, 4):
        optimizer.zero_grad()
        task.loss(model, task.collate(sequences[start : start + 4])).backward()
        optimizer.step()
    logger = GradientLogger(model, task, CONFIG, batch_size=3, fisher="sampled")
    logger.log(sequences[:5])
    logger.log(sequences[5:], ids=[50, 51, 52])
    logger.save(tmp_path / "log", note="plain loop")
    log = load_valuation_log(tmp_path / "log")
    expected = LoGra(model.eval(), task, CONFIG).capture(sequences)
    torch.testing.assert_close(log.gradients, expected, rtol=1e-5, atol=1e-6)
    assert log.example_ids.tolist() == [0, 1, 2, 3, 4, 50, 51, 52]
    assert log.meta["note"] == "plain loop" and log.meta["statistics"]["fisher"] == "sampled"
    assert log.statistics.examples == 8 and log.statistics.has_second_moment


def test_loader_refuses_incomplete_or_mismatched_logs(tmp_path):
    model = tiny_llama()
    logger = GradientLogger(model, CausalLMTask(pad_token_id=0), CONFIG)
    logger.log(train_sequences(3))
    logger.save(tmp_path / "log")
    GradientLogger(
        model, CausalLMTask(pad_token_id=0), ProjectionConfig(rank_in=2, rank_out=2, exclude=("lm_head",))
    ).projection.save(tmp_path / "log")
    with pytest.raises(MismatchError, match="not the one its gradients were logged with"):
        load_valuation_log(tmp_path / "log")
    (tmp_path / "log" / "valuation_log.json").unlink()
    with pytest.raises(FileNotFoundError, match="no complete valuation log"):
        load_valuation_log(tmp_path / "log")
    with pytest.raises(ConfigError, match="2 ids for 3 examples"):
        logger.log(train_sequences(3), ids=[1, 2])
