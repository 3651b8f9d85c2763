"""GRPO and CLGRPO for small VLMs: the math as pure functions, then the training loop.

    python clgrpo.py --stage 2|3|4 --model INIT --data ROOT --out OUT [overrides]

Part 1 (math) needs no model: tensors in, tensors out, each formula in its docstring.
Part 2 (loop) samples groups, scores them, and optimises the clipped surrogate.

Notation. For a prompt q we sample a group of G completions o_1..o_G from pi_old (the policy as
it was when sampling) and score each with a reward r_i. Per completion token t:
    rho_{i,t}   = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
    A_i         = (r_i - mean(r_group)) / (std(r_group) + eps)
    surrogate   = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    objective   = surrogate - beta * KL_k3(pi_theta || pi_ref)
    loss        = - aggregate(objective over completion tokens)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import eval as evaluation
import vlm
from data import (EpochSampler, append_jsonl, atomic_write_json, float_in, int_at_least, load_images, output_path_problem,
                  read_emoset_split, read_val_for_training, truncate_jsonl_after_step)
from rewards import combined_reward

# =============================================================================================
# Part 1: the math
# =============================================================================================


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     scale="group" (GRPO)
        A_i =  r_i - mean_g(r)                         scale="none"  (Dr. GRPO)

    `rewards` is [N] with N = B * G, laid out group after group (rows g*G .. g*G+G-1 share a
    prompt). std is the sample std (Bessel, divide by G - 1). A group whose rewards are all equal
    carries no learning signal: its advantages are exactly 0 (not eps-divided rounding noise).

    Returns (advantages [N], zero_std [B] bool, one flag per group).
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if n % group_size != 0:
        raise ValueError(f"group_advantages: {n} rewards do not split into groups of {group_size}")
    if scale not in ("group", "none"):
        raise ValueError(f"group_advantages: scale must be 'group' or 'none', got {scale!r}")
    r = rewards.float().view(-1, group_size)                      # [B, G]
    centred = r - r.mean(dim=1, keepdim=True)
    zero_std = r.amax(dim=1) == r.amin(dim=1)                     # exact test: no float noise
    if scale == "group":
        centred = centred / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    advantages = torch.where(zero_std[:, None], torch.zeros_like(centred), centred)
    return advantages.view(n), zero_std


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) on tokens sampled from pi_theta:

        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1

    Always >= 0 (e^x >= 1 + x), 0 when the two agree, unbiased: E_theta[exp(ref - logp)] = 1.
    Its gradient w.r.t. logp is 1 - exp(ref_logp - logp): pushes logp down where the policy
    is more confident than the reference and up where less.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def masked_aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str = "sequence",
                     max_len: int | None = None) -> torch.Tensor:
    """Aggregate per-token values [N, T] over the completion mask into one number.

        sequence: (1/N) sum_i (sum_t m_it x_it) / (sum_t m_it)    original GRPO: each completion
                                                                  weighs the same, whatever its length
        token:    (sum_it m_it x_it) / (sum_it m_it)               each token weighs the same (DAPO)
        constant: (sum_it m_it x_it) / (N * max_len)               Dr. GRPO: no length normalisation

    Masked positions are selected away with torch.where (not multiplied by 0), so whatever
    they hold, even inf or NaN, changes neither the value nor the gradient.
    """
    m = mask.bool()
    x = torch.where(m, values, torch.zeros_like(values))
    if aggregation == "sequence":
        lengths = m.sum(dim=1).clamp(min=1)   # an all-masked row contributes 0, not NaN
        return (x.sum(dim=1) / lengths).mean()
    if aggregation == "token":
        return x.sum() / m.sum().clamp(min=1)
    if aggregation == "constant":
        return x.sum() / (values.shape[0] * (max_len or values.shape[1]))
    raise ValueError(f"aggregation must be 'sequence', 'token' or 'constant', got {aggregation!r}")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per-token PPO/GRPO clipped surrogate (to be maximised):

        min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)

    `ratio` is [N, T], `advantages` [N] (broadcast over tokens). Which bound binds:
      A > 0: the objective wants rho up; once rho > 1 + eps_high the clipped term is the
             smaller one, a constant, so the gradient is 0: no further push *up* this update.
      A < 0: it wants rho down; once rho < 1 - eps_low the clipped term is the smaller one,
             gradient 0: no further push *down*.
    A ratio already on the "wrong" side (A > 0 with rho < 1 - eps_low, or A < 0 with
    rho > 1 + eps_high) is NOT clipped: min keeps the unclipped, more pessimistic term, so its
    full gradient pulls the policy back. eps_low and eps_high therefore act independently:
    eps_high only ever touches positive-advantage tokens, eps_low only negative ones.
    """
    a = advantages.unsqueeze(-1)
    return torch.minimum(ratio * a, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.04, aggregation: str = "sequence", max_len: int | None = None):
    """GRPO / CLGRPO loss and its diagnostics.

        rho  = exp(logp - old_logp)
        obj  = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) - beta * k3(logp, ref_logp)
        loss = - aggregate(obj, mask)

    Shapes: logp, old_logp, ref_logp, mask [N, T]; advantages [N]. `old_logp` and `ref_logp`
    must carry no gradient (compute them under torch.no_grad()). With a single update per
    generation batch (mu = 1) pass old_logp = logp.detach(): rho is 1 in value, yet its gradient
    is rho * grad(logp) = grad(logp), so the loss reduces to the plain policy gradient.
    `ref_logp` may be None only when beta == 0.

    Returns (loss, stats). stats hold detached scalars, never synced to the CPU here:
      clip_low_frac  fraction of completion tokens with A < 0 and rho < 1 - eps_low
      clip_high_frac fraction of completion tokens with A > 0 and rho > 1 + eps_high
      ratio_mean     mean rho over completion tokens
      kl_mean        mean k3 over completion tokens (0 when no reference is given)
    """
    if ref_logp is None and beta != 0:
        raise ValueError("grpo_loss: ref_logp is None but beta != 0; pass reference log-probs or set beta=0")
    ratio = torch.exp(logp - old_logp)
    objective = clipped_surrogate(ratio, advantages, eps_low, eps_high)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if beta != 0:
        objective = objective - beta * kl
    loss = -masked_aggregate(objective, mask, aggregation, max_len)

    with torch.no_grad():
        m = mask.bool()
        n_tokens = m.sum().clamp(min=1)
        a = advantages.unsqueeze(-1)
        low = (ratio < 1.0 - eps_low) & (a < 0) & m
        high = (ratio > 1.0 + eps_high) & (a > 0) & m
        stats = {
            "clip_low_frac": low.sum() / n_tokens,
            "clip_high_frac": high.sum() / n_tokens,
            "ratio_mean": torch.where(m, ratio, 0.0).sum() / n_tokens,
            "kl_mean": torch.where(m, kl, 0.0).sum() / n_tokens if kl is not None else torch.zeros((), device=logp.device),
        }
    return loss, stats


