"""The tensor mathematics of GRPO (DeepSeekMath, R1) with the DAPO / Dr. GRPO aggregations and the
DeepSeek-V3.2 changes (unbiased KL, off-policy sequence masking, keep-sampling-mask). Pure functions
of tensors: no model, no sampler, no optimiser; nothing here prints or syncs except the one data
check in `sampling_mask_logprobs`.

Shape legend: P = prompts, G = completions per prompt (group size), N = P * G sequences,
L = padded completion length, V = vocabulary. `mask` (N, L) marks real completion tokens (float or
bool). Log-probs are per token, of the token that was sampled: `logp` under pi_theta (with grad),
`old_logp` under pi_old, the sampler's own log-prob stored at rollout time (no grad), `ref_logp`
under the frozen reference (no grad).

Objective per token (DeepSeekMath eq. 3; V3.2 sec. 3.1):
    rho_t = pi_theta / pi_old = exp(logp - old_logp)
    loss_t = -( M_i * min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) - beta KL_t )
with A_i the group-relative advantage of sequence i, M_i the V3.2 off-policy mask (1 = keep).

Choices (see the docstrings for the why):
- Group std is Bessel-corrected (unbiased, torch's default, as TRL and verl compute it).
- `scale="batch"` divides by the std of the raw rewards of the whole batch (TRL's scale_rewards).
- The unbiased KL multiplies k3 by the *non-detached* ratio: value and gradient are then both
  unbiased for KL(pi_theta || pi_ref) under samples from pi_old.
- Off-policy masking drops only the policy term; the sequence's KL term and its place in the
  normaliser stay (V3.2 puts M_i,t on the min(...) term only).
- `mask_truncated` removes a truncated sequence completely (policy, KL, and normaliser), except for
  dr_grpo whose normaliser is a constant by definition; `loss_token_count` gives the matching dapo
  normaliser for a whole optimiser step.
- Truncated importance sampling (TIS, Yao et al. 2025) multiplies the policy term of each token by
  w_t = min(pi_old_trainer / pi_sampler, C), detached (`truncated_importance_weights`): it corrects the
  mismatch between the sampler's and the trainer's numerics; the clip ratio then uses the trainer's pi_old.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_KINDS = ("k1", "k2", "k3")
SCALES = ("group", "batch", "none")


# ----------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, unbiased: bool = True
) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath sec. 4.1.2, outcome supervision): (N,) -> (N,).

    A_i = (r_i - mean_group(r)) / (std + eps), one value for every token of sequence i. Sequences are
    laid out group by group: rewards[g * G:(g + 1) * G] share a prompt.
      scale="group": std of the sequence's own group (GRPO as published).
      scale="batch": std of all N rewards, centred on the batch mean (TRL scale_rewards="batch").
      scale="none":  no division, A = r - mean_group(r) (Dr. GRPO; the V3.2 summaries; nanochat).
    std is Bessel-corrected (divide by G - 1) unless unbiased=False (divide by G). A group whose
    rewards are all equal gets A = 0 in every mode (eps keeps 0 / 0 away).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size, got shape {tuple(rewards.shape)} "
            f"and group_size={group_size}"
        )
    if unbiased and scale == "group" and group_size < 2:
        raise ValueError("scale='group' with the unbiased std needs group_size >= 2")
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=unbiased) + eps)
    elif scale == "batch":
        adv = adv / (r.std(unbiased=unbiased) + eps)
    # Exactly 0 for equal rewards: the float mean of equal values can miss them by an ulp (8 x 0.2 gives
    # r - mean = -1.5e-8, and the group std is as tiny, so A came out near 1e-4 instead of 0).
    adv = adv.masked_fill(r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True), 0.0)
    return adv.reshape(-1)


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards -> (P,) bool: True where every reward in the group is exactly equal.

    Such a group has A = 0 for all its completions and gives no policy gradient (only KL); DAPO's
    dynamic sampling drops or resamples them, and their share is a health metric (should stay < 1).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}")
    r = rewards.view(-1, group_size)
    return r.amax(dim=1) == r.amin(dim=1)


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) from logits: (N, L, V), (N, L) -> (N, L) float32.

    Computed as logit[token] - logsumexp(logits) rather than log_softmax + gather, so no second
    (N, L, V) tensor is kept for backward. Divide logits by the sampling temperature first.
    """
    logits = logits.float()  # bf16 logsumexp over 100k+ entries is too coarse for ratios near 1
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, (N, L, V) -> (N, L): H = lse(z) - sum_v p_v z_v."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def sampling_mask_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, support_mask: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """V3.2 keep-sampling-mask (sec. 3.1): log pi_theta renormalised over the sampler's support.

    (N, L, V) logits, (N, L) tokens, (N, L, V) bool support (the top-p / top-k set kept at sampling)
    -> (N, L): logp = z[token] - logsumexp(z[support]). pi_old truncated its distribution to the
    support, so pi_theta is truncated the same way and both share one action space.
    A sampled token is always in its support; one that is not at a real position (`mask`) is a
    bookkeeping error and raises ValueError. Positions whose token is not in the support (padding,
    often stored with an empty support) fall back to the full vocabulary, which keeps every value
    finite: a -inf there would turn into NaN gradients even after masking.
    """
    in_support = support_mask.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, L)
    if mask is not None and bool((mask.bool() & ~in_support).any()):
        raise ValueError("a sampled token lies outside its recorded sampling support")
    support = support_mask | ~in_support.unsqueeze(-1)  # (N, L, V)
    logits = logits.float().masked_fill(~support, float("-inf"))
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------- KL


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3", old_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token (Schulman's k1/k2/k3).

    With d = ref_logp - logp:  k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1 (>= 0; DeepSeekMath eq. 4).
    Unbiased KL (V3.2 sec. 3.1): pass old_logp to multiply by rho = pi_theta / pi_old. Samples come
    from pi_old, so the importance weight makes the estimate's value unbiased for KL(pi_theta||pi_ref).
    rho is NOT detached: d/dlogp [rho * k3] = rho * (logp - ref_logp), the importance-weighted true
    KL gradient; with a detached rho it would be rho * (1 - pi_ref/pi_theta), k3's biased gradient.
    Defined by V3.2 for k3; the weight applies to any kind here. All shapes (N, L) -> (N, L).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
    d = ref_logp - logp
    if kind == "k1":
        kl = -d
    elif kind == "k2":
        kl = 0.5 * d * d
    else:
        kl = torch.exp(d) - d - 1.0
    if old_logp is not None:
        kl = torch.exp(logp - old_logp) * kl
    return kl


# ----------------------------------------------------------------------------- policy term


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (DeepSeekMath eq. 3), per token: -> (surrogate (N, L), ratio (N, L)).

    min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); eps_high > eps_low is DAPO's clip-higher.
    advantages (N,) are broadcast to every token of the sequence. old_logp is detached here.
    """
    ratio = torch.exp(logp - old_logp.detach())  # (N, L)
    adv = advantages.unsqueeze(-1).to(ratio.dtype)  # (N, 1)
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv), ratio


