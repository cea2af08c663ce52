"""Prepare text for MORA: text in, raw bytes out (data/train.bin, data/val.bin).

The model reads bytes, so "preparing" is copying the text byte for byte into one file per
split; nothing is tokenised, filtered or re-encoded.

    python prepare_data.py                      # download TinyStoriesV2-GPT4 (2.2 GB), then convert
    python prepare_data.py --train-bytes 50000000   # only the first 50 MB of its train text (a CPU needs no more)
    python prepare_data.py --input-train a.txt b.txt --input-val v.txt   # local text files instead
    python prepare_data.py --dataset enwik8     # enwik8: train.bin, val.bin, test.bin (90M / 5M / 5M bytes)
    python prepare_data.py --dataset shakespeare    # tiny Shakespeare: train.bin, val.bin (1,003,854 / 111,540 bytes)

By default the two TinyStories text files are downloaded from the dataset's home on Hugging
Face (roneneldan/TinyStories, licence CDLA-Sharing-1.0) into --out-dir, with a progress bar;
an interrupted download resumes where it stopped when run again, and --train-bytes N asks the
server for the first N bytes alone (an HTTP Range request).  Expected output (after the bars):

    data/train.bin: 2,227,753,162 bytes, 2,717,495 stories (<|endoftext|> separators)
    data/val.bin: 22,502,601 bytes, 27,629 stories (<|endoftext|> separators)

enwik8 is the first 10^8 bytes of an English Wikipedia XML dump (the Hutter Prize text,
http://mattmahoney.net/dc/textdata.html), split as is standard: its first 90,000,000 bytes for
training, the next 5,000,000 for validation, the last 5,000,000 for testing.  Tiny Shakespeare
is char-rnn's data/tinyshakespeare/input.txt (1,115,394 bytes of ASCII), split as nanoGPT's
shakespeare_char: the first 90% for training, the last 10% for validation.  Expected output:

    data/train.bin: 1,003,854 bytes, no <|endoftext|> separators, stories not counted
    data/val.bin: 111,540 bytes, no <|endoftext|> separators, stories not counted

Work already done is skipped: a finished download, and a .bin whose record (the .bin.json
beside it: which bytes of which files, their sizes and times, the .bin's SHA-256) still
matches.  Every input and output is checked before any work, and one run at a time writes in
an --out-dir.  Files are written as NAME.tmp and renamed once whole, so a full disk, Ctrl-C,
SIGTERM or SIGHUP never leaves a partial .bin or record (an interrupted download stays as
NAME.part, to resume).  Bars are drawn on a terminal only.  TinyStories needs 4.5 GB of disk.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import urllib.error
import urllib.request
import zipfile
import zlib

from tqdm import tqdm

from mora import UserError, check_outputs, file_problem, positive_int, written_atomically  # the last: NAME.tmp, renamed once whole

URL_BASE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TRAIN_FILE, VAL_FILE = "TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"
# One text downloaded whole and cut at fixed sizes: where from, the file (a .zip holds the text as a member
# named as the dataset), the splits in bytes, in order; their total is the text's size, checked.
SPLIT_TEXTS = {"enwik8": ("http://mattmahoney.net/dc/", "enwik8.zip", {"train": 90_000_000, "val": 5_000_000, "test": 5_000_000}),
               "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/", "input.txt",
                               {"train": 1_003_854, "val": 111_540})}  # nanoGPT's shakespeare_char: int(0.9 * n) bytes, the rest
SEPARATOR = b"<|endoftext|>"
CHUNK = 1 << 22  # 4 MiB: files are streamed, never held in memory
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]  # no SIGHUP on Windows


def stop(signum, frame):
    """SIGTERM (`kill`, a job scheduler) or SIGHUP (the terminal closed), raised where the run is as Ctrl-C
    raises KeyboardInterrupt, its signal with it: the same clean-up removes partial files."""
    raise KeyboardInterrupt(signum)


def say(line):
    """print(line) to a stdout that may go away (`| head`) or fill up: the work goes on, and ends as it would have."""
    try:
        print(line, flush=True)
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the rest, Python's last flush too, goes nowhere


def progress_bar(**options):
    """A tqdm bar on a terminal; none in a file or pipe, where its carriage returns
    would pile up as one long line."""
    return tqdm(unit="B", unit_scale=True, disable=not sys.stderr.isatty(), **options)


def download(url, dest, limit=None):
    """Fetch url (its first `limit` bytes, if given) into dest through dest.part,
    resuming a partial .part with an HTTP Range request, and check the size against
    what the server announced."""
    if os.path.exists(dest):
        say(f"{dest}: already downloaded, skipped")
        return
    part = dest + ".part"  # kept on Ctrl-C or a broken connection: the next run resumes it
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if limit is not None and have >= limit:  # all asked for is there: a run stopped before the rename
        os.replace(part, dest)
        return
    ranges = f"bytes={have}-{'' if limit is None else limit - 1}"
    request = urllib.request.Request(url, headers={"Range": ranges} if have or limit else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url}: HTTP {exc.code} {exc.reason}: check --url-base, or convert local files with --input-train FILE --input-val FILE")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach {url} ({reason}): offline? convert local files with --input-train FILE --input-val FILE")
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if limit is not None:
            total = limit if total is None else min(total, limit)
        with open(part, "ab" if have else "wb") as f, \
                progress_bar(total=total, initial=have, desc=os.path.basename(dest)) as bar:
            try:
                while (want := CHUNK if total is None else min(CHUNK, total - f.tell())) > 0 and (chunk := response.read(want)):
                    f.write(chunk)
                    bar.update(len(chunk))
            except OSError as exc:
                raise UserError(f"download of {url} broke off ({exc}): run the same command again to resume")
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise UserError(f"download of {url} stopped at {size:,} of {total:,} bytes: run the same command again to resume")
    os.replace(part, dest)


def copy_counting_stories(chunks, out, bar, digest):
    """Write the byte chunks to out, each added to digest on its way (the SHA-256 of what is
    written, without reading it back); return the story count: the number of <|endoftext|>
    separators, plus one if text follows the last separator."""
    separators, tail, text_after_last = 0, b"", False
    for chunk in chunks:
        out.write(chunk)
        digest.update(chunk)
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


def source_ranges(sources, start, length):
    """For each source file in order, its chunks of the bytes start .. start+length of
    the sources read one after another (stories are counted per file)."""
    for path in sources:
        size = os.path.getsize(path)
        if start >= size:
            start -= size
            continue
        take = min(length, size - start)
        yield read_chunks(path, start, take)
        start, length = 0, length - take
        if length <= 0:
            return


def read_chunks(path, start, length):
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0 and (chunk := f.read(min(CHUNK, length))):
            length -= len(chunk)
            yield chunk


def check_files(args):
    """Every input, then every output, before any work: so that a wrong --input-val, or a FIFO at val.bin.tmp, is
    found before minutes of converting the train text.  Each input is a regular file that can be read, and no
    split is empty; each output is what check_outputs asks (a regular file or nothing, none of the inputs)."""
    texts = {"train": args.input_train, "val": [args.input_val]} if args.input_train else {}
    for split, paths in texts.items():
        for path in paths:
            if not os.path.exists(path):
                raise UserError(f"{path}: no such file")
            if problem := file_problem(path, "give a text file"):  # a FIFO is never opened: it would wait for a writer
                raise UserError(problem)
            with open(path, "rb"):  # unreadable: the OSError says why, in main's one line
                pass
        if sum(os.path.getsize(p) for p in paths) == 0:
            raise UserError(f"the {split} text ({', '.join(paths)}) is empty: give a file that holds text")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir} is a file: name a folder")
    os.makedirs(args.out_dir, exist_ok=True)
    for path in written_files(args):  # one by one: the advice for each is "choose another --out-dir"
        check_outputs([path], [text for paths in texts.values() for text in paths], flag="--out-dir")
    if texts and any(os.path.samefile(args.input_val, train) for train in args.input_train):
        print(f"warning: --input-val {args.input_val} is also a train text: val.bin then measures what the model "
              f"trained on, not how it does on new text", file=sys.stderr)


def written_files(args):
    """Every file this run may write: each .bin, its record and the text taken out of a .zip (check_outputs adds the
    .tmp written_atomically writes beside each); each download with its .part."""
    _, name, splits = SPLIT_TEXTS.get(args.dataset, (None, "", ["train", "val"]))
    made = [f"{split}.bin{end}" for split in splits for end in ("", ".json")] + [args.dataset] * name.endswith(".zip")
    downloads = [] if args.input_train else [name] if name else \
        [VAL_FILE, TRAIN_FILE] + [f"{TRAIN_FILE}.first{args.train_bytes}"] * bool(args.train_bytes)
    made, downloads = ([os.path.join(args.out_dir, f) for f in files] for files in (made, downloads))
    return made + [p for f in downloads for p in (f, f + ".part")]


def lock_folder(folder):
    """An exclusive lock on the folder while this run writes in it, so that a second run on it stops at once, before
    it touches the first's .tmp and .part files.  The system drops the lock however the process ends."""
    try:
        import fcntl
    except ImportError:  # Windows: one run per --out-dir at a time is left to the user
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another prepare_data.py is writing in {folder}: wait for it to end, or choose another --out-dir")
    return fd


