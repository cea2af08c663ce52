"""A first run on a GPU in one command, every figure in one report:

    python gpu_check.py --data-dir data --out gpu_report.md

Runs, in order, each step in a process of its own with a time limit, so that a failure
or a hang is written down and the next step still runs (the limits add up to under ten
minutes):
  1. tests    the test suite on the GPU: every test must pass and none may be skipped
  2. float32  the fused kernels against the plain path in full float32 (CUPY_TF32=0)
  3. bench    `mora.py bench --device gpu --report`: the small and the large model
  4. train    a short training run on the text in --data-dir: val bits/byte, ms/step
  5. kernels  CUDA events around every fused-kernel launch over a few training steps:
              ms per launch and per step by kernel, registers and local memory
The report (markdown) grows as the steps finish, so it holds what was measured however
the run ends.  `--time-kernels` prints step 5's table alone."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
LIMITS = {"tests": 210, "float32": 60, "bench": 120, "train": 120, "kernels": 60}  # seconds


def run(command, limit, env=None):
    """(exit status, or why there is none; seconds; stdout; stderr) of a child process."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=limit)
        status, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        status, out, err = f"timed out after {limit} s", exc.stdout or "", exc.stderr or ""
        out, err = (s.decode(errors="replace") if isinstance(s, bytes) else s for s in (out, err))
    return status, time.perf_counter() - started, out, err


def tail(text, lines=30):
    return "\n".join(text.rstrip().splitlines()[-lines:])


def tests_step(args):
    """pytest on test_mora.py: (ok, summary, details).  On a GPU a skipped test is a
    failure too: it is a check the GPU did not get."""
    status, seconds, out, err = run([PYTHON, "-m", "pytest", "-q", "-rs", "test_mora.py"], LIMITS["tests"])
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail(out, 1))}
    skipped = counts.get("skipped", 0)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary line"
    return status == 0 and skipped == 0, summary, seconds, fenced(tail(out + err, 40))


def float32_step(args):
    """The full-float32 check: `python test_mora.py` in a process started with CUPY_TF32=0
    (CuPy fixes TF32 or not at a process's first float32 matmul)."""
    status, seconds, out, err = run([PYTHON, "test_mora.py"], LIMITS["float32"], env=dict(os.environ, CUPY_TF32="0"))
    if status != 0:
        return False, f"exit status {status}", seconds, fenced(tail(err))
    check = json.loads(out.splitlines()[-1])
    bounds = check["bounds"]
    summary = (f"loss gap {check['loss_gap']:.2g} (bound {bounds['loss_gap']:g}), "
               f"gradient gap {check['gradient_gap']:.2g} (bound {bounds['gradient_gap']:g})")
    return check["ok"], summary, seconds, ""


def bench_step(args):
    command = [PYTHON, "mora.py", "bench", "--device", "gpu", "--report", "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--steps", str(args.bench_steps)]
    status, seconds, out, err = run(command, LIMITS["bench"])
    if status != 0:
        return False, f"exit status {status}", seconds, fenced(tail(out + err))
    rows = re.findall(r"^\| (d=\d+), L=\d+ \| [^|]+\| ([\d.]+) \|", out, re.MULTILINE)
    summary = ", ".join(f"{model}: {ms} ms/step" for model, ms in rows)
    return True, summary, seconds, f"`{' '.join(command[1:])}`\n\n{out.strip()}"


