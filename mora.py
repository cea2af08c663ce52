"""MORA: a byte-level language model with a hand-written backward pass, in NumPy/CuPy.

MORA replaces attention with *cumulative memory + delta update* blocks: each
channel keeps a memory c that moves towards the input at a learned, input-dependent
write rate, a running mean of everything seen so far, and the delta e (what the
memory did not expect).  A block is a recurrence, so generation costs O(1) per byte
with no context limit.  The model is 284,184 parameters at width 64 with 8 blocks.

This file is the whole model: forward and backward of every layer, Adam, batches
from a byte file, the training loop, sampling and evaluation, in that order.  It is
not a framework and has no autograd; the backward pass is the point.  After the
lesson comes a marked part that makes it a program to train with for hours
(checkpoints, resume, signals, the log, CPU threads, the command line), and last the
CUDA kernels that make the GPU fast, after the maths they speed up.

    python prepare_data.py            # TinyStories -> data/train.bin, data/val.bin
    python mora.py train              # one epoch of the small model
    python mora.py sample --prompt "Once upon a time"

Shapes used in the comments: B batch, T time, d width, L blocks, V = 256 bytes,
N = T * B positions.  Inside the model arrays are time-major, (T, B, ...), so that a
scan step reads one block of memory: v_t is B rows of d, 3d apart, in the t-th (B, 3d)
block of [v | z | q], and beta_t, c_t, e_t are contiguous (B, d); batch-major, its rows lie T apart.
"""
import argparse
import codecs
import contextlib
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import shlex
import signal
import stat
import sys
import time
import zipfile
import zlib
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace

# On the CPU, training runs its own worker threads over slices of the batch (see
# "CPU threads"), so each may use only one BLAS thread: BLAS's own threads would
# fight them for the cores.  This must be set before NumPy is imported; a value the
# user set in the environment is kept.
BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _variable in BLAS_VARIABLES:
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402  (after the BLAS settings above)
from tqdm import tqdm  # noqa: E402

V = 256  # the vocabulary: one token per byte value
LN_EPS = 1e-5
CHECKPOINT_FORMAT = "mora-checkpoint-v1"


class UserError(Exception):
    """A mistake in the input (flags, files) that the user can fix; printed as one line."""


# ----------------------------------------------------------------------------
# Array backend: xp is numpy or cupy, chosen by the arrays themselves, so one code
# path serves both; `gpu_problem` (in the appendix) sets `cupy` once a GPU works.

cupy = None  # the CuPy module, once gpu_problem has found a GPU that works


def array_module(a):
    """numpy or cupy, whichever holds `a`."""
    return cupy.get_array_module(a) if cupy is not None else np


def to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ----------------------------------------------------------------------------
# Configuration: the model (Config) and the training run (TrainSettings).  Every
# default lives here; the command line's help text is made from these.


@dataclass
class Config:
    d_model: int = 64  # width d
    n_layers: int = 8  # blocks L
    seq_len: int = 256  # T: bytes of context per training record (records are T+1 bytes)
    batch_size: int = 256  # B
    ablate: str = "none"  # a part of the block switched off in training, see ABLATIONS


SIZES = {"small": dict(d_model=64, n_layers=8), "large": dict(d_model=128, n_layers=8)}


# Ablations hold a slice of the parameters at zero (their gradient is dropped in
# training), so the model code stays the same:  name -> (parameter, index).
ABLATIONS = {
    "none": None,
    "no-memory": ("mix", 0),  # the readout leaves out c, the delta-update memory
    "no-mean": ("mix", 1),  # ... leaves out a, the cumulative mean
    "no-delta": ("mix", 2),  # ... leaves out e, the delta
    "fixed-rate": ("w_in", (slice(None), slice(1, 2))),  # beta = sigmoid(bias): a learned rate per channel, not per input
}


@dataclass
class TrainSettings:
    """How a run trains; a checkpoint keeps its run's settings and --resume goes on with
    them.  beta2 0.95 and a long warmup are the CPU budget's best (docs/results.md, Recipe)."""
    lr: float = 2e-2  # peak learning rate
    warmup: int = None  # warmup steps; None: a third of the run, at most WARMUP_CAP
    final_lr_fraction: float = 0.1  # the cosine decay ends at this fraction of lr
    clip: float = 1.0  # global gradient-norm clip
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    seed: int = 0  # initialisation and data order
    epochs: int = 1
    max_steps: int = None  # None: whole epochs
    mix_init: tuple = (0.0, 0.0, 1.0)  # initial mix of memory, running mean and delta in every block
    slices: int = None  # the CPU's batch slices (see "CPU threads"); None: one per thread when the run starts
    # How the run reports and saves itself (--resume may change these):
    eval_every: int = 500  # steps between evaluations on the start of val (0: never)
    eval_bytes: int = 1 << 20  # bytes of val those evaluations read
    ckpt_every: int = 500  # steps between checkpoints
    final_eval: bool = True  # evaluate on all of val when the run ends

    def __post_init__(self):
        self.mix_init = tuple(self.mix_init)  # a checkpoint's JSON gives a list


WARMUP_CAP = 1000


def default_warmup(total_steps):
    """A third of the run, at most WARMUP_CAP steps (measured at 300 steps: docs/results.md, Recipe)."""
    return max(1, min(WARMUP_CAP, total_steps // 3))


def block_shapes(d):
    """Name -> shape of one block's parameters (8 d^2 + 11 d + 3 numbers)."""
    return {
        "ln1.g": (d,), "ln1.b": (d,),
        "w_in": (d, 3 * d), "b_in": (3 * d,),  # columns: v | z | q (z: the write rate's pre-activation)
        "mix": (3,),
        "w_out": (d, d), "b_out": (d,),
        "ln2.g": (d,), "ln2.b": (d,),
        "w_up": (d, 2 * d), "b_up": (2 * d,),
        "w_down": (2 * d, d), "b_down": (d,),
    }


def param_shapes(cfg):
    """Every parameter's name and shape, in a fixed order (the checkpoint's and Adam's)."""
    shapes = {"embed": (V, cfg.d_model)}
    for i in range(cfg.n_layers):
        for name, shape in block_shapes(cfg.d_model).items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def count_params(cfg):
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def trainable_mask(cfg):
    """Name -> float32 array, 0 where cfg.ablate holds a parameter at zero, else 1."""
    masks = {name: np.ones(shape, np.float32) for name, shape in param_shapes(cfg).items()}
    if ABLATIONS[cfg.ablate] is not None:
        kind, index = ABLATIONS[cfg.ablate]
        for i in range(cfg.n_layers):
            mask = masks[f"blocks.{i}.{kind}"]
            if kind == "w_in":  # index picks the middle third of the columns: the z in [v, z, q]
                mask = mask.reshape(cfg.d_model, 3, cfg.d_model)
            mask[index] = 0.0
    return masks


def trainable_vector(cfg, xp):
    """trainable_mask as one flat vector on xp, in the parameters' order; None when
    every parameter learns (no ablation), so that a step spends nothing on it."""
    if ABLATIONS[cfg.ablate] is None:
        return None
    return xp.asarray(flatten(trainable_mask(cfg), list(param_shapes(cfg))))


# ----------------------------------------------------------------------------
# Layers: each forward returns (out, cache); its backward, right below, takes
# (dout, cache) and returns the gradients.  Shapes: any leading axes (...), last
# axis as stated; the leading axes are the positions (T, B) of the model, N = T * B.
#
# Every body is written as its equation, and defines what the appendix's GPU kernels
# compute: each launcher, marked `@fuses(plain_function, ...)`, takes that function's
# place once `gpu_problem` finds a GPU; on the CPU these functions run as they stand.
#
# A cache holds only what its backward reads, under the maths' names, each array once
# (one array needs no name: an embedding's cache is x, a sigmoid's s, the mean's divisors):
LayerNormCache = namedtuple("LayerNormCache", "xhat rstd gain")  # xhat, 1/std: dx with no pass over x; gain: dxhat = dy gain
LinearCache = namedtuple("LinearCache", "x W")  # dW = x^T dy, dx = dy W^T
GeluCache = namedtuple("GeluCache", "x t")  # the derivative reads x and t = tanh(k (x + a x^3))
ScanCache = namedtuple("ScanCache", "beta e")  # beta: dc_t/dc_{t-1} = 1 - beta_t and dc_t/dv_t; e: dc_t/dbeta_t
MixCache = namedtuple("MixCache", "mix c a e")  # dc, da, de scale dm by mix; dmix takes dot products with c, a, e
MixerCache = namedtuple("MixerCache", "beta e counts mix c a m gate")  # the scan's, mean's and mix's caches; m, gate: dq, dm
CrossEntropyCache = namedtuple("CrossEntropyCache", "probs y")  # dlogits = softmax - onehot(y)


def embedding_forward(E, x):
    """h = E[x].  E: (V, d), x: (...) ints -> (..., d)."""
    return E[x], x


def embedding_backward(dh, x):
    """dE[v] = sum of dh over the positions where x == v, as onehot(x)^T @ dh:
    (V, N) @ (N, d), one matmul instead of a scatter-add."""
    xp = array_module(dh)
    flat_x = x.reshape(-1)  # (N,)
    onehot = (flat_x[:, None] == xp.arange(V)[None, :]).astype(dh.dtype)  # (N, V)
    return onehot.T @ dh.reshape(len(flat_x), -1)  # (V, d)


def layernorm_forward(x, gain=None, bias=None):
    """y = gain * (x - mean) / sqrt(var + eps) + bias over the last axis; without gain
    and bias, plain normalisation (gain None in the cache)."""
    xp = array_module(x)
    centred = x - x.mean(-1, keepdims=True)  # (..., d)
    rstd = 1.0 / xp.sqrt((centred * centred).mean(-1, keepdims=True) + LN_EPS)  # (..., 1)
    xhat = centred * rstd  # (..., d)
    if gain is None:
        return xhat, LayerNormCache(xhat, rstd, None)
    return xhat * gain + bias, LayerNormCache(xhat, rstd, gain)


def layernorm_backward(dy, cache):
    """With dxhat = dy * gain (the gradient reaching the normalised x):
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))    (means over the last axis)
        dgain = sum of dy * xhat,  dbias = sum of dy                     (sums over the positions)
    The two means are the gradient flowing back through the mean and the variance
    (llm.c's doc/layernorm derives it).  Without a gain: dx only, and None, None."""
    xhat, rstd = cache.xhat, cache.rstd
    dxhat = dy if cache.gain is None else dy * cache.gain  # (..., d)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    if cache.gain is None:
        return dx, None, None
    d = dy.shape[-1]
    return dx, (dy * xhat).reshape(-1, d).sum(0), dy.reshape(-1, d).sum(0)


def linear_forward(x, W, b):
    """y = x @ W + b.  x: (..., n_in), W: (n_in, n_out) -> (..., n_out).
    The leading axes are flattened so that BLAS sees one (N, n_in) @ (n_in, n_out)."""
    y = x.reshape(-1, W.shape[0]) @ W + b  # (N, n_out)
    return y.reshape(*x.shape[:-1], W.shape[1]), LinearCache(x, W)


def linear_backward(dy, cache):
    """dx = dy @ W^T,  dW = x^T @ dy,  db = sum of dy (sums over the positions)."""
    n_in, n_out = cache.W.shape
    dy2 = dy.reshape(-1, n_out)  # (N, n_out)
    dx = (dy2 @ cache.W.T).reshape(*dy.shape[:-1], n_in)  # (..., n_in)
    dW = cache.x.reshape(-1, n_in).T @ dy2  # (n_in, n_out)
    return dx, dW, dy2.sum(0)


GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_forward(x):
    """gelu(x) = 0.5 x (1 + t),  t = tanh(k (x + a x^3)),  k = sqrt(2/pi), a = 0.044715
    (Hendrycks & Gimpel, 2016, arXiv:1606.08415, the tanh form).  The cache: x and t."""
    xp = array_module(x)
    t = xp.tanh(GELU_K * (x + GELU_A * x * x * x))  # (..., n); x * x * x, not x ** 3: NumPy's general power is slow
    return 0.5 * x * (1.0 + t), GeluCache(x, t)


def gelu_backward(dy, cache):
    """d gelu/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2)   (tanh' = 1 - tanh^2)."""
    x, t = cache.x, cache.t
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_A * x * x))


def sigmoid_forward(x):
    """s = 1 / (1 + exp(-x)), written as (1 + tanh(x / 2)) / 2, the same function,
    which cannot overflow for large negative x.  The cache is s itself."""
    xp = array_module(x)
    s = 0.5 + 0.5 * xp.tanh(0.5 * x)  # (..., n)
    return s, s


def sigmoid_backward(ds, s):
    """ds/dx = s (1 - s)."""
    return ds * s * (1.0 - s)


def memory_scan_forward(v, beta, c_init):
    """The delta-update memory, per channel, step by step:
        e_t = v_t - c_{t-1}           the delta: what the memory did not expect
        c_t = c_{t-1} + beta_t e_t    the memory moves towards v_t at rate beta_t
    v, beta: (T, B, d); c_init: (B, d), the memory before t = 0 (zeros in training,
    the carried state in generation).  Returns c and e, (T, B, d) each, and the
    cache (beta, e).  Each step is O(B d): the loop over time is the recurrence."""
    xp = array_module(v)
    c, e = xp.empty_like(v), xp.empty_like(v)  # (T, B, d) each
    c_prev = c_init  # (B, d)
    for t in range(len(v)):
        e[t] = v[t] - c_prev
        c[t] = c_prev + beta[t] * e[t]
        c_prev = c[t]
    return c, e, ScanCache(beta, e)


def memory_scan_backward(dc, de, cache):
    """Reverse-time loop carrying the gradient that reaches c_t from later steps
    (like min-char-rnn's dhnext).  dc, de (T, B, d): the direct gradients, through m_t
    alone; dc_total_t: the whole dL/dc_t.  The partials are those of the update written
    c_t = (1 - beta_t) c_{t-1} + beta_t v_t: 1 - beta_t is the total dc_t/dc_{t-1}, through e_t too:
        dc_total_{t-1} = dc_{t-1} + (1 - beta_t) dc_total_t - de_t   (de_t/dc_{t-1} = -1)
        dL/dv_t        = beta_t dc_total_t + de_t                   (dc_t/dv_t = beta_t, de_t/dv_t = 1)
        dL/dbeta_t     = dc_total_t e_t                             (dc_t/dbeta_t = e_t)
    Returns dv, dbeta (T, B, d).  docs/memory_backward.md derives it."""
    beta, e = cache.beta, cache.e
    dc_total = dc.copy()  # (T, B, d)
    for t in range(len(dc) - 1, 0, -1):
        dc_total[t - 1] += (1.0 - beta[t]) * dc_total[t] - de[t]
    return beta * dc_total + de, dc_total * e


def cumulative_mean_forward(v, sum_init, count_init):
    """a_t = (sum_init + v_0 + ... + v_t) / k_t,  k_t = count_init + t + 1: a running mean
    with no forgetting.  v: (T, B, d); sum_init (B, d) and count_init (an int) carry
    earlier bytes (zeros in training).  Returns a (T, B, d), the running sum after the
    last step (B, d), and the cache: the divisors k (T, 1, 1)."""
    xp = array_module(v)
    total = xp.empty_like(v)  # (T, B, d) running sums
    running = sum_init  # (B, d)
    for t in range(len(v)):  # a loop over time: NumPy's cumsum along the first axis is several times slower
        total[t] = running = running + v[t]
    counts = (count_init + xp.arange(1, len(v) + 1, dtype=v.dtype))[:, None, None]  # (T, 1, 1)
    return total / counts, total[-1], counts


def cumulative_mean_backward(da, counts):
    """dL/dv_s = sum over t >= s of da_t / k_t: a running sum taken backwards in time."""
    dv = da / counts  # (T, B, d)
    for t in range(len(dv) - 2, -1, -1):
        dv[t] += dv[t + 1]
    return dv


def mix_forward(mix, c, a, e):
    """m = mix[0] c + mix[1] a + mix[2] e.  mix: (3,); c, a, e: (T, B, d)."""
    return mix[0] * c + mix[1] * a + mix[2] * e, MixCache(mix, c, a, e)


def mix_backward(dm, cache):
    """dmix[k] = sum of dm * (c, a, e)[k] (dot products);  dc = mix[0] dm, da = mix[1] dm, de = mix[2] dm."""
    xp = array_module(dm)
    mix = cache.mix
    dmix = xp.stack([xp.vdot(dm, cache.c), xp.vdot(dm, cache.a), xp.vdot(dm, cache.e)])  # (3,)
    return dmix, mix[0] * dm, mix[1] * dm, mix[2] * dm


