"""Capture throughput: LoGra's projected-gradient capture against a training step, on CPU.

On a GPT-2-small-shaped model (random init, fp32, eval mode so no method runs dropout) and the
SAME token batches, measures
  train    a training step: zero_grad + forward + backward with weight gradients (no optimizer step)
  capture  LoGra capture at rank 16 x 16 on every Conv1D of the blocks (lm_head excluded): forward +
           activation-only backward, giving projected per-example gradients (B, D); only
           `GradientCapture.capture` is timed, as `LoGra.capture` calls it
  dense    per-example full weight gradients of the same layers (torch.func vmap(grad), or a
           per-example loop if vmap fails), measured on the same batches, followed by a dense
           Gaussian projection to the same D. The D x n matrix cannot be stored (4.2 TB for GPT-2
           small), so its matmul is timed on a `--dense-slice`-column slice and scaled linearly to
           all n columns: that figure is an EXTRAPOLATION and the report says so.
Each method runs in fresh worker processes (`--rounds`, interleaved), so peak-memory figures never
mix: peak memory is the rise of VmHWM (reset through /proc/self/clear_refs once the model and
batches exist) over the RSS at that point. tokens/s is batch * seq / seconds per batch, median and
best over the timed batches. Because other work on a shared machine moves wall times by several x,
the capture / training ratio is also measured PAIRED: one process alternates a training step and
a capture on each batch, and the median of the per-batch time ratios is reported.

    python benchmarks/capture_throughput.py            # full run (~4 min on 2 quiet cores), writes RESULTS_capture.md
    python benchmarks/capture_throughput.py --quick    # 2 layers, short sequences, ~40 s, writes nothing

On a GPU: `--device cuda --dtype bfloat16` (timings synchronise the device; peak memory is then the
rise of torch.cuda.max_memory_allocated), and `--arch llama-1b` for a ~1.1B Llama shape (TinyLlama:
hidden 2048, 22 layers, GQA 32/4 heads, vocab 32000) instead of GPT-2; see benchmarks/gpu_check.sh.
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

import torch

METHODS = ("train", "capture", "dense")
DEFAULT_OUTPUT = ROOT / "benchmarks" / "RESULTS_capture.md"
MiB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCH_LAYERS = {"gpt2": 12, "llama-1b": 22}  # default depth of each --arch
QUICK = {"layers": 2, "seq": 64, "batch": 2, "warmup": 1, "reps": 3, "rounds": 1, "paired_reps": 6}


# --------------------------------------------------------------------------- memory and machine state


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


def contention() -> str:
    """1-minute load average, and CPU pressure (share of time some task waited for a CPU) where the kernel has it."""
    text = f"load {os.getloadavg()[0]:.2f}"
    try:
        with open("/proc/pressure/cpu") as f:
            some = dict(kv.split("=") for kv in f.readline().split()[1:])
        text += f", CPU pressure {some['avg60']}% (60 s avg)"
    except OSError:
        pass
    return text


def cpu_pressure(window: str = "avg10") -> float | None:
    """Share (%) of the last 10 s (avg10) or 60 s (avg60) in which some runnable task waited for a CPU; None without PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(dict(kv.split("=") for kv in f.readline().split()[1:])[window])
    except OSError:
        return None


def wait_quiet(limit_s: float, threshold: float = 10.0) -> None:
    """Before a worker: wait up to `limit_s` for other work to leave the CPUs (pressure < threshold %)."""
    deadline = time.time() + limit_s
    while time.time() < deadline and (cpu_pressure() or 0.0) >= threshold:
        time.sleep(5)


# --------------------------------------------------------------------------- workload


