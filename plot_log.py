"""Learning curves from `mora.py train` logs, as an SVG picture.

    python plot_log.py checkpoints/mora.csv [more.csv ...] --out curve.svg

Plots bits/byte against bytes seen (or, with --x time, minutes of training): each log's training loss (a running mean over
--smooth steps) as a line, its periodic validation (on the start of val) as dots,
and the final validation on all of val as a ring.
"""
import argparse
import csv
import html
import math
import os
import sys

import mora

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22"]


def read_log(path, axis="bytes"):
    """(train, val, full_val) points (x, bits/byte) of one log, x the bytes seen or (axis
    "time") the minutes of training so far, summed from the log's own ms_per_step.  Rows
    whose bits/byte is not a number (a run that diverged) are left out, said in one line;
    SystemExit with one line when the log is missing, empty or not a training log."""
    points, minutes, dropped = ([], [], []), 0.0, 0
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                ms = float(r["ms_per_step"] or 0)  # the final evaluation's row has no step time
                minutes += ms / 60000 if math.isfinite(ms) else 0  # an inf (a clock that jumped) would push the rest to inf
                x = minutes if axis == "time" else int(r["bytes"])
                for kind, y in ((0, r["bpb"]), (1 if r["bpb"] else 2, r["val_bpb"])):  # train, val, all of val
                    if y and math.isfinite(float(y)):
                        points[kind].append((x, float(y)))
                    elif y:
                        dropped += 1
    except OSError as exc:
        sys.exit(f"error: {path}: {exc.strerror}")
    except (KeyError, TypeError, ValueError, csv.Error, UnicodeDecodeError) as exc:
        sys.exit(f"error: {path} is not a mora.py training log ({exc.__class__.__name__}: {exc})")
    if dropped:
        print(f"note: {path}: {dropped} bits/byte values that are not numbers (a run that diverged) are left out",
              file=sys.stderr)
    if not points[0]:
        sys.exit(f"error: {path} has no training rows with a bits/byte yet: plot it after a step has been logged")
    return points


def positive(kind):
    """An argparse type: a finite number of `kind` above 0 (a window of 0 steps or a
    NaN axis would only surface later, as a traceback or as "nan" in the picture)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            rule = "a whole number, 1 or more" if kind is int else "a positive number"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def running_mean(points, window):
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y - (points[i - window][1] if i >= window else 0.0)
        out.append((x, total / min(i + 1, window)))
    return out


def parse_args(argv):
    """The flags, checked together; an --out that cannot be written whole, or is a log, refused before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--out", default="curve.svg")
    parser.add_argument("--smooth", type=positive(int), default=20, help="steps in the running mean of the train line")
    parser.add_argument("--title", default="MORA learning curve")
    parser.add_argument("--ymax", type=positive(float), default=4.0, help="top of the bits/byte axis")
    parser.add_argument("--ymin", type=positive(float), help="bottom of the bits/byte axis (default: the lowest "
                        "value, rounded down to a multiple of 0.5); values beyond either end are drawn at it")
    parser.add_argument("--labels", nargs="+", help="one name per log (default: the file names)")
    parser.add_argument("--x", choices=["bytes", "time"], default="bytes", help="the x-axis: bytes seen, or minutes of "
                        "training summed from the log's ms_per_step, evaluations left out (default bytes)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):  # zip() would drop the logs without a label
        parser.error(f"--labels: give one per log ({len(args.logs)} logs, {len(args.labels)} labels)")
    if args.ymin is not None and args.ymin >= args.ymax:
        parser.error(f"--ymin {args.ymin:g} must be below --ymax {args.ymax:g}")
    try:
        mora.check_outputs([args.out], args.logs)  # the picture, and its .tmp
    except mora.UserError as exc:
        sys.exit(f"error: {exc}")
    return args


def main(argv=None):
    args = parse_args(argv)
    labels = args.labels or [os.path.splitext(os.path.basename(p))[0] for p in args.logs]
    curves = [(label, *read_log(p, args.x)) for label, p in zip(labels, args.logs)]
    width, height, left, right, top, bottom = 720, 420, 60, 20, 40, 50
    x_max = max(x for _, train, val, full in curves for x, _ in train + val + full) or 1  # a log at 0 bytes: still an axis
    y_min = args.ymin
    if y_min is None:
        lowest = min(y for _, train, val, full in curves for _, y in train + val + full)
        y_min = min(max(0.0, int(lowest * 2 - 1) / 2), args.ymax - 0.5)  # values all above --ymax: still a range
    sx = lambda x: left + (width - left - right) * x / x_max  # noqa: E731
    sy = lambda y: top + (height - top - bottom) * (args.ymax - min(max(y, y_min), args.ymax)) / (args.ymax - y_min)  # noqa: E731
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{html.escape(args.title)}</text>']
    tick = 0.5 if args.ymax - y_min > 1 else 0.1  # a grid line every 0.5 bits/byte, or every 0.1 on a close view
    for k in range(math.ceil(y_min / tick - 1e-9), math.floor(args.ymax / tick + 1e-9) + 1):
        y = sy(k * tick)
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{k * tick:.1f}</text>')
    for i in range(6):
        x = x_max * i / 5
        tick_label = f"{x:.1f}" if args.x == "time" else f"{x / 1e6:.1f}M"
        svg.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 18}" text-anchor="middle">{tick_label}</text>')
    x_name = "minutes of training" if args.x == "time" else "bytes seen"
    svg.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">{x_name}</text>'
               f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">bits/byte</text>')
    for k, (name, train, val, full) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in running_mean(train, args.smooth))
        svg.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}"/>' for x, y in val]
        svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="none" stroke="{colour}" stroke-width="2"/>' for x, y in full]
        label = f"{name}: train line" + (f", val dots (last {val[-1][1]:.3f})" if val else "")
        label += f", all of val ring ({full[-1][1]:.3f})" if full else ""
        svg.append(f'<text x="{width - right - 8}" y="{top + 16 + 16 * k}" text-anchor="end" fill="{colour}">{html.escape(label)}</text>')
    svg.append("</svg>")
    try:
        with mora.written_atomically(args.out, "w") as f:  # never half a picture at --out
            f.write("\n".join(svg))
    except OSError as exc:  # a full disk, say
        sys.exit(f"error: cannot write {args.out} ({exc.strerror or exc}): give --out a file in a folder you can write")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
