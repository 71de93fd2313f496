"""Tokenizer, tiny GPT-2 training, safetensors checkpoints and greedy generation."""

import random
import shutil

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    T5Config,
)
from transformers.modeling_outputs import CausalLMOutput

from domain.lm import (
    CheckpointError,
    QueryTooLongError,
    TinyGPT2Config,
    checkpoint_hash,
    epoch_order,
    generate_completions,
    load_checkpoint,
    save_checkpoint,
    train_tiny_gpt2,
    train_tokenizer,
    warmup_stable_decay,
)

WORDS = ["the", "quick", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "home", "at", "night"]
CONFIG = TinyGPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)
TRAINING = dict(steps=20, batch_size=8, lr=3e-3, seed=0)
TOKENIZER_PARTS = ("tokenizer.json", "tokenizer_config.json")


def make_texts(n_docs: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 30))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_texts(), vocab_size=300)


@pytest.fixture(scope="module")
def sequences(tokenizer):
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in make_texts()]
    return [seq[: CONFIG.n_positions] for seq in ids]


@pytest.fixture(scope="module")
def trained(tokenizer, sequences):
    losses = []
    model = train_tiny_gpt2(sequences, tokenizer, CONFIG, **TRAINING, on_step=lambda step, loss: losses.append(loss))
    return model, losses


@pytest.fixture(scope="module")
def checkpoint(trained, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    return directory, save_checkpoint(trained[0], tokenizer, directory)


def test_tokenizer_is_deterministic_and_uses_endoftext(tokenizer):
    again = train_tokenizer(make_texts(), vocab_size=300)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == special
    text = "the fox – naïve 狐狸 jumps"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_training_reduces_loss_and_reports_every_step(trained):
    model, losses = trained
    assert len(losses) == TRAINING["steps"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert not model.training


def test_same_seed_gives_identical_weights(trained, tokenizer, sequences):
    again = train_tiny_gpt2(sequences, tokenizer, CONFIG, **TRAINING)
    other = train_tiny_gpt2(sequences, tokenizer, CONFIG, **{**TRAINING, "seed": 1})
    reference = trained[0].state_dict()
    assert all(torch.equal(reference[name], tensor) for name, tensor in again.state_dict().items())
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(reference[name], other.state_dict()[name])


def test_init_seed_fixes_the_random_init_and_seed_still_orders_the_data(tokenizer, sequences):
    def train(steps: int, **seeds):
        return train_tiny_gpt2(sequences, tokenizer, CONFIG, **{**TRAINING, "steps": steps, **seeds}).state_dict()

    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(train(0, seed=1, init_seed=0)[name], train(0, seed=0)[name])  # the init of seed 0
    assert not torch.equal(train(0, seed=1)[name], train(0, seed=0)[name])
    assert not torch.equal(train(3, seed=1, init_seed=0)[name], train(3, seed=0)[name])  # another data order


def test_base_is_fine_tuned_from_its_weights_and_left_unchanged(trained, tokenizer, sequences):
    base = trained[0]
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}

    def fine_tune(**changes):
        return train_tiny_gpt2(sequences, tokenizer, CONFIG, **{**TRAINING, "base": base, **changes}).state_dict()

    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(fine_tune(steps=0)[name], before[name])  # starts from the base, not a random init
    tuned = fine_tune(steps=3)
    assert not torch.equal(tuned[name], before[name])
    assert torch.equal(tuned[name], fine_tune(steps=3)[name])  # deterministic
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="not both"):
        fine_tune(init_seed=0)


