"""Tests for MORA: gradients against finite differences, the recurrence against the
full forward, Adam against its formula, data preparation, training end to end,
exact resume, and the errors a user sees.  Run: python -m pytest -q test_mora.py

Everything here makes its own small text: no network, no downloaded data."""
import contextlib
import hashlib
import html.parser
import http.server
import inspect
import io
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

import mora
import prepare_data

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--d-model", "8", "--n-layers", "2", "--seq-len", "16", "--batch-size", "4"]


def made_up_text(n_stories=60, seed=0):
    """Short repetitive stories with <|endoftext|> separators, some non-ASCII bytes."""
    rng = np.random.default_rng(seed)
    names, things = ["Tom", "Lily", "Ben", "Zoë"], ["ball", "cat", "tree", "cake"]
    stories = []
    for _ in range(n_stories):
        name, thing = rng.choice(names), rng.choice(things)
        stories.append(f"Once upon a time, {name} had a {thing}. {name} loved the {thing} very much. "
                       f"One day the {thing} was lost, and {name} was sad. Then {name} found it. The end.\n")
    return "<|endoftext|>\n".join(stories).encode("utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "train.txt").write_bytes(made_up_text(80, seed=0))
    (root / "val.txt").write_bytes(made_up_text(20, seed=1))
    out = root / "data"
    assert prepare_data.main(["--out-dir", str(out), "--input-train", str(root / "train.txt"),
                              "--input-val", str(root / "val.txt")]) == 0
    return str(out)


# ----------------------------------------------------------------------------
# Gradients: central finite differences in float64

def numeric_gradient(f, array, h=1e-6):
    """d f() / d array by central differences, perturbing `array` in place."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


def relative_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def check_layer(forward, backward, inputs, n_outputs=1, seed=99):
    """Compare a layer's backward with finite differences of sum(out * G) for random
    upstream gradients G, for every input array in `inputs`."""
    rng = np.random.default_rng(seed)
    outputs = forward(*inputs)[:n_outputs]
    upstream = [rng.standard_normal(o.shape) for o in outputs]
    analytic = backward(*upstream, forward(*inputs)[n_outputs])

    def scalar():
        return sum(float((o * g).sum()) for o, g in zip(forward(*inputs)[:n_outputs], upstream))

    for array, grad in zip(inputs, analytic):
        if grad is None:
            continue
        assert relative_error(numeric_gradient(scalar, array), grad) < 1e-7


def test_layer_backwards_match_finite_differences():
    rng = np.random.default_rng(0)
    T, B, d = 6, 3, 5
    x = rng.standard_normal((T, B, d))
    g, b = 1 + 0.1 * rng.standard_normal(d), rng.standard_normal(d)
    check_layer(lambda x, g, b: mora.layernorm_forward(x, g, b),
                lambda dy, cache: mora.layernorm_backward(dy, cache), [x, g, b])
    check_layer(lambda x: mora.layernorm_forward(x),
                lambda dy, cache: mora.layernorm_backward(dy, cache)[:1], [x.copy()])
    W, bias = rng.standard_normal((d, 7)), rng.standard_normal(7)
    check_layer(lambda x, W, bias: mora.linear_forward(x, W, bias),
                lambda dy, cache: mora.linear_backward(dy, cache), [x.copy(), W, bias])
    check_layer(lambda x: mora.gelu_forward(x), lambda dy, cache: [mora.gelu_backward(dy, cache)], [x.copy()])
    check_layer(lambda x: mora.sigmoid_forward(x), lambda dy, cache: [mora.sigmoid_backward(dy, cache)], [x.copy()])
    v, beta = rng.standard_normal((T, B, d)), rng.uniform(0.05, 0.95, (T, B, d))
    c_init = rng.standard_normal((B, d))
    check_layer(lambda v, beta: mora.memory_scan_forward(v, beta, c_init),
                lambda dc, de, cache: mora.memory_scan_backward(dc, de, cache), [v, beta], n_outputs=2)
    sum_init = rng.standard_normal((B, d))
    check_layer(lambda v: (mora.cumulative_mean_forward(v, sum_init, 4)[0], mora.cumulative_mean_forward(v, sum_init, 4)[2]),
                lambda da, counts: [mora.cumulative_mean_backward(da, counts)], [v.copy()])
    mix, c, a, e = rng.standard_normal(3), *rng.standard_normal((3, T, B, d))
    check_layer(lambda mix, c, a, e: mora.mix_forward(mix, c, a, e),
                lambda dm, cache: mora.mix_backward(dm, cache), [mix, c, a, e])
    logits, y = rng.standard_normal((10, mora.V)), rng.integers(0, mora.V, 10)
    check_layer(lambda logits: (mora.cross_entropy_forward(logits, y)[0], mora.cross_entropy_forward(logits, y)[2]),
                lambda dlosses, cache: [mora.cross_entropy_backward(dlosses, cache)], [logits])
    E, xi = rng.standard_normal((mora.V, d)), rng.integers(0, 4, (T, B))  # repeated bytes: gradients add up
    check_layer(lambda E: mora.embedding_forward(E, xi), lambda dh, x: [mora.embedding_backward(dh, x)], [E])



# The model's equations (the sketch at the top of README; LayerNorm with eps = 1e-5,
# GELU in its tanh form), written out again here without mora.py's code or
# constants: a wrong constant used alike by a layer and its kernel, or by a forward
# and its backward, passes every twin and gradient check but shows against these.

def reference_layernorm(x, gain=1.0, bias=0.0):
    """(x - mean) / sqrt(var + 1e-5) * gain + bias over the last axis, in float64."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * gain + bias


def reference_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference_mixer(vbq, mix, c, total, count):
    """The mixer one time step at a time.  vbq: (T, B, 3d) = [v | z | q]; (c, total,
    count): the memory, the running sum and the bytes seen before t = 0.  Returns
    gated (T, B, d) and the state after the last step."""
    d = vbq.shape[-1] // 3
    gated = []
    for row in np.asarray(vbq, np.float64):
        v, z, q = row[..., :d], row[..., d:2 * d], row[..., 2 * d:]
        e = v - c  # the delta, against the memory before this step
        c = c + reference_sigmoid(z) * e
        total, count = total + v, count + 1
        gated.append(reference_sigmoid(q) * (mix[0] * c + mix[1] * total / count + mix[2] * e))
    return np.stack(gated), (c, total, count)


def test_layers_compute_their_definitions():
    rng = np.random.default_rng(7)
    d = 16
    # rows whose variance is about eps, so that the value of eps shows
    x = 7.0 + math.sqrt(1e-5) * rng.standard_normal((5, d))
    g, b = 1 + 0.1 * rng.standard_normal(d), rng.standard_normal(d)
    y, (_, rstd, _) = mora.layernorm_forward(x.copy(), g, b)
    assert np.allclose(y, reference_layernorm(x, g, b), rtol=1e-9, atol=1e-9)
    assert np.allclose(rstd[:, 0], 1 / np.sqrt(x.var(-1) + 1e-5), rtol=1e-9)
    assert np.allclose(mora.layernorm_forward(x.copy())[0], reference_layernorm(x), rtol=1e-9, atol=1e-9)
    z = np.linspace(-6, 6, 241)
    assert np.allclose(mora.gelu_forward(z.copy())[0], reference_gelu(z), rtol=1e-13, atol=1e-15)
    assert np.allclose(mora.sigmoid_forward(z.copy())[0], reference_sigmoid(z), rtol=1e-13, atol=1e-15)
    T, B = 9, 2
    vbq, mix = 2 * rng.standard_normal((T, B, 3 * d)), rng.standard_normal(3)
    c0, sum0 = rng.standard_normal((B, d)), rng.standard_normal((B, d))  # a carried state: 4 bytes seen
    gated, _, (c_last, sum_last, count) = mora.mixer_forward(vbq, mix, (c0, sum0, 4))
    expected, (c_ref, sum_ref, count_ref) = reference_mixer(vbq, mix, c0, sum0, 4)
    assert np.allclose(gated, expected, rtol=1e-12, atol=1e-12)
    assert np.allclose(c_last, c_ref, atol=1e-12) and np.allclose(sum_last, sum_ref, atol=1e-12) and count == count_ref


def perturbed_params(cfg, seed=0):
    """A float64 model whose every path matters: random mix, gains and biases, not the init's zeros."""
    params = mora.init_params(cfg, seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    return {k: p + 0.3 * rng.standard_normal(p.shape) for k, p in params.items()}


def test_every_parameter_gradient_matches_finite_differences():
    cfg = mora.Config(d_model=4, n_layers=2, seq_len=16, batch_size=2)  # 16 steps: the memory matters
    params = perturbed_params(cfg)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 16))
    y = rng.integers(0, 256, (2, 16))
    _, grads = mora.loss_and_grads(params, x, y)
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == params[name].shape and grads[name].dtype == np.float64
        numeric = numeric_gradient(lambda: mora.loss_and_grads(params, x, y)[0], params[name], h=1e-5)
        assert relative_error(numeric, grads[name]) < 1e-6, name


def test_memory_backward_document_matches_mora():
    """docs/memory_backward.md derives the memory's backward and ends with a NumPy
    program that checks it by finite differences: run that program as it stands in
    the document, then hold its forward and backward against mora's on the same
    inputs, so that the document and the code cannot drift apart."""
    with open(os.path.join(HERE, "docs", "memory_backward.md")) as f:
        programs = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    assert len(programs) == 1  # the one program the document describes
    doc = {}
    exec(programs[0], doc)  # asserts its own finite-difference check
    v, beta, c_init, dc, de, da = (doc[k] for k in ("v", "beta", "c_init", "dc", "de", "da"))
    c, e, cache = mora.memory_scan_forward(v, beta, c_init)
    np.testing.assert_allclose(c, doc["c"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(e, doc["e"], rtol=1e-12, atol=1e-12)
    dv, dbeta = mora.memory_scan_backward(dc, de, cache)
    np.testing.assert_allclose(dv, doc["dv_scan"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, doc["dbeta"], rtol=1e-12, atol=1e-12)
    a, _, counts = mora.cumulative_mean_forward(v, doc["sum_init"], doc["count_init"])
    np.testing.assert_allclose(a, doc["a"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mora.cumulative_mean_backward(da, counts), doc["mean_backward"](da, doc["counts"]),
                               rtol=1e-12, atol=1e-12)


def check_lines(capsys, exit_code):
    """`mora.py check`'s lines as name -> (error, PASS or FAIL), and its exit code."""
    lines = [re.fullmatch(r"(.*?) +(\S+)  (PASS|FAIL)", line) for line in capsys.readouterr().out.splitlines()]
    assert all(lines), lines
    return {m[1]: (float(m[2]), m[3]) for m in lines}, exit_code


LAYER_LINES = {"embedding: dE", "layernorm: dx", "layernorm: dgain", "layernorm: dbias", "layernorm (no gain): dx",
               "linear: dx", "linear: dW", "linear: db", "gelu: dx", "sigmoid: dx", "memory_scan: dv", "memory_scan: dbeta",
               "cumulative_mean: dv", "mix: dmix", "mix: dc", "mix: da", "mix: de", "cross_entropy: dlogits"}


def test_check_passes_with_a_line_per_parameter_and_layer(capsys):
    lines, code = check_lines(capsys, run_main("check"))
    assert code == 0 and set(lines) == set(mora.param_shapes(mora.Config(d_model=8, n_layers=2))) | LAYER_LINES
    assert all(verdict == "PASS" and error < 1e-6 for error, verdict in lines.values())


def test_check_catches_a_sign_error_in_the_memory_scan_backward(capsys, monkeypatch):
    """A learner's edit of one line: `- de[t]` made `+ de[t]`.  The scan fails, and so
    does every gradient that flows through it: block 1's input part, all of block 0
    and the embedding; block 1's mix and output part, before the scan in the backward, pass."""
    source = inspect.getsource(mora.memory_scan_backward)
    edited, namespace = source.replace("dc_total[t] - de[t]", "dc_total[t] + de[t]"), dict(vars(mora))
    assert edited != source
    exec(edited, namespace)
    monkeypatch.setattr(mora, "memory_scan_backward", namespace["memory_scan_backward"])
    lines, code = check_lines(capsys, run_main("check"))
    failed = {name for name, (_, verdict) in lines.items() if verdict == "FAIL"}
    block_0 = {f"blocks.0.{name}" for name in mora.block_shapes(8)}
    assert code == 1 and failed == {"memory_scan: dv", "memory_scan: dbeta", "embed", *block_0, "blocks.1.ln1.g",
                                    "blocks.1.ln1.b", "blocks.1.w_in", "blocks.1.b_in"}


def test_check_fails_a_gradient_off_by_one_part_in_ten_thousand(capsys, monkeypatch):
    """A slip far smaller than a sign error: the memory scan's gradients scaled by 1 + 1e-4.  The check
    fails exactly the tensors that gradient reaches (those of the sign error above), and exits 1."""
    scan_backward = mora.memory_scan_backward
    monkeypatch.setattr(mora, "memory_scan_backward", lambda *args: [g * (1 + 1e-4) for g in scan_backward(*args)])
    lines, code = check_lines(capsys, run_main("check"))
    failed = {name for name, (_, verdict) in lines.items() if verdict == "FAIL"}
    block_0 = {f"blocks.0.{name}" for name in mora.block_shapes(8)}
    assert code == 1 and failed == {"memory_scan: dv", "memory_scan: dbeta", "embed", *block_0, "blocks.1.ln1.g",
                                    "blocks.1.ln1.b", "blocks.1.w_in", "blocks.1.b_in"}


def test_on_the_cpu_the_layers_are_the_plain_functions(stand_in, data_dir, tmp_path):
    """Once a GPU is found, the fused layers are dispatchers to their kernels; a CPU run
    puts the plain functions back, so that a debugger step or a traceback lands in the
    maths, with no frame in between."""
    fused = {"mixer_forward", "mixer_backward", "layernorm_forward", "layernorm_backward", "block_input_forward",
             "block_input_backward", "block_output_forward", "block_output_backward", "cross_entropy_forward",
             "cross_entropy_backward", "adam_update"}
    assert set(mora.FUSED) == fused and all(hasattr(getattr(mora, name), "__wrapped__") for name in fused)  # on the stand-in
    assert run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "c.npz", *TINY, "--max-steps", 2,
                    "--eval-every", 0, "--no-final-eval", "--device", "cpu") == 0
    with open(mora.__file__) as f:
        lesson_end = f.read().split("\n# Running it for real.")[0].count("\n") + 1
    for name in fused:
        layer = getattr(mora, name)
        assert not hasattr(layer, "__wrapped__") and layer.__code__.co_firstlineno < lesson_end, name


# ----------------------------------------------------------------------------
# The model

def test_parameter_counts():
    assert mora.count_params(mora.Config()) == 284_184
    assert mora.count_params(mora.Config(d_model=128)) == 1_092_632
    params = mora.init_params(mora.Config(), 0)
    assert sum(p.size for p in params.values()) == 284_184
    assert all(p.dtype == np.float32 for p in params.values())
    assert params["blocks.7.w_in"].shape == (64, 192) and params["blocks.7.mix"].tolist() == [0, 0, 1]



def reference_forward(params, x):
    """logits (B, T, V) for bytes x (B, T), from the model's equations, batch-major."""
    E = params["embed"]
    d, n_layers = E.shape[1], sum(1 for k in params if k.endswith(".mix"))
    h = E[x]  # (B, T, d)
    for i in range(n_layers):
        p = {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"blocks.{i}.")}
        vbq = reference_layernorm(h, p["ln1.g"], p["ln1.b"]) @ p["w_in"] + p["b_in"]  # (B, T, 3d)
        zeros = np.zeros((len(x), d))
        gated, _ = reference_mixer(vbq.transpose(1, 0, 2), p["mix"], zeros, zeros, 0)  # (T, B, d)
        h = h + gated.transpose(1, 0, 2) @ p["w_out"] + p["b_out"]
        h = h + reference_gelu(reference_layernorm(h, p["ln2.g"], p["ln2.b"]) @ p["w_up"] + p["b_up"]) @ p["w_down"] + p["b_down"]
    return reference_layernorm(h) @ E.T  # the final norm has no parameters; the output layer is the embedding


def test_forward_and_loss_compute_the_equations():
    """In float64 the model agrees with its equations to rounding, so that any changed
    constant (even LayerNorm's eps, on rows of variance ~1) or operation shows."""
    params = perturbed_params(mora.Config(d_model=8, n_layers=2), seed=11)
    rng = np.random.default_rng(12)
    x, y = rng.integers(0, 256, (3, 20)), rng.integers(0, 256, (3, 20))
    logits = reference_forward(params, x)  # (B, T, V)
    assert np.abs(mora.forward(params, x) - logits).max() < 1e-10
    shifted = logits - logits.max(-1, keepdims=True)
    nats = np.log(np.exp(shifted).sum(-1)) - np.take_along_axis(shifted, y[..., None], -1)[..., 0]  # (B, T)
    losses, correct, _ = mora.forward_loss(params, x, y)  # (T, B)
    assert np.allclose(losses, nats.T, rtol=1e-10, atol=1e-10)
    assert np.array_equal(correct, (logits.argmax(-1) == y).T)
    assert mora.loss_and_grads(params, x, y)[0] == pytest.approx(nats.mean(), rel=1e-10)


def test_init_follows_the_design():
    cfg = mora.Config()
    d, L = cfg.d_model, cfg.n_layers
    params = mora.init_params(cfg, 0)
    blocks = [mora.block_params(params, i) for i in range(L)]
    for p in blocks:
        assert np.array_equal(p["b_in"][:d], np.zeros(d)) and np.array_equal(p["b_in"][2 * d:], np.zeros(d))  # v, q
        assert np.allclose(p["b_in"][d:2 * d], np.linspace(-4, 2, d), atol=1e-6)  # the write rates' third
        assert p["mix"].tolist() == [0, 0, 1]
        assert all(np.array_equal(p[g], np.ones(d)) for g in ("ln1.g", "ln2.g"))
        assert all(not p[b].any() for b in ("ln1.b", "ln2.b", "b_out", "b_up", "b_down"))
    residual = 1 / math.sqrt(2 * L)  # the further scale of the layers that write to the residual stream
    for name, fan_in, scale in [("w_in", d, 1), ("w_out", d, residual), ("w_up", d, 1), ("w_down", 2 * d, residual)]:
        values = np.concatenate([p[name].ravel() for p in blocks]).astype(np.float64)
        expected = scale / math.sqrt(fan_in)
        assert abs(values.std() / expected - 1) < 0.03 and abs(values.mean()) < 0.03 * expected, name
    assert abs(params["embed"].std() * math.sqrt(d) - 1) < 0.03
    assert mora.init_params(cfg, 0, mix=(1, 1, 1))["blocks.3.mix"].tolist() == [1, 1, 1]
    assert np.array_equal(mora.init_params(cfg, 0)["blocks.2.w_up"], params["blocks.2.w_up"])
    assert not np.array_equal(mora.init_params(cfg, 1)["blocks.2.w_up"], params["blocks.2.w_up"])


def test_fresh_model_loss_is_near_uniform():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 64))
    loss, _ = mora.loss_and_grads(mora.init_params(mora.Config(), 0), x, np.roll(x, -1, axis=1))
    assert abs(loss - math.log(256)) < 0.7


def test_stepwise_generation_equals_full_forward():
    cfg = mora.Config(d_model=8, n_layers=3)
    params = perturbed_params(cfg, seed=3)
    x = np.random.default_rng(4).integers(0, 256, (2, 20))
    full = mora.forward(params, x)  # (B, T, V)
    state, pieces = mora.initial_state(params, 2), []
    for start, stop in [(0, 1), (1, 7), (7, 8), (8, 20)]:  # one byte at a time and in chunks
        logits, _, state = mora.model_forward(params, x[:, start:stop].T, state)
        pieces.append(logits.transpose(1, 0, 2))
    assert np.abs(np.concatenate(pieces, axis=1) - full).max() < 1e-10


def test_generate_is_reproducible_and_greedy_is_argmax():
    params = mora.init_params(mora.Config(d_model=8, n_layers=2), 0)
    a = list(mora.generate(params, b"Once", 30, 0.8, 5, seed=1))
    assert a == list(mora.generate(params, b"Once", 30, 0.8, 5, seed=1)) and len(a) == 30
    greedy = list(mora.generate(params, b"Once", 5, 0.0, 0, seed=1))
    logits = mora.forward(params, np.frombuffer(b"Once", np.uint8).astype(np.int64)[None])
    assert greedy[0] == int(np.argmax(logits[0, -1]))



def test_generation_carries_its_state_from_byte_to_byte():
    """Every generated byte is the one the full forward over the prompt and all bytes
    so far gives: greedy at temperature 0, and with sampling the same draw from the
    same random numbers."""
    params = perturbed_params(mora.Config(d_model=8, n_layers=2), seed=6)
    prompt = b"Once upon"

    def last_logits(text):
        return mora.forward(params, np.frombuffer(text, np.uint8).astype(np.int64)[None])[0, -1]
    text = prompt
    for byte in mora.generate(params, prompt, 30, 0.0, 0, seed=0):
        assert byte == int(np.argmax(last_logits(text))), text
        text += bytes([byte])
    text, rng = prompt, np.random.default_rng(3)
    for byte in mora.generate(params, prompt, 30, 0.9, 7, seed=3):
        assert byte == mora.pick_byte(last_logits(text), 0.9, 7, rng), text
        text += bytes([byte])


def test_pick_byte_respects_top_k():
    logits = np.arange(256, dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {mora.pick_byte(logits, 5.0, 3, rng) for _ in range(200)} <= {253, 254, 255}
    assert mora.pick_byte(logits, 0, 0, rng) == 255



def test_pick_byte_keeps_exactly_the_top_k_and_follows_the_temperature():
    logits = np.arange(256, dtype=np.float32)
    for k in (1, 2, 3, 10, 100):  # a high temperature: the kept bytes are about equally likely
        seen = {mora.pick_byte(logits, 1e4, k, np.random.default_rng(seed)) for seed in range(20 * k)}
        assert seen == set(range(256 - k, 256)), k
    for everything in (0, 256):
        rng = np.random.default_rng(0)
        assert len({mora.pick_byte(logits, 1e6, everything, rng) for _ in range(5000)}) == 256
    noisy = np.random.default_rng(1).standard_normal(256)
    assert all(mora.pick_byte(noisy, 0, k, np.random.default_rng(0)) == int(np.argmax(noisy)) for k in (0, 1, 5))
    two = np.full(256, -50.0)
    two[10], two[20] = 0.0, 0.5 * math.log(3)  # at temperature 0.5: byte 20 three times as likely as byte 10
    rng = np.random.default_rng(2)
    draws = [mora.pick_byte(two, 0.5, 0, rng) for _ in range(4000)]
    assert set(draws) == {10, 20} and abs(draws.count(20) / len(draws) - 0.75) < 0.03


def test_adam_two_steps_match_the_formula():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5)
    g1, g2 = rng.standard_normal(5), rng.standard_normal(5)
    p, m, v = p0.copy(), np.zeros(5), np.zeros(5)
    mora.adam_update(p, g1, m, v, 1, 0.1, 0.9, 0.999, 1e-8)
    mora.adam_update(p, g2, m, v, 2, 0.1, 0.9, 0.999, 1e-8)
    m1, v1 = 0.1 * g1, 0.001 * g1 ** 2
    step1 = p0 - 0.1 * (m1 / 0.1) / (np.sqrt(v1 / 0.001) + 1e-8)
    m2, v2 = 0.9 * m1 + 0.1 * g2, 0.999 * v1 + 0.001 * g2 ** 2
    step2 = step1 - 0.1 * (m2 / (1 - 0.9 ** 2)) / (np.sqrt(v2 / (1 - 0.999 ** 2)) + 1e-8)
    assert np.allclose(p, step2, rtol=1e-12, atol=1e-12)



def test_adam_eps_is_added_to_the_root():
    """At step 1, m_hat = g and v_hat = g^2: the update is lr g / (|g| + eps), which
    for gradients as small as eps is far from lr g / sqrt(g^2 + eps) or lr sign(g)."""
    g = np.array([1e-8, -3e-9, 2e-7, -0.5])
    p = np.zeros(4)
    mora.adam_update(p, g, np.zeros(4), np.zeros(4), 1, 0.1, 0.8, 0.95, 1e-8)
    assert np.allclose(p, -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-9, atol=0)


def test_train_step_clips_then_steps_adam_with_the_run_settings():
    cfg = mora.Config(d_model=8, n_layers=1)
    settings = mora.TrainSettings(clip=0.05, beta1=0.8, beta2=0.9, eps=1e-6)  # every setting unlike the defaults
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2, 16)), rng.integers(0, 256, (2, 16))
    (flat, params), (hand, hand_params) = (mora.flat_parameters(mora.init_params(cfg, 0)) for _ in range(2))
    m, v, hand_m, hand_v = (np.zeros_like(flat) for _ in range(4))
    for step in range(3):  # train_step counts from 0, Adam from 1
        _, _, norm = mora.train_step(params, flat, m, v, x, y, step, 0.01, settings)
        grad = mora.batch_gradient(hand_params, x, y)[2]
        unclipped = float(np.linalg.norm(grad.astype(np.float64)))
        grad *= 0.05 / unclipped  # clipped to exactly the limit
        mora.adam_update(hand, grad, hand_m, hand_v, step + 1, 0.01, 0.8, 0.9, 1e-6)
        assert float(norm) == pytest.approx(unclipped, rel=1e-5)
        # float32 rounding, on the scale of each array: a wrong setting moves them by far more
        assert np.allclose(m, hand_m, rtol=1e-5, atol=1e-6 * np.abs(hand_m).max())
        assert np.allclose(v, hand_v, rtol=1e-4, atol=1e-6 * np.abs(hand_v).max())
        assert np.allclose(flat, hand, rtol=1e-5, atol=1e-7)


