"""PyTorch peers for MORA's benchmarks.  Needs torch, which MORA itself does not:

    pip install torch            # the CPU build is enough

    python bench_torch.py check  # the PyTorch twin's loss and gradients equal mora.py's (float64)
    python bench_torch.py speed [--batch-size 32 --seq-len 256 --steps 10]
        time of a training step (forward, backward, Adam) of MORA written in PyTorch
        eager mode with autograd, of PyTorch's fused 2 x 128 LSTM (296,960
        parameters), and of mora.py itself, back to back on the same machine
    python bench_torch.py lstm --data-dir DIR [--max-steps 300 --batch-size 32 --lr 3e-2 --beta2 0.95]
        trains the LSTM on the same records, in the same order and with the same
        schedule and clipping as `mora.py train`, and reports val bits/byte;
        --log FILE writes its steps as mora.py's CSV log, for plot_log.py

The twin is the model as a PyTorch user would write it: the memory scan a Python
loop over time, autograd for the backward.
"""
import argparse
import contextlib
import math
import os
import sys
import time

import mora  # first: it gives NumPy one BLAS thread per worker, before NumPy is imported

import numpy as np  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --help works without it; a command says what to install
    torch = F = None


def twin_forward(P, x, n_layers):
    """MORA in PyTorch.  P: name -> tensor (mora.py's names), x: (B, T) long -> logits (B, T, V)."""
    E = P["embed"]
    d, T = E.shape[1], x.shape[1]
    h = E[x]
    for i in range(n_layers):
        p = mora.block_params(P, i)
        u = F.layer_norm(h, (d,), p["ln1.g"], p["ln1.b"], mora.LN_EPS)
        v, b, q = (u @ p["w_in"] + p["b_in"]).split(d, dim=-1)
        beta = torch.sigmoid(b)
        c = torch.zeros_like(v[:, 0])
        memories, deltas = [], []
        for t in range(T):
            e_t = v[:, t] - c
            c = c + beta[:, t] * e_t
            memories.append(c)
            deltas.append(e_t)
        c, e = torch.stack(memories, 1), torch.stack(deltas, 1)
        a = v.cumsum(1) / torch.arange(1, T + 1, dtype=v.dtype)[:, None]
        m = p["mix"][0] * c + p["mix"][1] * a + p["mix"][2] * e
        h = h + (torch.sigmoid(q) * m) @ p["w_out"] + p["b_out"]
        u = F.layer_norm(h, (d,), p["ln2.g"], p["ln2.b"], mora.LN_EPS)
        h = h + F.gelu(u @ p["w_up"] + p["b_up"], approximate="tanh") @ p["w_down"] + p["b_down"]
    return F.layer_norm(h, (d,), eps=mora.LN_EPS) @ E.T


def lstm_peer(width=128, layers=2):
    """2 x 128 LSTM with the output layer tied to the embedding: 296,960 parameters."""
    return torch.nn.ModuleDict({"embed": torch.nn.Embedding(mora.V, width),
                                "lstm": torch.nn.LSTM(width, width, layers, batch_first=True)})


def lstm_forward(model, x):
    """x: (B, T) long -> logits (B, T, V), through the embedding's own weights."""
    h, _ = model["lstm"](model["embed"](x))
    return h @ model["embed"].weight.T


def check(args):
    """Hand-written gradients (mora.py) against autograd (the twin), float64."""
    cfg = mora.Config(d_model=16, n_layers=3)
    params = mora.init_params(cfg, 0, dtype=np.float64)
    rng = np.random.default_rng(0)
    params = {k: p + 0.1 * rng.standard_normal(p.shape) for k, p in params.items()}
    x, y = rng.integers(0, 256, (4, 48)), rng.integers(0, 256, (4, 48))
    loss, grads = mora.loss_and_grads(params, x, y)
    P = {k: torch.tensor(p, requires_grad=True) for k, p in params.items()}
    logits = twin_forward(P, torch.tensor(x), cfg.n_layers)
    torch_loss = F.cross_entropy(logits.reshape(-1, mora.V), torch.tensor(y).reshape(-1))
    torch_loss.backward()
    worst = max(np.abs(grads[k] - P[k].grad.numpy()).max() / (np.abs(grads[k]).max() + 1e-30) for k in params)
    print(f"loss: mora.py {loss:.12f}, PyTorch {torch_loss.item():.12f}; worst relative gradient gap {worst:.2e}")
    return 0 if abs(loss - torch_loss.item()) < 1e-10 and worst < 1e-8 else 1


def time_steps(step, n):
    step()  # warm-up
    seconds = []
    for _ in range(n):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return 1000 * float(np.median(seconds))


