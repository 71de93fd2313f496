"""Capture throughput: LoGra's projected-gradient capture against a training step, on CPU.

On a GPT-2-small-shaped model (random init, fp32) and the SAME token batches, measures
  train    forward + backward with weight gradients (zero_grad, loss.backward(); no optimizer step)
  capture  LoGra capture, rank 16 x 16 on every Conv1D of the blocks (lm_head excluded): one
           forward + an activation-only backward, projected per-example gradients (B, D)
  dense    per-example full weight gradients of the same layers (torch.func vmap(grad), or a
           per-example loop if vmap fails; measured on the same batches) followed by a dense
           Gaussian projection to the same D. The (D x n) matrix cannot be stored (4.2 TB for GPT-2
           small), so its matmul is timed on a slice of `--dense-slice` columns and extrapolated
           linearly to all n columns: that row is an EXTRAPOLATION and says so.
Each method runs in a fresh subprocess (so peak-memory figures never mix), `--rounds` times,
interleaved; tokens/s is batch * seq / seconds per batch, as the median (and best) over all timed
repetitions. Peak memory is the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after setup) above its RSS once the model and batches exist.

    python benchmarks/capture_throughput.py            # full run, writes benchmarks/RESULTS_capture.md
    python benchmarks/capture_throughput.py --quick    # small shapes, about a minute, writes nothing
"""

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

METHODS = ("train", "capture", "dense")
DEFAULT_OUTPUT = ROOT / "benchmarks" / "RESULTS_capture.md"
MiB = 2**20


# --------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    """A `Vm*` field of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- workload

def build(args):
    """(model, task, batches) identical in every worker: seeded init and seeded token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dataworth import CausalLMTask

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_positions=max(1024, args.seq))  # n_embd 768, vocab 50257
    model = GPT2LMHeadModel(config).eval()  # dropout off in every method: the same forward math
    task = CausalLMTask(pad_token_id=0)
    g = torch.Generator().manual_seed(1)
    batches = [
        task.collate([torch.randint(1, config.vocab_size, (args.seq,), generator=g).tolist() for _ in range(args.batch)])
        for _ in range(args.warmup + args.reps)
    ]  # each: input_ids / attention_mask / labels (B, T), no padding
    return model, task, batches


def projection_config():
    from dataworth import ProjectionConfig

    return ProjectionConfig(rank_in=16, rank_out=16, exclude=("lm_head",))


def make_train_step(model, task, args):
    for p in model.parameters():
        p.requires_grad_(True)

    def step(batch):
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()

    return step, {}, lambda: None


def make_capture_step(model, task, args):
    from dataworth import GradientCapture, LoGra

    logra = LoGra(model, task, projection_config())
    capture = GradientCapture(model, logra.projection, task).__enter__()

    def step(batch):
        result = capture.capture(batch)
        assert result.gradients.shape == (args.batch, logra.projection.layout.dim)

    info = {"D": logra.projection.layout.dim, "layers_tracked": len(logra.projection.layers)}
    return step, info, lambda: capture.__exit__(None, None, None)


def make_dense_step(model, task, args):
    """Per-example weight gradients of LoGra's layers, then (B, n) @ (n, D) extrapolated from a slice."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from dataworth import LoGra

    logra = LoGra(model, task, projection_config())
    dim = logra.projection.layout.dim
    names = [f"{n}.weight" for n in logra.projection.layers]
    params = {k: v.detach() for k, v in model.named_parameters()}
    tracked = {k: params[k] for k in names}
    rest = {k: v for k, v in params.items() if k not in tracked}
    n_total = sum(t.numel() for t in tracked.values())
    cols = min(args.dense_slice, tracked[names[0]].numel())  # a slice of the first layer's gradient
    g = torch.Generator().manual_seed(2)
    slice_matrix = torch.randn(cols, dim, generator=g) / dim**0.5  # (cols, D): columns [0, cols) of P^T

    def loss_one(weights, ids):  # one example, no padding: the same loss as CausalLMTask
        logits = functional_call(model, {**rest, **weights}, (), {"input_ids": ids[None]}).logits[0, :-1]
        return F.cross_entropy(logits.float(), ids[1:], reduction="sum")

    per_example = {"impl": "vmap"}

    def gradients(ids):  # layer weight -> (B, *weight.shape)
        if per_example["impl"] == "vmap":
            try:
                return vmap(grad(loss_one), in_dims=(None, 0))(tracked, ids)
            except Exception as err:  # noqa: BLE001 - any vmap limitation: fall back to a loop
                per_example["impl"] = f"loop (vmap failed: {type(err).__name__})"
        rows = [grad(loss_one)(tracked, ids[b]) for b in range(ids.shape[0])]
        return {k: torch.stack([r[k] for r in rows]) for k in names}

    timings = []

    def step(batch):
        t0 = time.perf_counter()
        grads = gradients(batch["input_ids"])
        t1 = time.perf_counter()
        flat = grads[names[0]].reshape(args.batch, -1)  # (B, n_0)
        chunk = flat[:, :cols]  # (B, cols)
        repeats = args.dense_slice_repeats
        t2 = time.perf_counter()
        for _ in range(repeats):
            projected = chunk @ slice_matrix  # (B, D): the first cols columns' share of P g
        t3 = time.perf_counter()
        assert projected.shape == (args.batch, dim)
        slice_s = (t3 - t2) / repeats
        timings.append({"grad_s": t1 - t0, "slice_s": slice_s, "projection_s": slice_s * n_total / cols})

    info = {
        "D": dim,
        "n": n_total,
        "slice_cols": cols,
        "slice_mib": slice_matrix.numel() * 4 / MiB,
        "matrix_bytes": dim * n_total * 4,
        "per_example": per_example,
        "timings": timings,
    }
    return step, info, lambda: None