def mixer_forward(vzq, mix, state):
    """The mixer between its two linear layers, composed of the layers above:
        beta = sigmoid(z);  c, e = memory scan of v at rates beta;  a = running mean of v
        gated = sigmoid(q) * (mix[0] c + mix[1] a + mix[2] e)
    vzq: (T, B, 3d) = [v | z | q]; state: (c, running sum, count) before t = 0.
    Returns gated (T, B, d), the cache, and the state after the last step."""
    d = vzq.shape[-1] // 3
    c_init, sum_init, count_init = state
    v, z, q = vzq[..., :d], vzq[..., d:2 * d], vzq[..., 2 * d:]  # (T, B, d) each
    beta, _ = sigmoid_forward(z)  # (T, B, d) write rate
    c, e, _ = memory_scan_forward(v, beta, c_init)  # (T, B, d) memory, delta
    a, sum_after, counts = cumulative_mean_forward(v, sum_init, count_init)  # (T, B, d)
    m, _ = mix_forward(mix, c, a, e)  # (T, B, d)
    gate, _ = sigmoid_forward(q)  # (T, B, d)
    cache = MixerCache(beta, e, counts, mix, c, a, m, gate)  # the layers' caches, each array once
    return gate * m, cache, (c[-1], sum_after, count_init + len(vzq))


def mixer_backward(dgated, cache):
    """The mixer's forward read in reverse.  dgated: (T, B, d) -> dvzq (T, B, 3d) =
    [dv | dz | dq], dmix (3,)."""
    xp = array_module(dgated)
    # gated = gate * m,  gate = sigmoid(q)
    dq = sigmoid_backward(dgated * cache.m, cache.gate)
    dm = dgated * cache.gate
    # m = mix[0] c + mix[1] a + mix[2] e
    dmix, dc, da, de = mix_backward(dm, MixCache(cache.mix, cache.c, cache.a, cache.e))
    # c, e = delta-update memory of v at rates beta;  a = running mean of v: v reaches both
    dv_scan, dbeta = memory_scan_backward(dc, de, ScanCache(cache.beta, cache.e))
    dv = dv_scan + cumulative_mean_backward(da, cache.counts)
    # beta = sigmoid(z)
    dz = sigmoid_backward(dbeta, cache.beta)
    return xp.concatenate([dv, dz, dq], axis=-1), dmix


def cross_entropy_forward(logits, y):
    """Per position, -log softmax(logits)[y] in nats.  logits: (N, V), y: (N,) -> (N,).
    Also returns whether y was the most likely byte (N,) (ties count as right), and
    the cache for the backward: (probs, y)."""
    xp = array_module(logits)
    shifted = logits - logits.max(-1, keepdims=True)  # (N, V) the max subtracted: exp cannot overflow
    exp = xp.exp(shifted)  # (N, V)
    sum_exp = exp.sum(-1)  # (N,)
    picked = shifted[xp.arange(len(y)), y]  # (N,) the target's logit minus the max: 0 when it is the max
    return xp.log(sum_exp) - picked, picked == 0, CrossEntropyCache(exp / sum_exp[:, None], y)


def cross_entropy_backward(dlosses, cache):
    """The fused softmax + cross-entropy backward:  dlogits = dlosses * (softmax - onehot(y)).
    For the mean loss over N positions dlosses = 1 / N.  dlosses: scalar or (N,)."""
    xp = array_module(cache.probs)
    dlogits = cache.probs.copy()  # (N, V)
    dlogits[xp.arange(len(cache.y)), cache.y] -= 1.0  # softmax - onehot(y)
    return dlogits * (dlosses if np.ndim(dlosses) == 0 else dlosses[:, None])


# ----------------------------------------------------------------------------
# The model

def init_params(cfg, seed=0, dtype=np.float32, xp=np, mix=TrainSettings.mix_init):
    """Weights N(0, 1/fan_in); w_out and w_down scaled by a further 1/sqrt(2L) so the
    residual stream grows slowly with depth; embedding N(0, 1/d); biases 0, LayerNorm
    gains 1; the write-rate pre-activation bias (middle third of b_in) spread from -4
    to 2 so the channels' rates sigmoid(z) cover time scales from ~1.1 to ~55 bytes;
    mix = (0, 0, 1): each block starts by reading out only the delta.  Drawn with
    NumPy, so a seed gives the same weights on either backend."""
    rng = np.random.default_rng(seed)
    d, L = cfg.d_model, cfg.n_layers
    params = {}
    for name, shape in param_shapes(cfg).items():
        kind = name.split(".")[-1]
        if name == "embed":
            value = rng.normal(0.0, 1.0 / math.sqrt(d), shape)
        elif kind.startswith("w_"):
            value = rng.normal(0.0, 1.0 / math.sqrt(shape[0]), shape)
            if kind in ("w_out", "w_down"):
                value /= math.sqrt(2 * L)
        elif kind == "g":
            value = np.ones(shape)
        elif kind == "mix":
            value = np.array(mix, dtype=np.float64)
        elif kind == "b_in":
            value = np.zeros(shape)
            value[d:2 * d] = np.linspace(-4.0, 2.0, d)
        else:
            value = np.zeros(shape)
        params[name] = xp.asarray(value, dtype=dtype)
    return params


def width_and_depth(params):
    """(d, L) read off the parameters themselves."""
    return params["embed"].shape[1], sum(1 for k in params if k.endswith(".mix"))


def block_params(params, i):
    """Block i's parameters under their short names ("w_in", "ln1.g", ...)."""
    prefix = f"blocks.{i}."
    return {k[len(prefix):]: p for k, p in params.items() if k.startswith(prefix)}


def initial_state(params, batch):
    """Per block: memory c (B, d), running sum (B, d), bytes seen (int); all zero.
    The blocks share one array of zeros: the layers only ever read a state."""
    xp = array_module(params["embed"])
    d, L = width_and_depth(params)
    zeros = xp.zeros((batch, d), dtype=params["embed"].dtype)
    return [(zeros, zeros, 0)] * L


# A block has three parts, and only the middle one looks across time:
#   block input:   u = LayerNorm1(h);  [v | z | q] = u @ w_in + b_in                 (each position alone)
#   mixer:         the memory scan and the running mean over t                      (across time)
#   block output:  h = h + gated @ w_out + b_out;  h = h + MLP(LayerNorm2(h))       (each position alone)
# (on the GPU, a kernel each: a block is three launches).  Their caches hold the layers'
# caches under the weights they go with, and the model's hold the blocks':
BlockInputCache = namedtuple("BlockInputCache", "ln1 w_in")
BlockOutputCache = namedtuple("BlockOutputCache", "w_out ln2 w_up gelu w_down")
BlockCache = namedtuple("BlockCache", "input mixer output")
ModelCache = namedtuple("ModelCache", "x blocks final_norm")  # x: for the embedding's gradient
LossCache = namedtuple("LossCache", "model cross_entropy")


def block_input_forward(p, h):
    """h: (T, B, d) -> vzq (T, B, 3d) = LayerNorm1(h) @ w_in + b_in, cache."""
    u, ln1_cache = layernorm_forward(h, p["ln1.g"], p["ln1.b"])  # (T, B, d)
    vzq, in_cache = linear_forward(u, p["w_in"], p["b_in"])  # (T, B, 3d)
    return vzq, BlockInputCache(ln1_cache, in_cache)


def block_input_backward(dvzq, cache):
    """dvzq: (T, B, 3d) -> the gradient reaching h through LayerNorm1 (T, B, d), and
    the grads of w_in, b_in, ln1.g, ln1.b."""
    grads = {}
    du, grads["w_in"], grads["b_in"] = linear_backward(dvzq, cache.w_in)
    dh, grads["ln1.g"], grads["ln1.b"] = layernorm_backward(du, cache.ln1)
    return dh, grads


def block_output_forward(p, h, gated):
    """The mixer's output projected onto the residual stream, then the channel MLP
    added: h, gated: (T, B, d) -> h (T, B, d), cache."""
    mixed, out_cache = linear_forward(gated, p["w_out"], p["b_out"])  # (T, B, d)
    h = h + mixed
    u2, ln2_cache = layernorm_forward(h, p["ln2.g"], p["ln2.b"])  # (T, B, d)
    pre, up_cache = linear_forward(u2, p["w_up"], p["b_up"])  # (T, B, 2d)
    act, gelu_cache = gelu_forward(pre)  # (T, B, 2d)
    out, down_cache = linear_forward(act, p["w_down"], p["b_down"])  # (T, B, d)
    return h + out, BlockOutputCache(out_cache, ln2_cache, up_cache, gelu_cache, down_cache)


def block_output_backward(dh, cache):
    """dh: (T, B, d) at the block's output -> dgated (T, B, d), dh at the input h of
    block_output_forward (T, B, d), and the grads of w_out ... b_down."""
    grads = {}
    # h = h + gelu(u2 @ w_up + b_up) @ w_down + b_down
    dact, grads["w_down"], grads["b_down"] = linear_backward(dh, cache.w_down)
    dpre = gelu_backward(dact, cache.gelu)
    du2, grads["w_up"], grads["b_up"] = linear_backward(dpre, cache.w_up)
    # u2 = LayerNorm(h): the residual branch adds to dh
    dh_norm, grads["ln2.g"], grads["ln2.b"] = layernorm_backward(du2, cache.ln2)
    dh = dh + dh_norm
    # h = h + gated @ w_out + b_out
    dgated, grads["w_out"], grads["b_out"] = linear_backward(dh, cache.w_out)
    return dgated, dh, grads


def block_forward(p, h, state):
    """One block on the residual stream h: (T, B, d).  p: the block's parameters,
    state: (c, running sum, count) before t = 0.  Returns h, cache, the state after."""
    vzq, in_cache = block_input_forward(p, h)  # (T, B, 3d)
    gated, mixer_cache, state = mixer_forward(vzq, p["mix"], state)  # (T, B, d)
    h, out_cache = block_output_forward(p, h, gated)  # (T, B, d)
    return h, BlockCache(in_cache, mixer_cache, out_cache), state


def block_backward(dh, cache):
    """The block's forward read in reverse.  dh: (T, B, d) -> dh, grads of p."""
    dgated, dh, grads = block_output_backward(dh, cache.output)
    # gated = sigmoid(q) * (mix[0] c + mix[1] a + mix[2] e)
    dvzq, grads["mix"] = mixer_backward(dgated, cache.mixer)
    dh_norm, input_grads = block_input_backward(dvzq, cache.input)
    grads.update(input_grads)
    return dh + dh_norm, grads  # h reaches the output both through LayerNorm1 and past it


def model_forward(params, x, state, keep_cache=True):
    """x: (T, B) bytes, time-major; state: per block, from `initial_state` or an
    earlier call.  Returns logits (T, B, V), the cache for `backward` (None when
    keep_cache is False: evaluation and sampling free each block's cache at once),
    and the new state.  Running it on a text in pieces, carrying the state, gives
    the same logits as on the whole text at once: this is how sampling steps one
    byte at a time."""
    E = params["embed"]
    d, L = width_and_depth(params)
    h, _ = embedding_forward(E, x)  # (T, B, d)
    block_caches, new_state = [], []
    for i in range(L):
        h, cache, block_state = block_forward(block_params(params, i), h, state[i])
        block_caches.append(cache if keep_cache else None)
        new_state.append(block_state)
    n, final_cache = layernorm_forward(h)  # (T, B, d) the final norm has no parameters
    logits = (n.reshape(-1, d) @ E.T).reshape(*x.shape, V)  # (T, B, V) output layer tied to the embedding
    cache = ModelCache(x, block_caches, final_cache) if keep_cache else None
    return logits, cache, new_state


def forward(params, x):
    """x: (B, T) bytes -> logits (B, T, V)."""
    logits, _, _ = model_forward(params, x.T, initial_state(params, x.shape[0]), keep_cache=False)
    return logits.transpose(1, 0, 2)


def forward_loss(params, x, y, keep_cache=True):
    """Cross-entropy in nats (T, B) and whether each prediction was right (T, B) for
    predicting y (B, T) from x (B, T), on the device (no host sync), and the cache for
    `backward` (None without keep_cache)."""
    logits, cache, _ = model_forward(params, x.T, initial_state(params, x.shape[0]), keep_cache)
    T, B = y.T.shape
    losses, correct, ce_cache = cross_entropy_forward(logits.reshape(-1, V), y.T.reshape(-1))
    return losses.reshape(T, B), correct.reshape(T, B), LossCache(cache, ce_cache) if keep_cache else None


def backward(params, cache):
    """Gradients of the mean loss for every parameter: the forward read in reverse."""
    E, n = params["embed"], cache.model.final_norm.xhat  # the final norm has no gain: its output n is xhat
    T, B, d = n.shape
    grads = {}
    # loss = mean over the N = T * B positions of cross-entropy(logits, y)
    dlogits = cross_entropy_backward(1.0 / (T * B), cache.cross_entropy)  # (N, V) = (softmax - onehot) / N
    # logits = n @ E^T
    dn = (dlogits @ E).reshape(T, B, d)
    dE = dlogits.T @ n.reshape(T * B, d)  # (V, d)
    # n = LayerNorm(h)
    dh, _, _ = layernorm_backward(dn, cache.model.final_norm)
    for i in reversed(range(len(cache.model.blocks))):
        dh, block_grads = block_backward(dh, cache.model.blocks[i])
        for name, grad in block_grads.items():
            grads[f"blocks.{i}.{name}"] = grad
    # h = E[x]: the tied embedding collects its second gradient
    dE += embedding_backward(dh, cache.model.x)
    grads["embed"] = dE
    return {name: grads[name] for name in params}


def loss_and_grads(params, x, y):
    """(mean loss in nats per byte as a float, grads keyed like params) for x, y: (B, T)."""
    losses, _, cache = forward_loss(params, x, y)
    return float(losses.mean()), backward(params, cache)


def gradient_check(samples=12, tolerance=1e-6, h=1e-5, seed=0):
    """`python mora.py check`, as min-char-rnn's gradCheck: the hand-written gradients against central
    differences (f(w + h) - f(w - h)) / 2h in float64: every parameter's on a tiny model (2 blocks, width 8,
    3 rows of 6 bytes, random weights and mix) at `samples` entries each, then each layer's backward for a
    random upstream G (loss sum(out * G)) at every entry.  The error, a tensor's worst |analytic - numeric|
    over its largest gradient, cannot fail on entries near zero.  A line per tensor; True if all pass."""
    rng = np.random.default_rng(seed)

    def compare(name, analytic, f, array, n):  # f(): the loss, with an entry of `array` nudged in place
        flat, entries, numeric = array.reshape(-1), rng.choice(array.size, min(n, array.size), replace=False), []
        for i in entries:
            old = flat[i]
            flat[i] = old + h
            up = f()
            flat[i] = old - h
            numeric.append((up - f()) / (2 * h))
            flat[i] = old
        got = analytic.reshape(-1)[entries]
        error = np.abs(got - numeric).max() / max(np.abs(got).max(), np.abs(numeric).max(), 1e-300)
        print(f"{name:28} {error:8.1e}  {'PASS' if error < tolerance else 'FAIL'}")
        return error < tolerance

    params = {k: p + 0.3 * rng.standard_normal(p.shape) for k, p in init_params(Config(8, 2), seed, np.float64).items()}
    x, y = rng.integers(0, V, (2, 3, 6))  # (B, T) each
    grads = loss_and_grads(params, x, y)[1]
    ok = [compare(name, grads[name], lambda: loss_and_grads(params, x, y)[0], params[name], samples) for name in params]
    u, W, b, g, c_init, sum_init = (rng.standard_normal(s) for s in [(6, 3, 8), (8, 5), 5, 8, (3, 8), (3, 8)])
    beta, logits, xb = rng.uniform(0.05, 0.95, u.shape), rng.standard_normal((6, V)), rng.integers(0, V, (6, 3))
    one = lambda backward: lambda *args: [backward(*args)]  # noqa: E731  (a backward of one gradient)
    layers = [("embedding", "E", lambda E: embedding_forward(E, xb), one(embedding_backward), [params["embed"]]),
              ("layernorm", "x gain bias", layernorm_forward, layernorm_backward, [u, 1 + g, g]),
              ("layernorm (no gain)", "x", layernorm_forward, layernorm_backward, [u]),
              ("linear", "x W b", linear_forward, linear_backward, [u, W, b]),
              ("gelu", "x", gelu_forward, one(gelu_backward), [u]), ("sigmoid", "x", sigmoid_forward, one(sigmoid_backward), [u]),
              ("memory_scan", "v beta", lambda v, beta: memory_scan_forward(v, beta, c_init), memory_scan_backward, [u, beta]),
              ("cumulative_mean", "v", lambda v: cumulative_mean_forward(v, sum_init, 5)[::2], one(cumulative_mean_backward), [u]),
              ("mix", "mix c a e", mix_forward, mix_backward, [g[:3], u, u * u, beta]),
              ("cross_entropy", "logits", lambda z: cross_entropy_forward(z, xb[:, 0])[::2], one(cross_entropy_backward), [logits])]
    for layer, names, forward, backward, inputs in layers:  # forward(*inputs) -> (outputs..., cache)
        *outs, cache = forward(*inputs)
        G = [rng.standard_normal(o.shape) for o in outs]
        f = lambda: sum(float((o * g).sum()) for o, g in zip(forward(*inputs)[:-1], G))  # noqa: E731
        ok += [compare(f"{layer}: d{name}", grad, f, a, a.size)
               for name, a, grad in zip(names.split(), inputs, backward(*G, cache)) if grad is not None]
    return all(ok)


