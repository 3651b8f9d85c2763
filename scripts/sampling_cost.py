"""What generation cost per group with reward signal, from clgrpo.py run folders (metrics.jsonl).

    python scripts/sampling_cost.py RUN [RUN ...]

One markdown row per run: generation rounds and generations per step, groups with signal per
step, generations per useful group (sum of generations / sum of useful groups), steps whose batch
had no signal, seconds per step (sample + log-probs + update) and seconds per useful group.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import read_jsonl  # noqa: E402


def cost_row(run: str) -> str:
    rows = list(read_jsonl(Path(run) / "metrics.jsonl"))
    n = len(rows)
    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    useful, generations = total("useful_groups"), total("generations")
    phases = [total(f"time_{k}") / n for k in ("sample", "logprobs", "update")]
    step_s = sum(sum(v for k, v in r.items() if k.startswith("time_")) for r in rows) / n
    per_group = f"{generations / useful:.1f}" if useful else "n/a"
    per_group_s = f"{step_s * n / useful:.2f}" if useful else "n/a"
    no_signal = sum(r["useful_groups"] == 0 for r in rows)
    return (f"| {run} | {total('gen_rounds') / n:.2f} | {generations / n:.0f} | {useful / n:.2f} | {per_group} | "
            f"{no_signal} / {n} | {step_s:.2f} ({' + '.join(f'{x:.2f}' for x in phases)}) | {per_group_s} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("| run | rounds / step | generations / step | groups with signal / step | generations / useful group "
          "| steps with no signal | s / step (sample + log-probs + update) | s / useful group |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        print(cost_row(run))