# Stage presets (DESIGN section 6). Each stage starts from the previous stage's checkpoint,
# which is also its frozen reference. Stage 4 (CLGRPO) is stage 3 with the clip range narrowed
# on the upper side: eps_high 0.2 -> 0.1, so a positive-advantage token's probability can rise
# by at most 10% per update and the small policy moves through a smaller space, more carefully.
# Stage 2 is a short format-alignment run; step counts are toy-scale defaults, override them.
STAGE_PRESETS = {
    2: dict(rewards={"format": 1.0}, eps_low=0.2, eps_high=0.2, steps=40),
    3: dict(rewards={"format": 1.0, "accuracy": 1.0}, eps_low=0.2, eps_high=0.2, steps=200),
    4: dict(rewards={"format": 1.0, "accuracy": 1.0}, eps_low=0.2, eps_high=0.1, steps=200),
}


# =============================================================================================
# Part 2: the training loop (stages 2-4)
# =============================================================================================
# Defaults shared by every stage; a stage preset overrides some, a command-line flag beats both.
# The learning rate suits a 1-2B model; the tiny toy model wants ~5e-5 (demo.sh passes it).
# mu = 2, not 1: with a single update per generation batch the ratio is exactly 1 when the loss
# is computed, so no clip bound can bind, and stage 4's clip-low would change nothing at all.
DEFAULTS = dict(
    steps=200, batch_size=4, num_generations=8, mu=2, lr=1e-6, warmup=0, weight_decay=0.0, max_grad_norm=1.0,
    beta=0.04, eps_low=0.2, eps_high=0.2, aggregation="sequence", scale_rewards="group", temperature=1.0,
    top_p=1.0, max_new_tokens=96, micro_batch=None, logp_micro_batch=None, eval_every=50, eval_limit=100,
    save_every=50, sample_every=25, seed=0, dynamic_sampling=False, max_extra_rounds=3,
)