# ----------------------------------------------------------------------------
# Optimiser: Adam (Kingma & Ba, 2015, arXiv:1412.6980, Algorithm 1) on one flat
# vector holding every parameter, so that an update is a handful of array
# operations however many tensors the model has.

def flatten(tensors, names):
    """One flat vector of the named tensors, in order."""
    xp = array_module(tensors[names[0]])
    return xp.concatenate([tensors[name].reshape(-1) for name in names])


def flat_parameters(params, xp=np):
    """The parameters copied into one flat vector on xp, and name -> view into it
    with the parameter's shape: Adam updates the vector, the model reads the views."""
    names = list(params)
    flat = xp.asarray(flatten(params, names))
    views, offset = {}, 0
    for name in names:
        size = params[name].size
        views[name] = flat[offset:offset + size].reshape(params[name].shape)
        offset += size
    return flat, views


def clip_by_global_norm(grad, max_norm):
    """Scale the flat gradient in place so its L2 norm is at most max_norm; returns
    the norm before clipping (a 0-d array)."""
    xp = array_module(grad)
    norm = xp.sqrt(xp.vdot(grad, grad))
    grad *= xp.minimum(1.0, max_norm / (norm + 1e-12))
    return norm


def adam_update(param, grad, m, v, step, lr, beta1=TrainSettings.beta1, beta2=TrainSettings.beta2,
                eps=TrainSettings.eps):
    """One Adam step, in place.  step counts from 1.
        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        param -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)"""
    xp = array_module(param)
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    param -= lr * m_hat / (xp.sqrt(v_hat) + eps)


def learning_rate(step, total_steps, peak, warmup, final_fraction):
    """Linear warmup over `warmup` steps, then cosine decay to final_fraction * peak
    at total_steps.  step counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------
# Data: a byte file cut into non-overlapping records of seq_len + 1 bytes
# (input = the first seq_len, target = the last seq_len).  An epoch is a shuffled
# pass over the records in batches, the last partial batch dropped; the order
# of epoch k is a function of (seed, k) alone, so the step number is the cursor.

def open_bytes(path):
    """The bytes of a .bin file as a uint8 array, read whole into memory (2.2 GB for all of
    TinyStories): a file changed or cut short while a run trains cannot change the run."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python prepare_data.py` first, or point --data-dir at the folder holding train.bin and val.bin")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise UserError(f"{path} is {'empty' if os.path.isfile(path) else 'not a file'}: run `python prepare_data.py` again")
    return np.fromfile(path, dtype=np.uint8)


def open_records(path, seq_len, fix="use more text or a smaller --seq-len"):
    """The records of a .bin file: a (n_records, seq_len + 1) uint8 array."""
    data = open_bytes(path)
    record = seq_len + 1
    if len(data) < record:
        raise UserError(f"{path} holds {len(data)} bytes, fewer than one record of seq_len + 1 = {record}: {fix}")
    n_records = len(data) // record
    return data[:n_records * record].reshape(n_records, record)


@functools.lru_cache(maxsize=2)
def epoch_order(n_records, seed, epoch):
    """The order of the records in epoch `epoch`: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n_records)


def batch_rows(n_records, batch_size, seed, step):
    """The records of the batch at `step` (from 0): the shuffled order of its epoch, in
    batches of batch_size, the last partial batch dropped."""
    epoch, k = divmod(step, n_records // batch_size)
    return epoch_order(n_records, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def make_batch(records, rows, xp):
    """Records (B, T+1) -> inputs x and targets y, (B, T) int32 arrays on xp."""
    batch = xp.asarray(records[np.sort(rows)].astype(np.int32))  # sorted: in file order
    return batch[:, :-1], batch[:, 1:]


# ----------------------------------------------------------------------------
# Training: a step is the gradient of one batch, clipped, and an Adam update; the
# loop takes the batches of each epoch in their shuffled order.

def batch_gradient(params, x, y):
    """Mean loss and accuracy (0-d arrays) and the flat gradient of the mean loss over
    the batch x, y: (B, T), in the order of the parameters."""
    losses, correct, cache = forward_loss(params, x, y)
    return losses.mean(), correct.mean(), flatten(backward(params, cache), list(params))


def train_step(params, flat, adam_m, adam_v, x, y, step, lr, settings=TrainSettings(), trainable=None,
               gradient=batch_gradient):
    """One step (step counts from 0): the batch's gradient, clipped, then Adam.  flat:
    the vector that `params` are views of; trainable: a flat 0/1 mask of the
    parameters that learn (None: all); gradient: batch_gradient, or the same computed
    over CPU threads (`Slices.gradient`).  Returns loss, accuracy and the gradient norm
    before clipping as 0-d arrays: on the GPU there is no host sync here."""
    loss, accuracy, grad = gradient(params, x, y)
    if trainable is not None:
        grad *= trainable  # an ablation holds these parameters at zero
    grad_norm = clip_by_global_norm(grad, settings.clip)
    adam_update(flat, grad, adam_m, adam_v, step + 1, lr, settings.beta1, settings.beta2, settings.eps)
    return loss, accuracy, grad_norm


@dataclass
class Run:
    """A training run as train_loop reads and advances it; its step is also the data cursor."""
    cfg: Config
    settings: TrainSettings
    step: int
    train_records: np.ndarray  # (n, seq_len + 1) bytes
    val_records: np.ndarray
    flat: object  # every parameter in one vector (xp array)
    params: dict  # name -> view into flat
    trainable: object  # flat 0/1 mask: 0 where an ablation holds a parameter at zero (None: no ablation)
    adam_m: object
    adam_v: object
    data_files: dict  # what it trains and validates on: "train.bin" and "val.bin" -> size and SHA-256
    saved_step: int = None  # the step of this run's checkpoint on disk (None: none saved yet)


def train_loop(run, end, report, save, slices=None):
    """The training loop from run.step to step `end`, and its cadence: each step's batch
    in its epoch's shuffled order, its learning rate and a training step; a stop when the
    loss is not finite; every eval_every steps an evaluation and a sample; every
    ckpt_every steps `save(run)`; an early stop when report.stop_requested (a signal).
    `report` (a Report, in "Running it for real") writes the log and draws the progress.
    slices: CPU threads sharing each batch (`Slices`, also there), or None."""
    cfg, s, xp = run.cfg, run.settings, array_module(run.flat)
    gradient = batch_gradient if slices is None else slices.gradient
    while run.step < end and not report.stop_requested:
        started = time.perf_counter()
        x, y = make_batch(run.train_records, batch_rows(len(run.train_records), cfg.batch_size, s.seed, run.step), xp)
        lr = learning_rate(run.step, s.max_steps, s.lr, s.warmup, s.final_lr_fraction)
        loss, accuracy, grad_norm = train_step(run.params, run.flat, run.adam_m, run.adam_v, x, y, run.step, lr, s,
                                               run.trainable, gradient)
        loss, accuracy, grad_norm = float(loss), float(accuracy), float(grad_norm)  # the one host sync
        run.step, seconds, val, text = run.step + 1, time.perf_counter() - started, None, None
        for name, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                raise FloatingPointError(f"the {name} became {value} at step {run.step}")
        if s.eval_every and run.step % s.eval_every == 0 and not (run.step == s.max_steps and s.final_eval):
            val, text = evaluate_and_sample(run, report.prompt, report.sample_length, slices)  # (the final one: all val)
        report.step(lr, loss, accuracy, grad_norm, seconds, val, text)
        if run.step % s.ckpt_every == 0:
            save(run)


def evaluate_and_sample(run, prompt, length, slices=None):
    """What a run shows every eval_every steps: loss, accuracy and bits/byte on the
    first eval_bytes of val (evaluate), and `length` bytes continuing `prompt` from a
    fixed seed (generate), so that a sample at one step compares with the next."""
    cfg, s = run.cfg, run.settings
    val = evaluate(run.params, run.val_records[:max(1, s.eval_bytes // (cfg.seq_len + 1))], EVAL_BATCH, slices,
                   progress=True)
    text = prompt + bytes(generate(run.params, prompt, length, temperature=0.8, top_k=0, seed=0)) if length else b""
    return val, text.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------
# Sampling: the prompt runs through the model once, then the recurrence steps one
# byte at a time from the carried state: O(1) work per byte, no context window.

def pick_byte(logits, temperature, top_k, rng):
    """A byte from logits (V,) NumPy: greedy at temperature 0, else softmax(logits /
    temperature) restricted to the top_k most likely bytes (0 = all).  The max is
    subtracted before dividing, so a tiny temperature gives 0 and -inf, never NaN."""
    if temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):  # -inf is the right answer for a tiny temperature
        scaled = (logits.astype(np.float64) - logits.max()) / temperature
    if 0 < top_k < V:
        scaled[scaled < np.sort(scaled)[-top_k]] = -np.inf
    probs = np.exp(scaled)
    return int(rng.choice(V, p=probs / probs.sum()))


def generate(params, prompt, length, temperature, top_k, seed):
    """Yields `length` new bytes (ints) continuing the prompt (bytes, non-empty)."""
    xp = array_module(params["embed"])
    rng = np.random.default_rng(seed)
    state = initial_state(params, 1)
    x = xp.asarray(np.frombuffer(prompt, dtype=np.uint8).astype(np.int32))[:, None]  # (T, 1)
    for _ in range(length):
        logits, _, state = model_forward(params, x, state, keep_cache=False)  # (T, 1, V)
        byte = pick_byte(to_numpy(logits[-1, 0]), temperature, top_k, rng)
        yield byte
        x = xp.asarray([[byte]], dtype=np.int32)  # (1, 1): only the new byte goes in


# ----------------------------------------------------------------------------
# Evaluation: loss, accuracy and bits/byte over a split, record by record (reading it as
# long texts, evaluate_stream, comes with the commands in "Running it for real").


def progress_bar(items, show, **kwargs):
    """items, behind a progress bar when `show` and stderr is a terminal (in a file a bar is a flood of lines)."""
    return tqdm(items, leave=False, dynamic_ncols=True, **kwargs) if show and sys.stderr.isatty() else items


# Loss by position within a record (or chunk): how fast the model uses its context.
POSITION_GROUPS = [(0, 1), (1, 4), (4, 16), (16, 64), (64, None)]


def position_report(position_loss, positions_each):
    """'bits/byte by position: 0: 3.71  1-3: ...' from per-position summed losses (T,)."""
    parts, filled = [], np.count_nonzero(positions_each)  # a text shorter than a chunk fills only its first positions
    for start, stop in POSITION_GROUPS:
        stop = filled if stop is None else min(stop, filled)
        if start < stop:
            bpb = position_loss[start:stop].sum() / (positions_each[start:stop].sum() * math.log(2))
            parts.append(f"{start}{'' if stop == start + 1 else f'-{stop - 1}'}: {bpb:.3f}")
    return "bits/byte by position: " + "  ".join(parts)


def evaluation_result(position_loss, positions_each, total_correct):
    """The report of `evaluate` and `evaluate_stream` from their per-position sums (T,)."""
    n, loss = positions_each.sum(), position_loss.sum() / positions_each.sum()
    return {"loss": loss, "accuracy": total_correct / n, "bpb": loss / math.log(2),
            "bytes": int(n), "by_position": position_report(position_loss, positions_each)}


# An evaluation batch holds EVAL_BATCH records whatever the training batch: the records
# are independent, so the batch changes only the speed.  On the CPU each thread reads its
# rows EVAL_CHUNK positions at a time with the state carried (the same logits as whole
# records): more rows then share each time step's Python, and 32 positions of them stay in
# the core's cache, where whole records would spill to memory (docs/results.md).
EVAL_BATCH, EVAL_CHUNK = 256, 32


def evaluate(params, records, batch_size, slices=None, progress=False):
    """Loss, accuracy and bits/byte over every record, in order, in batches of batch_size
    (the last may be smaller), the recurrent state zero at each record's start (the
    published protocol); forward only.  CPU slices share out each batch's rows (above)."""
    xp = array_module(params["embed"])
    n, T = len(records), records.shape[1] - 1
    chunk = T if slices is None else EVAL_CHUNK
    starts = progress_bar(range(0, n, batch_size), progress, desc="eval (records)", unit="batch")

    def sums(x, y):  # per position (T,): summed loss and right predictions over the rows of x, y (B, T)
        state, position_loss, correct = initial_state(params, len(x)), [], 0.0
        for t0 in range(0, T, chunk):
            logits, _, state = model_forward(params, x[:, t0:t0 + chunk].T, state, keep_cache=False)  # (t, B, V)
            losses, right, _ = cross_entropy_forward(logits.reshape(-1, V), y[:, t0:t0 + chunk].T.reshape(-1))
            position_loss.append(to_numpy(losses.reshape(-1, len(x)).sum(1)))  # (t,)
            correct += float(right.sum())
        return np.concatenate(position_loss).astype(np.float64), correct

    position_loss, total_correct = np.zeros(T), 0.0
    for start in starts:
        x, y = make_batch(records, np.arange(start, min(n, start + batch_size)), xp)
        parts = [sums(x, y)] if slices is None else slices.map(lambda rows: sums(x[rows], y[rows]), len(x))
        for loss, correct in parts:
            position_loss, total_correct = position_loss + loss, total_correct + correct
    return evaluation_result(position_loss, np.full(T, n), total_correct)


# ============================================================================
# Running it for real.  Everything above is the lesson; what follows makes it a program people can train with for
# hours: checkpoints, settings and resume rules, every file a run writes, signals, the log, threads, the commands.


# ----------------------------------------------------------------------------
# Checkpoints: one .npz.  Every parameter under its own name (any NumPy user can load the weights), Adam's moments
# as "adam.m" and "adam.v", and a JSON "meta": the config, the step (the data cursor), the settings, the data's hashes.


def file_problem(path, fix):
    """Why `path` cannot be read or written as one whole file, ending in `fix` (None: a regular file, or nothing yet).
    A folder, a device or a FIFO (whose read or write would hang) is never opened or replaced."""
    if not os.path.basename(path):
        return f"{shlex.quote(path)} names no file: {fix}"
    what = "is a folder" if os.path.isdir(path) else "is not a regular file (a device or a FIFO, say)"
    return f"{path} {what}: {fix}" if os.path.exists(path) and not os.path.isfile(path) else None


def check_outputs(paths, inputs=(), flag="--out"):
    """Refuse in one line, before any work, each of `paths` (the file `flag` names, then those beside it) or its .tmp
    that cannot be written whole: a regular file or nothing yet, in a writable folder, and none of `inputs`."""
    for given in map(os.fspath, paths):
        fix = f"choose another {flag}" if given == os.fspath(paths[0]) else \
            f"{flag} {paths[0]} writes a file there: move it, or choose another {flag}"
        for path in (given, os.path.realpath(given) + ".tmp"):
            real = os.path.realpath(path)
            folder = os.path.dirname(real)
            if problem := file_problem(path, fix):
                raise UserError(problem)
            if not os.path.isdir(folder):
                raise UserError(f"the folder {folder} does not exist (or is not a folder): create it, or {fix}")
            if not os.access(folder, os.W_OK):
                raise UserError(f"cannot write to {folder}: {fix}")
            if os.path.isfile(real) and not os.stat(real).st_mode & stat.S_IWUSR:
                raise UserError(f"{path} is read-only: make it writable (chmod u+w), or {fix}")
            if same := [i for i in map(os.fspath, inputs) if os.path.realpath(i) == real
                        or os.path.exists(i) and os.path.exists(real) and os.path.samefile(i, real)]:
                raise UserError(f"{path} is also an input of this command ({same[0]}): writing it destroys it; {fix}")