def test_clip_and_schedule():
    g = np.array([3.0, 4.0])
    assert float(mora.clip_by_global_norm(g, 1.0)) == 5.0 and np.allclose(g, [0.6, 0.8])
    assert mora.learning_rate(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert mora.learning_rate(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert mora.learning_rate(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)



def test_clip_leaves_a_gradient_under_the_limit_untouched_and_cuts_one_over_it_to_the_limit():
    rng = np.random.default_rng(0)
    for dtype, tolerance in ((np.float64, 1e-12), (np.float32, 1e-6)):
        g = rng.standard_normal(1000).astype(dtype)
        norm = float(np.linalg.norm(g.astype(np.float64)))
        under = g.copy()
        assert float(mora.clip_by_global_norm(under, 1.01 * norm)) == pytest.approx(norm, rel=tolerance)
        assert np.array_equal(under, g)  # bit for bit
        over = g.copy()
        assert float(mora.clip_by_global_norm(over, norm / 3)) == pytest.approx(norm, rel=tolerance)
        assert np.linalg.norm(over.astype(np.float64)) == pytest.approx(norm / 3, rel=tolerance)
        assert np.allclose(3 * over, g, rtol=tolerance, atol=0)  # the direction kept


def test_the_default_warmup_is_a_third_of_the_run_capped(data_dir, tmp_path, capsys):
    """The rule written out: a third of the run's steps (rounded down), at least 1, at most
    1,000; checked on the function and on what a run started without --warmup keeps."""
    for steps, warmup in ((1, 1), (2, 1), (5, 1), (9, 3), (300, 100), (2999, 999), (3003, 1000), (10 ** 6, 1000)):
        assert mora.default_warmup(steps) == warmup, steps
    for steps, warmup in ((7, 2), (12, 4)):
        ckpt = tmp_path / f"w{steps}.npz"
        assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", steps,
                        "--stop-after", 1, "--eval-every", 0) == 0
        assert mora.load_checkpoint(str(ckpt))[2]["train"]["warmup"] == warmup


def test_learning_rate_warms_up_linearly_then_decays_from_the_peak_by_cosine():
    peak, warmup, total, final = 2.0, 8, 108, 0.25

    def lr(step):
        return mora.learning_rate(step, total, peak, warmup, final)
    assert [lr(s) for s in range(warmup)] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    assert lr(warmup) == pytest.approx(peak)  # the decay starts where the warmup ended
    assert lr(warmup + 25) == pytest.approx(peak * (final + (1 - final) * (1 + math.cos(math.pi / 4)) / 2))
    assert lr(warmup + 50) == pytest.approx((1 + final) / 2 * peak)  # the middle of the decay
    assert lr(total) == pytest.approx(final * peak) and lr(total + 10) == pytest.approx(final * peak)
    assert all(lr(s) > lr(s + 1) for s in range(warmup, total))
    assert mora.learning_rate(0, total, peak, 0, final) == pytest.approx(peak)  # no warmup: the peak at once


def test_tiny_model_learns_a_made_up_text():
    cfg = mora.Config(d_model=16, n_layers=2)
    text = np.frombuffer(made_up_text(8), dtype=np.uint8)[:8 * 65].reshape(8, 65).astype(np.int64)
    x, y = text[:, :-1], text[:, 1:]
    flat, params = mora.flat_parameters(mora.init_params(cfg, 0))
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    losses = [float(mora.train_step(params, flat, m, v, x, y, s, 1e-2)[0]) for s in range(60)]
    assert losses[0] > 5.0 and losses[-1] < 2.0, losses[::10]


def test_batch_sliced_over_threads_equals_the_whole_batch():
    """The CPU's worker threads: the same loss, accuracy and gradient as one pass over
    the whole batch, to float32 rounding, also when the slices are of unequal size."""
    params = mora.init_params(mora.Config(d_model=8, n_layers=2), 0, mix=(0.5, -0.7, 1.0))
    rng = np.random.default_rng(0)
    records = rng.integers(0, 256, (5, 33)).astype(np.uint8)
    x, y = mora.make_batch(records, np.arange(5), np)
    loss, accuracy, grad = mora.batch_gradient(params, x, y)
    for count, threads in ((2, 2), (3, 3), (3, 2), (5, 1)):
        slices = mora.cpu_slices(np, threads, count)
        assert len(slices.map(lambda rows: rows, 5)) == count
        sliced_loss, sliced_accuracy, sliced_grad = slices.gradient(params, x, y)
        assert abs(float(sliced_loss) - float(loss)) < 1e-6 and float(sliced_accuracy) == pytest.approx(float(accuracy))
        assert relative_error(sliced_grad.astype(np.float64), grad.astype(np.float64)) < 1e-5
        assert np.abs(sliced_grad - grad).max() < 1e-6
        assert mora.evaluate(params, records, 5, slices)["loss"] == pytest.approx(float(loss), abs=1e-6)
        slices.pool.shutdown()


def test_the_note_on_blas_threads_counts_what_blas_runs(monkeypatch, capsys):
    """NumPy's OpenBLAS runs OPENBLAS_NUM_THREADS threads (MORA sets it), whatever OMP_NUM_THREADS says."""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    slices = mora.cpu_slices(np, threads=cores)
    assert capsys.readouterr().err == "" and " x 1 BLAS thread (" in mora.describe_backend(np, slices)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    slices = mora.cpu_slices(np, threads=cores)
    note = capsys.readouterr().err
    assert f"{cores} threads x 4 BLAS threads" in note and " x 4 BLAS threads (" in mora.describe_backend(np, slices)


def test_a_step_gives_the_same_bits_on_any_number_of_threads():
    """The batch's slices are fixed by the run; threads only share them out."""
    params = mora.init_params(mora.Config(d_model=8, n_layers=2), 0, mix=(0.5, -0.7, 1.0))
    records = np.random.default_rng(1).integers(0, 256, (6, 33)).astype(np.uint8)
    x, y = mora.make_batch(records, np.arange(6), np)
    results = []
    for threads in (1, 2, 3):
        slices = mora.cpu_slices(np, threads, 3)
        results.append(slices.gradient(params, x, y))
        slices.pool.shutdown()
    for loss, accuracy, grad in results[1:]:
        assert loss == results[0][0] and accuracy == results[0][1] and np.array_equal(grad, results[0][2])


# ----------------------------------------------------------------------------
# prepare_data.py

def test_prepare_converts_byte_for_byte(tmp_path, capsys):
    a, b, val = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "v.txt"
    a.write_bytes(made_up_text(5, seed=1))
    b.write_bytes(made_up_text(3, seed=2) + b"<|endoftext|>\n")
    val.write_bytes("Zoë’s “story”\n\nNo separators here.".encode())
    out = tmp_path / "out"
    args = ["--out-dir", str(out), "--input-train", str(a), str(b), "--input-val", str(val)]
    assert prepare_data.main(args) == 0
    assert (out / "train.bin").read_bytes() == a.read_bytes() + b.read_bytes()
    assert (out / "val.bin").read_bytes() == val.read_bytes()
    printed = capsys.readouterr().out
    assert f"{len(a.read_bytes()) + len(b.read_bytes()):,} bytes, 8 stories" in printed
    assert prepare_data.main(args) == 0  # a second run has nothing to do
    assert printed.count("skipped") == 0 and capsys.readouterr().out.count("skipped") == 2


def test_separator_across_chunks_is_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare_data, "CHUNK", 7)  # every separator straddles chunk edges
    src = tmp_path / "t.txt"
    src.write_bytes(b"ab<|endoftext|>cde<|endoftext|>" * 5 + b"tail story")
    prepare_data.convert([str(src)], str(tmp_path / "t.bin"))
    assert (tmp_path / "t.bin").read_bytes() == src.read_bytes()
    assert "11 stories" in capsys.readouterr().out


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves FILES from memory with HTTP Range support (bytes=start- and bytes=start-end);
    records the ranges asked for as (start, end or None)."""
    FILES, ranges = {}, []

    def do_GET(self):
        body = self.FILES.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        start, end = 0, len(body) - 1
        if "Range" in self.headers:
            first, last = self.headers["Range"].split("=")[1].split("-")
            start, end = int(first), int(last) if last else len(body) - 1
            RangeHandler.ranges.append((start, int(last) if last else None))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        self.wfile.write(body[start:end + 1])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    RangeHandler.ranges.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_resumes_a_partial_file(tmp_path, http_server, capsys):
    train, val = made_up_text(30, seed=5), made_up_text(10, seed=6)
    RangeHandler.FILES = {prepare_data.TRAIN_FILE: train, prepare_data.VAL_FILE: val}
    out = tmp_path / "data"
    out.mkdir()
    (out / (prepare_data.TRAIN_FILE + ".part")).write_bytes(train[:1000])  # an interrupted download
    assert prepare_data.main(["--out-dir", str(out), "--url-base", http_server]) == 0
    assert RangeHandler.ranges == [(1000, None)]  # only the missing part was fetched
    assert (out / "train.bin").read_bytes() == train and (out / "val.bin").read_bytes() == val
    assert "30 stories" in capsys.readouterr().out
    assert not (out / (prepare_data.TRAIN_FILE + ".part")).exists()


def test_train_bytes_downloads_only_the_start(tmp_path, http_server, capsys):
    train, val = made_up_text(30, seed=5), made_up_text(10, seed=6)
    RangeHandler.FILES = {prepare_data.TRAIN_FILE: train, prepare_data.VAL_FILE: val}
    out = tmp_path / "data"
    assert prepare_data.main(["--out-dir", str(out), "--url-base", http_server, "--train-bytes", "3000"]) == 0
    assert RangeHandler.ranges == [(0, 2999)]  # one request, for the first 3,000 bytes
    assert (out / "train.bin").read_bytes() == train[:3000] and (out / "val.bin").read_bytes() == val
    first = out / f"{prepare_data.TRAIN_FILE}.first3000"  # stopped after the download, before the rename:
    first.rename(str(first) + ".part")
    RangeHandler.ranges.clear()
    assert prepare_data.main(["--out-dir", str(out), "--url-base", http_server, "--train-bytes", "3000"]) == 0
    assert RangeHandler.ranges == [] and first.read_bytes() == train[:3000]  # nothing asked again
    local = tmp_path / "local"
    text = tmp_path / "t.txt"
    text.write_bytes(train)
    assert prepare_data.main(["--out-dir", str(local), "--input-train", str(text), "--input-val", str(text),
                              "--train-bytes", "1234"]) == 0
    assert (local / "train.bin").read_bytes() == train[:1234] and (local / "val.bin").read_bytes() == train


def enwik8_zip(text, compression=0):
    """A zip archive holding `text` as its member enwik8 (compression 0: stored, 8: deflated)."""
    import io
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression) as z:
        z.writestr("enwik8", text)
    return archive.getvalue()


def small_split_text(monkeypatch, dataset, splits):
    """The dataset of SPLIT_TEXTS in small: its split sizes (and so its text's size) are `splits`."""
    url_base, name, _ = prepare_data.SPLIT_TEXTS[dataset]
    monkeypatch.setitem(prepare_data.SPLIT_TEXTS, dataset, (url_base, name, splits))


def test_enwik8_split_from_a_zip(tmp_path, http_server, monkeypatch, capsys):
    small_split_text(monkeypatch, "enwik8", {"train": 900, "val": 50, "test": 50})  # enwik8 in small
    text = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    RangeHandler.FILES = {"enwik8.zip": enwik8_zip(text)}
    out = tmp_path / "data"
    assert prepare_data.main(["--dataset", "enwik8", "--out-dir", str(out), "--url-base", http_server]) == 0
    assert (out / "train.bin").read_bytes() == text[:900] and (out / "val.bin").read_bytes() == text[900:950]
    assert (out / "test.bin").read_bytes() == text[950:]
    RangeHandler.FILES = {"enwik8.zip": enwik8_zip(text)[:-100]}  # a damaged archive: one line
    (out / "enwik8").unlink()
    (out / "enwik8.zip").write_bytes(enwik8_zip(text)[:-100])
    assert prepare_data.main(["--dataset", "enwik8", "--out-dir", str(out), "--url-base", http_server]) == 1
    assert "not the enwik8 archive" in capsys.readouterr().err


def test_enwik8_train_bytes_cut_only_the_train_part(tmp_path, http_server, monkeypatch):
    """--train-bytes N: train.bin is the first N bytes; val and test stay where the
    standard split puts them (90M..95M, 95M..100M), whatever N is."""
    small_split_text(monkeypatch, "enwik8", {"train": 900, "val": 50, "test": 50})
    text = bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8))
    RangeHandler.FILES = {"enwik8.zip": enwik8_zip(text)}
    out = tmp_path / "data"
    for n in (30, 300, 900, 5000):  # cuts shorter than val and than train, exactly train, more than there is
        assert prepare_data.main(["--dataset", "enwik8", "--out-dir", str(out), "--url-base", http_server,
                                  "--train-bytes", str(n)]) == 0
        assert (out / "train.bin").read_bytes() == text[:min(n, 900)]
        assert (out / "val.bin").read_bytes() == text[900:950] and (out / "test.bin").read_bytes() == text[950:1000]


def test_a_damaged_enwik8_zip_is_removed_and_downloaded_again(tmp_path, http_server, monkeypatch, capsys):
    small_split_text(monkeypatch, "enwik8", {"train": 900, "val": 50, "test": 50})
    text = (b"<page><title>Anarchism</title><text>the quick brown fox</text></page>\n" * 20)[:1000]
    good = enwik8_zip(text, compression=8)
    damaged = bytearray(good)
    damaged[30 + len("enwik8")] ^= 0xFF  # the first deflate block header: zlib refuses the data
    out = tmp_path / "data"
    out.mkdir()
    (out / "enwik8.zip").write_bytes(bytes(damaged))  # a download that arrived damaged
    args = ["--dataset", "enwik8", "--out-dir", str(out), "--url-base", http_server]
    err = one_error_line(capsys, prepare_data.main(args))
    assert "enwik8.zip" in err and "removed" in err and "download it again" in err and "damaged compressed data" in err
    assert not (out / "enwik8.zip").exists() and not (out / "enwik8.tmp").exists() and not (out / "enwik8").exists()
    RangeHandler.FILES = {"enwik8.zip": good}
    assert prepare_data.main(args) == 0  # the next run downloads it again
    assert (out / "train.bin").read_bytes() == text[:900] and (out / "test.bin").read_bytes() == text[950:]


def test_shakespeare_is_split_as_nanogpt_splits_it(tmp_path, http_server, monkeypatch, capsys):
    url_base, name, splits = prepare_data.SPLIT_TEXTS["shakespeare"]
    assert url_base + name == "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    assert splits == {"train": 1_003_854, "val": 111_540}  # char-rnn's 1,115,394 bytes cut as nanoGPT does:
    assert splits["train"] == int(0.9 * sum(splits.values()))  # its first int(0.9 * n) bytes, then the rest
    small_split_text(monkeypatch, "shakespeare", {"train": 900, "val": 100})
    text = (b"First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 20)[:1000]
    RangeHandler.FILES = {"input.txt": text}
    out = tmp_path / "data"
    args = ["--dataset", "shakespeare", "--out-dir", str(out), "--url-base", http_server + "data/tinyshakespeare"]
    assert prepare_data.main(args) == 0
    assert (out / "train.bin").read_bytes() == text[:900] and (out / "val.bin").read_bytes() == text[900:]
    printed = capsys.readouterr().out
    assert f"{out / 'train.bin'}: 900 bytes" in printed and f"{out / 'val.bin'}: 100 bytes" in printed
    assert prepare_data.main(args) == 0 and capsys.readouterr().out.count("skipped") == 2  # both .bin
    (out / "input.txt").write_bytes(text + b"More.\n")  # not the text the split was made for
    err = one_error_line(capsys, prepare_data.main(args))
    assert err == f"error: {out / 'input.txt'} holds 1,006 bytes, shakespeare has 1,000: delete it, then run again\n"


def test_a_damaged_record_means_rebuild(tmp_path, monkeypatch, capsys):
    """A .bin.json left empty (the disk filled while it was written) is one line and a
    rebuild, every time, not a traceback; a record that cannot be written is removed."""
    text = tmp_path / "t.txt"
    text.write_bytes(made_up_text(5))
    out = tmp_path / "o"
    args = ["--out-dir", str(out), "--input-train", str(text), "--input-val", str(text)]
    assert prepare_data.main(args) == 0
    (out / "train.bin.json").write_text("")  # as a full disk leaves it
    (out / "train.bin").write_bytes(b"x" * len(text.read_bytes()))  # the right size, the wrong bytes
    capsys.readouterr()
    assert prepare_data.main(args) == 0
    printed = capsys.readouterr().out
    assert "train.bin.json is damaged" in printed and "val.bin: up to date" in printed
    assert (out / "train.bin").read_bytes() == text.read_bytes()
    assert prepare_data.main(args) == 0 and capsys.readouterr().out.count("skipped") == 2  # whole again

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    (out / "val.bin.json").unlink()  # val.bin must be rebuilt: its record is written ...
    monkeypatch.setattr(prepare_data.json, "dump", disk_full)  # ... onto a full disk
    assert prepare_data.main(args) == 1 and "No space left" in capsys.readouterr().err
    assert not (out / "val.bin.json").exists() and not (out / "val.bin.json.tmp").exists()
    monkeypatch.undo()
    assert prepare_data.main(args) == 0 and (out / "val.bin").read_bytes() == text.read_bytes()
    assert "val.bin: up to date" not in capsys.readouterr().out  # no record, so not known to be done


def test_stale_record_never_vouches_for_a_new_bin(tmp_path, monkeypatch, capsys):
    """While a .bin is rebuilt from other sources, its old record is gone: a run stopped
    after the new .bin and before its record rebuilds, never skips with the old one."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"first " * 50)
    b.write_bytes(b"other " * 50)  # the same size
    out = tmp_path / "out"
    assert prepare_data.main(["--out-dir", str(out), "--input-train", str(a), "--input-val", str(a)]) == 0

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(prepare_data.json, "dump", disk_full)
        assert prepare_data.main(["--out-dir", str(out), "--input-train", str(b), "--input-val", str(a)]) == 1
    assert (out / "train.bin").read_bytes() == b.read_bytes() and not (out / "train.bin.json").exists()
    assert prepare_data.main(["--out-dir", str(out), "--input-train", str(a), "--input-val", str(a)]) == 0
    assert (out / "train.bin").read_bytes() == a.read_bytes()


def test_reordered_inputs_rebuild_the_bin(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"first " * 50)
    b.write_bytes(b"second " * 50)
    out = tmp_path / "out"
    assert prepare_data.main(["--out-dir", str(out), "--input-train", str(a), str(b), "--input-val", str(a)]) == 0
    assert prepare_data.main(["--out-dir", str(out), "--input-train", str(b), str(a), "--input-val", str(a)]) == 0
    assert (out / "train.bin").read_bytes() == b.read_bytes() + a.read_bytes()  # not the stale a + b


def test_prepare_input_faults_are_one_line(tmp_path, capsys):
    def error_of(*args):
        return one_error_line(capsys, prepare_data.main([str(a) for a in args]))

    text = tmp_path / "t.txt"
    text.write_bytes(made_up_text(3))
    assert "not a URL" in error_of("--out-dir", tmp_path / "o", "--url-base", "huggingface.co/x")
    assert "is a file" in error_of("--out-dir", text, "--input-train", text, "--input-val", text)


def test_every_input_is_checked_before_anything_is_written(tmp_path, monkeypatch, capsys):
    text, empty = tmp_path / "t.txt", tmp_path / "empty.txt"
    text.write_bytes(made_up_text(3))
    empty.write_bytes(b"")
    out = tmp_path / "o"

    def error_of(train, val):
        err = one_error_line(capsys, prepare_data.main(["--out-dir", str(out), "--input-train", *map(str, train),
                                                        "--input-val", str(val)]))
        assert not out.exists() or os.listdir(out) == [], os.listdir(out)  # nothing written
        return err

    assert "nope.txt: no such file" in error_of([text], tmp_path / "nope.txt")  # found before train.bin is written
    assert "empty" in error_of([empty], text) and "empty" in error_of([text], empty)
    assert "empty" in error_of([empty, empty], text)
    real_open = open

    def unreadable(path, *args, **kwargs):
        if str(path) == str(tmp_path / "secret.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    (tmp_path / "secret.txt").write_bytes(made_up_text(2))
    monkeypatch.setattr(prepare_data, "open", unreadable, raising=False)
    assert "Permission denied" in error_of([text], tmp_path / "secret.txt")


def test_an_unwritable_out_dir_is_reported_as_it_is(tmp_path, monkeypatch, capsys):
    """The clean-up of a partial file that never came to be must not replace the real
    error (here: no permission to create files in --out-dir) by its own."""
    text, val = tmp_path / "t.txt", tmp_path / "v.txt"
    text.write_bytes(made_up_text(3))
    val.write_bytes(made_up_text(1))
    real_open = open

    def read_only_folder(path, mode="r", *args, **kwargs):
        if "w" in mode or "a" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)
    for module in prepare_data, mora:  # the .bin files are opened by mora's written_atomically
        monkeypatch.setattr(module, "open", read_only_folder, raising=False)
    err = one_error_line(capsys, prepare_data.main(["--out-dir", str(tmp_path / "o"), "--input-train", str(text),
                                                    "--input-val", str(val)]))
    assert "Permission denied" in err and "train.bin.tmp" in err and "No such file" not in err


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_prepare_data_is_one_line_and_leaves_nothing_half_done(tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(made_up_text(5))
    out = tmp_path / "o"
    args = ["--out-dir", str(out), "--input-train", str(text), "--input-val", str(text)]
    copy = prepare_data.copy_counting_stories

    def interrupted_after_writing(chunks, f, *args):
        f.write(b"half of it")
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "copy_counting_stories", interrupted_after_writing)
    assert prepare_data.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar
    assert err.startswith("interrupted") and "Traceback" not in err
    assert os.listdir(out) == []  # no partial .bin, .tmp or .json
    monkeypatch.setattr(prepare_data, "copy_counting_stories", copy)
    assert prepare_data.main(args) == 0
    monkeypatch.setattr(prepare_data.json, "dump", interrupt)  # between the .bin and its record
    (out / "val.bin.json").unlink()
    assert prepare_data.main(args) == 130
    assert sorted(os.listdir(out)) == ["train.bin", "train.bin.json", "val.bin"]  # no record: rebuilt next time


def local_args(out, train, val):
    return ["--out-dir", str(out), "--input-train", str(train), "--input-val", str(val)]


@pytest.mark.parametrize("name", ["train.bin.tmp", "train.bin", "val.bin.json", "val.bin.json.tmp"])
@pytest.mark.parametrize("given_as", ["train", "val"])
def test_an_input_that_this_run_writes_is_refused_before_anything_is_written(tmp_path, capsys, name, given_as):
    out, text = tmp_path / "out", tmp_path / "story.txt"
    out.mkdir()
    text.write_bytes(made_up_text(5))
    victim = out / name
    victim.write_bytes(text.read_bytes())
    train, val = (victim, text) if given_as == "train" else (text, victim)
    err = one_error_line(capsys, prepare_data.main(local_args(out, train, val)))
    assert f"{victim} is also an input of this command ({victim})" in err and "--out-dir" in err
    assert os.listdir(out) == [name] and victim.read_bytes() == text.read_bytes()


def test_an_input_reaching_an_output_by_a_link_or_another_spelling_is_refused(tmp_path, capsys):
    out, text = tmp_path / "out", tmp_path / "story.txt"
    out.mkdir()
    text.write_bytes(made_up_text(5))
    os.link(text, out / "train.bin.tmp")  # opening train.bin.tmp to write would empty story.txt
    err = one_error_line(capsys, prepare_data.main(local_args(out, text, text)))
    assert f"{out / 'train.bin.tmp'} is also an input of this command ({text})" in err
    (out / "train.bin.tmp").unlink()
    (tmp_path / "same").symlink_to(out)  # another name for the folder
    (out / "val.bin.tmp").write_bytes(text.read_bytes())
    (out / "sub").mkdir()
    err = one_error_line(capsys, prepare_data.main(local_args(tmp_path / "same", text, out / "sub" / ".." / "val.bin.tmp")))
    assert "val.bin.tmp is also an input" in err and text.read_bytes() == made_up_text(5)
    assert sorted(os.listdir(out)) == ["sub", "val.bin.tmp"] and (out / "val.bin.tmp").read_bytes() == text.read_bytes()


def test_a_folder_as_input_says_it_is_a_folder(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(made_up_text(3))
    for args in ((text, tmp_path), (tmp_path, text)):
        err = one_error_line(capsys, prepare_data.main(local_args(tmp_path / "o", *args)))
        assert f"{tmp_path} is a folder" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_input_is_refused_without_opening_it(tmp_path):
    text, fifo = tmp_path / "t.txt", tmp_path / "v.fifo"
    text.write_bytes(made_up_text(3))
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "prepare_data.py", *local_args(tmp_path / "o", text, fifo)], cwd=HERE,
                          capture_output=True, text=True, timeout=60)  # opening the FIFO would wait here for ever
    assert done.returncode == 1 and done.stderr == f"error: {fifo} is not a regular file (a device or a FIFO, say): give a text file\n"
    assert not (tmp_path / "o").exists()


SLOW_PREPARE = """
import sys, time
import prepare_data
read_chunks = prepare_data.read_chunks

def slow_read_chunks(*args):  # a slow disk: the signal surely comes mid-copy, after the first chunk is written
    for chunk in read_chunks(*args):
        yield chunk
        time.sleep(10)
prepare_data.read_chunks = slow_read_chunks
sys.exit(prepare_data.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)])
def test_sigterm_and_sighup_in_prepare_data_are_one_line_and_leave_nothing_half_done(tmp_path, name):
    signum = getattr(signal, name)
    text, val, out = tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "o"
    text.write_bytes(made_up_text(60) * 1500)  # about 14 MB: four chunks
    val.write_bytes(made_up_text(2))
    assert text.stat().st_size > 3 * prepare_data.CHUNK
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, *local_args(out, text, val)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial, deadline = out / "train.bin.tmp", time.time() + 60
    while not (partial.exists() and partial.stat().st_size >= prepare_data.CHUNK) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)
    assert stderr.strip().startswith(f"interrupted by {name}: no partial .bin is left") and "\n" not in stderr.strip()
    assert os.listdir(out) == []  # no partial .bin, .tmp or record


