"""Benchmark a fresh `bash demo.sh`: wall-clock time, CPU time, and the machine's load meanwhile.

    python scripts/bench_demo.py [--out runs/bench_demo] [--fresh-clone DIR] [-- demo.sh flags...]

Deletes OUT, runs `bash demo.sh --out OUT FLAGS` once, and writes OUT/bench.json: wall seconds,
the CPU seconds (user + system) of demo.sh and everything it started, the seconds per stage
(demo.sh's times.tsv), and the 1-minute load average sampled every 5 s (min / mean / max). On a
shared machine the wall time depends on the other jobs; the load says how much, and the CPU
seconds do not depend on it much.

With --fresh-clone DIR it measures what a new user waits for: `git clone` of this repository's
committed HEAD into DIR (deleted first), a new virtual environment there, the two pip installs
of the quickstart, then the demo inside the clone (OUT relative to it); `install_s` and
`total_s` (clone + installs + demo) join the report.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sample_load(samples: list[float], stop: threading.Event, every: float = 5.0) -> None:
    while not stop.is_set():
        samples.append(os.getloadavg()[0])
        stop.wait(every)


def fresh_clone(target: Path) -> dict:
    """Clone HEAD into target, make target/.venv and install the quickstart's packages into it;
    the environment in which demo.sh then runs (the venv's bin first on PATH)."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(target / ".venv")], check=True)
    pip = [str(target / ".venv" / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, cwd=target)    # the CPU build, as in the README
    subprocess.run(pip + ["-r", "requirements.txt"], check=True, cwd=target)
    return {**os.environ, "PATH": f"{target / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "VIRTUAL_ENV": str(target / ".venv")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_demo", help="demo.sh output folder (deleted first)")
    p.add_argument("--fresh-clone", metavar="DIR", help="clone, install and run there (see above)")
    p.add_argument("flags", nargs="*", help="more demo.sh flags, after --")
    args = p.parse_args()
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_load, args=(samples, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    root, env, install_s = ROOT, None, None
    if args.fresh_clone:
        root = Path(args.fresh_clone).resolve()
        env = fresh_clone(root)
        install_s = time.perf_counter() - start
    out = root / args.out
    shutil.rmtree(out, ignore_errors=True)
    demo_start = time.perf_counter()
    proc = subprocess.run(["bash", str(root / "demo.sh"), "--out", str(out), *args.flags], cwd=root, env=env)
    end = time.perf_counter()
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages = {}
    if (out / "times.tsv").exists():
        for line in (out / "times.tsv").read_text().splitlines()[1:]:
            name, seconds = line.split("\t")
            stages[name] = int(seconds)
    report = {"command": f"bash demo.sh --out {args.out} {' '.join(args.flags)}".strip(), "exit_code": proc.returncode,
              "wall_s": round(end - demo_start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "cores": os.cpu_count(),
              "load_1min": {"min": min(samples), "mean": round(statistics.mean(samples), 2), "max": max(samples)},
              "stages_s": stages}
    if args.fresh_clone:
        report.update(fresh_clone=str(root), install_s=round(install_s, 1), total_s=round(end - start, 1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
