"""Language-model side of the pipeline: tokenizer, tiny GPT-2 training, checkpoints, generation.

Checkpoints are Hugging Face directories with safetensors weights only; pickle weights
(``*.bin``, ``*.pt``) are refused and never unpickled. A PEFT LoRA adapter folder (``[model]
adapter_dir``) is applied on top of a checkpoint with the same rule: ``adapter_model.safetensors`` only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from dataworth.errors import DataworthError
from domain.sequences import pad_batch, tokenize_corpus
from domain.settings import ModelSettings

ENDOFTEXT = "<|endoftext|>"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files any of which holds a tokenizer's vocabulary (fast, BPE, SentencePiece, WordPiece).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
TOKENIZER_FILES = (
    *TOKENIZER_VOCAB_FILES,
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Keys that transformers or peft write into JSON files but that do not change the model.
VOLATILE_JSON_KEYS = frozenset(
    {"transformers_version", "is_local", "local_files_only", "peft_version", "base_model_name_or_path"}
)
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes into an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(DataworthError):
    """A checkpoint directory cannot be loaded; the message names the directory and the fix."""


class QueryTooLongError(DataworthError, ValueError):
    """A prompt leaves no room for ``max_new_tokens`` in the model's context; ``index`` is its position."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer (GPT-2 style).

    ``<|endoftext|>`` (id 0) is the bos, eos, unk and pad token. No special tokens are
    added when encoding; callers append eos themselves.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
    )


@dataclass(frozen=True)
class TinyGPT2Config:
    """Size of the from-scratch GPT-2; the vocabulary comes from the tokenizer.

    ``dropout`` applies to embeddings, attention and residuals (0 keeps training and
    gradients deterministic functions of the weights).
    """

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares the input embedding's weight (GPT-2's default)

    @classmethod
    def of(cls, m: ModelSettings) -> TinyGPT2Config:
        """The shape the `[model]` settings give the embedded GPT-2."""
        return cls(m.n_layer, m.n_head, m.n_embd, m.n_positions, tie_embeddings=m.tie_embeddings)

    def to_hf(self, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
        """The transformers ``GPT2Config`` for this size and ``tokenizer``."""
        eos = tokenizer.eos_token_id
        return GPT2Config(
            vocab_size=len(tokenizer),
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            n_positions=self.n_positions,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            resid_pdrop=self.dropout,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=self.tie_embeddings,
        )


def train_tiny_gpt2(
    sequences: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    config: TinyGPT2Config,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    init_seed: int | None = None,
    base: GPT2LMHeadModel | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> GPT2LMHeadModel:
    """Train a GPT-2 from random init with AdamW on CPU; deterministic given ``seed``, which seeds the
    random init (unless ``init_seed`` does) and the data order. With ``base`` (a GPT-2 of ``config``'s
    shape), a copy of its weights is fine-tuned instead of a random init, and ``base`` is left unchanged.

    ``sequences`` are token-id lists of 2..n_positions tokens. Each step draws
    ``batch_size`` sequences in `epoch_order`, right-pads them to the longest one and
    minimises the mean next-token loss over non-padding tokens. The learning rate follows
    `warmup_stable_decay`, so the weights are not those of the last few batches.
    ``on_step(step, loss)`` is called after each step, step = 0..steps-1. Returns the model
    in eval mode.
    """
    too_long = [i for i, ids in enumerate(sequences) if len(ids) > config.n_positions]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sequences are longer than n_positions={config.n_positions} "
            f"(first: index {too_long[0]}); tokenize with seq_len <= n_positions"
        )
    if not sequences:
        raise ValueError("no training sequences")
    if base is not None and init_seed is not None:
        raise ValueError("give init_seed (a random init) or base (its weights), not both")
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = GPT2LMHeadModel(config.to_hf(tokenizer))
    if base is not None:
        model.load_state_dict(base.state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_stable_decay, steps=steps))
    queue: list[int] = []
    epoch = 0
    for step in range(steps):
        while len(queue) < batch_size:
            queue.extend(epoch_order(sequences, seed, epoch))
            epoch += 1
        batch_ids = [sequences[i] for i in queue[:batch_size]]
        del queue[:batch_size]
        batch = pad_batch(batch_ids, tokenizer.pad_token_id, max(len(ids) for ids in batch_ids))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
    return model.eval()