def test_a_bin_damaged_in_place_is_rebuilt_not_skipped(tmp_path, monkeypatch, capsys):
    """The record holds the whole .bin's SHA-256, so a byte damaged anywhere, past the first chunk that
    prepare_data reads at a time too, means a rebuild (the chunk made small here: every test text is
    smaller than a real one)."""
    monkeypatch.setattr(prepare_data, "CHUNK", 64)
    text, out = tmp_path / "t.txt", tmp_path / "o"
    text.write_bytes(made_up_text(5))
    args = local_args(out, text, text)
    assert prepare_data.main(args) == 0
    with open(out / "train.bin.json") as f:
        assert json.load(f)["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    with open(out / "train.bin", "r+b") as f:  # a byte in the fourth chunk flipped: the same size, the same sources
        f.seek(3 * 64 + 5)
        f.write(bytes([f.read(1)[0] ^ 1]))
    capsys.readouterr()
    assert prepare_data.main(args) == 0
    printed = capsys.readouterr().out
    assert "train.bin: up to date" not in printed and "val.bin: up to date" in printed
    assert (out / "train.bin").read_bytes() == text.read_bytes()


def test_prepare_data_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """main called from Python (a notebook, a test) hands back the handlers it had on entry, after a
    success and after an error alike."""
    text = tmp_path / "t.txt"
    text.write_bytes(made_up_text(5))
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    mine = {name: (lambda signum, frame: None) for name in names}
    before = {name: signal.signal(getattr(signal, name), handler) for name, handler in mine.items()}
    try:
        assert prepare_data.main(local_args(tmp_path / "o", text, text)) == 0
        assert {name: signal.getsignal(getattr(signal, name)) for name in names} == mine
        assert prepare_data.main(local_args(tmp_path / "o", tmp_path / "none.txt", text)) == 1
        assert {name: signal.getsignal(getattr(signal, name)) for name in names} == mine
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def test_a_record_that_is_not_a_record_means_rebuild(tmp_path, capsys):
    text, out = tmp_path / "t.txt", tmp_path / "o"
    text.write_bytes(made_up_text(5))
    assert prepare_data.main(local_args(out, text, text)) == 0
    (out / "train.bin.json").write_text("[]")  # valid JSON, but no record
    capsys.readouterr()
    assert prepare_data.main(local_args(out, text, text)) == 0
    assert "train.bin.json is damaged (not a record): rebuilding" in capsys.readouterr().out


def test_prepare_data_into_a_pipe_draws_no_bars_and_prints_its_summaries(tmp_path):
    text, val, out = tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "o"
    text.write_bytes(made_up_text(5))
    val.write_bytes(made_up_text(2))
    done = subprocess.run([sys.executable, "prepare_data.py", *local_args(out, text, val)], cwd=HERE,
                          capture_output=True, timeout=60)  # bytes: text mode would turn each \r into \n
    assert done.returncode == 0 and b"\r" not in done.stdout + done.stderr and done.stderr == b""
    printed = done.stdout.decode()
    assert f"train.bin: {text.stat().st_size:,} bytes, 5 stories" in printed and "val.bin:" in printed


PREPARE_SMALL = """
import sys
import prepare_data
SMALL = {"enwik8": {"train": 900, "val": 50, "test": 50}, "shakespeare": {"train": 900, "val": 100}}
prepare_data.SPLIT_TEXTS = {name: (base, file, SMALL[name]) for name, (base, file, _) in prepare_data.SPLIT_TEXTS.items()}
sys.exit(prepare_data.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("dataset, name, kind", [
    ("local", "train.bin.tmp", "FIFO"), ("local", "val.bin.json.tmp", "FIFO"), ("local", "train.bin", "folder"),
    ("tinystories", "TinyStoriesV2-GPT4-train.txt.part", "FIFO"), ("tinystories", "TinyStoriesV2-GPT4-valid.txt", "folder"),
    ("enwik8", "enwik8.tmp", "FIFO"), ("enwik8", "test.bin", "folder"), ("shakespeare", "input.txt.part", "FIFO")])
def test_a_fifo_or_folder_in_the_way_of_an_output_is_one_line_before_any_work(tmp_path, http_server, dataset, name, kind):
    """Any file prepare_data writes, a .tmp or .part included: a FIFO there would hang the run (opening it waits
    for a reader), a folder there would fail it at the rename, after the work, naming the .tmp."""
    text = made_up_text(20)[:1000]
    RangeHandler.FILES = {prepare_data.TRAIN_FILE: text, prepare_data.VAL_FILE: text, "enwik8.zip": enwik8_zip(text),
                          "input.txt": text}
    out, source = tmp_path / "out", tmp_path / "t.txt"
    out.mkdir()
    source.write_bytes(text)
    os.mkfifo(out / name) if kind == "FIFO" else (out / name).mkdir()
    args = local_args(out, source, source) if dataset == "local" else \
        ["--out-dir", str(out), "--url-base", http_server] + ["--dataset", dataset] * (dataset != "tinystories")
    done = subprocess.run([sys.executable, "-c", PREPARE_SMALL, *args], cwd=HERE, capture_output=True, text=True, timeout=20)
    what = "is a folder" if kind == "folder" else "is not a regular file (a device or a FIFO, say)"
    assert (done.returncode, done.stderr) == (1, f"error: {out / name} {what}: choose another --out-dir\n")
    assert os.listdir(out) == [name]  # nothing downloaded, nothing written


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_the_tmp_beside_the_file_a_linked_bin_names_is_checked_too(tmp_path):
    """train.bin a symbolic link to a file on another disk: the new train.bin is written beside that file, as
    its .tmp, and renamed over it (the link stays); a FIFO there is found before any work, as at out/train.bin.tmp."""
    text, val, out, disk = tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "o", tmp_path / "disk"
    text.write_bytes(made_up_text(5))
    val.write_bytes(made_up_text(2))
    out.mkdir()
    disk.mkdir()
    (disk / "train.bin").write_bytes(b"an older train.bin")
    (out / "train.bin").symlink_to(disk / "train.bin")
    os.mkfifo(disk / "train.bin.tmp")
    done = subprocess.run([sys.executable, "prepare_data.py", *local_args(out, text, val)], cwd=HERE,
                          capture_output=True, text=True, timeout=20)
    fifo = os.path.realpath(disk / "train.bin") + ".tmp"
    assert (done.returncode, done.stderr) == (1, f"error: {fifo} is not a regular file (a device or a FIFO, say): choose another --out-dir\n")
    assert sorted(os.listdir(out)) == ["train.bin"] and (disk / "train.bin").read_bytes() == b"an older train.bin"


def test_a_second_run_on_one_out_dir_is_refused_at_once(tmp_path, capsys):
    """Two runs writing one --out-dir would write the same .tmp files, and one of them would fail at
    its rename: the second one stops before any work, in one line, and the first goes on."""
    text, val, out = tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "o"
    text.write_bytes(made_up_text(5))
    val.write_bytes(made_up_text(2))
    first = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, *local_args(out, text, val)], cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "train.bin.tmp").exists() and time.time() < deadline:  # the first is converting
        time.sleep(0.02)
    err = one_error_line(capsys, prepare_data.main(local_args(out, text, val)))
    assert err == f"error: another prepare_data.py is writing in {out}: wait for it to end, or choose another --out-dir\n"
    assert os.listdir(out) == ["train.bin.tmp"]
    first.send_signal(signal.SIGTERM)  # the first, stopped as it would be, cleans up after itself
    assert first.wait(timeout=60) == 128 + signal.SIGTERM and os.listdir(out) == []
    assert prepare_data.main(local_args(out, text, val)) == 0  # the lock went with it


def test_prepare_data_into_a_closed_pipe_finishes_its_work_and_exits_0(tmp_path):
    """`prepare_data.py ... | head -1`: once head has gone, each summary line fails to be written (a broken
    pipe); the work goes on to its end, silently, and the exit code is 0.  The pipe is closed from the start
    here, so that even the first line fails, whatever the timing."""
    text, val, out = tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "o"
    text.write_bytes(made_up_text(5))
    val.write_bytes(made_up_text(2))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "prepare_data.py", *local_args(out, text, val)], cwd=HERE,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")
    assert (out / "train.bin").read_bytes() == text.read_bytes() and (out / "val.bin").read_bytes() == val.read_bytes()
    assert sorted(os.listdir(out)) == ["train.bin", "train.bin.json", "val.bin", "val.bin.json"]


def test_a_val_text_that_is_also_a_train_text_is_warned_of(tmp_path, capsys):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    for i, path in enumerate((a, b, c)):
        path.write_bytes(made_up_text(3, seed=i))
    os.link(b, tmp_path / "also_b.txt")  # the same file under another name
    assert prepare_data.main(["--out-dir", str(tmp_path / "o"), "--input-train", str(a), str(b),
                              "--input-val", str(tmp_path / "also_b.txt")]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: --input-val {tmp_path / 'also_b.txt'} is also a train text") and err.count("\n") == 1
    assert prepare_data.main(["--out-dir", str(tmp_path / "o"), "--input-train", str(a), str(b), "--input-val", str(c)]) == 0
    assert capsys.readouterr().err == ""


def test_ctrl_c_in_a_download_leaves_it_resumable(tmp_path, http_server, monkeypatch, capsys):
    train, val = made_up_text(30, seed=5), made_up_text(10, seed=6)
    RangeHandler.FILES = {prepare_data.TRAIN_FILE: train, prepare_data.VAL_FILE: val}
    monkeypatch.setattr(prepare_data, "CHUNK", 1000)

    class InterruptedBar(prepare_data.tqdm):  # Ctrl-C after the second chunk of the train text
        def __init__(self, **options):  # the bar is disabled in a test (no terminal): count here
            super().__init__(**options)
            self.name, self.done = options["desc"], options["initial"]

        def update(self, n=1):
            super().update(n)
            self.done += n
            if self.name == prepare_data.TRAIN_FILE and self.done >= 2000:
                raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "tqdm", InterruptedBar)
    out = tmp_path / "data"
    assert prepare_data.main(["--out-dir", str(out), "--url-base", http_server]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert (out / (prepare_data.TRAIN_FILE + ".part")).read_bytes() == train[:2000]
    monkeypatch.undo()
    RangeHandler.ranges.clear()
    assert prepare_data.main(["--out-dir", str(out), "--url-base", http_server]) == 0
    assert RangeHandler.ranges == [(2000, None)] and (out / "train.bin").read_bytes() == train


def test_download_errors_are_one_line(tmp_path, http_server, capsys):
    RangeHandler.FILES = {}
    assert prepare_data.main(["--out-dir", str(tmp_path), "--url-base", http_server]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert prepare_data.main(["--out-dir", str(tmp_path), "--url-base", "http://127.0.0.1:9/"]) == 1
    err = capsys.readouterr().err
    assert "--input-train" in err and "Traceback" not in err
    assert prepare_data.main(["--out-dir", str(tmp_path), "--input-train", str(tmp_path / "nope.txt"),
                              "--input-val", str(tmp_path / "nope.txt")]) == 1
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Training, checkpoints, resume

def run_main(*args):
    return mora.main([str(a) for a in args])


def one_error_line(capsys, exit_code, after_progress=False):
    """What a failed command printed: exit code 1 and one line 'error: ...', no traceback
    (after_progress: after the training's progress bar)."""
    assert exit_code == 1
    err = capsys.readouterr().err
    if after_progress:
        assert "Traceback" not in err, err
        err = err[err.rfind("error: "):]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_is_bit_exact(data_dir, tmp_path):
    common = ["train", "--data-dir", data_dir, *TINY, "--max-steps", 8, "--device", "cpu", "--eval-every", 0]
    straight, split = tmp_path / "straight.npz", tmp_path / "split.npz"
    assert run_main(*common, "--ckpt", straight) == 0
    assert run_main(*common, "--ckpt", split, "--stop-after", 3) == 0
    assert mora.load_checkpoint(str(split))[2]["step"] == 3
    assert run_main("train", "--data-dir", data_dir, "--ckpt", split, "--resume", "--device", "cpu", "--eval-every", 0) == 0
    _, p_straight, meta, opt_straight = mora.load_checkpoint(str(straight), adam=True)
    _, p_split, _, opt_split = mora.load_checkpoint(str(split), adam=True)
    assert meta["step"] == 8
    for name in p_straight:
        assert np.array_equal(p_straight[name], p_split[name]), name
    assert np.array_equal(opt_straight["adam.v"], opt_split["adam.v"])
    with open(tmp_path / "straight.csv") as a, open(tmp_path / "split.csv") as b:
        rows_a = [r.split(",")[:7] for r in a.read().splitlines()]
        rows_b = [r.split(",")[:7] for r in b.read().splitlines()]
    assert rows_a == rows_b and len(rows_a) == 10  # header, 8 steps, final validation


def test_resume_on_other_threads_is_bit_exact(data_dir, tmp_path):
    """A run on 2 threads, stopped and resumed on 1, ends where the straight 2-thread run does: the
    batch's slices are part of the run, the threads only share them out."""
    common = ["train", "--data-dir", data_dir, *TINY, "--max-steps", 6, "--device", "cpu", "--eval-every", 0,
              "--no-final-eval"]
    straight, split = tmp_path / "straight.npz", tmp_path / "split.npz"
    assert run_main(*common, "--ckpt", straight, "--threads", 2) == 0
    assert run_main(*common, "--ckpt", split, "--threads", 2, "--stop-after", 3) == 0
    assert run_main("train", "--data-dir", data_dir, "--ckpt", split, "--resume", "--device", "cpu", "--threads", 1) == 0
    _, p_straight, meta, opt_straight = mora.load_checkpoint(str(straight), adam=True)
    _, p_split, meta_split, opt_split = mora.load_checkpoint(str(split), adam=True)
    assert meta_split["step"] == 6 and meta_split["train"]["slices"] == meta["train"]["slices"] == 2
    for name in p_straight:
        assert np.array_equal(p_straight[name], p_split[name]), name
    for moment in ("adam.m", "adam.v"):
        assert np.array_equal(opt_straight[moment], opt_split[moment]), moment


def test_checkpoint_round_trip(tmp_path):
    cfg = mora.Config(d_model=8, n_layers=2, seq_len=16, batch_size=4)
    params = mora.init_params(cfg, 7)
    m = np.arange(mora.count_params(cfg), dtype=np.float32)
    path = str(tmp_path / "c.npz")
    data = {"train_records": 100, "files": {name: {"bytes": 1700} for name in ("train.bin", "val.bin")}}
    run = {"train": mora.asdict(mora.TrainSettings(max_steps=10, warmup=3)), "data": data}  # Adam's moments: a run's
    mora.save_checkpoint(path, params, {"config": mora.asdict(cfg), "step": 5, **run}, m, 2 * m)
    cfg2, params2, meta, opt = mora.load_checkpoint(path, adam=True)
    assert cfg2 == cfg and meta["step"] == 5 and np.array_equal(opt["adam.v"], 2 * m)
    assert all(np.array_equal(params[k], params2[k]) for k in params)
    with np.load(path) as f:  # plain NumPy reads the weights by name
        assert np.array_equal(f["blocks.1.w_up"], params["blocks.1.w_up"])
    mora.save_checkpoint(path, params, {"config": mora.asdict(cfg), "step": 5}, m, 2 * m)  # no run's settings
    assert mora.load_checkpoint(path)[2]["step"] == 5
    with pytest.raises(mora.UserError, match="holds weights only .*: it cannot be resumed"):
        mora.load_checkpoint(path, adam=True)


def test_commands_end_to_end(data_dir, tmp_path):
    """prepare_data.py and the four commands of mora.py, as a user runs them."""
    def run(*args):
        result = subprocess.run([sys.executable, *map(str, args)], cwd=HERE, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    text = tmp_path / "story.txt"
    text.write_bytes(made_up_text(40))
    out = tmp_path / "data"
    assert "stories" in run("prepare_data.py", "--out-dir", out, "--input-train", text, "--input-val", text)
    ckpt = tmp_path / "ck" / "m.npz"
    printed = run("mora.py", "train", "--data-dir", out, "--ckpt", ckpt, *TINY, "--max-steps", 6,
                  "--eval-every", 3, "--device", "cpu")
    assert "total" in printed and "bits/byte" in printed and ckpt.exists() and (tmp_path / "ck" / "m.csv").exists()
    assert "Once upon" in run("mora.py", "sample", "--ckpt", ckpt, "--prompt", "Once upon", "--length", 40, "--device", "cpu")
    assert "bits/byte" in run("mora.py", "eval", "--ckpt", ckpt, "--data-dir", out, "--device", "cpu")
    assert "ms/step" in run("mora.py", "bench", *TINY, "--steps", 2, "--device", "cpu")


def test_readme_loop_trains_and_samples_as_written(tmp_path):
    """README's training loop, taken from README.md as it stands and run as it says
    (`python loop.py story.txt` beside mora.py), trains on a text and samples from it."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    loop = [block for block in blocks if "train_step(" in block]
    assert len(loop) == 1
    (tmp_path / "loop.py").write_text(loop[0])
    (tmp_path / "story.txt").write_bytes(made_up_text(200))
    result = subprocess.run([sys.executable, "loop.py", "story.txt"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=HERE))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    bits = [float(line.split(": ")[1].split()[0]) for line in lines if re.match(r"step \d+: ", line)]
    assert len(bits) == 4 and bits[0] > 7.5 and bits[-1] < bits[0] - 4, bits  # 8 bits/byte is a guess at random
    assert lines[-1].startswith("Once upon a time") and len(lines[-1]) > len("Once upon a time") + 50


def test_train_into_a_file_prints_plain_lines_and_samples(data_dir, tmp_path):
    """`train ... > run.txt 2>&1`: the progress is plain lines, at the first and last
    step and every Report.PLAIN_SECONDS, with no carriage return and no escape code.
    Each evaluation prints a sample, appended with its step to CKPT.samples.txt: the
    bytes `generate` continues the prompt with from that step's weights, at
    temperature 0.8 and seed 0.  A resume appends; --sample-length 0 samples nothing."""
    ckpt = tmp_path / "m.npz"

    def train(*flags):
        with open(tmp_path / "run.txt", "w") as out:
            command = ["train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 8,
                       "--eval-every", 4, "--no-final-eval", "--sample-prompt", "Tom had", "--sample-length", 30, *flags]
            subprocess.run([sys.executable, "mora.py", *map(str, command)], cwd=HERE, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300)
        return (tmp_path / "run.txt").read_bytes().decode()  # not read_text(): it would turn each \r into \n

    def sample_line(step):
        params = mora.load_checkpoint(str(ckpt))[1]
        text = (b"Tom had" + bytes(mora.generate(params, b"Tom had", 30, 0.8, 0, 0))).decode("utf-8", "replace")
        return f"step {step}: {text!r}"

    printed = train("--stop-after", 4)
    progress = [line for line in printed.splitlines() if re.match(r"step \d+/8: loss", line)]
    assert "\r" not in printed and "\x1b" not in printed and progress[0].startswith("step 1/8: ")
    assert progress[-1].startswith("step 4/8: ") and "ms/step" in progress[-1] and len(progress) <= 4
    assert (tmp_path / "m.samples.txt").read_text() == sample_line(4) + "\n"
    assert f"step 4: sample: {sample_line(4)[len('step 4: '):]}" in printed
    printed = train("--resume")
    assert "\r" not in printed and re.search(r"^step 5/8: loss", printed, re.M) and re.search(r"^step 8/8: loss", printed, re.M)
    assert (tmp_path / "m.samples.txt").read_text().splitlines()[1] == sample_line(8)
    (tmp_path / "m.samples.txt").unlink()
    assert "sample" not in train("--overwrite", "--sample-length", 0) and not (tmp_path / "m.samples.txt").exists()


def test_the_lesson_uses_nothing_defined_after_it():
    """Everything before "Running it for real" reads as a whole: no name it uses (a function, a class, a constant)
    is defined only after that line, in the machinery or the kernels."""
    import ast
    with open(mora.__file__) as f:
        source = f.read()
    start = next(n for n, line in enumerate(source.splitlines(), 1) if line.startswith("# Running it for real"))
    tree = ast.parse(source)

    def defined(node):
        targets = node.targets if isinstance(node, ast.Assign) else [node]
        return {getattr(t, "name", getattr(t, "id", None)) for t in targets}
    before = set().union(*(defined(n) for n in tree.body if n.lineno < start))
    after = set().union(*(defined(n) for n in tree.body if n.lineno > start)) - before
    used = {(n.id, n.lineno) for node in tree.body if node.lineno < start for n in ast.walk(node) if isinstance(n, ast.Name)}
    assert after and not {(name, line) for name, line in used if name in after}


def test_the_resume_comment_names_where_each_reason_is_held():
    """The comment above start_or_resume lists why a resumed run is bit for bit the same, each reason with the
    name that holds it: every such name exists."""
    import functools
    with open(mora.__file__) as f:
        source = f.read()
    comment = source[source.index("# Why a resumed run is bit for bit the same"):source.index("def start_or_resume(")]
    named = re.findall(r"^#   - [^(]*\(([\w.]+)", comment, re.M)
    assert len(named) == 7 and all(functools.reduce(getattr, name.split("."), mora) for name in named), named


def log_rows(log):
    import csv
    with open(log, newline="") as f:
        return list(csv.DictReader(f))


def test_each_step_trains_at_the_scheduled_learning_rate(data_dir, tmp_path):
    """The log's lr column is the rate each step was taken at: learning_rate(step - 1, ...) for the
    logged step (which counts from 1), lr / warmup at the first, the peak at the end of warmup,
    and the same schedule after a resume."""
    ckpt = tmp_path / "m.npz"
    flags = ["--data-dir", data_dir, "--ckpt", ckpt, "--device", "cpu", "--eval-every", 0, "--no-final-eval"]
    assert run_main("train", *flags, *TINY, "--max-steps", 10, "--warmup", 4, "--lr", 0.01, "--final-lr-fraction", 0.1,
                    "--stop-after", 5) == 0
    assert run_main("train", *flags, "--resume") == 0
    rows = log_rows(tmp_path / "m.csv")
    assert [int(row["step"]) for row in rows] == list(range(1, 11))
    expected = [mora.learning_rate(step, 10, 0.01, 4, 0.1) for step in range(10)]
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected, rel=1e-5)
    assert float(rows[0]["lr"]) == pytest.approx(0.01 / 4) and float(rows[3]["lr"]) == pytest.approx(0.01)


def test_plain_progress_lines_come_at_the_first_and_last_step_and_every_ten_seconds(data_dir, tmp_path, monkeypatch,
                                                                                     capsys):
    """Into a file (here: not a terminal) a run prints the first and the last step, and a line each
    time 10 s have passed since the last one.  A short run: two lines.  Then a clock that moves 3 s
    a step: a line every 3 or 4 steps, never more often, never less."""
    def progress_steps(*flags):
        assert run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "m.npz", *TINY, "--device", "cpu",
                        "--eval-every", 0, "--no-final-eval", "--overwrite", *flags) == 0
        return [int(m[1]) for m in re.finditer(r"^step (\d+)/\d+: loss", capsys.readouterr().err, re.M)]

    assert progress_steps("--max-steps", 6) == [1, 6]
    now, train_step = [1000.0], mora.train_step

    def three_seconds_a_step(*args, **kwargs):
        now[0] += 3.0
        return train_step(*args, **kwargs)
    monkeypatch.setattr(mora, "train_step", three_seconds_a_step)
    for clock in ("monotonic", "perf_counter", "time"):
        monkeypatch.setattr(time, clock, lambda: now[0])
    steps = progress_steps("--max-steps", 30)
    gaps = np.diff(steps[:-1])
    assert steps[0] == 1 and steps[-1] == 30 and len(steps) >= 8
    assert set(gaps) <= {3, 4} and 1 <= steps[-1] - steps[-2] <= 4


def run_beside_a_terminal(data_dir, tmp_path, terminal_for):
    """A short training run with `terminal_for` ("stdout" or "stderr") on a terminal (a pty) and the
    other stream in a file: (what the terminal received, what the file holds), as bytes."""
    import fcntl
    import pty
    import struct
    import termios
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows of 100 columns, as a window has
    with open(tmp_path / "file.txt", "wb") as file:
        streams = {"stdout": file, "stderr": file, terminal_for: side}
        proc = subprocess.Popen([sys.executable, "mora.py", "train", "--data-dir", data_dir, "--ckpt",
                                 str(tmp_path / "m.npz"), *TINY, "--device", "cpu", "--max-steps", "30",
                                 "--eval-every", "0", "--no-final-eval", "--overwrite"], cwd=HERE, **streams)
    os.close(side)
    received = b""
    while True:  # read as a terminal does, so that the run never waits on a full terminal
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # EIO: the run has ended and closed its end
            break
        if not chunk:
            break
        received += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0
    return received, (tmp_path / "file.txt").read_bytes()


def test_the_progress_bar_is_drawn_only_on_a_terminal(data_dir, tmp_path):
    """The bar and the plain lines follow the stream they are written to (stderr), whatever stdout
    is: a bar (redrawn with a carriage return) on a terminal, plain lines in a file."""
    plain_line = re.compile(rb"^step 1/30: loss", re.M)
    terminal, file = run_beside_a_terminal(data_dir, tmp_path, "stderr")
    assert re.search(rb"\r(?!\n)", terminal) and b"30/30" in terminal and not plain_line.search(terminal)
    assert b"\r" not in file and b"checkpoint:" in file
    terminal, file = run_beside_a_terminal(data_dir, tmp_path, "stdout")
    assert b"\r" not in file and plain_line.search(file) and re.search(rb"^step 30/30: loss", file, re.M)
    assert not re.search(rb"\r(?!\n)", terminal) and b"checkpoint:" in terminal  # a terminal ends lines with \r\n


def test_the_samples_file_is_written_as_the_run_goes(data_dir, tmp_path):
    """A run killed outright (SIGKILL: no handler runs) leaves in CKPT.samples.txt every sample it
    made: one a step here, at least one for each step in the log, in order."""
    ckpt, log, samples = tmp_path / "m.npz", tmp_path / "m.csv", tmp_path / "m.samples.txt"
    proc = start_training(data_dir, ckpt, "--max-steps", 100000, "--eval-every", 1, "--eval-bytes", 17,
                          "--sample-length", 8, "--ckpt-every", 100000)
    wait_for_rows(log, 4)
    proc.kill()
    proc.wait()
    sampled = [int(m[1]) for m in re.finditer(r"^step (\d+): '", samples.read_text(), re.M)]
    assert len(samples.read_text().splitlines()) == len(sampled)
    assert sampled == list(range(1, len(sampled) + 1)) and len(sampled) >= len(logged_steps(log)) >= 4


def test_a_new_run_starts_its_samples_file_afresh(data_dir, tmp_path):
    """--overwrite, or a new run where only the old samples file is left: the old run's samples go."""
    ckpt, samples = tmp_path / "m.npz", tmp_path / "m.samples.txt"

    def train(*flags):
        assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 2,
                        "--eval-bytes", 17, "--no-final-eval", "--sample-length", 8, *flags) == 0
        return [line.split(":")[0] for line in samples.read_text().splitlines()]

    assert train("--max-steps", 4) == ["step 2", "step 4"]
    assert train("--max-steps", 2, "--overwrite") == ["step 2"]
    ckpt.unlink()
    assert train("--max-steps", 2) == ["step 2"]


def test_ctrl_c_saves_and_exits_cleanly(data_dir, tmp_path):
    import signal
    import time
    ckpt = tmp_path / "c.npz"
    proc = subprocess.Popen([sys.executable, "mora.py", "train", "--data-dir", data_dir, "--ckpt", str(ckpt),
                             "--d-model", "32", "--n-layers", "4", "--seq-len", "64", "--batch-size", "8",
                             "--max-steps", "100000", "--device", "cpu"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(str(ckpt).replace(".npz", ".csv")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in out
    assert 0 < mora.load_checkpoint(str(ckpt))[2]["step"] < 100000


# ----------------------------------------------------------------------------
# Bad input: one line that says what to do, non-zero exit, no traceback

def test_bad_input_errors(data_dir, tmp_path, capsys):
    def error_of(*args):
        return one_error_line(capsys, run_main(*args))

    ckpt = tmp_path / "m.npz"
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 0]
    assert "prepare_data.py" in error_of("train", "--data-dir", tmp_path / "none", "--ckpt", ckpt, "--device", "cpu")
    short = tmp_path / "short"
    short.mkdir()
    (short / "train.bin").write_bytes(b"x" * 10)
    (short / "val.bin").write_bytes(b"x" * 10)
    assert "--seq-len" in error_of("train", "--data-dir", short, "--ckpt", ckpt, "--device", "cpu")
    assert "--batch-size" in error_of(*train, "--batch-size", 100000)
    assert "python mora.py train" in error_of("sample", "--ckpt", tmp_path / "none.npz", "--device", "cpu")
    assert run_main(*train, "--max-steps", 2) == 0
    capsys.readouterr()
    assert "--resume" in error_of(*train, "--max-steps", 2)  # never silently overwrite a run
    assert "drop the size flags" in error_of(*train, "--resume", "--d-model", 16)
    assert "differ" in error_of(*train, "--resume", "--lr", 0.5)
    assert "past its end (--max-steps 1): give a larger --max-steps" in error_of(*train, "--resume", "--max-steps", 1)
    for split in ("train.bin", "val.bin"):  # other data: the order would not continue
        (short / split).write_bytes(made_up_text(200, seed=9))
    assert "trained on" in error_of("train", "--data-dir", short, "--ckpt", ckpt, "--resume", "--device", "cpu")
    _, weights, meta, adam = mora.load_checkpoint(str(ckpt), adam=True)
    unhashed = dict(meta, data=dict(meta["data"], files={name: {"bytes": record["bytes"], "sampled_sha256": "0" * 64}
                                                         for name, record in meta["data"]["files"].items()}))
    mora.save_checkpoint(str(tmp_path / "unhashed.npz"), weights, unhashed, adam["adam.m"], adam["adam.v"])
    assert "records no SHA-256 of its train.bin" in error_of("train", "--data-dir", data_dir, "--ckpt",
                                                             tmp_path / "unhashed.npz", "--resume", "--device", "cpu")
    assert run_main("sample", "--ckpt", tmp_path / "unhashed.npz", "--length", 5, "--device", "cpu") == 0  # its weights still serve
    capsys.readouterr()
    assert "empty" in error_of("sample", "--ckpt", ckpt, "--prompt", "", "--device", "cpu")
    assert run_main("sample", "--ckpt", ckpt, "--prompt", "\udcffé", "--length", 5, "--device", "cpu") == 0  # any bytes
    capsys.readouterr()
    data = ckpt.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    assert "corrupt" in error_of("eval", "--ckpt", tmp_path / "cut.npz", "--data-dir", data_dir, "--device", "cpu")
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    assert "corrupt" in error_of("sample", "--ckpt", tmp_path / "junk.npz", "--device", "cpu")
    with np.load(ckpt) as f:  # the same arrays compressed, the first one's deflate block header damaged
        np.savez_compressed(tmp_path / "zipped.npz", **{k: f[k] for k in f.files})
    zipped = bytearray((tmp_path / "zipped.npz").read_bytes())
    name_length, extra_length = np.frombuffer(zipped[26:30], "<u2")  # the first member's local header
    zipped[30 + name_length + extra_length] ^= 0xFF
    (tmp_path / "zipped.npz").write_bytes(bytes(zipped))
    assert "damaged compressed data" in error_of("sample", "--ckpt", tmp_path / "zipped.npz", "--device", "cpu")
    if mora.select_backend("auto") is np:
        assert "--device cpu" in error_of("bench", "--device", "gpu")
    for flags in (["--batch-size", "0"], ["--lr", "-1"], ["--seq-len", "0"], ["--size", "huge"], ["--beta2", "1"],
                  ["--lr", "nan"], ["--mix-init", "0", "inf", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(*train, *flags)
        assert exit_info.value.code == 2 and "usage" in capsys.readouterr().err
    for temperature in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            run_main("sample", "--ckpt", ckpt, "--temperature", temperature)
        assert exit_info.value.code == 2 and "usage" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# The GPU path without a GPU: a CPU stand-in for the slice of CuPy that mora.py uses.
# Its arrays are NumPy arrays of a subclass (the "device" arrays), which refuse to mix
# with host arrays and count every operation as a kernel launch; its RawModule
# compiles mora's CUDA source as C++ and runs a launch over its whole grid x block,
# after checking every argument as strictly as a launch needs: a C-contiguous float32
# device array for a float*, the exact NumPy type for an int, long long or float.
# Matmuls round their inputs to TF32 (a 10-bit mantissa), as a GPU's tensor cores do,
# unless CUPY_TF32=0 when the process's first float32 matmul runs: CuPy reads the
# variable then, once.  Where CuPy finds a real GPU, the same tests run on it instead.
# A child process (child_env) finds the stand-in too, as the module `cupy`.

def kernel_compiler(folder):
    """compile(code, options): one of mora's CUDA sources compiled as C++ (with its -D
    options): each kernel NAME gets run_NAME(grid, block, its parameters...), which
    calls it for every block and thread in turn.  Returns (library, name -> parameter
    C types).  A library is named by a hash of its source and options, so that it is
    compiled once per folder, also for the stand-in in a child process (child_env)."""
    loaded = {}

    def compile(code, options):
        key = hashlib.sha256(repr((code, options)).encode()).hexdigest()[:16]
        if key not in loaded:
            loaded[key] = compile_as_cpp(code, options, os.path.join(folder, f"kernels-{key}.so"))
        return loaded[key]
    return compile


@pytest.fixture(scope="module")
def kernel_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="module")
def compiled_kernels(kernel_folder):
    return kernel_compiler(kernel_folder)


def compile_as_cpp(code, options, path):
    """The library at `path` (compiled unless it is there) and each kernel's parameter types."""
    import ctypes
    prelude = ("#include <math.h>\nstruct Index { unsigned int x; };\nstatic Index threadIdx, blockIdx, blockDim;\n"
               "#define __global__\n#define __device__ static\n#define __forceinline__ inline\n")
    wrappers, signatures = [], {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', code):
        params = [" ".join(p.split()) for p in params.split(",")]
        names = [p.split()[-1] for p in params]
        wrappers.append(f'extern "C" void run_{name}(long long grid_, long long block_, {", ".join(params)}) {{ blockDim.x = block_;'
                        f' for (blockIdx.x = 0; blockIdx.x < grid_; blockIdx.x++)'
                        f' for (threadIdx.x = 0; threadIdx.x < block_; threadIdx.x++) {name}({", ".join(names)}); }}')
        signatures[name] = [p.replace("const ", "").replace(" __restrict__", "").rsplit(" ", 1)[0].replace(" *", "*")
                            for p in params]
    if not os.path.exists(path):
        partial = f"{path}.{os.getpid()}.tmp"  # renamed when complete: another process never loads half a library
        result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", *options, "-x", "c++", "-", "-o", partial],
                                input=prelude + code + "\n".join(wrappers), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        os.replace(partial, path)
    return ctypes.CDLL(str(path)), signatures


C_TYPES = {"float*": "c_void_p", "int*": "c_void_p", "int": "c_int", "long long": "c_longlong", "float": "c_float"}
POINTER_TYPES = {"float*": np.float32, "int*": np.int32}
NUMPY_TYPES = {"int": np.int32, "long long": np.int64, "float": np.float32}


def run_compiled(compiled, name, grid, block, args):
    import ctypes
    library, signatures = compiled
    function = getattr(library, f"run_{name}")
    function.argtypes = [ctypes.c_longlong, ctypes.c_longlong] + [getattr(ctypes, C_TYPES[p]) for p in signatures[name]]
    function(grid, block, *[a.ctypes.data if isinstance(a, np.ndarray) else a for a in args])


@pytest.fixture(scope="module")
def kernels_on_cpu(compiled_kernels):
    """Run a kernel over n_threads threads, NumPy arrays for pointers; width: the model
    width, for the kernels of BLOCK_SOURCE; block: threads per block (default one),
    the grid rounded up as mora.launch rounds it, so that threads past n_threads run."""
    def run(name, n_threads, *args, width=None, block=1):
        code = mora.CUDA_SOURCE if width is None else mora.BLOCK_SOURCE
        grid = (n_threads + block - 1) // block
        run_compiled(compiled_kernels(code, mora.kernel_options(width)), name, grid, block, args)
    return run


class DeviceArray(np.ndarray):
    """A stand-in cupy.ndarray: each operation counts as a kernel launch; a host
    (NumPy) array with elements in the same operation is an error, as in CuPy."""
    cupy = None  # the StandInCupy counting launches

    def get(self):
        return np.array(self.view(np.ndarray))

    def copy(self, order="C"):
        self.cupy.launches += 1
        return super().copy(order)

    def astype(self, dtype, **kwargs):
        self.cupy.launches += 1
        return super().astype(dtype, **kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        self.cupy.launches += 1
        inputs = [to_host(a) for a in inputs]
        if ufunc is np.matmul and np.result_type(*inputs) == np.float32 and StandInCupy.float32_matmuls_in_tf32():
            inputs = [tf32(a) for a in inputs]
        if out:
            kwargs["out"] = tuple(to_host(o) for o in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return (out[0] if len(out) == 1 else out) if out else to_device(result)

    def __array_function__(self, func, types, args, kwargs):
        if func not in (np.empty_like, np.shape, np.ndim):
            self.cupy.launches += 1
        return to_device(func(*to_host(args), **to_host(kwargs)))

    def __getitem__(self, key):
        if not is_basic_index(key):
            self.cupy.launches += 1  # a gather kernel
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        self.cupy.launches += 1  # a copy or scatter kernel
        super().__setitem__(key, to_host(value))


def is_basic_index(key):
    return all(k is None or k is Ellipsis or isinstance(k, (int, np.integer, slice)) for k in (key if isinstance(key, tuple) else (key,)))


def to_host(a):
    """Device arrays as plain NumPy (recursively through lists, tuples, dicts); a host
    array with elements is refused, as CuPy refuses numpy.ndarray operands."""
    if isinstance(a, DeviceArray):
        return a.view(np.ndarray)
    if isinstance(a, np.ndarray) and a.ndim > 0:
        raise TypeError(f"a host numpy.ndarray {a.shape} in a device operation: move it with cupy.asarray first")
    if isinstance(a, (list, tuple)):
        return type(a)(to_host(x) for x in a)
    if isinstance(a, dict):
        return {k: to_host(v) for k, v in a.items()}
    return a


def to_device(result):
    if isinstance(result, tuple):
        return tuple(to_device(r) for r in result)
    if isinstance(result, (np.ndarray, np.generic)):
        return np.asarray(result).view(DeviceArray)
    return result


def tf32(a):
    """float32 rounded to TF32's 10-bit mantissa (round to nearest), as tensor cores read it."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        return a
    bits = np.ascontiguousarray(a).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


class StandInKernel:
    def __init__(self, cupy, module, name):
        self.cupy, self.module, self.name, self.params = cupy, module, name, module[1][name]

    def __call__(self, grid, block, args):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        for position, (kind, arg) in enumerate(zip(self.params, args)):
            if kind in POINTER_TYPES:
                ok = isinstance(arg, DeviceArray) and arg.dtype == POINTER_TYPES[kind] and arg.flags.c_contiguous
            else:
                ok = type(arg) is NUMPY_TYPES[kind]
            if not ok:
                got = f"{type(arg).__name__} {getattr(arg, 'dtype', '')}{'' if getattr(arg, 'flags', {'C_CONTIGUOUS': 1})['C_CONTIGUOUS'] else ' (not C-contiguous)'}"
                raise TypeError(f"{self.name}: argument {position} must be {kind}, got {got}")
        (n_blocks,), (n_threads,) = grid, block
        self.cupy.launches += 1
        run_compiled(self.module, self.name, n_blocks, n_threads, args)


class StandInEvent:
    """cupy.cuda.Event: the time it is recorded (stand-in launches finish before they return)."""

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


class StandInCupy:
    """The slice of the cupy module that mora.py (and gpu_check.py) use, on the CPU."""
    __version__ = "stand-in"
    ndarray = DeviceArray
    FILLS = ("zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like")
    tf32 = None  # whether float32 matmuls round to TF32: fixed for the process at its first one

    def __init__(self, compiled):
        import types
        self.compiled, self.launches = compiled, 0
        DeviceArray.cupy = self
        total = 24 << 30
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (total, total),
                                          getDeviceProperties=lambda i: {"name": b"CPU stand-in for CuPy"}),
            Device=lambda: types.SimpleNamespace(id=0), Event=StandInEvent,
            get_elapsed_time=lambda start, end: 1000 * (end.time - start.time))

    @classmethod
    def float32_matmuls_in_tf32(cls):
        """As CuPy decides: once per process, at the first float32 matmul, from CUPY_TF32
        (get_compute_type in cupy/_core/_routines_linalg.pyx caches its answer per
        dtype), so that setting the variable later in the process changes nothing."""
        if cls.tf32 is None:
            cls.tf32 = int(os.environ.get("CUPY_TF32", "0")) > 0
        return cls.tf32

    def __getattr__(self, name):
        function = getattr(np, name)
        if isinstance(function, np.ufunc):
            return function
        if name in self.FILLS or name in ("empty", "empty_like"):
            def create(*args, **kwargs):
                self.launches += name in self.FILLS
                return np.asarray(function(*to_host(args), **to_host(kwargs))).view(DeviceArray)
            return create
        return function

    def get_array_module(self, *arrays):
        return self if any(isinstance(a, DeviceArray) for a in arrays) else np

    def asarray(self, a, dtype=None):
        if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
            return a
        return np.array(to_host(a) if isinstance(a, DeviceArray) else a, dtype=dtype).view(DeviceArray)  # a copy to the device

    def ascontiguousarray(self, a, dtype=None):
        if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        self.launches += 1
        return np.ascontiguousarray(to_host(a), dtype=dtype).view(DeviceArray)

    def asnumpy(self, a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    def RawModule(self, code, options=()):
        import types
        assert code in (mora.CUDA_SOURCE, mora.BLOCK_SOURCE)
        module = self.compiled(code, tuple(options))
        return types.SimpleNamespace(get_function=lambda name: StandInKernel(self, module, name))

    def get_default_memory_pool(self):
        import types
        return types.SimpleNamespace(total_bytes=lambda: 0)


def real_gpu():
    """CuPy itself when it can use a GPU here, else None."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return None
    return mora.cupy if mora.gpu_problem() is None else None


@pytest.fixture
def stand_in(compiled_kernels, monkeypatch):
    """The stand-in installed as `cupy`, for mora.py to find like the real one."""
    cupy = StandInCupy(compiled_kernels)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(mora, "cupy", None)
    mora.cuda_module.cache_clear()
    assert mora.select_backend("gpu") is cupy and mora.select_backend("auto") is cupy
    yield cupy
    mora.cuda_module.cache_clear()
    mora.fuse_kernels(False)  # as in a process with no GPU


STAND_IN_MODULE = """# `import cupy` in a child process of test_mora.py: its CPU stand-in for CuPy.
import sys
import test_mora
sys.modules[__name__] = test_mora.StandInCupy(test_mora.kernel_compiler({folder!r}))
"""


@pytest.fixture(scope="module")
def child_env(kernel_folder):
    """The environment for a child process that runs the GPU path: as it is where CuPy
    can use a GPU, else with the stand-in first on the import path as `cupy`."""
    if real_gpu() is not None:
        return dict(os.environ)
    with open(os.path.join(kernel_folder, "cupy.py"), "w") as f:
        f.write(STAND_IN_MODULE.format(folder=kernel_folder))
    path = os.pathsep.join(p for p in (kernel_folder, HERE, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


@pytest.fixture
def gpu(request, monkeypatch):
    """CuPy on a real GPU where there is one, else the stand-in: the GPU tests run either way."""
    cupy = real_gpu()
    if cupy is None:
        return request.getfixturevalue("stand_in")
    monkeypatch.setattr(mora, "cupy", cupy)
    return cupy


def test_gpu_matches_cpu(gpu):
    cfg = mora.Config(d_model=16, n_layers=2)
    params = mora.init_params(cfg, 0)
    gpu_params = {k: gpu.asarray(p) for k, p in params.items()}
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (4, 64)), rng.integers(0, 256, (4, 64))
    logits = mora.forward(params, x)
    assert np.allclose(gpu.asnumpy(mora.forward(gpu_params, gpu.asarray(x))), logits, atol=2e-2)
    loss, grads = mora.loss_and_grads(params, x, y)
    gpu_loss, gpu_grads = mora.loss_and_grads(gpu_params, gpu.asarray(x), gpu.asarray(y))
    assert abs(loss - gpu_loss) < 1e-2  # matmuls in TF32 on the GPU: ~1e-3 relative error per product
    for name in grads:
        assert relative_error(gpu.asnumpy(gpu_grads[name]).astype(np.float64), grads[name].astype(np.float64)) < 2e-2, name


def test_gpu_adam_launcher_matches_plain_adam(stand_in):
    """mora.adam_update on device arrays (the launcher: its bias corrections and
    argument order) against Adam's equations written out here in float64, with beta1 !=
    beta2, over several steps, on gradients from 1e-9 (where eps shows) to 1.  The
    reference is not mora's own code, so a kernel switch stuck on cannot compare the
    kernel with itself; and the launcher must launch."""
    rng = np.random.default_rng(5)
    n, lr, beta1, beta2, eps = 300, 0.01, 0.8, 0.95, 1e-8
    p = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    m, v = np.zeros(n), np.zeros(n)
    on_device = [stand_in.asarray(a.astype(np.float32)) for a in (p, m, v)]
    scale = 10.0 ** rng.uniform(-9, 0, n)
    for step in range(1, 5):
        g = (rng.standard_normal(n) * scale).astype(np.float32)
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g.astype(np.float64) ** 2
        p = p - lr * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
        g_on_device, launches = stand_in.asarray(g), stand_in.launches
        mora.adam_update(on_device[0], g_on_device, on_device[1], on_device[2], step, lr, beta1, beta2, eps)
        assert stand_in.launches - launches == 1  # one fused kernel, not the plain code's dozen array operations
        assert np.allclose(on_device[0].get(), p, rtol=1e-5, atol=1e-6), step
        # float32 rounding relative to each entry's own scale (m, v may cancel to near 0)
        assert np.all(np.abs(on_device[1].get() - m) <= 1e-5 * scale) and np.all(np.abs(on_device[2].get() - v) <= 1e-5 * scale ** 2)


def fused_against_plain(device):
    """(loss difference, worst relative gradient gap) between the fused kernels and the
    plain array code, both on `device`, for a model whose every path matters.  The
    fused run must launch every kernel of a forward and backward and the plain run
    none: a kernel switch stuck on would otherwise compare the kernels with themselves."""
    cfg = mora.Config(d_model=16, n_layers=2)
    params = {k: device.asarray(p) for k, p in mora.init_params(cfg, 0, mix=(0.5, -0.7, 1.0)).items()}
    rng = np.random.default_rng(0)
    x, y = device.asarray(rng.integers(0, 256, (4, 64))), device.asarray(rng.integers(0, 256, (4, 64)))
    launched, plain_launch = [], mora.launch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mora, "launch", lambda name, *args, **kwargs: launched.append(name) or plain_launch(name, *args, **kwargs))
        fused_loss, fused = mora.loss_and_grads(params, x, y)
        fused_launches = len(launched)
        patch.setattr(mora, "USE_KERNELS", False)
        plain_loss, plain = mora.loss_and_grads(params, x, y)
    kernels = set(re.findall(r'extern "C" __global__ void (\w+)\(', mora.CUDA_SOURCE + mora.BLOCK_SOURCE)) - {"adam_update"}
    assert set(launched) == kernels and len(launched) == fused_launches, launched  # the plain run launched none
    gaps = [relative_error(device.asnumpy(fused[k]).astype(np.float64), device.asnumpy(plain[k]).astype(np.float64)) for k in plain]
    return abs(fused_loss - plain_loss), max(gaps)


def test_gpu_kernels_match_plain_path(gpu):
    """Both paths run the same TF32 matmuls, but on inputs that differ by float32
    rounding, which TF32's 10-bit mantissa magnifies to ~1e-3 relative: the tolerances
    hold that (measured on the stand-in with TF32: loss 2.6e-5, gradients 2.3e-3)."""
    loss_gap, gradient_gap = fused_against_plain(gpu)
    assert loss_gap < 5e-4 and gradient_gap < 2e-2


# Without TF32 the fused kernels agree with the plain path to float32 rounding.
FULL_FLOAT32_BOUNDS = {"loss_gap": 1e-5, "gradient_gap": 1e-4}


def full_float32_check():
    """The fused kernels against the plain path on the GPU that `import cupy` finds, as
    a dict of the gaps, their bounds and "ok".  Run it in a process of its own started
    with CUPY_TF32=0 (`python test_mora.py`): CuPy fixes TF32 or not at a process's
    first float32 matmul, so a process that has run one on TF32 cannot leave it."""
    assert os.environ.get("CUPY_TF32") == "0", "start this process with CUPY_TF32=0"
    loss_gap, gradient_gap = fused_against_plain(mora.select_backend("gpu"))
    gaps = {"loss_gap": loss_gap, "gradient_gap": gradient_gap}
    return {**gaps, "bounds": FULL_FLOAT32_BOUNDS, "ok": all(gaps[k] < FULL_FLOAT32_BOUNDS[k] for k in gaps)}


def test_gpu_kernels_match_plain_path_in_full_float32(child_env):
    """The tight check of the kernels, in a child process with CUPY_TF32=0: on the GPU
    where there is one, else on the stand-in."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "test_mora.py")], env=dict(child_env, CUPY_TF32="0"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout.splitlines()[-1])
    assert check["ok"], check


def test_stand_in_fixes_the_matmul_mode_once_per_process(stand_in, monkeypatch):
    """As in CuPy, CUPY_TF32 counts only until the process's first float32 matmul."""
    rng = np.random.default_rng(5)
    a, b = (stand_in.asarray(rng.standard_normal(shape).astype(np.float32)) for shape in ((8, 64), (64, 8)))
    exact = a.get() @ b.get()
    monkeypatch.setattr(StandInCupy, "tf32", None)  # as in a new process
    monkeypatch.setenv("CUPY_TF32", "1")
    in_tf32 = (a @ b).get()
    monkeypatch.setenv("CUPY_TF32", "0")
    assert np.array_equal((a @ b).get(), in_tf32) and not np.allclose(in_tf32, exact, rtol=1e-4, atol=0)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert np.array_equal((a64 @ b64).get(), a64.get() @ b64.get())  # TF32 is for float32 alone
    monkeypatch.setattr(StandInCupy, "tf32", None)  # a new process, started with CUPY_TF32=0
    assert np.array_equal((a @ b).get(), exact)
    monkeypatch.setenv("CUPY_TF32", "1")
    assert np.array_equal((a @ b).get(), exact)


def test_stand_in_refuses_wrong_launches(stand_in):
    """A launch with a wrong type, a non-contiguous array or arguments out of order fails,
    as it would (or would silently corrupt memory) on a GPU; so does a mutated launcher."""
    x = stand_in.asarray(np.linspace(-2, 2, 64, dtype=np.float32).reshape(8, 8))
    xhat, rstd = stand_in.empty_like(x), stand_in.empty((8, 1), np.float32)
    mora.launch("layernorm_forward", 8, (x, np.int64(8), np.int32(8), xhat, rstd))  # the right launch runs
    assert np.allclose(xhat.get(), mora.layernorm_forward(x.get())[0], atol=1e-6)
    wrong = [(x, np.int32(8), np.int32(8), xhat, rstd),  # int for a long long
             (x.astype(np.float64), np.int64(8), np.int32(8), xhat, rstd),  # double array
             (stand_in.asarray(np.zeros((8, 16), np.float32))[:, :8], np.int64(8), np.int32(8), xhat, rstd),  # not contiguous
             (x, np.int32(8), np.int64(8), xhat, rstd),  # out of order
             (x.get(), np.int64(8), np.int32(8), xhat, rstd),  # a host array
             (x, np.int64(8), np.int32(8), xhat)]  # one missing
    for args in wrong:
        with pytest.raises(TypeError):
            mora.launch("layernorm_forward", 8, args)


def test_mutated_launcher_is_caught(stand_in, monkeypatch):
    def block_input_forward_mutated(p, h):  # passes the row count as an int: the kernel takes a long long
        d = h.shape[-1]
        rows = h.size // d
        u, xhat, rstd, vzq = (stand_in.empty((rows, k), np.float32) for k in (d, d, 1, 3 * d))
        mora.launch("block_input_forward", rows, (h, p["ln1.g"], p["ln1.b"], p["w_in"], p["b_in"], np.int32(rows),
                                                  u, xhat, rstd, vzq), width=d)
        return vzq, (u, xhat, rstd, p)
    monkeypatch.setattr(mora, "gpu_block_input_forward", block_input_forward_mutated)
    params = {k: stand_in.asarray(p) for k, p in mora.init_params(mora.Config(d_model=8, n_layers=1), 0).items()}
    x = stand_in.asarray(np.zeros((2, 8), np.int32))
    with pytest.raises(TypeError, match="long long"):
        mora.loss_and_grads(params, x, x)


def test_auto_falls_back_to_the_cpu_in_one_line_when_cupy_cannot_work(stand_in, monkeypatch, capsys):
    monkeypatch.setattr(stand_in.cuda.runtime, "getDeviceCount", lambda: 0)
    monkeypatch.setattr(mora, "cupy", None)
    assert mora.select_backend("auto") is np
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uses the CPU: CuPy finds no CUDA GPU" in err
    with pytest.raises(mora.UserError, match="--device cpu"):
        mora.select_backend("gpu")

    def broken_matmul(*args, **kwargs):
        raise RuntimeError("libcublas.so.12: cannot open shared object file\nmore detail")
    monkeypatch.setattr(stand_in.cuda.runtime, "getDeviceCount", lambda: 1)
    with monkeypatch.context() as patch:
        patch.setattr(DeviceArray, "__matmul__", broken_matmul)
        assert mora.select_backend("auto") is np and mora.cupy is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(RuntimeError: libcublas.so.12: cannot open shared object file)" in err

    def module_without_compiler(code, options=()):  # as CuPy, compiling at the first get_function
        import types

        def get_function(name):
            raise RuntimeError("libnvrtc.so.12: cannot open shared object file")
        return types.SimpleNamespace(get_function=get_function)
    mora.cuda_module.cache_clear()
    monkeypatch.setattr(stand_in, "RawModule", module_without_compiler)
    assert mora.select_backend("auto") is np and mora.cupy is None
    assert "(RuntimeError: libnvrtc.so.12: cannot open shared object file)" in capsys.readouterr().err


@pytest.mark.parametrize("raises", ["AttributeError(\"module 'numpy' has no attribute 'bool8'\")",
                                    "OSError('libcudart.so.12: cannot open shared object file')"])
def test_auto_falls_back_to_the_cpu_when_importing_cupy_fails_in_any_way(tmp_path, monkeypatch, capsys, raises):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(f"raise {raises}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(mora, "cupy", None)
    assert mora.select_backend("auto") is np and mora.cupy is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: --device auto uses the CPU: CuPy cannot use the GPU (")
    assert raises.split("(")[0] + ": " in err and ("bool8" in err or "libcudart.so.12" in err)
    with pytest.raises(mora.UserError, match="--device cpu"):
        mora.select_backend("gpu")


def test_every_command_runs_on_the_gpu_path(gpu, data_dir, tmp_path, capsys):
    ckpt = tmp_path / "g.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--max-steps", 4, "--eval-every", 2,
                    "--device", "gpu") == 0
    out = capsys.readouterr().out
    assert "backend: " in out and "val, streamed" in out and ckpt.exists()
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--max-steps", 5, "--device", "gpu") == 0
    assert run_main("eval", "--ckpt", ckpt, "--data-dir", data_dir, "--device", "gpu") == 0
    assert run_main("eval", "--ckpt", ckpt, "--data-dir", data_dir, "--device", "gpu", "--stream", "--max-bytes", 300) == 0
    assert run_main("sample", "--ckpt", ckpt, "--length", 20, "--device", "gpu") == 0
    assert run_main("bench", *TINY, "--steps", 2, "--device", "gpu") == 0
    assert "ms/step" in capsys.readouterr().out
    assert run_main("bench", "--batch-size", 2, "--seq-len", 8, "--steps", 1, "--device", "gpu", "--report") == 0
    table = capsys.readouterr().out
    assert "| d=64, L=8 | 2 x 8 |" in table and "| d=128, L=8 | 2 x 8 |" in table


def test_start_up_compiles_the_widths_the_run_uses(stand_in, data_dir, tmp_path, capsys, monkeypatch):
    """A model width whose block kernels do not compile stops every command in one line
    before its first step, not at the first launch in the middle of a run; a command
    at another width is not held up by it."""
    ckpt = tmp_path / "w8.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--max-steps", 2, "--device", "gpu",
                    "--eval-every", 0, "--no-final-eval") == 0
    plain_module = stand_in.RawModule

    def module_failing_at(width):
        def module(code, options=()):
            if f"-DD={width}" not in options:
                return plain_module(code, options)
            import types

            def get_function(name):  # as CuPy, compiling at the first get_function
                raise RuntimeError(f"nvrtc: error: the kernels do not compile for D={width}")
            return types.SimpleNamespace(get_function=get_function)
        mora.cuda_module.cache_clear()
        monkeypatch.setattr(mora, "cupy", None)
        monkeypatch.setattr(stand_in, "RawModule", module)
    module_failing_at(8)
    commands = [("train", "--data-dir", data_dir, "--ckpt", tmp_path / "new.npz", *TINY, "--max-steps", 2),
                ("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--max-steps", 3),
                ("eval", "--data-dir", data_dir, "--ckpt", ckpt), ("sample", "--ckpt", ckpt, "--length", 5),
                ("bench", *TINY, "--steps", 1)]
    capsys.readouterr()
    for command in commands:
        err = one_error_line(capsys, run_main(*command, "--device", "gpu"))
        assert "CuPy cannot use the GPU (RuntimeError: nvrtc: error: the kernels do not compile for D=8)" in err, command
    assert not (tmp_path / "new.npz").exists() and mora.load_checkpoint(str(ckpt))[2]["step"] == 2
    module_failing_at(128)  # the large model's width: bench --report runs it, a d=8 run does not
    assert run_main("bench", "--batch-size", 2, "--seq-len", 8, "--steps", 1, "--device", "gpu", "--report") == 1
    captured = capsys.readouterr()
    assert "D=128" in captured.err and "| d=64" not in captured.out
    assert run_main("bench", *TINY, "--steps", 1, "--device", "gpu") == 0


def test_bench_counts_and_times_the_step_train_runs(stand_in, data_dir, tmp_path, capsys, monkeypatch):
    """bench's training step is train's, trainable mask and all: the same launches."""
    launches, plain_step = [], mora.train_step

    def counted_step(*args, **kwargs):
        before = stand_in.launches
        result = plain_step(*args, **kwargs)
        launches.append(stand_in.launches - before)
        return result
    monkeypatch.setattr(mora, "train_step", counted_step)
    assert run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "c.npz", "--batch-size", 2, "--seq-len", 8,
                    "--max-steps", 2, "--eval-every", 0, "--no-final-eval", "--device", "gpu") == 0
    in_train = launches[-1]
    assert run_main("bench", "--batch-size", 2, "--seq-len", 8, "--steps", 1, "--device", "gpu") == 0
    out = capsys.readouterr().out
    assert bench_launches(out) == in_train
    assert set(launches) == {in_train}  # every step bench ran, timed or counted, was train's


def test_gpu_check_runs_end_to_end(child_env, data_dir, tmp_path):
    """gpu_check.py's every step but the test suite (which runs this test), at a tiny
    size, on the GPU where there is one, else the stand-in: the report holds each
    figure, and the kernel table every kernel, as often as a training step launches it."""
    report = tmp_path / "report.md"
    result = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--skip-tests", "--data-dir", data_dir,
                             "--out", str(report), "--batch-size", "2", "--seq-len", "8", "--train-steps", "3",
                             "--bench-steps", "1", "--kernel-steps", "2"], env=child_env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(f"report: {report} (every step ok)")
    text = report.read_text()
    assert "## 1. tests: left out" in text and all(f"{step}: ok" in text for step in ("float32", "bench", "train", "kernels"))
    assert re.search(r"loss gap \S+ \(bound 1e-05\), gradient gap \S+ \(bound 0.0001\)", text)
    assert "| d=64, L=8 | 2 x 8 |" in text and "| d=128, L=8 | 2 x 8 |" in text
    assert re.search(r"val \d\.\d+ bits/byte \(per record\), accuracy \d\.\d+; [\d.]+ ms/step", text)
    per_step = {name: float(count) for name, count in re.findall(r"^\| (\w+) \| \d* \| ([\d.]+) \|", text, re.MULTILINE)}
    kernels = re.findall(r'extern "C" __global__ void (\w+)\(', mora.CUDA_SOURCE + mora.BLOCK_SOURCE)
    once = {"layernorm_forward", "layernorm_backward", "cross_entropy_forward", "cross_entropy_backward", "adam_update"}
    assert per_step == {name: 1.0 if name in once else mora.Config().n_layers for name in kernels}
    assert re.search(r"step [\d.]+ ms \(CUDA events around train_step\): fused kernels [\d.]+ ms", text)


def test_gpu_check_reports_a_failed_or_hung_step(tmp_path):
    import gpu_check
    args = gpu_check.argparse.Namespace(data_dir=str(tmp_path / "none"), batch_size=2, seq_len=8, train_steps=1)
    ok, summary, _, details = gpu_check.train_step(args)  # no data here (and maybe no GPU): one error line
    assert ok is False and summary == "exit status 1" and "error: " in details
    status, seconds, _, _ = gpu_check.run([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert status == "timed out after 1 s" and seconds < 10


def test_ablations_hold_their_parameters_at_zero(data_dir, tmp_path):
    for ablate, name, index in [("no-mean", "mix", 1), ("fixed-rate", "w_in", (slice(None), slice(8, 16)))]:
        ckpt = tmp_path / f"{ablate}.npz"
        assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--max-steps", 3,
                        "--ablate", ablate, "--device", "cpu", "--eval-every", 0) == 0
        cfg, params, _, _ = mora.load_checkpoint(str(ckpt))
        assert cfg.ablate == ablate
        for i in range(2):
            p = params[f"blocks.{i}.{name}"]
            assert np.all(p[index] == 0)
            assert np.count_nonzero(p) == p.size - np.zeros(p.shape)[index].size


# ----------------------------------------------------------------------------
# Fused GPU kernels against their plain NumPy twins (on the CPU, compiled as C++)

def test_kernels_compile_for_sm90(tmp_path):
    if subprocess.run(["which", "nvcc"], capture_output=True).returncode != 0:
        pytest.skip("nvcc not found: the CUDA source is not compiled here")
    for code, options in [(mora.CUDA_SOURCE, mora.kernel_options()), (mora.BLOCK_SOURCE, mora.kernel_options(64))]:
        source = tmp_path / "mora_kernels.cu"
        source.write_text(code)
        result = subprocess.run(["nvcc", "-arch=sm_90", "--ptx", *options, str(source), "-o", str(tmp_path / "k.ptx")],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "k.ptx").read_text().count(".entry") == code.count("__global__ void")


# Each kernel runs twice: one thread per block, and in the blocks of its real launch
# (mora.launch's block size, BLOCK_THREADS for BLOCK_SOURCE) with a thread count that
# leaves the last block partly empty, so that the threads past the end run and must
# return without writing.  Every buffer has room after it, filled with a canary (0 after
# an input), that must stay as it was.
CUDA_BLOCK = inspect.signature(mora.launch).parameters["block"].default
CANARY = np.float32(-12345.0)


class Buffers:
    """Arrays with room after them in memory; `untouched()` says whether the room still
    holds what was put there."""
    ROOM = 1 << 14  # elements: more than a whole block of threads past the end can reach

    def __init__(self):
        self.rooms = []

    def place(self, a, fill):
        a = np.asarray(a)
        buffer = np.full(a.size + self.ROOM, fill, a.dtype)
        buffer[:a.size] = a.reshape(-1)
        self.rooms.append((buffer[a.size:], fill))
        return buffer[:a.size].reshape(a.shape)  # a view: the kernel gets the buffer's address

    def input(self, a):
        return self.place(a, 0)

    def output(self, *shape):
        return self.place(np.full(shape, CANARY, np.float32), CANARY)

    def untouched(self):
        return all(np.all(room == fill) for room, fill in self.rooms)


LAUNCHES = pytest.mark.parametrize("real_blocks", [False, True], ids=["one thread per block", "real blocks"])


@LAUNCHES
def test_cross_entropy_kernels_match_plain_twin(kernels_on_cpu, real_blocks):
    rng, room = np.random.default_rng(4), Buffers()
    block, rows = (CUDA_BLOCK, CUDA_BLOCK + 9) if real_blocks else (1, 9)
    logits, y = (3 * rng.standard_normal((rows, mora.V))).astype(np.float32), rng.integers(0, mora.V, rows).astype(np.int32)
    logits[0, y[0]] = logits[0].max() + 1  # one right prediction
    losses, correct, cache = mora.cross_entropy_forward(logits, y)
    dlogits = mora.cross_entropy_backward(0.25, cache)
    probs, kernel_losses, kernel_correct = room.output(rows, mora.V), room.output(rows), room.output(rows)
    kernel_dlogits = room.output(rows, mora.V)
    kernels_on_cpu("cross_entropy_forward", rows, room.input(logits), room.input(y), rows, mora.V, probs, kernel_losses,
                   kernel_correct, block=block)
    kernels_on_cpu("cross_entropy_backward", logits.size, probs, room.input(y), logits.size, mora.V, 0.25, kernel_dlogits,
                   block=block)
    assert np.allclose(kernel_losses, losses, atol=1e-5) and np.array_equal(kernel_correct, correct.astype(np.float32))
    assert np.allclose(kernel_dlogits, dlogits, atol=1e-6) and kernel_correct[0] == 1 and room.untouched()


@LAUNCHES
def test_adam_kernel_matches_plain_twin(kernels_on_cpu, real_blocks):
    rng, room = np.random.default_rng(3), Buffers()
    block, n = (CUDA_BLOCK, CUDA_BLOCK + 44) if real_blocks else (1, 100)
    p, g, m, v = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    plain = [a.copy() for a in (p, g, m, v)]
    mora.adam_update(plain[0], plain[1], plain[2], plain[3], 7, 0.01, 0.9, 0.95, 1e-8)
    p, g, m, v = (room.input(a) for a in (p, g, m, v))
    kernels_on_cpu("adam_update", n, p, g, m, v, n, 0.01, 0.9, 0.95, 1e-8, 1 - 0.9 ** 7, 1 - 0.95 ** 7, block=block)
    for kernel, twin in zip((p, m, v), (plain[0], plain[2], plain[3])):
        assert np.allclose(kernel, twin, rtol=1e-5, atol=1e-7)
    assert room.untouched()


@LAUNCHES
def test_mixer_kernels_match_plain_twin(kernels_on_cpu, real_blocks):
    rng, room = np.random.default_rng(0), Buffers()
    (T, B, d), block = ((4, 7, 37), CUDA_BLOCK) if real_blocks else ((12, 3, 5), 1)  # 7 x 37 = 259 threads
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    vbq, mix, c_init, sum_init = f32(T, B, 3 * d), f32(3), f32(B, d), f32(B, d)
    state = (c_init, sum_init, 4)
    gated, cache, (c_last, sum_last, count) = mora.mixer_forward(vbq, mix, state)
    out = {k: room.output(T, B, d) for k in ("gated", "c", "a")}
    last = {k: room.output(B, d) for k in ("c", "sum")}
    vbq_in = room.input(vbq)
    kernels_on_cpu("mixer_forward", B * d, vbq_in, room.input(mix), room.input(c_init), room.input(sum_init), 4.0, T, B, d,
                   out["gated"], out["c"], out["a"], last["c"], last["sum"], block=block)
    assert np.allclose(out["gated"], gated, atol=1e-5) and np.allclose(last["c"], c_last, atol=1e-5)
    assert np.allclose(last["sum"], sum_last, atol=1e-5) and count == 4 + T
    dgated = f32(T, B, d)
    dvbq, dmix = mora.mixer_backward(dgated, cache)
    kernel_dvbq, parts = room.output(T, B, 3 * d), room.output(3, B * d)
    kernels_on_cpu("mixer_backward", B * d, room.input(dgated), vbq_in, room.input(mix), room.input(c_init), out["c"],
                   out["a"], 4.0, T, B, d, kernel_dvbq, parts, block=block)
    assert np.allclose(kernel_dvbq, dvbq, atol=1e-4) and np.allclose(parts.sum(1), dmix, atol=1e-4)
    assert room.untouched()


def test_mixer_kernel_computes_the_equations(kernels_on_cpu):
    rng = np.random.default_rng(9)
    T, B, d = 10, 2, 4
    vbq, mix, c0, sum0 = (rng.standard_normal(shape).astype(np.float32) for shape in [(T, B, 3 * d), 3, (B, d), (B, d)])
    out = {k: np.zeros((T, B, d), np.float32) for k in ("gated", "c", "a")}
    last = {k: np.zeros((B, d), np.float32) for k in ("c", "sum")}
    kernels_on_cpu("mixer_forward", B * d, vbq, mix, c0, sum0, 3.0, T, B, d, out["gated"], out["c"], out["a"],
                   last["c"], last["sum"])
    gated, (c_last, sum_last, _) = reference_mixer(vbq, mix.astype(np.float64), c0, sum0, 3)
    assert np.allclose(out["gated"], gated, atol=1e-5) and np.allclose(last["c"], c_last, atol=1e-5)
    assert np.allclose(last["sum"], sum_last, atol=1e-5)


@LAUNCHES
def test_layernorm_kernels_match_plain_twin(kernels_on_cpu, real_blocks):
    rng, room = np.random.default_rng(1), Buffers()
    (rows, d), block = ((CUDA_BLOCK + 7, 6), CUDA_BLOCK) if real_blocks else ((7, 6), 1)
    x, dy = (rng.standard_normal((rows, d)).astype(np.float32) for _ in range(2))
    xhat, cache = mora.layernorm_forward(x)
    kernel_xhat, kernel_dx, rstd = room.output(rows, d), room.output(rows, d), room.output(rows, 1)
    kernels_on_cpu("layernorm_forward", rows, room.input(x), rows, d, kernel_xhat, rstd, block=block)
    kernels_on_cpu("layernorm_backward", rows, room.input(dy), kernel_xhat, rstd, rows, d, kernel_dx, block=block)
    assert np.allclose(kernel_xhat, xhat, atol=1e-5) and np.allclose(rstd, cache.rstd, rtol=1e-5)
    assert np.allclose(kernel_dx, mora.layernorm_backward(dy, cache)[0], atol=1e-5) and room.untouched()



def test_kernels_compute_layernorm_and_gelu_by_their_definitions(kernels_on_cpu):
    """The kernels' LN_EPS and GELU constants against the written-out definitions,
    on rows whose variance is about eps (so that eps shows)."""
    rng = np.random.default_rng(8)
    rows, d = 6, 5
    h = (0.01 + math.sqrt(1e-5) * rng.standard_normal((rows, d))).astype(np.float32)
    xhat, rstd = np.zeros((rows, d), np.float32), np.zeros((rows, 1), np.float32)
    kernels_on_cpu("layernorm_forward", rows, h, rows, d, xhat, rstd)
    assert np.allclose(xhat, reference_layernorm(h), atol=1e-5)
    p, _, _ = block_case(d, rows)
    out = kernel_outputs(rows, u=d, xhat=d, rstd=1, vzq=3 * d)
    kernels_on_cpu("block_input_forward", rows, h, p["ln1.g"], p["ln1.b"], p["w_in"], p["b_in"], rows,
                   out["u"], out["xhat"], out["rstd"], out["vzq"], width=d)
    u = reference_layernorm(h, p["ln1.g"], p["ln1.b"])
    assert np.allclose(out["u"], u, atol=1e-5) and np.allclose(out["vzq"], u @ p["w_in"] + p["b_in"], atol=1e-5)
    gated = (1e-3 * rng.standard_normal((rows, d))).astype(np.float32)
    out = kernel_outputs(rows, h_out=d, xhat=d, rstd=1, u2=d, pre=2 * d, t=2 * d, act=2 * d)
    kernels_on_cpu("block_output_forward", rows, h, gated, p["w_out"], p["b_out"] * 0, p["ln2.g"], p["ln2.b"], p["w_up"],
                   p["b_up"], p["w_down"], p["b_down"], rows, out["h_out"], out["xhat"], out["rstd"], out["u2"],
                   out["pre"], out["t"], out["act"], width=d)
    h_mid = h + gated.astype(np.float64) @ p["w_out"]  # b_out 0: the variance stays about eps
    pre = reference_layernorm(h_mid, p["ln2.g"], p["ln2.b"]) @ p["w_up"] + p["b_up"]
    assert np.allclose(out["xhat"], reference_layernorm(h_mid), atol=1e-5)
    assert np.allclose(out["pre"], pre, atol=1e-5) and np.allclose(out["act"], reference_gelu(out["pre"].astype(np.float64)), rtol=1e-6, atol=1e-6)
    assert np.allclose(out["h_out"], h_mid + reference_gelu(pre) @ p["w_down"] + p["b_down"], atol=1e-5)


def kernel_outputs(rows, **widths):
    """Zeroed (rows, k) float32 output buffers, by name."""
    return {name: np.zeros((rows, k), np.float32) for name, k in widths.items()}


def block_case(d, rows, seed=2):
    """A block's parameters with every number random (gains and biases too), and a
    residual stream of `rows` positions, float32."""
    rng = np.random.default_rng(seed)
    p = {name: (rng.standard_normal(shape) * (0.5 if name.startswith("w_") else 1.0)).astype(np.float32)
         for name, shape in mora.block_shapes(d).items()}
    return p, rng.standard_normal((rows, d)).astype(np.float32) * 2 + 1, rng


def block_launch(real_blocks):
    """(rows, threads per block) for the kernels of BLOCK_SOURCE."""
    return (mora.BLOCK_THREADS + 5, mora.BLOCK_THREADS) if real_blocks else (9, 1)


@LAUNCHES
def test_block_input_kernels_match_plain_twin(kernels_on_cpu, real_blocks):
    (rows, block), d, room = block_launch(real_blocks), 5, Buffers()
    p, h, rng = block_case(d, rows)
    vzq, cache = mora.block_input_forward(p, h)
    dvzq = rng.standard_normal((rows, 3 * d)).astype(np.float32)
    dh, grads = mora.block_input_backward(dvzq, cache)
    out = {name: room.output(rows, k) for name, k in dict(u=d, xhat=d, rstd=1, vzq=3 * d, dh=d, partial=5 * d).items()}
    p = {name: room.input(a) for name, a in p.items()}
    kernels_on_cpu("block_input_forward", rows, room.input(h), p["ln1.g"], p["ln1.b"], p["w_in"], p["b_in"], rows,
                   out["u"], out["xhat"], out["rstd"], out["vzq"], width=d, block=block)
    kernels_on_cpu("block_input_backward", rows, room.input(dvzq), out["xhat"], out["rstd"], p["ln1.g"], p["w_in"], rows,
                   out["dh"], out["partial"], width=d, block=block)
    sums = out["partial"].sum(0)
    assert np.allclose(out["vzq"], vzq, atol=1e-5) and np.allclose(out["dh"], dh, atol=1e-4)
    kernel_grads = {"ln1.g": sums[:d], "ln1.b": sums[d:2 * d], "b_in": sums[2 * d:], "w_in": out["u"].T @ dvzq}
    for name, kernel in kernel_grads.items():
        assert np.allclose(kernel, grads[name], atol=1e-4), name
    assert room.untouched()


@LAUNCHES
def test_block_output_kernels_match_plain_twin(kernels_on_cpu, real_blocks):
    (rows, block), d, room = block_launch(real_blocks), 5, Buffers()
    p, h, rng = block_case(d, rows)
    gated, dh = (rng.standard_normal((rows, d)).astype(np.float32) for _ in range(2))
    h_out, cache = mora.block_output_forward(p, h, gated)
    dgated, dh_mid, grads = mora.block_output_backward(dh, cache)
    widths = dict(h_out=d, xhat=d, rstd=1, u2=d, pre=2 * d, t=2 * d, act=2 * d, dgated=d, dh_mid=d, dpre=2 * d, partial=6 * d)
    out = {name: room.output(rows, k) for name, k in widths.items()}
    p = {name: room.input(a) for name, a in p.items()}
    kernels_on_cpu("block_output_forward", rows, room.input(h), room.input(gated), p["w_out"], p["b_out"], p["ln2.g"],
                   p["ln2.b"], p["w_up"], p["b_up"], p["w_down"], p["b_down"], rows, out["h_out"], out["xhat"], out["rstd"],
                   out["u2"], out["pre"], out["t"], out["act"], width=d, block=block)
    kernels_on_cpu("block_output_backward", rows, room.input(dh), out["pre"], out["t"], out["xhat"], out["rstd"], p["ln2.g"],
                   p["w_up"], p["w_down"], p["w_out"], rows, out["dgated"], out["dh_mid"], out["dpre"], out["partial"],
                   width=d, block=block)
    sums = out["partial"].sum(0)
    assert np.allclose(out["h_out"], h_out, atol=1e-4)
    assert np.allclose(out["dgated"], dgated, atol=1e-4) and np.allclose(out["dh_mid"], dh_mid, atol=1e-4)
    kernel_grads = {"ln2.g": sums[:d], "ln2.b": sums[d:2 * d], "b_up": sums[2 * d:4 * d], "b_out": sums[4 * d:5 * d],
                    "b_down": sums[5 * d:], "w_down": out["act"].T @ dh, "w_up": out["u2"].T @ out["dpre"],
                    "w_out": gated.T @ out["dh_mid"]}
    for name, kernel in kernel_grads.items():
        assert np.allclose(kernel, grads[name], atol=1e-4), name
    assert room.untouched()


# ----------------------------------------------------------------------------
# Faults: nothing lost, every failure one line

def start_training(data_dir, ckpt, *flags):
    """A training run of the tiny model in its own process, as a user starts it."""
    return subprocess.Popen([sys.executable, "mora.py", "train", "--data-dir", data_dir, "--ckpt", str(ckpt), *TINY,
                             "--device", "cpu", "--eval-every", "0", *map(str, flags)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(log, n, timeout=60):
    """Wait until the CSV log holds at least n data rows."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log) and len(open(log).read().splitlines()) > n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} did not reach {n} rows")


def logged_steps(log):
    import csv
    with open(log, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]


def test_log_survives_a_kill_after_resume(data_dir, tmp_path):
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 0,
                    "--max-steps", 100000, "--stop-after", 5) == 0
    assert logged_steps(log) == [1, 2, 3, 4, 5]
    proc = start_training(data_dir, ckpt, "--resume", "--ckpt-every", 100000)
    wait_for_rows(log, 8)  # rows are on disk as they happen, long before the next checkpoint
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    steps = logged_steps(log)
    assert steps[:5] == [1, 2, 3, 4, 5] and steps == list(range(1, len(steps) + 1)) and len(steps) >= 8
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--device", "cpu", "--stop-after", 1) == 0
    assert logged_steps(log) == [1, 2, 3, 4, 5, 6]  # the rows after the checkpoint (step 5) were dropped


def test_junk_log_does_not_block_resume(data_dir, tmp_path, capsys):
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 0,
                    "--max-steps", 6, "--stop-after", 2) == 0
    log.write_bytes(b"step,loss\nnot a number,\x00\xff\n")
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--device", "cpu") == 0
    assert "kept as" in capsys.readouterr().err and (tmp_path / "m.csv.bad").exists()
    assert logged_steps(log) == [3, 4, 5, 6]


def test_a_cut_or_junk_log_is_set_aside_and_its_good_rows_kept(data_dir, tmp_path, capsys):
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, "--device", "cpu", "--eval-every", 0]
    assert run_main(*train, *TINY, "--max-steps", 20, "--stop-after", 5) == 0
    whole = log.read_bytes()
    assert b"\r" not in whole  # plain '\n' line ends
    lines = whole.splitlines(keepends=True)
    damaged = {"cut mid-row": b"".join(lines[:4]) + lines[4][:9],  # rows 1-3, then half of row 4
               "unparsable row": b"".join(lines[:4]) + b"4,x\x00,,\n" + lines[5],
               "one line of junk": b"garbage\n"}
    for kind, text in damaged.items():
        log.write_bytes(text)
        capsys.readouterr()
        assert run_main(*train, "--resume", "--stop-after", 1) == 0, kind
        err = capsys.readouterr().err
        assert "kept as" in err and (tmp_path / "m.csv.bad").read_bytes() == text, kind
        kept = [1, 2, 3] if kind != "one line of junk" else []
        step = 5 + list(damaged).index(kind)
        assert logged_steps(log) == kept + [step + 1], kind  # the good rows, then the resumed run's
        assert log.read_bytes().endswith(b"\n") and b"\r" not in log.read_bytes()


class FullDiskAfter:
    """A file that takes `writes` more writes, then, as a full disk does, writes half of the next and fails."""
    def __init__(self, file, writes):
        self.file, self.writes = file, writes

    def write(self, data):
        if self.writes == 0:
            self.file.write(data[:len(data) // 2])
            self.file.flush()
            raise OSError(28, "No space left on device")
        self.writes -= 1
        return self.file.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_under_the_log_still_saves_the_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    import builtins
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"

    def log_fills_the_disk(path, mode="r", *args, **kwargs):  # the log, opened to append, fills the disk at row 4
        file = builtins.open(path, mode, *args, **kwargs)
        return FullDiskAfter(file, 3) if str(path).endswith(".csv") and mode.startswith("a") else file
    monkeypatch.setattr(mora, "open", log_fills_the_disk, raising=False)
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 0,
             "--max-steps", 10, "--ckpt-every", 100]
    err = one_error_line(capsys, run_main(*train), after_progress=True)
    assert str(log) in err and "No space left" in err and "saved at step 4" in err and "--resume" in err
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 4  # the steps were not lost with the log
    assert log.read_bytes().endswith(b"\n") and logged_steps(log) == [1, 2, 3]  # no half row
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)  # now the checkpoint cannot be written either
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "n.npz"), after_progress=True)
    assert "the log" in err and "the checkpoint" in err and "no checkpoint of this run was saved" in err
    assert not os.path.exists(tmp_path / "n.npz")
    monkeypatch.undo()  # the disk fills at the final evaluation's row: the run is saved by then
    monkeypatch.setattr(mora, "open", log_fills_the_disk, raising=False)
    err = one_error_line(capsys, run_main(*train, "--max-steps", 3, "--ckpt", tmp_path / "e.npz"), after_progress=True)
    assert "cannot write the log" in err and "saved at step 3" in err and "mora.py eval" in err
    assert mora.load_checkpoint(str(tmp_path / "e.npz"))[2]["step"] == 3


def test_a_full_disk_when_the_log_is_rewritten_keeps_the_old_log(data_dir, tmp_path, monkeypatch, capsys):
    import builtins
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 0,
             "--max-steps", 6, "--stop-after", 3]
    assert run_main(*train) == 0
    before, saved = log.read_bytes(), ckpt.read_bytes()
    capsys.readouterr()

    def rewrite_fills_the_disk(path, mode="r", *args, **kwargs):  # on --resume the log is rewritten through m.csv.tmp
        file = builtins.open(path, mode, *args, **kwargs)
        return FullDiskAfter(file, 1) if str(path).endswith(".csv.tmp") else file
    monkeypatch.setattr(mora, "open", rewrite_fills_the_disk, raising=False)
    err = one_error_line(capsys, run_main(*train, "--resume"))
    assert "cannot write the log" in err and str(log) in err and "No space left" in err
    assert log.read_bytes() == before and ckpt.read_bytes() == saved and not (tmp_path / "m.csv.tmp").exists()

    def full_disk(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return FullDiskAfter(file, 0) if str(path).endswith(".csv.tmp") else file
    monkeypatch.setattr(mora, "open", full_disk, raising=False)
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "new.npz"))  # a new run: no step, nothing saved
    assert "cannot write the log" in err and "no checkpoint of this run was saved" in err
    assert not (tmp_path / "new.npz").exists()


def test_sigterm_saves_like_ctrl_c(data_dir, tmp_path):
    import signal
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    proc = start_training(data_dir, ckpt, "--max-steps", 100000, "--ckpt-every", 100000)
    wait_for_rows(log, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopping after this step" in err and "Traceback" not in err and "--resume" in out
    saved = mora.load_checkpoint(str(ckpt))[2]["step"]
    assert saved >= 3 and logged_steps(log)[-1] == saved


def test_a_closed_terminal_stops_and_saves_like_sigterm(data_dir, tmp_path):
    """A run on a terminal that closes gets SIGHUP, and every write to the terminal fails
    from then on: it still stops after the step, saves and exits 130."""
    import pty
    import select
    import time
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a run on the terminal
        os.chdir(HERE)
        os.execv(sys.executable, [sys.executable, "mora.py", "train", "--data-dir", data_dir, "--ckpt", str(ckpt), *TINY,
                                  "--device", "cpu", "--eval-every", "0", "--max-steps", "100000", "--ckpt-every", "100000"])
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).read().splitlines()) > 3):
        if select.select([terminal], [], [], 0.05)[0]:
            os.read(terminal, 1 << 16)  # what the run prints, read as a terminal does
    os.close(terminal)  # the terminal closes
    while time.time() < deadline:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the run did not stop")
    assert os.waitstatus_to_exitcode(status) == 130
    saved = mora.load_checkpoint(str(ckpt))[2]["step"]
    assert saved >= 3 and logged_steps(log)[-1] == saved


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_in_the_final_evaluation_says_the_run_is_saved(data_dir, tmp_path, monkeypatch, capsys, name):
    import signal
    signum, evaluate = getattr(signal, name), mora.evaluate

    def unanswered(*args):  # where the run leaves the signal to the default handler
        raise AssertionError(f"{name} during the final evaluation would end the run without a word")
    previous = signal.signal(signum, unanswered)

    def interrupted(*args, **kwargs):
        signal.raise_signal(signum)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(mora, "evaluate", interrupted)  # only the final evaluation calls it: --eval-every 0
    ckpt = tmp_path / "m.npz"
    try:
        code = run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 3,
                        "--eval-every", 0)
    finally:
        signal.signal(signum, previous)
    out = capsys.readouterr().out
    assert code == 130 and "saved at step 3" in out and "final evaluation" in out and "mora.py eval" in out
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 3 and logged_steps(tmp_path / "m.csv") == [1, 2, 3]


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    import signal
    from types import SimpleNamespace
    with mora.Report(SimpleNamespace(step=0), 1, None, SimpleNamespace(sample_prompt="a", sample_length=0)) as report:
        signal.raise_signal(signal.SIGTERM)
        assert report.stop_requested  # the first: stop after the step under way
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            signal.raise_signal(signal.SIGINT)
    assert "stopping after this step" in capsys.readouterr().err
    train_step = mora.train_step

    def interrupted_twice_at_step_5(*args, **kwargs):
        if args[6] == 5:  # the step number
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return train_step(*args, **kwargs)
    monkeypatch.setattr(mora, "train_step", interrupted_twice_at_step_5)
    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 100,
                    "--ckpt-every", 2, "--eval-every", 0) == 130
    assert f"stopped: {ckpt} still holds step 4; continue with" in capsys.readouterr().out
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 4  # the last save, untouched


def test_the_printed_resume_command_works(data_dir, tmp_path, monkeypatch, capsys):
    """After Ctrl-C the line to continue names the data folder, device and threads, quoted for the shell."""
    import shlex
    import shutil
    import signal
    data, ckpt = tmp_path / "other data", tmp_path / "my run" / "m.npz"
    shutil.copytree(data_dir, data)
    train_step = mora.train_step

    def interrupted_at_step_2(*args, **kwargs):
        if args[6] == 2:  # the step number
            signal.raise_signal(signal.SIGINT)
        return train_step(*args, **kwargs)
    monkeypatch.setattr(mora, "train_step", interrupted_at_step_2)
    assert run_main("train", "--data-dir", data, "--ckpt", ckpt, *TINY, "--device", "cpu", "--threads", 1,
                    "--max-steps", 5, "--eval-every", 0, "--no-final-eval") == 130
    words = shlex.split(capsys.readouterr().out.split("continue with `")[1].split("`")[0])
    assert words[0] == "python" and os.path.samefile(words[1], mora.__file__) and words[2] == "train"
    assert {"--data-dir": str(data), "--ckpt": str(ckpt), "--device": "cpu", "--threads": "1"}.items() <= dict(
        zip(words[3:], words[4:])).items() and "--resume" in words
    monkeypatch.setattr(mora, "train_step", train_step)
    assert run_main(*words[2:]) == 0
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 5


def test_second_writer_is_refused_and_stale_locks_do_not_block(data_dir, tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    files = mora.RunFiles(mora.build_parser().parse_args(["train", "--ckpt", str(ckpt)])).__enter__()  # this process trains it
    proc = start_training(data_dir, ckpt, "--max-steps", 2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"process {os.getpid()}" in err and err.count("\n") == 1 and out == ""
    files.__exit__()  # as when that process dies: the lock file stays, with its dead holder's pid
    assert (tmp_path / "m.npz.lock").exists()
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 2) == 0


def test_the_model_flags_layer_over_the_size_and_the_checkpoint():
    """A model flag wins; one left out comes from --size, else the checkpoint's config, else the small model."""
    def config(*flags, base=None):
        return mora.model_config(mora.build_parser().parse_args(["train", *flags]), base)
    own = mora.Config(d_model=8, n_layers=2, seq_len=16, batch_size=4)
    assert config() == mora.Config(**mora.SIZES["small"]) and config(base=own) == own
    assert config("--size", "large", "--n-layers", "3") == mora.Config(d_model=128, n_layers=3)
    assert config("--size", "large", base=own) == mora.Config(d_model=128, n_layers=8, seq_len=16, batch_size=4)
    assert config("--d-model", "12", base=own) == mora.Config(d_model=12, n_layers=2, seq_len=16, batch_size=4)


def test_resume_keeps_the_run_settings_and_can_run_longer(data_dir, tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 6,
                    "--eval-every", 2, "--ckpt-every", 3, "--eval-bytes", 200, "--stop-after", 2) == 0
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--device", "cpu") == 0
    settings = mora.load_checkpoint(str(ckpt))[2]["train"]
    assert (settings["eval_every"], settings["ckpt_every"], settings["eval_bytes"]) == (2, 3, 200)
    import csv
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["val_bpb"] and r["loss"]] == ["2", "4"]  # every 2 steps, and not at the end:
    assert [r["step"] for r in rows if r["val_bpb"] and not r["loss"]] == ["6"]  # the final evaluation covers it
    capsys.readouterr()
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--device", "cpu", "--max-steps", 8,
                    "--no-final-eval") == 0
    out = capsys.readouterr().out
    assert "now ends at step 8 instead of 6" in out and "val, per record" not in out
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 8


def test_records_do_not_overlap_and_targets_are_the_next_bytes(tmp_path):
    T = 8
    data = (np.arange(10 * (T + 1) + 5) * 7 % 251).astype(np.uint8)  # no byte equals the next
    data.tofile(tmp_path / "d.bin")
    records = mora.open_records(str(tmp_path / "d.bin"), T)
    assert np.array_equal(records, data[:10 * (T + 1)].reshape(10, T + 1))  # back to back, the tail dropped
    rows = np.array([7, 2, 5, 0])
    x, y = mora.make_batch(records, rows, np)
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == np.int32
    found = []
    for xi, yi in zip(x, y):  # each row: a record's first T bytes, and the T bytes after each of them
        r = next(r for r in rows if np.array_equal(xi, records[r, :T]))
        assert np.array_equal(yi, records[r, 1:])
        found.append(r)
    assert sorted(found) == sorted(rows)


def test_resume_refuses_other_data_of_the_same_size(tmp_path, capsys):
    """train.bin rebuilt from the same files in another order (same size), two of its records swapped in place,
    or another val.bin, is refused; so is a checkpoint without the record of its data."""
    stories = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "v.txt"]
    for i, path in enumerate(stories):
        path.write_bytes(made_up_text(40, seed=10 + i))

    def prepare(out, train_files, val_file):
        assert prepare_data.main(["--out-dir", str(out), "--input-train", *map(str, train_files), "--input-val", str(val_file)]) == 0
        return out
    data = prepare(tmp_path / "data", stories[:2], stories[2])
    reordered = prepare(tmp_path / "reordered", stories[1::-1], stories[2])
    other_val = prepare(tmp_path / "other_val", stories[:2], stories[0])
    assert os.path.getsize(data / "train.bin") == os.path.getsize(reordered / "train.bin")
    ckpt = tmp_path / "m.npz"
    train = ["train", "--ckpt", ckpt, "--device", "cpu", "--eval-every", 0, "--no-final-eval"]
    assert run_main(*train, "--data-dir", data, *TINY, "--max-steps", 6, "--stop-after", 2) == 0
    capsys.readouterr()
    for folder, name in ((reordered, "train.bin"), (other_val, "val.bin")):
        err = one_error_line(capsys, run_main(*train, "--data-dir", folder, "--resume"))
        assert "trained on" in err and name in err and "--data-dir" in err
    swapped = tmp_path / "swapped"  # two records swapped in place, at the end of train.bin, far from its start
    swapped.mkdir()
    records = mora.open_records(str(data / "train.bin"), 16).copy()
    records[[-1, -2]] = records[[-2, -1]]
    (swapped / "train.bin").write_bytes(records.tobytes() + (data / "train.bin").read_bytes()[records.size:])
    (swapped / "val.bin").write_bytes((data / "val.bin").read_bytes())
    assert "other bytes of the same size" in one_error_line(capsys, run_main(*train, "--data-dir", swapped, "--resume"))
    assert run_main(*train, "--data-dir", data, "--resume", "--stop-after", 1) == 0
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 3
    capsys.readouterr()
    cfg, params, meta, adam = mora.load_checkpoint(str(ckpt), adam=True)
    del meta["data"]["files"]  # a run's checkpoint without the record of its data cannot be checked: refused
    mora.save_checkpoint(str(ckpt), params, meta, adam["adam.m"], adam["adam.v"])
    assert "record of its data files" in one_error_line(capsys, run_main(*train, "--data-dir", data, "--resume"))


def test_resuming_a_finished_run_says_so(data_dir, tmp_path, capsys):
    ckpt, log = tmp_path / "m.npz", tmp_path / "m.csv"
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, "--device", "cpu"]
    assert run_main(*train, *TINY, "--max-steps", 3, "--eval-every", 0) == 0
    capsys.readouterr()
    rows = log.read_bytes()
    assert run_main(*train, "--resume") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "finished" in out and "--max-steps N" in out and "above 3" in out
    assert log.read_bytes() == rows  # no second final evaluation, no duplicate row
    assert run_main(*train, "--resume", "--max-steps", 4) == 0 and logged_steps(log) == [1, 2, 3, 4]


def test_each_epoch_is_reshuffled_by_seed_and_epoch_alone(data_dir, tmp_path, monkeypatch):
    n = 50
    assert np.array_equal(mora.epoch_order(n, 3, 1), np.random.default_rng([3, 1]).permutation(n))
    assert not np.array_equal(mora.epoch_order(n, 3, 0), mora.epoch_order(n, 3, 1))
    assert not np.array_equal(mora.epoch_order(n, 3, 0), mora.epoch_order(n, 4, 0))
    seen, make_batch = [], mora.make_batch
    monkeypatch.setattr(mora, "make_batch", lambda records, rows, xp: seen.append(np.sort(rows)) or make_batch(records, rows, xp))
    n_train = len(mora.open_records(os.path.join(data_dir, "train.bin"), 16))
    per_epoch = n_train // 4
    assert run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "m.npz", *TINY, "--device", "cpu",
                    "--eval-every", 0, "--no-final-eval", "--epochs", 2) == 0
    first, second = np.concatenate(seen[:per_epoch]), np.concatenate(seen[per_epoch:2 * per_epoch])
    assert len(set(first)) == len(first) == len(set(second)) == per_epoch * 4  # no record twice in an epoch
    assert not all(np.array_equal(a, b) for a, b in zip(seen[:per_epoch], seen[per_epoch:]))  # a new order


def test_file_system_faults_are_one_line(data_dir, tmp_path, capsys, monkeypatch):
    def error_of(*args):
        return one_error_line(capsys, run_main(*args))

    train = ["train", "--data-dir", data_dir, *TINY, "--device", "cpu", "--max-steps", 2]
    (tmp_path / "file").write_text("x")
    err = error_of(*train, "--ckpt", tmp_path / "file" / "m.npz")  # a file where the checkpoint's folder would be
    assert f"the folder {tmp_path / 'file'} does not exist (or is not a folder)" in err
    (tmp_path / "folder.npz").mkdir()
    assert "is a folder" in error_of(*train, "--ckpt", tmp_path / "folder.npz", "--overwrite")
    bad_data = tmp_path / "bad"
    (bad_data / "train.bin").mkdir(parents=True)
    assert "not a file" in error_of("train", "--data-dir", bad_data, "--ckpt", tmp_path / "x.npz", "--device", "cpu")

    savez, saves = np.savez, []

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    assert run_main(*train, "--ckpt", tmp_path / "full.npz") == 1
    err = capsys.readouterr().err
    err = err[err.rfind("\nerror: ") + 1:]  # after the progress lines
    assert err.startswith("error: ") and err.count("\n") == 1 and "No space left" in err and not (tmp_path / "full.npz.tmp").exists()
    assert "no checkpoint of this run was saved" in err and "start it again" in err  # a first save: nothing to resume

    def full_from_the_second_save(*args, **kwargs):
        saves.append(args)
        return savez(*args, **kwargs) if len(saves) == 1 else disk_full()
    monkeypatch.setattr(np, "savez", full_from_the_second_save)
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "later.npz", "--max-steps", 4, "--ckpt-every", 2),
                         after_progress=True)
    assert "still holds step 2" in err and "--resume" in err


def test_outputs_in_the_way_are_one_line_before_any_work(data_dir, tmp_path, capsys):
    """check_outputs: a folder, a FIFO (whose open would hang), a missing folder, a link into one, or one of the
    command's own inputs, at any file a command writes, is refused in one line naming it, before any work."""
    text = tmp_path / "in.txt"
    text.write_text("abc")
    os.link(text, tmp_path / "hard.txt")
    os.symlink(text, tmp_path / "soft.txt")
    os.symlink(tmp_path / "gone" / "m.npz", tmp_path / "dangling.npz")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    cases = {  # output -> words of its one line
        tmp_path / "fifo": "not a regular file", tmp_path / "dir": "is a folder", tmp_path / "no" / "o.txt": "does not exist",
        tmp_path / "dangling.npz": "does not exist", text: "also an input", tmp_path / "hard.txt": "also an input",
        tmp_path / "soft.txt": "also an input", "": "names no file"}
    for out, words in cases.items():
        with pytest.raises(mora.UserError, match=words):
            mora.check_outputs([out], inputs=[text])
    mora.check_outputs([tmp_path / "new.txt", text.with_suffix(".txt.tmp")], inputs=[text])  # nothing in the way
    train = ["train", "--data-dir", data_dir, *TINY, "--device", "cpu", "--max-steps", 2, "--eval-every", 0]
    beside = {"m.npz.tmp": os.mkfifo, "m.csv.tmp": os.mkfifo, "m.npz.lock": os.mkdir, "m.samples.txt": os.mkfifo}
    for k, (name, make) in enumerate(dict(beside, **{"m.npz.tmp ": os.mkdir}).items()):
        run_dir = tmp_path / f"run{k}"
        run_dir.mkdir()
        make(run_dir / name.strip())
        err = one_error_line(capsys, run_main(*train, "--ckpt", run_dir / "m.npz"))
        assert f"{run_dir / name.strip()} is " in err and "--ckpt" in err and not (run_dir / "m.npz").exists(), name
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "dangling.npz"))
    assert "gone" in err and "does not exist" in err


