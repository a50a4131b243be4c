"""Sampling: SamplingParams (vLLM-like), the batched sampler, and log-probs under the same processing.

Shape legend: B = rows (one per live sequence), V = vocabulary.

Processing order (as in vLLM and transformers' warpers): `penalize` first (repetition_penalty over the prompt and
the tokens so far, and min_tokens: the end tokens at -inf until that many were generated; the engine applies it,
so greedy rows and log-probs see it too), then logits / temperature -> min-p (drop tokens less likely than
min_p x the most likely one) and top-k -> top-p over the remaining renormalised distribution -> sample from the
renormalised support. Every row draws its
randomness from its own `SampleStream`, exactly one uniform per step (inverse-CDF sampling over the final
distribution): uniform n of a stream is a hash of (its key, n), so a seeded request gives the
same samples whatever else shares its batch, and a batch of B rows costs B hashes, not B generator calls. Sample i
of a seeded request has the key `derive_seed(seed, i, *prompt_ids)`: every sample and every distinct prompt has
its own stream (never seed + i, which would let neighbouring seeds and different prompts share streams).

Log-probs: for temperature > 0 the returned value is log pi(token) under the FINAL sampling
distribution (after temperature, top-k, top-p and renormalisation over the support), which is what
an RL importance ratio needs. For greedy rows (temperature 0) it is log_softmax of the raw logits,
since the greedy "distribution" is a point mass whose log-prob (0) says nothing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


MAX_TOP_LOGPROBS = 20


GREEDY_EPS = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or anything below GREEDY_EPS): greedy (argmax)
    top_p: float = 1.0  # nucleus: smallest set with cumulative prob >= top_p; 1 = off
    top_k: int | None = 0  # 0 or None = off
    min_p: float = 0.0  # keep tokens with prob >= min_p x the top token's (after temperature); 0 = off
    min_tokens: int = 0  # the end tokens (EOS, stop_token_ids) cannot be sampled, nor stop strings end a sample, before
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the completion (HF / vLLM's)
    stop: list[str] | None = None  # stop strings (need a tokenizer with .decode)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # do not stop at the engine's EOS ids
    seed: int | None = None  # per request; sample i draws from derive_seed(seed, i, *prompt_ids)
    n: int = 1  # samples per prompt
    logprobs: bool = False  # return log pi(token) per generated token (see module docstring)
    top_logprobs: int = 0  # also return the top-N (token id, log-prob) of each step's distribution (0-20)
    return_sampling_mask: bool = False  # return the (len, V) bool support of each step's distribution
    return_routing: bool = False  # return (len, num_moe_layers, K) expert ids that produced each token
    skip_special_tokens: bool = False  # text without special tokens (BOS, EOS, turn tags; `</think>` and tool tags
    # are not special and stay). False here so training sees the raw text; the server defaults to True, as vLLM
    include_stop_str_in_output: bool = False  # a matched stop string stays at the end of text

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            bad("temperature", "must be >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty < math.inf:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad("top_k", "must be an integer >= 0 (0 or None = off)")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of integers")

    @property
    def greedy(self) -> bool:
        # below GREEDY_EPS, logits / T overflows to inf and the draw degenerates (token 0): take argmax instead
        return self.temperature < GREEDY_EPS


def _filtered_rows(params: Sequence[SamplingParams], V: int) -> list[int]:
    """Rows whose support is cut by top-k, top-p or min-p (the only ones that need a sort)."""
    return [i for i, p in enumerate(params)
            if not p.greedy and ((p.top_k and p.top_k < V) or p.top_p < 1 or p.min_p > 0)]


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams], want_support: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, V) -> (log-probs (B, V) fp32 of the final sampling distribution, -inf outside the support;
    support mask (B, V) bool, None unless want_support). Greedy rows get the plain log_softmax of the raw
    logits and a one-hot support at the argmax."""
    B, V = logits.shape
    if len(params) != B:
        raise ValueError(f"params must have one entry per row ({B}), got {len(params)}")
    dev = logits.device
    logits = logits.float()
    if any(not p.greedy and p.temperature != 1 for p in params):
        temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
        scaled = logits / temp.unsqueeze(1)  # greedy rows: temperature 1, i.e. the raw logits
    else:
        scaled = logits  # every row at temperature 1 or greedy: nothing to scale
    logp = scaled.log_softmax(dim=-1)
    support = torch.ones(B, V, dtype=torch.bool, device=dev) if want_support else None
    rows = _filtered_rows(params, V)
    if rows:
        sub = scaled[rows]  # (b, V)
        top_k = torch.tensor([min(params[i].top_k or V, V) for i in rows], device=dev)  # min first: 2**63 overflows
        top_p = torch.tensor([float(params[i].top_p) for i in rows], device=dev)
        # min-p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p) (temperature-scaled logits)
        min_p = torch.tensor([math.log(params[i].min_p) if params[i].min_p > 0 else -math.inf for i in rows],
                             device=dev)
        vals, idx = sub.sort(dim=-1, descending=True)  # (b, V)
        keep = torch.arange(V, device=dev).unsqueeze(0) < top_k.unsqueeze(1)  # top-k in sorted order
        keep &= vals >= vals[:, :1] + min_p.unsqueeze(1)
        probs = vals.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        keep &= before < top_p.unsqueeze(1)  # smallest prefix reaching top_p
        keep[:, 0] = True  # always at least one token
        kept = torch.zeros_like(keep).scatter_(1, idx, keep)
        r = torch.tensor(rows, device=dev)
        if want_support:
            support[r] = kept
        logp[r] = sub.masked_fill(~kept, float("-inf")).log_softmax(dim=-1)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy and want_support:
        g = torch.tensor(greedy, device=dev)
        support[g] = torch.zeros(len(greedy), V, dtype=torch.bool, device=dev).scatter_(
            1, logits[g].max(dim=-1, keepdim=True).indices, True)
    return logp, support


