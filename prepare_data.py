"""Prepare TinyStories for MORA: text in, raw bytes out (data/train.bin, data/val.bin).

The model reads bytes, so "preparing" is copying the text byte for byte into one
file per split; nothing is tokenised, filtered or re-encoded.

    python prepare_data.py                      # download TinyStoriesV2-GPT4 (2.2 GB), then convert
    python prepare_data.py --input-train a.txt b.txt --input-val v.txt   # local text files instead

By default the two text files are downloaded from the dataset's home on Hugging Face
(roneneldan/TinyStories, licence CDLA-Sharing-1.0) into --out-dir, with a progress
bar; an interrupted download resumes where it stopped when run again.  Expected
output of the default run (after the download bars):

    data/train.bin: 2,227,753,162 bytes, 2,717,495 stories (<|endoftext|> separators)
    data/val.bin: 22,502,601 bytes, 27,629 stories (<|endoftext|> separators)

Work already done is skipped: a finished download, a .bin newer than its text and
of the same size.  Needs about 4.5 GB of disk for the full data (text + bins).
"""
import argparse
import os
import sys
import urllib.error
import urllib.request

from tqdm import tqdm

URL_BASE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TRAIN_FILE, VAL_FILE = "TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"
SEPARATOR = b"<|endoftext|>"
CHUNK = 1 << 22  # 4 MiB: files are streamed, never held in memory


class PrepareError(Exception):
    """Printed as one line; exit code 1."""


def download(url, dest):
    """Fetch url into dest through dest.part, resuming a partial .part with an HTTP
    Range request, and check the size against what the server announced."""
    if os.path.exists(dest):
        print(f"{dest}: already downloaded, skipped")
        return
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        raise PrepareError(f"{url}: HTTP {exc.code} {exc.reason}: check --url-base, or convert local files with --input-train FILE --input-val FILE")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrepareError(f"cannot reach {url} ({reason}): offline? convert local files with --input-train FILE --input-val FILE")
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except OSError as exc:
                raise PrepareError(f"download of {url} broke off ({exc}): run the same command again to resume")
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise PrepareError(f"download of {url} stopped at {size:,} of {total:,} bytes: run the same command again to resume")
    os.replace(part, dest)


def count_stories(f, out, bar):
    """Copy the open file f to out in chunks; return its story count: the number of
    <|endoftext|> separators, plus one if text follows the last separator."""
    separators, tail, text_after_last = 0, b"", False
    while chunk := f.read(CHUNK):
        out.write(chunk)
        bar.update(len(chunk))
        window = tail + chunk  # a separator may straddle two chunks
        last = window.rfind(SEPARATOR)
        if last >= 0:
            separators += window.count(SEPARATOR)
            text_after_last = bool(window[last + len(SEPARATOR):].strip())
        else:
            text_after_last = text_after_last or bool(chunk.strip())
        tail = window[-(len(SEPARATOR) - 1):]
    return separators + text_after_last if separators else 0


def convert(sources, dest):
    """Concatenate the source files byte for byte into dest (written as dest.tmp, then
    renamed), counting bytes and stories on the way."""
    for path in sources:
        if not os.path.isfile(path):
            raise PrepareError(f"{path}: no such file")
    expected = sum(os.path.getsize(p) for p in sources)
    if (os.path.exists(dest) and os.path.getsize(dest) == expected
            and os.path.getmtime(dest) >= max(os.path.getmtime(p) for p in sources)):
        print(f"{dest}: up to date ({expected:,} bytes), skipped")
        return
    stories = 0
    with open(dest + ".tmp", "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
        for path in sources:
            with open(path, "rb") as f:
                stories += count_stories(f, out, bar)
    os.replace(dest + ".tmp", dest)
    counted = f"{stories:,} stories (<|endoftext|> separators)" if stories else "no <|endoftext|> separators, stories not counted"
    print(f"{dest}: {expected:,} bytes, {counted}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="data", help="where train.bin and val.bin go (and downloads)")
    parser.add_argument("--input-train", nargs="+", metavar="FILE", help="local train text file(s), concatenated in order")
    parser.add_argument("--input-val", metavar="FILE", help="local validation text file")
    parser.add_argument("--url-base", default=URL_BASE, help="where to download the two TinyStoriesV2-GPT4 files from")
    args = parser.parse_args(argv)
    try:
        if bool(args.input_train) != bool(args.input_val):
            raise PrepareError("give both --input-train and --input-val (or neither, to download TinyStories)")
        os.makedirs(args.out_dir, exist_ok=True)
        if args.input_train:
            train_sources, val_sources = args.input_train, [args.input_val]
        else:
            train_sources = [os.path.join(args.out_dir, TRAIN_FILE)]
            val_sources = [os.path.join(args.out_dir, VAL_FILE)]
            for dest in val_sources + train_sources:
                download(args.url_base.rstrip("/") + "/" + os.path.basename(dest), dest)
        convert(train_sources, os.path.join(args.out_dir, "train.bin"))
        convert(val_sources, os.path.join(args.out_dir, "val.bin"))
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