def test_run_files_are_named_from_the_whole_checkpoint_name_and_never_replace_what_they_should_not(data_dir, tmp_path, capsys,
                                                                                                  monkeypatch):
    """exp.1 and exp.2 are two runs with two logs; a --ckpt naming prepared data, or a lock that is a link, is one
    line before any work; a folder that goes away mid-run is named as the cause, not a full disk."""
    train = ["train", "--data-dir", data_dir, *TINY, "--device", "cpu", "--max-steps", 2, "--eval-every", 0]
    for name in ("exp.1", "exp.2"):
        assert run_main(*train, "--ckpt", tmp_path / name, "--no-final-eval") == 0
    assert logged_steps(tmp_path / "exp.1.csv") == logged_steps(tmp_path / "exp.2.csv") == [1, 2]
    capsys.readouterr()
    import shutil
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "mine.bin").write_bytes(b"x" * 100)
    (data / "mine.bin.json").write_text("{}")
    for ckpt in (data / "train.bin", data / "mine.bin"):
        before = ckpt.read_bytes()
        err = one_error_line(capsys, run_main(*train, "--ckpt", ckpt, "--overwrite"))
        assert "prepared data" in err and ckpt.read_bytes() == before
    other = tmp_path / "other.txt"
    other.write_text("keep me")
    os.symlink(other, tmp_path / "l.npz.lock")
    assert "symbolic link" in one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "l.npz"))
    assert other.read_text() == "keep me" and not (tmp_path / "l.npz").exists()
    folder, train_step = tmp_path / "moving", mora.train_step

    def folder_moved_at_step_3(*args, **kwargs):
        if args[6] == 2:  # the step number
            os.rename(folder, tmp_path / "moved")
        return train_step(*args, **kwargs)
    monkeypatch.setattr(mora, "train_step", folder_moved_at_step_3)
    err = one_error_line(capsys, run_main(*train, "--ckpt", folder / "m.npz", "--max-steps", 4, "--ckpt-every", 2),
                         after_progress=True)
    assert f"{folder} is gone" in err and "put the folder" in err and "disk space" not in err and "--resume" in err


