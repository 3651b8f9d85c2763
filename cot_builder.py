"""Self-supervised COT data construction with several teacher VLMs: the labels, not people, check the reasoning.

    python cot_builder.py --data ROOT --split train --teacher toy:describer --teacher toy:counter \
        --teacher toy:terse --out runs/cot/train.jsonl [--rationalize] [--limit N] [--workers N]

The dataset's labels, not people, check the teachers' reasoning:
  1. blind pass    every teacher answers the COT prompt without seeing the label; candidates
                   whose answer equals the label are kept;
  2. cross-check   each candidate's reasoning (answer removed) goes, as text only, to the OTHER
                   teachers, which must name the label from the reasoning alone (votes);
  3. rationalize   (optional) for images no teacher got right, teachers are told the label and
                   asked for reasoning that leads to it (records marked mode "hinted");
  4. select        one candidate per image: most votes, then the shortest reasoning.

Teachers (teachers.py): `openai:URL#MODEL` (any OpenAI-compatible server: vLLM, SGLang, llama.cpp...),
`hf:PATH` (a local transformers VLM), `toy:NAME` (pixel-reading toy teachers). The run appends one
JSONL line per kept record, is resumable, and ends with a summary (printed and written to
OUT.summary.json). An image is done only when every teacher's reply was parsed or judged; images
a teacher could not be reached for are listed in OUT.failures.jsonl, retried by the next run, and
make the exit code 3 while any remain.

    python cot_builder.py export --to trl|verl --cot runs/cot/train.jsonl --data ROOT --out DIR

converts the COT records (or, with --split, an EmoSet split) into the RL dataset of TRL's
GRPOTrainer (DIR/train.jsonl) or verl (DIR/train.json), for training beyond one GPU (docs/handoff.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from config import add_config_flags, arg, config_from_args, float_in, int_at_least, output_path_problem, run_cli
from data import (EMOTIONS, INSTRUCTION, DataError, append_jsonl, atomic_write_json, atomic_write_text, load_images,
                  path_in_root, read_cot_records, read_emoset_split, read_jsonl, repair_jsonl_tail)
from rewards import THINK_CLOSE, THINK_OPEN, format_reward, normalize_emotion, parse_answer
from teachers import TransportError, is_valid_text, make_teacher


# ---------------------------------------------------------------------------------------------
# The four steps. `lost` (image index -> message) collects transport failures: such an image
# is not judged further, and `build` leaves it to the next run.
# ---------------------------------------------------------------------------------------------
def read_reply(reply) -> tuple[str, str | None, str | None]:
    """(outcome, reasoning, label) of a COT reply; outcome is ok / malformed / error (transport)."""
    if isinstance(reply, TransportError):
        return "error", None, None
    if isinstance(reply, Exception) or not isinstance(reply, str) or not is_valid_text(reply):
        return "malformed", None, None
    label = normalize_emotion(parse_answer(reply))
    if not format_reward(reply) or label is None:
        return "malformed", None, None
    think = reply[reply.find(THINK_OPEN) + len(THINK_OPEN):reply.find(THINK_CLOSE)].strip()
    return "ok", think, label


def blind_pass(teachers, items, labels, lost: dict | None = None) -> tuple[list[list[dict]], dict]:
    """Step 1. Per image, the candidates whose blind answer equals the label; per teacher, outcomes."""
    candidates = [[] for _ in items]
    outcomes = {t.name: [] for t in teachers}
    lost = {} if lost is None else lost
    for teacher in teachers:
        for i, reply in enumerate(teacher.blind(items)):
            outcome, think, answer = read_reply(reply)
            if outcome == "ok":
                outcome = "correct" if answer == labels[i] else "wrong"
            elif outcome == "error":
                lost.setdefault(i, f"blind pass: {reply}")
            outcomes[teacher.name].append(outcome)
            if outcome == "correct":
                candidates[i].append({"teacher": teacher.name, "think": think, "mode": "blind"})
    return candidates, outcomes


def cross_check(teachers, candidates: list[list[dict]], labels, failures: Counter, lost: dict | None = None) -> None:
    """Step 2. Each candidate's reasoning goes to every other teacher, text only; a vote is a
    teacher that names the label from the reasoning alone. Adds `votes` and `voters`.
    An unparseable answer is a voter without a vote (counted in `failures`)."""
    lost = {} if lost is None else lost
    for checker in teachers:
        jobs = [(i, c) for i, cands in enumerate(candidates) if i not in lost
                for c in cands if c["teacher"] != checker.name]
        replies = checker.from_reasoning([(f"{i}:{c['teacher']}", c["think"]) for i, c in jobs])
        for (i, c), reply in zip(jobs, replies):
            if isinstance(reply, TransportError):
                lost.setdefault(i, f"cross-check: {reply}")
                continue
            valid = isinstance(reply, str) and is_valid_text(reply)
            answer = normalize_emotion(parse_answer(reply)) if valid else None
            if answer is None:
                failures[checker.name] += 1
            c["voters"] = c.get("voters", 0) + 1
            c["votes"] = c.get("votes", 0) + int(answer == labels[i])


def rationalize(teachers, items, labels, candidates, failures: Counter, lost: dict | None = None) -> None:
    """Step 3. For images without a candidate, ask teachers for reasoning given the label."""
    lost = {} if lost is None else lost
    todo = [i for i, cands in enumerate(candidates) if not cands and i not in lost]
    for teacher in teachers:
        replies = teacher.hinted([(items[i][0], items[i][1], labels[i]) for i in todo])
        for i, reply in zip(todo, replies):
            outcome, think, answer = read_reply(reply)
            if outcome == "error":
                lost.setdefault(i, f"rationalize: {reply}")
            elif outcome != "ok":
                failures[teacher.name] += 1
            elif answer == labels[i]:
                candidates[i].append({"teacher": teacher.name, "think": think, "mode": "hinted"})


def select(cands: list[dict], min_votes: int) -> dict | None:
    """Step 4. Most votes, then the shortest reasoning (then teacher name, for determinism)."""
    eligible = [c for c in cands if c.get("votes", 0) >= min_votes]
    return min(eligible, key=lambda c: (-c.get("votes", 0), len(c["think"]), c["teacher"])) if eligible else None


# ---------------------------------------------------------------------------------------------
# The run: chunks of images, resumable, summarised
# ---------------------------------------------------------------------------------------------
# Files next to OUT: .progress.jsonl (one line per DONE image: the only thing a rerun skips),
# .failures.jsonl (images this run could not finish: transport failures, unreadable images;
# rewritten by every run, since every run retries them), .summary.json.
EXIT_INCOMPLETE = 3        # some images remain to do because a teacher could not be reached
DEAD_CHUNKS_TO_STOP = 3    # consecutive chunks in which EVERY image failed in transport: stop


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def failures_path(out: Path) -> Path:
    return out.with_name(out.name + ".failures.jsonl")


def drop_unconfirmed_records(out: Path, done: set) -> int:
    """Remove COT records whose image has no progress line (a kill between the two appends):
    the image is redone, so keeping the record would duplicate it. Returns how many."""
    if not out.exists():
        return 0
    records = list(read_jsonl(out))
    keep = [r for r in records if r["id"] in done]
    if len(keep) < len(records):
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    return len(records) - len(keep)


def build(records: list[dict], root, teachers, out: Path, with_rationalize=False, min_votes=0, chunk=32) -> dict:
    """Process records not yet done, appending kept COT records to `out` and one status line per
    DONE image to OUT.progress.jsonl (kept / hinted / dropped, each teacher's blind outcome).

    An image is done only when every teacher's reply was parsed or judged. Images with a
    transport failure, and unreadable images, are listed in OUT.failures.jsonl and retried by
    the next run. Returns the summary over the whole output (this run and earlier ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prog, fails = progress_path(out), failures_path(out)
    cut = repair_jsonl_tail(out) + repair_jsonl_tail(prog)   # a crash can leave one partial line
    if cut:
        print(f"removed {cut} bytes of a partial last line left by an interrupted run")
    done = {r["id"] for r in read_jsonl(prog)} if prog.exists() else set()
    if dropped := drop_unconfirmed_records(out, done):
        print(f"removed {dropped} COT record(s) written just before an interruption; their images are redone")
    todo = [r for r in records if r["id"] not in done]
    print(f"{len(records)} records, {len(records) - len(todo)} already done, {len(todo)} to do")
    atomic_write_text(fails, "")   # this run retries every earlier failure
    failures, not_done, unreadable, dead_chunks = Counter(), Counter(), {}, 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="cot")
    for s in range(0, len(todo), chunk):
        wanted = todo[s:s + chunk]
        batch, images = load_images(root, wanted, unreadable)
        for r in (r for r in wanted if r["id"] in unreadable):
            append_jsonl(fails, {"id": r["id"], "kind": "unreadable", "error": unreadable[r["id"]]})
            not_done["unreadable"] += 1
        items = [(r["id"], img) for r, img in zip(batch, images)]
        labels = [r["label"] for r in batch]
        lost = {}
        candidates, outcomes = blind_pass(teachers, items, labels, lost)
        if with_rationalize:   # a parameter named `rationalize` would hide the function
            rationalize(teachers, items, labels, candidates, failures, lost)
        cross_check(teachers, candidates, labels, failures, lost)
        for i, r in enumerate(batch):
            if i in lost:
                append_jsonl(fails, {"id": r["id"], "kind": "transport", "error": lost[i]})
                not_done["transport"] += 1
                continue
            best = select(candidates[i], min_votes)
            if best is not None:   # the record first; a kill before its progress line is undone at restart
                append_jsonl(out, {"id": r["id"], "image": r["image"], "label": r["label"], "think": best["think"],
                                   "answer": r["label"], "teacher": best["teacher"], "votes": best.get("votes", 0),
                                   "voters": best.get("voters", 0), "mode": best["mode"]})
            append_jsonl(prog, {"id": r["id"], "label": r["label"],
                                "status": "dropped" if best is None else best["mode"],
                                "blind": {name: o[i] for name, o in outcomes.items()}})
        bar.update(len(wanted))
        dead_chunks = dead_chunks + 1 if batch and len(lost) == len(batch) else 0
        if dead_chunks == DEAD_CHUNKS_TO_STOP:
            print(f"stopping early: every image of the last {dead_chunks} chunks failed to reach a teacher "
                  f"(see the errors above and {fails}); run the same command again when the teachers are back",
                  file=sys.stderr)
            not_done["not_started"] = len(todo) - s - len(wanted)
            break
    bar.close()
    summary = summarise(out, teachers)
    summary["not_done"] = {"transport": not_done["transport"], "unreadable": not_done["unreadable"],
                           "not_started": not_done["not_started"], "failures_file": str(fails)}
    processed = len(todo) - not_done["not_started"]
    summary["this_run"] = {"processed": processed, "seconds": round(time.perf_counter() - start, 2),
                           "records_per_s": round(processed / max(1e-9, time.perf_counter() - start), 2),
                           "check_or_hint_failures": dict(failures)}
    atomic_write_json(out.with_name(out.name + ".summary.json"), summary)
    if not_done["transport"] or not_done["unreadable"]:
        print(f"{not_done['transport']} images could not be finished (teacher unreachable) and "
              f"{not_done['unreadable']} images are unreadable: listed in {fails}; a rerun retries them",
              file=sys.stderr)
    return summary


def summarise(out: Path, teachers) -> dict:
    """Kept / hinted / dropped per class and each teacher's blind accuracy and failures."""
    per_class = {c: Counter() for c in EMOTIONS}
    blind = defaultdict(Counter)
    for p in read_jsonl(progress_path(out)) if progress_path(out).exists() else []:
        per_class[p["label"]][p["status"]] += 1
        for name, outcome in p["blind"].items():
            blind[name][outcome] += 1
    teachers_summary = {}
    for name, c in blind.items():
        answered = c["correct"] + c["wrong"]
        teachers_summary[name] = {"blind_accuracy": round(c["correct"] / answered, 4) if answered else None,
                                  "correct": c["correct"], "wrong": c["wrong"],
                                  "failures": c["malformed"] + c["error"], "malformed": c["malformed"],
                                  "errors": c["error"]}
        calls = getattr(next((t for t in teachers if t.name == name), None), "calls", None)
        if calls:
            teachers_summary[name]["http"] = dict(calls)
    totals = Counter()
    for c in per_class.values():
        totals.update(c)
    return {"output": str(out), "images": sum(totals.values()), "kept": totals["blind"], "hinted": totals["hinted"],
            "dropped": totals["dropped"], "per_class": {k: dict(v) for k, v in per_class.items()},
            "teachers": teachers_summary}


SPLITS = ["train", "val", "test"]


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of a COT build (`python cot_builder.py ...`)."""
    data: str = arg(help="EmoSet-layout data root")
    teacher: list[str] = arg(help="toy:NAME | hf:PATH | openai:URL#MODEL; repeat (>= 2 for cross-checks)",
                             action="append")
    out: str = arg(help="output JSONL of COT records (appended; resumable)")
    split: str = arg("train", "split to annotate", choices=SPLITS)
    rationalize: bool = arg(False, "ask teachers for label-conditioned reasoning where none got it right")
    min_votes: int = arg(0, "keep only candidates with at least this many cross-check votes", type=int_at_least(0))
    limit: int | None = arg(None, "only the first N records of the split", type=int_at_least(1))
    workers: int = arg(8, "concurrent requests per HTTP teacher", type=int_at_least(1))
    chunk: int = arg(32, "images per processing chunk", type=int_at_least(1))
    skip_missing: bool = arg(False, "skip (and count) entries whose image is missing")
    # HTTP teachers
    timeout: float = arg(120.0, "seconds per HTTP request, whole reply included", type=float_in(0, lo_open=True))
    retries: int = arg(4, "retries of a failed HTTP request (backoff 1, 2, 4... s)", type=int_at_least(0))
    retry_after_cap: float = arg(60.0, "longest wait honoured from a Retry-After header, seconds", type=float_in(0))
    max_reply_bytes: int = arg(2 ** 20, "larger HTTP replies count as malformed", type=int_at_least(1))


def parse_build_args(argv=None) -> tuple[BuildConfig, list]:
    """The build's config and its teachers (a bad teacher spec is a usage error)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Export the output for TRL or verl: python cot_builder.py export --help")
    add_config_flags(p, BuildConfig)
    cfg = config_from_args(BuildConfig, p.parse_args(argv))
    if problem := output_path_problem(cfg.out, "file"):
        p.error(problem)
    http_options = dict(timeout=cfg.timeout, retries=cfg.retries, retry_after_cap=cfg.retry_after_cap,
                        max_reply_bytes=cfg.max_reply_bytes)
    try:
        teachers = [make_teacher(spec, cfg.workers, **http_options) for spec in cfg.teacher]
    except ValueError as e:
        p.error(str(e))
    if len({t.name for t in teachers}) != len(teachers):
        p.error("teacher names must be distinct")
    return cfg, teachers


def main(argv=None) -> dict:
    cfg, teachers = parse_build_args(argv)
    records, report = read_emoset_split(cfg.data, cfg.split, skip_missing=cfg.skip_missing, limit=cfg.limit)
    if report["skipped_missing"]:
        print(f"skipped {report['skipped_missing']} entries with missing images")
    summary = build(records, cfg.data, teachers, Path(cfg.out), cfg.rationalize, cfg.min_votes, cfg.chunk)
    print(json.dumps(summary, indent=2))
    return summary


def exit_code(summary: dict) -> int:
    """0 when every image is done (or unreadable: warned, listed, counted); EXIT_INCOMPLETE while
    images remain that a teacher could not be reached for (rerun the same command)."""
    return EXIT_INCOMPLETE if summary["not_done"]["transport"] or summary["not_done"]["not_started"] else 0


# ---------------------------------------------------------------------------------------------
# Export: the COT records as the RL dataset of TRL's GRPOTrainer or of verl. Formats checked
# against TRL v1.9.0 and verl v0.7.0 (docs/handoff.md). RL needs only
# the prompt (the one instruction and the image) and the label the rewards check.
# ---------------------------------------------------------------------------------------------
VERL_DATA_SOURCE = "emoset"   # verl's data_source column: names the dataset in its logs and reward calls
VERL_IMAGE_PLACEHOLDER = "<image>"   # verl puts the row's images where these stand in the prompt


def absolute_image_path(record: dict, root) -> str:
    """The record's image as an absolute path: the exported file is read from another working
    folder (a launcher's, a worker's), where a path relative to the data root means nothing."""
    return str(path_in_root(root, record["image"], f"image of {record['id']!r}").resolve())


def trl_row(record: dict, root) -> dict:
    """One row for TRL's GRPOTrainer (a conversational, vision-language dataset):
    prompt   the user turn, as text: GRPOTrainer inserts the image placeholder before the text
    image    absolute path; cast the column with datasets.Image() to give the trainer PIL images
    label    the column trl_accuracy_reward reads (TRL passes every extra column to the rewards)
    id       the record's id"""
    return {"prompt": [{"role": "user", "content": INSTRUCTION}], "image": absolute_image_path(record, root),
            "label": record["label"], "id": record["id"]}


def verl_row(record: dict, root, index: int) -> dict:
    """One row for verl's RL dataset (RLHFDataset): the prompt holds one <image> placeholder
    (image first, then the instruction, as this project's own prompt), `images` one absolute
    path per placeholder, and reward_model.ground_truth the label verl_compute_score checks."""
    return {"data_source": VERL_DATA_SOURCE,
            "prompt": [{"role": "user", "content": VERL_IMAGE_PLACEHOLDER + INSTRUCTION}],
            "images": [absolute_image_path(record, root)],
            "ability": "emotion_recognition",
            "reward_model": {"style": "rule", "ground_truth": record["label"]},
            "extra_info": {"index": index, "id": record["id"]}}


EXPORT_SUFFIX = {"trl": ".jsonl", "verl": ".json"}   # verl reads *.json (JSON Lines inside) or *.parquet


def export_records(records: list[dict], root, to: str, out_dir, name: str) -> Path:
    """Write the records as TRL or verl rows, one JSON object per line, atomically; return the path.
    Both libraries load the file with datasets' "json" builder, which reads one object per line."""
    if to not in EXPORT_SUFFIX:
        raise ValueError(f"export: --to must be one of {sorted(EXPORT_SUFFIX)}, got {to!r}")
    rows = [trl_row(r, root) if to == "trl" else verl_row(r, root, i) for i, r in enumerate(records)]
    path = Path(out_dir) / f"{name}{EXPORT_SUFFIX[to]}"
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


@dataclass(frozen=True)
class ExportConfig:
    """Every setting of `python cot_builder.py export`: the records come from --cot or from --split."""
    to: str = arg(help="the library whose dataset layout to write", choices=sorted(EXPORT_SUFFIX))
    data: str = arg(help="the EmoSet-layout data root the records' image paths are relative to")
    out: str = arg(help="output folder")
    cot: str | None = arg(None, "COT records JSONL written by cot_builder.py (the training prompts)")
    split: str | None = arg(None, "an EmoSet split instead of --cot (e.g. verl's data.val_files)", choices=SPLITS)
    name: str | None = arg(None, "output file name without suffix (default: the --cot file's stem, or the split)")
    skip_invalid: bool = arg(False, "skip (and count) invalid COT records instead of stopping")
    skip_missing: bool = arg(False, "with --split: skip (and count) entries whose image is missing")


def parse_export_args(argv=None) -> ExportConfig:
    p = argparse.ArgumentParser(prog="cot_builder.py export",
                                description="Convert COT records to the RL dataset of TRL's GRPOTrainer or verl.")
    add_config_flags(p, ExportConfig)
    cfg = config_from_args(ExportConfig, p.parse_args(argv))
    if cfg.cot is None and cfg.split is None:   # argparse's own words for a required exclusive group
        p.error("one of the arguments --cot --split is required")
    if cfg.cot is not None and cfg.split is not None:
        p.error("argument --split: not allowed with argument --cot")
    if problem := output_path_problem(cfg.out, "dir"):
        p.error(problem)
    return cfg


def export_main(argv=None) -> int:
    cfg = parse_export_args(argv)
    try:
        if cfg.cot:
            records, report = read_cot_records(cfg.cot, cfg.data, skip_invalid=cfg.skip_invalid)
            skipped = f"{report['skipped_invalid']} invalid records skipped"
        else:
            records, report = read_emoset_split(cfg.data, cfg.split, skip_missing=cfg.skip_missing)
            skipped = f"{report['skipped_missing']} entries with missing images skipped"
    except DataError as e:
        raise SystemExit(f"error: cot_builder.py export: {e}") from None
    name = cfg.name or (Path(cfg.cot).stem if cfg.cot else cfg.split)
    path = export_records(records, cfg.data, cfg.to, cfg.out, name)
    print(f"wrote {len(records)} {cfg.to} rows to {path} ({skipped})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        sys.exit(run_cli(export_main, sys.argv[2:]))
    sys.exit(exit_code(run_cli(main)))