def resolve_config(args: argparse.Namespace) -> dict:
    """DEFAULTS, then the stage preset, then every flag the user actually gave."""
    config = {**DEFAULTS, **copy.deepcopy(STAGE_PRESETS[args.stage])}
    weights = dict(config["rewards"])
    for name in ("format", "accuracy"):
        value = getattr(args, f"{name}_weight")
        if value is not None:
            weights[name] = value
    config["rewards"] = {k: v for k, v in weights.items() if v != 0}
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    config.update(stage=args.stage, model=args.model, data=args.data, out=args.out)
    if not config["rewards"]:
        raise ValueError("every reward weight is 0: nothing to learn from")
    if config["num_generations"] < 2:
        raise ValueError("--num-generations must be >= 2: the group mean is the baseline")
    if config["max_extra_rounds"] < 0:
        raise ValueError(f"--max-extra-rounds must be >= 0, got {config['max_extra_rounds']}")
    return config


class Timer:
    """Wall-clock seconds per phase (sampling / scoring / log-probs / update)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: wait, or its time lands in a later phase
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def chunk_weight(mask: torch.Tensor, start: int, end: int, aggregation: str) -> torch.Tensor | float:
    """Factor that makes the sum of per-micro-batch losses equal the full-batch loss.

    sequence / constant average over completions: weight rows/N. token averages over all
    tokens of the batch: weight (tokens in chunk)/(tokens in batch)."""
    if aggregation == "token":
        return mask[start:end].sum() / mask.sum().clamp(min=1)
    return (end - start) / mask.shape[0]


def score(rollout, labels: list[str], config: dict) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Rewards [N] of the completions (labels repeated per group) and each component's values."""
    group_labels = [y for y in labels for _ in range(config["num_generations"])]
    totals, components = combined_reward(rollout.texts, group_labels, config["rewards"])
    return torch.tensor(totals), components


@dataclass
class Round:
    """One generation round: B prompts, G scored completions each (rows g*G .. g*G+G-1 = group g)."""
    records: list[dict]
    images: list
    rollout: vlm.Rollout
    rewards: torch.Tensor                  # [B*G]
    components: dict[str, list[float]]     # reward component -> [B*G] values
    zero_std: torch.Tensor                 # [B] bool: the group's G rewards are all equal


def generate_round(model, processor, records, images, config, timer) -> Round:
    """Sample G completions per prompt in ONE batched generate call (this is pi_old), then score them."""
    with timer.phase("sample"):
        rollout = vlm.sample_completions(model, processor, images, group_size=config["num_generations"],
                                         max_new_tokens=config["max_new_tokens"], temperature=config["temperature"],
                                         top_p=config["top_p"])
    with timer.phase("score"):
        rewards, components = score(rollout, [r["label"] for r in records], config)
    _, zero_std = group_advantages(rewards, config["num_generations"], config["scale_rewards"])
    return Round(records, images, rollout, rewards, components, zero_std)


