"""The GRPO / CLGRPO math against hand-computed numbers, values and gradients."""

import math

import pytest
import torch

from clgrpo import clipped_surrogate, group_advantages, grpo_loss, kl_k3, masked_aggregate

LN = math.log


# ---------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------
def test_group_advantages_two_groups_by_hand():
    # Group 1: [1, 0, 0] mean 1/3, deviations [2/3, -1/3, -1/3], sample var (4/9+1/9+1/9)/2 = 1/3.
    # Group 2: [3, 1, 2] mean 2, deviations [1, -1, 0], sample var (1+1+0)/2 = 1.
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    adv, zero_std = group_advantages(rewards, group_size=3)
    s1 = math.sqrt(1 / 3) + 1e-4
    expected = [2 / 3 / s1, -1 / 3 / s1, -1 / 3 / s1, 1 / 1.0001, -1 / 1.0001, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert zero_std.tolist() == [False, False]


def test_group_advantages_equal_rewards_are_exact_zeros():
    # Eight copies of 0.1: in float32 their mean is NOT 0.1, so r - mean is rounding noise
    # (~7e-9), and dividing it by (std + eps) is not zero. Only an exact max == min test gives
    # exact zeros whatever the reduction does: for a lone group torch's std is noise too
    # (~8e-9), so a `std == 0` test misses it.
    alone = torch.tensor([0.1] * 8)
    assert (alone - alone.mean() != 0).all()                               # the premises that
    assert alone.view(1, 8).std(dim=1, unbiased=True).item() != 0.0        # make this test bite
    adv, zero_std = group_advantages(alone, group_size=8)
    assert adv.tolist() == [0.0] * 8 and zero_std.tolist() == [True]
    rewards = torch.tensor([0.1] * 8 + [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    adv, zero_std = group_advantages(rewards, group_size=8)
    assert adv[:8].tolist() == [0.0] * 8
    assert zero_std.tolist() == [True, False]
    # [1,0,1,0,1,0,1,0]: mean 0.5, sample var (8 * 0.25) / 7 = 2/7
    s = math.sqrt(2 / 7) + 1e-4
    assert adv[8:].tolist() == pytest.approx([x / s for x in (0.5, -0.5) * 4], rel=1e-6)


def test_group_advantages_tiny_real_spread_is_not_a_zero_std_group():
    # [1, 1 + d, 1, 1] with d = 2^-20 (exact in float32): a real, tiny difference. Deviations
    # [-d/4, 3d/4, -d/4, -d/4], sample var (3 d^2/16 + 9 d^2/16) / 3 = d^2/4, std = d/2.
    # A std- or range-below-tolerance test would call this group "equal" and zero it. The
    # eps = 1e-4 outside the sqrt dominates std = 4.8e-7: A = dev / (d/2 + 1e-4), not
    # dev / sqrt(d^2/4 + 1e-4) (eps inside the sqrt, 100x smaller) nor dev / (d/2) (no eps, +-1.5).
    d = 2.0 ** -20
    adv, zero_std = group_advantages(torch.tensor([1.0, 1.0 + d, 1.0, 1.0]), group_size=4)
    assert zero_std.tolist() == [False]
    assert adv.tolist() == pytest.approx([x * d / (d / 2 + 1e-4) for x in (-0.25, 0.75, -0.25, -0.25)], rel=1e-4)


def test_group_advantages_scale_none_is_centred_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    adv, _ = group_advantages(rewards, group_size=3, scale="none")
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0], abs=1e-6)


def test_group_advantages_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(6), group_size=1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(6), group_size=3, scale="batch")


