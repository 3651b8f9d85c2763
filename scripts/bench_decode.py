"""What bounds sampling, the largest phase of a GRPO step at mu = 1: the decoding loop against
generate(), each of its savings taken away in turn, and a prototype of a further one.

    python scripts/bench_decode.py --model runs/wheel/seed0/stage1/checkpoint --data runs/wheel/seed0/data
    python scripts/bench_decode.py --family qwen2_vl --image-tokens 400 --max-new-tokens 64

The first samples the demo's stage 1 on its own train images; the second a tiny build of a
family (tests/tiny_families.py) on random 448 px images with a real-sized image prompt.

B prompts x G completions of up to --max-new-tokens, temperature 1, one thread, each variant run
alternately --repeats times on the same seeds (medians):
- `generate`: generate(num_return_sequences=G), the path TRL takes: B x G prompt copies prefilled,
  a multinomial draw, every row to the end,
- `today`: vlm.sample_completions: the B prompts prefilled once, their caches copied to the G rows
  (into buffers with room for the new tokens, kv_cache.GrowingLayer), each step the language
  model alone (vlm._decoding_step_for), the draw by inverse CDF (vlm.draw_from), finished rows
  leaving the batch (vlm.DROP_FINISHED),
- `- row dropping`, `- inverse CDF` (torch.multinomial instead), `- LM alone` (the whole VLM's
  forward each step): today with one saving taken away,
- `prompt kv once`: a prototype, today without row dropping, in which each prompt's keys and
  values stay ONE copy per group in decoding too: each step's G queries of a group attend to it
  in one batched matmul (the prompt part of the scores), the rows' own completion keys live in a
  buffer of their own, and one softmax covers both parts. It needs whole groups, so it cannot
  drop rows.
Variants that draw other random numbers end other completions: the mean completion length shows
that they sample alike. The prototype is a measurement, not the project's code path.
"""

import argparse
import functools
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AttentionInterface, AttentionMaskInterface  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402

import families  # noqa: E402
import vlm  # noqa: E402
from data import load_images, read_emoset_split  # noqa: E402

GROUP_PREFIX = "clgrpo_group_prefix"