@contextlib.contextmanager
def written_atomically(path, mode="wb", **open_args):
    """A file opened as path.tmp and renamed to path once whole; on any failure (a full disk, Ctrl-C) it is removed."""
    path = os.path.realpath(path)  # through a symbolic link: the link stays, the file it names is replaced
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
        os.replace(tmp, path)
    finally:  # renamed, or failed (the open itself, say: its error goes on, not ours)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_checkpoint(path, params, meta, adam_m=None, adam_v=None):
    moments = {} if adam_m is None else {"adam.m": to_numpy(adam_m), "adam.v": to_numpy(adam_v)}
    with written_atomically(path) as f:
        np.savez(f, **{name: to_numpy(p) for name, p in params.items()}, **moments,
                 meta=np.array(json.dumps(dict(meta, format=CHECKPOINT_FORMAT))))


def load_checkpoint(path, adam=False):
    """-> (Config, float32 params, meta, Adam's {"adam.m", "adam.v"} if `adam` (to resume) else {}): a checkpoint
    whole, or a UserError naming it and what is wrong.  Every command reads one here, only the members it uses."""
    problem = file_problem(path, "--ckpt names the checkpoint file, e.g. checkpoints/mora.npz")
    if problem or not os.path.exists(path):
        raise UserError(problem or f"no checkpoint at {path}: train one with `python mora.py train`, or pass --ckpt PATH")
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            return read_checkpoint(archive, path, adam)
    except UserError:
        raise
    except PermissionError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}): check that it is yours to read") from exc
    except Exception as exc:  # zipfile, zlib, ValueError, KeyError, JSON: the bytes are not a checkpoint
        raise UserError(f"{path} is not a MORA checkpoint, or is cut short or corrupt ("
                        f"{'damaged compressed data' if isinstance(exc, zlib.error) else type(exc).__name__}): retrain, or use another copy")


def read_checkpoint(archive, path, adam):
    """The checkpoint in the open `archive`, as load_checkpoint returns it: its meta, then its arrays, each checked."""
    meta = json.loads(str(read_member(archive, "meta", (), "U")))
    if problem := meta_problem(meta):
        raise UserError(f"{path} is damaged or has settings this mora.py does not know ({problem}): use the "
                        f"mora.py that wrote it, an earlier copy, or retrain")
    if adam and not meta.get("train"):  # (meta_problem: a run's settings come with its data's record)
        raise UserError(f"{path} holds weights only (no optimizer state or settings): it cannot be resumed")
    cfg, names, fix = Config(**meta["config"]), archive.namelist(), "use an earlier checkpoint or retrain"
    if cfg.n_layers > len(names):  # more blocks than members: damaged (and no list of blocks to build)
        raise UserError(f"{path} does not match its own config (n_layers {cfg.n_layers:,}): the file is damaged; {fix}")
    moments = ("adam.m", "adam.v") if adam or {"adam.m.npy", "adam.v.npy"} & set(names) else ()
    arrays = {}
    for name, shape in dict(param_shapes(cfg), **dict.fromkeys(moments, (count_params(cfg),))).items():
        array = read_member(archive, name, shape, read=adam or name not in moments)
        if array is None:
            what = f"not {shape} floats" if f"{name}.npy" in names else "missing"
            raise UserError(f"{path} does not match its own config ({name}: {what}): the file is damaged; {fix}")
        arrays[name] = array.astype(np.float32)
        if not np.isfinite(arrays[name]).all():
            raise UserError(f"{path} holds non-finite numbers (NaN or inf in {name}): that run diverged; {fix}")
    if adam and (arrays["adam.v"] < 0).any():
        raise UserError(f"{path} is damaged: adam.v, Adam's mean squared gradient, holds negative numbers; {fix}")
    with np.errstate(all="ignore"):  # a weight of 3e38 is finite, but the sums it takes part in overflow
        if not np.isfinite(forward(arrays, np.arange(V, dtype=np.uint8)[None])).all():
            raise UserError(f"{path} holds weights so large that the model's output overflows (not finite on the "
                            f"bytes 0..255): that run diverged or the file is damaged; {fix}")
    return cfg, {k: arrays[k] for k in param_shapes(cfg)}, meta, {k: arrays[k] for k in moments if adam}


def read_member(archive, name, shape, kind="f", read=True):
    """The .npz member `name` if it holds `shape` items of the dtype kind `kind` (else None), read from its header
    no further than they need: a member may hold gigabytes past them.  read=False: its header alone is checked."""
    if f"{name}.npy" not in archive.namelist():
        return None
    with archive.open(f"{name}.npy") as file:
        header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        stored, fortran, dtype = header[np.lib.format.read_magic(file)](file)
        if stored != shape or dtype.kind != kind or dtype.itemsize > 1 << 18:  # a meta of 64 K characters at most
            return None
        count = math.prod(shape) if read else 0
        data = np.frombuffer(file.read(count * dtype.itemsize), dtype, count)
    return data.reshape(shape if read else 0, order="F" if fortran else "C")


def meta_problem(meta):
    """What in a checkpoint's meta is not what `train` writes, in words (None: nothing); weights alone: config, step."""
    if (found := meta.get("format") if isinstance(meta, dict) else None) != CHECKPOINT_FORMAT:
        return f"checkpoint format {found!r}, this mora.py reads {CHECKPOINT_FORMAT!r}"
    config, train, data = meta.get("config"), meta.get("train", {}), meta.get("data", {})
    if not (all(isinstance(part, dict) for part in (config, train, data)) and "step" in meta):
        return "no config or step"
    for given, known in ((config, fields(Config)), (train, fields(TrainSettings) if train else [])):
        if odd := sorted(set(given) ^ {f.name for f in known}):  # missing or unknown
            return f"the keys {odd}"
    files = data.get("files")  # a run's, which --resume checks its data against
    if train and not (isinstance(files, dict) and set(files) == {"train.bin", "val.bin"}
                      and all(isinstance(f, dict) and isinstance(f.get("bytes"), int) for f in files.values())):
        return "the record of its data files"
    for name, value in dict(config, **train, step=meta["step"], train_records=data.get("train_records", 0)).items():
        if not follows_rule(name, value):
            return f"{name} {value!r}"
    return settings_problem(Config(**config), TrainSettings(**train), meta["step"]) if train else None


def settings_problem(cfg, settings, step):
    """What keeps a run's settings from meaning what they say, in words (None: nothing)."""
    s, record = settings, cfg.seq_len + 1
    if step > s.max_steps:
        return f"the run is at step {step:,}, past its end (--max-steps {s.max_steps:,}): give a larger --max-steps"
    if s.warmup > s.max_steps:
        return f"--warmup {s.warmup:,} is longer than the run ({s.max_steps:,} steps): give at most the run's steps"
    if s.eval_bytes < record:
        return f"--eval-bytes {s.eval_bytes:,} is less than one record of seq_len + 1 = {record} bytes: give at least {record}"
    return None


# ----------------------------------------------------------------------------
# Settings: one table of every setting a run keeps, Config's fields and TrainSettings' (the defaults stay theirs).
# The command line's flags and their help, what --resume may change, and the check of a checkpoint's meta read it.

def number_parser(kind, check, words):
    """A setting's rule and an argparse type: kind(text), accepted when check(value), else 'must be {words}'."""
    def parse(text):
        with contextlib.suppress(ValueError):  # (json.loads's errors are ValueErrors too)
            if check(value := kind(text)):
                return value
        raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
    return parse


