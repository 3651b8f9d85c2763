"""The stage table over seeds: mean +- std per row, each stage's share of zero-std groups, the
facts each stage's reasoning gets right, the RL runs' entropy, KL and clip fractions, pictures.

    python scripts/stage_table.py RUN_DIR [RUN_DIR ...] --out DIR

Each RUN_DIR is one seed's `demo.sh` output folder: `eval/results.json` (greedy, one row per
checkpoint; each row names its run folder, whose `metrics.jsonl` holds the training log), and if
present `eval_t1/results.json` (the same checkpoints sampled at temperature 1: rows `NAME@T1`),
and `data/toy_info.json` (the label noise, hence the ceiling). On the counting-rule toys the facts
stated in every completion are read back and checked (scripts/hard_facts.py). Writes to DIR:
`stage_table.md`, `stage_table.json`, `stage_bars.png` (test accuracy, mean +- std, one dot per
seed, the ceiling dashed), `stage_facts.png` (per-fact accuracy per stage), `stage_curves.png`
(the RL stages' training curves side by side, every seed faint, their mean bold) and
`sft_curves.png` (the same for the baseline's and stage 1's validation accuracy and loss).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import charts  # noqa: E402
from data import atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402
from hard_facts import annotations, fact_row  # noqa: E402

METRICS = [("accuracy", "Acc"), ("uar", "UAR"), ("macro_f1", "F1"), ("format_rate", "Format")]
FACTS = [("background", "bg"), ("colour", "colour"), ("count", "count"), ("all three", "all 3"),
         ("implied answer", "implied")]


def mean_pm_std(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    """`mean +- sample std` in percent (std 0 for one value); '-' for no values."""
    if not values:
        return "-"
    mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:{fmt}} +- {scale * std:{fmt}}"


def ceiling_of(toy_info: dict, split: str = "test") -> float:
    """The best accuracy any model can get on a toy split: a model that follows the rule exactly
    is wrong on every relabelled image (label noise always picks another emotion)."""
    s = toy_info["splits"][split]
    return 1 - s["noisy_labels"] / s["n"]


def zero_std_share(metrics_rows: list[dict]) -> float | None:
    """Mean over steps of `frac_zero_std` (None for runs that are not GRPO runs)."""
    values = [r["frac_zero_std"] for r in metrics_rows if isinstance(r.get("frac_zero_std"), (int, float))]
    return statistics.mean(values) if values else None


# The RL rows' training diagnostics, from their logs: mean over steps (and the largest step) of
# each. The clip fractions answer whether a clip setting can matter at all: a bound that no
# token reaches changes nothing (the log's values are means over the mu updates, the first of
# which has ratio exactly 1, so they are diluted by 1/mu).
TRAINING = [("entropy", "entropy", 1.0, ".3f"), ("kl_mean", "KL", 1.0, ".3f"),
            ("frac_clipped_lower", "clipped low %", 100.0, ".2f"),
            ("frac_clipped_upper", "clipped high %", 100.0, ".2f")]


def training_stats(metrics_rows: list[dict]) -> dict[str, float]:
    """{key: mean over steps, key_max: largest step} for each TRAINING key the log has."""
    out = {}
    for key, *_ in TRAINING:
        values = [r[key] for r in metrics_rows if isinstance(r.get(key), (int, float))]
        if values:
            out[key], out[f"{key}_max"] = statistics.mean(values), max(values)
    return out


def training_markdown(rows: dict[str, dict[str, list[float]]]) -> str:
    """The RL rows' diagnostics: mean +- std over seeds of each run's mean, and the largest step."""
    head = ["RL run"] + [f"{h} (max)" for _, h, *_ in TRAINING]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, vals in rows.items():
        if "entropy" not in vals or name.endswith("@T1"):
            continue
        cells = [name] + [f"{mean_pm_std(vals[k], scale, fmt)} ({scale * max(vals[f'{k}_max']):{fmt}})"
                          if k in vals else "-" for k, _, scale, fmt in TRAINING]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def stage_rows(per_seed: list[dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """{row: {metric: [value per seed]}} from one {row: metrics} dict per seed; rows keep the
    first seed's order, and a row missing from some seed simply has fewer values."""
    rows: dict[str, dict[str, list[float]]] = {}
    for results in per_seed:
        for name, m in results.items():
            row = rows.setdefault(name, {})
            for key, value in m.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row.setdefault(key, []).append(value)
    return rows