def test_the_log_and_the_samples_follow_the_checkpoint_on_resume(data_dir, tmp_path, monkeypatch, capsys):
    """One rule for the log and the samples file: on --resume each keeps its lines up to the checkpoint's step, so a
    run stopped between a sample and the next checkpoint does not sample that step twice; a damaged log gets one
    warning."""
    import signal
    ckpt, samples, train_step = tmp_path / "m.npz", tmp_path / "m.samples.txt", mora.train_step

    def killed_at_step_7(*args, **kwargs):
        if args[6] == 6:  # the step number: after step 6's sample, before the checkpoint of step 8
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return train_step(*args, **kwargs)
    monkeypatch.setattr(mora, "train_step", killed_at_step_7)
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 8,
             "--eval-every", 2, "--ckpt-every", 4, "--no-final-eval", "--sample-length", 5]
    assert run_main(*train) == 130
    assert [line.split(":")[0] for line in samples.read_text().splitlines()] == ["step 2", "step 4", "step 6"]
    monkeypatch.setattr(mora, "train_step", train_step)
    capsys.readouterr()
    assert run_main(*train, "--resume") == 0
    assert [line.split(":")[0] for line in samples.read_text().splitlines()] == ["step 2", "step 4", "step 6", "step 8"]
    assert logged_steps(tmp_path / "m.csv") == list(range(1, 9))
    lines = (tmp_path / "m.csv").read_text().splitlines(keepends=True)
    (tmp_path / "m.csv").write_text("".join(lines[:5]) + "5,x\n")
    assert run_main(*train, "--resume", "--max-steps", 9) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "kept as" in warnings[0] and "4 lines" in warnings[0], warnings
    assert logged_steps(tmp_path / "m.csv") == [1, 2, 3, 4, 9]