def up_to_date(dest, record, made_from):
    """dest holds what made_from describes: its record says so (a missing or damaged one: not known to be done), and
    dest still has the SHA-256 recorded as it was written (a byte damaged in place, at the same size, shows).
    The hash, a full read of dest, comes last."""
    if not (os.path.exists(dest) and os.path.getsize(dest) == made_from["length"] and os.path.exists(record)):
        return False
    try:
        with open(record) as f:
            recorded = json.load(f)
        problem = None if isinstance(recorded, dict) else "not a record"
    except ValueError as exc:  # JSONDecodeError (an empty file from a full disk, say), UnicodeDecodeError
        problem = exc.__class__.__name__
    if problem:
        say(f"{record} is damaged ({problem}): rebuilding {dest}")
    if problem or recorded.get("made_from") != made_from:
        return False
    digest = hashlib.sha256()
    for chunk in read_chunks(dest, 0, made_from["length"]):
        digest.update(chunk)
    return recorded.get("sha256") == digest.hexdigest()


def convert(sources, dest, start=0, length=None):
    """Copy the bytes start .. start+length (all, without length) of the source files,
    read one after another, into dest (written as dest.tmp, then renamed), counting
    bytes and stories on the way.  dest.json records what dest was made from."""
    total = sum(os.path.getsize(p) for p in sources)
    length = total - start if length is None else min(length, total - start)
    made_from = {"sources": [[os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)] for p in sources],
                 "start": start, "length": length}
    record = dest + ".json"
    if up_to_date(dest, record, made_from):
        say(f"{dest}: up to date ({length:,} bytes), skipped")
        return
    if os.path.exists(record):  # dest is about to change: its old record must never vouch for the new bytes
        os.remove(record)
    digest = hashlib.sha256()
    with written_atomically(dest) as out, progress_bar(total=length, desc=os.path.basename(dest)) as bar:
        stories = sum(copy_counting_stories(chunks, out, bar, digest) for chunks in source_ranges(sources, start, length))
    with written_atomically(record, "w") as f:  # last: a record means dest is complete
        json.dump({"made_from": made_from, "sha256": digest.hexdigest()}, f)
    counted = f"{stories:,} stories (<|endoftext|> separators)" if stories else "no <|endoftext|> separators, stories not counted"
    say(f"{dest}: {length:,} bytes, {counted}")


