"""GRPO tensor maths against values computed by hand on tiny tensors (nanoseek/train/grpo_loss.py).

Expected numbers are written out as literals, derived in the comments, never recomputed with the
formula under test.
"""

import math

import pytest
import torch

from nanoseek.train.grpo_loss import (
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    kl_estimate,
    loss_token_count,
    off_policy_sequence_mask,
    sampling_mask_logprobs,
    token_entropy,
    token_logprobs,
    truncated_importance_weights,
    zero_spread_groups,
)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std_by_default():
    # [1,0,0,1]: mean 0.5, deviations +-0.5, sum of squares 1, unbiased var 1/3, std 0.577350
    # A = +-0.5 / 0.577350 = +-0.866025 (sqrt(3)/2)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, eps=0.0)
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025])


def test_group_advantages_population_std_and_eps():
    # population var 1/4, std 0.5: A = +-1
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, eps=0.0, unbiased=False)
    close(adv, [1.0, -1.0, -1.0, 1.0])
    # default eps 1e-4 is added to the std: 0.5 / 0.577450 = 0.865875
    close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), [0.865875, -0.865875, -0.865875, 0.865875])


def test_group_advantages_mean_only():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0]), group_size=2, scale="none")
    # groups [1,0] [0,1] [3,1]: means 0.5 0.5 2
    close(adv, [0.5, -0.5, -0.5, 0.5, 1.0, -1.0])


def test_group_advantages_batch_scaling():
    # batch [1,0,0,1, 1,1,1,1]: batch mean 0.75; squared deviations 6 * 0.0625 + 2 * 0.5625 = 1.5
    # unbiased var 1.5 / 7 = 0.2142857, std 0.462910; group means 0.5 and 1
    # group 1: +-0.5 / 0.462910 = +-1.080123; group 2: 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4, scale="batch", eps=0.0)
    close(adv, [1.080123, -1.080123, -1.080123, 1.080123, 0.0, 0.0, 0.0, 0.0])


def test_equal_rewards_give_zero_advantage_not_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4)
    close(adv, [0.0, 0.0, 0.0, 0.0])


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), group_size=2, scale="grouped")


def test_zero_spread_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert zero_spread_groups(r, 4).tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_values():
    logp = torch.tensor([-1.0, -2.0, -1.5])
    ref = torch.tensor([-2.0, -1.0, -1.5])
    # d = ref - logp = [-1, 1, 0]
    close(kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0])
    close(kl_estimate(logp, ref, "k2"), [0.5, 0.5, 0.0])
    # k3 = e^d - d - 1: e^-1 + 1 - 1 = 0.367879; e - 2 = 0.718282
    close(kl_estimate(logp, ref, "k3"), [0.367879, 0.718282, 0.0])


def test_k3_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp, ref = -5 * torch.rand(1000, generator=g), -5 * torch.rand(1000, generator=g)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_unbiased_kl_value_and_gradient():
    # rho = 2 (logp - old = ln 2), d = ref - logp = ln 2
    # value = 2 * (2 - ln 2 - 1) = 0.613706; plain k3 = 0.306853
    # gradient flows through rho too: d/dlogp = rho * (logp - ref) = -2 ln 2 = -1.386294
    # (a detached rho would give rho * (1 - e^d) = -2)
    ln2 = math.log(2.0)
    old = torch.tensor([-2.0])
    logp = (old + ln2).requires_grad_()
    ref = old + 2 * ln2
    kl = kl_estimate(logp, ref, "k3", old_logp=old)
    close(kl.detach(), [0.613706])
    close(kl_estimate(logp, ref, "k3").detach(), [0.306853])
    kl.sum().backward()
    close(logp.grad, [-1.386294])


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).expand(1, 2, 4)
    # p = [.1, .2, .3, .4]: ln 0.3 = -1.203973, ln 0.2 = -1.609438
    close(token_logprobs(logits, torch.tensor([[2, 1]])), [[-1.203973, -1.609438]])
    # H = .1 ln10 + .2 ln5 + .3 ln(10/3) + .4 ln2.5 = .230259 + .321888 + .361192 + .366516
    close(token_entropy(logits), [[1.279854, 1.279854]])
    close(token_entropy(torch.zeros(1, 1, 4)), [[1.386294]])  # uniform: ln 4


def test_sampling_mask_renormalises_over_support():
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).expand(1, 3, 4).clone()
    tokens = torch.tensor([[2, 2, 1]])
    support = torch.tensor([[[False, True, True, False], [False, False, True, False], [True, True, False, True]]])
    # {1,2}: 3/(2+3) -> ln 0.6 = -0.510826; {2}: 0; {0,1,3}: 2/(1+2+4) -> ln(2/7) = -1.252763
    out = sampling_mask_logprobs(logits, tokens, support, mask=torch.ones(1, 3))
    close(out, [[-0.510826, 0.0, -1.252763]])