def collect_rounds(model, processor, records, images, config, timer, draw_prompts) -> list[Round]:
    """The step's generation rounds: the given prompts, then, with dynamic sampling (DAPO), rounds of
    fresh prompts from `draw_prompts()` until B groups have signal or `max_extra_rounds` extra
    rounds have run, whichever comes first."""
    rounds = [generate_round(model, processor, records, images, config, timer)]
    if config["dynamic_sampling"]:
        if draw_prompts is None:
            raise ValueError("dynamic sampling needs draw_prompts, a function that returns (records, images) of new prompts")
        while (sum(int((~r.zero_std).sum()) for r in rounds) < len(records)
               and len(rounds) <= config["max_extra_rounds"]):
            rounds.append(generate_round(model, processor, *draw_prompts(), config, timer))
    return rounds


def pick_groups(zero_std_per_round: list[torch.Tensor], batch_size: int) -> list[tuple[int, int]]:
    """(round, group) pairs that make up the training batch: every group with signal, in order, up
    to `batch_size`; if there are too few, the batch is topped up with zero-std groups (in order).

    Topping up keeps the batch at B groups, so a step that ran out of rounds is exactly the plain
    GRPO step (the same batch size, memory, loss scale and KL term) rather than a smaller batch in
    which a single group weighs B times more."""
    signal = [(k, j) for k, z in enumerate(zero_std_per_round) for j, flat in enumerate(z.tolist()) if not flat]
    flat = [(k, j) for k, z in enumerate(zero_std_per_round) for j, is_flat in enumerate(z.tolist()) if is_flat]
    return sorted((signal + flat)[:batch_size])   # generation order: one full round is the round as is


def batch_of_groups(processor, rounds: list[Round], picks: list[tuple[int, int]], group_size: int,
                    device) -> tuple[vlm.Rollout, torch.Tensor, list[dict]]:
    """The picked groups as one batch: (rollout, rewards [B*G], records [B]).

    Without dynamic sampling the batch is the first round, unchanged. Otherwise the prompts of the
    kept groups are re-encoded in one processor call (one consistent left padding), rather than
    spliced from the rounds' tensors: rounds can differ in prompt length and padding, and each model
    family encodes its prompts in its own way. Completions are right-padded to the longest round
    with pad tokens under a 0 mask, exactly as generate() pads a finished completion."""
    if picks == [(0, j) for j in range(len(rounds[0].records))]:
        return rounds[0].rollout, rounds[0].rewards, rounds[0].records
    g = group_size
    rows = [(rounds[k], slice(j * g, (j + 1) * g)) for k, j in picks]
    images = [rounds[k].images[j] for k, j in picks]
    prompts = vlm.encode_prompts(processor, images, device=device)
    width = max(r.rollout.completion_ids.shape[1] for r, _ in rows)

    def stack(name: str, fill: int) -> torch.Tensor:
        parts = [getattr(r.rollout, name)[sl] for r, sl in rows]
        return torch.cat([F.pad(x, (0, width - x.shape[1]), value=fill) for x in parts])

    rollout = vlm.Rollout(prompts=prompts, group_size=g, completion_ids=stack("completion_ids", processor.tokenizer.pad_token_id),
                          completion_mask=stack("completion_mask", 0),
                          truncated=torch.cat([r.rollout.truncated[sl] for r, sl in rows]),
                          texts=[t for r, sl in rows for t in r.rollout.texts[sl]])
    rewards = torch.cat([r.rewards[sl] for r, sl in rows])
    return rollout, rewards, [rounds[k].records[j] for k, j in picks]


