"""Overhead of ValuationCallback: the same Hugging Face Trainer run with and without it, on CPU.

A Llama-shaped random-init model (hidden 128, 4 layers, GQA 4/2 heads, vocab 1024), N random
sequences of `--seq` tokens, `--epochs` epochs of AdamW at batch `--batch`. The callback captures
rank-16 x 16 projected gradients and curvature statistics (with second moments) of every Linear but
lm_head over all N training examples once, at on_train_end, and saves them. Each run is a fresh
process; runs with and without alternate (`--rounds` pairs). Reported: the process CPU time and the
wall time of trainer.train() with and without the callback, and of the callback alone. On a shared
machine wall times move by several x with other work, so the headline ratio is by CPU time, with
`--threads 1` by default (a single-threaded process's CPU time barely depends on other processes;
several OpenMP threads spin while waiting for each other, which other work inflates).

    python benchmarks/trainer_callback_overhead.py          # ~1 min on 2 cores, writes a section of RESULTS_capture.md
    python benchmarks/trainer_callback_overhead.py --quick  # smoke run, writes nothing
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "RESULTS_capture.md"
QUICK = {"n": 32, "seq": 32, "epochs": 1, "rounds": 1}


def worker(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from dataworth import CausalLMTask, ProjectionConfig
    from dataworth.trainer import ValuationCallback

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(256, args.seq),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 1024, (args.seq,), generator=g).tolist() for _ in range(args.n)]
    task = CausalLMTask(pad_token_id=0)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(sequences)

        def __getitem__(self, i):
            return {"input_ids": sequences[i]}

    with tempfile.TemporaryDirectory() as tmp:
        callbacks = []
        if args.worker == "with":
            callback = ValuationCallback(
                task,
                Path(tmp) / "valuation",
                ProjectionConfig(rank_in=16, rank_out=16, exclude=("lm_head",)),
                examples=sequences,
                batch_size=args.batch,
            )
            on_train_end = callback.on_train_end

            def timed(*a, **k):  # the callback's process CPU time
                c0 = time.process_time()
                on_train_end(*a, **k)
                callback.cpu_seconds = time.process_time() - c0

            callback.on_train_end = timed
            callbacks = [callback]
        training = TrainingArguments(
            output_dir=str(Path(tmp) / "out"),
            per_device_train_batch_size=args.batch,
            num_train_epochs=args.epochs,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=Data(),
            data_collator=lambda items: task.collate([i["input_ids"] for i in items]),
            callbacks=callbacks,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = {
            "seconds": seconds,
            "cpu": cpu,
            "steps": trainer.state.global_step,
            "params": sum(p.numel() for p in model.parameters()),
        }
        if callbacks:
            out |= {
                "callback_seconds": callbacks[0].seconds,
                "callback_cpu": callbacks[0].cpu_seconds,
                "D": json.loads((Path(tmp) / "valuation" / "valuation_log.json").read_text())["dim"],
            }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128, help="training sequences")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (training and capture)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: CPU times robust to other work)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="pairs of fresh runs (with, without), alternating order")
    parser.add_argument(
        "--wait-quiet", type=float, default=0, help="seconds to wait, before each run, for CPU pressure < 10%%"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run; writes nothing by default")
    parser.add_argument("--output", help="results file (default benchmarks/RESULTS_capture.md, none with --quick)")
    parser.add_argument("--worker", choices=("with", "without"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from capture_throughput import contention, wait_quiet, write_section

    flags = [
        "--n",
        str(args.n),
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
    ]
    runs = {"with": [], "without": []}
    start = time.time()
    for r in range(args.rounds):
        for kind in ("with", "without") if r % 2 == 0 else ("without", "with"):
            wait_quiet(args.wait_quiet)
            done = subprocess.run(
                [sys.executable, __file__, "--worker", kind, *flags], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise SystemExit(f"{kind} worker failed:\n{done.stderr[-4000:]}")
            runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]) | {"contention": contention()})
            print(kind, runs[kind][-1], flush=True)
    seen = sorted({r["contention"] for rs in runs.values() for r in rs})
    cpu_ratios = [w["cpu"] / o["cpu"] for w, o in zip(runs["with"], runs["without"])]
    cpu_inside = [w["cpu"] / (w["cpu"] - w["callback_cpu"]) for w in runs["with"]]  # same process
    wall_ratios = [w["seconds"] / o["seconds"] for w, o in zip(runs["with"], runs["without"])]
    wall_inside = [w["seconds"] / (w["seconds"] - w["callback_seconds"]) for w in runs["with"]]
    w0 = runs["with"][0]
    med = statistics.median
    command = "python " + shlex.join(["benchmarks/trainer_callback_overhead.py", *argv])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def cell(runs_, key):
        values = [r[key] for r in runs_]
        return f"{med(values):.2f} | {[round(v, 2) for v in values]}"

    def listed(values):
        return [round(v, 2) for v in values]

    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''} per run"
    rows = [
        "| trainer.train() | CPU s (median) | CPU s per run | wall s (median) | wall s per run |",
        "|---|---:|---|---:|---|",
        f"| without the callback | {cell(runs['without'], 'cpu')} | {cell(runs['without'], 'seconds')} |",
        f"| with the callback | {cell(runs['with'], 'cpu')} | {cell(runs['with'], 'seconds')} |",
        f"| of which the callback (capture + statistics + save) | {cell(runs['with'], 'callback_cpu')} "
        f"| {cell(runs['with'], 'callback_seconds')} |",
    ]
    text = "\n\n".join(
        [
            "## Trainer callback overhead (CPU)",
            f"Command: `{command}`. Date: {date}. Machine: {len(os.sched_getaffinity(0))} CPU cores, torch "
            f"{torch.__version__} ({threads}), Python {platform.python_version()}. "
            f"Wall time {time.time() - start:.0f} s.",
            f"Workload: `transformers.Trainer` (AdamW, CPU, fp32) on a random-init Llama-shaped model "
            f"({w0['params'] / 1e6:.2f}M parameters: hidden 128, 4 layers, GQA 4/2 heads, vocab 1024), {args.n} "
            f"sequences x {args.seq} tokens, batch {args.batch}, {args.epochs} epochs = {w0['steps']} optimizer steps. "
            "With `dataworth.trainer.ValuationCallback`: rank 16 x 16 on every Linear but lm_head "
            f"(D = {w0['D']:,}), curvature statistics with second moments, one capture pass over all {args.n} "
            "examples with the final parameters at `on_train_end`, artifacts saved. "
            f"{args.rounds} pairs of fresh processes, order alternating.",
            "\n".join(rows),
            f"Overhead by CPU time: with / without = **{med(cpu_ratios):.2f}x** (median over pairs; per pair "
            f"{listed(cpu_ratios)}); within each run with the callback, (training + callback) / training = "
            f"**{med(cpu_inside):.2f}x** (per run {listed(cpu_inside)}). By wall time: {med(wall_ratios):.2f}x across "
            f"processes (per pair {listed(wall_ratios)}), {med(wall_inside):.2f}x within a run (per run "
            f"{listed(wall_inside)}). The capture pass is one forward and activation-only backward per example, once, "
            f"whatever the number of epochs: its share of a run falls as 1 / epochs (here {args.epochs} epochs).",
            f"Other work on the machine at the end of each run: {'; '.join(seen)}. Where CPU pressure is high, other "
            "processes moved the wall times (single runs by several x) far more than the CPU times; rerun with "
            "`--wait-quiet 60` on a quiet machine for clean wall figures.",
        ]
    )
    print(text)
    output = args.output or (None if args.quick else str(DEFAULT_OUTPUT))
    if output:
        write_section(Path(output), "trainer-callback-overhead", text)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