def test_learning_rate_warms_up_holds_then_decays_to_zero():
    factors = [warmup_stable_decay(step, steps=100) for step in range(100)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # 5 warm-up steps
    assert set(factors[5:80]) == {1.0}
    assert factors[80:] == pytest.approx([(100 - step) / 20 for step in range(80, 100)])  # last 20%, linear
    assert factors[-1] == 0.05 and all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_epoch_order_is_seeded_and_unchanged_for_the_remaining_rows_when_rows_are_removed(sequences):
    order = epoch_order(sequences, seed=0, epoch=0)
    assert sorted(order) == list(range(len(sequences)))
    assert order == epoch_order(sequences, seed=0, epoch=0)
    assert order != epoch_order(sequences, seed=0, epoch=1) != epoch_order(sequences, seed=1, epoch=0)

    removed = set(range(0, len(sequences), 3))
    kept = [i for i in range(len(sequences)) if i not in removed]
    order_without = epoch_order([sequences[i] for i in kept], seed=0, epoch=0)
    assert [kept[i] for i in order_without] == [i for i in order if i not in removed]


def test_save_load_round_trip(trained, tokenizer, checkpoint, tmp_path):
    directory, saved_hash = checkpoint
    assert not list(directory.glob("*.bin"))
    assert save_checkpoint(trained[0], tokenizer, tmp_path / "again") == saved_hash

    model, loaded_tokenizer, loaded_hash = load_checkpoint(directory)
    assert loaded_hash == saved_hash == checkpoint_hash(directory)
    assert not model.training and model.dtype == torch.float32
    input_ids = torch.tensor([loaded_tokenizer("the lazy dog runs")["input_ids"]])
    assert input_ids.tolist() == [tokenizer("the lazy dog runs")["input_ids"]]
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, trained[0](input_ids).logits)
    assert save_checkpoint(model, loaded_tokenizer, tmp_path / "resaved") == saved_hash


class EmbeddingLMConfig(PreTrainedConfig):
    model_type = "dataworth-test-embedding-lm"

    def __init__(self, vocab_size: int = 300, hidden_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size


class EmbeddingLM(PreTrainedModel):
    """A causal LM with embeddings only: nothing for gradient projection to hook."""

    config_class = EmbeddingLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.embed(input_ids) @ self.embed.weight.T)


def copy_parts(source, target, *names):
    target.mkdir()
    for name in names:
        shutil.copy(source / name, target / name)
    return target


def test_checkpoint_errors_name_the_problem(checkpoint, tmp_path):
    directory, _ = checkpoint
    cases = {
        "does not exist": tmp_path / "missing",
        "no config.json": copy_parts(directory, tmp_path / "no_config", "model.safetensors", *TOKENIZER_PARTS),
        "no \\*.safetensors": copy_parts(directory, tmp_path / "no_weights", "config.json", *TOKENIZER_PARTS),
        "no tokenizer": copy_parts(directory, tmp_path / "no_tokenizer", "config.json", "model.safetensors"),
    }
    for expected, path in cases.items():
        with pytest.raises(CheckpointError, match=expected) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value)


def test_pickle_weights_are_refused(checkpoint, trained, tmp_path):
    directory = copy_parts(checkpoint[0], tmp_path / "pickled", "config.json", *TOKENIZER_PARTS)
    torch.save(trained[0].state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*convert them to safetensors"):
        load_checkpoint(directory)


def test_unsupported_architectures_are_refused(checkpoint, tmp_path):
    encoder_decoder = copy_parts(checkpoint[0], tmp_path / "t5", "model.safetensors", *TOKENIZER_PARTS)
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8).save_pretrained(encoder_decoder)
    with pytest.raises(CheckpointError, match="'t5' model, which is not a causal language model"):
        load_checkpoint(encoder_decoder)

    AutoConfig.register(EmbeddingLMConfig.model_type, EmbeddingLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(EmbeddingLMConfig, EmbeddingLM, exist_ok=True)
    no_linear = copy_parts(checkpoint[0], tmp_path / "embedding_only", *TOKENIZER_PARTS)
    EmbeddingLM(EmbeddingLMConfig()).save_pretrained(no_linear)
    with pytest.raises(CheckpointError, match="no nn.Linear or Conv1D layers"):
        load_checkpoint(no_linear)


def test_greedy_generation_is_deterministic_and_returns_only_the_continuation(trained, tokenizer):
    model = trained[0]
    prompts = ["the quick fox", "a lazy dog runs over the", ""]
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=6, seed=0)
    assert completions == generate_completions(model, tokenizer, prompts, max_new_tokens=6, seed=1)

    ids = tokenizer(prompts[1])["input_ids"]
    prompt_length = len(ids)
    with torch.no_grad():
        for _ in range(6):
            next_id = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
    assert completions[1] == tokenizer.decode(ids[prompt_length:])


def test_prompt_longer_than_context_raises(trained, tokenizer):
    long_prompt = " ".join(["fox jumps"] * CONFIG.n_positions)
    with pytest.raises(QueryTooLongError, match=r"prompt 1 has \d+ tokens; at most 24 fit"):
        generate_completions(trained[0], tokenizer, ["the dog", long_prompt], max_new_tokens=8, seed=0)
