"""Run one training command twice and say whether the two runs agree, bit for bit.

    python scripts/same_twice.py OUT_A OUT_B -- python clgrpo.py --stage 2 --model M --data D --steps 10 ...

The command is run once with `--out OUT_A` and once with `--out OUT_B` appended (both folders
are deleted first), with the environment as it is (set OMP_NUM_THREADS to fix the threads).
Then it compares the two `metrics.jsonl`, leaving out the wall-clock fields (time_*,
tokens_per_s, step_s), and the saved weights (checkpoint/model.safetensors, byte for byte).
Prints the first differing step and key, or that they agree; exit code 0 iff they agree.

    python scripts/same_twice.py --compare RUN_A RUN_B [RUN_A2 RUN_B2 ...]

compares run folders that are already there the same way (e.g. a run of the code before a
refactor, kept as the reference, against the same command run after it).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

CLOCK_KEYS = ("time_", "tokens_per_s", "step_s")


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(CLOCK_KEYS)}


def first_difference(a: Path, b: Path) -> str | None:
    rows_a = [comparable(json.loads(line)) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [comparable(json.loads(line)) for line in (b / "metrics.jsonl").read_text().splitlines()]
    if len(rows_a) != len(rows_b):
        return f"{len(rows_a)} vs {len(rows_b)} log lines"
    for ra, rb in zip(rows_a, rows_b):
        for key in sorted(set(ra) | set(rb)):
            if ra.get(key) != rb.get(key):
                return f"step {ra.get('step')}: {key} = {ra.get(key)!r} vs {rb.get(key)!r}"
    wa, wb = a / "checkpoint" / "model.safetensors", b / "checkpoint" / "model.safetensors"
    if wa.read_bytes() != wb.read_bytes():
        return "the logs agree but the saved weights differ"
    return None


def compare(folders: list[str]) -> None:
    if not folders or len(folders) % 2:
        raise SystemExit(__doc__)
    diffs = 0
    for a, b in zip(folders[::2], folders[1::2]):
        diff = first_difference(Path(a), Path(b))
        n = len((Path(a) / "metrics.jsonl").read_text().splitlines())
        print(f"{a} vs {b}: " + (f"differ: {diff}" if diff else f"identical: {n} log lines (clock fields left out) "
                                                              "and the weights"))
        diffs += diff is not None
    raise SystemExit(1 if diffs else 0)


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:
        compare(sys.argv[2:])
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    out_a, out_b, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4:]
    for out in (out_a, out_b):
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(command + ["--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    diff = first_difference(out_a, out_b)
    n = len((out_a / "metrics.jsonl").read_text().splitlines())
    print(f"differ: {diff}" if diff else f"identical: {n} log lines (clock fields left out) and the weights")
    raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
