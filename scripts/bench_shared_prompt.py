"""What computing each prompt once per group saves: the shared-prompt path against the per-row path.

    python scripts/bench_shared_prompt.py [--family qwen2_vl] [--image-tokens 400] [--repeats 5]

Builds a tiny checkpoint of the family (tests/tiny_families.py: the real architecture, processor
and chat template at toy width) in a temporary folder, or takes `--family toy` (the demo's tiny
VLM), and times one GRPO step's passes on B prompts x G completions of `--completion` tokens:
- `sample`: G completions per prompt (the shared path prefills the B prompts once and continues
  the G rows from their cache; the per-row path is generate(num_return_sequences=G), which
  prefills B x G copies),
- `logprobs`: one no-grad log-prob pass (the reference; the per-row path of earlier versions ran
  it a second time for pi_old when mu > 1, which is now the first update's own forward),
- `update`: one forward + backward of the summed log-probs (one of the mu updates).
`step (mu)`: sample + reference + mu updates, plus the separate pi_old pass on the old path.
Both paths run alternately, `--repeats` times each, on one thread; the table shows medians.
The images are `--size` px squares, and the family's image-token budget (`--image-tokens`) makes
the prompt real-sized: hundreds of image tokens, as an EmoSet image gives a 1-2B model.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import families  # noqa: E402
import vlm  # noqa: E402


def images_of(size: int, b: int) -> list:
    """B different images (random pixels, so the vision tower sees distinct content)."""
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(b)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def passes(model, processor, images, completion, mask, group_size, tokens, shared: bool) -> dict:
    """Seconds of each pass on one path (shared=True: the prompt once per group)."""
    prompts = vlm.encode_prompts(processor, images)
    with mock.patch.object(vlm, "shares_prompt", lambda m: shared):
        def sample():
            torch.manual_seed(0)
            vlm.sample_completions(model, processor, images, group_size=group_size, max_new_tokens=tokens)

        def logprobs():
            with torch.no_grad():
                vlm.completion_logprobs(model, prompts, completion, mask, group_size, shared_prompt=shared)

        def update():
            features = vlm.encode_images(model, prompts, chunked_backward=True)
            lp = vlm.completion_logprobs(model, prompts, completion, mask, group_size, features=features,
                                         shared_prompt=shared)
            lp[mask.bool()].sum().backward()
            features.backward()
            model.zero_grad(set_to_none=True)

        return {"sample": timed(sample), "logprobs": timed(logprobs), "update": timed(update)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen2_vl", help="a tiny family of tests/tiny_families.py, or 'toy'")
    p.add_argument("--image-tokens", type=int, default=400, help="the family's image-token budget per image")
    p.add_argument("--size", type=int, default=448, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=4, help="B prompts")
    p.add_argument("--num-generations", type=int, default=8, help="G completions per prompt")
    p.add_argument("--completion", type=int, default=64, help="completion tokens (sampled and scored)")
    p.add_argument("--mu", type=int, default=2, help="updates per generation batch, for the step column")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing on (--gradient-checkpointing): the update recomputes each layer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import tiny_families
    from vision_checks import random_completions

    with tempfile.TemporaryDirectory() as tmp:
        if args.family == "toy":   # the demo's tiny VLM: 16 image tokens whatever the image size
            import toy
            folder = Path(tmp) / "toy"
            toy.build_tiny_vlm(folder)
        else:
            folder = tiny_families.build_tiny_family(args.family, Path(tmp) / args.family)
        budget = None if args.family == "toy" else args.image_tokens
        model, processor = families.load_model(folder, max_image_tokens=budget)
    if args.checkpointing:
        families.enable_activation_checkpointing(model)
    model.train()
    b, g, t = args.batch_size, args.num_generations, args.completion
    images = images_of(args.size, b)
    prompts = vlm.encode_prompts(processor, images)
    torch.manual_seed(0)
    completion = random_completions(model, processor, b * g, t)
    mask = torch.ones_like(completion)
    results = {True: [], False: []}
    for _ in range(args.repeats):       # alternate, so drift in the machine's load hits both paths
        for shared in (True, False):
            results[shared].append(passes(model, processor, images, completion, mask, g, t, shared))
    med = {s: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for s, runs in results.items()}
    for s, m in med.items():      # old path: a separate no-grad pi_old pass when mu > 1
        m["step"] = m["sample"] + m["logprobs"] * (1 + (not s and args.mu > 1)) + args.mu * m["update"]
    print(f"{args.family}: B {b} x G {g}, prompt {prompts['input_ids'].shape[1]} tokens "
          f"({args.image_tokens} image-token budget, {args.size} px), completion {t} tokens, mu {args.mu}, "
          f"{args.threads} thread(s), median of {args.repeats}"
          f"{', activation checkpointing' if args.checkpointing else ''}\n")
    print("| path | sample s | log-probs s | update s | step s (mu) |")
    print("|---|---|---|---|---|")
    for s, name in ((False, "per row (every row runs its prompt)"), (True, "prompt once per group")):
        m = med[s]
        print(f"| {name} | {m['sample']:.3f} | {m['logprobs']:.3f} | {m['update']:.3f} | {m['step']:.3f} |")
    ratio = {k: med[True][k] / med[False][k] for k in med[True]}
    print(f"| shared / per row | {ratio['sample']:.2f} | {ratio['logprobs']:.2f} | {ratio['update']:.2f} | "
          f"{ratio['step']:.2f} |")


if __name__ == "__main__":
    main()
