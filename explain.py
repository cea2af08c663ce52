"""What a trained MORA model makes of a text, as one self-contained HTML page.

    python explain.py --ckpt checkpoints/mora.npz --text "Once upon a time ..." --out explain.html
    python explain.py --ckpt checkpoints/mora.npz --file story.txt [--max-bytes 4000] --out explain.html

The text is read as one stream, the state carried from its first byte (as sampling
and `mora.py eval --stream` do).  The page shows:
  1. the text, each character shaded by the bits the model paid for it,
     -log2 p(byte | every byte before it); hovering shows what it expected instead;
  2. under each line of the text, what every block's memory did at each byte: its
     write rate beta (how much of the memory was rewritten) and the size of its
     delta |e| (how far the byte was from what the memory held);
  3. a summary: bits/byte, bits by position, each block's mean write rate and mix.
The page uses inline CSS only: it opens from disk in any browser.  NumPy and the
standard library only; the model is mora.py's.
"""
import argparse
import html
import math
import os
import sys

import numpy as np

import mora

CHUNK = 1024  # bytes per forward pass: the state is carried, so only the memory used depends on it
TOP_K = 5  # the likeliest next bytes a tooltip names
COLUMNS = 120  # characters per line in the memory view
# Bits shading: upper edges of the classes and their colours (ColorBrewer YlOrRd).
BITS_EDGES = [0.5, 1, 2, 3, 4, 6, 8]
BITS_COLOURS = ["#ffffff", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#b10026"]
# Memory strips: 8 classes each (ColorBrewer Blues for beta, Greens for |e|).
BETA_COLOURS = ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c"]
DELTA_COLOURS = ["#f7fcf5", "#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45", "#006d2c"]
STRIP_EDGES = np.linspace(0, 1, 9)[1:-1]  # 1/8, 2/8, ... 7/8


def memory_trace(cache):
    """Per block, the write rate beta and the delta e at every byte, each averaged over
    the block's d channels, read from the cache of `mora.model_forward` on one stream
    (B = 1): cache.blocks[i].mixer (a mora.MixerCache) holds block i's beta and e,
    (T, 1, d) each.  Returns mean beta and mean |e|, (L, T) each."""
    mixers = [block.mixer for block in cache.blocks]
    return (np.stack([mixer.beta[:, 0].mean(-1) for mixer in mixers]),
            np.stack([np.abs(mixer.e[:, 0]).mean(-1) for mixer in mixers]))


def read_text(params, data):
    """The model reads `data` (bytes) as one stream, CHUNK bytes per forward pass with
    the state carried.  Returns bits (T,): the bits paid for each byte (nan for byte 0,
    which nothing predicts); top (T, TOP_K, 2): the likeliest bytes before each byte and
    their probabilities; beta, delta (L, T): `memory_trace`."""
    x = np.frombuffer(data, dtype=np.uint8).astype(np.int32)  # (T,)
    state = mora.initial_state(params, 1)
    bits, top, beta, delta = [np.array([np.nan])], [np.zeros((1, TOP_K, 2))], [], []
    for start in range(0, len(x), CHUNK):
        chunk, targets = x[start:start + CHUNK], x[start + 1:start + CHUNK + 1]  # the last chunk has one target less
        logits, cache, state = mora.model_forward(params, chunk[:, None], state, keep_cache=True)  # (t, 1, V)
        nats, _, ce_cache = mora.cross_entropy_forward(logits[:len(targets), 0], targets)
        probs = ce_cache.probs  # (t, V)
        best = np.argsort(-probs, axis=1)[:, :TOP_K]  # (t, TOP_K) byte values, likeliest first
        bits.append(nats / math.log(2))
        top.append(np.stack([best, np.take_along_axis(probs, best, 1)], axis=-1))
        b, e = memory_trace(cache)
        beta.append(b)
        delta.append(e)
    return (np.concatenate(bits).astype(np.float64), np.concatenate(top),
            np.concatenate(beta, axis=1), np.concatenate(delta, axis=1))


def characters(data):
    """The bytes cut into UTF-8 characters: (first byte, end, the character as text).
    A byte that starts no valid character (a damaged or cut sequence) stands alone as U+FFFD."""
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        n = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        try:
            out.append((i, i + n, data[i:i + n].decode("utf-8")))
        except UnicodeDecodeError:
            n = 1
            out.append((i, i + 1, "\ufffd"))
        i += n
    return out


def show_byte(b):
    """A byte as a tooltip names it: the character, or a symbol for space and newline, or hex."""
    return {32: "␣", 10: "↵", 9: "⇥"}.get(b, chr(b) if 32 < b < 127 else f"0x{b:02X}")


def shown(ch):
    """A character as the page prints it: a newline as a visible ↵ (the line break follows it)."""
    return "↵" if ch == "\n" else html.escape(ch)


def level(value, edges):
    return int(np.searchsorted(edges, value, side="right"))


def text_section(data, chars, bits, top):
    """Part 1: one <span> per character, shaded by its bits, with data-bits and a tooltip."""
    spans = []
    for start, end, ch in chars:
        paid = bits[start:end][~np.isnan(bits[start:end])]  # byte 0 of the text is not predicted
        if start == 0:  # the text's first character: nothing before it predicts its first byte
            title = "the text's first byte: nothing comes before it to predict it"
            title += f"; the rest of this character cost {paid.sum():.2f} bits" if len(paid) else ""
        else:
            expected = " · ".join(f"{show_byte(int(b))} {p:.1%}" for b, p in top[start])
            note = f" for its {end - start} bytes" if end - start > 1 else ""
            title = (f"{show_byte(data[start]) if end - start == 1 else ch} cost {paid.sum():.2f} bits{note}\n"
                     f"the model expected{' as the first byte' if note else ''}: {expected}")
        attrs = f' title="{html.escape(title)}"'
        if len(paid):
            attrs += f' class="b{level(paid.sum(), BITS_EDGES)}" data-bits="{paid.sum():.4f}"'
        spans.append(f"<span{attrs}>{shown(ch)}</span>" + ("\n" if ch == "\n" else ""))
    legend = "".join(f'<span class="b{k}">{lo}–{hi}</span>' for k, (lo, hi) in
                     enumerate(zip([0] + BITS_EDGES, BITS_EDGES + ["…"])))
    return (f'<h2>1. What each character cost</h2><p class="legend">bits the model paid, −log₂ p(byte | every byte '
            f'before it): {legend} &nbsp;A character of several UTF-8 bytes shows the sum of its bytes\' bits. '
            f'Hover over a character to see what the model expected in its place.</p>'
            f'<div class="text">{"".join(spans)}</div>')


def lines_of(chars):
    """The characters cut into lines of at most COLUMNS: after a newline (a blank line joins
    the line before it), else after the last space."""
    lines, line = [], []
    for c in chars:
        if c[2] == "\n" and not line and lines:
            lines[-1].append(c)
            continue
        line.append(c)
        if c[2] == "\n" or len(line) == COLUMNS:
            spaces = [i for i, x in enumerate(line) if x[2] == " "]
            cut = len(line) if c[2] == "\n" or not spaces else spaces[-1] + 1
            lines.append(line[:cut])
            line = line[cut:]
    return lines + [line] if line else lines


def memory_section(chars, beta, delta):
    """Part 2: each line of the text, and under it two small heat maps, one cell a character
    and one strip a block: beta, then |e|."""
    L = len(beta)
    # A block's mean beta and |e| move in a narrow band around its own level (the channels'
    # rates differ, the mean over them changes less), so each strip is scaled from the block's
    # 2nd to its 98th percentile on this text: the shades show where a block rewrites or is
    # surprised more than it usually does; its level is in the summary's table.  Percentiles,
    # not min and max, so that byte 0 (an empty memory: e = v) does not wash the rest out.
    def spread(values):  # (L, T) -> (L, T) in [0, 1]
        low, high = np.percentile(values, [2, 98], axis=1, keepdims=True)
        return np.clip((values - low) / np.maximum(high - low, 1e-12), 0, 1)

    beta, delta = spread(beta), spread(delta)
    rows = []
    for line in lines_of(chars):
        text = "".join(f"<span>{shown(c[2])}</span>" for c in line)
        maps = []
        for name, kind, values in (("β", "r", beta), ("|e|", "e", delta)):
            strips = "".join('<div class="strip">' + "".join(f'<i class="{kind}{level(values[i, s:e].mean(), STRIP_EDGES)}"></i>'
                                               for s, e, _ in line) + "</div>" for i in range(L))
            maps.append(f'<div class="map"><b><big>{name}</big> blocks<br>0 to {L - 1}</b><div>{strips}</div></div>')
        rows.append(f'<div class="row"><div class="line"><b></b>{text}</div>{"".join(maps)}</div>')  # <b>: the labels' room
    return (f'<h2>2. What each block\'s memory did</h2><p class="legend">Under each line, one strip per block, '
            f'block 0 (the first to read the bytes) on top, block {L - 1} at the bottom: '
            '<span class="r6">β</span> how much of its memory the block rewrote at that byte, then '
            '<span class="e6">|e|</span> how far the byte was from what the memory held (each a mean over the '
            'channels, shaded from the block\'s lowest on this text, white, to its highest, dark). '
            'A dark β column is a reset.</p>'
            + "".join(rows))


def summary_section(cfg, meta, params, data, bits, beta, cut_note):
    """Part 3: bits/byte over the text and by position, the checkpoint, each block's memory."""
    paid = bits[1:]
    by_position = " · ".join(  # the same groups as `mora.py eval` prints, counted from the text's start
        f"{start + 1}{'' if stop == start + 1 else f'–{stop}' if stop else '+'}: {paid[start:stop].mean():.2f}"
        for start, stop in mora.POSITION_GROUPS if start < len(paid))
    x = np.frombuffer(data, dtype=np.uint8)
    kinds = [x == 32, np.isin(x, list(b".,!?;:\"\n")), ~np.isin(x, list(b" .,!?;:\"\n"))]  # space, punctuation, rest
    blocks = "".join(
        f"<tr><td>{i}</td><td>{beta[i].mean():.3f}</td><td>{1 / beta[i].mean():.1f}</td>"
        + "".join(f"<td>{beta[i][k].mean():.3f}</td>" if k.any() else "<td>–</td>" for k in kinds)
        + "".join(f"<td>{m:+.3f}</td>" for m in params[f"blocks.{i}.mix"]) + "</tr>" for i in range(len(beta)))
    seen = meta["step"] * cfg.batch_size * cfg.seq_len
    return (f'<h2>3. Summary</h2><p><b>{paid.mean():.3f} bits/byte</b> over the {len(paid):,} bytes predicted '
            f'(every byte but the first){cut_note}. Checkpoint: step {meta["step"]:,} (about {seen / 1e6:,.1f} MB of text '
            f'seen), width d = {cfg.d_model}, {cfg.n_layers} blocks, {mora.count_params(cfg):,} parameters'
            f'{"" if cfg.ablate == "none" else f", trained with --ablate {cfg.ablate}"}.</p>'
            f'<p>Bits/byte by the number of bytes read before the byte: {by_position}.</p>'
            f'<p>Each block\'s memory: β is its write rate (a memory with rate β keeps a share 1 − β of itself per byte); '
            f'a block whose β is higher at spaces or punctuation than at other bytes clears its memory at word or sentence '
            f'boundaries. mix: how much of the memory c, the running mean a and the delta e the block reads out.</p>'
            f'<table><tr><th>block</th><th>mean β</th><th>1 / mean β: bytes<br>it roughly keeps</th><th>β at<br>spaces</th>'
            f'<th>β at<br>. , ! ? ; : " ↵</th><th>β at other<br>bytes</th><th>mix: c<br>(memory)</th><th>a (running<br>mean)</th>'
            f'<th>e<br>(delta)</th></tr>{blocks}</table>')


STYLE = """body{font:15px/1.5 system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:76em}
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.4em 0 .3em}.legend{font-size:.85em;color:#555}
.legend span{display:inline-block;padding:0 .35em;border:1px solid #ddd}.text{white-space:pre-wrap;font-size:1.05em;line-height:1.7}
.text span[title]:hover{outline:2px solid #333}""" + "".join(
    f".b{k}{{background:{c}}}" for k, c in enumerate(BITS_COLOURS)) + ".b5,.b6,.b7,.legend .r6,.legend .e6{color:#fff}" + "".join(
    f".r{k}{{background:{c}}}.e{k}{{background:{d}}}" for k, (c, d) in enumerate(zip(BETA_COLOURS, DELTA_COLOURS))) + """
.row{font:13px monospace;margin-bottom:.9em}.line{white-space:pre;height:17px}.line span{display:inline-block;width:1ch}
.map{display:flex;margin-top:2px}.strip{height:4px;line-height:0;white-space:nowrap}.strip i{display:inline-block;width:1ch;height:4px}
.row b{display:inline-block;flex:none;width:6em;font:9px/1.1 sans-serif;color:#777}.row big{font-size:12px;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.1em .6em;text-align:right}"""


def read_input(args):
    """(the text's first --max-bytes bytes, a note for the page when that cut it); never more is read."""
    if args.max_bytes < 2:
        raise mora.UserError(f"--max-bytes {args.max_bytes}: at least 2 bytes are needed, one to read and one to predict")
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                data = f.read(args.max_bytes + 1)  # no more: --file may be endless (/dev/zero) or huge
        except OSError as exc:
            raise mora.UserError(f"cannot read --file {args.file} ({exc.strerror}): give the path of a text file")
    else:
        data = os.fsencode(args.text)  # the text's bytes as given, as `mora.py sample` takes its prompt
    if len(data) < 2:
        raise mora.UserError("the text has fewer than 2 bytes: give at least one byte to read and one to predict")
    if len(data) <= args.max_bytes:
        return data, ""
    print(f"explain: reading the first {args.max_bytes:,} bytes of the text (raise --max-bytes for more)")
    return data[:args.max_bytes], f" (the first {args.max_bytes:,} bytes of the text: --max-bytes caps it)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/mora.npz")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text itself")
    source.add_argument("--file", help="a file holding the text")
    parser.add_argument("--max-bytes", type=int, default=4000, help="read at most this many bytes (default 4000)")
    parser.add_argument("--out", default="explain.html")
    args = parser.parse_args(argv)
    try:
        mora.check_outputs([args.out], [args.ckpt] + [args.file] * (args.file is not None))  # the page, and its .tmp
        data, cut_note = read_input(args)
        cfg, params, meta, _ = mora.load_checkpoint(args.ckpt)
        bits, top, beta, delta = read_text(params, data)
        chars = characters(data)
        page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>MORA explains {html.escape(os.path.basename(args.ckpt))}'
                f'</title><style>{STYLE}</style></head><body><h1>What MORA makes of a text</h1><p class="legend">'
                f'{html.escape(args.ckpt)} (step {meta["step"]:,}) reading {len(data):,} bytes as one stream, its memory carried '
                f'from the first byte: {np.nanmean(bits):.3f} bits/byte.</p>'
                + text_section(data, chars, bits, top) + memory_section(chars, beta, delta)
                + summary_section(cfg, meta, params, data, bits, beta, cut_note) + "</body></html>\n")
        try:
            with mora.written_atomically(args.out, "w", encoding="utf-8") as f:  # never half a page at --out
                f.write(page)
        except OSError as exc:
            raise mora.UserError(f"cannot write --out {args.out} ({exc.strerror}): choose a path in a folder you can write to")
    except mora.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: no page was written ({args.out} is as it was)", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {np.nanmean(bits):.3f} bits/byte over {len(data) - 1:,} predicted bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