positive_int = number_parser(int, lambda v: v > 0, "a whole number, 1 or more")
nonnegative_int = number_parser(int, lambda v: v >= 0, "a whole number, 0 or more")
positive_float = number_parser(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = number_parser(float, lambda v: 0 <= v < math.inf, "0 or a positive number")
fraction = number_parser(float, lambda v: 0 <= v <= 1, "between 0 and 1")
decay = number_parser(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
finite_float = number_parser(float, math.isfinite, "a finite number")
yes_no = number_parser(json.loads, lambda v: isinstance(v, bool), "true or false")  # as --NAME / --no-NAME
ablation = number_parser(str, lambda v: v in ABLATIONS, f"one of {', '.join(ABLATIONS)}")

# name -> its rule, its flag's help (None: no flag), whether --resume may change it, how many numbers it takes.
Setting = namedtuple("Setting", "rule help on_resume nargs", defaults=(False, None))
SETTINGS = {
    "d_model": Setting(positive_int, "width d"),
    "n_layers": Setting(positive_int, "blocks L"),
    "seq_len": Setting(positive_int, "bytes of context per training record"),
    "batch_size": Setting(positive_int, "records a batch"),
    "ablate": Setting(ablation, f"switch off a part of the block: {', '.join(ABLATIONS)}"),
    "lr": Setting(positive_float, "peak learning rate"),
    "warmup": Setting(nonnegative_int, f"warmup steps (default: a third of the run, at most {WARMUP_CAP})"),
    "final_lr_fraction": Setting(fraction, "the cosine decay ends at this fraction of --lr"),
    "clip": Setting(positive_float, "global gradient-norm clip"),
    "beta1": Setting(decay, None),
    "beta2": Setting(decay, "Adam's second-moment decay"),
    "eps": Setting(positive_float, None),
    "seed": Setting(nonnegative_int, "initialisation and data order"),
    "epochs": Setting(positive_int, "whole passes over train.bin"),
    "max_steps": Setting(positive_int, "steps to train, not whole epochs (--resume: a longer run)", on_resume=True),
    "mix_init": Setting(finite_float, "initial mix of memory, running mean and delta in every block", nargs=3),
    "slices": Setting(positive_int, "cut each batch into this many slices for the CPU's threads (part of the run: the "
                                    "same result on any number of threads; default: one per thread)"),
    "eval_every": Setting(nonnegative_int, "steps between evaluations on the start of val (0: never)", on_resume=True),
    "eval_bytes": Setting(positive_int, "bytes of val those evaluations read (and the final streamed one)", on_resume=True),
    "ckpt_every": Setting(positive_int, "steps between checkpoints", on_resume=True),
    "final_eval": Setting(yes_no, "evaluate on all of val when the run ends", on_resume=True),
}


def add_setting_flags(p, names):
    """A flag for each setting in `names`: its rule as the type, its help with the dataclass's default."""
    for name in names:
        rule, text, _, nargs = SETTINGS[name]
        flag, default = "--" + name.replace("_", "-"), dict(asdict(Config()), **asdict(TrainSettings()))[name]
        shown = " ".join(f"{v:g}" for v in default) if nargs else default
        how = dict(action=argparse.BooleanOptionalAction) if rule is yes_no else \
            dict(type=rule, nargs=nargs, metavar=("C", "A", "E")[:nargs] if nargs else None)
        p.add_argument(flag, **how, help=text if default is None else f"{text} (default {shown})")


def follows_rule(name, value):
    """Whether a checkpoint may hold `value` for `name` (a setting, else a count such as the step) by its flag's rule,
    the JSON read as the flag's text: "7" is no step, 7.0 no batch size, true no lr; a GPU run has no slices (None)."""
    rule, _, _, nargs = SETTINGS.get(name, Setting(nonnegative_int, None))
    with contextlib.suppress(argparse.ArgumentTypeError, ValueError):  # (the rule's refusal)
        if nargs:
            return isinstance(value, list) and len(value) == nargs and all(rule(json.dumps(v)) == v for v in value)
        return (value is None and name == "slices") or rule(value if isinstance(value, str) else json.dumps(value)) == value
    return False


def model_config(args, base=None):
    """Config from the model flags; for those not given, --size's, else `base`'s (a checkpoint's), else small's."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    return Config(**{**asdict(base or Config(**SIZES["small"])), **SIZES.get(args.size, {}), **given})


# ----------------------------------------------------------------------------
# Starting or resuming a run, and keeping it safe: outputs checked first, a lock, signals that save, the log.


def resumed_settings(args, cfg, meta, chosen):
    """The run's own settings, with what SETTINGS lets a resume change: how it reports, and a longer run
    (--max-steps).  A flag that would change anything else (the model, the recipe) is refused."""
    settings = TrainSettings(**meta["train"])
    own, asked = dict(asdict(cfg), **asdict(settings)), dict(asdict(model_config(args, base=cfg)), **chosen)
    changed = {k: v for k, v in asked.items() if own[k] != (tuple(v) if k == "mix_init" else v)}
    if refused := {k: v for k, v in changed.items() if not SETTINGS[k].on_resume}:
        fix = "drop the size flags" if set(refused) & set(asdict(cfg)) else "drop those flags"
        raise UserError(f"--resume continues {args.ckpt} with its own model and settings {own}; these flags differ: "
                        f"{refused}: {fix}, or use another --ckpt")
    if changed.get("max_steps", 0) > meta["step"]:  # (one below the step is refused by settings_problem)
        print(f"schedule: the run now ends at step {changed['max_steps']:,} instead of {settings.max_steps:,}; warmup stays "
              f"{settings.warmup}, the cosine decay is stretched to the new end")
    return replace(settings, **changed)


# Why a resumed run is bit for bit the same as one that never stopped:
#   - one BLAS thread per worker (BLAS_VARIABLES, at the top), so no sum's order depends on the cores;
#   - the saved slice count (cpu_slices, kept in the settings): the batch is cut the same way on any threads;
#   - the step as the data cursor (batch_rows): an epoch's order is a function of the seed and the epoch;
#   - the Adam moments (RunFiles.save writes them beside the weights, load_checkpoint reads and checks them);
#   - the schedule as a function of the step (learning_rate);
#   - the data hash (open_run_data): only the run's own train.bin and val.bin will do;
#   - the settings locked on resume (resumed_settings): only how a run reports and how long it runs may change.

def start_or_resume(args, xp, checkpoint):
    """A new run from the flags, or (--resume) the run in `checkpoint`, load_checkpoint's reading of --ckpt."""
    chosen = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name, None) is not None}
    if args.resume:
        cfg, params_np, meta, adam_state = checkpoint
        settings, step = resumed_settings(args, cfg, meta, chosen), meta["step"]
    else:
        if os.path.exists(args.ckpt) and not args.overwrite:
            raise UserError(f"{args.ckpt} exists: pass --resume to continue it, --overwrite to start over, or another --ckpt")
        cfg, settings, step, meta = model_config(args), TrainSettings(**chosen), 0, None
        check_memory(cfg, xp)
        params_np, adam_state = init_params(cfg, settings.seed, mix=settings.mix_init), {}
    train_records, val_records, data_files = open_run_data(args, cfg, meta)
    if (steps_per_epoch := len(train_records) // cfg.batch_size) == 0:
        raise UserError(f"train.bin has {len(train_records)} records of {cfg.seq_len + 1} bytes, fewer than one batch of {cfg.batch_size}: lower --batch-size or --seq-len")
    settings.max_steps = settings.max_steps or settings.epochs * steps_per_epoch  # (a given one is never 0)
    if settings.warmup is None:
        settings.warmup = default_warmup(settings.max_steps)
    if problem := settings_problem(cfg, settings, step):
        raise UserError(problem)
    trainable = trainable_vector(cfg, xp)
    flat, params = flat_parameters(params_np, xp)
    if trainable is not None:
        flat *= trainable  # ablated parameters start (and stay) at 0
    adam_m, adam_v = (xp.asarray(adam_state[k]) if adam_state else xp.zeros_like(flat) for k in ("adam.m", "adam.v"))
    return Run(cfg, settings, step, train_records, val_records, flat, params, trainable, adam_m, adam_v, data_files,
               saved_step=step if args.resume else None)


def open_run_data(args, cfg, meta):
    """train.bin and val.bin as records, and the size and SHA-256 of each (of its records, all the run reads).  On
    --resume (meta: the checkpoint's) only the run's own data will do: its step is a cursor into train.bin."""
    records, files = {}, {}
    recorded = meta["data"]["files"] if meta else {}
    for name in ("train.bin", "val.bin"):
        path = os.path.join(args.data_dir, name)
        records[name] = open_records(path, cfg.seq_len)
        files[name] = {"bytes": os.path.getsize(path), "sha256": hashlib.sha256(records[name]).hexdigest()}
        if meta and "sha256" not in recorded[name]:  # a record of its size alone, or of sampled blocks
            raise UserError(f"--resume: {args.ckpt} records no SHA-256 of its {name}, so this mora.py cannot check the data: "
                            f"resume it with the mora.py that wrote it, or retrain")
        if meta and recorded[name] != files[name]:
            size = recorded[name]["bytes"]
            differs = "other bytes of the same size" if size == files[name]["bytes"] else f"{files[name]['bytes']:,} bytes"
            raise UserError(f"--resume: {args.ckpt} was trained on another {name} ({size:,} bytes) than {path} ({differs}): "
                            f"point --data-dir at the data it was trained on")
    return records["train.bin"], records["val.bin"], files


LOG_FIELDS = ["step", "bytes", "lr", "loss", "bpb", "accuracy", "grad_norm", "ms_per_step",
              "val_loss", "val_bpb", "val_accuracy", "val_stream_bpb"]


def log_line(row):
    """A row of the log (a dict; the columns left out are empty) as one line: its numbers need no CSV quoting."""
    return ",".join(str(row.get(k, "")) for k in LOG_FIELDS) + "\n"


LOG_HEADER = log_line({k: k for k in LOG_FIELDS})


def line_step(line, log):
    """The step of a whole line of the log (`log`: a number, or nothing, in each of its columns) or of the samples
    (`step N: 'text'`); None for a line cut short or unreadable."""
    if log:
        row = line.split(",")
        with contextlib.suppress(ValueError):
            list(map(float, filter(None, row)))  # each a number, or a ValueError
            return int(row[0]) if len(row) == len(LOG_FIELDS) else None
        return None
    number, _, text = line.partition(": ")
    number = number.removeprefix("step ").replace(",", "")
    return int(number) if number.isdigit() and text[-1:] in ("'", '"') and len(text) > 1 else None


def lines_up_to(path, step, header):
    """A run's file's lines (the log, after its `header`; the samples) up to the checkpoint at `step`.  A file with a
    line cut short or unreadable (a kill mid-line, a hand edit) is set aside as .bad, the lines before it kept."""
    if not os.path.exists(path):  # (said of the log alone: a run may have sampled nothing so far)
        if header:
            print(f"warning: {path} is missing: a new one starts at step {step:,}", file=sys.stderr)
        return []
    with open(path, newline="", errors="replace") as f:
        *lines, cut = f.read().split("\n")  # cut: the text after the last line end, a line cut short
    ours, body = (lines[:1] == [header.rstrip("\n")], lines[1:]) if header else (True, lines)
    good = list(itertools.takewhile(lambda s: s is not None, (line_step(s, header) for s in body))) if ours else []
    if len(good) < len(body) or cut or not ours:
        os.replace(path, path + ".bad")
        what = f"line {len(good) + 1 + bool(header)} is cut short or unreadable" if ours else "it is not what a run writes there"
        print(f"warning: {path}: {what}; it is kept as {path}.bad and the new one keeps the {len(good)} lines before it",
              file=sys.stderr)
    return [line + "\n" for line, s in zip(body, good) if s <= step]


class WriteError(UserError):
    """A file of a run could not be written: the message says which and why, `fix` what to do about it."""
    def __init__(self, message, fix):
        super().__init__(message)
        self.fix = fix


class RunFiles:
    """Every file `train` writes, named from the checkpoint's whole name (STEM: CKPT less a last .npz, so exp.1 and
    exp.2 are two runs): CKPT, CKPT.lock, the log STEM.csv and STEM.samples.txt, and while the run trains its standard
    streams (QuietOnFailure).  All are checked before any work; each write is whole or undone, and an OSError on any
    file becomes one WriteError."""

    def __init__(self, args):
        ckpt, stem, self.args = args.ckpt, args.ckpt.removesuffix(".npz"), args
        self.ckpt, self.lock, self.log, self.samples = ckpt, ckpt + ".lock", stem + ".csv", stem + ".samples.txt"
        self.what = {self.ckpt: "the checkpoint", self.lock: "the lock", self.log: "the log", self.samples: "the samples"}
        self.appending = {}
        prepared = ckpt.endswith(".bin") and os.path.exists(ckpt + ".json")  # prepare_data.py's record beside it
        if prepared or os.path.basename(ckpt) in ("train.bin", "val.bin", "test.bin"):
            raise UserError(f"--ckpt {ckpt} is a prepared data file (prepare_data.py's): a checkpoint would replace it; "
                            f"choose another --ckpt, e.g. checkpoints/mora.npz")
        with contextlib.suppress(OSError):  # a folder that cannot be made is check_outputs' to say
            os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
        check_outputs([ckpt, self.log, self.samples, self.lock],
                      [os.path.join(args.data_dir, name) for name in ("train.bin", "val.bin")], "--ckpt")

    def __enter__(self):
        """Lock the run (CKPT.lock, never through a link): a second run on it stops at once, before it prints.  The
        system drops the lock however this process ends, so a stale lock file never blocks; it holds the pid, for
        the message.  Then the standard streams become QuietOnFailure ones until the run ends."""
        try:
            self.lock_fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:  # ELOOP: a symbolic link, which would take the pid to another file
            problem = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
            raise UserError(f"{self.lock} {problem}: remove it, or choose another --ckpt") from exc
        try:
            import fcntl  # (not on Windows: there, no lock)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.lock_fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.lock_fd)
            raise UserError(f"{self.ckpt} is being trained by process {holder}: wait for it to end (or stop it), or use "
                            f"another --ckpt") from None
        except ImportError:
            pass
        with contextlib.suppress(OSError):  # the pid is for the message alone: a full disk leaves it out
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = QuietOnFailure(sys.stdout), QuietOnFailure(sys.stderr)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self.streams
        for file in self.appending.values():
            file.close()
        os.close(self.lock_fd)

    def start_lines(self, step, sampling):
        """The log, and (sampling) the samples, as of the checkpoint at `step`: each rewritten, in one rename, to
        its lines up to that step (lines_up_to), then opened to append, one whole line at a time (write_line)."""
        for path, header in [(self.log, LOG_HEADER)] + [(self.samples, "")] * sampling:
            lines = lines_up_to(path, step, header) if step else []
            with self.writing(path):
                with written_atomically(path, "w", newline="") as f:  # on a failure the old file stays as it was
                    f.writelines([header] + lines)
                self.appending[path] = open(path, "ab", buffering=0)

    def write_line(self, path, line):
        """Append one line to the log or the samples; however the write stops (a full disk, a second Ctrl-C), the
        file is cut back to where it was: never half a line."""
        file = self.appending[path]
        data, start = line.encode(), file.tell()
        with self.writing(path):
            try:
                while data:
                    data = data[file.write(data):]  # an unbuffered write may take only part
            except BaseException:
                file.truncate(start)
                raise

    def save(self, run):
        meta = {"config": asdict(run.cfg), "step": run.step, "train": asdict(run.settings),
                "data": {"train_records": len(run.train_records), "files": run.data_files}}
        with self.writing(self.ckpt):
            save_checkpoint(self.ckpt, run.params, meta, run.adam_m, run.adam_v)
        run.saved_step = run.step

    @contextlib.contextmanager
    def writing(self, path):
        """Every write of a run's file: an OSError becomes a WriteError naming the file, the real cause, and the fix."""
        try:
            yield
        except OSError as exc:
            folder = os.path.dirname(os.path.abspath(path))
            cause, fix = exc.strerror or str(exc), f"see why {path} cannot be written"
            if not os.path.isdir(folder):
                cause, fix = f"its folder {folder} is gone", f"put the folder {folder} back"
            elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
                fix = "free some disk space"
            elif exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
                cause, fix = f"{cause}: a folder is in the way", f"move {exc.filename or path} away"
            elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                fix = f"make {folder} writable"
            raise WriteError(f"cannot write {self.what[path]} {path} ({cause})", fix) from exc

    def on_disk(self, run, fix=None):
        """What this run has on disk and what to do next (once `fix` is done): the end of every line that ends it."""
        then = f"{fix}, then " if fix else ""
        if run.saved_step is None:
            return f"no checkpoint of this run was saved; {then}start it again"
        gone = not os.path.isdir(os.path.dirname(os.path.abspath(self.ckpt)))  # its folder moved away
        held = "held" if gone else "is saved at" if run.saved_step == run.step else "still holds"
        if run.saved_step < run.settings.max_steps:
            return f"{self.ckpt} {held} step {run.saved_step:,}; {then}continue with `{command_line(self.args, 'train', '--resume')}`"
        return f"{self.ckpt} {held} step {run.saved_step:,}, the end of the run; {then}`{command_line(self.args, 'eval')}` " \
               f"gives its final evaluation"


class QuietOnFailure:
    """A standard stream while a run trains: a write that fails (`| head`, a full disk, a closed terminal) never ends
    the run; it is said once, then the descriptor is the null device, so nothing fails later, at exit included."""

    def __init__(self, stream):
        self.stream, self.failed = stream, False

    def write(self, text):
        return self.guarded("write", text) or len(text)

    def flush(self):
        self.guarded("flush")

    def guarded(self, action, *args):
        try:
            return None if self.failed else getattr(self.stream, action)(*args)
        except (OSError, ValueError) as exc:  # ValueError: a character it cannot encode, or a closed stream
            self.failed = True
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            print(f"note: {getattr(exc, 'strerror', None) or exc} writing the standard output; the run goes on "
                  f"without it and saves as usual", file=sys.stderr, flush=True)  # (unsaid when stderr is what failed)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Report:
    """What train_loop shows of each step, and whether it should stop.  A step's row goes to the log, an evaluation
    and its sample to stdout and the samples file, the progress to stderr: a bar on a terminal, else a line at the
    first and last step and every PLAIN_SECONDS (the speed leaves out the first step: caches warm, the GPU compiles).
    SIGINT, SIGTERM and SIGHUP (a closed terminal) stop the loop after the step under way, as does a file that cannot
    be written (kept as `problem`); a second signal, or one once the run is `saved`, stops at once, unsaved."""
    PLAIN_SECONDS = 10
    SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]

    def __init__(self, run, end, files, args):
        self.run, self.end, self.files, self.start = run, end, files, run.step
        self.prompt, self.sample_length = os.fsencode(args.sample_prompt), args.sample_length
        self.steps, self.seconds, self.next_line = 0, 0.0, 0.0
        self.stop_requested, self.saved, self.problem = False, False, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.on_signal) for s in self.SIGNALS}
        self.bar = tqdm(total=self.end, initial=self.start, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None
        return self

    def on_signal(self, signum, frame):
        if self.stop_requested or self.saved:
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step, then saving "
              f"(send it again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.bar is not None:
            self.bar.close()

    def step(self, lr, loss, accuracy, grad_norm, seconds, val=None, text=None):
        run, bpb = self.run, loss / math.log(2)
        if val:
            tqdm.write(f"step {run.step:,}: val bits/byte {val['bpb']:.4f} (first {val['bytes']:,} bytes), accuracy "
                       f"{val['accuracy']:.4f}" + (f"\nstep {run.step:,}: sample: {text!r}" if self.sample_length else ""))
        try:
            if val and self.sample_length:
                self.files.write_line(self.files.samples, f"step {run.step:,}: {text!r}\n")
            self.log(val, lr=f"{lr:.6g}", loss=f"{loss:.5f}", bpb=f"{bpb:.5f}", accuracy=f"{accuracy:.5f}",
                     grad_norm=f"{grad_norm:.4f}", ms_per_step=f"{1000 * seconds:.2f}")
        except WriteError as exc:  # the loop stops as for a signal: the checkpoint is saved, then this is said
            self.problem, self.stop_requested = exc, True
        if run.step > self.start + 1:
            self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        numbers = f"loss {loss:.4f} acc {accuracy:.3f} bpb {bpb:.4f} lr {lr:.2e} gnorm {grad_norm:.2f}"
        numbers += f" {self.speed()}" if self.steps else ""
        if self.bar is not None:
            self.bar.set_postfix_str(numbers)
            self.bar.update(1)
        elif run.step in (self.start + 1, self.end) or time.monotonic() >= self.next_line:
            sys.stdout.flush()  # what was printed before this line comes before it in a file that holds both
            print(f"step {run.step:,}/{run.settings.max_steps:,}: {numbers}", file=sys.stderr, flush=True)
            self.next_line = time.monotonic() + self.PLAIN_SECONDS

    def log(self, val=None, **columns):
        """Append the log's row for this step: `columns`, and an evaluation's (`val`) when given."""
        if val:
            columns.update({f"val_{k}": f"{val[k]:.5f}" for k in ("loss", "bpb", "accuracy")})
        row = dict(columns, step=self.run.step, bytes=self.run.step * self.run.cfg.batch_size * self.run.cfg.seq_len)
        self.files.write_line(self.files.log, log_line(row))

    def speed(self):
        """The speed of the timed steps (once there are some)."""
        bytes_per_s = self.run.cfg.batch_size * self.run.cfg.seq_len * self.steps / (self.seconds or 1)
        return f"{1000 * self.seconds / self.steps:.1f} ms/step, {bytes_per_s:,.0f} bytes/s"


# ----------------------------------------------------------------------------
# CPU threads, and the device: CuPy where it can work (gpu_problem, in the appendix), else NumPy, which runs an
# operation on one core (BLAS gains little from threads on arrays this thin).  So the CPU path cuts the batch into
# slices of rows, each slice's forward and backward in a thread (NumPy and BLAS release the GIL).  The slices are
# part of a run (saved in its checkpoint) and threads only share them out: the same bits on any number of threads.

def select_backend(device, widths=()):
    """numpy or cupy, as --device (cpu, gpu or auto) asks; the kernels for the model `widths` are compiled now."""
    if device != "cpu" and (problem := gpu_problem(widths)) is None:
        return cupy
    if device == "gpu":
        raise UserError(f"--device gpu: {problem}; run with --device cpu instead")
    if device == "auto" and problem != NO_CUPY:  # CuPy is there but cannot work: say why the CPU it is
        print(f"note: --device auto uses the CPU: {problem}", file=sys.stderr)
    fuse_kernels(False)  # the plain layers themselves
    return np


def describe_backend(xp, slices):
    if xp is np:
        count, threads, blas = slices.count, slices.threads, slices.blas
        return (f"numpy {np.__version__} on the CPU: the batch in {count} slice{'s' * (count > 1)} over {threads} "
                f"thread{'s' * (threads > 1)} x {blas} BLAS thread{'s' * (blas > 1)} (of {os.cpu_count()} cores)")
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return f"cupy {cupy.__version__} on {props['name'].decode()} (TF32 matmuls: CUPY_TF32={os.environ.get('CUPY_TF32')})"


class Slices:
    """A batch's rows cut into `count` slices, shared out over `threads` threads, each running `blas` BLAS threads."""
    def __init__(self, count, threads, blas=1):
        self.count, self.threads, self.blas = count, min(threads, count), blas
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.threads - 1))

    def map(self, function, n):
        """[function(rows) for the rows 0..n-1 cut into `count` contiguous slices (at most n)], in order.  The main
        thread computes slices 0, threads, ... itself, so it answers Ctrl-C at once; the pool's threads the others."""
        edges = np.linspace(0, n, min(n, self.count) + 1).astype(int)
        slices = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        others = {i: self.pool.submit(function, rows) for i, rows in enumerate(slices) if i % self.threads}
        return [others[i].result() if i in others else function(rows) for i, rows in enumerate(slices)]

    def gradient(self, params, x, y):
        """batch_gradient as the sum, in slice order, of each slice's weighted by its share of the batch."""
        def slice_gradient(rows):
            loss, accuracy, grad = batch_gradient(params, x[rows], y[rows])
            share = (rows.stop - rows.start) / len(x)
            return float(loss) * share, float(accuracy) * share, grad * share
        losses, accuracies, grads = zip(*self.map(slice_gradient, len(x)))
        return np.float64(sum(losses)), np.float64(sum(accuracies)), sum(grads[1:], grads[0])


def cpu_slices(xp, threads=None, count=None):
    """Slices for the CPU (None on the GPU): a thread per core, a slice per thread by default (docs/results.md)."""
    if xp is not np:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "1")  # NumPy's OpenBLAS: it wins over OMP_NUM_THREADS
    threads, blas = threads or cores, max(1, int(blas)) if blas.isdigit() else 1
    if threads * blas > cores:
        fix = f"--threads {cores}" if blas == 1 else \
            f"unset {' '.join(BLAS_VARIABLES)} (MORA gives each thread one BLAS thread)"
        print(f"note: {threads} threads x {blas} BLAS threads is more than the {cores} cores here: they take turns, "
              f"which can be several times slower; {fix}", file=sys.stderr)
    # glibc (Linux) is asked to keep freed memory: a step frees hundreds of MB of activations, and faulting them
    # back in from the OS would cost about a quarter of a CPU step.
    import ctypes
    with contextlib.suppress(OSError):  # no glibc: nothing to ask
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    return Slices(count or threads, threads, blas)


# ----------------------------------------------------------------------------
# The commands: train, eval (per record, or the split read as long texts), sample, bench.