def markdown(rows: dict[str, dict[str, list[float]]], ceilings: list[float]) -> str:
    """One line per row: mean +- std over seeds of each metric, the zero-std share, the facts its
    completions state correctly (counting-rule toys), and the accuracy per seed."""
    facts = [(k, h) for k, h in FACTS if any(f"fact_{k}" in v for v in rows.values())]
    head = (["model", "seeds"] + [h for _, h in METRICS] + ["zero-std groups"] + [f"fact: {h}" for _, h in facts]
            + ["Acc per seed"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, vals in rows.items():
        cells = [name, str(len(vals.get("accuracy", [])))] + [mean_pm_std(vals.get(k, [])) for k, _ in METRICS]
        cells += [mean_pm_std(vals.get("zero_std", []))] + [mean_pm_std(vals.get(f"fact_{k}", [])) for k, _ in facts]
        cells += [", ".join(f"{100 * v:.1f}" for v in vals.get("accuracy", []))]
        lines.append("| " + " | ".join(cells) + " |")
    blanks = " | " * (len(METRICS) + len(facts))
    lines.append(f"| label-noise ceiling | {len(ceilings)} | {mean_pm_std(ceilings)}{blanks}"
                 + ", ".join(f"{100 * c:.1f}" for c in ceilings) + " |")
    return "\n".join(lines) + "\n"


def run_results(run: Path) -> tuple[dict[str, dict], str]:
    """{row: metrics} of one run folder (greedy rows, then the temperature-1 rows as NAME@T1),
    each with its zero-std share and, on counting-rule data, the facts read back; and the split."""
    truth = None
    toy_info = json.loads((run / "data" / "toy_info.json").read_text())
    if toy_info.get("difficulty") in ("hard", "stepwise"):
        truth = annotations(run / "data")
    rows, split = {}, None
    for folder, suffix in (("eval", ""), ("eval_t1", "@T1")):
        if not (run / folder / "results.json").exists():
            continue
        results = json.loads((run / folder / "results.json").read_text())
        split = split or results["split"]
        for name, m in results["results"].items():
            log_path = Path(m["model"]) / "metrics.jsonl"
            log = list(read_jsonl(log_path)) if log_path.exists() else []
            m["zero_std"] = zero_std_share(log) if log else None
            m.update(training_stats(log))
            m["log"] = str(log_path)
            predictions = run / folder / f"predictions_{name}.jsonl"
            preds = list(read_jsonl(predictions)) if truth is not None and predictions.exists() else []
            if any("<think>" in p["completion"] for p in preds):   # (the label baseline states no facts)
                m.update({f"fact_{k}": v for k, v in fact_row(preds, truth).items()})
            rows[name + suffix] = m
    return rows, split


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Mean +- std over seeds of demo.sh runs, with zero-std shares and pictures.")
    p.add_argument("runs", nargs="+", help="one demo.sh output folder per seed")
    p.add_argument("--out", required=True, help="folder for stage_table.md/.json, stage_bars.png, stage_curves.png")
    p.add_argument("--curves", nargs="+", default=["stage2_format", "stage3_format_acc", "stage4_clgrpo"],
                   help="rows whose training curves go side by side")
    p.add_argument("--sft-curves", nargs="+", default=["baseline", "stage1_sft"],
                   help="rows whose validation accuracy and loss go side by side in sft_curves.png")
    args = p.parse_args(argv)
    per_seed, ceilings, logs = [], [], {}
    for run in map(Path, args.runs):
        results, split = run_results(run)
        for name, m in results.items():
            logs.setdefault(name, []).append(Path(m.pop("log")))
        per_seed.append(results)
        ceilings.append(ceiling_of(json.loads((run / "data" / "toy_info.json").read_text()), split))
    rows = stage_rows(per_seed)
    table = markdown(rows, ceilings)
    if diagnostics := training_markdown(rows):
        table += ("\nRL runs' training logs: mean over steps, mean +- std over seeds (the largest step):\n\n"
                  + diagnostics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stage_table.md", table)
    atomic_write_json(out / "stage_table.json", {"runs": args.runs, "ceilings": ceilings, "rows": rows})
    accuracy = {n: [100 * v for v in vals["accuracy"]] for n, vals in rows.items()}
    charts.bar_chart_png(accuracy, out / "stage_bars.png",
                             f"test accuracy, mean +- std over {len(per_seed)} seeds (dots: seeds)",
                             reference=("label-noise ceiling", 100 * statistics.mean(ceilings)))
    facts = [(k, h) for k, h in FACTS[:4] if any(f"fact_{k}" in v for v in rows.values())]
    if facts:  # one bar per (stage, fact), coloured by fact
        bars = {f"{n} {h}": [100 * v for v in vals[f"fact_{k}"]] for n, vals in rows.items()
                if n != "baseline" for k, h in facts if f"fact_{k}" in vals}
        charts.bar_chart_png(bars, out / "stage_facts.png",
                                 "facts the reasoning states correctly (%), test split; colour = fact",
                                 colors=[i % len(facts) for i in range(len(bars))])
    curves = {n: [f for f in logs[n] if f.exists()] for n in args.curves if n in logs}
    if curves:
        charts.curves_side_by_side_png(curves, out / "stage_curves.png")
    sft = {n: [f for f in logs[n] if f.exists()] for n in args.sft_curves if n in logs}
    if sft:  # is the label baseline flat, and where is COT SFT, step by step
        charts.curves_side_by_side_png(sft, out / "sft_curves.png", ["val_accuracy", "val_format_rate", "loss"])
    print(table)


if __name__ == "__main__":
    main()
