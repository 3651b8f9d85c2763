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

import torch

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
STAGE_PRESETS = {
    2: dict(rewards={"format": 1.0}, eps_low=0.2, eps_high=0.2),
    3: dict(rewards={"format": 1.0, "accuracy": 1.0}, eps_low=0.2, eps_high=0.2),
    4: dict(rewards={"format": 1.0, "accuracy": 1.0}, eps_low=0.2, eps_high=0.1),
}