def worker(args) -> dict:
    """One method in this (fresh) process; returns its timings and peak memory as a dict."""
    model, task, batches = build(args)
    make = {"train": make_train_step, "capture": make_capture_step, "dense": make_dense_step}[args.worker]
    step, info, close = make(model, task, args)
    gc.collect()
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    times, cpu_times = [], []
    for i, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = _status_kib("VmHWM")
    close()
    if args.worker == "dense":  # seconds per batch: per-example gradients + extrapolated projection
        timed = info.pop("timings")[args.warmup :]
        times = [t["grad_s"] + t["projection_s"] for t in timed]
        info["grad_times"] = [t["grad_s"] for t in timed]
        info["slice_times"] = [t["slice_s"] for t in timed]
        info["per_example"] = info["per_example"]["impl"]
    return {
        "method": args.worker,
        "times": times,
        "cpu_times": cpu_times,
        "load": os.getloadavg()[0],
        "peak_delta_mib": (peak - baseline) / 1024,
        "baseline_mib": baseline / 1024,
        "peak_reset": reset,
        "params": sum(p.numel() for p in model.parameters()),
        **info,
    }


# --------------------------------------------------------------------------- driver

def run_worker(method: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, *worker_flags(args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_flags(args) -> list[str]:
    return [
        "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch),
        "--warmup", str(args.warmup), "--reps", str(args.reps),
        "--dense-slice", str(args.dense_slice), "--dense-slice-repeats", str(args.dense_slice_repeats),
    ]  # fmt: skip


def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summarise(runs: list[dict], tokens: int) -> dict:
    times = [t for r in runs for t in r["times"]]
    return {
        "median_s": statistics.median(times),
        "best_s": min(times),
        "tok_s": tokens / statistics.median(times),
        "tok_s_best": tokens / min(times),
        "peak_mib": max(r["peak_delta_mib"] for r in runs),
        "cpu_s": statistics.median(t for r in runs for t in r["cpu_times"]),  # process CPU seconds, all threads
        "n": len(times),
    }


def report(args, runs: dict[str, list[dict]], info: dict, elapsed: float, loads: tuple) -> str:
    tokens = args.batch * args.seq
    s = {m: summarise(r, tokens) for m, r in runs.items()}
    train = s["train"]
    dense = runs["dense"][0] if "dense" in runs else None
    labels = {
        "train": "training step (fwd + bwd, weight grads)",
        "capture": "LoGra capture (rank 16x16, D = {D})".format(D=runs["capture"][0]["D"]),
        "dense": "per-example grads + dense projection to D (EXTRAPOLATED, see below)",
    }
    lines = [
        "| method | tokens/s (median) | tokens/s (best) | s / batch (median) | CPU s / batch (median) | peak RSS rise (MiB) | x training step (median / best) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in runs:
        r = s[m]
        ratio = f"{r['tok_s'] / train['tok_s']:.2f} / {r['tok_s_best'] / train['tok_s_best']:.2f}"
        fmt = "{:.1f}" if r["tok_s"] < 10 else "{:.0f}"
        lines.append(
            f"| {labels[m]} | {fmt.format(r['tok_s'])} | {fmt.format(r['tok_s_best'])} | {r['median_s']:.3f} | "
            f"{'n/a' if m == 'dense' else format(r['cpu_s'], '.3f')} | {r['peak_mib']:.0f} | {ratio} |"
        )
    if dense:
        grad_times = [t for r in runs["dense"] for t in r["grad_times"]]
        slice_times = [t for r in runs["dense"] for t in r["slice_times"]]
        grad_med = statistics.median(grad_times)
        lines.append(
            f"| per-example full grads alone (measured, no projection, {dense['per_example']}) | "
            f"{tokens / grad_med:.0f} | {tokens / min(grad_times):.0f} | {grad_med:.3f} | n/a | {s['dense']['peak_mib']:.0f} | "
            f"{tokens / grad_med / train['tok_s']:.2f} / {tokens / min(grad_times) / train['tok_s_best']:.2f} |"
        )
    table = "\n".join(lines)
    out = [table, ""]
    if dense:
        slice_med = statistics.median(slice_times)
        flops = 2 * args.batch * dense["slice_cols"] * dense["D"] / slice_med
        tb = dense["matrix_bytes"] / 1e12
        out += [
            f"Dense row: per-example gradients of all {runs['capture'][0]['layers_tracked']} tracked layers are measured "
            f"on the same batches ({dense['per_example']}); the dense projection (B, n) @ (n, D) with "
            f"n = {dense['n']:,} gradient entries per example and D = {dense['D']:,} is timed on a "
            f"{dense['slice_cols']:,}-column slice ({dense['slice_mib']:.0f} MiB of fp32 matrix, "
            f"{slice_med * 1e3:.1f} ms per batch, {flops / 1e9:.1f} GFLOP/s) and scaled by n / slice = "
            f"{dense['n'] / dense['slice_cols']:,.0f}. That assumes the full matrix could be read at the slice's rate; "
            f"it cannot even be stored: D x n x 4 bytes = {dense['matrix_bytes']:,} bytes = {tb:,.2f} TB in fp32 "
            f"(this machine has {info['memory_gib']} GiB). In arithmetic alone the projection costs 2 D n = "
            f"{2 * dense['D'] * dense['n'] / 1e12:,.2f} TFLOP per example ({2 * dense['D'] * dense['n'] / args.seq / 1e9:,.1f} "
            f"GFLOP per token), against about 6 x {runs['train'][0]['params'] / 1e6:.0f}M parameters = "
            f"{6 * runs['train'][0]['params'] / 1e9:.2f} GFLOP per token for a whole training step. Its peak RSS rise counts the per-example gradients and "
            "activations; the slice matrix is allocated before the baseline.",
            "",
        ]
    ratio = s["capture"]["tok_s"] / train["tok_s"]
    out.append(
        f"Capture / training step: {ratio:.2f}x tokens/s at the median, "
        f"{s['capture']['tok_s_best'] / train['tok_s_best']:.2f}x best-to-best "
        f"(target >= 1.3x; about 1.5x is the matmul-FLOP bound: capture skips the weight-gradient matmuls, a third of a training step's); "
        f"{train['cpu_s'] / s['capture']['cpu_s']:.2f}x on process CPU time per batch, which other load on the "
        "machine disturbs less than wall time."
    )
    out.append(f"Load average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f}; wall time {elapsed:.0f} s.")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 = GPT-2 small)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per worker")
    parser.add_argument("--reps", type=int, default=5, help="timed batches per worker")
    parser.add_argument("--rounds", type=int, default=4, help="fresh workers per method, interleaved")
    parser.add_argument("--dense-rounds", type=int, default=1, help="rounds that also run the (slow) dense worker")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of train,capture,dense")
    parser.add_argument("--dense-slice", type=int, default=8192, help="projection columns actually multiplied")
    parser.add_argument("--dense-slice-repeats", type=int, default=3, help="slice matmuls averaged per batch")
    parser.add_argument("--quick", action="store_true", help="2 layers, seq 64, batch 2, 1 round: about a minute")
    parser.add_argument("--output", help=f"results file (default {DEFAULT_OUTPUT.relative_to(ROOT)}; none with --quick)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for flag, value in [("layers", 2), ("seq", 64), ("batch", 2), ("warmup", 1), ("reps", 3), ("rounds", 1)]:
            if f"--{flag}" not in explicit:
                setattr(args, flag, value)
    methods = [m.strip() for m in args.methods.split(",")]
    if not {"train", "capture"} <= set(methods) or not set(methods) <= set(METHODS):
        parser.error("--methods must include train and capture, from train,capture,dense")
    info = machine()
    command = "python " + shlex.join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).exists() else sys.argv[0], *sys.argv[1:]])
    print(f"{command}\n{info}\nGPT-2 shape: {args.layers} layers, n_embd 768, vocab 50257; batch {args.batch} x seq {args.seq}")
    start, load_before = time.time(), os.getloadavg()[0]
    runs = {m: [] for m in methods}
    for r in range(args.rounds):
        order = [m for m in methods if m != "dense" or r < args.dense_rounds]
        for m in order if r % 2 == 0 else order[::-1]:  # interleaved, so load drifts hit all alike
            result = run_worker(m, args)
            runs[m].append(result)
            print(f"round {r + 1}/{args.rounds} {m:8s} s/batch {[round(t, 3) for t in result['times']]} "
                  f"peak RSS rise {result['peak_delta_mib']:.0f} MiB", flush=True)  # fmt: skip
    elapsed, load_after = time.time() - start, os.getloadavg()[0]
    text = report(args, runs, info, elapsed, (load_before, load_after))
    print("\n" + text)
    output = args.output or (None if args.quick else str(DEFAULT_OUTPUT))
    if output:
        write_results(Path(output), command, info, args, text, runs)
        print(f"\nwrote {output}")


