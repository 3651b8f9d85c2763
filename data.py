"""Data I/O shared by every stage: the 8 labels, the one instruction, the EmoSet reader, COT records, crash-safe files.

A *record* is a plain dict ``{"id", "image", "label"}`` (plus ``think``/``answer``/provenance for
COT records). ``image`` is stored relative to the data root, so a record file stays valid when
the data folder moves.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

# EmoSet's info.json order. Code maps labels by *name*; this order is only for display and for
# the rows/columns of the confusion matrix.
EMOTIONS = ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")
INVALID = "invalid"   # eval's prediction for an answer that names no label: the confusion matrix's 9th column
POSITIVE = frozenset(EMOTIONS[:4])
NEGATIVE = frozenset(EMOTIONS[4:])
SPLITS = ("train", "val", "test")

# One instruction for every stage and for evaluation. The label baseline is
# asked the same question; only its training targets differ (an answer with no reasoning).
INSTRUCTION = (
    "Which emotion does this image evoke? Choose one of: " + ", ".join(EMOTIONS) + ". "
    "Think inside <think> </think>, then give one emotion word inside <answer> </answer>."
)


def valence(label: str) -> str:
    """'positive' or 'negative' for one of the 8 labels."""
    if label in POSITIVE:
        return "positive"
    if label in NEGATIVE:
        return "negative"
    raise ValueError(f"not an emotion label: {label!r}")


def cot_target(think: str, answer: str) -> str:
    """The assistant text a COT-trained model should produce."""
    return f"<think>{think}</think><answer>{answer}</answer>"


def label_target(label: str) -> str:
    """The assistant text of the plain-label baseline."""
    return f"<answer>{label}</answer>"


class DataError(ValueError):
    """Bad input data; the message names the file and the entry or line at fault."""


# ----------------------------------------------------------------------------------------------
# EmoSet layout: ROOT/{train,val,test}.json, each a JSON list of
#   [emotion, image_id, "image/<emotion>/<id>.jpg", "annotation/<emotion>/<id>.json"]
# Some copies drop image_id (3 elements), so paths are picked by suffix, not position.
# ----------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def path_in_root(root: str | os.PathLike, rel: str, where: str) -> Path:
    """ROOT/rel, refused (DataError naming `where`) when the entry itself leaves the data root.

    A split or COT file is input like any other: an entry such as "../../etc/x.png" or an absolute
    path would make the reader open files the user never pointed it at, so both are refused. What
    lies inside ROOT is the user's own layout and is followed as it is: on a shared disk `image/`
    is typically a symlink to one shared copy of the dataset, and refusing it would refuse the
    usual setup. (The file is still only ever decoded as an image, by PIL.)"""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: expected a non-empty relative path, got {rel!r}")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise DataError(f"{where}: path {rel!r} leaves the data root {root} (absolute or with '..'); "
                        "paths must be relative to the data root")
    return Path(root) / rel


def _parse_split_entry(entry, where: str) -> dict:
    if not isinstance(entry, list) or len(entry) not in (3, 4) or not all(isinstance(x, str) for x in entry):
        raise DataError(f"{where}: expected [emotion, (image_id,) image_path, annotation_path], got {entry!r}")
    label = entry[0]
    if label not in EMOTIONS:
        raise DataError(f"{where}: unknown emotion label {label!r}; expected one of {', '.join(EMOTIONS)}")
    images = [x for x in entry[1:] if x.lower().endswith(IMAGE_SUFFIXES)]
    annotations = [x for x in entry[1:] if x.lower().endswith(".json")]
    if len(images) != 1:
        raise DataError(f"{where}: expected exactly one image path ({'/'.join(IMAGE_SUFFIXES)}) in {entry!r}")
    image = images[0]
    if len(entry) == 4:
        image_id = entry[1]
    else:  # no explicit id: the file stem is EmoSet's id (e.g. "amusement_00001")
        image_id = Path(image).stem
    record = {"id": image_id, "image": image, "label": label}
    if annotations:
        record["annotation"] = annotations[0]
    return record


def read_emoset_split(root: str | os.PathLike, split: str, skip_missing: bool = False,
                      limit: int | None = None, allow_empty: bool = False) -> tuple[list[dict], dict]:
    """Read ``ROOT/<split>.json`` into records.

    Returns ``(records, report)`` where ``report`` counts what was read and, with
    ``skip_missing=True``, which entries were skipped because their image file is missing
    (without it a missing image is an error). Nothing is dropped silently. Every image and
    annotation path must stay inside ROOT (see `path_in_root`). A split with no usable entry is
    an error unless ``allow_empty`` (training reads val that way, and skips evaluation).
    """
    root = Path(root)
    path = root / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path}: split file not found (expected EmoSet layout ROOT/{{train,val,test}}.json)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")

    records, skipped, seen = [], [], set()
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        record = _parse_split_entry(entry, where)
        if record["id"] in seen:
            raise DataError(f"{where}: duplicate image id {record['id']!r}")
        seen.add(record["id"])
        for key in ("image", "annotation"):
            if key in record:
                path_in_root(root, record[key], f"{where} ({key})")
        if not (root / record["image"]).is_file():
            if not skip_missing:
                raise DataError(f"{where}: image file not found: {root / record['image']} "
                                "(pass --skip-missing to skip and count such entries)")
            skipped.append(record["id"])
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    report = {"split": split, "file": str(path), "read": len(records), "skipped_missing": len(skipped),
              "skipped_ids": skipped[:20], "per_class": dict(Counter(r["label"] for r in records))}
    if not records and not allow_empty:
        why = f" ({len(skipped)} skipped for missing images)" if skipped else ""
        raise DataError(f"{path}: the {split} split has no usable entries{why}")
    return records, report


def read_val_for_training(root: str | os.PathLike, eval_every: int, limit: int | None) -> list[dict]:
    """Validation records for the periodic evaluation during training: [] when it is off
    (eval_every == 0) or the val split is empty, the latter with one warning (training goes on)."""
    if not eval_every:
        return []
    val, _ = read_emoset_split(root, "val", skip_missing=True, limit=limit, allow_empty=True)
    if not val:
        warn(f"{Path(root) / 'val.json'} has no usable entries: evaluation during training is skipped")
    return val


def read_annotation(root: str | os.PathLike, record: dict) -> dict:
    """The per-image annotation JSON of a record (EmoSet attributes), or {} if it has none."""
    if "annotation" not in record:
        return {}
    path = path_in_root(root, record["annotation"], f"annotation of {record['id']!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: annotation of {record['id']!r} not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed annotation JSON of {record['id']!r}: {e}") from e


def load_image(root: str | os.PathLike, record: dict) -> Image.Image:
    """The record's image as RGB (grayscale / RGBA / palette inputs are converted).

    Any file PIL cannot decode (truncated, corrupt, not an image) and any image larger than
    PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, checked from the header before any
    pixel is decoded) raises DataError naming the file and the record."""
    path = path_in_root(root, record["image"], f"image of {record['id']!r}")
    try:
        with warnings.catch_warnings():   # PIL only warns between 1x and 2x the limit: refuse those too
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels is over the limit of "
                                                       f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)")
                return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"{path}: image of {record['id']!r} not found") from e
    except Exception as e:  # noqa: BLE001 -- PIL's decoders raise OSError, ValueError, SyntaxError, EOFError...
        raise DataError(f"{path}: cannot read image of {record['id']!r}: {type(e).__name__}: {e}") from e


def warn(message: str) -> None:
    """One warning line on stderr (tqdm bars stay on their own line)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_images(root: str | os.PathLike, records: list[dict], skipped: dict) -> tuple[list[dict], list]:
    """(readable records, their images): unreadable images are left out, not fatal.

    `skipped` maps record id -> reason and is shared across calls by the caller (it is the count
    to report); each image gets ONE warning, the first time it fails. The same records always
    give the same result, so a resumed run sees exactly the batches of an uninterrupted one."""
    kept, images = [], []
    for r in records:
        try:
            images.append(load_image(root, r))
            kept.append(r)
        except DataError as e:
            if r["id"] not in skipped:
                warn(f"skipping unreadable image: {e}")
            skipped[r["id"]] = str(e)
    return kept, images