def build(args, n_batches: int):
    """(model, task, batches), identical in every worker: seeded init and seeded token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dataworth import CausalLMTask

    torch.manual_seed(0)
    if args.arch == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=max(2048, args.seq),
            tie_word_embeddings=False,
        )  # fmt: skip
        with torch.device(args.device):  # initialised where it runs: a 1.1B model is slow to build on CPU
            model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_layer=args.layers, n_positions=max(1024, args.seq))  # n_embd 768, vocab 50257
        model = GPT2LMHeadModel(config)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    task = CausalLMTask(pad_token_id=0)
    g = torch.Generator().manual_seed(1)
    batches = [
        task.collate(
            [torch.randint(1, config.vocab_size, (args.seq,), generator=g).tolist() for _ in range(args.batch)]
        )
        for _ in range(n_batches)
    ]  # input_ids / attention_mask / labels, each (B, T), no padding
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    return model, task, batches


def _on_gpu(args) -> bool:
    return str(args.device).startswith("cuda")


def _synced(step, args):
    """`step`, followed by a device synchronisation on a GPU so wall times cover the kernels."""
    if not _on_gpu(args):
        return step

    def run(*a, **k):
        out = step(*a, **k)
        torch.cuda.synchronize()
        return out

    return run


def new_logra(model, task):
    from dataworth import LoGra, ProjectionConfig

    return LoGra(model, task, ProjectionConfig(rank_in=16, rank_out=16, exclude=("lm_head",)))


def train_step(model, task, batch) -> None:
    model.zero_grad(set_to_none=True)
    task.loss(model, batch).backward()


def per_example_gradients(model, names: list[str]):
    """ids (B, T) -> {weight name: (B, *weight.shape)} per-example gradients, and how they were made."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    tracked = {k: params[k] for k in names}
    rest = {k: v for k, v in params.items() if k not in tracked}

    def loss_one(weights, ids):  # one unpadded example: the loss CausalLMTask computes for it
        logits = functional_call(model, {**rest, **weights}, (), {"input_ids": ids[None]}).logits[0, :-1]
        return F.cross_entropy(logits.float(), ids[1:], reduction="sum")

    impl = {"name": "vmap"}

    def gradients(ids):
        if impl["name"] == "vmap":
            try:
                return vmap(grad(loss_one), in_dims=(None, 0))(tracked, ids)
            except Exception as err:  # noqa: BLE001 - any vmap limitation: fall back to a loop
                impl["name"] = f"per-example loop (vmap failed: {type(err).__name__})"
        rows = [grad(loss_one)(tracked, ids[b]) for b in range(ids.shape[0])]
        return {k: torch.stack([r[k] for r in rows]) for k in names}

    return gradients, impl


def measure(batches, warmup: int, step) -> tuple[list[float], int, int, bool]:
    """Timed seconds per batch after `warmup` batches, and (baseline RSS, peak RSS) in KiB."""
    gc.collect()
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, baseline, _status_kib("VmHWM"), reset


def worker(args) -> dict:
    """One method in this fresh process (or the paired timing); a JSON-able dict of results."""
    from dataworth import GradientCapture

    n_batches = args.warmup + (args.paired_reps if args.worker == "paired" else args.reps)
    model, task, batches = build(args, n_batches)
    out = {"method": args.worker, "params": sum(p.numel() for p in model.parameters())}
    if _on_gpu(args):
        torch.cuda.synchronize()
        gpu_base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "train":
        for p in model.parameters():
            p.requires_grad_(True)
        times, base, peak, reset = measure(batches, args.warmup, _synced(lambda b: train_step(model, task, b), args))
    elif args.worker == "capture":
        logra = new_logra(model, task)
        out |= {"D": logra.projection.layout.dim, "layers_tracked": len(logra.projection.layers)}
        with GradientCapture(model, logra.projection, task) as capture:
            times, base, peak, reset = measure(batches, args.warmup, _synced(capture.capture, args))
    elif args.worker == "paired":  # alternate train / capture per batch, in alternating order
        logra = new_logra(model, task)
        capture = GradientCapture(model, logra.projection, task)
        train_t, capture_t = [], []
        sync = torch.cuda.synchronize if _on_gpu(args) else (lambda: None)

        def timed_capture(batch):
            with capture:  # freezes parameters while open; entering and leaving is not timed
                t0 = time.perf_counter()
                capture.capture(batch)
                sync()
                return time.perf_counter() - t0

        def timed_train(batch):
            t0 = time.perf_counter()
            train_step(model, task, batch)
            sync()
            return time.perf_counter() - t0

        for i, batch in enumerate(batches):
            if i % 2 == 0:
                t_train, t_capture = timed_train(batch), timed_capture(batch)
            else:
                t_capture, t_train = timed_capture(batch), timed_train(batch)
            if i >= args.warmup:
                train_t.append(t_train)
                capture_t.append(t_capture)
        return out | {
            "train_times": train_t,
            "capture_times": capture_t,
            "contention": contention(),
            "pressure": cpu_pressure("avg60"),
        }
    else:  # dense
        logra = new_logra(model, task)
        dim = logra.projection.layout.dim
        names = [f"{n}.weight" for n in logra.projection.layers]
        n_total = sum(model.get_parameter(k).numel() for k in names)
        cols = min(args.dense_slice, model.get_parameter(names[0]).numel())  # a slice of the first layer's gradient
        slice_matrix = torch.randn(cols, dim, generator=torch.Generator().manual_seed(2)) / dim**0.5  # (cols, D)
        gradients, impl = per_example_gradients(model, names)
        parts = []

        def step(batch):
            t0 = time.perf_counter()
            grads = gradients(batch["input_ids"])  # weight -> (B, n_out, n_in)
            t1 = time.perf_counter()
            chunk = grads[names[0]].reshape(args.batch, -1)[:, :cols]  # (B, cols)
            for _ in range(args.dense_slice_repeats):
                projected = chunk @ slice_matrix  # (B, D): these columns' share of P vec(dW)
            slice_s = (time.perf_counter() - t1) / args.dense_slice_repeats
            assert projected.shape == (args.batch, dim)
            parts.append((t1 - t0, slice_s))

        _, base, peak, reset = measure(batches, args.warmup, step)
        parts = parts[args.warmup :]
        times = [g + s * n_total / cols for g, s in parts]  # per-example gradients + extrapolated projection
        out |= {
            "D": dim, "n": n_total, "slice_cols": cols, "slice_mib": slice_matrix.numel() * 4 / MiB,
            "matrix_bytes": dim * n_total * 4, "per_example": impl["name"],
            "grad_times": [g for g, _ in parts], "slice_times": [s for _, s in parts],
        }  # fmt: skip
    if _on_gpu(args):
        out["gpu_peak_delta_mib"] = (torch.cuda.max_memory_allocated() - gpu_base) / MiB
    return out | {
        "times": times,
        "peak_delta_mib": (peak - base) / 1024,
        "peak_reset": reset,
        "contention": contention(),
        "pressure": cpu_pressure("avg60"),
    }


