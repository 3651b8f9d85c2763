"""Benchmark: one GRPO step's model work with each image encoded once per pass (shared image
features, the project's path) against repeating each prompt's image for its G completions
(the path before: G vision passes per image, G copies of its pixels).

    python scripts/bench_vision.py                                   # the toy model (Idefics3)
    python scripts/bench_vision.py --family qwen2_vl --image-size 224
    python scripts/bench_vision.py --family internvl --device cuda

One step = sample G completions for each of B prompts, reference + old-policy log-probs (no
grad), one micro-batched policy update (forward + backward). Each mode runs in fresh processes
(so its peak memory, resident set on CPU or allocated on CUDA, is its own), alternating with the
other mode; the median step time of the fastest process of each mode is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def build(family: str, out: Path) -> Path:
    if family == "toy":
        import toy
        toy.build_tiny_vlm(out)
        return out
    import tiny_families
    return tiny_families.build_tiny_family(family, out)


def shared_step(model, processor, images, g, tokens, micro_batch):
    import torch

    import vlm
    rollout = vlm.sample_completions(model, processor, images, g, max_new_tokens=tokens)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    with torch.no_grad():
        for _ in range(2):  # reference and old policy
            vlm.completion_logprobs(model, rollout.prompts, ids, mask, g, micro_batch=micro_batch)
    features = vlm.encode_images(model, rollout.prompts, chunked_backward=True)
    for s in range(0, ids.shape[0], micro_batch):
        e = min(ids.shape[0], s + micro_batch)
        logp = vlm.completion_logprobs(model, rollout.prompts, ids[s:e], mask[s:e], g, features=features, first_row=s)
        (logp * mask[s:e]).sum().backward()
    features.backward()


def repeated_step(model, processor, images, g, tokens, micro_batch):
    import torch

    import vlm
    rows = [img for img in images for _ in range(g)]
    rollout = vlm.sample_completions(model, processor, rows, 1, max_new_tokens=tokens)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    chunks = [(s, min(len(rows), s + micro_batch)) for s in range(0, len(rows), micro_batch)]
    row_prompts = [vlm.encode_prompts(processor, rows[s:e], device=ids.device) for s, e in chunks]
    with torch.no_grad():
        for _ in range(2):
            for (s, e), prompts in zip(chunks, row_prompts):
                vlm.completion_logprobs(model, prompts, ids[s:e], mask[s:e])
    for (s, e), prompts in zip(chunks, row_prompts):
        (vlm.completion_logprobs(model, prompts, ids[s:e], mask[s:e]) * mask[s:e]).sum().backward()


def worker(args) -> dict:
    import torch
    from PIL import Image

    import families
    import vlm
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, processor = families.load_model(args.model, device=args.device)
    images = [Image.new("RGB", (args.image_size, args.image_size), (40 * i % 255, 90, 200)) for i in range(args.batch)]
    step = shared_step if args.mode == "shared" else repeated_step
    from vision_checks import vision_rows  # rows (images, tiles or patches) the vision tower is given
    rows = vision_rows(model, lambda: step(model, processor, images, args.group, args.tokens, args.micro_batch))
    model.zero_grad(set_to_none=True)
    times = []
    for i in range(args.repeats + 1):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(model, processor, images, args.group, args.tokens, args.micro_batch)
        model.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    image_tokens = int((vlm.encode_prompts(processor, images[:1])["input_ids"] == model.config.image_token_id).sum())
    return {"mode": args.mode, "step_s": round(statistics.median(times), 4), "peak_mib": round(peak / 2**20, 1),
            "image_tokens": image_tokens, "vision_rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="toy", help="toy, or a family of tests/tiny_families.py")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    p.add_argument("--batch", type=int, default=4, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--tokens", type=int, default=24, help="max new tokens per completion")
    p.add_argument("--micro-batch", type=int, default=8, help="completion rows per forward")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=3, help="processes per mode, alternating; the fastest is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=["shared", "repeated"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # a worker process
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(args.family, Path(tmp) / "model")
        runs = {"repeated": [], "shared": []}
        for _ in range(args.rounds):  # alternate the modes, so a busy spell of the machine hits both
            for mode in runs:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--model", str(folder)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
        rows = [min(r, key=lambda x: x["step_s"]) for r in runs.values()]  # the least disturbed run of each
    print(f"{args.family}: B={args.batch} G={args.group} {args.image_size}px images "
          f"({rows[0]['image_tokens']} image tokens), {args.tokens} new tokens, micro-batch {args.micro_batch}")
    for r in rows:
        print(f"  {r['mode']:>8}: {r['step_s']:.3f} s/step, peak {r['peak_mib']:.0f} MiB, "
              f"vision tower input rows per step {r['vision_rows']}")
    print(f"  speed-up {rows[0]['step_s'] / rows[1]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