def policy_update(model, optimizer, rollout, advantages, old_logp, ref_logp, config, autocast,
                  want_entropy: bool) -> dict:
    """One optimizer step on the GRPO loss, micro-batched over completions with gradient
    accumulation. Returns detached stats (weighted like the loss) and the grad norm.
    The LR scheduler is stepped by the caller, once per GRPO step."""
    n = rollout.completion_ids.shape[0]
    step = config["micro_batch"] or n
    mask = rollout.completion_mask
    totals: dict[str, torch.Tensor] = {}
    with autocast:  # the B images go through the vision tower once; every chunk's rows share them
        features = vlm.encode_images(model, rollout.prompts, chunked_backward=True)
    for s in range(0, n, step):
        e = min(n, s + step)
        with autocast:
            out = vlm.completion_logprobs(model, rollout.prompts, rollout.completion_ids[s:e], mask[s:e],
                                          rollout.group_size, config["temperature"], with_entropy=want_entropy,
                                          features=features, first_row=s)
        logp, entropy = out if want_entropy else (out, None)
        # mu = 1: the policy has not moved since sampling, so pi_old = pi_theta (detached).
        old = old_logp[s:e] if old_logp is not None else logp.detach()
        ref = ref_logp[s:e] if ref_logp is not None else None
        loss, stats = grpo_loss(logp, old, ref, advantages[s:e], mask[s:e], config["eps_low"], config["eps_high"],
                                config["beta"], config["aggregation"], config["max_new_tokens"])
        w = chunk_weight(mask, s, e, config["aggregation"])
        (loss * w).backward()
        totals["loss"] = totals.get("loss", 0.0) + loss.detach() * w   # sums to the full-batch loss
        if entropy is not None:
            stats["entropy"] = masked_aggregate(entropy, mask[s:e], "token")
        for k, v in stats.items():                                      # diagnostics: row-weighted means
            totals[k] = totals.get(k, 0.0) + v * ((e - s) / n)
    features.backward()  # the chunks' summed gradient on the image features, through the vision tower once
    params = [p for p in model.parameters() if p.requires_grad]
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
    if not torch.isfinite(totals["grad_norm"]) or not torch.isfinite(totals["loss"]):
        raise FloatingPointError(f"non-finite loss {totals['loss'].item()} or grad norm {totals['grad_norm'].item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def grpo_step(model, ref_model, processor, optimizer, scheduler, records, images, config, autocast,
              draw_prompts=None) -> tuple[dict, list]:
    """One GRPO step: sample G completions per prompt, score, advantages, then mu updates.

    With config["dynamic_sampling"], `draw_prompts()` supplies (records, images) of further prompts
    (see `collect_rounds`). The update runs unless it is provably a no-op: beta == 0 and every
    group in the batch has zero std. With beta > 0 a batch without reward signal still updates:
    its gradient is the KL term's pull towards the reference, part of the objective. The LR
    scheduler steps once per GRPO step either way, so step s has the same LR in every run.

    Returns (metrics for the log, per-update stats)."""
    device = next(model.parameters()).device
    timer = Timer(device)
    g = config["num_generations"]
    # 1-2. Sample the groups (pi_old) and score them: one round, or several with dynamic sampling.
    rounds = collect_rounds(model, processor, records, images, config, timer, draw_prompts)
    with timer.phase("sample"):
        picks = pick_groups([r.zero_std for r in rounds], len(records))
        rollout, rewards, records = batch_of_groups(processor, rounds, picks, g, device)
    # 3. Group-relative advantages (zero-std groups get A = 0 and carry no policy gradient).
    advantages, zero_std = group_advantages(rewards, g, config["scale_rewards"])
    advantages = advantages.to(device)
    # With beta == 0 and no signal, every one of the mu updates has a gradient of exactly 0, and
    # stepping AdamW on it would still move the weights (momentum, weight decay): skip them all.
    run_update = config["beta"] != 0 or not bool(zero_std.all())
    # 4. Reference (frozen stage start) and, for mu > 1, old-policy log-probs: no gradient.
    ref_logp = old_logp = None
    with timer.phase("logprobs"), torch.no_grad(), autocast:
        lp = dict(group_size=g, temperature=config["temperature"], micro_batch=config["logp_micro_batch"])
        args = (rollout.prompts, rollout.completion_ids, rollout.completion_mask)
        if run_update and ref_model is not None:
            ref_logp = vlm.completion_logprobs(ref_model, *args, **lp)
        if run_update and config["mu"] > 1:
            old_logp = vlm.completion_logprobs(model, *args, **lp)
    # 5. mu optimizer updates on this batch, all at this step's learning rate.
    lr = scheduler.get_last_lr()[0]
    updates = []
    with timer.phase("update"):
        if run_update:
            for k in range(config["mu"]):
                updates.append(policy_update(model, optimizer, rollout, advantages, old_logp, ref_logp,
                                             config, autocast, want_entropy=(k == 0)))
    with warnings.catch_warnings():  # a skipped first step is meant: torch warns when no optimizer step came before
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        scheduler.step()
    metrics = round_metrics(rounds, g)
    useful = int((~zero_std).sum())
    generations = metrics["generations"]
    metrics.update(
        skipped_update=int(not updates), lr=lr, batch_zero_std_groups=int(zero_std.sum()), useful_groups=useful,
        generations_per_useful_group=generations / useful if useful else None,
        tokens_per_s=metrics.pop("sampled_tokens") / max(1e-9, timer.seconds["sample"]),
        **{f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
    if updates:
        # One host sync for all stats, averaged over the mu updates (entropy: first update only).
        # The first update's ratio is exactly 1, so clip fractions are diluted by 1/mu.
        keys = ["loss", "kl_mean", "clip_low_frac", "clip_high_frac", "ratio_mean", "grad_norm"]
        stacked = torch.stack([torch.stack([u[k].float() for k in keys]) for u in updates]).mean(0).tolist()
        metrics.update(dict(zip(keys, stacked)), entropy=updates[0]["entropy"].item())
    metrics["samples"] = [{"label": records[i // g]["label"], "completion": rollout.texts[i], "reward": rewards[i].item()}
                          for i in range(0, len(rollout.texts), g)][:3]
    return metrics, updates


def round_metrics(rounds: list[Round], group_size: int) -> dict:
    """What the policy's samples look like, over every completion generated this step (all rounds,
    so the numbers mean the same with and without dynamic sampling), and what generation cost."""
    rewards = torch.cat([r.rewards for r in rounds])
    lengths = torch.cat([r.rollout.completion_mask.sum(1) for r in rounds]).float()
    metrics = {f"reward_{name}": sum(sum(r.components[name]) for r in rounds) / len(rewards)
               for name in rounds[0].components}
    metrics.update(
        reward_mean=rewards.mean().item(), reward_std=rewards.view(-1, group_size).std(dim=1).mean().item(),
        frac_zero_std=torch.cat([r.zero_std for r in rounds]).float().mean().item(),
        completion_len_mean=lengths.mean().item(), completion_len_max=lengths.max().item(),
        frac_truncated=torch.cat([r.rollout.truncated for r in rounds]).float().mean().item(),
        gen_rounds=len(rounds), generations=len(rewards), sampled_tokens=lengths.sum().item())
    return metrics


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Stages 2-4: GRPO (format; format+accuracy) and CLGRPO (clip-low).")
    p.add_argument("--stage", type=int, required=True, choices=[2, 3, 4], help="2: format reward; 3: + accuracy; 4: + clip-low")
    p.add_argument("--model", required=True, help="start checkpoint = frozen reference (previous stage's run folder)")
    p.add_argument("--data", required=True, help="EmoSet-layout data root (train split for prompts, val for eval)")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, metrics.jsonl, samples.jsonl, run_config.json")
    f = lambda flag, typ, hlp, **kw: p.add_argument(flag, type=typ, default=None, help=hlp + " (default: stage preset)", **kw)  # noqa: E731
    f("--steps", int_at_least(1), "GRPO steps (one generation batch each)")
    f("--batch-size", int_at_least(1), "prompts per step (B)")
    f("--num-generations", int_at_least(2), "completions per prompt (G)")
    f("--mu", int_at_least(1), "optimizer updates per generation batch")
    f("--lr", float_in(0), "learning rate (AdamW)")
    f("--warmup", int_at_least(0), "linear LR warm-up steps")
    f("--weight-decay", float_in(0), "AdamW weight decay")
    f("--max-grad-norm", float_in(0, lo_open=True), "gradient clipping norm")
    f("--beta", float_in(0), "KL weight; 0 skips the reference model")
    f("--eps-low", float_in(0, 1, hi_open=True), "lower clip: rho >= 1 - eps_low binds for A < 0")
    f("--eps-high", float_in(0), "upper clip: rho <= 1 + eps_high binds for A > 0")
    f("--aggregation", str, "loss aggregation", choices=["sequence", "token", "constant"])
    f("--scale-rewards", str, "advantage scaling: group std or none (Dr. GRPO)", choices=["group", "none"])
    f("--temperature", float_in(0, lo_open=True), "sampling temperature (log-probs use the same)")
    f("--top-p", float_in(0, 1, lo_open=True), "nucleus sampling (1.0 keeps log-probs exact)")
    f("--max-new-tokens", int_at_least(1), "completion length limit")
    f("--format-weight", float_in(0), "weight of the format reward")
    f("--accuracy-weight", float_in(0), "weight of the accuracy reward")
    f("--micro-batch", int_at_least(1), "completions per forward/backward in the update")
    f("--logp-micro-batch", int_at_least(1), "completions per no-grad forward (reference / old policy)")
    f("--eval-every", int_at_least(0), "validation accuracy every N steps (0: never)")
    f("--eval-limit", int_at_least(1), "validation records per evaluation")
    f("--save-every", int_at_least(1), "checkpoint every N steps (and at the end)")
    f("--sample-every", int_at_least(0), "write sample completions every N steps (0: never)")
    f("--seed", int, "random seed (sampling and data order)")
    p.add_argument("--dynamic-sampling", action="store_true", default=None,
                   help="DAPO dynamic sampling: drop groups whose rewards are all equal and generate for fresh "
                        "prompts until B groups have signal (default: off; see README, zero-std groups)")
    f("--max-extra-rounds", int_at_least(0), "dynamic sampling: at most N extra generation rounds of B prompts per step; "
                                             "if still short, the batch is topped up with zero-std groups")
    p.add_argument("--stop-after", type=int_at_least(1), help="save and stop after N steps of this invocation (--resume continues)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (step, optimizer, RNG, data order)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--ref-dtype", choices=["float32", "bfloat16", "float16"], help="reference model dtype (default: --dtype); bfloat16 halves its memory")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (GPU)")
    p.add_argument("--max-image-tokens", type=int_at_least(1), help="bound the image tokens of one image through the family's own knob (Qwen max_pixels, SmolVLM longest edge, InternVL tiles, LLaVA grids); default: the checkpoint's")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    args = p.parse_args(argv)
    if problem := output_path_problem(args.out, "dir"):
        p.error(problem)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = resolve_config(args)
    out, ckpt = Path(args.out), Path(args.out) / "checkpoint"
    resume = vlm.resume_point(out, args.resume)   # recovers an interrupted save; refuses a --resume with no state
    vlm.seed_everything(config["seed"])

    # The policy starts from --model (or the checkpoint when resuming); the reference is always
    # --model, frozen: KL is measured against where this stage started.
    model, processor = vlm.load_model(ckpt if resume else args.model, args.dtype, args.device, args.gradient_checkpointing,
                                      max_image_tokens=args.max_image_tokens)
    device = next(model.parameters()).device
    if args.freeze_vision:
        for prm in vlm.vision_parameters(model):
            prm.requires_grad_(False)
    ref_model = None
    if config["beta"] != 0:
        ref_model, _ = vlm.load_model(args.model, args.ref_dtype or args.dtype, args.device)
        ref_model.eval().requires_grad_(False)

    train, report = read_emoset_split(args.data, "train", skip_missing=True)
    val = read_val_for_training(args.data, config["eval_every"], config["eval_limit"])
    unreadable = {}   # id -> reason of images skipped (one warning each)
    if report["skipped_missing"]:
        print(f"skipped {report['skipped_missing']} train entries with missing images")
    params = [prm for prm in model.parameters() if prm.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    warmup = config["warmup"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    sampler = EpochSampler(len(train), config["seed"])
    step, skipped = 0, 0
    if resume:
        state = vlm.restore_training_state(ckpt, optimizer, scheduler, sampler)
        step, skipped = state["step"], state["skipped_updates"]
        print(f"resumed from {ckpt} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "samples.jsonl"):
        truncate_jsonl_after_step(out / name, step)  # drop log lines of steps to be (re)done
    atomic_write_json(out / "run_config.json", config)
    print("resolved configuration:", json.dumps(config))

    def save():
        state = vlm.training_state(step, optimizer, scheduler, sampler, skipped_updates=skipped)
        vlm.save_checkpoint(model, processor, ckpt, trainer_state=state, extra_json={"run_config.json": config})

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    model.train()
    last = min(config["steps"], step + args.stop_after) if args.stop_after else config["steps"]
    bar = tqdm(total=config["steps"], initial=step, desc=f"stage{args.stage}")

    def draw_prompts():
        """The next B training prompts with readable images; dynamic sampling draws more from the same
        sampler. A draw whose images are all unreadable is passed over (the same way when resumed)."""
        for _ in range(len(train) // config["batch_size"] + 1):
            batch = [train[i] for i in sampler.next_batch(config["batch_size"])]
            records, images = load_images(args.data, batch, unreadable)
            if records:
                return records, images
        raise SystemExit(f"a whole epoch of the {len(train)} training images was unreadable (see the warnings above)")

    while step < last:
        try:
            metrics, _ = grpo_step(model, ref_model, processor, optimizer, scheduler, *draw_prompts(), config, autocast,
                                   draw_prompts=draw_prompts)
            vlm.require_finite_weights(model)   # the loss and gradient guards cannot see an update that overflows
        except FloatingPointError as e:
            raise SystemExit(f"stopped at step {step + 1}: {e}. The last good checkpoint is {ckpt}") from e
        step += 1
        skipped += metrics["skipped_update"]
        samples = metrics.pop("samples")
        metrics = {"step": step, **metrics, "skipped_updates_total": skipped}
        if val and (step % config["eval_every"] == 0 or step == config["steps"]):
            val_metrics, _ = evaluation.evaluate(model, processor, args.data, val, max_new_tokens=config["max_new_tokens"],
                                                 progress=False, skipped=unreadable)
            metrics.update(val_accuracy=val_metrics["accuracy"], val_format_rate=val_metrics["format_rate"])
            model.train()
        append_jsonl(out / "metrics.jsonl", metrics)
        if config["sample_every"] and step % config["sample_every"] == 0:
            append_jsonl(out / "samples.jsonl", {"step": step, "samples": samples})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics.get('reward_accuracy', 0):.2f}",
                        fmt=f"{metrics.get('reward_format', 0):.2f}", kl=f"{metrics.get('kl_mean', 0):.3f}")
        bar.update(1)
        if step % config["save_every"] == 0 or step == last:
            save()
    bar.close()
    evaluation.plot_curves(out / "metrics.jsonl", out / "curves.png")
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable images (named in the warnings above)")
    return {"out": str(out), "step": step, "unreadable_images": len(unreadable)}


if __name__ == "__main__":
    main()