def test_sampling_mask_rejects_token_outside_support_and_pads_stay_finite():
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).expand(1, 2, 4).clone().requires_grad_()
    tokens = torch.tensor([[0, 0]])
    support = torch.tensor([[[True, True, False, False], [False, False, False, False]]])
    with pytest.raises(ValueError):
        sampling_mask_logprobs(logits, tokens, support, mask=torch.ones(1, 2))
    # second position is padding with an empty recorded support: falls back to the full vocabulary
    out = sampling_mask_logprobs(logits, tokens, support, mask=torch.tensor([[1.0, 0.0]]))
    close(out.detach(), [[-1.098612, -2.302585]])  # ln(1/3), ln(1/10)
    (out * torch.tensor([[1.0, 0.0]])).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- policy term


def one_token_batch(ratios, advantages):
    """N sequences of one token each, old_logp = 0 so logp = ln(ratio)."""
    logp = torch.log(torch.tensor(ratios)).unsqueeze(-1)
    return logp, torch.zeros_like(logp), torch.tensor(advantages), torch.ones_like(logp)


def test_clipping_values_and_stats():
    logp, old, adv, mask = one_token_batch([1.5, 0.5, 1.5, 0.5], [1.0, -1.0, -1.0, 1.0])
    surrogate, _ = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # min(1.5, 1.2) = 1.2; min(-0.5, -0.8) = -0.8; min(-1.5, -1.2) = -1.5; min(0.5, 0.8) = 0.5
    close(surrogate.squeeze(-1), [1.2, -0.8, -1.5, 0.5])
    loss, stats = grpo_loss(logp, old, adv, mask, loss_type="bnpo")
    close(loss, 0.15)  # -(1.2 - 0.8 - 1.5 + 0.5) / 4
    # clip active only for (1.5, A>0) [high] and (0.5, A<0) [low]
    close(stats["clip_frac"], 0.5)
    close(stats["clip_frac_high"], 0.25)
    close(stats["clip_frac_low"], 0.25)
    close(stats["ratio"], 1.0)


def test_clip_higher_is_asymmetric():
    logp, old, adv, _ = one_token_batch([1.5, 0.5, 1.25], [1.0, -1.0, 1.0])
    close(clipped_surrogate(logp, old, adv, 0.2, 0.28)[0].squeeze(-1), [1.28, -0.8, 1.25])
    close(clipped_surrogate(logp, old, adv, 0.2, 0.2)[0].squeeze(-1), [1.2, -0.8, 1.2])


def test_clipped_token_has_no_gradient():
    logp, old, adv, mask = one_token_batch([1.5, 1.5], [1.0, -1.0])
    logp.requires_grad_()
    grpo_loss(logp, old, adv, mask, loss_type="bnpo")[0].backward()
    # token 0 clipped (constant 1.2); token 1 loss = -rho * A = rho, d/dlogp = rho = 1.5, / 2 tokens
    close(logp.grad.squeeze(-1), [0.0, 0.75])


def test_off_policy_sequence_mask_cases():
    # drift = mean over real tokens of old - logp; delta = 0.1
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -6.0], [-1.0, -2.0]])
    old = torch.tensor([[-0.7, -1.8], [-0.7, -1.8], [-0.95, -1.95], [-0.95, -1.0], [-0.7, -1.8]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0, 0.0])
    # 0: A<0, drift 0.25 > 0.1 -> masked; 1: A>0 -> kept; 2: A<0, drift 0.05 -> kept;
    # 3: A<0, drift 0.05 on its real token (the pad's 5.0 does not count) -> kept; 4: A=0 -> kept
    out = off_policy_sequence_mask(logp, old, adv, mask, delta=0.1)
    close(out, [0.0, 1.0, 1.0, 1.0, 1.0])


def test_unbiased_kl_in_loss():
    ln2 = math.log(2.0)
    old = torch.tensor([[-2.0]])
    logp, ref = old + ln2, old + 2 * ln2
    args = dict(ref_logp=ref, beta=1.0, loss_type="bnpo")
    close(grpo_loss(logp, old, torch.zeros(1), torch.ones(1, 1), unbiased_kl=True, **args)[0], 0.613706)
    close(grpo_loss(logp, old, torch.zeros(1), torch.ones(1, 1), **args)[0], 0.306853)


# ----------------------------------------------------------------------------- aggregation