# ----------------------------------------------------------------------------------------------
# COT records (cot_builder.py's output, sft.py's input), validated when loaded
# ----------------------------------------------------------------------------------------------
COT_FIELDS = ("id", "image", "label", "think", "answer")
COT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
MAX_THINK_CHARS = 4096  # a real teacher's ~512-token reasoning is ~2-3k characters


def cot_record_problem(record: dict, root: str | os.PathLike, max_think_chars: int = MAX_THINK_CHARS,
                       forbidden: tuple[str, ...] = ()) -> str | None:
    """What is wrong with one COT record, or None. `forbidden`: strings that must not appear in
    the reasoning or answer (the model's special tokens: an image placeholder inside a target
    makes the forward pass fail, an end-of-turn token would teach the model to stop mid-thought)."""
    missing = [k for k in COT_FIELDS if k not in record]
    if missing:
        return f"missing fields {missing}"
    for key in COT_FIELDS:
        value = record[key]
        if not isinstance(value, str):
            return f"{key} is {'null' if value is None else type(value).__name__}, expected a string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{key} is not valid UTF-8 text (a lone surrogate?)"
    if record["label"] not in EMOTIONS:
        return f"unknown label {record['label']!r}"
    if record["answer"] != record["label"]:
        return f"answer {record['answer']!r} differs from label {record['label']!r}"
    if len(record["think"]) > max_think_chars:
        return f"think is {len(record['think'])} characters, over the cap of {max_think_chars} (--max-think-chars)"
    for text_key in ("think", "answer"):
        for token in COT_TAGS + tuple(forbidden):
            if token in record[text_key]:
                return f"{text_key} contains {token!r}"
    try:
        path = path_in_root(root, record["image"], "image")
    except DataError as e:
        return str(e)
    if not path.is_file():
        return f"image file not found: {path}"
    return None


