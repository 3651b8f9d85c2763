"""GRPO and CLGRPO for small VLMs: the math as pure functions, then the training loop.

    python clgrpo.py --stage 2|3|4 --model INIT --data ROOT --out OUT [overrides]

Part 1 (math) needs no model: tensors in, tensors out, each formula in its docstring.
Part 2 (loop) samples groups, scores them, and optimises the clipped surrogate: the stage configs
and one step, grpo_step. The run around it (loading, resuming, logs, checkpoints) is grpo_run.py.

Notation. For a prompt q we sample a group of G completions o_1..o_G from pi_old (the policy as
it was when sampling) and score each with a reward r_i. Per completion token t:
    rho_{i,t}   = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
    A_i         = (r_i - mean(r_group)) / (std(r_group) + eps)
    surrogate   = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    objective   = surrogate - beta * KL_k3(pi_theta || pi_ref)
    loss        = - aggregate(objective over completion tokens)
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch

import dynamic_sampling
import families
import lora
import vlm
from config import arg, float_in, int_at_least, run_cli
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
        raise ValueError(f"group_advantages: group_size must be >= 2 (a group of one has no baseline), "
                         f"got {group_size}")
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
      frac_clipped_lower  fraction of completion tokens clipped at the lower bound: A < 0 and
                          rho < 1 - eps_low (eps_low only ever binds there)
      frac_clipped_upper  fraction of completion tokens clipped at the upper bound: A > 0 and
                          rho > 1 + eps_high (the bound stage 4's clip-low narrows)
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
            "frac_clipped_lower": low.sum() / n_tokens,
            "frac_clipped_upper": high.sum() / n_tokens,
            "ratio_mean": torch.where(m, ratio, 0.0).sum() / n_tokens,
            "kl_mean": (torch.where(m, kl, 0.0).sum() / n_tokens if kl is not None
                        else torch.zeros((), device=logp.device)),
        }
    return loss, stats


# Stage presets: each stage is the base config (GRPOConfig's defaults, which are stage 3) with
# these fields replaced. Each stage starts from the previous stage's checkpoint, which is also
# its frozen reference. Stage 2 is a short format-alignment run (step counts are toy-scale
# defaults: override them). Stage 4 (CLGRPO) is stage 3 with the clip range narrowed on the upper
# side, eps_high 0.2 -> 0.1: a positive-advantage token's probability can rise by at most 10% per
# update, so the small policy moves through a smaller space, more carefully.
STAGE_PRESETS = {
    2: dict(accuracy_weight=0.0, steps=40),
    3: dict(),
    4: dict(eps_high=0.1),
}


# =============================================================================================
# Part 2: the training loop (stages 2-4)
# =============================================================================================
@dataclass(frozen=True)
class GRPOConfig:
    """Every setting of a stage 2-4 run: these defaults, then the stage preset, then the flags."""
    stage: int = arg(help="2: format reward; 3: + accuracy; 4: + clip-low", choices=[2, 3, 4])
    model: str = arg(help="start checkpoint = frozen reference (previous stage's run folder)")
    data: str = arg(help="EmoSet-layout data root (train split for prompts, val for eval)")
    out: str = arg(help="run folder: checkpoint/, metrics.jsonl, samples.jsonl, run_config.json")
    # the objective
    format_weight: float = arg(1.0, "weight of the format reward", type=float_in(0))
    accuracy_weight: float = arg(1.0, "weight of the accuracy reward", type=float_in(0))
    num_generations: int = arg(8, "completions per prompt (G)", type=int_at_least(2))
    scale_rewards: str = arg("group", "advantage scaling: group std, or none (Dr. GRPO)", choices=["group", "none"])
    beta: float = arg(0.04, "KL weight; 0 skips the reference model", type=float_in(0))
    eps_low: float = arg(0.2, "lower clip: rho >= 1 - eps_low binds for A < 0", type=float_in(0, 1, hi_open=True))
    eps_high: float = arg(0.2, "upper clip: rho <= 1 + eps_high binds for A > 0", type=float_in(0))
    aggregation: str = arg("sequence", "loss aggregation", choices=["sequence", "token", "constant"])
    # sampling
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)", type=float_in(0, lo_open=True))
    top_p: float = arg(1.0, "nucleus sampling (1.0 keeps log-probs exact)", type=float_in(0, 1, lo_open=True))
    max_new_tokens: int = arg(96, "completion length limit", type=int_at_least(1))
    dynamic_sampling: bool = arg(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and generate "
                                        "for fresh prompts until B groups have signal (README: zero-std groups)")
    max_extra_rounds: int = arg(3, "dynamic sampling: at most N extra generation rounds of B prompts per step; "
                                   "if still short, the batch is topped up with zero-std groups", type=int_at_least(0))
    # optimisation. mu = 2, not 1: with one update per generation batch the ratio is exactly 1
    # when the loss is computed, so no clip bound could bind and stage 4 would change nothing.
    steps: int = arg(200, "GRPO steps (one generation batch each)", type=int_at_least(1))
    batch_size: int = arg(4, "prompts per step (B)", type=int_at_least(1))
    mu: int = arg(2, "optimizer updates per generation batch", type=int_at_least(1))
    lr: float = arg(1e-6, "learning rate (AdamW); 1e-6 suits 1-2B models, the toy wants ~1e-4", type=float_in(0))
    warmup: int = arg(0, "linear LR warm-up, in GRPO steps", type=int_at_least(0))
    weight_decay: float = arg(0.0, "AdamW weight decay", type=float_in(0))
    max_grad_norm: float = arg(1.0, "gradient clipping norm", type=float_in(0, lo_open=True))
    micro_batch: int | None = arg(None, "completions per forward/backward in the update (default: all)",
                                  type=int_at_least(1))
    logp_micro_batch: int | None = arg(None, "completions per no-grad forward (reference / old policy)",
                                       type=int_at_least(1))
    seed: int = arg(0, "random seed (sampling and data order)")
    # logging, checkpoints, resuming
    eval_every: int = arg(50, "validation accuracy every N steps (0: never)", type=int_at_least(0))
    eval_limit: int = arg(100, "validation records per evaluation", type=int_at_least(1))
    save_every: int = arg(50, "checkpoint every N steps (and at the end)", type=int_at_least(1))
    sample_every: int = arg(25, "write sample completions every N steps (0: never)", type=int_at_least(0))
    stop_after: int | None = arg(None, "save and stop after N steps of this invocation (--resume continues)",
                                 type=int_at_least(1))
    resume: bool = arg(False, "continue from OUT/checkpoint (step, optimizer, RNG, data order)")
    # hardware
    device: str = arg("auto", "auto, cpu or cuda")
    dtype: str = arg("float32", "weights dtype", choices=list(families.DTYPES))
    ref_dtype: str | None = arg(None, "reference model dtype (default: --dtype); bfloat16 halves its memory",
                                choices=list(families.DTYPES))
    bf16: bool = arg(False, "bf16 autocast for forward/backward (GPU)")
    gradient_checkpointing: bool = arg(False, "recompute activations to save memory")
    freeze_vision: bool = arg(False, "do not train the vision tower")
    max_image_tokens: int | None = arg(None, families.IMAGE_TOKENS_HELP, type=int_at_least(1))
    # LoRA (lora.py): adapters on a frozen base; checkpoints are still saved as plain merged weights
    lora_rank: int | None = arg(None, lora.RANK_HELP, type=int_at_least(1))
    lora_alpha: float | None = arg(None, lora.ALPHA_HELP, type=float_in(0, lo_open=True))
    lora_targets: str = arg(lora.DEFAULT_TARGETS, lora.TARGETS_HELP)
    lora_vision: bool = arg(False, lora.VISION_HELP)

    def __post_init__(self):
        if not self.rewards:
            raise ValueError("every reward weight is 0: nothing to learn from")

    @property
    def rewards(self) -> dict[str, float]:
        """The reward components that count, with their weights."""
        weights = {"format": self.format_weight, "accuracy": self.accuracy_weight}
        return {name: w for name, w in weights.items() if w != 0}


def stage_config(stage: int, **overrides) -> GRPOConfig:
    """The config of a stage: the base, its preset, then `overrides` (e.g. model, data, out, lr)."""
    return GRPOConfig(**{"stage": stage, "model": "", "data": "", "out": "", **STAGE_PRESETS[stage], **overrides})


@dataclass
class Policy:
    """What a GRPO step acts on: the model being trained and its processor, the frozen reference
    (None when beta == 0, and with LoRA: the policy with its adapters off is the reference), the
    optimizer and LR schedule, and the autocast context."""
    model: torch.nn.Module
    processor: object
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class GroupBatch:
    """B prompts x G completions sampled by pi_old, scored, with their advantages: what the
    reference pass and the updates read. Rows i*G .. i*G+G-1 continue prompt i."""
    records: list[dict]                    # the B prompts' records (their labels are the answers)
    images: list                           # their images
    rollout: vlm.Rollout                   # prompt tensors, completion ids [N, T], mask, texts
    rewards: torch.Tensor                  # [N] weighted sum of the components
    components: dict[str, list[float]]     # reward component -> [N] values
    advantages: torch.Tensor               # [N] group-relative, on the model's device
    zero_std: torch.Tensor                 # [B] the group's G rewards are all equal (its advantages are 0)


# ---------------------------------------------------------------------------------------------
# One GRPO step: sample -> score -> advantages -> reference -> update
# ---------------------------------------------------------------------------------------------
def grpo_step(policy: Policy, records: list[dict], images: list, cfg: GRPOConfig,
              draw_prompts=None) -> tuple[dict, list[dict]]:
    """One GRPO step on B prompts. Returns (metrics for the log, the stats of each update).

    Each phase returns what the next one reads: the groups sampled, scored and given their
    advantages (a GroupBatch), then pi_ref's log-probs, then each update's stats and pi_old's
    log-probs (the first update's own, which updates 2..mu read). The update runs unless it is
    provably a no-op (beta == 0 and every group has zero std): with beta > 0 a batch without
    reward signal still pulls the policy towards the reference, which is part of the objective.
    The LR schedule steps once per GRPO step either way. cfg.dynamic_sampling (off by default;
    dynamic_sampling.py) adds rounds of prompts from `draw_prompts()`, which returns (records,
    images), and trains on the groups with signal."""
    timer = Timer(policy.device)
    batch = generate_round(policy, records, images, cfg, timer)          # 1-3. pi_old's groups, rewards, advantages
    rounds = [batch]
    if cfg.dynamic_sampling:                                             #      DAPO: B groups with signal
        rounds = dynamic_sampling.more_rounds(batch, lambda *prompts: generate_round(policy, *prompts, cfg, timer),
                                              draw_prompts, cfg.max_extra_rounds)
        batch = dynamic_sampling.assemble_batch(policy.processor, rounds, policy.device)
    lr, updates = policy.scheduler.get_last_lr()[0], []
    if cfg.beta != 0 or not bool(batch.zero_std.all()):
        with timer.phase("logprobs"):
            ref_logp = reference_pass(policy, batch, cfg)                # 4. pi_ref, no grad (None when beta = 0)
        with timer.phase("update"):                                      # 5. (update 1 also gives pi_old)
            old_logp = None
            for k in range(cfg.mu):
                stats, old_logp = policy_update(policy, batch, cfg, with_entropy=(k == 0), ref_logp=ref_logp,
                                                old_logp=old_logp)
                updates.append(stats)
    step_scheduler(policy.scheduler)
    return step_metrics(rounds, batch, updates, timer, lr, cfg), updates


def generate_round(policy: Policy, records, images, cfg: GRPOConfig, timer: Timer) -> GroupBatch:
    """Sample G completions per prompt in ONE batched call (this is pi_old), score them,
    and compute their group-relative advantages (here only: a group's advantages depend on its
    own rewards alone, so dynamic sampling's batch keeps them as they are)."""
    with timer.phase("sample"):
        rollout = vlm.sample_completions(policy.model, policy.processor, images, group_size=cfg.num_generations,
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p)
    with timer.phase("score"):
        labels = [r["label"] for r in records for _ in range(cfg.num_generations)]
        totals, components = combined_reward(rollout.texts, labels, cfg.rewards)
        rewards = torch.tensor(totals)
    advantages, zero_std = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    return GroupBatch(records, images, rollout, rewards, components, advantages.to(policy.device), zero_std)


@torch.no_grad()
def reference_pass(policy: Policy, batch: GroupBatch, cfg: GRPOConfig) -> torch.Tensor | None:
    """pi_ref's log-probs [N, T] (the frozen start of the stage), or None when beta == 0.

    pi_old needs no pass of its own: it is the policy that sampled, and the first update's forward
    runs on exactly those weights (no optimizer step comes before all of its chunks have run), so
    policy_update returns that forward's detached log-probs as pi_old for updates 2..mu."""
    if cfg.beta == 0:
        return None
    r = batch.rollout
    args = (r.prompts, r.completion_ids, r.completion_mask, r.group_size, cfg.temperature, cfg.logp_micro_batch)
    with policy.autocast:
        return reference_logprobs(policy, args)


def reference_logprobs(policy: Policy, args: tuple) -> torch.Tensor:
    """pi_ref's log-probs: the loaded reference model's, or, with LoRA (no reference loaded), the
    policy's own with its adapters off: W x + (alpha / r) B A x minus the adapters' term is the
    base, the start of the stage. Callers are under torch.no_grad()."""
    if policy.ref_model is not None:
        return vlm.completion_logprobs(policy.ref_model, *args)
    with lora.lora_disabled(policy.model):   # refuses a model without adapters: it is no reference
        return vlm.completion_logprobs(policy.model, *args)


def policy_update(policy: Policy, batch: GroupBatch, cfg: GRPOConfig, with_entropy: bool,
                  ref_logp: torch.Tensor | None = None,
                  old_logp: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
    """One optimizer step on the GRPO loss, micro-batched over completions with gradient
    accumulation. Returns (detached stats weighted like the loss, with the grad norm; pi_old's
    log-probs [N, T] for the next update). The first update of a batch (old_logp None) computes
    them: its own forward, detached, taken before the optimizer step (None when mu == 1: no
    update follows); later updates read them as given and pass them on."""
    r, model = batch.rollout, policy.model
    n, mask = r.completion_ids.shape[0], r.completion_mask
    step = cfg.micro_batch or n
    totals: dict[str, torch.Tensor] = {}
    first_update = old_logp is None   # its forward is pi_old's: the weights have not moved since sampling
    old_chunks = []
    with policy.autocast:  # the B images go through the vision tower once; every chunk's rows share them
        features = vlm.encode_images(model, r.prompts, chunked_backward=True)
    for s in range(0, n, step):
        e = min(n, s + step)
        with policy.autocast:
            out = vlm.completion_logprobs(model, r.prompts, r.completion_ids[s:e], mask[s:e], r.group_size,
                                          cfg.temperature, with_entropy=with_entropy, features=features, first_row=s)
        logp, entropy = out if with_entropy else (out, None)
        # Update 1: the policy has not moved since sampling, so pi_old = pi_theta (detached): rho = 1
        # in value, with the policy gradient as its gradient. Updates 2..mu reuse these log-probs.
        if first_update:
            old = logp.detach()
            old_chunks.append(old)
        else:
            old = old_logp[s:e]
        ref = ref_logp[s:e] if ref_logp is not None else None
        loss, stats = grpo_loss(logp, old, ref, batch.advantages[s:e], mask[s:e], cfg.eps_low, cfg.eps_high,
                                cfg.beta, cfg.aggregation, cfg.max_new_tokens)
        w = chunk_weight(mask, s, e, cfg.aggregation)
        (loss * w).backward()
        totals["loss"] = totals.get("loss", 0.0) + loss.detach() * w   # sums to the full-batch loss
        if entropy is not None:
            stats["entropy"] = masked_aggregate(entropy, mask[s:e], "token")
        for k, v in stats.items():                                      # diagnostics: row-weighted means
            totals[k] = totals.get(k, 0.0) + v * ((e - s) / n)
    features.backward()  # the chunks' summed gradient on the image features, through the vision tower once
    if first_update and cfg.mu > 1:
        old_logp = torch.cat(old_chunks)   # kept before the optimizer step moves the weights
    params = [p for p in model.parameters() if p.requires_grad]
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if not torch.isfinite(totals["grad_norm"]) or not torch.isfinite(totals["loss"]):
        raise FloatingPointError(f"non-finite loss {totals['loss'].item()} or grad norm {totals['grad_norm'].item()}")
    policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return totals, old_logp


def chunk_weight(mask: torch.Tensor, start: int, end: int, aggregation: str) -> torch.Tensor | float:
    """Factor that makes the sum of per-micro-batch losses equal the full-batch loss.

    sequence / constant average over completions: weight rows/N. token averages over all
    tokens of the batch: weight (tokens in chunk)/(tokens in batch)."""
    if aggregation == "token":
        return mask[start:end].sum() / mask.sum().clamp(min=1)
    return (end - start) / mask.shape[0]


def step_scheduler(scheduler) -> None:
    """One LR-schedule step per GRPO step, whether or not the optimizer stepped."""
    with warnings.catch_warnings():  # a skipped first step is meant: torch warns when no optimizer step came before
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        scheduler.step()


def step_metrics(rounds: list[GroupBatch], batch: GroupBatch, updates: list[dict], timer: Timer, lr: float,
                 cfg: GRPOConfig) -> dict:
    """The step's log line. Sample statistics cover every completion generated this step (all
    rounds, so they mean the same with and without dynamic sampling); update statistics are the
    mean over the mu updates, brought to the host in one transfer."""
    g = cfg.num_generations
    rewards = torch.cat([r.rewards for r in rounds])
    lengths = torch.cat([r.rollout.completion_mask.sum(1) for r in rounds]).float()
    useful = int((~batch.zero_std).sum())
    metrics = {f"reward_{name}": sum(sum(r.components[name]) for r in rounds) / len(rewards)
               for name in rounds[0].components}
    metrics.update(
        reward_mean=rewards.mean().item(), reward_std=rewards.view(-1, g).std(dim=1).mean().item(),
        frac_zero_std=torch.cat([r.zero_std for r in rounds]).float().mean().item(),
        completion_len_mean=lengths.mean().item(), completion_len_max=lengths.max().item(),
        frac_truncated=torch.cat([r.rollout.truncated for r in rounds]).float().mean().item(),
        gen_rounds=len(rounds), generations=len(rewards), skipped_update=int(not updates), lr=lr,
        # the forward passes that ran: pi_old is update 1's own forward, never a pass of its own
        passes="+".join([f"sample*{len(rounds)}"] + ["reference"] * (bool(updates) and cfg.beta != 0)
                        + [f"update*{len(updates)}"] * bool(updates)),
        batch_zero_std_groups=int(batch.zero_std.sum()), useful_groups=useful,
        generations_per_useful_group=len(rewards) / useful if useful else None,
        tokens_per_s=lengths.sum().item() / max(1e-9, timer.seconds["sample"]),
        **{f"time_{k}": round(v, 4) for k, v in timer.seconds.items()},
        **{f"mem_peak_{k}_gib": round(v, 3) for k, v in timer.peak_gib.items()})
    if updates:
        # The first update's ratio is exactly 1, so the clip fractions are diluted by 1/mu.
        keys = ["loss", "kl_mean", "frac_clipped_lower", "frac_clipped_upper", "ratio_mean", "grad_norm"]
        stacked = torch.stack([torch.stack([u[k].float() for k in keys]) for u in updates]).mean(0).tolist()
        metrics.update(dict(zip(keys, stacked)), entropy=updates[0]["entropy"].item())
    metrics["samples"] = [{"label": batch.records[i // g]["label"], "completion": batch.rollout.texts[i],
                           "reward": batch.rewards[i].item()} for i in range(0, len(batch.rollout.texts), g)][:3]
    return metrics


class Timer:
    """Wall-clock seconds per phase (sampling / scoring / log-probs / update) and, on a GPU, the
    peak memory allocated during each phase (GiB): where a run comes close to the card's limit."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_gib = device, {}, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()  # GPU work is asynchronous: wait, or its time lands in a later phase
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), peak)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The command line. The run around grpo_step (loading, resuming, the step loop, evaluation, logs,
# checkpoints) is grpo_run.main; it is imported on call because grpo_run imports this module.
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """`python clgrpo.py --stage 2|3|4 ...`: one stage's run (grpo_run.main)."""
    import grpo_run
    return grpo_run.main(argv)


if __name__ == "__main__":
    run_cli(main)
