"""Peak memory of capture on long sequences (512 to 4096 tokens), against a training step, on CPU.

A small Llama-shaped random-init model (hidden 256, 8 layers, GQA 8/4 heads, vocab 2048, SDPA
attention), one sequence per batch. For each length, in fresh processes: a training step (forward +
backward with weight gradients), a LoGra capture (rank 16 x 16 on every Linear but lm_head, curvature
statistics with second moments) and the same capture with `checkpoint_blocks=True` (activation
checkpointing of the decoder layers, dataworth/checkpointing.py). Peak memory is the rise of VmHWM over
the RSS once the model and batch exist (reset through /proc/self/clear_refs), as in
capture_throughput.py. What capture itself keeps per tracked layer is the projected inputs and output
gradients, T x (k_in + k_out) floats, linear in T; without checkpointing the forward keeps every
layer's activations for backward, as training does; with it, each layer's input only, plus one layer's
activations while that layer is recomputed.

    python benchmarks/long_sequences.py             # ~5 min on 2 cores, writes a section of RESULTS_capture.md
    python benchmarks/long_sequences.py --quick     # 512 and 1024 only, writes nothing
"""

import argparse
import datetime
import gc
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from capture_throughput import _reset_peak, _status_kib, contention, write_section  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "RESULTS_capture.md"
MiB = 2**20
VOCAB = 2048
METHODS = ("train", "capture", "checkpointed")


def worker(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataworth import CausalLMTask, GradientCapture, LoGra, ProjectionConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    task = CausalLMTask(pad_token_id=0)
    g = torch.Generator().manual_seed(1)
    batch = task.collate([torch.randint(1, VOCAB, (args.seq,), generator=g).tolist()])
    out = {"seq": args.seq, "method": args.worker, "n_layers": args.layers}
    if args.worker != "train":
        logra = LoGra(model, task, ProjectionConfig(rank_in=16, rank_out=16, exclude=("lm_head",)))
        stats = logra.new_statistics()
        checkpoint_blocks = args.worker == "checkpointed"
        with GradientCapture(model, logra.projection, task, checkpoint_blocks=checkpoint_blocks) as capture:
            gc.collect()
            base, reset = _status_kib("VmRSS"), _reset_peak()
            t0 = time.perf_counter()
            result = capture.capture(batch)
            stats.update(result)
            seconds = time.perf_counter() - t0
            kept = sum(t.numel() * t.element_size() for d in (result.inputs, result.output_grads) for t in d.values())
        out |= {"D": logra.projection.layout.dim, "kept_mib": kept / MiB, "layers": len(logra.projection.layers)}
    else:
        gc.collect()
        base, reset = _status_kib("VmRSS"), _reset_peak()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        seconds = time.perf_counter() - t0
    return out | {
        "peak_mib": (_status_kib("VmHWM") - base) / 1024,
        "reset": reset,
        "seconds": seconds,
        "attention": model.config._attn_implementation,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="512,1024,2048,4096", help="sequence lengths")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the table's model")
    parser.add_argument("--deeper", type=int, default=16, help="decoder layers of a second model, longest length only")
    parser.add_argument("--quick", action="store_true", help="512 and 1024 only; writes nothing by default")
    parser.add_argument("--output", help="results file (default benchmarks/RESULTS_capture.md, none with --quick)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    seqs = [512, 1024] if args.quick and "--seqs" not in " ".join(argv) else [int(s) for s in args.seqs.split(",")]
    start = time.time()

    def measure(seq: int, layers: int) -> dict:
        row = {}
        for method in METHODS:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", method, "--seq", str(seq), "--layers", str(layers)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{method} at {seq} tokens, {layers} layers failed:\n{done.stderr[-4000:]}")
            row[method] = json.loads(done.stdout.strip().splitlines()[-1])
            print(row[method], flush=True)
        return row

    rows = [measure(seq, args.layers) for seq in seqs]
    deeper = measure(seqs[-1], args.deeper)
    command = "python " + shlex.join(["benchmarks/long_sequences.py", *argv])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    c0 = rows[0]["capture"]

    def ratio(row, method):
        return row[method]["peak_mib"] / max(row["train"]["peak_mib"], 1e-9)

    table = [
        "| tokens | training step peak rise (MiB) | capture (MiB) | capture, checkpointed blocks (MiB) "
        "| capture / training | checkpointed / training | capture's kept u, v (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, k, t = r["capture"], r["checkpointed"], r["train"]
        table.append(
            f"| {c['seq']} | {t['peak_mib']:.0f} | {c['peak_mib']:.0f} | {k['peak_mib']:.0f} | {ratio(r, 'capture'):.2f} "
            f"| {ratio(r, 'checkpointed'):.2f} | {c['kept_mib']:.1f} |"
        )
    length = rows[-1]["capture"]["seq"] / rows[0]["capture"]["seq"]
    growth = {m: rows[-1][m]["peak_mib"] / max(rows[0][m]["peak_mib"], 1e-9) for m in METHODS}
    saving = rows[-1]["capture"]["peak_mib"] / max(rows[-1]["checkpointed"]["peak_mib"], 1e-9)
    depth = ", ".join(
        f"{m} {rows[-1][m]['peak_mib']:.0f} -> {deeper[m]['peak_mib']:.0f} MiB"
        for m in ("train", "capture", "checkpointed")
    )
    machine = f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    text = "\n\n".join(
        [
            "## Long sequences: peak memory of capture (CPU)",
            f"Command: `{command}`. Date: {date}. Machine: {machine}; {contention()} at the end. "
            f"Wall time {time.time() - start:.0f} s.",
            f"Model: random-init Llama shape, hidden 256, {args.layers} layers, GQA 8/4 heads, vocab {VOCAB}, attention "
            f"`{c0['attention']}`, fp32; one sequence per batch. Capture: rank 16 x 16 on {c0['layers']} Linear layers "
            f"(lm_head excluded, D = {c0['D']:,}), statistics with second moments updated. Peak rise = VmHWM (reset "
            "once model and batch exist) minus RSS then, fresh process per cell.",
            "\n".join(table),
            f"From {rows[0]['capture']['seq']} to {rows[-1]['capture']['seq']} tokens ({length:.0f}x) the peak rises "
            f"{growth['train']:.1f}x for a training step, {growth['capture']:.1f}x for capture and "
            f"{growth['checkpointed']:.1f}x for capture with checkpointed blocks; at {rows[-1]['capture']['seq']} "
            f"tokens checkpointing cuts capture's peak {saving:.1f}x. What capture adds to a forward/backward is the "
            'projected inputs and output gradients it keeps, T x (k_in + k_out) floats per layer (the "kept" column: '
            "linear in T and small); the rest is the forward's activations, which a training step holds too, and "
            "which checkpointing replaces by each layer's input plus one layer's activations at a time (the "
            "logits, T x vocabulary, stay). The checkpointed capture recomputes every layer's forward once more. "
            f"Depth, at {seqs[-1]} tokens, {args.layers} -> {args.deeper} layers (peak rise: training step, capture, "
            f"checkpointed capture): {depth}. "
            "Times are not reported: one cold call per process says little about speed (capture_throughput.py "
            "measures that).",
        ]
    )
    print(text)
    output = args.output or (None if args.quick else str(DEFAULT_OUTPUT))
    if output:
        write_section(Path(output), "long-sequences", text)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