def test_a_run_out_of_memory_or_with_an_empty_prompt_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    train = ["train", "--data-dir", data_dir, *TINY, "--device", "cpu", "--max-steps", 6, "--eval-every", 0]
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "e.npz", "--sample-prompt", ""))
    assert "--sample-prompt is empty" in err and not (tmp_path / "e.npz").exists()
    train_step = mora.train_step

    def out_of_memory_at_step_5(*args, **kwargs):
        if args[6] == 4:
            raise MemoryError()
        return train_step(*args, **kwargs)
    monkeypatch.setattr(mora, "train_step", out_of_memory_at_step_5)
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "m.npz", "--ckpt-every", 2), after_progress=True)
    assert "out of memory in step 5" in err and "--batch-size" in err and "saved at step 4" in err
    assert mora.load_checkpoint(str(tmp_path / "m.npz"))[2]["step"] == 4


@pytest.mark.parametrize("fault", ["| head", "a full disk", "latin-1"])
def test_an_output_stream_that_fails_never_ends_a_run(data_dir, tmp_path, fault):
    """`train | head`, stdout on a full disk (/dev/full), a stdout that cannot encode the sample: training goes on,
    said once on stderr, and ends saved.  (`sample | head` stays quiet: test_sample_into_a_closed_pipe_is_quiet.)"""
    ckpt = tmp_path / "m.npz"
    command = [sys.executable, "mora.py", "train", "--data-dir", str(data_dir), "--ckpt", str(ckpt), *TINY, "--device",
               "cpu", "--max-steps", "6", "--eval-every", "2", "--sample-prompt", "Tom \u2603 \ufffd", "--sample-length", "5"]
    env = dict(os.environ, PYTHONIOENCODING="latin-1" if fault == "latin-1" else "utf-8")
    reader, writer = os.pipe()
    if fault == "| head":
        os.close(reader)  # as head does once it has its lines: every write to the pipe fails from then on
    stdout = open("/dev/full", "w") if fault == "a full disk" else writer
    proc = subprocess.Popen(command, cwd=HERE, stdout=stdout, stderr=subprocess.PIPE, env=env)
    os.close(writer)
    out, err = proc.communicate(timeout=300)
    out = b"" if fault == "| head" else os.read(reader, 1 << 20)
    err = err.decode()
    assert proc.returncode == 0 and "Traceback" not in err and "error" not in err, err
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 6 and logged_steps(tmp_path / "m.csv")[-1] == 6
    assert err.count("note:") == (fault != "latin-1"), err
    if fault == "latin-1":
        assert "sample: 'Tom ? ?" in out.decode("latin-1")