# ---------------------------------------------------------------------------------------------
# Clipped surrogate: value and gradient, each sign of A, ratio below / inside / above the range
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "adv, ratio, value, dvalue_dratio",
    [
        # A > 0: only the upper bound 1 + eps_high = 1.2 can bind.
        (2.0, 0.5, 1.0, 2.0),    # below range: min(1.0, 0.8*2=1.6) = 1.0, unclipped -> grad A
        (2.0, 1.1, 2.2, 2.0),    # inside
        (2.0, 1.5, 2.4, 0.0),    # above: min(3.0, 1.2*2=2.4) = 2.4, constant -> grad 0
        # A < 0: only the lower bound 1 - eps_low = 0.8 can bind.
        (-2.0, 0.5, -1.6, 0.0),  # below: min(-1.0, 0.8*-2=-1.6) = -1.6, constant -> grad 0
        (-2.0, 1.1, -2.2, -2.0),  # inside
        (-2.0, 1.5, -3.0, -2.0),  # above: min(-3.0, -2.4) = -3.0, unclipped -> grad A
    ],
)
def test_clipped_surrogate_value_and_gradient(adv, ratio, value, dvalue_dratio):
    r = torch.tensor([[ratio]], requires_grad=True)
    out = clipped_surrogate(r, torch.tensor([adv]), eps_low=0.2, eps_high=0.2)
    out.sum().backward()
    assert out.item() == pytest.approx(value)
    assert r.grad.item() == pytest.approx(dvalue_dratio)


def test_asymmetric_clip_bounds_act_independently():
    a = torch.tensor([1.0, -1.0])
    r = torch.tensor([[1.15], [0.75]], requires_grad=True)
    # eps_high = 0.1 clips the A>0 token at 1.1; eps_low = 0.3 leaves the A<0 token (0.75 > 0.7) free.
    out = clipped_surrogate(r, a, eps_low=0.3, eps_high=0.1)
    out.sum().backward()
    assert out.squeeze(1).tolist() == pytest.approx([1.1, -0.75])
    assert r.grad.squeeze(1).tolist() == pytest.approx([0.0, -1.0])
    # Swap: eps_high = 0.3 frees the A>0 token, eps_low = 0.1 clips the A<0 token at 0.9.
    r.grad = None
    out = clipped_surrogate(r, a, eps_low=0.1, eps_high=0.3)
    out.sum().backward()
    assert out.squeeze(1).tolist() == pytest.approx([1.15, -0.9])
    assert r.grad.squeeze(1).tolist() == pytest.approx([1.0, 0.0])


# ---------------------------------------------------------------------------------------------
# k3
# ---------------------------------------------------------------------------------------------
def test_kl_k3_known_values_and_gradient():
    logp = torch.tensor([LN(0.5), LN(0.25), LN(0.3)], requires_grad=True)
    ref = torch.tensor([LN(0.25), LN(0.5), LN(0.3)])
    k = kl_k3(logp, ref)
    # d = ref - logp: [ln 0.5, ln 2, 0]; k3 = e^d - d - 1
    assert k.tolist() == pytest.approx([0.5 + LN(2) - 1, 2 - LN(2) - 1, 0.0], abs=1e-6)
    k.sum().backward()
    assert logp.grad.tolist() == pytest.approx([1 - 0.5, 1 - 2.0, 0.0], abs=1e-6)  # 1 - exp(ref - logp)


def test_kl_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = -5 * torch.rand(1000, generator=g), -5 * torch.rand(1000, generator=g)
    assert (kl_k3(logp, ref) >= 0).all()
    assert kl_k3(logp, logp).abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# Aggregations and masking
# ---------------------------------------------------------------------------------------------
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("aggregation, max_len, expected", [
    ("sequence", None, ((1 + 2) / 2 + 4 / 1) / 2),   # 2.75: mean of per-completion means
    ("token", None, (1 + 2 + 4) / 3),               # 7/3: mean over all kept tokens
    ("constant", None, (1 + 2 + 4) / (2 * 3)),      # 7/6: sum / (N * T)
    ("constant", 4, (1 + 2 + 4) / (2 * 4)),         # 7/8: sum / (N * max_completion_length)
])
def test_aggregations_on_uneven_lengths(aggregation, max_len, expected):
    assert masked_aggregate(VALUES, MASK, aggregation, max_len).item() == pytest.approx(expected)