def train_step(args):
    """A short run of the small model from scratch; its checkpoint is thrown away."""
    with tempfile.TemporaryDirectory() as folder:
        command = [PYTHON, "mora.py", "train", "--device", "gpu", "--data-dir", args.data_dir,
                   "--ckpt", os.path.join(folder, "gpu_check.npz"), "--size", "small",
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--max-steps", str(args.train_steps), "--eval-every", "0"]
        status, seconds, out, err = run(command, LIMITS["train"])
    shown = f"`{' '.join(command[1:])}` (a checkpoint in a temporary folder)\n\n"
    if status != 0:
        return False, f"exit status {status}", seconds, shown + fenced(tail(out + err))
    speed = re.search(r"speed: ([\d.,]+) ms/step, ([\d,]+) bytes/s", out)
    val = re.search(r"val, per record .*?: loss ([\d.]+) nats/byte, accuracy ([\d.]+), ([\d.]+) bits/byte", out)
    summary = (f"val {val.group(3)} bits/byte (per record), accuracy {val.group(2)}; " if val else "no val figures; ") + \
              (f"{speed.group(1)} ms/step, {speed.group(2)} bytes/s" if speed else "no speed figure")
    return bool(val and speed), summary, seconds, shown + fenced(out.strip())


def kernels_step(args):
    command = [PYTHON, "gpu_check.py", "--time-kernels", "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--kernel-steps", str(args.kernel_steps)]
    status, seconds, out, err = run(command, LIMITS["kernels"])
    if status != 0:
        return False, f"exit status {status}", seconds, fenced(tail(out + err))
    table, summary = out.strip().rsplit("\n", 1)
    return True, summary, seconds, table


def fenced(text):
    return f"```text\n{text}\n```" if text else ""


def time_kernels(batch_size, seq_len, steps):
    """Step 5, in this process: the small model's training steps (as `mora.py train` runs
    them), every mora.launch between two CUDA events; after one
    untimed step, which compiles.  Prints a markdown table, the costliest kernel first."""
    import numpy as np
    import mora
    xp = mora.select_backend("gpu")
    cuda = mora.cupy.cuda
    cfg = mora.Config(batch_size=batch_size, seq_len=seq_len)
    flat, params = mora.flat_parameters(mora.init_params(cfg, 0), xp)
    adam_m, adam_v = xp.zeros_like(flat), xp.zeros_like(flat)
    trainable = mora.trainable_vector(cfg, xp)
    records = np.random.default_rng(0).integers(0, mora.V, (batch_size, seq_len + 1), dtype=np.uint8)
    x, y = mora.make_batch(records, np.arange(batch_size), xp)
    launches, plain_launch = [], mora.launch

    def timed_launch(name, *args, **kwargs):
        start, end = cuda.Event(), cuda.Event()
        start.record()
        plain_launch(name, *args, **kwargs)
        end.record()
        launches.append((name, kwargs.get("width"), start, end))
    mora.launch = timed_launch  # the launchers look `launch` up in mora when they run
    step_events = []
    for step in range(steps + 1):
        if step == 1:
            launches.clear()  # the first step compiled the kernels
        start, end = cuda.Event(), cuda.Event()
        start.record()
        mora.train_step(params, flat, adam_m, adam_v, x, y, step, 1e-3, trainable=trainable)
        end.record()
        step_events.append((start, end))
    step_events[-1][1].synchronize()
    mora.launch = plain_launch

    step_ms = sum(cuda.get_elapsed_time(start, end) for start, end in step_events[1:]) / steps
    by_kernel = {}
    for name, width, start, end in launches:
        count, ms = by_kernel.get((name, width), (0, 0.0))
        by_kernel[name, width] = (count + 1, ms + cuda.get_elapsed_time(start, end))
    print(f"small model, {batch_size} x {seq_len}, {steps} steps; `{' '.join(sys.argv[1:])}`\n")
    print("| kernel | width | launches/step | ms/launch | ms/step | share of step | registers | local bytes/thread |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, width), (count, ms) in sorted(by_kernel.items(), key=lambda item: -item[1][1]):
        kernel = mora.cuda_module(width).get_function(name)
        registers, local = (getattr(kernel, a, "n/a") for a in ("num_regs", "local_size_bytes"))  # CuPy's RawKernel reports them
        print(f"| {name} | {width or ''} | {count / steps:g} | {ms / count:.4f} | {ms / steps:.3f} | "
              f"{ms / steps / step_ms:.1%} | {registers} | {local} |")
    fused_ms = sum(ms for _, ms in by_kernel.values()) / steps
    print(f"\nstep {step_ms:.2f} ms (CUDA events around train_step): fused kernels {fused_ms:.2f} ms, the rest "
          f"(cuBLAS matmuls, CuPy's own elementwise kernels and reductions) {step_ms - fused_ms:.2f} ms")


VERDICT = {True: "ok", False: "FAILED", None: "left out"}
STEPS = [("tests", tests_step), ("float32", float32_step), ("bench", bench_step), ("train", train_step),
         ("kernels", kernels_step)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="train.bin and val.bin for the training step")
    parser.add_argument("--out", default="gpu_report.md", help="the report (markdown)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--bench-steps", type=int, default=10)
    parser.add_argument("--kernel-steps", type=int, default=5)
    parser.add_argument("--skip-tests", action="store_true", help="leave out step 1")
    parser.add_argument("--time-kernels", action="store_true", help="only print step 5's table")
    args = parser.parse_args(argv)
    if args.time_kernels:
        time_kernels(args.batch_size, args.seq_len, args.kernel_steps)
        return 0

    gpu = shutil.which("nvidia-smi") and run(["nvidia-smi", "-L"], 30)[2].strip()
    results = []
    with open(args.out, "w") as report:
        report.write(f"# MORA on a GPU: {time.strftime('%Y-%m-%d %H:%M')}\n\n`python gpu_check.py {' '.join(argv or sys.argv[1:])}`"
                     f"\n\nGPU: {gpu or 'nvidia-smi not found'}\n\n")
        for number, (name, step) in enumerate(STEPS, 1):
            if name == "tests" and args.skip_tests:
                ok, summary, seconds, details = None, "--skip-tests", 0.0, ""
            else:
                print(f"{number}. {name} ...", flush=True)
                ok, summary, seconds, details = step(args)
            results.append((name, VERDICT[ok], summary, seconds))
            report.write(f"## {number}. {name}: {VERDICT[ok]} ({seconds:.0f} s)\n\n{summary}\n\n{details}\n\n")
            report.flush()
        report.write("## Summary\n\n| step | result | seconds | |\n|---|---|---|---|\n")
        report.writelines(f"| {name} | {verdict} | {seconds:.0f} | {summary} |\n" for name, verdict, summary, seconds in results)
    failed = [name for name, verdict, _, _ in results if verdict == VERDICT[False]]
    print(f"report: {args.out}" + (f" (failed: {', '.join(failed)})" if failed else " (every step ok)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