def train(args):
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues --ckpt, --overwrite starts it over")
    if args.sample_length and not args.sample_prompt:
        raise UserError("--sample-prompt is empty: give the text each sample continues, or --sample-length 0 for none")
    checkpoint = load_checkpoint(args.ckpt, adam=True) if args.resume else None
    xp = select_backend(args.device, [(checkpoint[0] if checkpoint else model_config(args)).d_model])
    with RunFiles(args) as files:
        run = start_or_resume(args, xp, checkpoint)
        if run.step >= run.settings.max_steps:
            print(f"{args.ckpt} is finished: it stands at step {run.step:,}, the end of its run; to train it longer, "
                  f"--resume with --max-steps N, N above {run.step:,}")
            return 0
        slices = cpu_slices(xp, args.threads, run.settings.slices)
        if slices:
            run.settings.slices = slices.count  # kept in the checkpoint: a resume slices the batch the same way
        end = run.settings.max_steps if args.stop_after is None else min(run.settings.max_steps, run.step + args.stop_after)
        print_plan(run, xp, slices, end)
        with Report(run, end, files, args) as report:
            return train_and_finish(run, end, report, files, slices)


def train_and_finish(run, end, report, files, slices):
    """train_loop, a checkpoint where it ends, and at the run's end the final evaluation.  A log that cannot be
    written stops the loop as a signal does, so the checkpoint is still saved; whatever ends the run early gets one
    line saying what is on disk and what to do."""
    try:
        files.start_lines(run.step, report.sample_length > 0)
        train_loop(run, end, report, files.save, slices)
        files.save(run)
        report.saved = True  # a signal from here on stops at once: nothing is left to save
        if report.problem:
            raise report.problem
        print(f"checkpoint: {files.ckpt} (step {run.step:,}); log: {files.log}")
        if report.steps:
            print(f"speed: {report.speed()}")
        if report.stop_requested:
            raise KeyboardInterrupt
        if run.step == run.settings.max_steps and run.settings.final_eval:
            final_evaluation(run, slices, report)
    except KeyboardInterrupt:  # a signal: after the step under way (then saved), or a second one at once
        print(f"stopped: {files.on_disk(run)}")
        return 130
    except WriteError as exc:  # a file of the run; the log's failure comes first where the checkpoint's follows it
        also = f"{report.problem}; " if report.problem not in (None, exc) else ""
        raise UserError(f"{also}{exc}: {files.on_disk(run, exc.fix)}") from exc
    except FloatingPointError as exc:  # the loss or the gradient norm
        s = run.settings
        saved = (f"{files.ckpt} holds the last good checkpoint (step {run.saved_step:,})" if run.saved_step is not None
                 else f"no checkpoint of this run was saved before it (one is saved every {s.ckpt_every:,} steps)")
        raise UserError(f"{exc}; likely causes: a learning rate too high (--lr {s.lr:g}), an Adam beta2 too close to 1 "
                        f"({s.beta2:g}), or a damaged train.bin. {saved}") from exc
    except MemoryError as exc:
        raise UserError(f"out of memory in step {run.step + 1:,} (a new run can lower --batch-size, --seq-len or "
                        f"--d-model): {files.on_disk(run, 'free some memory')}") from exc
    return 0


# Core-seconds a CPU spends per parameter and byte of a training step (the small
# model at 32 x 256 on a 2-core Intel Xeon VM: docs/results.md), to warn before long runs.
CPU_SECONDS_PER_PARAM_BYTE = 2.1e-10


def print_plan(run, xp, slices, end):
    """Before step 1: the model and its parameters, the backend, the data, the steps and the schedule of this call,
    and on the CPU, when the run will take hours, what is quicker."""
    cfg, s = run.cfg, run.settings
    print(f"MORA  d_model={cfg.d_model}  n_layers={cfg.n_layers}  seq_len={cfg.seq_len}  batch_size={cfg.batch_size}")
    print(f"backend: {describe_backend(xp, slices)}")
    print(f"{'parameter':<24}{'shape':>12}{'count':>12}")
    for name, shape in param_shapes(replace(cfg, n_layers=1)).items():  # the embedding, then one block
        print(f"{name:<24}{str(shape):>12}{math.prod(shape):>12,}")
    print(f"{'total':<24}{'':>12}{count_params(cfg):>12,}   ({cfg.n_layers} blocks; embed is also the output layer)")
    print(f"data: {len(run.train_records):,} train records of {cfg.seq_len + 1} bytes, "
          f"{len(run.train_records) // cfg.batch_size:,} steps per epoch; {len(run.val_records):,} val records")
    print(f"training: steps {run.step:,} -> {end:,} of {s.max_steps:,}, lr {s.lr:g} (warmup {s.warmup}, "
          f"cosine to {s.final_lr_fraction:g}x), clip {s.clip:g}, Adam beta2 {s.beta2:g}")
    if cfg.ablate != "none":
        print(f"ablation {cfg.ablate}: {int(run.trainable.sum()):,} trainable parameters")
    if slices:
        hours = ((s.max_steps - run.step) * cfg.batch_size * cfg.seq_len * count_params(cfg)
                 * CPU_SECONDS_PER_PARAM_BYTE / slices.threads / 3600)
        if hours > 1:
            took = f"about {hours:,.1f} hours" if hours < 1e6 else "more than a hundred years"
            print(f"note: on this CPU ({slices.threads} threads) this run will take {took}. "
                  f"A good small model in minutes: --batch-size 32 --max-steps 3000 (README: The reference CPU run)")


def command_line(args, *words):
    """`python mora.py WORDS` for this run (--ckpt, --data-dir, --device, --threads), quoted for the shell."""
    words = ["python", os.path.relpath(__file__), *words, "--ckpt", args.ckpt, "--data-dir", args.data_dir]
    if args.device != "auto":
        words += ["--device", args.device]
    if args.threads:
        words += ["--threads", str(args.threads)]
    return shlex.join(words)


# The streams `eval --stream` and the final evaluation read side by side: the fewest that run about as fast as
# the per-record protocol at batch 256 on 2 cores; a stream of the 22.5 MB val is ~350 KB, its cold start small.
EVAL_STREAMS = 64


def evaluate_stream(params, data, seq_len, streams=1, slices=None, progress=False):
    """`data` cut into `streams` contiguous texts read side by side as the rows of a batch (shared over the CPU
    threads), each in chunks of seq_len with its state carried and begun on the byte the one before ended on: every
    byte but the first is predicted once, each stream pays one cold start.  Positions count within a chunk."""
    xp = array_module(params["embed"])
    streams = max(1, min(streams, len(data) - 1))  # at least one byte to predict in every stream
    edges = np.linspace(0, len(data) - 1, streams + 1).astype(np.int64)
    starts, lengths = edges[:-1], np.diff(edges)  # (S,): stream k predicts the lengths[k] bytes after starts[k]

    def sums(rows):
        """The streams `rows`: summed loss and bytes predicted per position (seq_len,), and the right predictions."""
        state, steps = initial_state(params, rows.stop - rows.start), lengths[rows].max()
        position_loss, positions_each, total_correct = np.zeros(seq_len), np.zeros(seq_len), 0.0
        shown = progress and rows.start == 0  # one progress bar: the first slice's
        for t0 in progress_bar(range(0, steps, seq_len), shown, desc="eval (stream)", unit="chunk"):
            t = min(seq_len, steps - t0)
            at = np.minimum(starts[rows] + t0 + np.arange(t + 1)[:, None], len(data) - 1)  # (t+1, S), last target too
            chunk = xp.asarray(np.asarray(data[at], dtype=np.int32))  # (t+1, S) time-major
            logits, _, state = model_forward(params, chunk[:-1], state, keep_cache=False)  # (t, S, V)
            losses, correct, _ = cross_entropy_forward(logits.reshape(-1, V), chunk[1:].reshape(-1))
            scored = t0 + np.arange(t)[:, None] < lengths[rows]  # (t, S) in its stream: a shorter one's end left out
            position_loss[:t] += (to_numpy(losses).reshape(t, -1) * scored).sum(1)
            positions_each[:t] += scored.sum(1)
            total_correct += float((to_numpy(correct).reshape(t, -1) * scored).sum())
        return position_loss, positions_each, total_correct

    parts = [sums(slice(0, streams))] if slices is None else slices.map(sums, streams)
    side_by_side = "1 stream" if streams == 1 else f"{streams:,} streams side by side"
    return dict(evaluation_result(*map(sum, zip(*parts))), streams=streams,
                protocol=f"{side_by_side}, each read in chunks of {seq_len} with its state carried")


def final_evaluation(run, slices, report):
    """All of val by the published protocol (state reset every record), and its start as EVAL_STREAMS texts."""
    full = evaluate(run.params, run.val_records, EVAL_BATCH, slices, progress=True)
    text = run.val_records.reshape(-1)[:run.settings.eval_bytes]
    stream = evaluate_stream(run.params, text, run.cfg.seq_len, EVAL_STREAMS, slices, progress=True)
    report.log(full, val_stream_bpb=f"{stream['bpb']:.5f}")
    print_evaluation(f"val, per record (all {len(run.val_records):,} records, the state reset every record)", full)
    print_evaluation(f"val, streamed (the first {len(text):,} bytes as {stream['protocol']})", stream)


def print_evaluation(name, result):
    print(f"{name}: loss {result['loss']:.4f} nats/byte, accuracy {result['accuracy']:.4f}, "
          f"{result['bpb']:.4f} bits/byte\n    {result['by_position']}")


def checkpoint_on_device(args):
    """--ckpt's config, its parameters on the device --device chooses, its meta, and that device's array module."""
    cfg, params, meta, _ = load_checkpoint(args.ckpt)
    xp = select_backend(args.device, [cfg.d_model])
    return cfg, {k: xp.asarray(p) for k, p in params.items()}, meta, xp