@pytest.mark.parametrize("aggregation, max_len, expected", [
    ("sequence", None, ((1 + 2) / 2 + 4 / 1 + 0) / 3),   # the empty row counts as a completion with mean 0
    ("token", None, (1 + 2 + 4) / 3),
    ("constant", None, (1 + 2 + 4) / (3 * 3)),
    ("constant", 5, (1 + 2 + 4) / (3 * 5)),
])
def test_aggregations_with_nan_inf_padding_and_an_all_masked_row(aggregation, max_len, expected):
    """Masked positions hold NaN and +-inf, and one row is masked entirely (a completion whose
    every token was cut): value and gradient must come from the kept tokens alone."""
    nan, inf = float("nan"), float("inf")
    values = torch.tensor([[1.0, 2.0, nan], [4.0, inf, -inf], [nan, inf, nan]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = masked_aggregate(values, mask, aggregation, max_len)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    w = {"sequence": [[1 / 6, 1 / 6, 0], [1 / 3, 0, 0], [0, 0, 0]],
         "token": [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0], [0, 0, 0]],
         "constant": [[1 / (3 * (max_len or 3))] * 2 + [0], [1 / (3 * (max_len or 3)), 0, 0], [0, 0, 0]]}[aggregation]
    assert torch.allclose(values.grad, torch.tensor(w), atol=1e-7)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_an_all_masked_batch_gives_zero_loss_and_zero_stats(aggregation):
    logp = torch.full((2, 3), float("nan"), requires_grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]),
                            torch.zeros(2, 3), aggregation=aggregation)
    assert loss.item() == 0.0
    assert {k: v.item() for k, v in stats.items()} == {"clip_low_frac": 0.0, "clip_high_frac": 0.0,
                                                        "ratio_mean": 0.0, "kl_mean": 0.0}


def test_unknown_aggregation_is_an_error():
    with pytest.raises(ValueError, match="aggregation"):
        masked_aggregate(VALUES, MASK, "mean")


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_masked_positions_change_nothing(aggregation):
    def loss_and_grad(fill):
        logp = torch.tensor([[-1.0, -2.0, fill], [-0.5, fill, fill]], requires_grad=True)
        old = torch.tensor([[-1.1, -1.9, fill + 1], [-0.7, -fill, 3.0]])
        ref = torch.tensor([[-1.3, -2.2, 5.0], [-0.4, 9.0, -fill]])
        loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.5, -0.5]), MASK, beta=0.1, aggregation=aggregation)
        loss.backward()
        return loss.item(), logp.grad[MASK.bool()].tolist(), {k: v.item() for k, v in stats.items()}

    base = loss_and_grad(-3.0)
    assert all(math.isfinite(x) for x in [base[0], *base[1], *base[2].values()])
    for fill in (-40.0, 0.0, float("nan"), float("inf"), -float("inf")):
        assert loss_and_grad(fill) == base, fill


# ---------------------------------------------------------------------------------------------
# The full loss
# ---------------------------------------------------------------------------------------------
def test_grpo_loss_by_hand_with_kl():
    logp = torch.tensor([[LN(0.5), LN(0.25)]], requires_grad=True)
    old = torch.tensor([[LN(0.4), LN(0.25)]])
    ref = torch.tensor([[LN(0.25), LN(0.5)]])
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.2, beta=0.1)
    # ratio = [1.25, 1.0]; surrogate = [min(1.25, 1.2), 1.0] = [1.2, 1.0]
    # k3 = [0.5 + ln2 - 1, 2 - ln2 - 1] (sums to 0.5); objective mean = (2.2 - 0.1*0.5) / 2 = 1.075
    assert loss.item() == pytest.approx(-1.075, abs=1e-6)
    loss.backward()
    # token 0: clipped (A>0, rho>1.2) -> only KL: d obj = -beta*(1 - e^{ln .5}) = -0.05; loss grad +0.05/2
    # token 1: rho=1 -> surrogate grad rho*A = 1; KL: -beta*(1 - 2) = +0.1; d obj = 1.1; loss grad -1.1/2
    assert logp.grad.tolist()[0] == pytest.approx([0.025, -0.55], abs=1e-6)
    assert stats["clip_high_frac"].item() == pytest.approx(0.5)
    assert stats["clip_low_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.125)
    assert stats["kl_mean"].item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_mu1_loss_is_the_plain_policy_gradient(aggregation):
    """With old_logp = logp.detach() the ratio is exactly 1, so the *value* of the loss is just
    -aggregate(A): it says nothing about the policy. Learning still happens because the ratio's
    gradient is rho * grad(logp) = grad(logp): the gradient is the REINFORCE-with-baseline policy
    gradient -A_i * grad(logp_it), weighted by the aggregation. A flat loss curve is expected."""
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    logp = (-3 * torch.rand(3, 4, generator=g)).requires_grad_()
    adv = torch.tensor([0.7, -1.2, 0.4])
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, aggregation=aggregation)
    loss.backward()
    m = mask.float()
    n, t = mask.shape
    weight = {"sequence": m / (m.sum(1, keepdim=True) * n), "token": m / m.sum(), "constant": m / (n * t)}[aggregation]
    expected_grad = -adv[:, None] * weight
    assert torch.allclose(logp.grad, expected_grad, atol=1e-7)
    assert loss.item() == pytest.approx(-(adv[:, None] * weight).sum().item(), abs=1e-7)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clip_low_frac"].item() == stats["clip_high_frac"].item() == 0.0


