"""Benchmark a fresh `bash demo.sh`: wall-clock time, CPU time, and the machine's load meanwhile.

    python scripts/bench_demo.py [--out runs/bench_demo] [-- demo.sh flags...]

Deletes OUT, runs `bash demo.sh --out OUT FLAGS` once, and writes OUT/bench.json: wall seconds,
the CPU seconds (user + system) of demo.sh and everything it started, the seconds per stage
(demo.sh's times.tsv), and the 1-minute load average sampled every 5 s (min / mean / max). On a
shared machine the wall time depends on the other jobs; the load says how much, and the CPU
seconds do not depend on it much.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sample_load(samples: list[float], stop: threading.Event, every: float = 5.0) -> None:
    while not stop.is_set():
        samples.append(os.getloadavg()[0])
        stop.wait(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_demo", help="demo.sh output folder (deleted first)")
    p.add_argument("flags", nargs="*", help="more demo.sh flags, after --")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_load, args=(samples, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "demo.sh"), "--out", str(out), *args.flags], cwd=ROOT)
    wall = time.perf_counter() - start
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages = {}
    if (out / "times.tsv").exists():
        for line in (out / "times.tsv").read_text().splitlines()[1:]:
            name, seconds = line.split("\t")
            stages[name] = int(seconds)
    report = {"command": f"bash demo.sh --out {out} {' '.join(args.flags)}".strip(), "exit_code": proc.returncode,
              "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "cores": os.cpu_count(),
              "load_1min": {"min": min(samples), "mean": round(statistics.mean(samples), 2), "max": max(samples)},
              "stages_s": stages}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