def warmup_stable_decay(step: int, *, steps: int) -> float:
    """Learning-rate factor at `step` of `steps`: linear warm-up over the first 5%, constant 1, then
    linear decay over the last 20% towards 0 (the last step gets 1 / that many steps; on the embedded
    corpus a lower query loss than a constant rate or a cosine at the same steps)."""
    warmup, decay = max(1, steps // 20), max(1, steps // 5)
    if step < warmup:
        return (step + 1) / warmup
    return min(1.0, (steps - step) / decay)


def epoch_order(sequences: Sequence[Sequence[int]], seed: int, epoch: int) -> list[int]:
    """Indices of `sequences` in the seeded order of one epoch: sorted by a hash of (seed, epoch, tokens),
    so the order of the others does not change when sequences are removed or added (a retraining without
    some rows sees the rest in the same order: common random numbers for counterfactual retraining)."""

    def key(i: int) -> tuple[bytes, int]:
        tokens = ",".join(map(str, sequences[i]))
        return hashlib.blake2b(f"{seed}/{epoch}/{tokens}".encode(), digest_size=8).digest(), i

    return sorted(range(len(sequences)), key=key)


def train_embedded_model(corpus: pl.DataFrame, m: ModelSettings, on_step: Callable[[int, float], None] | None = None):
    """(model, tokenizer, sequences) of the embedded default: a BPE tokenizer and a GPT-2 of the `[model]`
    shape trained on the corpus documents (doc_id, provider_id, batch_id, text), cut at n_positions."""
    tokenizer = train_tokenizer(corpus["text"].to_list(), vocab_size=m.vocab_size)
    sequences = tokenize_corpus(corpus, tokenizer, m.n_positions)["input_ids"].to_list()
    model = train_tiny_gpt2(
        sequences,
        tokenizer,
        TinyGPT2Config.of(m),
        steps=m.train_steps,
        batch_size=m.train_batch_size,
        lr=m.learning_rate,
        seed=m.seed,
        on_step=on_step,
    )
    return model, tokenizer, len(sequences)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> str:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``directory``; return its checkpoint_hash."""
    model.save_pretrained(directory)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(directory)
    return checkpoint_hash(directory)


def _hashed_files(directory: Path) -> list[Path]:
    """Config, generation config, safetensors weights (and shard index) and tokenizer files."""
    names = {"config.json", "generation_config.json", *TOKENIZER_FILES}
    files = [path for path in directory.iterdir() if path.name in names]
    files += directory.glob("*.safetensors")
    files += directory.glob("*.safetensors.index.json")
    return sorted(path for path in files if path.is_file())


def _file_digest(path: Path) -> str:
    """sha256 of a file; JSON is canonicalised first (sorted keys, VOLATILE_JSON_KEYS dropped)."""
    if path.suffix != ".json":
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    content = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(content, dict):
        content = {key: value for key, value in content.items() if key not in VOLATILE_JSON_KEYS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def checkpoint_hash(directory: str | Path) -> str:
    """sha256 over the sorted (file name, file sha256) of the config, weights and tokenizer files.

    JSON files are hashed canonically without VOLATILE_JSON_KEYS, so saving the same
    weights again, also after load_checkpoint, gives the same hash.
    """
    digest = hashlib.sha256()
    for path in _hashed_files(Path(directory)):
        digest.update(f"{path.name}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def _check_checkpoint_files(directory: Path) -> None:
    """Raise CheckpointError unless ``directory`` holds config.json, safetensors weights and a tokenizer."""
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint directory {directory} does not exist; train a model first or pass the path "
            "of a local Hugging Face model directory"
        )
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory} has no config.json; pass a Hugging Face model directory written by save_pretrained"
        )
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{directory} has only pickle weights ({', '.join(pickled)}), which are refused because "
                "unpickling can run arbitrary code; convert them to safetensors, e.g. in a trusted "
                "environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
            )
        raise CheckpointError(
            f"{directory} has no *.safetensors weights; save the model with save_pretrained "
            "(safetensors) into this directory"
        )
    if not any((directory / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise CheckpointError(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES)}); "
            "save the tokenizer next to the model with tokenizer.save_pretrained(dir)"
        )


def load_checkpoint(
    directory: str | Path, adapter_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load a local causal-LM checkpoint (safetensors only) as (fp32 model in eval mode, tokenizer, hash),
    with the LoRA adapter in ``adapter_dir`` applied when given (`apply_adapter`; the hash is then combined).

    Raises CheckpointError for a missing directory, config, weights (or pickle-only
    weights) or tokenizer, and for architectures that are not causal LMs or have no
    nn.Linear / Conv1D layers.
    """
    directory = Path(directory)
    _check_checkpoint_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        raise CheckpointError(
            f"{directory}/config.json cannot be read by transformers ({error}); "
            "use a checkpoint of a causal-LM architecture that transformers supports"
        ) from error
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(
            f"{directory} holds a {config.model_type!r} model, which is not a causal language model; "
            "use a decoder-only causal-LM checkpoint (e.g. GPT-2, Llama, Qwen)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError) as error:
        raise CheckpointError(
            f"{directory}: the tokenizer cannot be loaded ({error}); re-save it with tokenizer.save_pretrained(dir)"
        ) from error
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, use_safetensors=True, local_files_only=True, dtype=torch.float32
        )
    except (ValueError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{directory}: the model weights cannot be loaded ({error})") from error
    if not any(isinstance(module, (nn.Linear, Conv1D)) for module in model.modules()):
        raise CheckpointError(
            f"{directory} holds a {config.model_type!r} model with no nn.Linear or Conv1D layers, "
            "which gradient projection needs; use a transformer causal LM"
        )
    if adapter_dir:
        adapted, digest = apply_adapter(model.eval(), checkpoint_hash(directory), adapter_dir)
        return adapted, tokenizer, digest
    return model.eval(), tokenizer, checkpoint_hash(directory)


def _adapter_files(directory: Path) -> list[Path]:
    """The adapter's config and safetensors weights (none when the folder is gone)."""
    files = [directory / ADAPTER_CONFIG, *directory.glob("*.safetensors")]
    return sorted(path for path in files if path.is_file())


def combined_hash(base_hash: str, adapter_dir: str | Path | None) -> str:
    """The model's hash: the base checkpoint's hash alone, or with an adapter, sha256 over it and the
    (file name, file sha256) of the adapter's config and weights, so a changed adapter is a new model."""
    if not adapter_dir:
        return base_hash
    digest = hashlib.sha256(f"base\0{base_hash}\n".encode())
    for path in _adapter_files(Path(adapter_dir)):
        digest.update(f"adapter/{path.name}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def model_files_hash(directory: str | Path, adapter_dir: str | Path | None = None) -> str:
    """`combined_hash` of the files on disk: what load_checkpoint(directory, adapter_dir) returns."""
    return combined_hash(checkpoint_hash(directory), adapter_dir)


def check_adapter(directory: Path) -> None:
    """Raise CheckpointError unless ``directory`` holds a PEFT adapter config and safetensors weights and
    peft is installed (checked before training the embedded model the adapter goes on)."""
    if not directory.is_dir():
        raise CheckpointError(
            f"adapter directory {directory} does not exist; set [model] adapter_dir to a local folder written by "
            'peft_model.save_pretrained(dir), or to "" for no adapter'
        )
    if not (directory / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"{directory} has no {ADAPTER_CONFIG}; pass a PEFT adapter folder written by peft_model.save_pretrained"
        )
    if not (directory / ADAPTER_WEIGHTS).is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{directory} has only pickle adapter weights ({', '.join(pickled)}), which are refused because "
                f"unpickling can run arbitrary code; convert them to {ADAPTER_WEIGHTS}, e.g. in a trusted "
                "environment: PeftModel.from_pretrained(base, dir).save_pretrained(dir) (safetensors by default)"
            )
        raise CheckpointError(
            f"{directory} has no {ADAPTER_WEIGHTS}; save the adapter with peft_model.save_pretrained(dir) "
            "(safetensors) into this directory"
        )
    _peft(directory)


def _peft(directory: Path):
    """The peft module, or CheckpointError naming the adapter folder and the fix."""
    try:
        import peft
    except ImportError as error:
        raise CheckpointError(
            f"[model] adapter_dir = {directory} needs the peft library, which is not installed: pip install peft"
        ) from error
    return peft


def apply_adapter(model: PreTrainedModel, base_hash: str, adapter_dir: str | Path) -> tuple[nn.Module, str]:
    """(PEFT model in eval mode, combined hash) of the LoRA adapter in ``adapter_dir`` applied on ``model``.

    Only the adapter's factors are trainable (the base stays frozen); eval mode turns LoRA dropout off, as
    capture needs. Raises CheckpointError naming the folder and the fix when peft is not installed, the
    folder has no config or only pickle weights, or the adapter does not fit the base.
    """
    directory = Path(adapter_dir)
    check_adapter(directory)
    peft = _peft(directory)
    fix = "use an adapter trained for this base ([model] checkpoint_dir, or the embedded GPT-2 of the [model] settings)"
    try:
        adapted = peft.PeftModel.from_pretrained(model, directory, is_trainable=True, local_files_only=True)
        with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as weights:
            saved = set(weights.keys())
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as error:
        detail = " ".join(str(error).split())  # peft lists every mismatched weight, one per line
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise CheckpointError(f"{directory}: the adapter does not fit the base model ({detail}); {fix}") from error
    # peft loads non-strictly: a factor the file lacks would keep its random init, one it has too many is dropped
    expected = set(peft.get_peft_model_state_dict(adapted))
    if unmatched := sorted(expected ^ saved):
        raise CheckpointError(
            f"{directory}: {len(unmatched)} adapter weight(s) do not match the base model's LoRA layers "
            f"(first: {unmatched[0]}); {fix}"
        )
    return adapted.eval(), combined_hash(base_hash, directory)


def context_length(model: PreTrainedModel) -> int:
    """Maximum number of positions (prompt + completion) the model accepts."""
    return model.config.max_position_embeddings


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    seed: int,
) -> list[str]:
    """Greedy completions (only the new text, special tokens removed), one prompt at a time.

    Prompts are encoded without special tokens (an empty prompt starts from bos). Raises
    QueryTooLongError when a prompt has more than context - max_new_tokens tokens.
    Decoding is greedy so ``seed`` only fixes torch's RNG for models that use it;
    the global RNG state is restored afterwards.
    """
    limit = context_length(model) - max_new_tokens
    encoded = [
        tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id] for prompt in prompts
    ]
    for index, ids in enumerate(encoded):
        if len(ids) > limit:
            raise QueryTooLongError(
                f"prompt {index} has {len(ids)} tokens; at most {limit} fit "
                f"(context {context_length(model)} - max_new_tokens {max_new_tokens}); "
                "shorten the prompt or lower max_new_tokens",
                index,
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for ids in encoded:
            input_ids = torch.tensor([ids], device=model.device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completions.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    return completions