def speed(args):
    B, T = args.batch_size, args.seq_len
    cfg = mora.Config(batch_size=B, seq_len=T)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (B, T)), rng.integers(0, 256, (B, T))
    tx, ty = torch.tensor(x), torch.tensor(y)
    print(f"batch {B} x {T}, torch {torch.__version__} with {torch.get_num_threads()} threads")

    P = {k: torch.tensor(p, requires_grad=True) for k, p in mora.init_params(cfg, 0).items()}
    optimizer = torch.optim.Adam(P.values(), lr=1e-3)

    def twin_step():
        optimizer.zero_grad()
        F.cross_entropy(twin_forward(P, tx, cfg.n_layers).reshape(-1, mora.V), ty.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(P.values(), 1.0)
        optimizer.step()

    peer = lstm_peer()
    lstm_optimizer = torch.optim.Adam(peer.parameters(), lr=1e-3)

    def lstm_step():
        lstm_optimizer.zero_grad()
        F.cross_entropy(lstm_forward(peer, tx).reshape(-1, mora.V), ty.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        lstm_optimizer.step()

    mora.keep_freed_memory()
    flat, params = mora.flat_parameters(mora.init_params(cfg, 0))
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    slices = mora.cpu_slices(np, args.threads)

    def mora_step():
        mora.train_step(params, flat, m, v, x.astype(np.int32), y.astype(np.int32), 0, 1e-3, gradient=slices.gradient)

    n_lstm = sum(p.numel() for p in peer.parameters())
    for name, step, count in [("MORA, PyTorch eager twin", twin_step, mora.count_params(cfg)),
                              ("LSTM 2 x 128, PyTorch fused", lstm_step, n_lstm),
                              ("MORA, mora.py (NumPy)", mora_step, mora.count_params(cfg))]:
        ms = time_steps(step, args.steps)
        print(f"{name:<28} {count:>9,} params  {ms:8.1f} ms/step  {B * T / ms * 1000:>10,.0f} bytes/s")
    return 0


def lstm(args):
    """Train the LSTM peer on mora.py's data pipeline and schedule."""
    torch.manual_seed(args.seed)
    T, B = args.seq_len, args.batch_size
    train_records = mora.open_records(os.path.join(args.data_dir, "train.bin"), T)
    val_records = mora.open_records(os.path.join(args.data_dir, "val.bin"), T)[:args.eval_bytes // (T + 1)]
    steps_per_epoch = len(train_records) // B
    warmup = args.warmup if args.warmup is not None else mora.default_warmup(args.max_steps)
    model = lstm_peer()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, args.beta2))
    order_epoch, seconds = None, []
    if args.log:
        mora.check_outputs([args.log], flag="--log")
    with open(args.log, "w", newline="", buffering=1) if args.log else contextlib.nullcontext() as log:  # a row a line
        if log:
            log.write(mora.LOG_HEADER)
        for step in range(args.max_steps):
            started = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = mora.epoch_order(len(train_records), args.seed, epoch), epoch
            x, y = (torch.tensor(a, dtype=torch.long) for a in mora.make_batch(train_records, order[k * B:(k + 1) * B], np))
            lr = mora.learning_rate(step, args.max_steps, args.lr, warmup, args.final_lr_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            loss = F.cross_entropy(lstm_forward(model, x).reshape(-1, mora.V), y.reshape(-1))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            seconds.append(time.perf_counter() - started)
            if log:
                log.write(mora.log_line({"step": step + 1, "bytes": (step + 1) * B * T, "lr": f"{lr:.6g}",
                                         "loss": f"{loss.item():.5f}", "bpb": f"{loss.item() / math.log(2):.5f}",
                                         "grad_norm": f"{grad_norm.item():.4f}", "ms_per_step": f"{1000 * seconds[-1]:.2f}"}))
            if (step + 1) % 50 == 0:
                print(f"step {step + 1}: train bits/byte {loss.item() / math.log(2):.4f}")
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(val_records), B):
                x, y = (torch.tensor(a, dtype=torch.long) for a in mora.make_batch(val_records, np.arange(start, min(len(val_records), start + B)), np))
                total += F.cross_entropy(lstm_forward(model, x).reshape(-1, mora.V), y.reshape(-1)).item() * len(x)
        val_loss = total / len(val_records)
        bpb = val_loss / math.log(2)
        if log:
            log.write(mora.log_line({"step": args.max_steps, "bytes": args.max_steps * B * T, "val_loss": f"{val_loss:.5f}",
                                     "val_bpb": f"{bpb:.5f}"}))
    print(f"LSTM lr {args.lr:g}, warmup {warmup}, beta2 {args.beta2:g}: val bits/byte {bpb:.4f} on {len(val_records) * (T + 1):,} bytes, "
          f"{1000 * np.median(seconds[1:]):.0f} ms/step")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check")
    p = commands.add_parser("speed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, help="mora.py's worker threads (default: every core)")
    p = commands.add_parser("lstm")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-2, help="default: the best of the LSTM sweep in docs/results.md")
    p.add_argument("--warmup", type=int)
    p.add_argument("--final-lr-fraction", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-bytes", type=int, default=65536)
    p.add_argument("--log", help="also write a row per step to this CSV, in mora.py's log format (for plot_log.py)")
    args = parser.parse_args(argv)
    if torch is None:
        print("error: bench_torch.py needs PyTorch, which MORA itself does not: pip install torch "
              "(the CPU build is enough)", file=sys.stderr)
        return 1
    torch.set_num_threads(os.cpu_count())  # PyTorch on every core, whatever mora set for BLAS
    try:
        return {"check": check, "speed": speed, "lstm": lstm}[args.command](args)
    except mora.UserError as exc:  # no data at --data-dir, say: mora's own one line
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
