"""Tests for MORA: gradients against finite differences, the recurrence against the
full forward, Adam against its formula, data preparation, training end to end,
exact resume, and the errors a user sees.  Run: python -m pytest -q test_mora.py

Everything here makes its own small text: no network, no ../shared."""
import http.server
import math
import os
import subprocess
import sys
import threading

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


# ----------------------------------------------------------------------------
# The model

def test_parameter_counts():
    assert mora.count_params(mora.Config()) == 284_184
    assert mora.count_params(mora.Config(d_model=128)) == 1_092_632
    params = mora.init_params(mora.Config(), 0)
    assert sum(p.size for p in params.values()) == 284_184
    assert all(p.dtype == np.float32 for p in params.values())
    assert params["blocks.7.w_in"].shape == (64, 192) and params["blocks.7.mix"].tolist() == [0, 0, 1]


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


def test_pick_byte_respects_top_k():
    logits = np.arange(256, dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {mora.pick_byte(logits, 5.0, 3, rng) for _ in range(200)} <= {253, 254, 255}
    assert mora.pick_byte(logits, 0, 0, rng) == 255


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


def test_clip_and_schedule():
    g = np.array([3.0, 4.0])
    assert float(mora.clip_by_global_norm(g, 1.0)) == 5.0 and np.allclose(g, [0.6, 0.8])
    assert mora.learning_rate(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert mora.learning_rate(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert mora.learning_rate(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


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
        assert len(mora.row_slices(5, slices.count)) == count
        sliced_loss, sliced_accuracy, sliced_grad = slices.gradient(params, x, y)
        assert abs(float(sliced_loss) - float(loss)) < 1e-6 and float(sliced_accuracy) == pytest.approx(float(accuracy))
        assert relative_error(sliced_grad.astype(np.float64), grad.astype(np.float64)) < 1e-5
        assert np.abs(sliced_grad - grad).max() < 1e-6
        assert mora.evaluate(params, records, 5, slices)["loss"] == pytest.approx(float(loss), abs=1e-6)
        slices.shutdown()


def test_a_step_gives_the_same_bits_on_any_number_of_threads():
    """The batch's slices are fixed by the run; threads only share them out."""
    params = mora.init_params(mora.Config(d_model=8, n_layers=2), 0, mix=(0.5, -0.7, 1.0))
    records = np.random.default_rng(1).integers(0, 256, (6, 33)).astype(np.uint8)
    x, y = mora.make_batch(records, np.arange(6), np)
    results = []
    for threads in (1, 2, 3):
        slices = mora.cpu_slices(np, threads, 3)
        results.append(slices.gradient(params, x, y))
        slices.shutdown()
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


def test_enwik8_split_from_a_zip(tmp_path, http_server, monkeypatch, capsys):
    import io
    import zipfile
    monkeypatch.setattr(prepare_data, "ENWIK8_SPLIT", {"train": 900, "val": 50, "test": 50})  # enwik8 in small
    text = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", text)
    RangeHandler.FILES = {"enwik8.zip": archive.getvalue()}
    out = tmp_path / "data"
    assert prepare_data.main(["--dataset", "enwik8", "--out-dir", str(out), "--url-base", http_server]) == 0
    assert (out / "train.bin").read_bytes() == text[:900] and (out / "val.bin").read_bytes() == text[900:950]
    assert (out / "test.bin").read_bytes() == text[950:]
    RangeHandler.FILES = {"enwik8.zip": archive.getvalue()[:-100]}  # a damaged archive: one line
    (out / "enwik8").unlink()
    (out / "enwik8.zip").write_bytes(archive.getvalue()[:-100])
    assert prepare_data.main(["--dataset", "enwik8", "--out-dir", str(out), "--url-base", http_server]) == 1
    assert "not the enwik8 archive" in capsys.readouterr().err


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
    assert "no such file" in error_of("--out-dir", tmp_path / "o", "--input-train", tmp_path, "--input-val", text)


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
    _, p_straight, meta, opt_straight = mora.load_checkpoint(str(straight))
    _, p_split, _, opt_split = mora.load_checkpoint(str(split))
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
    _, p_straight, meta, opt_straight = mora.load_checkpoint(str(straight))
    _, p_split, meta_split, opt_split = mora.load_checkpoint(str(split))
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
    mora.save_checkpoint(path, params, {"config": mora.asdict(cfg), "step": 5}, m, 2 * m)
    cfg2, params2, meta, opt = mora.load_checkpoint(path)
    assert cfg2 == cfg and meta["step"] == 5 and np.array_equal(opt["adam.v"], 2 * m)
    assert all(np.array_equal(params[k], params2[k]) for k in params)
    with np.load(path) as f:  # plain NumPy reads the weights by name
        assert np.array_equal(f["blocks.1.w_up"], params["blocks.1.w_up"])


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
    for split in ("train.bin", "val.bin"):  # other data: the order would not continue
        (short / split).write_bytes(made_up_text(200, seed=9))
    assert "trained on" in error_of("train", "--data-dir", short, "--ckpt", ckpt, "--resume", "--device", "cpu")
    assert "empty" in error_of("sample", "--ckpt", ckpt, "--prompt", "", "--device", "cpu")
    assert run_main("sample", "--ckpt", ckpt, "--prompt", "\udcffé", "--length", 5, "--device", "cpu") == 0  # any bytes
    capsys.readouterr()
    data = ckpt.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    assert "corrupt" in error_of("eval", "--ckpt", tmp_path / "cut.npz", "--data-dir", data_dir, "--device", "cpu")
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    assert "corrupt" in error_of("sample", "--ckpt", tmp_path / "junk.npz", "--device", "cpu")
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
# Matmuls round their inputs to TF32 (a 10-bit mantissa), as a GPU's tensor cores do
# unless CUPY_TF32=0.  Where CuPy finds a real GPU, the same tests run on it instead.

@pytest.fixture(scope="session")
def compiled_kernels(tmp_path_factory):
    """compile(code, options): one of mora's CUDA sources compiled as C++ (with its -D
    options), once per session: each kernel NAME gets run_NAME(grid, block, its
    parameters...), which calls it for every block and thread in turn.  Returns
    (library, name -> parameter C types)."""
    folder, compiled = tmp_path_factory.mktemp("kernels"), {}

    def compile(code, options):
        if (code, options) not in compiled:
            compiled[code, options] = compile_as_cpp(code, options, folder / f"kernels{len(compiled)}.so")
        return compiled[code, options]
    return compile


def compile_as_cpp(code, options, path):
    import ctypes
    import re
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
    result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", *options, "-x", "c++", "-", "-o", str(path)],
                            input=prelude + code + "\n".join(wrappers), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
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


@pytest.fixture(scope="session")
def kernels_on_cpu(compiled_kernels):
    """Run a kernel over n_threads threads (one per block), NumPy arrays for pointers;
    width: the model width, for the kernels of BLOCK_SOURCE."""
    def run(name, n_threads, *args, width=None):
        code = mora.CUDA_SOURCE if width is None else mora.BLOCK_SOURCE
        run_compiled(compiled_kernels(code, mora.kernel_options(width)), name, n_threads, 1, args)
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
        if ufunc is np.matmul and os.environ.get("CUPY_TF32") == "1":
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


class StandInCupy:
    """The slice of the cupy module that mora.py uses, on the CPU."""
    __version__ = "stand-in"
    ndarray = DeviceArray
    FILLS = ("zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like")

    def __init__(self, compiled):
        import types
        self.compiled, self.launches = compiled, 0
        DeviceArray.cupy = self
        total = 24 << 30
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (total, total),
                                          getDeviceProperties=lambda i: {"name": b"CPU stand-in for CuPy"}),
            Device=lambda: types.SimpleNamespace(id=0))

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


def test_cross_entropy_kernels_match_plain_twin(kernels_on_cpu):
    rng = np.random.default_rng(4)
    rows = 9
    logits, y = (3 * rng.standard_normal((rows, mora.V))).astype(np.float32), rng.integers(0, mora.V, rows).astype(np.int32)
    logits[0, y[0]] = logits[0].max() + 1  # one right prediction
    losses, correct, cache = mora.cross_entropy_forward(logits, y)
    dlogits = mora.cross_entropy_backward(0.25, cache)
    out = {k: np.zeros(shape, np.float32) for k, shape in [("probs", logits.shape), ("losses", rows), ("correct", rows),
                                                            ("dlogits", logits.shape)]}
    kernels_on_cpu("cross_entropy_forward", rows, logits, y, rows, mora.V, out["probs"], out["losses"], out["correct"])
    kernels_on_cpu("cross_entropy_backward", logits.size, out["probs"], y, logits.size, mora.V, 0.25, out["dlogits"])
    assert np.allclose(out["losses"], losses, atol=1e-5) and np.array_equal(out["correct"], correct.astype(np.float32))
    assert np.allclose(out["dlogits"], dlogits, atol=1e-6) and out["correct"][0] == 1


def test_adam_kernel_matches_plain_twin(kernels_on_cpu):
    rng = np.random.default_rng(3)
    p, g, m, v = (rng.standard_normal(100).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    plain = [a.copy() for a in (p, g, m, v)]
    mora.adam_update(plain[0], plain[1], plain[2], plain[3], 7, 0.01, 0.9, 0.95, 1e-8)
    kernels_on_cpu("adam_update", 100, p, g, m, v, 100, 0.01, 0.9, 0.95, 1e-8, 1 - 0.9 ** 7, 1 - 0.95 ** 7)
    for kernel, twin in zip((p, m, v), (plain[0], plain[2], plain[3])):
        assert np.allclose(kernel, twin, rtol=1e-5, atol=1e-7)


def fused_against_plain(device, monkeypatch):
    """(loss difference, worst relative gradient gap) between the fused kernels and the
    plain array code, both on `device`, for a model whose every path matters."""
    cfg = mora.Config(d_model=16, n_layers=2)
    params = {k: device.asarray(p) for k, p in mora.init_params(cfg, 0, mix=(0.5, -0.7, 1.0)).items()}
    rng = np.random.default_rng(0)
    x, y = device.asarray(rng.integers(0, 256, (4, 64))), device.asarray(rng.integers(0, 256, (4, 64)))
    fused_loss, fused = mora.loss_and_grads(params, x, y)
    monkeypatch.setattr(mora, "USE_KERNELS", False)
    plain_loss, plain = mora.loss_and_grads(params, x, y)
    monkeypatch.setattr(mora, "USE_KERNELS", True)
    gaps = [relative_error(device.asnumpy(fused[k]).astype(np.float64), device.asnumpy(plain[k]).astype(np.float64)) for k in plain]
    return abs(fused_loss - plain_loss), max(gaps)


def test_gpu_kernels_match_plain_path(gpu, monkeypatch):
    """Both paths run the same TF32 matmuls, but on inputs that differ by float32
    rounding, which TF32's 10-bit mantissa magnifies to ~1e-3 relative: the tolerances
    hold that (measured on the stand-in with TF32: loss 2.6e-5, gradients 2.3e-3)."""
    loss_gap, gradient_gap = fused_against_plain(gpu, monkeypatch)
    assert loss_gap < 5e-4 and gradient_gap < 2e-2


def test_gpu_kernels_match_plain_path_in_full_float32(stand_in, monkeypatch):
    """Without TF32 the fused kernels agree with the plain path to float32 rounding."""
    monkeypatch.setenv("CUPY_TF32", "0")
    loss_gap, gradient_gap = fused_against_plain(stand_in, monkeypatch)
    assert loss_gap < 1e-5 and gradient_gap < 1e-4


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


def test_mixer_kernels_match_plain_twin(kernels_on_cpu):
    rng = np.random.default_rng(0)
    T, B, d = 12, 3, 5
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    vbq, mix, c_init, sum_init = f32(T, B, 3 * d), f32(3), f32(B, d), f32(B, d)
    state = (c_init, sum_init, 4)
    gated, cache, (c_last, sum_last, count) = mora.mixer_forward(vbq, mix, state)
    out = {k: np.zeros((T, B, d), np.float32) for k in ("gated", "c", "a")}
    last = {k: np.zeros((B, d), np.float32) for k in ("c", "sum")}
    kernels_on_cpu("mixer_forward", B * d, vbq, mix, c_init, sum_init, 4.0, T, B, d,
                   out["gated"], out["c"], out["a"], last["c"], last["sum"])
    assert np.allclose(out["gated"], gated, atol=1e-5) and np.allclose(last["c"], c_last, atol=1e-5)
    assert np.allclose(last["sum"], sum_last, atol=1e-5) and count == 4 + T
    dgated = f32(T, B, d)
    dvbq, dmix = mora.mixer_backward(dgated, cache)
    kernel_dvbq, parts = np.zeros_like(vbq), np.zeros((3, B * d), np.float32)
    kernels_on_cpu("mixer_backward", B * d, dgated, vbq, mix, c_init, out["c"], out["a"], 4.0, T, B, d, kernel_dvbq, parts)
    assert np.allclose(kernel_dvbq, dvbq, atol=1e-4) and np.allclose(parts.sum(1), dmix, atol=1e-4)


def test_layernorm_kernels_match_plain_twin(kernels_on_cpu):
    rng = np.random.default_rng(1)
    rows, d = 7, 6
    x, dy = (rng.standard_normal((rows, d)).astype(np.float32) for _ in range(2))
    xhat, cache = mora.layernorm_forward(x)
    kernel_xhat, kernel_dx, rstd = np.zeros((rows, d), np.float32), np.zeros((rows, d), np.float32), np.zeros((rows, 1), np.float32)
    kernels_on_cpu("layernorm_forward", rows, x, rows, d, kernel_xhat, rstd)
    kernels_on_cpu("layernorm_backward", rows, dy, kernel_xhat, rstd, rows, d, kernel_dx)
    assert np.allclose(kernel_xhat, xhat, atol=1e-5) and np.allclose(rstd, cache[1], rtol=1e-5)
    assert np.allclose(kernel_dx, mora.layernorm_backward(dy, cache)[0], atol=1e-5)


def block_case(d, rows, seed=2):
    """A block's parameters with every number random (gains and biases too), and a
    residual stream of `rows` positions, float32."""
    rng = np.random.default_rng(seed)
    p = {name: (rng.standard_normal(shape) * (0.5 if name.startswith("w_") else 1.0)).astype(np.float32)
         for name, shape in mora.block_shapes(d).items()}
    return p, rng.standard_normal((rows, d)).astype(np.float32) * 2 + 1, rng


def kernel_outputs(rows, **widths):
    return {name: np.zeros((rows, k), np.float32) for name, k in widths.items()}


def test_block_input_kernels_match_plain_twin(kernels_on_cpu):
    d, rows = 5, 9
    p, h, rng = block_case(d, rows)
    vzq, cache = mora.block_input_forward(p, h)
    dvzq = rng.standard_normal((rows, 3 * d)).astype(np.float32)
    dh, grads = mora.block_input_backward(dvzq, cache)
    out = kernel_outputs(rows, u=d, xhat=d, rstd=1, vzq=3 * d, dh=d, partial=5 * d)
    kernels_on_cpu("block_input_forward", rows, h, p["ln1.g"], p["ln1.b"], p["w_in"], p["b_in"], rows,
                   out["u"], out["xhat"], out["rstd"], out["vzq"], width=d)
    kernels_on_cpu("block_input_backward", rows, dvzq, out["xhat"], out["rstd"], p["ln1.g"], p["w_in"], rows,
                   out["dh"], out["partial"], width=d)
    sums = out["partial"].sum(0)
    assert np.allclose(out["vzq"], vzq, atol=1e-5) and np.allclose(out["dh"], dh, atol=1e-4)
    kernel_grads = {"ln1.g": sums[:d], "ln1.b": sums[d:2 * d], "b_in": sums[2 * d:], "w_in": out["u"].T @ dvzq}
    for name, kernel in kernel_grads.items():
        assert np.allclose(kernel, grads[name], atol=1e-4), name


def test_block_output_kernels_match_plain_twin(kernels_on_cpu):
    d, rows = 5, 9
    p, h, rng = block_case(d, rows)
    gated, dh = (rng.standard_normal((rows, d)).astype(np.float32) for _ in range(2))
    h_out, cache = mora.block_output_forward(p, h, gated)
    dgated, dh_mid, grads = mora.block_output_backward(dh, cache)
    out = kernel_outputs(rows, h_out=d, xhat=d, rstd=1, u2=d, pre=2 * d, t=2 * d, act=2 * d,
                         dgated=d, dh_mid=d, dpre=2 * d, partial=6 * d)
    kernels_on_cpu("block_output_forward", rows, h, gated, p["w_out"], p["b_out"], p["ln2.g"], p["ln2.b"], p["w_up"],
                   p["b_up"], p["w_down"], p["b_down"], rows, out["h_out"], out["xhat"], out["rstd"], out["u2"],
                   out["pre"], out["t"], out["act"], width=d)
    kernels_on_cpu("block_output_backward", rows, dh, out["pre"], out["t"], out["xhat"], out["rstd"], p["ln2.g"],
                   p["w_up"], p["w_down"], p["w_out"], rows, out["dgated"], out["dh_mid"], out["dpre"], out["partial"],
                   width=d)
    sums = out["partial"].sum(0)
    assert np.allclose(out["h_out"], h_out, atol=1e-4)
    assert np.allclose(out["dgated"], dgated, atol=1e-4) and np.allclose(out["dh_mid"], dh_mid, atol=1e-4)
    kernel_grads = {"ln2.g": sums[:d], "ln2.b": sums[d:2 * d], "b_up": sums[2 * d:4 * d], "b_out": sums[4 * d:5 * d],
                    "b_down": sums[5 * d:], "w_down": out["act"].T @ dh, "w_up": out["u2"].T @ out["dpre"],
                    "w_out": gated.T @ out["dh_mid"]}
    for name, kernel in kernel_grads.items():
        assert np.allclose(kernel, grads[name], atol=1e-4), name


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
    with mora.StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested  # the first: stop after the step under way
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
    assert "interrupted" in capsys.readouterr().err
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
    lock = mora.lock_checkpoint(str(ckpt))  # this process trains it
    proc = start_training(data_dir, ckpt, "--max-steps", 2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"process {os.getpid()}" in err and err.count("\n") == 1 and out == ""
    lock.close()  # as when that process dies: the lock file stays, with its dead holder's pid
    assert (tmp_path / "m.npz.lock").exists()
    assert run_main("train", "--data-dir", data_dir, "--ckpt", ckpt, *TINY, "--device", "cpu", "--max-steps", 2) == 0


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


def test_resume_refuses_other_data_of_the_same_size(tmp_path, capsys):
    """train.bin rebuilt from the same files in another order (same size), or another val.bin, is refused;
    a checkpoint written without a record of its data still resumes on data of the right size."""
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
    cfg, params, meta, adam = mora.load_checkpoint(str(ckpt))
    del meta["data"]["files"]  # as a checkpoint written before checkpoints recorded their data
    mora.save_checkpoint(str(ckpt), params, meta, adam["adam.m"], adam["adam.v"])
    assert run_main(*train, "--data-dir", reordered, "--resume", "--stop-after", 1) == 0  # only the size can be checked
    assert mora.load_checkpoint(str(ckpt))[2]["step"] == 3


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
    assert "cannot create the folder" in error_of(*train, "--ckpt", tmp_path / "file" / "m.npz")
    (tmp_path / "folder.npz").mkdir()
    assert "is a folder" in error_of(*train, "--ckpt", tmp_path / "folder.npz", "--overwrite")
    assert "own log" in error_of(*train, "--ckpt", tmp_path / "m.csv")
    bad_data = tmp_path / "bad"
    (bad_data / "train.bin").mkdir(parents=True)
    assert "not a file" in error_of("train", "--data-dir", bad_data, "--ckpt", tmp_path / "x.npz", "--device", "cpu")

    savez, saves = np.savez, []

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    assert run_main(*train, "--ckpt", tmp_path / "full.npz") == 1
    err = capsys.readouterr().err.split("\r")[-1].split("\n", 1)[-1]  # after the progress bar
    assert err.startswith("error: ") and err.count("\n") == 1 and "No space left" in err and not (tmp_path / "full.npz.tmp").exists()
    assert "no checkpoint of this run was saved" in err and "start it again" in err  # a first save: nothing to resume

    def full_from_the_second_save(*args, **kwargs):
        saves.append(args)
        return savez(*args, **kwargs) if len(saves) == 1 else disk_full()
    monkeypatch.setattr(np, "savez", full_from_the_second_save)
    err = one_error_line(capsys, run_main(*train, "--ckpt", tmp_path / "later.npz", "--max-steps", 4, "--ckpt-every", 2),
                         after_progress=True)
    assert "still holds step 2" in err and "--resume" in err


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
    cfg, params, meta, adam = mora.load_checkpoint(str(ckpt))
    assert "contradict" in error_of("train", "--data-dir", data_dir, "--ckpt", ckpt, "--resume", "--overwrite")
    broken = dict(params, embed=np.full_like(params["embed"], np.nan))
    mora.save_checkpoint(str(tmp_path / "nan.npz"), broken, meta, adam["adam.m"], adam["adam.v"])
    assert "non-finite" in error_of("eval", "--ckpt", tmp_path / "nan.npz", "--data-dir", data_dir, "--device", "cpu")
    assert "non-finite" in error_of("sample", "--ckpt", tmp_path / "nan.npz", "--device", "cpu")
    mora.save_checkpoint(str(tmp_path / "key.npz"), params, dict(meta, config=dict(meta["config"], colour="red")))
    assert "does not know" in error_of("sample", "--ckpt", tmp_path / "key.npz", "--device", "cpu")
    mora.save_checkpoint(str(tmp_path / "adam.npz"), params, meta, adam["adam.m"][:-1], adam["adam.v"])
    assert "wrong size" in error_of("train", "--data-dir", data_dir, "--ckpt", tmp_path / "adam.npz", "--resume", "--device", "cpu")
    short = tmp_path / "short"
    short.mkdir()
    (short / "val.bin").write_bytes(b"x" * 10)
    err = error_of("eval", "--ckpt", ckpt, "--data-dir", short, "--device", "cpu")
    assert "evaluate on more text" in err and "--seq-len" not in err  # eval has no --seq-len to suggest
    assert "--d-model" in error_of("train", "--data-dir", data_dir, "--ckpt", tmp_path / "huge.npz", "--device", "cpu",
                                   "--d-model", 100000)


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


def test_readme_install_line_installs_the_test_runner():
    readme, requirements = (open(os.path.join(HERE, f)).read() for f in ("README.md", "requirements.txt"))
    assert "pip install -r requirements.txt" in readme and "python -m pytest" in readme
    assert any(line.startswith("pytest") for line in requirements.splitlines())


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
    assert run_main(*evaluate, "--stream", "--streams", 3, "--max-bytes", 1000) == 0
    out = capsys.readouterr().out
    assert "3 streams side by side" in out and "999 bytes predicted" in out
    assert run_main(*evaluate, "--stream", "--max-bytes", 10, "--streams", 1) == 0  # shorter than a chunk of 16
    out = capsys.readouterr().out
    assert "nan" not in out and "1 stream," in out and "9 bytes predicted" in out
    err = one_error_line(capsys, run_main(*evaluate, "--max-bytes", 10))  # less than one record of 17 bytes
    assert "--max-bytes 10" in err and "17" in err and "--stream" in err
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert run_main(*evaluate, "--max-bytes", 100, "--threads", 4 * cores) == 0
    assert f"more than the {cores} cores" in capsys.readouterr().err


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


def test_bench_counts_kernel_launches_on_the_stand_in(stand_in, capsys):
    """bench prints the launches of one training step of the small model: at most 150 (the GPU target)."""
    assert run_main("bench", "--batch-size", 2, "--seq-len", 8, "--steps", 1, "--device", "gpu") == 0
    out = capsys.readouterr().out
    launches = int(out.split("kernel launches per training step: ")[1].split()[0])
    assert 0 < launches <= 150, launches