def read_cot_records(path: str | os.PathLike, root: str | os.PathLike, max_think_chars: int = MAX_THINK_CHARS,
                     forbidden: tuple[str, ...] = (), skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """COT records of a JSONL file, each validated (`cot_record_problem`; duplicate ids too).

    A bad record is a DataError naming file and line, or, with ``skip_invalid``, left out and
    counted in the report (with the first few messages, also printed as one warning)."""
    records, problems, first_line = [], [], {}
    for lineno, record in read_jsonl_lines(path):
        problem = cot_record_problem(record, root, max_think_chars, forbidden)
        if problem is None and record["id"] in first_line:
            problem = f"duplicate id {record['id']!r} (first at line {first_line[record['id']]})"
        if problem is not None:
            message = f"{path} line {lineno}: {problem}"
            if not skip_invalid:
                raise DataError(message + " (pass --skip-invalid to skip and count such records)")
            problems.append(message)
            continue
        first_line[record["id"]] = lineno
        records.append(record)
    if problems:
        warn(f"skipped {len(problems)} invalid COT records of {path}, e.g.\n  " + "\n  ".join(problems[:5]))
    if not records:
        raise DataError(f"{path}: no usable COT records" + (f" ({len(problems)} invalid)" if problems else ""))
    return records, {"read": len(records), "skipped_invalid": len(problems), "problems": problems[:20]}


# ----------------------------------------------------------------------------------------------
# Crash-safe files.
# JSONL: each record is ONE write of one complete line, then flush + fsync, so a crash leaves at
# most a partial *last* line, which `repair_jsonl_tail` removes before a resumed run appends.
# Whole files (JSON, markdown, checkpoints): write a temporary file, then os.replace (atomic).
# ----------------------------------------------------------------------------------------------
def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one complete JSON line, durably (write, flush, fsync)."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a JSONL file; a malformed line raises DataError naming file and line."""
    for _, record in read_jsonl_lines(path):
        yield record


def read_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) pairs of a JSONL file, as read_jsonl."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: malformed JSON ({e.msg}): {line[:80]!r}") from e
            if not isinstance(record, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut a partial last line (no trailing newline: the write a crash interrupted).

    Returns the number of bytes removed (0 when the file is whole or absent)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1  # 0 when the only line is partial
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class EpochSampler:
    """Index batches that walk a seeded random permutation, epoch after epoch.

    Its whole state (permutation, cursor, epoch) is a small dict, saved with each checkpoint so a
    resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("EpochSampler: the dataset is empty")
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._permutation()
            take = min(size - len(batch), self.n - self.cursor)
            batch += self.order[self.cursor:self.cursor + take]
            self.cursor += take
        return batch

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"cannot resume: the checkpoint saw {state['n']} training records, now there are {self.n}")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self.order = self._permutation()


def truncate_jsonl_after_step(path: str | os.PathLike, step: int) -> None:
    """On resume: drop log lines of steps after the checkpoint (they will be redone), atomically."""
    path = Path(path)
    if not path.exists():
        return
    repair_jsonl_tail(path)
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