def off_policy_sequence_mask(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, delta: float
) -> torch.Tensor:
    """V3.2 off-policy sequence masking (sec. 3.1): (N, L), (N, L), (N,), (N, L) -> (N,) float, 1 = keep.

    M_i = 0 when A_i < 0 and (1/|o_i|) sum_t log(pi_old / pi_theta) > delta, else 1. old_logp must be
    the sampler's own log-prob (so training/inference mismatch counts as drift too). The mean runs
    over real tokens only. Negative samples that drifted far are the ones that destabilise training;
    positive ones are kept whatever their drift. No gradient flows through the mask.
    """
    m = mask.to(logp.dtype)
    drift = ((old_logp - logp).detach() * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # (N,)
    return (~((advantages < 0) & (drift > delta))).to(logp.dtype)


def truncated_importance_weights(
    trainer_old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Truncated importance sampling weights (Yao et al. 2025; TRL's vllm_importance_sampling_correction in
    its token_truncate mode; verl's tis_imp_ratio_cap): (N, L), (N, L) -> (N, L), no grad.

    w_t = min(exp(logp_trainer_old - logp_sampler), cap): the trainer's own log-prob of the sampled token
    under the pre-update weights against the sampler's. Samples come from the sampler, so w re-weights them
    towards the trainer's pi_old; the cap bounds the variance. Padding (mask 0) gets weight 1.
    """
    if cap <= 0:
        raise ValueError(f"importance sampling cap must be > 0, got {cap}")
    w = torch.exp((trainer_old_logp - sampler_logp).detach().float()).clamp(max=cap)
    if mask is not None:
        w = torch.where(mask.bool(), w, 1.0)
    return w


def loss_token_count(mask: torch.Tensor, truncated: torch.Tensor | None = None, mask_truncated: bool = False
                     ) -> torch.Tensor:
    """The tokens a dapo normaliser counts, (N, L) mask and (N,) truncated -> 0-dim: every real token, less
    those of truncated sequences when mask_truncated (they are out of the loss, so out of its normaliser).
    Pass the count over a whole optimiser step (all micro-batches) as grpo_loss(num_tokens=...)."""
    m = mask.float()
    if truncated is not None and mask_truncated:
        m = m * (~truncated.bool()).to(m).unsqueeze(-1)
    return m.sum()


# ----------------------------------------------------------------------------- loss


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float | torch.Tensor = 0.0,
    kl_kind: str = "k3",
    unbiased_kl: bool = False,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    seq_mask: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    mask_truncated: bool = False,
    num_tokens: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (to minimise) and detached 0-dim statistics.

    logp, old_logp, ref_logp, mask: (N, L); advantages, seq_mask, truncated: (N,).
    old_logp=None means on-policy (old_logp = logp.detach()). Over several updates per rollout keep
    passing the old_logp stored at sampling: on the first update rho = 1 and the gradient is the
    vanilla policy gradient -A grad(logp) / normaliser.
    seq_mask (N,) float, 1 = keep (see off_policy_sequence_mask): a 0 removes the sequence's policy
    term only; its KL term still counts and it stays in the normaliser, as in V3.2 where M_i,t
    multiplies the min(...) term. truncated (N,) bool: completion hit the length limit without EOS;
    with mask_truncated the sequence is removed from the loss entirely (policy, KL, token counts).
    is_weights (N, L), detached: truncated importance sampling weights (`truncated_importance_weights`)
    multiplying each token's policy term (not the KL term); pass the trainer's pi_old as old_logp then.

    Aggregation (loss_type), with per-token loss l_it and m the effective token mask:
      "grpo":    mean_i [ sum_t m l / sum_t m ] over sequences with >= 1 token (DeepSeekMath eq. 3)
      "bnpo":    sum_it m l / sum_it m, this batch's tokens
      "dapo":    sum_it m l / num_tokens, the token count of the whole optimiser step (all
                 micro-batches and ranks, see `loss_token_count`); defaults to this batch's count,
                 i.e. bnpo (DAPO eq. 8); a count of 0 (every token masked) gives a zero loss
      "dr_grpo": sum_it m l / (N * max_completion_length), a constant (Dr. GRPO); needs the length.

    Stats: clip_frac_low = share of tokens with rho < 1 - eps_low and A < 0, clip_frac_high with
    rho > 1 + eps_high and A > 0 (the sides where the clip removes the gradient, as TRL counts),
    clip_frac = their sum; all over tokens whose policy term counts. kl and ratio: means over the
    effective tokens (kl: the estimator in use, logged even at beta = 0; 0 without ref_logp);
    masked_seq_frac: share of non-excluded sequences with seq_mask 0; truncated_frac: share of N.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2 or mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"expected logp/mask (N, L) and advantages (N,), got {tuple(logp.shape)}, "
            f"{tuple(mask.shape)}, {tuple(advantages.shape)}"
        )
    # beta: a number, or (N,) per-sequence weights (V3.2's per-domain KL: 0 for math, > 0 elsewhere)
    has_kl = bool((beta != 0).any()) if torch.is_tensor(beta) else beta != 0.0
    if has_kl and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the constant normaliser)")
    if old_logp is None:
        old_logp = logp.detach()
    n = logp.shape[0]
    # Padding may hold anything (0, -inf, another sequence's values): zero it before any exp, since
    # inf * 0 = NaN would survive the masked sums and poison the gradient.
    real = mask.bool()
    logp = torch.where(real, logp, 0.0)
    old_logp = torch.where(real, old_logp, 0.0)
    ref_logp = None if ref_logp is None else torch.where(real, ref_logp, 0.0)

    m = mask.to(logp.dtype)  # (N, L) effective token mask
    live = torch.ones(n, dtype=logp.dtype, device=logp.device)  # (N,) sequence not excluded
    if truncated is not None and mask_truncated:
        live = live * (~truncated.bool()).to(logp.dtype)
        m = m * live.unsqueeze(-1)
    keep = live if seq_mask is None else seq_mask.to(logp.dtype)  # (N,) policy term on

    surrogate, ratio = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    per_token = -surrogate * keep.unsqueeze(-1)  # (N, L)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights must be (N, L) {tuple(logp.shape)}, got {tuple(is_weights.shape)}")
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:  # estimated whenever a reference is given, so it can be logged at beta = 0
        kl = kl_estimate(logp, ref_logp.detach(), kl_kind, old_logp.detach() if unbiased_kl else None)
        if has_kl:
            per_token = per_token + (beta.to(kl).unsqueeze(-1) if torch.is_tensor(beta) else beta) * kl

    tokens_per_seq = m.sum(-1)  # (N,)
    if loss_type == "grpo":
        has_tokens = (tokens_per_seq > 0).to(logp.dtype)
        seq_loss = (per_token * m).sum(-1) / tokens_per_seq.clamp(min=1.0)
        loss = seq_loss.sum() / has_tokens.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (n * max_completion_length)
    else:
        if loss_type == "dapo" and num_tokens is not None:
            denom = torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device).clamp(min=1.0)
        else:
            denom = tokens_per_seq.sum().clamp(min=1.0)
        loss = (per_token * m).sum() / denom

    with torch.no_grad():
        num_eff = m.sum().clamp(min=1.0)
        pm = m * (keep * live).unsqueeze(-1)  # tokens whose policy term counts
        num_pol = pm.sum().clamp(min=1.0)
        adv = advantages.unsqueeze(-1)
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logp.dtype)
        masked = (1.0 - keep) * live
        stats = {
            "clip_frac_low": (low * pm).sum() / num_pol,
            "clip_frac_high": (high * pm).sum() / num_pol,
            "clip_frac": ((low + high) * pm).sum() / num_pol,
            "kl": (kl * m).sum() / num_eff,
            "ratio": (ratio * m).sum() / num_eff,
            "masked_seq_frac": masked.sum() / live.sum().clamp(min=1.0),
            "truncated_frac": (truncated.float().mean() if truncated is not None else torch.zeros(())).to(logp.device),
        }
        if is_weights is not None:
            stats["is_weight"] = (is_weights.to(m) * m).sum() / num_eff
    return loss, stats


__all__ = [
    "clipped_surrogate",
    "group_advantages",
    "grpo_loss",
    "kl_estimate",
    "loss_token_count",
    "off_policy_sequence_mask",
    "sampling_mask_logprobs",
    "token_entropy",
    "token_logprobs",
    "truncated_importance_weights",
    "zero_spread_groups",
]