def test_sample_into_a_closed_pipe_is_quiet(data_dir, tmp_path):
    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 1) == 0
    proc = subprocess.Popen([sys.executable, "mora.py", "sample", "--ckpt", str(ckpt), "--length", "100000", "--device", "cpu"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_damaged_checkpoints_and_contradictions_are_one_line(data_dir, tmp_path, capsys):
    def error_of(*args):
        return one_error_line(capsys, run_main(*args))

    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 1) == 0
    capsys.readouterr()
    cfg, params, meta, adam = mora.load_checkpoint(str(ckpt), adam=True)
    assert "contradict" in error_of("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--overwrite")
    broken = dict(params, embed=np.full_like(params["embed"], np.nan))
    mora.save_checkpoint(str(tmp_path / "nan.npz"), broken, meta, adam["adam.m"], adam["adam.v"])
    assert "non-finite" in error_of("eval", "--ckpt", tmp_path / "nan.npz", "--data-dir", data_dir, "--device", "cpu")
    assert "non-finite" in error_of("sample", "--ckpt", tmp_path / "nan.npz", "--device", "cpu")
    mora.save_checkpoint(str(tmp_path / "key.npz"), params, dict(meta, config=dict(meta["config"], colour="red")))
    assert "does not know" in error_of("sample", "--ckpt", tmp_path / "key.npz", "--device", "cpu")
    mora.save_checkpoint(str(tmp_path / "adam.npz"), params, meta, adam["adam.m"][:-1], adam["adam.v"])
    assert "does not match" in error_of("train", "--data-dir", data_dir, "--ckpt", tmp_path / "adam.npz", "--resume", "--device", "cpu")
    short = tmp_path / "short"
    short.mkdir()
    (short / "val.bin").write_bytes(b"x" * 10)
    err = error_of("eval", "--ckpt", ckpt, "--data-dir", short, "--device", "cpu")
    assert "evaluate on more text" in err and "--seq-len" not in err  # eval has no --seq-len to suggest
    assert "--d-model" in error_of("train", "--data-dir", data_dir, "--ckpt", tmp_path / "huge.npz", "--device", "cpu",
                                   "--d-model", 100000)


def damaged(arrays, meta, name, change):
    """The checkpoint's arrays and meta with one of them changed: an array (None: removed), or a meta field."""
    arrays, meta = dict(arrays), json.loads(json.dumps(meta))
    if name in arrays:
        arrays[name] = change(arrays[name])
        arrays = {k: v for k, v in arrays.items() if v is not None}
    else:
        *section, key = name.split(".")
        (meta[section[0]] if section else meta)[key] = change
    return arrays, meta


def set_one(array, value, index=70):
    array = array.copy()
    array.reshape(-1)[index] = value
    return array


DAMAGED_CHECKPOINTS = [  # what is changed, how, the commands that must refuse it, and words of their one line
    ("adam.v", lambda a: None, ["train", "sample", "eval"], "does not match its own config (adam.v: missing)"),
    ("adam.v", lambda a: -a, ["train"], "adam.v, Adam's mean squared gradient, holds negative numbers"),
    ("adam.m", lambda a: a.astype(np.int32), ["train", "sample", "eval"], "adam.m: not"),
    ("embed", lambda a: set_one(a, 3e38), ["train", "sample", "eval"], "the model's output overflows"),
    ("blocks.1.w_down", lambda a: set_one(a, -3e38), ["train", "sample", "eval"], "the model's output overflows"),
    ("blocks.0.b_in", lambda a: set_one(a, np.inf, 1), ["train", "sample", "eval"], "non-finite numbers (NaN or inf in blocks.0.b_in)"),
    ("train.lr", 0, ["train", "sample", "eval"], "(lr 0)"),
    ("train.clip", -1.0, ["train", "sample", "eval"], "(clip -1.0)"),
    ("train.beta2", 1.0, ["train", "sample", "eval"], "(beta2 1.0)"),
    ("config.seq_len", 2.5, ["train", "sample", "eval"], "(seq_len 2.5)"),
    ("step", -1, ["train", "sample", "eval"], "(step -1)"),
]


def stopped_run(data_dir, ckpt, max_steps):
    """A tiny run stopped (and saved) after 2 of its max_steps, its checkpoint read back: (arrays, meta)."""
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", max_steps,
                    "--stop-after", 2, "--eval-every", 0) == 0
    with np.load(ckpt) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays.pop("meta")))


@pytest.mark.filterwarnings("error")  # no RuntimeWarning on the way: the checkpoint is refused before it is used
def test_a_damaged_checkpoint_is_refused_by_every_command_that_reads_it(data_dir, tmp_path, capsys):
    ckpt = tmp_path / "run.npz"
    arrays, meta = stopped_run(data_dir, ckpt, max_steps=4)
    capsys.readouterr()
    commands = {"sample": ["sample", "--length", 3], "eval": ["eval", "--data-dir", data_dir, "--max-bytes", 100],
                "train": ["train", "--data-dir", data_dir, "--resume", "--eval-every", 0]}
    for case, (name, change, refusing, words) in enumerate(DAMAGED_CHECKPOINTS):
        path = tmp_path / f"d{case}.npz"
        bad_arrays, bad_meta = damaged(arrays, meta, name, change)
        np.savez(path, meta=np.array(json.dumps(bad_meta)), **bad_arrays)
        before = path.read_bytes()
        for command, flags in commands.items():
            code = run_main(*flags, "--ckpt", path, "--device", "cpu")
            if command in refusing:
                err = one_error_line(capsys, code)
                assert words in err and str(path) in err and "learning rate" not in err, (name, command, err)
            else:
                assert code == 0, (name, command, capsys.readouterr().err)
        assert path.read_bytes() == before, name  # never trained on, never overwritten
        capsys.readouterr()


def test_a_checkpoint_is_read_no_further_than_its_members_need(data_dir, tmp_path, capsys):
    """An .npz of a few MB may unpack to gigabytes: a member the command does not use, or bytes past the shape a
    member's header gives, are never read."""
    import tracemalloc
    ckpt, big = tmp_path / "run.npz", tmp_path / "big.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 1) == 0
    zeros = bytes(48 << 20)
    with zipfile.ZipFile(ckpt) as small, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as out:
        for name in small.namelist():
            out.writestr(name, small.read(name) + (zeros if name == "embed.npy" else b""))
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (12 << 20,)})
        out.writestr("junk.npy", header.getvalue() + zeros)
    assert big.stat().st_size < 2 << 20
    capsys.readouterr()
    tracemalloc.start()
    try:
        assert run_main("sample", "--ckpt", big, "--length", 3, "--device", "cpu") == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def refusal_names(err, name):
    """Whether a one-line refusal names the setting `name`, as the checkpoint spells it or as its flag."""
    return re.search(rf"\b{name}\b|--{name.replace('_', '-')}\b", err)


OUT_OF_RANGE = [("step", -1), ("step", 2.5), ("step", 6), ("train_records", -1), ("lr", 0), ("lr", -0.01),
                ("warmup", -1), ("warmup", 6), ("final_lr_fraction", 1.5), ("clip", 0), ("beta1", 1.0), ("beta2", 1.0),
                ("eps", 0), ("seed", -1), ("epochs", 0), ("max_steps", 0), ("eval_every", -1), ("eval_bytes", 0),
                ("eval_bytes", 16), ("ckpt_every", 0), ("slices", 0), ("d_model", 0), ("seq_len", 0), ("batch_size", 0)]


def test_a_checkpoint_out_of_its_settings_range_is_refused_in_one_line_naming_the_setting(data_dir, tmp_path, capsys):
    """Each value a flag would refuse, or that contradicts the run (a step past --max-steps 5, a
    warmup longer than the run, eval bytes under one record of 17), written into a checkpoint's
    meta: sample, eval and train --resume each refuse it in one line that names the setting."""
    ckpt = tmp_path / "run.npz"
    arrays, meta = stopped_run(data_dir, ckpt, max_steps=5)
    commands = [("sample", "--length", 3), ("eval", "--data-dir", data_dir, "--max-bytes", 100),
                ("train", "--data-dir", data_dir, "--resume", "--stop-after", 1, "--eval-every", 0)]
    for case, (name, value) in enumerate(OUT_OF_RANGE):
        bad = json.loads(json.dumps(meta))
        place = next(where for where in (bad, bad["config"], bad["train"], bad["data"]) if name in where)
        place[name] = value
        path = tmp_path / f"case{case}.npz"
        np.savez(path, meta=np.array(json.dumps(bad)), **arrays)
        capsys.readouterr()
        for command in commands:
            err = one_error_line(capsys, run_main(*command, "--ckpt", path, "--device", "cpu"))
            assert refusal_names(err.replace(str(path), ""), name), (name, value, command, err)
        assert mora.load_checkpoint(str(ckpt))[2]["step"] == 2 and json.loads(str(np.load(path)["meta"])) == bad


def test_a_learning_rate_of_zero_is_refused_by_the_flag(data_dir, tmp_path, capsys):
    """--lr 0 would train nothing for the whole run: the command line refuses it (exit 2), in one
    error line that names the flag, under argparse's usage."""
    for value in ("0", "0.0", "-0"):
        with pytest.raises(SystemExit) as exit_info:
            run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "m.npz", "--lr", value)
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert exit_info.value.code == 2 and len(errors) == 1, errors
        assert "--lr" in errors[0] and "positive" in errors[0], errors
    assert not (tmp_path / "m.npz").exists()


def test_eval_bytes_may_be_one_record_and_no_less(data_dir, tmp_path, capsys):
    """Evaluations during training read --eval-bytes of val: one record of seq_len + 1 = 17 bytes will
    do, 16 is refused in one line before a step (a new run, or a resume that changes it)."""
    ckpt = tmp_path / "m.npz"
    train = ["train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--eval-every", 1,
             "--sample-length", 0]
    err = one_error_line(capsys, run_main(*train, "--max-steps", 2, "--eval-bytes", 16))
    assert "--eval-bytes 16" in err and "17" in err and not ckpt.exists()
    assert run_main(*train, "--max-steps", 2, "--eval-bytes", 17, "--no-final-eval") == 0
    assert re.search(r"^step 2: val bits/byte [\d.]+", capsys.readouterr().out, re.M)
    err = one_error_line(capsys, run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, "--device", "cpu",
                                          "--resume", "--max-steps", 3, "--eval-bytes", 16))
    assert "--eval-bytes 16" in err and "17" in err and mora.load_checkpoint(str(ckpt))[2]["step"] == 2


class Hung(BaseException):
    """Raised by TimeLimit: no handler of the code under test (none catches a BaseException) can take it for its own."""


class TimeLimit:
    """Raise Hung in the main thread if the block runs past `seconds` (a read that waits forever)."""
    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        def expire(signum, frame):
            raise Hung(f"still running after {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_a_fifo_or_a_device_as_the_checkpoint_is_refused_in_one_line_without_waiting(data_dir, tmp_path, capsys):
    """A FIFO's read would wait for a writer forever, a device's read would never end: neither is
    opened.  sample, eval and train --resume (and a new run on a FIFO) refuse it in one line."""
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    commands = [("sample", "--length", 3), ("eval", "--data-dir", data_dir),
                ("train", "--data-dir", data_dir, "--resume")]
    for path, commands in ((fifo, commands + [("train", "--data-dir", data_dir, *TINY)]), ("/dev/zero", commands)):
        for command in commands:
            with TimeLimit(10):
                err = one_error_line(capsys, run_main(*command, "--ckpt", path, "--device", "cpu"))
            said = err.replace(str(path), "")
            assert str(path) in err and re.search("regular file|FIFO|device", said), (command, err)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(os.listdir(tmp_path)) == ["fifo.npz"]


ODD_VALUES = [-5, 0, 1, 3, 2.5, -1e-3, 1e308, float("nan"), 10 ** 30, "7", "fast", "", None, True, False, [], {}, [1, 2, 3]]


def tampered(meta, arrays, rng):
    """One random tampering of a checkpoint's meta (a value replaced, a key removed or
    added, the whole meta replaced) or of its arrays (a dtype, a shape, one removed);
    and whether it must be refused (numbers that are not floats: the cast would be lossy)."""
    meta, arrays = json.loads(json.dumps(meta)), dict(arrays)
    places = [meta, meta["config"], meta["train"], meta["data"], meta["data"]["files"], meta["data"]["files"]["train.bin"]]
    where, kind = places[rng.integers(len(places))], rng.integers(6)
    key = sorted(where)[rng.integers(len(where))]
    name = sorted(arrays)[rng.integers(len(arrays))]
    if kind == 0:
        where[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif kind == 1:
        del where[key]
    elif kind == 2:
        where["colour"] = "red"
    elif kind == 3:
        arrays[name] = arrays[name].astype([np.int32, np.float64, np.float16, "U4", bool, np.uint8][rng.integers(6)])
        return meta, arrays, arrays[name].dtype.kind != "f"
    elif kind == 4:
        arrays[name] = [arrays[name][..., :-1], arrays[name].reshape(-1), arrays[name][None], arrays[name].T][rng.integers(4)]
    elif rng.integers(2):
        del arrays[name]
    else:
        meta = [[1, 2], "meta", 7, None][rng.integers(4)]
    return meta, arrays, False


def test_every_command_refuses_a_tampered_checkpoint_in_one_line_or_runs_it(data_dir, tmp_path, capsys):
    """A fuzz: 240 checkpoints, each tampered at random, given to sample, eval and train
    --resume, in this process through main.  Each either runs (train: one more step, its
    checkpoint then loads with the settings it was given) or prints one line `error: ...`
    and exits 1.  Never a traceback (it would fail this test), never a hang."""
    ckpt = tmp_path / "run.npz"
    arrays, meta = stopped_run(data_dir, ckpt, max_steps=5)
    rng, outcomes = np.random.default_rng(0), {0: 0, 1: 0}
    commands = [("sample", "--length", 3), ("eval", "--data-dir", data_dir, "--max-bytes", 100),
                ("train", "--data-dir", data_dir, "--resume", "--stop-after", 1, "--eval-every", 0)]
    for case in range(240):
        path = tmp_path / f"t{case}.npz"
        bad_meta, bad_arrays, refused = tampered(meta, arrays, rng)
        np.savez(path, meta=np.array(json.dumps(bad_meta)), **bad_arrays)
        capsys.readouterr()
        for command in commands:
            code = run_main(*command, "--ckpt", path, "--device", "cpu")
            err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("step ", "warning: "))]
            assert code in (0, 1) and (err == [] if code == 0 else len(err) == 1 and err[0].startswith("error: ")), \
                (case, command, bad_meta, err)
            assert code == 1 or not refused, (case, command, bad_arrays)
            outcomes[code] += 1
            if code == 0 and command[0] == "train" and bad_meta["step"] < bad_meta["train"]["max_steps"]:
                after = mora.load_checkpoint(str(path))[2]
                assert after["step"] == bad_meta["step"] + 1 and after["train"] == dict(bad_meta["train"]), case
    assert min(outcomes.values()) > 50, outcomes  # both outcomes were tried often


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow on the way to NaN
def test_errors_say_what_is_there(data_dir, tmp_path, capsys, monkeypatch):
    import builtins

    def error_of(*args, after_progress=False):
        return one_error_line(capsys, run_main(*args), after_progress)

    train = ["train", "--data-dir", data_dir, *TINY, "--device", "cpu", "--eval-every", 0]
    for ckpt in ("", str(tmp_path) + os.sep):
        assert "names no file" in error_of(*train, "--ckpt", ckpt)  # before step 1, not at the first save
    diverge = ["--max-steps", 50, "--lr", 1e30, "--warmup", 0, "--clip", 1e30]
    err = error_of(*train, "--ckpt", tmp_path / "d.npz", *diverge, after_progress=True)
    assert "no checkpoint of this run was saved" in err and "last good" not in err
    ckpt = tmp_path / "m.npz"
    assert run_main(*train, "--ckpt", ckpt, "--max-steps", 1) == 0
    capsys.readouterr()
    assert "is a folder" in error_of("sample", "--ckpt", tmp_path, "--device", "cpu")
    err = error_of("eval", "--ckpt", ckpt, "--data-dir", data_dir, "--split", "test", "--device", "cpu")
    assert "enwik8" in err and "--split val" in err  # prepare_data.py makes a test split for enwik8 alone

    def unreadable(path, *args, **kwargs):
        if str(path) == str(ckpt):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(mora, "open", unreadable, raising=False)
    err = error_of("sample", "--ckpt", ckpt, "--device", "cpu")
    assert "Permission denied" in err and "corrupt" not in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow on the way to NaN
def test_messages_say_what_is_true(data_dir, tmp_path, capsys):
    ckpt, tiny = tmp_path / "m.npz", tmp_path / "tiny"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 1) == 0
    tiny.mkdir()
    (tiny / "val.bin").write_bytes(b"x")
    capsys.readouterr()
    err = one_error_line(capsys, run_main("eval", "--ckpt", ckpt, "--data-dir", tiny, "--stream", "--device", "cpu"))
    assert f"{tiny / 'val.bin'} holds 1 byte: at least 2 are needed" in err and "--max-bytes" not in err  # never given
    err = one_error_line(capsys, run_main("eval", "--ckpt", ckpt, "--data-dir", tiny, "--stream", "--max-bytes", 5,
                                          "--device", "cpu"))
    assert f"{tiny / 'val.bin'} holds 1 byte" in err and "--max-bytes" not in err  # given, but it cut nothing
    err = one_error_line(capsys, run_main("eval", "--ckpt", ckpt, "--data-dir", data_dir, "--stream", "--max-bytes", 1,
                                          "--device", "cpu"))
    assert "--max-bytes 1 leaves 1 byte: at least 2 are needed" in err
    for flags in (["sample", "--ckpt", ckpt, "--length", "2.5"], ["train", "--max-steps", "2.5"], ["eval", "--seq-len", "2.5"]):
        with pytest.raises(SystemExit):
            run_main(*flags)
        assert "must be a whole number" in capsys.readouterr().err, flags


def test_divergence_names_the_value_and_the_likely_causes(data_dir, tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 50,
                    "--lr", 1e30, "--warmup", 0, "--clip", 1e30, "--eval-every", 0) == 1
    err = capsys.readouterr().err.split("\r")[-1]
    assert "became" in err and "likely causes" in err and "--lr 1e+30" in err and "Traceback" not in err


def test_a_full_disk_leaves_no_partial_bin(tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(made_up_text(5))

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(prepare_data, "copy_counting_stories", disk_full)
    assert prepare_data.main(["--out-dir", str(tmp_path / "o"), "--input-train", str(text), "--input-val", str(text)]) == 1
    assert "No space left" in capsys.readouterr().err and not (tmp_path / "o" / "train.bin.tmp").exists()


def test_tiny_and_huge_temperatures_sample(tmp_path):
    logits = np.arange(256, dtype=np.float32)
    rng = np.random.default_rng(0)
    assert mora.pick_byte(logits, 1e-310, 0, rng) == 255  # no NaN: as greedy
    assert 0 <= mora.pick_byte(logits, 1e300, 0, rng) < 256


def test_a_long_cpu_run_is_announced(data_dir, tmp_path, capsys):
    assert run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "m.npz", "--seq-len", 16, "--batch-size", 4,
                    "--device", "cpu", "--max-steps", 10 ** 7, "--stop-after", 1, "--eval-every", 0) == 0
    out = capsys.readouterr().out
    assert "hours" in out and "--batch-size 32 --max-steps 3000" in out


def test_the_hour_estimate_says_its_figure_and_divides_by_the_threads(data_dir, tmp_path, capsys, monkeypatch):
    """Before step 1 a CPU run that will take hours says how many: its steps x bytes a step (batch x
    seq_len) x parameters at the CPU's measured core-seconds per parameter and byte, over its threads.
    The speed is set here so that the run's 100,000 steps take 2.6 core-hours."""
    params = mora.count_params(mora.Config(d_model=8, n_layers=2, seq_len=16, batch_size=4))
    monkeypatch.setattr(mora, "CPU_SECONDS_PER_PARAM_BYTE", 2.6 * 3600 / (100_000 * 4 * 16 * params))

    def note(threads):
        assert run_main("train", "--data-dir", data_dir, "--ckpt", tmp_path / "m.npz", *TINY, "--device", "cpu",
                        "--max-steps", 100_000, "--stop-after", 1, "--eval-every", 0, "--threads", threads,
                        "--overwrite") == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]

    one, two = note(1), note(2)
    assert len(one) == len(two) == 1 and "about 2.6 hours" in one[0] and "about 1.3 hours" in two[0]
    assert re.search(r"\b1 thread", one[0]) and re.search(r"\b2 threads", two[0])
    monkeypatch.setattr(mora, "CPU_SECONDS_PER_PARAM_BYTE", 0.9 * 3600 / (100_000 * 4 * 16 * params))
    assert note(1) == []  # under an hour: nothing to say


def blas_note(env, threads):
    """The BLAS-thread note of `bench --threads N` run with the BLAS variables of `env` (others unset)."""
    env = dict({k: v for k, v in os.environ.items() if k not in mora.BLAS_VARIABLES}, **env)
    done = subprocess.run([sys.executable, "mora.py", "bench", *TINY, "--steps", "1", "--device", "cpu", "--threads",
                           str(threads)], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("note:") and "BLAS" in line]


