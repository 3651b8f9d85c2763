"""Which facts a model's reasoning gets right on the hard toy (background, largest colour, count).

    python scripts/hard_facts.py DATA_ROOT PREDICTIONS_JSONL [PREDICTIONS_JSONL ...]

For each predictions file that eval.py wrote, reads the facts back from every completion's think
block with `toy_teachers.facts_from_text` and compares them with the image's annotation. One markdown
row per file: the share of completions that state each fact correctly (a fact not stated counts
as wrong), all three, the answer that the stated facts imply under the counting rule, and the
answer itself (against the rule's emotion, so label noise does not count here).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import toy  # noqa: E402
import toy_teachers  # noqa: E402
from data import read_jsonl  # noqa: E402


def annotations(root: Path) -> dict[str, dict]:
    """image id -> the `toy` part of its annotation, for every split."""
    out = {}
    for split in ("train", "val", "test"):
        for entry in json.loads((root / f"{split}.json").read_text()):
            ann_rel = next(p for p in entry if isinstance(p, str) and p.startswith("annotation/"))
            out[Path(ann_rel).stem] = json.loads((root / ann_rel).read_text())["toy"]
    return out


def fact_row(predictions: list[dict], truth: dict[str, dict]) -> dict[str, float]:
    hits = {"background": 0, "colour": 0, "count": 0, "all three": 0, "implied answer": 0, "answer": 0}
    for p in predictions:
        t = truth[p["id"]]
        think = p["completion"].split("<think>")[-1].split("</think>")[0]
        background, colour, count = toy_teachers.facts_from_text(think)
        ok = [background == t["background"], colour == t["color"], count == t["count"]]
        for key, good in zip(("background", "colour", "count"), ok):
            hits[key] += good
        hits["all three"] += all(ok)
        implied = toy.counting_rule(background, colour, count) if background and colour and count else None
        hits["implied answer"] += implied == t["rule_emotion"]
        hits["answer"] += p["pred"] == t["rule_emotion"]
    return {k: v / len(predictions) for k, v in hits.items()}


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    truth = annotations(Path(sys.argv[1]))
    cols = ["background", "colour", "count", "all three", "implied answer", "answer"]
    print("| predictions | n | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for f in sys.argv[2:]:
        preds = list(read_jsonl(f))
        row = fact_row(preds, truth)
        print(f"| {Path(f).stem.removeprefix('predictions_')} | {len(preds)} | "
              + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