def evaluate_checkpoint(args):
    cfg, params, meta, xp = checkpoint_on_device(args)
    path = os.path.join(args.data_dir, f"{args.split}.bin")
    if args.split == "test" and not os.path.exists(path):
        raise UserError(f"{path} not found: enwik8 alone has a test split (prepare_data.py --dataset enwik8); "
                        "use --split val")
    seq_len = args.seq_len or cfg.seq_len  # a recurrent model reads records of any length
    streams = args.streams or (EVAL_STREAMS if args.stream else 0)  # 0: record by record
    data = open_bytes(path)[:args.max_bytes or None]
    if len(data) < (need := 2 if streams else seq_len + 1):
        given = f"--max-bytes {args.max_bytes} leaves" if len(data) == args.max_bytes else f"{path} holds"
        why = "one to read and one to predict" if streams else "one record of seq_len + 1 (--stream reads any number)"
        raise UserError(f"{given} {len(data)} byte{'s' * (len(data) != 1)}: at least {need} are needed, {why}: "
                        "evaluate on more text")
    slices, started = cpu_slices(xp, args.threads), time.perf_counter()
    if streams:
        result = evaluate_stream(params, data, seq_len, streams, slices, progress=True)
    else:
        records = data[:len(data) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
        result = dict(evaluate(params, records, args.batch_size or EVAL_BATCH, slices, progress=True),
                      protocol=f"{len(records):,} records, the state reset every record")
    print_evaluation(f"{args.ckpt} (step {meta['step']:,}) on {args.split}, {result['bytes']:,} bytes predicted, "
                     f"{result['protocol']}, {result['bytes'] / (time.perf_counter() - started):,.0f} bytes/s", result)
    return 0


def sample(args):
    prompt = os.fsencode(args.prompt)  # the prompt's bytes as given, even if they are not valid UTF-8
    if not prompt:
        raise UserError('--prompt is empty: the model needs at least one byte to continue, e.g. --prompt "Once"')
    params = checkpoint_on_device(args)[1]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span bytes
    print(args.prompt, end="")
    for byte in generate(params, prompt, args.length, args.temperature, args.top_k, args.seed):
        print(decoder.decode(bytes([byte])), end="", flush=True)
    print(decoder.decode(b"", final=True))
    return 0


def check_memory(cfg, xp):
    """Refuse a model that cannot fit before it is built, rather than be killed by the OS (peaks: docs/results.md): a
    step keeps ~20 d floats a block and the logits twice a position, and 4 floats a parameter (with gradient, m, v)."""
    need = 4 * cfg.batch_size * cfg.seq_len * (20 * cfg.n_layers * cfg.d_model + 2 * V) + 16 * count_params(cfg)
    available = math.inf if xp is np else cupy.cuda.runtime.memGetInfo()[0]  # the CPU's: what Linux says, else no check
    if xp is np:
        with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
            available = int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    if need > available:
        raise UserError(f"a training step of this model needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} "
                        f"GiB is free: lower --batch-size, --seq-len or --d-model")


def time_training_steps(cfg, xp, slices, steps):
    """The median milliseconds of `steps` steps of train_loop on random bytes, after an untimed one (CuPy compiles
    there), and the kernel launches a step where they are counted (else None)."""
    from types import SimpleNamespace
    records = np.random.default_rng(0).integers(0, V, (cfg.batch_size, cfg.seq_len + 1), dtype=np.uint8)
    flat, params = flat_parameters(init_params(cfg, 0), xp)
    run = Run(cfg, TrainSettings(lr=1e-3, warmup=0, max_steps=steps + 1, eval_every=0), 0, records, records, flat,
              params, trainable_vector(cfg, xp), xp.zeros_like(flat), xp.zeros_like(flat), data_files={})
    seconds = []
    report = SimpleNamespace(stop_requested=False,  # all that train_loop asks of its report here: each step's time
                             step=lambda lr, loss, accuracy, grad_norm, took, val, text: seconds.append(took))
    launched = getattr(xp, "launches", None)  # the tests' CPU stand-in for CuPy counts launches; CuPy itself does not
    train_loop(run, steps + 1, report, lambda run: None, slices)
    return 1000 * float(np.median(seconds[1:])), None if launched is None else (xp.launches - launched) // (steps + 1)


def bench(args):
    """A table of the chosen model's step time, or (--report) the small and large model's (docs/gpu.md)."""
    cfg = model_config(args)
    configs = [replace(cfg, **SIZES[size]) for size in ("small", "large")] if args.report else [cfg]
    xp = select_backend(args.device, sorted({cfg.d_model for cfg in configs}))
    slices = cpu_slices(xp, args.threads, args.slices)
    print(f"backend: {describe_backend(xp, slices)}; the median of {args.steps} steps after an untimed one")
    print("| model | batch x seq | ms/step | bytes/s | traffic floor | achieved | launches/step | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        check_memory(cfg, xp)
        ms, launches = time_training_steps(cfg, xp, slices, args.steps)
        # A floor on a step's memory traffic in bytes: per position and block the backward's 16 d floats and their
        # gradients are each written once and read once (4 passes); the (N, V) logits take 6; parameters left out.
        traffic = 4 * cfg.batch_size * cfg.seq_len * (cfg.n_layers * 16 * cfg.d_model * 4 + 6 * V)
        if xp is np:
            import resource  # (not on Windows)
            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB peak (process)"
        else:
            memory = f"{cupy.get_default_memory_pool().total_bytes() / 2**20:,.0f} MiB (CuPy's pool)"
        print(f"| d={cfg.d_model}, L={cfg.n_layers} | {cfg.batch_size} x {cfg.seq_len} | {ms:.2f} | "
              f"{cfg.batch_size * cfg.seq_len / ms * 1000:,.0f} | {traffic / 1e9:.2f} GB | "
              f"{traffic / 1e6 / ms:,.0f} GB/s | {'not counted' if launches is None else launches} | {memory} |")
    return 0


# ----------------------------------------------------------------------------
# Command line: the commands, and the flags that are not settings (those are SETTINGS', above).

COMMANDS = {  # name -> what it does, the function that runs it
    "train": ("train a model (defaults: the published run, one epoch)", train),
    "sample": ("generate text from a checkpoint", sample),
    "eval": ("loss, accuracy and bits/byte of a checkpoint on a split", evaluate_checkpoint),
    "bench": ("time training steps on random bytes: ms/step and bytes/s", bench),
    "check": ("every gradient against finite differences, on a tiny model", lambda args: int(not gradient_check())),
}
CKPT = "checkpoints/mora.npz"
FLAGS = [  # the commands that take it, the flag, argparse's arguments for it
    ("train eval sample bench", "--device", dict(choices=["auto", "cpu", "gpu"], default="auto", help="auto: the GPU "
                                                 "when CuPy can use one, else the CPU (default auto)")),
    ("train bench", "--size", dict(choices=sorted(SIZES),
                                   help="small: d=64 (284,184 params); large: d=128 (1,092,632) (default small)")),
    ("train eval", "--data-dir", dict(default="data", help="the folder holding train.bin and val.bin (default data)")),
    ("train eval bench", "--threads", dict(type=positive_int, help="CPU worker threads (default: every core)")),
    ("train", "--ckpt", dict(default=CKPT, help=f"the run to write or --resume, its .csv log and .samples.txt beside "
                                                f"it (default {CKPT})")),
    ("eval sample", "--ckpt", dict(default=CKPT, help=f"the checkpoint to read (default {CKPT})")),
    ("train", "--resume", dict(action="store_true", help="continue the run in --ckpt exactly where it stopped")),
    ("train", "--overwrite", dict(action="store_true", help="start over even if --ckpt exists")),
    ("train", "--stop-after", dict(type=positive_int, help="save and stop after N more steps, on the run's schedule")),
    ("train", "--sample-prompt", dict(default="Once upon a time", help="each evaluation's sample continues this (not "
                                                                       "empty; default: Once upon a time)")),
    ("train", "--sample-length", dict(type=nonnegative_int, default=120, help="bytes a sample (default 120; 0: none)")),
    ("sample", "--prompt", dict(default="Once upon a time", help="the text to continue (default: Once upon a time)")),
    ("sample", "--length", dict(type=nonnegative_int, default=500, help="bytes to generate (default 500)")),
    ("sample", "--temperature", dict(type=nonnegative_float, default=0.8, help="0: greedy (default 0.8)")),
    ("sample", "--top-k", dict(type=nonnegative_int, default=0, help="sample among the k likeliest (default 0: all)")),
    ("sample", "--seed", dict(type=nonnegative_int, default=0, help="default 0")),
    ("eval", "--batch-size", dict(type=positive_int, help=f"records a batch (default {EVAL_BATCH})")),
    ("eval", "--split", dict(choices=["val", "train", "test"], default="val", help="default val")),
    ("eval", "--max-bytes", dict(type=nonnegative_int, default=0, help="only the first N bytes (default 0: all)")),
    ("eval", "--stream", dict(action="store_true", help="read the split as long texts, not each record alone")),
    ("eval", "--streams", dict(type=positive_int, help=f"--stream as N texts side by side (default {EVAL_STREAMS})")),
    ("eval", "--seq-len", dict(type=positive_int, help="records of N + 1 bytes, or chunks of N with --stream (default: "
                                                       "the checkpoint's seq_len; 64 reads val as nanoGPT's windows)")),
    ("bench", "--steps", dict(type=positive_int, default=10, help="timed steps (default 10)")),
    ("bench", "--report", dict(action="store_true", help="the small and the large model (docs/gpu.md)")),
]
SETTING_FLAGS = {"train": [name for name, setting in SETTINGS.items() if setting.help],  # each setting's flag, its rule
                 "bench": ["d_model", "n_layers", "seq_len", "batch_size", "slices"]}


def build_parser():
    parser = argparse.ArgumentParser(prog="mora.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (text, _) in COMMANDS.items():
        p = commands.add_parser(name, help=text, description=text)
        for takers, flag, arguments in FLAGS:
            if name in takers.split():
                p.add_argument(flag, **arguments)
        add_setting_flags(p, SETTING_FLAGS.get(name, []))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if sys.stdout is None:  # started with its output closed (`>&-`): what it says would be lost
            raise UserError("the standard output is closed: give it a file, e.g. > out.txt (or /dev/null)")
        for stream in (sys.stdout, sys.stderr):  # a character the terminal cannot show (latin-1, say) becomes '?'
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")
        return COMMANDS[args.command][1](args)
    except BrokenPipeError:  # `mora.py sample | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (UserError, OSError) as exc:  # a mistake to fix, or the file system said no: what and where, in one line
        what = exc if isinstance(exc, UserError) else f"{exc.strerror or exc}: {exc.filename or 'the output'}"
        print(f"error: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (which says what it saved): nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------
# Appendix: fused GPU kernels.  On the GPU every array operation above is a kernel
# launch, and the mixer's loop over time alone would be ~16,000 launches a step.
# These CUDA kernels compute exactly what the plain functions above compute (those
# define them; test_mora.py checks each kernel against its plain twin, on the GPU
# when there is one and everywhere by compiling this same source as C++), in one
# pass: for the mixer one thread per (batch row, channel) walks the time axis; the
# block's per-position parts (BLOCK_SOURCE) take a thread per position, which holds
# its row of d numbers in registers and does the small matmuls itself, reading the
# weights that every thread reads at once (so one load serves the whole warp), as
# fully fused MLPs do for narrow layers (tiny-cuda-nn).  The weight gradients, sums
# over all positions, stay with cuBLAS.  Constants come from Python as -D options.
# Used for float32 CuPy arrays while USE_KERNELS, once gpu_problem finds that CuPy works.

USE_KERNELS = True

CUDA_SOURCE = r"""
__device__ float sigmoid(float x) { return 0.5f * tanhf(0.5f * x) + 0.5f; }

// mixer_forward: thread i = b * d + j (batch row b, channel j) walks t = 0 .. T-1.
// vzq: (T, B, 3d) rows [v | z | q].  Writes gated, c, a: (T, B, d); the state after: (B, d).
extern "C" __global__ void mixer_forward(
        const float* __restrict__ vzq, const float* __restrict__ mix, const float* __restrict__ c_init,
        const float* __restrict__ sum_init, float count_init, int T, int B, int d,
        float* __restrict__ gated, float* __restrict__ c, float* __restrict__ a,
        float* __restrict__ c_last, float* __restrict__ sum_last) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * d) return;
    int b = i / d, j = i % d;
    float mix_c = mix[0], mix_a = mix[1], mix_e = mix[2];
    float memory = c_init[i], total = sum_init[i];
    for (int t = 0; t < T; t++) {
        const float* row = vzq + ((long long)t * B + b) * 3 * d;
        float v = row[j], beta = sigmoid(row[d + j]), gate = sigmoid(row[2 * d + j]);
        float delta = v - memory;                  // e_t = v_t - c_{t-1}
        memory += beta * delta;                    // c_t = c_{t-1} + beta_t e_t
        total += v;
        float mean = total / (count_init + t + 1);  // a_t
        long long o = (long long)t * B * d + i;
        c[o] = memory;
        a[o] = mean;
        gated[o] = gate * (mix_c * memory + mix_a * mean + mix_e * delta);
    }
    c_last[i] = memory;
    sum_last[i] = total;
}

// mixer_backward: the same threads walk t = T-1 .. 0, carrying dL/dc from later
// steps (carry) and the reversed running sum of da / (count_init + t + 1) (mean_carry).
// Writes dvzq: (T, B, 3d) and each thread's share of dmix: (3, B * d).
extern "C" __global__ void mixer_backward(
        const float* __restrict__ dgated, const float* __restrict__ vzq, const float* __restrict__ mix,
        const float* __restrict__ c_init, const float* __restrict__ c, const float* __restrict__ a,
        float count_init, int T, int B, int d, float* __restrict__ dvzq, float* __restrict__ dmix_parts) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * d) return;
    int b = i / d, j = i % d;
    float mix_c = mix[0], mix_a = mix[1], mix_e = mix[2];
    float carry = 0.0f, mean_carry = 0.0f, dmix_c = 0.0f, dmix_a = 0.0f, dmix_e = 0.0f;
    for (int t = T - 1; t >= 0; t--) {
        const float* row = vzq + ((long long)t * B + b) * 3 * d;
        float v = row[j], beta = sigmoid(row[d + j]), gate = sigmoid(row[2 * d + j]);
        long long o = (long long)t * B * d + i;
        float memory = c[o], mean = a[o];
        float delta = v - (t > 0 ? c[o - (long long)B * d] : c_init[i]);
        float m = mix_c * memory + mix_a * mean + mix_e * delta;
        float dm = dgated[o] * gate;
        float dq = dgated[o] * m * gate * (1.0f - gate);
        dmix_c += dm * memory;
        dmix_a += dm * mean;
        dmix_e += dm * delta;
        float dc_total = mix_c * dm + carry;       // the whole dL/dc_t
        float de = mix_e * dm;
        mean_carry += mix_a * dm / (count_init + t + 1);
        float dbeta = dc_total * delta;
        carry = (1.0f - beta) * dc_total - de;     // to c_{t-1}
        float* out = dvzq + ((long long)t * B + b) * 3 * d;
        out[j] = beta * dc_total + de + mean_carry;
        out[d + j] = dbeta * beta * (1.0f - beta);
        out[2 * d + j] = dq;
    }
    dmix_parts[i] = dmix_c;
    dmix_parts[B * d + i] = dmix_a;
    dmix_parts[2 * B * d + i] = dmix_e;
}

// layernorm_forward without gain and bias (the final norm; the blocks' LayerNorms
// are in BLOCK_SOURCE): xhat = (x - mean) rstd, rstd = 1 / sqrt(var + eps).  A thread per row.
extern "C" __global__ void layernorm_forward(
        const float* __restrict__ x, long long rows, int d, float* __restrict__ xhat, float* __restrict__ rstd) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = x + r * d;
    float mean = 0.0f, var = 0.0f;
    for (int j = 0; j < d; j++) mean += row[j];
    mean /= d;
    for (int j = 0; j < d; j++) var += (row[j] - mean) * (row[j] - mean);
    float s = 1.0f / sqrtf(var / d + LN_EPS);
    rstd[r] = s;
    for (int j = 0; j < d; j++) xhat[r * d + j] = (row[j] - mean) * s;
}

// layernorm_backward without gain: dx = rstd (dy - mean(dy) - xhat mean(dy xhat)).  A thread per row.
extern "C" __global__ void layernorm_backward(
        const float* __restrict__ dy, const float* __restrict__ xhat, const float* __restrict__ rstd,
        long long rows, int d, float* __restrict__ dx) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    long long o = r * d;
    float mean_dy = 0.0f, mean_dy_xhat = 0.0f;
    for (int j = 0; j < d; j++) {
        mean_dy += dy[o + j];
        mean_dy_xhat += dy[o + j] * xhat[o + j];
    }
    mean_dy /= d;
    mean_dy_xhat /= d;
    for (int j = 0; j < d; j++) dx[o + j] = rstd[r] * (dy[o + j] - mean_dy - xhat[o + j] * mean_dy_xhat);
}

// cross_entropy_forward: one thread per row of V logits.  probs = softmax (kept for the
// backward), loss = log(sum exp(l - max)) - (l[y] - max), correct = 1 when l[y] is the max.
extern "C" __global__ void cross_entropy_forward(
        const float* __restrict__ logits, const int* __restrict__ y, long long rows, int V,
        float* __restrict__ probs, float* __restrict__ losses, float* __restrict__ correct) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = logits + r * V;
    float top = row[0], sum_exp = 0.0f;
    for (int j = 1; j < V; j++) top = fmaxf(top, row[j]);
    for (int j = 0; j < V; j++) sum_exp += expf(row[j] - top);
    for (int j = 0; j < V; j++) probs[r * V + j] = expf(row[j] - top) / sum_exp;
    float picked = row[y[r]] - top;
    losses[r] = logf(sum_exp) - picked;
    correct[r] = picked == 0.0f ? 1.0f : 0.0f;
}

// cross_entropy_backward: dlogits = scale * (probs - onehot(y)), one thread per element.
extern "C" __global__ void cross_entropy_backward(
        const float* __restrict__ probs, const int* __restrict__ y, long long n, int V, float scale,
        float* __restrict__ dlogits) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dlogits[i] = scale * (probs[i] - (y[i / V] == (int)(i % V) ? 1.0f : 0.0f));
}

// adam_update: one thread per parameter, everything in place (m, v: Adam's moments;
// correction1, correction2 = 1 - beta1^step, 1 - beta2^step).
extern "C" __global__ void adam_update(
        float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m, float* __restrict__ v,
        long long n, float lr, float beta1, float beta2, float eps, float correction1, float correction2) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad[i];
    float m_i = beta1 * m[i] + (1.0f - beta1) * g;
    float v_i = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = m_i;
    v[i] = v_i;
    param[i] -= lr * (m_i / correction1) / (sqrtf(v_i / correction2) + eps);
}
"""

# The block's per-position parts for one width D (a -D option: the rows live in
# registers, which need sizes known when compiling).  Row r of a (T, B, k) array is
# position r = t B + b.  Loops over a register row are unrolled (the only way it
# stays in registers); the other loops read memory.
BLOCK_SOURCE = r"""
__device__ __forceinline__ float gelu_tanh(float x) { return tanhf(GELU_K * (x + GELU_A * x * x * x)); }

// x := LayerNorm(x) gain + bias in place, for a row x in registers; writes xhat and rstd.
__device__ __forceinline__ void layernorm_row(float (&x)[D], const float* __restrict__ gain,
                                              const float* __restrict__ bias, float* __restrict__ xhat,
                                              float* __restrict__ rstd) {
    float mean = 0.0f, var = 0.0f;
    #pragma unroll
    for (int k = 0; k < D; k++) mean += x[k];
    mean /= D;
    #pragma unroll
    for (int k = 0; k < D; k++) var += (x[k] - mean) * (x[k] - mean);
    float s = 1.0f / sqrtf(var / D + LN_EPS);
    *rstd = s;
    #pragma unroll
    for (int k = 0; k < D; k++) {
        float n = (x[k] - mean) * s;
        xhat[k] = n;
        x[k] = n * gain[k] + bias[k];
    }
}

// dx := LayerNorm's backward of dy (registers, overwritten) with the gain; partial
// receives dy * xhat (its column sums are dgain) and dy (dbias).
__device__ __forceinline__ void layernorm_row_backward(float (&dy)[D], const float* __restrict__ xhat,
                                                       float rstd, const float* __restrict__ gain,
                                                       float* __restrict__ partial) {
    float mean_dn = 0.0f, mean_dn_xhat = 0.0f;
    #pragma unroll
    for (int k = 0; k < D; k++) {
        mean_dn += dy[k] * gain[k];
        mean_dn_xhat += dy[k] * gain[k] * xhat[k];
        partial[k] = dy[k] * xhat[k];
        partial[D + k] = dy[k];
    }
    mean_dn /= D;
    mean_dn_xhat /= D;
    #pragma unroll
    for (int k = 0; k < D; k++) dy[k] = rstd * (dy[k] * gain[k] - mean_dn - xhat[k] * mean_dn_xhat);
}

// block_input_forward: u = LayerNorm1(h) (kept, with xhat and rstd), vzq = u @ w_in + b_in.
extern "C" __global__ void block_input_forward(
        const float* __restrict__ h, const float* __restrict__ ln_gain, const float* __restrict__ ln_bias,
        const float* __restrict__ w_in, const float* __restrict__ b_in, long long rows,
        float* __restrict__ u, float* __restrict__ xhat, float* __restrict__ rstd, float* __restrict__ vzq) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float x[D];
    #pragma unroll
    for (int k = 0; k < D; k++) x[k] = h[r * D + k];
    layernorm_row(x, ln_gain, ln_bias, xhat + r * D, rstd + r);
    #pragma unroll
    for (int k = 0; k < D; k++) u[r * D + k] = x[k];
    for (int j = 0; j < 3 * D; j++) {
        float sum = b_in[j];
        #pragma unroll
        for (int k = 0; k < D; k++) sum += x[k] * w_in[k * 3 * D + j];
        vzq[r * 3 * D + j] = sum;
    }
}

// block_input_backward: du = dvzq @ w_in^T, dh = LayerNorm1's backward of du.
// partial (rows, 5D): [du xhat | du | dvzq], whose column sums are dgain, dbias, db_in.
extern "C" __global__ void block_input_backward(
        const float* __restrict__ dvzq, const float* __restrict__ xhat, const float* __restrict__ rstd,
        const float* __restrict__ ln_gain, const float* __restrict__ w_in, long long rows,
        float* __restrict__ dh, float* __restrict__ partial) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float* part = partial + r * 5 * D;
    float du[D];
    #pragma unroll
    for (int k = 0; k < D; k++) du[k] = 0.0f;
    for (int j = 0; j < 3 * D; j++) {
        float g = dvzq[r * 3 * D + j];
        part[2 * D + j] = g;
        #pragma unroll
        for (int k = 0; k < D; k++) du[k] += g * w_in[k * 3 * D + j];
    }
    layernorm_row_backward(du, xhat + r * D, rstd[r], ln_gain, part);
    #pragma unroll
    for (int k = 0; k < D; k++) dh[r * D + k] = du[k];
}

// block_output_forward: h += gated @ w_out + b_out;  u2 = LayerNorm2(h);
// pre = u2 @ w_up + b_up;  act = gelu(pre) (t = its tanh, kept);  h += act @ w_down + b_down.
extern "C" __global__ void block_output_forward(
        const float* __restrict__ h, const float* __restrict__ gated, const float* __restrict__ w_out,
        const float* __restrict__ b_out, const float* __restrict__ ln_gain, const float* __restrict__ ln_bias,
        const float* __restrict__ w_up, const float* __restrict__ b_up, const float* __restrict__ w_down,
        const float* __restrict__ b_down, long long rows, float* __restrict__ h_out, float* __restrict__ xhat,
        float* __restrict__ rstd, float* __restrict__ u2, float* __restrict__ pre, float* __restrict__ t,
        float* __restrict__ act) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float stream[D], x[D];  // the residual stream's row; the LayerNorm's output row
    #pragma unroll
    for (int j = 0; j < D; j++) stream[j] = h[r * D + j] + b_out[j];
    for (int k = 0; k < D; k++) {
        float g = gated[r * D + k];
        #pragma unroll
        for (int j = 0; j < D; j++) stream[j] += g * w_out[k * D + j];
    }
    #pragma unroll
    for (int k = 0; k < D; k++) x[k] = stream[k];
    layernorm_row(x, ln_gain, ln_bias, xhat + r * D, rstd + r);
    #pragma unroll
    for (int k = 0; k < D; k++) {
        u2[r * D + k] = x[k];
        stream[k] += b_down[k];
    }
    for (int j = 0; j < 2 * D; j++) {
        float p = b_up[j];
        #pragma unroll
        for (int k = 0; k < D; k++) p += x[k] * w_up[k * 2 * D + j];
        float tj = gelu_tanh(p), a = 0.5f * p * (1.0f + tj);
        pre[r * 2 * D + j] = p;
        t[r * 2 * D + j] = tj;
        act[r * 2 * D + j] = a;
        #pragma unroll
        for (int i = 0; i < D; i++) stream[i] += a * w_down[j * D + i];
    }
    #pragma unroll
    for (int k = 0; k < D; k++) h_out[r * D + k] = stream[k];
}

// block_output_backward, from dh at the block's output: dpre = (dh @ w_down^T) gelu'(pre);
// du2 = dpre @ w_up^T;  dh_mid = dh + LayerNorm2's backward of du2;  dgated = dh_mid @ w_out^T.
// partial (rows, 6D): [du2 xhat | du2 | dpre | dh_mid | dh], column sums dgain, dbias,
// db_up, db_out, db_down.
extern "C" __global__ void block_output_backward(
        const float* __restrict__ dh, const float* __restrict__ pre, const float* __restrict__ t,
        const float* __restrict__ xhat, const float* __restrict__ rstd, const float* __restrict__ ln_gain,
        const float* __restrict__ w_up, const float* __restrict__ w_down, const float* __restrict__ w_out,
        long long rows, float* __restrict__ dgated, float* __restrict__ dh_mid, float* __restrict__ dpre,
        float* __restrict__ partial) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float* part = partial + r * 6 * D;
    float grad[D], du2[D];  // dh, then dh_mid; dL/du2
    #pragma unroll
    for (int k = 0; k < D; k++) {
        grad[k] = dh[r * D + k];
        part[5 * D + k] = grad[k];
        du2[k] = 0.0f;
    }
    for (int j = 0; j < 2 * D; j++) {
        float dact = 0.0f;
        #pragma unroll
        for (int i = 0; i < D; i++) dact += grad[i] * w_down[j * D + i];
        float x = pre[r * 2 * D + j], tj = t[r * 2 * D + j];
        float slope = 0.5f * (1.0f + tj) + 0.5f * x * (1.0f - tj * tj) * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
        float dp = dact * slope;
        dpre[r * 2 * D + j] = dp;
        part[2 * D + j] = dp;
        #pragma unroll
        for (int k = 0; k < D; k++) du2[k] += dp * w_up[k * 2 * D + j];
    }
    layernorm_row_backward(du2, xhat + r * D, rstd[r], ln_gain, part);
    #pragma unroll
    for (int k = 0; k < D; k++) {
        grad[k] += du2[k];
        dh_mid[r * D + k] = grad[k];
        part[4 * D + k] = grad[k];
    }
    for (int k = 0; k < D; k++) {
        float sum = 0.0f;
        #pragma unroll
        for (int i = 0; i < D; i++) sum += grad[i] * w_out[k * D + i];
        dgated[r * D + k] = sum;
    }
}
"""

# The constants the kernels share with the Python above, as compiler options.
KERNEL_DEFINES = (f"-DLN_EPS={LN_EPS!r}f", f"-DGELU_K={GELU_K!r}f", f"-DGELU_A={GELU_A!r}f")


def on_gpu(a):
    """Whether a layer hands `a` to its fused kernel: float32 CuPy arrays, while USE_KERNELS."""
    return USE_KERNELS and cupy is not None and isinstance(a, cupy.ndarray) and a.dtype == np.float32


def kernel_options(width=None):
    """The -D options: the shared constants, and for BLOCK_SOURCE the model width."""
    return KERNEL_DEFINES if width is None else KERNEL_DEFINES + (f"-DD={width}",)


@functools.lru_cache(maxsize=None)
def cuda_module(width=None):
    """CUDA_SOURCE (width None) or BLOCK_SOURCE for a model width, compiled by NVRTC
    (through CuPy) on first use."""
    return cupy.RawModule(code=CUDA_SOURCE if width is None else BLOCK_SOURCE, options=kernel_options(width))


def launch(name, n_threads, args, width=None, block=256):
    cuda_module(width).get_function(name)(((n_threads + block - 1) // block,), (block,), args)


FUSED = {}  # a plain layer's name -> (the plain function, the dispatcher that `fuses` made for it)


def fuses(layer, when):
    """Decorator: the one place where the maths above meets the GPU.  It makes a
    dispatcher for the plain function `layer` that calls the decorated launcher when
    `when(*args)` holds (float32 CuPy arrays, while USE_KERNELS), and the plain code
    otherwise: on NumPy, and on CuPy with USE_KERNELS off, which is how the tests
    compare each kernel with the plain function that defines it.  The dispatcher takes
    the module's name of `layer` only once a GPU is found (`fuse_kernels`)."""
    def register(launcher):
        @functools.wraps(layer)  # the plain function stays reachable as __wrapped__
        def dispatch(*args, **kwargs):
            if when(*args, **kwargs):
                return globals()[launcher.__name__](*args, **kwargs)  # looked up by name: a test may swap a launcher
            return layer(*args, **kwargs)
        FUSED[layer.__name__] = (layer, dispatch)
        return launcher
    return register


def fuse_kernels(on):
    """Put the dispatchers in place of the fused layers (gpu_problem, once CuPy works),
    or the plain functions back (on the CPU): there the layers are the maths itself,
    with no frame between a caller and the plain function."""
    for name, (plain, dispatch) in FUSED.items():
        globals()[name] = dispatch if on else plain


NO_CUPY = "CuPy is not installed (pip install 'cupy-cuda12x[ctk]', see README)"


def gpu_problem(widths=()):
    """None when CuPy can run here (then `cupy` is set, the kernels fused in, matmuls in TF32 unless CUPY_TF32=0),
    else why not.  A small matmul and the kernels (for each width) run now, so a broken driver fails here."""
    global cupy
    os.environ.setdefault("CUPY_TF32", "1")
    try:
        import cupy as module
        if module.cuda.runtime.getDeviceCount() < 1:
            return "CuPy finds no CUDA GPU"
        cupy = module
        float((cupy.ones((4, 4), dtype=np.float32) @ cupy.ones(4, dtype=np.float32)).sum())  # cuBLAS loads
        cuda_module().get_function("adam_update")  # CuPy compiles a module when first asked for a kernel
        for width in widths:
            cuda_module(width).get_function("block_input_forward")
    except Exception as exc:  # an import or a driver that fails in any of many ways: the CPU, and why
        cupy = None
        if isinstance(exc, ModuleNotFoundError) and exc.name == "cupy":
            return NO_CUPY
        first_line = str(exc).partition("\n")[0][:160]
        return f"CuPy cannot use the GPU ({exc.__class__.__name__}: {first_line})"
    fuse_kernels(True)  # from here the fused layers call their kernels on float32 CuPy arrays
    return None


# The caches of the launchers that keep what their kernels need, which is not what the
# plain layers keep: the mixer kernel recomputes beta, e and the gate from vzq and c,
# and a block kernel keeps its own intermediates.  The layer norm and cross-entropy
# launchers keep what their plain twins keep, in the same types.
FusedMixerCache = namedtuple("FusedMixerCache", "vzq mix c_init c a count_init")
FusedBlockInputCache = namedtuple("FusedBlockInputCache", "u xhat rstd p")
FusedBlockOutputCache = namedtuple("FusedBlockOutputCache", "gated xhat rstd u2 pre t act p")


@fuses(mixer_forward, when=lambda vzq, mix, state: on_gpu(vzq))
def gpu_mixer_forward(vzq, mix, state):
    T, B, d = vzq.shape[0], vzq.shape[1], vzq.shape[2] // 3
    vzq = cupy.ascontiguousarray(vzq)
    c_init, sum_init = (cupy.ascontiguousarray(s) for s in state[:2])
    count_init = state[2]
    gated, c, a = (cupy.empty((T, B, d), dtype=np.float32) for _ in range(3))
    c_last, sum_last = cupy.empty((B, d), np.float32), cupy.empty((B, d), np.float32)
    launch("mixer_forward", B * d, (vzq, mix, c_init, sum_init, np.float32(count_init), np.int32(T),
                                    np.int32(B), np.int32(d), gated, c, a, c_last, sum_last))
    return gated, FusedMixerCache(vzq, mix, c_init, c, a, count_init), (c_last, sum_last, count_init + T)


@fuses(mixer_backward, when=lambda dgated, cache: on_gpu(dgated))
def gpu_mixer_backward(dgated, cache):
    T, B, d = cache.c.shape
    dvzq = cupy.empty_like(cache.vzq)
    dmix_parts = cupy.empty((3, B * d), dtype=np.float32)
    launch("mixer_backward", B * d, (cupy.ascontiguousarray(dgated), cache.vzq, cache.mix, cache.c_init, cache.c, cache.a,
                                     np.float32(cache.count_init),
                                     np.int32(T), np.int32(B), np.int32(d), dvzq, dmix_parts))
    return dvzq, dmix_parts.sum(1)


# The final norm (no gain); the blocks' norms are inside the block kernels.
@fuses(layernorm_forward, when=lambda x, gain=None, bias=None: on_gpu(x) and gain is None)
def gpu_layernorm_forward(x, gain=None, bias=None):
    x = cupy.ascontiguousarray(x)
    d = x.shape[-1]
    rows = x.size // d
    xhat, rstd = cupy.empty_like(x), cupy.empty((*x.shape[:-1], 1), np.float32)
    launch("layernorm_forward", rows, (x, np.int64(rows), np.int32(d), xhat, rstd))
    return xhat, LayerNormCache(xhat, rstd, None)


@fuses(layernorm_backward, when=lambda dy, cache: on_gpu(dy) and cache.gain is None)
def gpu_layernorm_backward(dy, cache):
    xhat, rstd = cache.xhat, cache.rstd
    d = xhat.shape[-1]
    rows = xhat.size // d
    dx = cupy.empty_like(xhat)
    launch("layernorm_backward", rows, (cupy.ascontiguousarray(dy), xhat, rstd, np.int64(rows), np.int32(d), dx))
    return dx, None, None


BLOCK_THREADS = 128  # threads per CUDA block for the block kernels: each holds two rows of d floats in registers


@fuses(block_input_forward, when=lambda p, h: on_gpu(h))
def gpu_block_input_forward(p, h):
    h = cupy.ascontiguousarray(h)
    d = h.shape[-1]
    rows = h.size // d
    u, xhat = cupy.empty_like(h), cupy.empty_like(h)
    rstd, vzq = cupy.empty((*h.shape[:-1], 1), np.float32), cupy.empty((*h.shape[:-1], 3 * d), np.float32)
    launch("block_input_forward", rows, (h, p["ln1.g"], p["ln1.b"], p["w_in"], p["b_in"], np.int64(rows),
                                         u, xhat, rstd, vzq), width=d, block=BLOCK_THREADS)
    return vzq, FusedBlockInputCache(u, xhat, rstd, p)


@fuses(block_input_backward, when=lambda dvzq, cache: on_gpu(dvzq))
def gpu_block_input_backward(dvzq, cache):
    u, xhat, rstd, p = cache.u, cache.xhat, cache.rstd, cache.p
    d = u.shape[-1]
    rows = u.size // d
    dvzq = cupy.ascontiguousarray(dvzq)
    dh, partial = cupy.empty_like(u), cupy.empty((rows, 5 * d), np.float32)
    launch("block_input_backward", rows, (dvzq, xhat, rstd, p["ln1.g"], p["w_in"], np.int64(rows), dh, partial),
           width=d, block=BLOCK_THREADS)
    sums = partial.sum(0)  # (5d,) one reduction for three gradients
    grads = {"w_in": u.reshape(rows, d).T @ dvzq.reshape(rows, 3 * d),
             "ln1.g": sums[:d], "ln1.b": sums[d:2 * d], "b_in": sums[2 * d:]}
    return dh, grads


@fuses(block_output_forward, when=lambda p, h, gated: on_gpu(h))
def gpu_block_output_forward(p, h, gated):
    h, gated = cupy.ascontiguousarray(h), cupy.ascontiguousarray(gated)
    d = h.shape[-1]
    rows = h.size // d
    h_out, xhat, u2 = (cupy.empty_like(h) for _ in range(3))
    rstd = cupy.empty((*h.shape[:-1], 1), np.float32)
    pre, t, act = (cupy.empty((*h.shape[:-1], 2 * d), np.float32) for _ in range(3))
    launch("block_output_forward", rows, (h, gated, p["w_out"], p["b_out"], p["ln2.g"], p["ln2.b"], p["w_up"], p["b_up"],
                                          p["w_down"], p["b_down"], np.int64(rows), h_out, xhat, rstd, u2, pre, t, act),
           width=d, block=BLOCK_THREADS)
    return h_out, FusedBlockOutputCache(gated, xhat, rstd, u2, pre, t, act, p)


@fuses(block_output_backward, when=lambda dh, cache: on_gpu(dh))
def gpu_block_output_backward(dh, cache):
    p, d = cache.p, cache.gated.shape[-1]
    rows = cache.gated.size // d
    dh = cupy.ascontiguousarray(dh)
    dgated, dh_mid, dpre = cupy.empty_like(cache.gated), cupy.empty_like(cache.gated), cupy.empty_like(cache.pre)
    partial = cupy.empty((rows, 6 * d), np.float32)
    launch("block_output_backward", rows, (dh, cache.pre, cache.t, cache.xhat, cache.rstd, p["ln2.g"], p["w_up"], p["w_down"],
                                           p["w_out"], np.int64(rows), dgated, dh_mid, dpre, partial), width=d,
           block=BLOCK_THREADS)
    sums = partial.sum(0)  # (6d,) one reduction for five gradients

    def by_rows(a):
        return a.reshape(rows, -1)
    grads = {"w_down": by_rows(cache.act).T @ by_rows(dh), "w_up": by_rows(cache.u2).T @ by_rows(dpre),
             "w_out": by_rows(cache.gated).T @ by_rows(dh_mid), "ln2.g": sums[:d], "ln2.b": sums[d:2 * d],
             "b_up": sums[2 * d:4 * d], "b_out": sums[4 * d:5 * d], "b_down": sums[5 * d:]}
    return dgated, dh_mid, grads


@fuses(cross_entropy_forward, when=lambda logits, y: on_gpu(logits))
def gpu_cross_entropy_forward(logits, y):
    rows, n_classes = logits.shape
    logits, y = cupy.ascontiguousarray(logits), cupy.ascontiguousarray(y, dtype=np.int32)
    probs = cupy.empty_like(logits)
    losses, correct = cupy.empty(rows, np.float32), cupy.empty(rows, np.float32)
    launch("cross_entropy_forward", rows, (logits, y, np.int64(rows), np.int32(n_classes), probs, losses, correct))
    return losses, correct, CrossEntropyCache(probs, y)


# The mean loss's backward (a scalar dlosses); per-position weights take the plain path.
@fuses(cross_entropy_backward, when=lambda dlosses, cache: on_gpu(cache.probs) and np.ndim(dlosses) == 0)
def gpu_cross_entropy_backward(dlosses, cache):
    probs, y = cache.probs, cache.y
    dlogits = cupy.empty_like(probs)
    launch("cross_entropy_backward", probs.size, (probs, y, np.int64(probs.size), np.int32(probs.shape[1]),
                                                  np.float32(dlosses), dlogits))
    return dlogits


@fuses(adam_update, when=lambda param, *args, **kwargs: on_gpu(param))
def gpu_adam_update(param, grad, m, v, step, lr, beta1=TrainSettings.beta1, beta2=TrainSettings.beta2, eps=TrainSettings.eps):
    args = (param, grad, m, v, np.int64(param.size), np.float32(lr), np.float32(beta1), np.float32(beta2),
            np.float32(eps), np.float32(1.0 - beta1 ** step), np.float32(1.0 - beta2 ** step))
    launch("adam_update", param.size, args)


if __name__ == "__main__":
    sys.exit(main())
