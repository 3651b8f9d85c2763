"""Evaluation: greedy answers on an EmoSet-layout split, metrics, one comparison table.

    python eval.py --model runs/demo/baseline --model runs/demo/stage1 ... --data ROOT --split test

Writes to --out: results.json, results.md (the table), predictions_<name>.jsonl (every
completion) and confusion_<name>.png per checkpoint. With --append, the rows already in
--out/results.json stay (same split and records; a row of the same name is replaced), so
checkpoints can be evaluated one at a time as a pipeline produces them. The metric functions are pure: predictions
and labels in, numbers out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import charts
import families
import vlm
from config import add_config_flags, arg, config_from_args, float_in, int_at_least, output_path_problem, run_cli
from data import EMOTIONS, INVALID, atomic_write_json, atomic_write_text, load_images, read_emoset_split, valence
from rewards import format_reward, normalize_emotion, parse_answer


# ---------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------
def confusion_matrix(preds: list[str | None], labels: list[str]) -> list[list[int]]:
    """8 x 9 counts: rows = true label (EMOTIONS order), columns = prediction + 'invalid'."""
    cols = list(EMOTIONS) + [INVALID]
    matrix = [[0] * len(cols) for _ in EMOTIONS]
    for pred, label in zip(preds, labels):
        matrix[EMOTIONS.index(label)][cols.index(pred if pred in EMOTIONS else INVALID)] += 1
    return matrix


def classification_metrics(preds: list[str | None], labels: list[str], formats: list[float] | None = None,
                           answers: list[str | None] | None = None) -> dict:
    """Accuracy, per-class recall, UAR (macro recall), macro F1, valence accuracy, rates.

    A prediction is one of the 8 labels, as `prediction_of` reads it with the reward's own
    parser; anything else (None) is an invalid answer and counts as wrong everywhere:
        invalid_rate     = share of completions with no valid prediction (the confusion
                           matrix's 'invalid' column)
        unparseable_rate = share with no answer at all, i.e. not exactly one answer block ending
                           the completion (needs `answers`; None without them). The rest of the
                           invalid ones have an answer block whose content is not one label word.
        format_rate      = mean format reward (needs `formats`; None without them)
    Classes absent from `labels` have recall None and are left out of the macro averages
    (no 0/0 NaN); a class that is never predicted has precision 0."""
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"classification_metrics: {len(preds)} predictions for {len(labels)} labels")
    for name, extra in (("formats", formats), ("answers", answers)):
        if extra is not None and len(extra) != len(labels):
            raise ValueError(f"classification_metrics: {len(extra)} {name} for {len(labels)} labels")
    n = len(labels)
    cm = confusion_matrix(preds, labels)
    recall, f1 = {}, {}
    for i, c in enumerate(EMOTIONS):
        support, tp = sum(cm[i]), cm[i][i]
        predicted = sum(row[i] for row in cm)
        if support == 0:
            recall[c] = None
            continue
        recall[c] = tp / support
        precision = tp / predicted if predicted else 0.0
        f1[c] = 2 * precision * recall[c] / (precision + recall[c]) if precision + recall[c] else 0.0
    present = [c for c in EMOTIONS if recall[c] is not None]
    valence_hits = sum(p in EMOTIONS and valence(p) == valence(y) for p, y in zip(preds, labels))
    return {
        "n": n,
        "accuracy": sum(p == y for p, y in zip(preds, labels)) / n,
        "uar": sum(recall[c] for c in present) / len(present),
        "macro_f1": sum(f1[c] for c in present) / len(present),
        "valence_accuracy": valence_hits / n,
        "format_rate": (sum(formats) / n) if formats is not None else None,
        "invalid_rate": sum(p not in EMOTIONS for p in preds) / n,
        "unparseable_rate": (sum(a is None for a in answers) / n) if answers is not None else None,
        "per_class_recall": recall,
        "confusion": cm,
    }


def prediction_of(completion: str) -> dict:
    """What eval reads from one completion, with exactly the accuracy reward's parser:
    `answer` = parse_answer (None: not exactly one answer block ending the completion),
    `pred` = normalize_emotion(answer), i.e. rewards.predicted_label (None: not one label word),
    `format` = format_reward. A completion earns accuracy reward 1 iff its `pred` is its label."""
    answer = parse_answer(completion)
    return {"answer": answer, "pred": normalize_emotion(answer), "format": format_reward(completion)}


# ---------------------------------------------------------------------------------------------
# Running a model
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, processor, root, records: list[dict], batch_size: int = 32, max_new_tokens: int = 96,
            progress: bool = True, skipped: dict | None = None, temperature: float = 0.0,
            samples: int = 1) -> list[dict]:
    """Completions for records, batched: greedy (temperature 0), or `samples` completions per
    image at `temperature` (what GRPO sees when it samples at that temperature). One dict per
    completion of a readable record (id, label, completion, ...); unreadable images are left
    out, warned about once and added to `skipped`."""
    if temperature == 0 and samples != 1:
        raise ValueError("greedy decoding gives one completion per image: use samples=1")
    out = []
    skipped = {} if skipped is None else skipped
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    for s in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress, leave=False):
        chunk, images = load_images(root, records[s:s + batch_size], skipped)
        if not chunk:
            continue
        rollout = vlm.sample_completions(model, processor, images, group_size=samples, max_new_tokens=max_new_tokens,
                                         **sampling)
        rows = [r for r in chunk for _ in range(samples)]  # generate() keeps each image's samples together
        for r, text, cut in zip(rows, rollout.texts, rollout.truncated.tolist()):
            out.append({"id": r["id"], "label": r["label"], "completion": text, "truncated": cut,
                        **prediction_of(text)})
    return out


def evaluate(model, processor, root, records, batch_size=32, max_new_tokens=96, progress=True, skipped=None,
             temperature=0.0, samples=1):
    """(metrics, predictions) of a model on records (unreadable images and sampling: see `predict`)."""
    predictions = predict(model, processor, root, records, batch_size, max_new_tokens, progress, skipped,
                          temperature, samples)
    if not predictions:
        raise ValueError(f"none of the {len(records)} images could be read (see the warnings above)")
    metrics = classification_metrics([p["pred"] for p in predictions], [p["label"] for p in predictions],
                                     [p["format"] for p in predictions], [p["answer"] for p in predictions])
    return metrics, predictions


def periodic_validation(model, processor, cfg, val: list[dict], step: int, skipped: dict) -> dict:
    """A trainer's validation: every cfg.eval_every steps and at the last one, the accuracy and
    format rate on `val` (empty when validation is off); {} at other steps. Leaves the model in
    training mode."""
    if not val or (step % cfg.eval_every and step != cfg.steps):
        return {}
    metrics, _ = evaluate(model, processor, cfg.data, val, max_new_tokens=cfg.max_new_tokens, progress=False,
                          skipped=skipped)
    model.train()
    return {"val_accuracy": metrics["accuracy"], "val_format_rate": metrics["format_rate"]}


# ---------------------------------------------------------------------------------------------
# Tables (the pictures are drawn by charts.py)
# ---------------------------------------------------------------------------------------------
COLUMNS = [("accuracy", "Acc"), ("uar", "UAR"), ("macro_f1", "F1"), ("valence_accuracy", "Valence"),
           ("format_rate", "Format"), ("invalid_rate", "Invalid")]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(results: dict[str, dict]) -> str:
    """One row per checkpoint: the headline metrics, then per-class recall (all in %)."""
    head = ["model"] + [h for _, h in COLUMNS] + [c[:5] for c in EMOTIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        cells = [name] + [_pct(m[k]) for k, _ in COLUMNS] + [_pct(m["per_class_recall"][c]) for c in EMOTIONS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(result_files: list[str], keys=("accuracy", "uar", "macro_f1", "format_rate")) -> str:
    """Mean +- std (over seeds) of each model row across several results.json: the ablation table."""
    per_model: dict[str, dict[str, list[float]]] = {}
    for f in result_files:
        for name, m in json.loads(Path(f).read_text())["results"].items():
            for k in keys:
                per_model.setdefault(name, {}).setdefault(k, []).append(m[k])
    lines = ["| setting | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, vals in per_model.items():
        cells = [f"{100 * statistics.mean(v):.1f} +- {100 * (statistics.stdev(v) if len(v) > 1 else 0.0):.1f}"
                 for v in vals.values()]
        lines.append(f"| {name} | {len(next(iter(vals.values())))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """Every setting of an evaluation (or, with --aggregate, of a mean +- std table over seeds)."""
    model: list | None = arg(None, "model folder or run folder; repeat to compare", action="append")
    name: list | None = arg(None, "row name per --model (default: the folder name)", action="append")
    aggregate: list | None = arg(None, "instead: mean +- std over several results.json (seeds)", nargs="+",
                                 metavar="RESULTS_JSON")
    data: str | None = arg(None, "EmoSet-layout data root")
    split: str = arg("test", "split to evaluate", choices=["train", "val", "test"])
    limit: int | None = arg(None, "evaluate only the first N records", type=int_at_least(1))
    skip_missing: bool = arg(False, "skip (and count) entries whose image is missing")
    batch_size: int = arg(32, "prompts per generate call", type=int_at_least(1))
    max_new_tokens: int = arg(96, "completion length limit", type=int_at_least(1))
    out: str = arg("runs/eval", "output folder for tables, predictions and pictures")
    device: str = arg("auto", "auto, cpu or cuda")
    dtype: str = arg("float32", "weights dtype", choices=list(families.DTYPES))
    max_image_tokens: int | None = arg(None, families.IMAGE_TOKENS_HELP, type=int_at_least(1))
    temperature: float = arg(0.0, "0: greedy (the standard metric); > 0: sample at this temperature, e.g. 1 for "
                             "the accuracy GRPO's samples have", type=float_in(0))
    samples: int = arg(1, "completions per image when sampling (metrics over all of them)", type=int_at_least(1))
    seed: int = arg(0, "sampling seed (with --temperature > 0)")
    append: bool = arg(False, "keep the rows already in --out/results.json (same split and n); same name: replaced")


def previous_rows(path: Path, split: str, n_records: int) -> tuple[dict, list]:
    """The rows of an earlier results.json that --append adds to; none if there is no file. Rows
    measured on another split or another number of records would not compare, so that is an error."""
    if not path.exists():
        return {}, []
    try:
        before = json.loads(path.read_text())
        rows, n = before["results"], before["n"] + len(before["skipped_unreadable"])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a results.json of eval.py ({e}); remove it or drop --append")
    if before.get("split") != split or n != n_records:
        raise SystemExit(f"{path}: its rows are on split {before.get('split')} with {n} records, this evaluation "
                         f"on {split} with {n_records}; use another --out or drop --append")
    return rows, before["skipped_unreadable"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Evaluate checkpoints on an EmoSet-layout split and compare them.")
    add_config_flags(p, EvalConfig)
    args = config_from_args(EvalConfig, p.parse_args(argv))
    if problem := output_path_problem(args.out, "dir"):
        p.error(problem)
    if args.aggregate:
        table = aggregate(args.aggregate)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "aggregate.md", table)
        print(table)
        return
    if not args.model or not args.data:
        p.error("--model and --data are required (or use --aggregate)")
    if args.samples > 1 and args.temperature == 0:
        p.error("--samples > 1 needs --temperature > 0 (greedy decoding gives one completion per image)")

    names = args.name or [Path(m).name for m in args.model]
    if len(names) != len(args.model) or len(set(names)) != len(names):
        p.error("--name must be given once per --model, and names must be distinct")
    records, report = read_emoset_split(args.data, args.split, skip_missing=args.skip_missing, limit=args.limit)
    if report["skipped_missing"]:
        print(f"skipped {report['skipped_missing']} entries with missing images: {report['skipped_ids']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, skipped_before = previous_rows(out / "results.json", args.split, len(records)) if args.append else ({}, [])
    unreadable = {}   # id -> reason, shared so each image is warned about once
    for name, path in zip(names, args.model):
        model, processor = families.load_model(path, args.dtype, args.device, max_image_tokens=args.max_image_tokens)
        start = time.perf_counter()
        torch.manual_seed(args.seed)   # each row samples from the same seed
        metrics, predictions = evaluate(model, processor, args.data, records, args.batch_size, args.max_new_tokens,
                                        skipped=unreadable, temperature=args.temperature, samples=args.samples)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        metrics["skipped_unreadable"] = len(unreadable)
        metrics["model"] = str(path)
        results[name] = metrics
        atomic_write_text(out / f"predictions_{name}.jsonl", "".join(json.dumps(x) + "\n" for x in predictions))
        charts.confusion_png(metrics["confusion"], out / f"confusion_{name}.png",
                             f"{name} ({args.split}, n={metrics['n']})")
        print(f"{name}: accuracy {metrics['accuracy']:.3f}, UAR {metrics['uar']:.3f} ({metrics['seconds']} s)")
    table = markdown_table(results)
    skipped_ids = sorted(set(skipped_before) | set(unreadable))
    n = len(records) - len(skipped_ids)
    atomic_write_json(out / "results.json", {"split": args.split, "n": n, "skipped_unreadable": skipped_ids,
                                             "results": results})
    atomic_write_text(out / "results.md", table)
    skipped = f", {len(unreadable)} unreadable images skipped" if unreadable else ""
    print(f"\n{args.split} split, n = {n}{skipped} (all numbers in %)\n\n{table}")


if __name__ == "__main__":
    run_cli(main)