# --------------------------------------------------------------------------- driver


def run_worker(method: str, args) -> dict:
    flags = [
        "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch), "--warmup", str(args.warmup),
        "--reps", str(args.reps), "--paired-reps", str(args.paired_reps), "--dense-slice", str(args.dense_slice),
        "--dense-slice-repeats", str(args.dense_slice_repeats),
        "--device", args.device, "--dtype", args.dtype, "--arch", args.arch,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", method, *flags],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import transformers

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    } | ({"gpu": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {})


def describe(args) -> str:
    """The model, as the report names it."""
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    if args.arch == "llama-1b":
        return (
            f"`LlamaForCausalLM` TinyLlama shape ({args.layers} layers, hidden 2048, GQA 32/4 heads, vocab 32000), "
            f"random init, {dtype}"
        )
    return f"`GPT2LMHeadModel(GPT2Config(n_layer={args.layers}))`, random init, {dtype}"


def _rate(tokens: int, seconds: float) -> str:
    value = tokens / seconds
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def report(args, runs: dict[str, list[dict]], info: dict) -> str:
    """The Markdown table and its notes."""
    tokens = args.batch * args.seq
    times = {m: [t for r in rs for t in r["times"]] for m, rs in runs.items() if m != "paired"}
    med = {m: statistics.median(t) for m, t in times.items()}
    best = {m: min(t) for m, t in times.items()}
    peak_key = "gpu_peak_delta_mib" if _on_gpu(args) else "peak_delta_mib"
    peak = {m: max(r[peak_key] for r in rs) for m, rs in runs.items() if m != "paired"}
    cap = runs["capture"][0]
    labels = {
        "train": "training step (fwd + bwd with weight grads)",
        "capture": f"LoGra capture (rank 16x16 on {cap['layers_tracked']} layers, D = {cap['D']:,})",
        "dense": "per-example grads + dense projection to the same D (EXTRAPOLATED, see note)",
    }
    rows = [
        f"| method | tokens/s (median) | tokens/s (best) | s / batch (median) | "
        f"peak {'GPU memory' if _on_gpu(args) else 'RSS'} rise (MiB) | vs training step (median / best) |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(label, t_med, t_best, mib):
        ratio = f"{med['train'] / t_med:.2f}x / {best['train'] / t_best:.2f}x"
        return f"| {label} | {_rate(tokens, t_med)} | {_rate(tokens, t_best)} | {t_med:.3f} | {mib:.0f} | {ratio} |"

    for m in times:
        rows.append(row(labels[m], med[m], best[m], peak[m]))
    notes = []
    if "dense" in runs:
        d = runs["dense"][0]
        grad_t = [t for r in runs["dense"] for t in r["grad_times"]]
        rows.append(row(f"per-example full grads alone, no projection (measured, {d['per_example']})",
                        statistics.median(grad_t), min(grad_t), peak["dense"]))  # fmt: skip
        slice_med = statistics.median(t for r in runs["dense"] for t in r["slice_times"])
        params = runs["train"][0]["params"]
        notes.append(
            f"Dense rows: the per-example gradients of all {cap['layers_tracked']} tracked layers are measured on the same "
            f"batches ({d['per_example']}); their peak RSS rise is the gradients and activations, not the projection "
            f"matrix. The projection (B, n) @ (n, D), n = {d['n']:,} gradient entries per example, D = {d['D']:,}, is "
            f"timed on a {d['slice_cols']:,}-column slice ({d['slice_mib']:.0f} MiB of fp32 matrix: {slice_med * 1e3:.1f} ms "
            f"per batch, {2 * args.batch * d['slice_cols'] * d['D'] / slice_med / 1e9:.1f} GFLOP/s) and scaled by "
            f"n / slice = {d['n'] / d['slice_cols']:,.0f}: an extrapolation, which assumes the whole matrix could be read "
            f"at the slice's rate. It cannot even be stored: D x n x 4 bytes = {d['matrix_bytes']:,} bytes = "
            f"{d['matrix_bytes'] / 1e12:,.2f} TB in fp32, against {info['memory_gib']} GiB of RAM here. In arithmetic "
            f"alone the projection costs 2 D n = {2 * d['D'] * d['n'] / 1e12:,.2f} TFLOP per example "
            f"({2 * d['D'] * d['n'] / args.seq / 1e9:,.1f} GFLOP per token), against about 6 x {params / 1e6:.0f}M "
            f"parameters = {6 * params / 1e9:.2f} GFLOP per token for a whole training step."
        )
    paired = runs["paired"]
    train_p = [t for r in paired for t in r["train_times"]]
    capture_p = [t for r in paired for t in r["capture_times"]]
    ratios = sorted(a / b for a, b in zip(train_p, capture_p))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    ratio = statistics.median(ratios)
    notes.append(
        f"Paired ({len(ratios)} batches, one process alternating a training step and a capture on each batch, "
        f"order alternating): training step {_rate(tokens, statistics.median(train_p))} tokens/s, capture "
        f"{_rate(tokens, statistics.median(capture_p))} tokens/s (medians); per-batch capture / training-step "
        f"throughput ratio median **{ratio:.2f}x** (quartiles {q[0]:.2f}-{q[2]:.2f}). Target >= 1.3x; about 1.5x is "
        "the matmul-FLOP bound, since capture skips the weight-gradient matmuls, a third of a training step's; "
        "training's other costs (allocating the weight gradients, the tied 50257 x 768 embedding gradient) can push "
        "the measured ratio past it, most on shallow models."
    )
    best_train, best_capture = min(times["train"] + train_p), min(times["capture"] + capture_p)
    notes.append(
        f"Least-disturbed batches (best of all {len(times['train']) + len(train_p)} timed batches of each, fresh and "
        f"paired workers): training step {_rate(tokens, best_train)} tokens/s ({best_train:.3f} s), capture "
        f"{_rate(tokens, best_capture)} tokens/s ({best_capture:.3f} s): capture / training step **{best_train / best_capture:.2f}x**."
    )
    pressures = [r["pressure"] for rs in runs.values() for r in rs if r.get("pressure") is not None]
    if pressures and max(pressures) > 10:
        notes.append(
            f"**Shared machine:** other processes kept the CPUs busy during this run (CPU pressure up to "
            f"{max(pressures):.0f}% over the minute before a worker ended, see below), which moves single batches by "
            "several x. The medians then measure that other work more than the methods; the best-of figures estimate "
            "the undisturbed machine. Rerun on a quiet machine (`--wait-quiet`) for clean medians."
        )
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layers", type=int, default=None, help="blocks (default 12 = GPT-2 small; 22 for --arch llama-1b)"
    )
    parser.add_argument("--arch", choices=tuple(ARCH_LAYERS), default="gpt2", help="model shape, random init")
    parser.add_argument("--device", default="cpu", help="torch device of the model and batches, e.g. cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per worker")
    parser.add_argument("--reps", type=int, default=5, help="timed batches per method worker")
    parser.add_argument("--rounds", type=int, default=2, help="fresh workers per method (train, capture), interleaved")
    parser.add_argument("--paired-reps", type=int, default=10, help="timed batches of the paired train/capture worker")
    parser.add_argument("--methods", default=",".join(METHODS), help="train,capture[,dense]")
    parser.add_argument("--dense-slice", type=int, default=8192, help="projection columns actually multiplied")
    parser.add_argument("--dense-slice-repeats", type=int, default=3, help="slice matmuls averaged per batch")
    parser.add_argument(
        "--wait-quiet", type=float, default=0, help="seconds to wait, before each worker, for CPU pressure < 10%%"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run; writes nothing by default")
    parser.add_argument(
        "--output", help=f"results file (default {DEFAULT_OUTPUT.relative_to(ROOT)}, none with --quick)"
    )
    parser.add_argument("--worker", choices=(*METHODS, "paired"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = ARCH_LAYERS[args.arch]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    methods = [m.strip() for m in args.methods.split(",")]
    if not {"train", "capture"} <= set(methods) <= set(METHODS):
        parser.error("--methods must include train and capture, from train,capture,dense")
    info = machine()
    command = "python " + shlex.join(["benchmarks/capture_throughput.py", *argv])
    print(f"{command}\n{info}\n{describe(args)}; batch {args.batch} x seq {args.seq}")
    start, before = time.time(), contention()
    runs = {m: [] for m in [*methods, "paired"]}
    plan = [m for r in range(args.rounds) for m in (["train", "capture"] if r % 2 == 0 else ["capture", "train"])]
    plan += ["paired"] + (["dense"] if "dense" in methods else [])
    for m in plan:
        wait_quiet(args.wait_quiet)
        result = run_worker(m, args)
        runs[m].append(result)
        shown = result.get("times") or [round(a / b, 2) for a, b in zip(result["train_times"], result["capture_times"])]
        label = "train/capture ratios" if m == "paired" else "s/batch"
        print(f"{m:8s} {label} {[round(t, 3) for t in shown]} ({result['contention']} at its end)", flush=True)
    elapsed, after = time.time() - start, contention()
    text = report(args, runs, info)
    text += f"\n\nOther work on the machine, before: {before}; after: {after}. Wall time {elapsed:.0f} s."
    print("\n" + text)
    output = args.output or (None if args.quick else str(DEFAULT_OUTPUT))
    if output:
        write_results(Path(output), command, info, args, text, runs)
        print(f"\nwrote {output}")


def write_results(path: Path, command: str, info: dict, args, text: str, runs: dict) -> None:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    raw = {m: [[round(t, 4) for t in r["times"]] for r in rs] for m, rs in runs.items() if m != "paired"}
    raw["paired train"] = [[round(t, 4) for t in r["train_times"]] for r in runs["paired"]]
    raw["paired capture"] = [[round(t, 4) for t in r["capture_times"]] for r in runs["paired"]]
    where = info.get("gpu", args.device) if _on_gpu(args) else "CPU"
    where += "" if args.dtype == "float32" else f", {args.dtype}"
    body = [
        f"# Capture throughput: LoGra capture vs a training step ({where})",
        "",
        f"Command, from the repository root in the project's virtualenv: `{command}`",
        "",
        (
            f"Date: {date}. Machine: {info['nproc']} CPU cores ({info['cpu']}), {info['memory_gib']} GiB RAM, torch "
            f"{info['torch']} ({info['torch_threads']} threads, the default), transformers {info['transformers']}, "
            f"Python {info['python']}, {info['platform']}." + (f" GPU: {info['gpu']}." if "gpu" in info else "")
        ),
        "",
        (
            f"Model: {describe(args)}, eval mode (no dropout in "
            f"any method). Batches: {args.batch} sequences x {args.seq} random tokens, identical in every method; per "
            f"worker {args.warmup} warm-up then {args.reps} timed batches ({args.paired_reps} in the paired worker), "
            f"{args.rounds} fresh workers per method, interleaved. tokens/s counts batch x seq input tokens. "
            + (
                "Peak GPU memory rise: torch.cuda.max_memory_allocated minus the allocation after setup, per fresh "
                "process."
                if _on_gpu(args)
                else "Peak RSS rise: VmHWM (reset after setup) minus RSS after setup, per fresh process."
            )
        ),
        "",
        text,
        "",
        "Seconds per timed batch, per worker, and the contention each worker saw (at its end):",
        "",
        "```json",
        json.dumps(raw),
        json.dumps({m: [r["contention"] for r in rs] for m, rs in runs.items()}),
        "```",
        "",
    ]
    path.write_text("\n".join(body) + "".join(f"\n{block}\n" for block in _sections(path)))


# --------------------------------------------------------------------------- sections of other benchmarks


def _sections(path: Path) -> list[str]:
    """The `<!-- section NAME -->` ... `<!-- end NAME -->` blocks other benchmarks keep in `path`
    (trainer_callback_overhead.py, long_sequences.py, gpu_check.sh), so rewriting this file's own
    results keeps them."""
    import re

    text = path.read_text() if path.exists() else ""
    return [m.group(0) for m in re.finditer(r"<!-- section (\S+) -->.*?<!-- end \1 -->", text, flags=re.S)]


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the block `name` of `path`, leaving everything else as it is."""
    import re

    block = f"<!-- section {name} -->\n{text.strip()}\n<!-- end {name} -->"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"<!-- section {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", flags=re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