def test_clip_fractions_count_only_masked_tokens_where_the_bound_binds():
    # eps_low = 0.3, eps_high = 0.1: the bounds are 0.7 and 1.1.
    #   row 0, A > 0: 1.5, 1.15, 1.2 bind high (3); 0.5 is on the wrong side, never clipped;
    #                 the masked 1.5 does not count
    #   row 1, A < 0: 0.5, 0.6 bind low (2); 0.8 is inside (it would bind at 1 - eps_high = 0.9);
    #                 1.5 is on the wrong side; the masked 0.5 does not count
    #   row 2, A = 0: nothing is clipped, whatever the ratio
    # Each count differs from what a wrong sign, a wrong eps or a missing mask would give.
    ratio = torch.tensor([[1.5, 1.15, 1.2, 0.5, 1.5], [0.5, 0.6, 0.8, 1.5, 0.5], [1.5, 0.5, 1.5, 0.5, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    logp = torch.log(ratio)
    _, stats = grpo_loss(logp, torch.zeros_like(logp), None, torch.tensor([1.0, -1.0, 0.0]), mask,
                         eps_low=0.3, eps_high=0.1, beta=0.0)
    assert stats["clip_high_frac"].item() == pytest.approx(3 / 13)
    assert stats["clip_low_frac"].item() == pytest.approx(2 / 13)
    assert stats["ratio_mean"].item() == pytest.approx((4.35 + 3.4 + 5.0) / 13)
    _, stats = grpo_loss(logp, torch.zeros_like(logp), None, torch.zeros(3), mask, beta=0.0)
    assert stats["clip_high_frac"].item() == stats["clip_low_frac"].item() == 0.0


def test_missing_reference_with_nonzero_beta_is_an_error():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(x, x, None, torch.zeros(1), torch.ones(1, 2), beta=0.04)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_chunk_weights_make_micro_batched_gradients_exact(aggregation):
    """Summing weighted per-chunk losses must give the full-batch loss and gradient."""
    from clgrpo import chunk_weight

    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    logp = (-3 * torch.rand(5, 4, generator=g)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(5, 4, generator=g)
    ref = logp.detach() + 0.3 * torch.randn(5, 4, generator=g)
    adv = torch.randn(5, generator=g)
    full, _ = grpo_loss(logp, old, ref, adv, mask, aggregation=aggregation, max_len=6)
    (full_grad,) = torch.autograd.grad(full, logp)
    total = 0.0
    for s, e in [(0, 2), (2, 4), (4, 5)]:
        part, _ = grpo_loss(logp[s:e], old[s:e], ref[s:e], adv[s:e], mask[s:e], aggregation=aggregation, max_len=6)
        total = total + part * chunk_weight(mask, s, e, aggregation)
    (chunk_grad,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(chunk_grad, full_grad, atol=1e-7)