def write_results(path: Path, command: str, info: dict, args, text: str, runs: dict) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    raw = {m: [[round(t, 4) for t in r["times"]] for r in rs] for m, rs in runs.items()}
    body = [
        "# Capture throughput: LoGra capture vs a training step (CPU)",
        "",
        f"Command (from the repository root, in the project's virtualenv): `{command}`",
        "",
        f"Date: {date}. Machine: {info['nproc']} CPU cores ({info['cpu']}), {info['memory_gib']} GiB RAM, "
        f"torch {info['torch']} ({info['torch_threads']} threads, default), transformers {info['transformers']}, "
        f"Python {info['python']}, {info['platform']}.",
        "",
        f"Model: `GPT2LMHeadModel(GPT2Config(n_layer={args.layers}))`, random init, fp32, eval mode (no dropout in any "
        f"method). Batches: {args.warmup} warm-up + {args.reps} timed, {args.batch} sequences x {args.seq} random tokens, "
        f"identical in every method; {args.rounds} fresh worker processes per method, interleaved. tokens/s counts "
        f"batch x seq input tokens per batch. Peak RSS rise: VmHWM (reset after setup) minus RSS after setup, per fresh "
        f"process.",
        "",
        text,
        "",
        "Seconds per timed batch, per worker (round order):",
        "",
        "```json",
        json.dumps(raw, indent=1),
        "```",
        "",
    ]
    path.write_text("\n".join(body))


if __name__ == "__main__":
    main()