def test_the_blas_thread_note_comes_when_blas_threads_would_fight_the_workers(tmp_path):
    """A worker per core, each running BLAS with more than one thread: the note, which names the
    variable to unset.  A worker per core with BLAS on one thread (MORA's default, or set so): none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    notes = blas_note({"OPENBLAS_NUM_THREADS": "2"}, cores)
    assert len(notes) == 1 and "unset" in notes[0] and "OPENBLAS_NUM_THREADS" in notes[0]
    assert blas_note({}, cores) == []
    assert blas_note({name: "1" for name in mora.BLAS_VARIABLES}, cores) == []


def test_readme_install_line_installs_the_test_runner():
    readme, requirements = (open(os.path.join(HERE, f)).read() for f in ("README.md", "requirements.txt"))
    assert "pip install -r requirements.txt" in readme and "python -m pytest" in readme
    assert any(line.startswith("pytest") for line in requirements.splitlines())


def table_cells(line):
    """The cells of one markdown table row; `\\|` is a pipe inside a cell."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def readme_figures(text):
    """Numbers with a decimal point or a thousands separator, outside code blocks,
    link targets and inline code: what a reader has to take in."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\(http[^)]*\)|\(docs/[^)]*\)|`[^`]*`", "", text)
    return re.findall(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])\d+\.\d+", text)


def readme_sentences(text):
    """The sentences of the prose: each paragraph, list item, heading and table cell read
    apart, a link read as its text, code blocks and comments left out."""
    text = re.sub(r"```.*?```|<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    units = []
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith("|"):
            rows = [line for line in block.splitlines() if not re.fullmatch(r"[|:\- ]+", line)]  # not |---|
            units += [cell for row in rows for cell in table_cells(row)]
        else:
            units += re.split(r"\n(?=\s*(?:[-*] |\d+\. |#))", block)
    return [s for unit in units for s in re.split(r"(?<=[.!?])\s+", " ".join(unit.split())) if s]


def test_readme_is_a_guide_not_a_lab_notebook():
    """README in nanoGPT's shape: at most 200 lines and 30 figures, no sentence over 40
    words, no table cell over 200 characters; the measurements live in docs/results.md."""
    assert readme_figures("1.5 and 2,000 and 30 and `3.5` [a](docs/r.md#v1.2)\n```\n4.5\n```") == ["1.5", "2,000"]
    assert readme_sentences("One two. Three\n\n| a `x\\|y` | b. c |\n|---|---|") == ["One two.", "Three", "a `x\\|y`", "b.", "c"]
    text = open(os.path.join(HERE, "README.md")).read()
    assert len(text.splitlines()) <= 200
    figures = readme_figures(text)
    assert len(figures) <= 30, figures
    long = [sentence for sentence in readme_sentences(text) if len(sentence.split()) > 40]
    assert not long, long
    rows = [line for line in text.splitlines() if line.startswith("|")]
    wide = [cell for row in rows for cell in table_cells(row) if len(cell) > 200]
    assert not wide, wide


# ----------------------------------------------------------------------------
# Evaluation protocols

def test_streamed_evaluation_reads_the_text_as_one_sequence(tmp_path):
    """Chunks with the state carried give the loss of one forward pass over the whole text."""
    cfg = mora.Config(d_model=8, n_layers=2)
    params = perturbed_params(cfg, seed=5)
    data = np.frombuffer(made_up_text(2), dtype=np.uint8)[:70]
    result = mora.evaluate_stream(params, data, seq_len=16)
    logits = mora.forward(params, data[None, :-1].astype(np.int64))[0]  # (69, V)
    losses, correct, _ = mora.cross_entropy_forward(logits, data[1:].astype(np.int64))
    assert result["bytes"] == 69 and abs(result["loss"] - losses.mean()) < 1e-10
    assert result["accuracy"] == pytest.approx(correct.mean())
    records = data[:68].reshape(4, 17)  # the per-record protocol: every record from a cold start
    per_record = mora.evaluate(params, records, 3)
    x, y = mora.make_batch(records, np.arange(4), np)
    assert abs(per_record["loss"] - mora.forward_loss(params, x, y)[0].mean()) < 1e-10
    assert per_record["by_position"].startswith("bits/byte by position: 0: ")


def test_the_cpu_evaluation_in_chunks_gives_the_numbers_of_whole_records():
    """With CPU slices, evaluate reads records EVAL_CHUNK positions at a time, the state
    carried: the loss, accuracy and loss by position of one forward pass over each
    whole record, to float32 rounding, here over two and a half chunks."""
    params = perturbed_params(mora.Config(d_model=8, n_layers=2), seed=7)
    T = 5 * mora.EVAL_CHUNK // 2
    records = np.random.default_rng(1).integers(0, 256, (7, T + 1)).astype(np.uint8)
    x, y = mora.make_batch(records, np.arange(7), np)
    losses, correct, _ = mora.forward_loss(params, x, y, keep_cache=False)  # (T, B) each, whole records
    by_position = mora.position_report(losses.sum(1).astype(np.float64), np.full(T, 7))
    for threads in (1, 2):
        slices = mora.cpu_slices(np, threads)
        chunked = mora.evaluate(params, records, 4, slices)
        assert chunked["loss"] == pytest.approx(float(losses.mean()), rel=1e-6) and chunked["bytes"] == 7 * T
        assert chunked["accuracy"] == float(correct.mean()) and chunked["by_position"] == by_position
        slices.pool.shutdown()


def test_one_stream_is_one_text_and_more_streams_are_its_parts_side_by_side():
    cfg = mora.Config(d_model=8, n_layers=2)
    params = perturbed_params(cfg, seed=6)
    data = np.frombuffer(made_up_text(2), dtype=np.uint8)[:70]
    state, position_loss, right = mora.initial_state(params, 1), np.zeros(16), 0.0  # one text, written out:
    for start in range(0, len(data) - 1, 16):  # chunks of 16, the state carried, every byte but the first predicted
        chunk = data[start:start + 17].astype(np.int32)
        logits, _, state = mora.model_forward(params, chunk[:-1, None], state, keep_cache=False)
        losses, correct, _ = mora.cross_entropy_forward(logits.reshape(-1, 256), chunk[1:])
        position_loss[:len(losses)] += losses
        right += correct.sum()
    one = mora.evaluate_stream(params, data, 16)
    assert one["streams"] == 1 and one["loss"] == position_loss.sum() / 69 and one["accuracy"] == right / 69
    for streams in (2, 3, 5):  # parts of 34 and 35 bytes, ...: the last chunks differ in length
        combined = mora.evaluate_stream(params, data, 16, streams=streams)
        edges = np.linspace(0, len(data) - 1, streams + 1).astype(int)  # part k: bytes edges[k] .. edges[k + 1]
        parts = [mora.evaluate_stream(params, data[a:b + 1], 16) for a, b in zip(edges[:-1], edges[1:])]
        assert combined["streams"] == streams and combined["bytes"] == sum(p["bytes"] for p in parts) == 69
        for key in ("loss", "accuracy"):
            assert combined[key] == pytest.approx(sum(p[key] * p["bytes"] for p in parts) / 69, rel=1e-12), (streams, key)
        threaded = mora.evaluate_stream(params, data, 16, streams=streams, slices=mora.Slices(2, 2))
        assert threaded["loss"] == pytest.approx(combined["loss"], rel=1e-12) and threaded["bytes"] == 69
    assert mora.evaluate_stream(params, data[:4], 16, streams=10)["streams"] == 3  # a byte to predict in each


def test_eval_reports_its_streams_and_reads_no_more_than_asked(data_dir, tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 2,
                    "--eval-every", 0, "--eval-bytes", 300) == 0
    out = capsys.readouterr().out
    assert f"{mora.EVAL_STREAMS} streams side by side" in out  # the final evaluation's streamed part
    evaluate = ["eval", "--ckpt", ckpt, "--data-dir", data_dir, "--device", "cpu"]
    assert run_main(*evaluate, "--streams", 3, "--max-bytes", 1000) == 0  # --streams implies --stream
    out = capsys.readouterr().out
    assert "3 streams side by side" in out and "999 bytes predicted" in out
    assert run_main(*evaluate, "--stream", "--max-bytes", 10, "--streams", 1) == 0  # shorter than a chunk of 16
    out = capsys.readouterr().out
    assert "nan" not in out and "1 stream," in out and "9 bytes predicted" in out
    err = one_error_line(capsys, run_main(*evaluate, "--max-bytes", 10))  # less than one record of 17 bytes
    assert "--max-bytes 10" in err and "17" in err and "--stream" in err
    assert run_main(*evaluate, "--seq-len", 7, "--max-bytes", 80) == 0  # records of 8 bytes, whatever the checkpoint's
    out = capsys.readouterr().out
    assert "10 records" in out and "70 bytes predicted" in out
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert run_main(*evaluate, "--max-bytes", 100, "--threads", 4 * cores) == 0
    assert f"more than the {cores} cores" in capsys.readouterr().err


def test_eval_stream_without_max_bytes_reads_all_of_the_split(data_dir, tmp_path, capsys):
    """--stream (one text, or --streams parts) predicts every byte of val.bin but the first."""
    ckpt = tmp_path / "m.npz"
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 1,
                    "--eval-every", 0, "--no-final-eval") == 0
    predicted = os.path.getsize(os.path.join(data_dir, "val.bin")) - 1
    for flags in (["--stream"], ["--stream", "--streams", "1"], ["--streams", "3"]):
        capsys.readouterr()
        assert run_main("eval", "--ckpt", ckpt, "--data-dir", data_dir, "--device", "cpu", *flags) == 0
        assert f" {predicted:,} bytes predicted" in capsys.readouterr().out, flags


def test_plot_log_draws_and_refuses_bad_logs(tmp_path):
    import plot_log
    log = tmp_path / "m.csv"
    log.write_text("step,bytes,lr,loss,bpb,accuracy,grad_norm,ms_per_step,val_loss,val_bpb,val_accuracy\n"
                   "1,100,0.1,5,7.2,0,1,1,,,\n2,200,0.1,5,7.1,0,1,1,5,7.0,0\n")  # every value above --ymax 4
    plot_log.main([str(log), "--out", str(tmp_path / "c.svg")])
    assert (tmp_path / "c.svg").read_text().startswith("<svg")
    (tmp_path / "empty.csv").write_text("step,bytes,lr,loss,bpb\n")
    for bad in (tmp_path / "none.csv", tmp_path / "empty.csv"):
        with pytest.raises(SystemExit) as exit_info:
            plot_log.main([str(bad), "--out", str(tmp_path / "x.svg")])
        assert str(exit_info.value.code).startswith("error: ")


def test_plot_log_flags_and_output_faults_are_one_line(tmp_path, capsys):
    import plot_log
    import xml.dom.minidom
    log = tmp_path / "m.csv"
    log.write_text("step,bytes,lr,loss,bpb,accuracy,grad_norm,ms_per_step,val_loss,val_bpb,val_accuracy\n"
                   "1,100,0.1,2,3.0,0,1,1,,,\n2,200,0.1,2,2.9,0,1,1,2,2.8,0\n")
    out = str(tmp_path / "c.svg")
    for flags in (["--smooth", "0"], ["--smooth", "-1"], ["--ymax", "nan"], ["--ymax", "inf"], ["--ymax", "0"],
                  ["--ymin", "4"], ["--ymin", "1", "--ymax", "0.5"], ["--ymin", "nan"],
                  ["--labels", "one"], ["--labels", "a", "b", "c"]):  # two logs below: one label each
        with pytest.raises(SystemExit) as exit_info:
            plot_log.main([str(log), str(log), "--out", out, *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "usage" in err and "Traceback" not in err, flags
    assert not os.path.exists(out)
    (tmp_path / "folder.svg").mkdir()
    os.mkfifo(tmp_path / "fifo.svg.tmp")
    reader = os.open(tmp_path / "fifo.svg.tmp", os.O_RDONLY | os.O_NONBLOCK)  # a write to it then fails the test, not hangs
    for unwritable, why in ((tmp_path / "folder.svg", "is a folder"), (tmp_path / "none" / "c.svg", "does not exist"),
                            (log, "also an input"), (tmp_path / "fifo.svg", "not a regular file")):
        before = log.read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            plot_log.main([str(log), "--out", str(unwritable)])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and why in message and str(unwritable.parent) in message
        assert log.read_bytes() == before and (why == "not a regular file" or not os.path.exists(str(unwritable) + ".tmp"))
    os.close(reader)
    plot_log.main([str(log), str(log), "--out", out, "--labels", "a & b", "<c>", "--title", "MORA <small> & co"])
    svg = open(out).read()
    xml.dom.minidom.parseString(svg)  # well-formed: the title and labels are escaped
    assert "nan" not in svg and svg.count("<polyline") == 2 and "a &amp; b" in svg
    plot_log.main([str(log), "--out", out, "--ymin", "2.85", "--ymax", "3.2"])  # the val dot 2.8 lies below the axis
    svg = open(out).read()
    floor = max(float(y) for y in re.findall(r'cy="([0-9.]+)"', svg))
    grid = re.findall(r'text-anchor="end">([0-9.]+)</text>', svg)  # the axis labels, not the legend's
    assert grid == ["2.9", "3.0", "3.1", "3.2"] and floor == 420 - 50  # drawn at the bottom of the axis, not below


def test_bench_torch_helps_without_torch_and_says_what_to_install(monkeypatch, capsys):
    """bench_torch.py is optional: without PyTorch (hidden here, whether or not it is
    installed) --help still works and a command says `pip install torch` in one line."""
    import importlib.util
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    spec = importlib.util.spec_from_file_location("bench_torch_without_torch", os.path.join(HERE, "bench_torch.py"))
    bench_torch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_torch)
    for flags in (["--help"], ["speed", "--help"], ["lstm", "--help"], ["gpt", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_torch.main(flags)
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
    for command in ("check", "speed", "lstm", "gpt"):
        assert "pip install torch" in one_error_line(capsys, bench_torch.main([command]))
    # the GPT peer's schedule is nanoGPT's get_lr: (it + 1) / (warmup + 1) of the peak, then cosine to the floor
    lr = bench_torch.nanogpt_learning_rate
    assert lr(0, 1e-3) == pytest.approx(1e-3 / 101) and lr(99, 1e-3) == pytest.approx(1e-3 * 100 / 101)
    assert lr(100, 1e-3) == pytest.approx(1e-3) and lr(1050, 1e-3) == pytest.approx(5.5e-4)
    assert lr(2000, 1e-3) == pytest.approx(1e-4) and lr(2500, 1e-3) == pytest.approx(1e-4)


def bench_launches(out):
    """The launches/step column of bench's one-model table (its seventh)."""
    row = [line for line in out.splitlines() if line.startswith("| d=")]
    assert len(row) == 1, out
    return int(row[0].split("|")[7])


def test_bench_counts_kernel_launches_on_the_stand_in(stand_in, capsys):
    """bench prints the launches of one training step of the small model: at most 150 (the GPU target)."""
    assert run_main("bench", "--batch-size", 2, "--seq-len", 8, "--steps", 1, "--device", "gpu") == 0
    out = capsys.readouterr().out
    launches = bench_launches(out)
    assert 0 < launches <= 150, launches


def test_plot_log_leaves_out_what_is_no_number_and_draws_against_time(tmp_path, capsys):
    """A diverged run's NaN bits/byte is left out, said in one line; a log at 0 bytes still
    draws; --x time places each row at the minutes summed from ms_per_step (the rows: 1.5
    and 4.5 s of steps, so the last point is at 0.1 min and the axis's last tick says so)."""
    import plot_log
    header = "step,bytes,lr,loss,bpb,accuracy,grad_norm,ms_per_step,val_loss,val_bpb,val_accuracy\n"
    log, out = tmp_path / "m.csv", str(tmp_path / "c.svg")
    log.write_text(header + "1,100,0.1,2,3.0,0,1,1500,,,\n2,200,0.1,2,nan,0,1,4500,2,2.8,0\n")
    plot_log.main([str(log), "--out", out])
    assert "1 bits/byte values that are not numbers" in capsys.readouterr().err
    svg = open(out).read()
    assert "nan" not in svg and svg.count("<circle") == 1  # the val dot of step 2 is a number: kept
    plot_log.main([str(log), "--out", out, "--x", "time"])
    svg = open(out).read()
    ticks = re.findall(r'text-anchor="middle">([0-9.]+)</text>', svg)
    assert ticks == ["0.0", "0.0", "0.0", "0.1", "0.1", "0.1"] and "minutes of training" in svg
    circle_x = float(re.search(r'<circle cx="([0-9.]+)"', svg).group(1))
    assert circle_x == pytest.approx(720 - 20)  # step 2 ends at 6 s = 0.1 min, the right end of the axis
    log.write_text(header + "1,100,0.1,2,3.0,0,1,inf,,,\n2,200,0.1,2,2.9,0,1,1500,,,\n")  # a clock that jumped
    plot_log.main([str(log), "--out", out, "--x", "time"])
    assert "nan" not in open(out).read() and "inf" not in open(out).read()
    log.write_text(header + "0,0,0.1,2,3.0,0,1,,,,\n")
    plot_log.main([str(log), "--out", out])
    assert open(out).read().count("<polyline") == 1
    log.write_text(header + "1,100,0.1,2,nan,0,1,1,,,\n")
    with pytest.raises(SystemExit) as exit_info:
        plot_log.main([str(log), "--out", out])
    assert str(exit_info.value.code).startswith("error: ") and "no training rows with a bits/byte" in str(exit_info.value.code)


# ----------------------------------------------------------------------------
# explain.py: a text's bits and each block's memory, as one HTML page

class PageReader(html.parser.HTMLParser):
    """Every tag's attributes, and the <span>s of the page's text (attributes, content) in order."""

    def __init__(self):
        super().__init__()
        self.tags, self.text_spans, self.in_text = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self.in_text = self.in_text or attrs.get("class") == "text"
        if self.in_text and tag == "span":
            self.text_spans.append([attrs, ""])

    def handle_endtag(self, tag):
        self.in_text = self.in_text and tag != "div"  # the text's <div> holds nothing but spans

    def handle_data(self, data):
        if self.in_text and self.text_spans:
            self.text_spans[-1][1] += data.strip("\n")  # a newline follows the ↵ that shows it


def tiny_checkpoint(path, seed=3):
    cfg = mora.Config(d_model=8, n_layers=2, seq_len=16, batch_size=4)
    mora.save_checkpoint(str(path), perturbed_params(cfg, seed), {"config": mora.asdict(cfg), "step": 7})
    return str(path)


def test_explain_page_shows_the_models_own_bits_and_nothing_external(tmp_path, capsys):
    import explain
    text = made_up_text(2)[:180] + "\nZoë’s café — “yes”.\n".encode("utf-8")  # 2-, 3-byte characters, newlines
    (tmp_path / "story.txt").write_bytes(text)
    ckpt, out = tiny_checkpoint(tmp_path / "m.npz"), tmp_path / "page.html"
    assert explain.main(["--ckpt", ckpt, "--file", str(tmp_path / "story.txt"), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    reader = PageReader()
    reader.feed(page)
    # The model's own per-byte bits: the text in pieces of 7 bytes, the state carried.
    _, params, _, _ = mora.load_checkpoint(ckpt)
    x, state, nats = np.frombuffer(text, np.uint8).astype(np.int32), mora.initial_state(params, 1), []
    for start in range(0, len(x) - 1, 7):
        logits, _, state = mora.model_forward(params, x[start:start + 7, None], state, keep_cache=False)
        targets = x[start + 1:start + 8]
        nats.append(mora.cross_entropy_forward(logits[:len(targets), 0], targets)[0])
    bits = np.concatenate([[0.0], np.concatenate(nats) / math.log(2)])  # byte 0 is predicted by nothing
    # Every character shown once, in order; each carries the sum of its bytes' bits.
    shown = [content for _, content in reader.text_spans]
    assert "".join(shown).replace("↵", "\n") == text.decode("utf-8")
    assert "data-bits" not in reader.text_spans[0][0]
    at, widths = 0, []
    for attrs, content in reader.text_spans:
        width = len(content.replace("↵", "\n").encode("utf-8"))
        if at > 0:
            assert float(attrs["data-bits"]) == pytest.approx(bits[at:at + width].sum(), abs=1e-4), (at, content)
            assert "expected" in attrs["title"] and "%" in attrs["title"]
        at, widths = at + width, widths + [width]
    assert at == len(text) and max(widths) == 3
    assert f"{bits[1:].mean():.3f} bits/byte" in page and "step 7" in page
    # Self-contained: no scripts, styles, images or links from anywhere else.
    assert all(tag not in ("script", "link", "img", "iframe", "object", "embed") for tag, _ in reader.tags)
    assert all(not set(attrs) & {"src", "href", "srcset", "action"} for _, attrs in reader.tags)
    assert "url(" not in page and "@import" not in page and "//" not in page


def test_explain_reads_beta_and_delta_from_the_forward_cache():
    """memory_trace reads each block's beta and e by name from the forward's cache
    (cache.blocks[i].mixer): block 0's against the write rate and delta computed by
    hand from its parameters."""
    import explain
    cfg = mora.Config(d_model=8, n_layers=2)
    params = perturbed_params(cfg, seed=4)
    x = np.frombuffer(b"Once upon a time.", np.uint8).astype(np.int32)
    _, cache, _ = mora.model_forward(params, x[:, None], mora.initial_state(params, 1), keep_cache=True)
    beta, delta = explain.memory_trace(cache)
    assert beta.shape == delta.shape == (2, len(x))
    u, _ = mora.layernorm_forward(params["embed"][x], params["blocks.0.ln1.g"], params["blocks.0.ln1.b"])
    v, z = np.split(u @ params["blocks.0.w_in"] + params["blocks.0.b_in"], 3, axis=-1)[:2]
    rate = 1 / (1 + np.exp(-z))  # (T, d)
    c, e = np.zeros(8), np.zeros_like(v)
    for t in range(len(x)):  # c_t = c_{t-1} + beta_t (v_t - c_{t-1})
        e[t] = v[t] - c
        c = c + rate[t] * e[t]
    assert np.allclose(beta[0], rate.mean(-1)) and np.allclose(delta[0], np.abs(e).mean(-1))


def test_explain_caps_long_texts_and_bad_input_is_one_line(tmp_path, capsys):
    import explain
    ckpt = tiny_checkpoint(tmp_path / "m.npz")
    out = tmp_path / "page.html"
    assert explain.main(["--ckpt", ckpt, "--text", "a b c " * 50, "--max-bytes", "100", "--out", str(out)]) == 0
    assert "the first 100 bytes of the text" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8").count("data-bits=") == 99 and "--max-bytes caps it" in out.read_text(encoding="utf-8")

    def error_of(*args):
        return one_error_line(capsys, explain.main([str(a) for a in args]))

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "no checkpoint" in error_of("--ckpt", tmp_path / "none.npz", "--text", "Once", "--out", out)
    assert "is not a MORA checkpoint" in error_of("--ckpt", tmp_path / "junk.npz", "--text", "Once", "--out", out)
    assert "fewer than 2 bytes" in error_of("--ckpt", ckpt, "--text", "", "--out", out)
    assert "fewer than 2 bytes" in error_of("--ckpt", ckpt, "--file", tmp_path / "empty.txt", "--out", out)
    assert "cannot read --file" in error_of("--ckpt", ckpt, "--file", tmp_path / "none.txt", "--out", out)
    assert f"the folder {tmp_path / 'no'} does not exist" in error_of("--ckpt", ckpt, "--text", "Once", "--out",
                                                                      tmp_path / "no" / "page.html")
    assert "--max-bytes 1" in error_of("--ckpt", ckpt, "--text", "Once", "--max-bytes", 1, "--out", out)


def test_explain_reads_no_more_than_max_bytes_and_never_writes_over_its_inputs(tmp_path, capsys):
    import explain
    import tracemalloc
    ckpt, story, out = tmp_path / "m.npz", tmp_path / "story.txt", tmp_path / "page.html"
    tiny_checkpoint(ckpt)
    with open(story, "wb") as f:  # 256 MB that take no disk: a read of it all would take the memory
        f.truncate(256 << 20)
    tracemalloc.start()
    try:
        assert explain.main(["--ckpt", str(ckpt), "--file", str(story), "--max-bytes", "100", "--out", str(out)]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20 and out.read_text(encoding="utf-8").count("data-bits=") == 99
    capsys.readouterr()
    story.write_text("Once upon a time")
    os.mkfifo(tmp_path / "fifo.html.tmp")  # its write would wait for a reader for ever: one reads, so a bug fails, not hangs
    reader = os.open(tmp_path / "fifo.html.tmp", os.O_RDONLY | os.O_NONBLOCK)
    for given, why in ((["--text", "Once", "--out", ckpt], "also an input"), (["--file", story, "--out", story], "also an input"),
                       (["--text", "Once", "--out", tmp_path], "is a folder"),
                       (["--text", "Once", "--out", tmp_path / "fifo.html"], "not a regular file")):
        before = {path: path.read_bytes() for path in (ckpt, story)}
        err = one_error_line(capsys, explain.main(["--ckpt", str(ckpt)] + [str(a) for a in given]))
        assert why in err and "--out" in err, err
        assert before == {path: path.read_bytes() for path in (ckpt, story)}
    os.close(reader)


def test_explain_summary_and_strips_follow_their_definitions(tmp_path):
    """The summary's bits/byte is the mean of -log2 p over every byte but the first (the
    model reading the text as one sequence); β's heat map shades beta and |e|'s shades
    delta, each block's strip scaled from its 2nd to its 98th percentile on the text,
    averaged over a character's bytes and cut at STRIP_EDGES."""
    import explain
    text = "Once upon a time, a café.\nThe end.".encode("utf-8")
    ckpt, out = tiny_checkpoint(tmp_path / "m.npz"), tmp_path / "page.html"
    assert explain.main(["--ckpt", ckpt, "--text", text.decode("utf-8"), "--out", str(out)]) == 0
    _, params, _, _ = mora.load_checkpoint(ckpt)
    x = np.frombuffer(text, np.uint8).astype(np.int64)
    z = mora.forward(params, x[None, :-1])[0].astype(np.float64)  # (T - 1, V) logits of the bytes after the first
    z -= z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    mean_bits = -log_p[np.arange(len(x) - 1), x[1:]].mean() / math.log(2)
    assert f"<b>{mean_bits:.3f} bits/byte</b> over the {len(x) - 1:,} bytes predicted" in out.read_text(encoding="utf-8")

    chars = explain.characters(text)
    beta, delta = np.random.default_rng(5).random((2, 2, len(text)))  # independent: a strip drawn from the other shows
    page = explain.memory_section(chars, beta, delta)

    def shades(values, kind, i, line):
        low, high = np.percentile(values[i], [2, 98])
        scaled = np.clip((values[i] - low) / (high - low), 0, 1)
        return [f"{kind}{np.sum(explain.STRIP_EDGES <= scaled[start:end].mean())}" for start, end, _ in line]
    expected = [shade for line in explain.lines_of(chars) for kind, values in (("r", beta), ("e", delta))
                for i in range(2) for shade in shades(values, kind, i, line)]  # per line: β's strips, then |e|'s
    assert re.findall(r'<i class="([re]\d)"></i>', page) == expected


def test_explain_ctrl_c_is_one_line_and_leaves_the_page_as_it_was(tmp_path, monkeypatch, capsys):
    import explain
    ckpt, out = tiny_checkpoint(tmp_path / "m.npz"), tmp_path / "page.html"
    out.write_text("an earlier page")
    explain_once = ["--ckpt", ckpt, "--text", "Once upon a time", "--out", str(out)]

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(explain, "read_text", interrupted)  # Ctrl-C while the model reads the text
    assert explain.main(explain_once) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: no page was written") and "\n" not in err
    assert out.read_text() == "an earlier page" and sorted(os.listdir(tmp_path)) == ["m.npz", "page.html"]
    monkeypatch.undo()

    class Interrupting:
        def write(self, text):
            raise KeyboardInterrupt
    real = mora.written_atomically

    @contextlib.contextmanager
    def interrupted_while_writing(path, *args, **kwargs):
        with real(path, *args, **kwargs) as f:
            f.write("half a pa")  # into the temporary file, then Ctrl-C
            yield Interrupting()
    monkeypatch.setattr(mora, "written_atomically", interrupted_while_writing)
    assert explain.main(explain_once) == 130
    assert out.read_text() == "an earlier page" and sorted(os.listdir(tmp_path)) == ["m.npz", "page.html"]


if __name__ == "__main__":
    # `CUPY_TF32=0 python test_mora.py`: the full-float32 check of the fused kernels,
    # on the GPU (or the stand-in, in child_env), printed as one JSON line.
    print(json.dumps(full_float32_check()))