def penalize(logits: torch.Tensor, params: Sequence[SamplingParams], seen: Sequence[Sequence[int]],
             num_generated: Sequence[int], end_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """logits (B, V) adjusted before sampling, per row: repetition_penalty (CTRL's, as HF and vLLM apply it: a
    positive logit of a token in seen[i], the prompt and the tokens so far, divided by it, a negative one multiplied),
    and while num_generated[i] < min_tokens the end_ids[i] (EOS, stop_token_ids) at -inf. Rows that ask for
    neither are untouched; logits itself is never written (a copy is returned when anything changes)."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1 or num_generated[i] < p.min_tokens]
    if not rows:
        return logits
    out = logits.float().clone()  # (B, V)
    V = out.shape[1]
    for i in rows:
        p = params[i]
        if p.repetition_penalty != 1 and seen[i]:
            idx = torch.tensor(sorted(set(seen[i])), device=out.device)
            v = out[i, idx]
            out[i, idx] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if num_generated[i] < p.min_tokens:
            ends = [t for t in end_ids[i] if 0 <= t < V]
            if ends:
                out[i, ends] = float("-inf")
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]
                   ) -> torch.Tensor:
    """Log-probs (N,) of `tokens` (N,) under the sampler's processing of `logits` (N, V): what `sample`
    returns for those tokens. One SamplingParams applies to every row (e.g. a whole sequence's positions)."""
    if isinstance(params, SamplingParams):
        params = [params] * logits.shape[0]
    logp, _ = process_logits(logits, params, want_support=False)
    return logp.gather(1, tokens.long().view(-1, 1)).squeeze(1)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B,) long
    logprobs: torch.Tensor  # (B,) fp32, see module docstring
    support: torch.Tensor | None = field(default=None)  # (B, V) bool, when asked for
    top_ids: torch.Tensor | None = field(default=None)  # (B, N) the N most likely tokens, when asked for
    top_logprobs: torch.Tensor | None = field(default=None)  # (B, N) their log-probs (same distribution as logprobs)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence["SampleStream | torch.Generator | None"], return_support: bool = False,
           top_n: int = 0) -> SampleResult:
    """Sample one token per row. logits (B, V); params and generators one per row: a SampleStream (the engine's),
    a torch.Generator, or None (greedy rows, or torch's global RNG). top_n > 0 also returns each row's top_n
    tokens and log-probs under the distribution `logprobs` refers to."""
    B, V = logits.shape
    if len(generators) != B:
        raise ValueError(f"generators must have one entry per row ({B}), got {len(generators)}")
    logp, support = process_logits(logits, params, want_support=return_support)
    tokens = logits.max(dim=-1).indices  # the greedy rows' tokens (argmax: first of ties; max(dim) is ~3x faster)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        u = torch.tensor([_uniform(generators[i]) for i in sampled], dtype=torch.float64, device=logits.device)
        rows = torch.tensor(sampled, device=logits.device)
        tokens[rows] = inverse_cdf(logp[rows], u)
    lp = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    res = SampleResult(tokens, lp, support)
    if top_n > 0:
        res.top_logprobs, res.top_ids = logp.topk(min(top_n, V), dim=-1)
    return res


def inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens (b,) drawn from the distributions exp(logp) (b, V), -inf outside the support, by one uniform in (0, 1]
    per row: the first token whose cumulative probability reaches u x the row's total. A token of probability 0
    never has a cumulative sum above its predecessor's, so it is never the first to reach a u > 0. In fp32 (fp64's
    cumsum is ~8x slower on CPU): a token's share is off by at most about one rounding of the running sum (~6e-8),
    the order of the 2^-24 resolution of torch.rand that Gumbel-max sampling rests on."""
    cdf = logp.float().exp().cumsum(dim=-1)  # (b, V)
    target = (u.float() * cdf[:, -1]).unsqueeze(1)  # (b, 1): scaled to the row's mass, which rounding leaves near 1
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=logp.shape[1] - 1)


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit hash whose outputs pass BigCrush as a counter-mode stream."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SampleStream:
    """One sample's random numbers, counter-based: uniform n is a hash of (key, n), so a stream's numbers depend
    only on its key and how many it has drawn (not on other rows, batch order or threads), and drawing is a few
    integer operations in Python."""

    __slots__ = ("key", "drawn")

    def __init__(self, key: int):
        self.key, self.drawn = _mix64(int(key) & _MASK64), 0

    def uniform(self) -> float:
        """The next number, in (0, 1] (53 random bits; never 0, so inverse_cdf never picks a zero-probability token)."""
        z = _mix64(self.key ^ _mix64(self.drawn))
        self.drawn += 1
        return ((z >> 11) + 1) * 2.0 ** -53


def _uniform(gen) -> float:
    if isinstance(gen, SampleStream):
        return gen.uniform()
    return 1.0 - float(torch.rand((), generator=gen, dtype=torch.float64))  # torch's [0, 1) -> (0, 1]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a hash of the integers `parts`: independent streams for (seed, prompt, sample) or
    (seed, step, round) tuples, where seed + i would make neighbouring seeds share streams."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int | None, device=None) -> SampleStream:
    """A per-sample stream; without a seed its key is drawn from torch's global RNG (so torch.manual_seed makes
    whole runs reproducible). `device` is accepted for the older torch.Generator signature; numbers are drawn
    on the host, one per step."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    return SampleStream(seed)
