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
    python bench_torch.py gpt --data-dir DIR [--max-steps 2000 --batch-size 12 --seq-len 64 --log FILE]
        nanoGPT's GPT at the shape of its CPU run on tiny Shakespeare (4 layers, 4 heads,
        width 128, context 64), trained as nanoGPT trains it (random windows, AdamW with
        weight decay 0.1 on the matrices, 100 warmup steps, cosine to 1e-4); val bits/byte
        over all of val in windows of seq_len + 1 bytes, every position predicted

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


class GPT(torch.nn.Module if torch else object):
    """nanoGPT's model.py with bias=False: pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP,
    learned positions, the output layer tied to the embedding.  4 x 128 at V = 256: 828,544 parameters."""

    def __init__(self, width=128, layers=4, heads=4, context=64):
        super().__init__()
        nn, self.heads = torch.nn, heads
        self.embed, self.position = nn.Embedding(mora.V, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(width, bias=False), "qkv": nn.Linear(width, 3 * width, bias=False),
            "proj": nn.Linear(width, width, bias=False), "ln2": nn.LayerNorm(width, bias=False),
            "up": nn.Linear(width, 4 * width, bias=False), "down": nn.Linear(4 * width, width, bias=False)})
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        for name, p in self.named_parameters():  # nanoGPT's start: N(0, 0.02), residual outputs / sqrt(2L)
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                torch.nn.init.normal_(p, 0.0, std)

    def forward(self, x):
        """x: (B, T) long -> logits (B, T, V)."""
        B, T = x.shape
        h = self.embed(x) + self.position(torch.arange(T))                        # (B, T, d)
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](h)).split(h.shape[-1], dim=-1)
            q, k, v = (a.view(B, T, self.heads, -1).transpose(1, 2) for a in (q, k, v))  # (B, heads, T, d / heads)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + b["proj"](attended.transpose(1, 2).reshape(B, T, -1))
            h = h + b["down"](F.gelu(b["up"](b["ln2"](h))))
        return self.ln_f(h) @ self.embed.weight.T


def nanogpt_learning_rate(step, peak, warmup=100, decay_steps=2000, floor=1e-4):
    """nanoGPT's get_lr: linear warmup, then cosine from peak to floor over decay_steps, then floor."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / (decay_steps - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def val_bits_per_byte(forward, records, batch_size):
    """Mean val loss over whole records (each from a fresh start), in bits/byte."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            rows = np.arange(start, min(len(records), start + batch_size))
            x, y = (torch.tensor(a, dtype=torch.long) for a in mora.make_batch(records, rows, np))
            total += F.cross_entropy(forward(x).reshape(-1, mora.V), y.reshape(-1)).item() * len(x)
    return total / len(records) / math.log(2)


@contextlib.contextmanager
def peer_log(path):
    """mora.py's CSV log at `path` (checked before any work), a row a line, for plot_log.py; None without --log."""
    if not path:
        yield None
        return
    mora.check_outputs([path], flag="--log")
    with open(path, "w", newline="", buffering=1) as log:
        log.write(mora.LOG_HEADER)
        yield log


def train_row(step, batch_bytes, lr, loss, grad_norm, seconds):
    """A training step as a row of mora.py's log."""
    return {"step": step, "bytes": step * batch_bytes, "lr": f"{lr:.6g}", "loss": f"{loss.item():.5f}",
            "bpb": f"{loss.item() / math.log(2):.5f}", "grad_norm": f"{grad_norm.item():.4f}",
            "ms_per_step": f"{1000 * seconds:.2f}"}


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
    with peer_log(args.log) as log:
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
                log.write(mora.log_line(train_row(step + 1, B * T, lr, loss, grad_norm, seconds[-1])))
            if (step + 1) % 50 == 0:
                print(f"step {step + 1}: train bits/byte {loss.item() / math.log(2):.4f}")
        bpb = val_bits_per_byte(lambda x: lstm_forward(model, x), val_records, B)
        if log:
            log.write(mora.log_line({"step": args.max_steps, "bytes": args.max_steps * B * T,
                                     "val_loss": f"{bpb * math.log(2):.5f}", "val_bpb": f"{bpb:.5f}"}))
    print(f"LSTM lr {args.lr:g}, warmup {warmup}, beta2 {args.beta2:g}: val bits/byte {bpb:.4f} "
          f"on {len(val_records) * (T + 1):,} bytes, {1000 * np.median(seconds[1:]):.0f} ms/step")
    return 0


def gpt(args):
    """Train the GPT peer as nanoGPT trains it: random windows of the train text, nanoGPT's schedule."""
    torch.manual_seed(args.seed)
    T, B = args.seq_len, args.batch_size
    text = torch.from_numpy(np.array(mora.open_bytes(os.path.join(args.data_dir, "train.bin")), dtype=np.int64))
    val_records = mora.open_records(os.path.join(args.data_dir, "val.bin"), T)  # all of val, T predictions a window
    model = GPT(context=T)
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # nanoGPT decays matrices, not gains
    gains = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                                   {"params": gains, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    windows = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    train_seconds, best = 0.0, math.inf
    with peer_log(args.log) as log:
        for step in range(args.max_steps):
            started = time.perf_counter()
            starts = torch.randint(len(text) - T, (B,), generator=windows)
            x = torch.stack([text[i:i + T] for i in starts])
            y = torch.stack([text[i + 1:i + 1 + T] for i in starts])
            lr = nanogpt_learning_rate(step, args.lr, decay_steps=args.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x).reshape(-1, mora.V), y.reshape(-1))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            train_seconds += time.perf_counter() - started
            row = train_row(step + 1, B * T, lr, loss, grad_norm, time.perf_counter() - started)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
                bpb = val_bits_per_byte(model, val_records, 64)
                best = min(best, bpb)
                row.update(val_loss=f"{bpb * math.log(2):.5f}", val_bpb=f"{bpb:.5f}")
                print(f"step {step + 1}: train {loss.item() / math.log(2):.4f}, val {bpb:.4f} bits/byte, "
                      f"{train_seconds:.0f} s of training")
            if log:
                log.write(mora.log_line(row))
    print(f"GPT {n_params:,} params, {args.max_steps:,} steps of {B} x {T}: val bits/byte {bpb:.4f} at the end, "
          f"{best:.4f} at best, on {len(val_records) * T:,} bytes predicted; {train_seconds:.0f} s of training steps")
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
    p = commands.add_parser("gpt")
    p.add_argument("--data-dir", default="data/shakespeare")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=250, help="all of val every N steps and at the end (default 250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", help="also write a row per step to this CSV, in mora.py's log format (for plot_log.py)")
    args = parser.parse_args(argv)
    if torch is None:
        print("error: bench_torch.py needs PyTorch, which MORA itself does not: pip install torch "
              "(the CPU build is enough)", file=sys.stderr)
        return 1
    torch.set_num_threads(os.cpu_count())  # PyTorch on every core, whatever mora set for BLAS
    try:
        return {"check": check, "speed": speed, "lstm": lstm, "gpt": gpt}[args.command](args)
    except mora.UserError as exc:  # no data at --data-dir, say: mora's own one line
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