def two_sequences():
    """seq 0: 3 tokens, A = +1, ratios 1.0 1.1 0.9; seq 1: 1 token, A = -2, ratio 1.1; L = 3.

    Within the clip range every surrogate is rho * A: seq 0 -> 1.0, 1.1, 0.9 (sum 3.0, mean 1.0),
    seq 1 -> -2.2. Padding holds ratio 5 to show it is ignored.
    """
    logp = torch.log(torch.tensor([[1.0, 1.1, 0.9], [1.1, 5.0, 5.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return logp, torch.zeros_like(logp), torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, 0.6),  # (-1.0 + 2.2) / 2
        ("bnpo", {}, -0.2),  # (-3.0 + 2.2) / 4 tokens
        ("dapo", {}, -0.2),  # same as bnpo without a global count
        ("dapo", {"num_tokens": 8}, -0.1),  # -0.8 / 8 tokens in the whole step
        ("dr_grpo", {"max_completion_length": 4}, -0.1),  # -0.8 / (2 * 4)
    ],
)
def test_aggregation_modes(loss_type, kwargs, expected):
    logp, old, adv, mask = two_sequences()
    close(grpo_loss(logp, old, adv, mask, loss_type=loss_type, **kwargs)[0], expected)


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError):
        grpo_loss(*two_sequences(), loss_type="dr_grpo")


def test_seq_mask_drops_policy_term_but_keeps_kl():
    logp, old, adv, mask = two_sequences()
    seq_mask = torch.tensor([1.0, 0.0])
    loss, stats = grpo_loss(logp, old, adv, mask, seq_mask=seq_mask, loss_type="bnpo")
    close(loss, -0.75)  # -3.0 / 4: seq 1 still counts in the normaliser
    close(grpo_loss(logp, old, adv, mask, seq_mask=seq_mask)[0], -0.5)  # (-1.0 + 0) / 2
    close(stats["masked_seq_frac"], 0.5)
    # k1 = logp - ref = 1 on every token, beta 0.5: seq 0 -> -3.0 + 1.5, seq 1 -> 0 + 0.5 (KL kept)
    kw = dict(ref_logp=logp - 1, beta=0.5, kl_kind="k1", seq_mask=seq_mask, loss_type="bnpo")
    close(grpo_loss(logp, old, adv, mask, **kw)[0], -0.25)  # (-1.5 + 0.5) / 4


def test_mask_truncated_removes_sequence():
    logp, old, adv, mask = two_sequences()
    truncated = torch.tensor([False, True])
    close(grpo_loss(logp, old, adv, mask, truncated=truncated)[0], 0.6)  # flag alone changes nothing
    loss, stats = grpo_loss(logp, old, adv, mask, truncated=truncated, mask_truncated=True)
    close(loss, -1.0)  # seq 0 alone
    close(grpo_loss(logp, old, adv, mask, truncated=truncated, mask_truncated=True, loss_type="bnpo")[0], -1.0)
    kw = dict(truncated=truncated, mask_truncated=True, loss_type="dr_grpo", max_completion_length=4)
    close(grpo_loss(logp, old, adv, mask, **kw)[0], -0.375)  # -3.0 / 8, constant normaliser
    close(stats["truncated_frac"], 0.5)


def test_dapo_normaliser_leaves_out_masked_truncated_tokens():
    """Item 7: with mask_truncated the step's dapo token count excludes the truncated sequences' tokens.

    Step of 3 sequences in two micro-batches: two_sequences() (3 + 1 tokens, seq 1 truncated) and one more
    of 2 tokens, A = +1, ratio 1 (surrogate 2.0). Untruncated tokens: 3 + 2 = 5 (all real tokens: 6).
    Loss of the step: (-3.0 + 0 - 2.0) / 5 = -1.0, the bnpo value over the untruncated tokens.
    """
    logp, old, adv, mask = two_sequences()
    truncated = torch.tensor([False, True])
    mask3 = torch.tensor([[1.0, 1.0, 0.0]])
    both_masks = torch.cat([mask, mask3])
    both_trunc = torch.tensor([False, True, False])
    close(loss_token_count(both_masks), 6.0)
    close(loss_token_count(both_masks, both_trunc), 6.0)  # the flag alone changes nothing
    n = loss_token_count(both_masks, both_trunc, mask_truncated=True)
    close(n, 5.0)
    kw = dict(mask_truncated=True, loss_type="dapo", num_tokens=n)
    first = grpo_loss(logp, old, adv, mask, truncated=truncated, **kw)[0]
    close(first, -0.6)  # -3.0 / 5
    second = grpo_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1), mask3, truncated=torch.tensor([False]),
                       **kw)[0]
    close(first + second, -1.0)
    # a step whose tokens are all masked gives a zero loss, not 0 / 0
    zero = grpo_loss(logp, old, adv, mask, truncated=torch.tensor([True, True]), **dict(kw, num_tokens=0.0))[0]
    close(zero, 0.0)