def prepare_split_text(args):
    """A dataset of SPLIT_TEXTS: download its file, take the text out if it is a .zip, check the
    text's size, and cut the text into one .bin per split."""
    url_base, name, splits = SPLIT_TEXTS[args.dataset]
    archive, size = os.path.join(args.out_dir, name), sum(splits.values())
    text = os.path.join(args.out_dir, args.dataset) if name.endswith(".zip") else archive
    if not os.path.exists(text) or os.path.getsize(text) != size:
        download((args.url_base or url_base).rstrip("/") + "/" + name, archive)
    if text != archive and (not os.path.exists(text) or os.path.getsize(text) != size):
        try:
            with zipfile.ZipFile(archive) as z, z.open(args.dataset) as member, written_atomically(text) as out:
                while chunk := member.read(CHUNK):
                    out.write(chunk)
        except (zipfile.BadZipFile, KeyError, zlib.error, EOFError) as exc:  # not a zip, no text in it, damaged data
            os.remove(archive)  # else every later run would find the same damage
            what = "damaged compressed data" if isinstance(exc, zlib.error) else exc.__class__.__name__
            raise UserError(f"{archive} is damaged or not the {args.dataset} archive ({what}: {exc}): "
                               f"it was removed; run the same command to download it again")
    if os.path.getsize(text) != size:
        also = "" if text == archive else f" and {name}"
        raise UserError(f"{text} holds {os.path.getsize(text):,} bytes, {args.dataset} has {size:,}: delete it{also}, then run again")
    start = 0
    for split, length in splits.items():
        keep = min(length, args.train_bytes) if split == "train" and args.train_bytes else length
        convert([text], os.path.join(args.out_dir, f"{split}.bin"), start, keep)
        start += length


