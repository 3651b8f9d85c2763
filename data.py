"""Data I/O shared by every stage: the 8 emotion labels, the one instruction, the EmoSet-layout
reader, and crash-safe JSONL / JSON writing.

A *record* is a plain dict ``{"id", "image", "label"}`` (plus ``think``/``answer``/provenance for
COT records). ``image`` is stored relative to the data root, so a record file stays valid when
the data folder moves.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

# EmoSet's info.json order. Code maps labels by *name*; this order is only for display and for
# the rows/columns of the confusion matrix.
EMOTIONS = ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")
POSITIVE = frozenset(EMOTIONS[:4])
NEGATIVE = frozenset(EMOTIONS[4:])
SPLITS = ("train", "val", "test")

# One instruction for every stage and for evaluation (DESIGN section 4). The label baseline is
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
                      limit: int | None = None) -> tuple[list[dict], dict]:
    """Read ``ROOT/<split>.json`` into records.

    Returns ``(records, report)`` where ``report`` counts what was read and, with
    ``skip_missing=True``, which entries were skipped because their image file is missing
    (without it a missing image is an error). Nothing is dropped silently.
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
    return records, report


def read_annotation(root: str | os.PathLike, record: dict) -> dict:
    """The per-image annotation JSON of a record (EmoSet attributes), or {} if it has none."""
    if "annotation" not in record:
        return {}
    path = Path(root) / record["annotation"]
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: annotation of {record['id']!r} not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed annotation JSON of {record['id']!r}: {e}") from e


def load_image(root: str | os.PathLike, record: dict) -> Image.Image:
    """The record's image as RGB (grayscale / RGBA / palette inputs are converted)."""
    path = Path(root) / record["image"]
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"{path}: image of {record['id']!r} not found") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read image of {record['id']!r}: {e}") from e


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
            yield record


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