def test_truncated_importance_sampling_weights_and_loss():
    """TIS: w = min(pi_trainer_old / pi_sampler, C), detached, times each token's policy term.

    trainer old probs 0.5, 0.2, 0.3 against sampler 0.25, 0.8, 0.3: ratios 2, 0.25, 1; C = 1.5 -> 1.5, 0.25, 1.
    On the first update (logp = trainer old, rho = 1), A = +1, bnpo over 3 tokens:
    loss = -(1.5 + 0.25 + 1) / 3 = -0.916667, d loss / d logp_t = -w_t / 3 = -0.5, -0.083333, -0.333333.
    """
    trainer_old = torch.tensor([[0.5, 0.2, 0.3]]).log()
    sampler = torch.tensor([[0.25, 0.8, 0.3]]).log()
    w = truncated_importance_weights(trainer_old, sampler, cap=1.5)
    close(w, [[1.5, 0.25, 1.0]])
    close(truncated_importance_weights(trainer_old, sampler, cap=3.0), [[2.0, 0.25, 1.0]])
    pad = truncated_importance_weights(trainer_old, sampler, 1.5, mask=torch.tensor([[1.0, 0.0, 1.0]]))
    close(pad, [[1.5, 1.0, 1.0]])  # padding gets weight 1
    logp = trainer_old.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, trainer_old, torch.ones(1), torch.ones(1, 3), loss_type="bnpo", is_weights=w)
    close(loss, -0.916667)
    loss.backward()
    close(logp.grad, [[-0.5, -0.083333, -0.333333]])
    close(stats["is_weight"], 0.916667)
    # without weights: the plain first-update loss -1
    close(grpo_loss(logp.detach(), trainer_old, torch.ones(1), torch.ones(1, 3), loss_type="bnpo")[0], -1.0)
    with pytest.raises(ValueError):
        truncated_importance_weights(trainer_old, sampler, cap=0.0)


@pytest.mark.parametrize(
    "loss_type, seq0, seq1",
    [
        ("grpo", -1 / 6, 1.0),  # -A / (|o_i| * N): -1/(3*2), 2/(1*2)
        ("bnpo", -0.25, 0.5),  # -A / 4 tokens
        ("dr_grpo", -0.125, 0.25),  # -A / (2 * 4)
    ],
)
def test_first_update_gradient_is_vanilla_policy_gradient(loss_type, seq0, seq1):
    # logp == old_logp (rho = 1): d loss / d logp = -A * mask / normaliser
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -4.0]], requires_grad=True)
    _, _, adv, mask = two_sequences()
    loss, stats = grpo_loss(logp, logp.detach().clone(), adv, mask, loss_type=loss_type, max_completion_length=4)
    loss.backward()
    close(logp.grad, [[seq0, seq0, seq0], [seq1, 0.0, 0.0]])
    close(stats["ratio"], 1.0)
    close(stats["clip_frac"], 0.0)


def test_nonfinite_padding_does_not_poison_loss_or_gradient():
    logp, old, adv, mask = two_sequences()
    logp = logp.clone()
    logp[1, 1:] = float("-inf")
    old[1, 1:] = float("-inf")
    logp.requires_grad_()
    ref = torch.full_like(old, -1.0)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, unbiased_kl=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(stats["kl"])
    assert logp.grad[1, 1:].abs().sum() == 0


def test_old_logp_none_means_on_policy():
    logp, _, adv, mask = two_sequences()
    close(grpo_loss(logp, None, adv, mask)[0], grpo_loss(logp, logp.clone(), adv, mask)[0].item())
    close(grpo_loss(logp, None, adv, mask)[0], 0.5)  # rho = 1: per-sequence losses -A = -1, +2; mean 0.5


def test_per_sequence_beta_weights_kl_by_domain():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    mask = torch.ones(2, 2)
    adv = torch.zeros(2)
    # k3 at logp - ref = 1: exp(-1) - (-1) - 1 = 0.3679; sequence 0 weight 0 (math), sequence 1 weight 0.5
    loss, _ = grpo_loss(logp, logp, adv, mask, ref_logp=ref, beta=torch.tensor([0.0, 0.5]))
    assert abs(loss.item() - (0.0 + 0.5 * 0.36788) / 2) < 1e-4


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_float_rewards_give_exactly_zero_advantage(scale):
    # 1.0 * accuracy + 0.2 * format: the float mean of eight 0.2s is not 0.2, yet A must be exactly 0
    # (the trainer skips such rows, and a ~1e-4 "advantage" is noise anyway)
    r = torch.tensor([0.2] * 8 + [1.2, 0.2, 0.2, 1.2, 0.2, 0.2, 0.2, 0.2] + [1.2] * 8)
    a = group_advantages(r, 8, scale=scale)
    assert torch.equal(a[:8], torch.zeros(8)) and torch.equal(a[16:], torch.zeros(8))
    assert (a[8:16] != 0).all()