class GroupPrefixLayer(DynamicLayer):
    """One layer's cache: the B prompts' keys/values [B, h, P, d], one copy per group, and the N
    rows' completion keys/values in a preallocated [N, h, max_new_tokens, d] buffer."""

    def __init__(self, prompt_keys, prompt_values, rows: int, max_new_tokens: int):
        super().__init__()
        b, h, _, d = prompt_keys.shape
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values
        self.buffer_keys = prompt_keys.new_empty(rows, h, max_new_tokens, d)
        self.buffer_values = prompt_values.new_empty(rows, h, max_new_tokens, d)
        self.length, self.is_initialized = 0, True
        self.dtype, self.device = prompt_keys.dtype, prompt_keys.device

    def update(self, keys, values, *args, **kwargs):
        start, self.length = self.length, self.length + keys.shape[-2]
        self.buffer_keys[:, :, start:self.length] = keys
        self.buffer_values[:, :, start:self.length] = values
        return self.buffer_keys[:, :, :self.length], self.buffer_values[:, :, :self.length]

    def get_seq_length(self) -> int:   # the mask covers the prompt and the completion so far
        return self.prompt_keys.shape[-2] + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def group_prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, group_prefix=None,
                           softcap=None, **kwargs):
    """softmax([q K_prompt^T, q K_own^T] * scaling + mask) [V_prompt; V_own], with the prompt's
    K and V read once per group: query [N, H, q, d] with N = B*G rows, K_prompt [B, h, P, d]."""
    layer = group_prefix.layers[module.layer_idx]
    kp, vp = layer.prompt_keys, layer.prompt_values
    b, h, p, d = kp.shape
    n, heads, q, _ = query.shape
    g, r = n // b, heads // h                       # G rows per prompt, r query heads per KV head
    by_group = query.view(b, g, h, r * q, d).transpose(1, 2).reshape(b, h, g * r * q, d)
    prompt_scores = (by_group @ kp.transpose(-1, -2)).view(b, h, g, r * q, p).transpose(1, 2).reshape(n, heads, q, p)
    own_scores = (query.view(n, h, r * q, d) @ key.transpose(-1, -2)).view(n, heads, q, -1)
    scores = torch.cat([prompt_scores, own_scores], dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    weights = scores.softmax(dim=-1)
    prompt_weights = weights[..., :p].reshape(b, g, h, r * q, p).transpose(1, 2).reshape(b, h, g * r * q, p)
    out = (prompt_weights @ vp).view(b, h, g, r * q, d).transpose(1, 2).reshape(n, heads, q, d)
    out = out + (weights[..., p:].reshape(n, h, r * q, -1) @ value).view(n, heads, q, d)
    return out.transpose(1, 2), None


AttentionInterface.register(GROUP_PREFIX, group_prefix_attention)
AttentionMaskInterface.register(GROUP_PREFIX, sdpa_mask)


@contextmanager
def prompt_kv_once(model, max_new_tokens: int):
    """Decode with group_prefix_attention: vlm's loop unchanged, its cache and step replaced."""
    text_config = next(m.config for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj"))

    def for_rows(states, index, decoding=True):   # only decoding runs under this patch
        cache = Cache(layers=[GroupPrefixLayer(k, v, len(index), max_new_tokens) for k, v in states.cache])
        positions = states.positions[:, index] if states.positions.dim() == 3 else states.positions[index]
        return cache, states.attention_mask[index], positions

    def decoding_step(cache, ids, attention_mask, positions):
        before, text_config._attn_implementation = text_config._attn_implementation, GROUP_PREFIX
        try:
            out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, group_prefix=cache)
        finally:
            text_config._attn_implementation = before
        return out.logits[:, -1, :]

    with mock.patch.object(vlm.PromptStates, "for_rows", for_rows), \
            mock.patch.object(vlm, "_decoding_step_for", lambda m: decoding_step), \
            mock.patch.object(vlm, "DROP_FINISHED", 2.0):
        yield


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint folder (the demo's stage 1)")
    p.add_argument("--data", help="EmoSet-layout data root (its train images are the prompts)")
    p.add_argument("--family", help="instead: a tiny build of this family (tests/tiny_families.py)")
    p.add_argument("--image-tokens", type=int, default=400, help="--family: the image-token budget per image")
    p.add_argument("--size", type=int, default=448, help="--family: image side in pixels")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=144)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if not (args.family or (args.model and args.data)):
        p.error("give --model and --data, or --family")
    torch.set_num_threads(args.threads)
    if args.family:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_families
        from bench_shared_prompt import images_of
        with tempfile.TemporaryDirectory() as tmp:
            folder = tiny_families.build_tiny_family(args.family, Path(tmp) / args.family)
            model, processor = families.load_model(folder, max_image_tokens=args.image_tokens)
        images = images_of(args.size, args.batch_size)
    else:
        model, processor = families.load_model(args.model)
        records, _ = read_emoset_split(args.data, "train", skip_missing=True)
        _, images = load_images(args.data, records[:args.batch_size], {})
    prompt_tokens = vlm.encode_prompts(processor, images)["input_ids"].shape[1]

    def sample(seed):
        torch.manual_seed(seed)
        return vlm.sample_completions(model, processor, images, group_size=args.num_generations,
                                      max_new_tokens=args.max_new_tokens, temperature=1.0)

    variants = {   # name -> the patches it runs under
        "generate": lambda: [mock.patch.object(vlm, "shares_prompt", lambda m: False)],
        "today": lambda: [],
        "- row dropping": lambda: [mock.patch.object(vlm, "DROP_FINISHED", 2.0)],
        "- inverse CDF": lambda: [mock.patch.object(vlm, "draw_from", lambda p: torch.multinomial(p, 1).squeeze(1))],
        "- LM alone": lambda: [mock.patch.object(vlm, "_decoding_step_for",
                                                lambda m: functools.partial(vlm._full_forward_step, m))],
        "prompt kv once": lambda: [prompt_kv_once(model, args.max_new_tokens)],
    }
    seconds = {name: [] for name in variants}
    lengths = {name: [] for name in variants}
    for seed in range(args.repeats + 1):   # seed 0 warms up and is not timed
        for name, patches in variants.items():
            with ExitStack() as stack:
                for patch in patches():
                    stack.enter_context(patch)
                t0 = time.perf_counter()
                rollout = sample(seed)
                elapsed = time.perf_counter() - t0
            if seed:
                seconds[name].append(elapsed)
                lengths[name].append(rollout.completion_mask.sum(1).float().mean().item())
    base = statistics.median(seconds["today"])
    print(f"{args.family or args.model}: B {args.batch_size} x G {args.num_generations}, prompt {prompt_tokens} "
          f"tokens, up to {args.max_new_tokens} new tokens, "
          f"{args.repeats} seeds, {args.threads} thread(s); medians")
    print("| variant | s per sampling call | / today | mean completion length |")
    print("|---|---|---|---|")
    for name in variants:
        s = statistics.median(seconds[name])
        print(f"| {name} | {s:.3f} | {s / base:.2f} | {statistics.mean(lengths[name]):.1f} |")


if __name__ == "__main__":
    main()