def prepare_tinystories(args):
    if args.input_train:
        train_sources, val_sources = args.input_train, [args.input_val]
    else:
        url_base = (args.url_base or URL_BASE).rstrip("/") + "/"
        val_sources = [os.path.join(args.out_dir, VAL_FILE)]
        download(url_base + VAL_FILE, val_sources[0])
        full_train = os.path.join(args.out_dir, TRAIN_FILE)
        first_n = args.train_bytes if not os.path.exists(full_train) else None  # only those bytes, asked for by range
        train_sources = [f"{full_train}.first{first_n}" if first_n else full_train]
        download(url_base + TRAIN_FILE, train_sources[0], limit=first_n)
    convert(train_sources, os.path.join(args.out_dir, "train.bin"), length=args.train_bytes)
    convert(val_sources, os.path.join(args.out_dir, "val.bin"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["tinystories", *SPLIT_TEXTS], default="tinystories")
    parser.add_argument("--out-dir", default="data", help="where the .bin files go (and downloads)")
    parser.add_argument("--input-train", nargs="+", metavar="FILE", help="local train text file(s), concatenated in order")
    parser.add_argument("--input-val", metavar="FILE", help="local validation text file")
    parser.add_argument("--url-base", help="the folder to download from (default " + ", ".join(
        f"{base} for {name}" for name, (base, *_) in {"tinystories": (URL_BASE,), **SPLIT_TEXTS}.items()) + ")")
    parser.add_argument("--train-bytes", type=positive_int, help="only the first N bytes of the train text (downloads only those)")
    args = parser.parse_args(argv)
    previous, lock = {s: signal.signal(s, stop) for s in STOP_SIGNALS}, None
    try:
        if bool(args.input_train) != bool(args.input_val):
            raise UserError("give both --input-train and --input-val (or neither, to download TinyStories)")
        if args.input_train and args.dataset != "tinystories":
            raise UserError(f"--input-train/--input-val convert local text; --dataset {args.dataset} downloads: choose one")
        if args.url_base and not args.url_base.startswith(("http://", "https://", "file:")):
            raise UserError(f"--url-base {args.url_base} is not a URL: it must start with http:// or https://")
        check_files(args)
        lock = lock_folder(args.out_dir)
        (prepare_split_text if args.dataset in SPLIT_TEXTS else prepare_tinystories)(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unreadable input, unwritable folder, disk full: one line
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: the partial files are already removed (a .part is kept)
        signum = exc.args[0] if exc.args else signal.SIGINT
        print(f"\ninterrupted by {signal.Signals(signum).name}: no partial .bin is left; run the same command again "
              f"to finish (a download resumes where it stopped)", file=sys.stderr)
        return 128 + signum  # as a shell reports a run a signal ended: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
    finally:  # main may be called from Python (the tests): leave the signals as they were
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock is not None:
            os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
