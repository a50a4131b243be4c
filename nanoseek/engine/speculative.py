"""MTP speculative decoding (V3 report sec. 2.2 / 5.4.3): the MTP modules draft, the main model verifies.

Greedy only, batch size 1. Each round the MTP chain drafts D tokens (D = num_nextn_predict_layers: module 1
drafts t_{q+1} from the main hidden at q-1 and the last token t_q, module k chains on module k-1's hidden and
draft), then ONE main-model forward over [t_q, d_1..d_D] at positions q..q+D verifies them: the longest
prefix of drafts equal to the main model's argmax is accepted, plus the main model's own next token (the
correction, or a bonus token when every draft matched). The output is therefore exactly plain greedy
decoding; only the number of main-model forwards changes.

Caches: one LatentCache holds the main layers and the MTP layers. Main rows written for rejected drafts
are simply overwritten by the next verify (visibility is decided by positions). MTP module k needs its
entry at every position p in order, built from (hidden^{k-1}_p, token p+k): each round re-runs module k
over the positions whose entries were missing or built from drafts, so its cache has no holes and no
stale draft-built entries below the current draft position.

Choosing it (`choose_speculative`, `greedy_generate`, `nanoseek generate --speculative [auto|on|off]`): on a
CPU a 2-token verification of a MoE model costs up to twice a 1-token step, so speculative decoding can lose
to plain decoding, and plain decoding runs a whole batch per step where speculative runs one sequence. Mode
"auto" times a few plain decode steps of the engine at the job's batch and a few draft + verify rounds on its
first prompt (`probe_decode`), and decodes speculatively only when the expected speculative tokens/s
(batch 1: (1 + a + ... + a^D) tokens per round, a = the measured acceptance rate) beats the plain batch's
(batch / step time). Both are greedy and equal token for token, so the choice changes only the speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..model import DeepSeekModel, LatentCache

if TYPE_CHECKING:
    from .engine import Engine

SPECULATIVE_MODES = ("auto", "on", "off")


@dataclass
class SpeculativeOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    num_drafted: int  # draft tokens proposed
    num_accepted: int  # draft tokens accepted
    num_main_forwards: int  # prefill chunks + verify forwards
    num_rounds: int  # verify forwards

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per verify forward (plain greedy decoding: 1)."""
        return len(self.token_ids) / max(1, self.num_rounds)


@torch.no_grad()
def speculative_generate(model: DeepSeekModel, prompt_ids: Sequence[int], max_tokens: int,
                         stop_token_ids: Sequence[int] = (), num_draft: int | None = None,
                         max_len: int | None = None, prefill_chunk: int | None = None,
                         callback: Callable[[int], None] | None = None,
                         fast_decode: bool | None = None, compile: bool = False,
                         on_round: Callable[[int], None] | None = None) -> SpeculativeOutput:
    """Greedy generation of up to max_tokens tokens after prompt_ids (batch size 1), drafting with the MTP
    modules. num_draft: drafts per round (default and maximum: num_nextn_predict_layers). A stop token is
    kept in token_ids and ends generation (finish_reason "stop"). callback(token) gets each token in order.
    fast_decode: draft and verify with `FastDecoder` (as `Engine(fast_decode=...)`: None = on CPU when the model
    supports it). compile: draft and verify with its compiled steps (as `Engine(compile=True)`). on_round(n) is
    called after each draft + verify round with the tokens it accepted (how `probe_decode` times rounds)."""
    cfg = model.config
    D = cfg.num_nextn_predict_layers if num_draft is None else num_draft
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"num_nextn_predict_layers must be >= 1 for MTP speculative decoding, got "
                         f"{cfg.num_nextn_predict_layers}")
    if not 1 <= D <= cfg.num_nextn_predict_layers:
        raise ValueError(f"num_draft must be in [1, num_nextn_predict_layers={cfg.num_nextn_predict_layers}], got {D}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    toks = [int(t) for t in prompt_ids]
    P = len(toks)
    if P < 1:
        raise ValueError("prompt_ids must hold at least one token, got an empty prompt")
    need = P + max_tokens + D
    max_len = need if max_len is None else max_len
    if max_len < need:
        raise ValueError(f"max_len must be >= prompt + max_tokens + num_draft = {need}, got {max_len}")
    p0 = next(model.parameters())
    dev, dtype = p0.device, p0.dtype
    cache = LatentCache(cfg, 1, max_len, dtype, dev)
    from .fast_decode import select

    fast = select(model, fast_decode, compile, auto=dev.type == "cpu")
    stops = set(int(t) for t in stop_token_ids)

    def row(ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), device=dev).unsqueeze(0)  # (1, T)

    def span(a: int, b: int) -> torch.Tensor:
        return torch.arange(a, b, device=dev).unsqueeze(0)  # (1, b - a)

    # prefill: main cache for positions 0..P-1, main hidden there, first token from the last logits
    x = row(toks)
    chunk = prefill_chunk or P
    hid = []
    for a in range(0, P, chunk):
        b = min(P, a + chunk)
        out = model(x[:, a:b], positions=span(a, b), cache=cache, absorb=False, logits_to_keep=1)
        hid.append(out.hidden)
    n_forwards = -(-P // chunk)
    # hist[0][p]: main final hidden at p (1, 1, Dh); hist[k][p]: MTP module k's hidden at p
    hist: list[dict[int, torch.Tensor]] = [{} for _ in range(D + 1)]
    for p, h in enumerate(torch.cat(hid, dim=1).split(1, dim=1)):
        hist[0][p] = h
    generated: list[int] = []
    finish = None

    def accept(t: int) -> bool:
        nonlocal finish
        generated.append(t)
        toks.append(t)
        if callback is not None:
            callback(t)
        if t in stops:
            finish = "stop"
        elif len(generated) >= max_tokens:
            finish = "length"
        return finish is None

    accept(int(out.logits[0, -1].argmax()))
    filled = [0] * (D + 1)  # filled[k]: module k's cache entries below this position are final
    n_drafted = n_accepted = n_rounds = 0
    while finish is None:
        q = len(toks) - 1  # position of the last accepted token, not yet in the main cache
        drafts: list[int] = []
        for k in range(1, D + 1):  # draft: run module k over its missing / draft-built positions a..q-1
            a = filled[k]
            ext = toks + drafts  # token at position i (drafts beyond q)
            h_prev = torch.cat([hist[k - 1][p] for p in range(a, q)], dim=1)  # (1, q-a, Dh)
            if fast is not None and q - a <= 4:
                logits, h = fast.mtp_step(k, h_prev, row(ext[a + k:q + k]), span(a, q), cache, compiled=compile)
            else:
                logits, h = model.mtp_step(k, h_prev, row(ext[a + k:q + k]), span(a, q), cache=cache,
                                           absorb=q - a <= 4)
            for i, hp in enumerate(h.split(1, dim=1)):
                hist[k][a + i] = hp
            drafts.append(int(logits[0, -1].argmax()))
            filled[k] = q - k + 1  # entries at p <= q-k were built from accepted tokens only
        # verify all drafts in one main forward over positions q..q+D
        if fast is not None:
            v_logits, v_hidden, _ = fast.forward(row([toks[q]] + drafts), span(q, q + D + 1), cache,
                                                 compiled=compile)
        else:
            out = model(row([toks[q]] + drafts), positions=span(q, q + D + 1), cache=cache, absorb=True)
            v_logits, v_hidden = out.logits, out.hidden
        n_forwards += 1
        n_rounds += 1
        n_drafted += D
        best = v_logits[0].argmax(dim=-1).tolist()  # best[i] is the main model's token for position q+i+1
        j = 0
        while j < D and drafts[j] == best[j]:
            j += 1
        n_accepted += j
        for i in range(j + 1):  # the inputs at q..q+j were accepted tokens: their hidden states are final
            hist[0][q + i] = v_hidden[:, i:i + 1]
        for t in drafts[:j] + [best[j]]:
            if not accept(t):
                break
        if on_round is not None:
            on_round(j + 1)
        low = min(filled[1:])  # forget hidden states no module will read again
        for hk in hist:
            for p in [p for p in hk if p < low]:
                del hk[p]
    return SpeculativeOutput(generated, finish, n_drafted, n_accepted, n_forwards, n_rounds)


# ---------------------------------------------------------------------------------------------- auto mode


@dataclass
class DecodeProbe:
    """What `probe_decode` measured: plain decode steps of the engine at `batch` rows, and draft + verify
    rounds of speculative decoding (batch 1), median seconds after the warm-up ones."""
    batch: int
    plain_step_s: float
    spec_round_s: float
    num_drafted: int
    num_accepted: int
    num_draft: int  # drafts per round (D)
    plain_steps: int = 0  # steps / rounds the medians are over
    spec_rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Expected tokens per round: the correction or bonus token, plus draft i when drafts 1..i all pass
        (each with the measured rate): 1 + a + ... + a^D."""
        a = self.acceptance_rate
        return sum(a ** i for i in range(self.num_draft + 1))

    @property
    def plain_tokens_per_s(self) -> float:
        return self.batch / max(self.plain_step_s, 1e-12)

    @property
    def spec_tokens_per_s(self) -> float:
        return self.tokens_per_round / max(self.spec_round_s, 1e-12)


@dataclass
class SpeculativeChoice:
    speculative: bool
    mode: str  # "auto" | "on" | "off"
    reason: str  # one line: what was chosen and why (with the numbers in auto mode)
    probe: DecodeProbe | None = None


def decide(probe: DecodeProbe) -> SpeculativeChoice:
    """Speculative only when its expected tokens/s beats plain decoding's at the job's batch."""
    spec, plain = probe.spec_tokens_per_s, probe.plain_tokens_per_s
    use = spec > plain
    reason = (f"speculative decoding: {'on' if use else 'off'} (auto): speculative {spec:,.1f} tokens/s expected "
              f"(batch 1, acceptance {probe.acceptance_rate:.2f} over {probe.num_drafted} drafts -> "
              f"{probe.tokens_per_round:.2f} tokens per {probe.spec_round_s * 1e3:.2f} ms round) "
              f"{'>' if use else '<='} plain {plain:,.1f} tokens/s (batch {probe.batch}, "
              f"{probe.plain_step_s * 1e3:.2f} ms a step): {spec / max(plain, 1e-12):.2f}x")
    return SpeculativeChoice(use, "auto", reason, probe)


def _median_after(times: list[float], warmup: int) -> float:
    """Median of the times after the warm-up ones (all of them when there are no more; 0 when none)."""
    return statistics.median(times[warmup:] if len(times) > warmup else times) if times else 0.0


def _time_plain_steps(engine: "Engine", prompts: list[list[int]], steps: int, clock) -> list[float]:
    """Seconds of each plain decode step of `engine` over `prompts` (all admitted together first); the engine
    is left idle with no kept prefixes and its forward counts as they were."""
    from .sampling import SamplingParams

    if engine.has_unfinished():
        raise RuntimeError("probe_decode needs an idle engine: it has requests in flight")
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    counts = engine.num_forwards, engine.num_prefill_tokens
    handles = [engine.add_request(p, params, stream=False) for p in prompts]
    times = []
    try:
        engine.step()  # admission: prefill + first token of every row
        while not all(h.done for h in handles):
            t = clock()
            engine.step()
            times.append(clock() - t)
    finally:
        for h in handles:
            h.cancel()
        while engine.has_unfinished():
            engine.step()
        engine.kept = [[] for _ in engine.kept]
        engine.num_forwards, engine.num_prefill_tokens = counts
    return times


def _time_spec_rounds(engine: "Engine", prompt: list[int], rounds: int, clock
                      ) -> tuple[list[float], SpeculativeOutput]:
    """Seconds of each draft + verify round of speculative decoding of `prompt`, at least `rounds` of them (with
    the engine's kind of step: fast / compiled / generic), and its output."""
    D = engine.model.config.num_nextn_predict_layers
    stamps: list[float] = []  # after the prefill's token, then after every round
    out = speculative_generate(engine.model, prompt, 1 + rounds * (D + 1), compile=engine.compile,
                               fast_decode=engine.fast is not None,
                               callback=lambda t: None if stamps else stamps.append(clock()),
                               on_round=lambda n: stamps.append(clock()))
    return [b - a for a, b in zip(stamps, stamps[1:])], out


@torch.no_grad()
def probe_decode(engine: "Engine", prompts: Sequence[Sequence[int]], steps: int = 6, warmup: int = 2,
                 repeats: int = 2, clock: Callable[[], float] = time.perf_counter) -> DecodeProbe:
    """Time `warmup + steps` plain decode steps of `engine` at the job's batch (the first min(len(prompts),
    max_batch_size) prompts) and at least as many speculative rounds on prompts[0], greedy, alternating
    `repeats` times; each kind's time is the best of its per-repeat medians, the warm-up steps and rounds
    (compiling, first key lengths) left out."""
    prompts = [list(p) for p in prompts]
    B = min(len(prompts), engine.max_batch_size)
    plain_s, spec_s, n_plain, n_spec = [], [], 0, 0
    for _ in range(repeats):  # alternating, so that a noisy neighbour slows both alike
        plain = _time_plain_steps(engine, prompts[:B], warmup + steps, clock)
        rounds, out = _time_spec_rounds(engine, prompts[0], warmup + steps, clock)
        plain_s.append(_median_after(plain, warmup))
        spec_s.append(_median_after(rounds, warmup))
        n_plain, n_spec = n_plain + max(len(plain) - warmup, 0), n_spec + max(len(rounds) - warmup, 0)
    return DecodeProbe(B, min(plain_s), min(spec_s), out.num_drafted, out.num_accepted,
                       engine.model.config.num_nextn_predict_layers, n_plain, n_spec)


def choose_speculative(engine: "Engine", prompts: Sequence[Sequence[int]], mode: str = "auto") -> SpeculativeChoice:
    """Whether to decode `prompts` greedily with MTP speculative decoding: "on" / "off" as told (on needs MTP
    modules), "auto" measures (`probe_decode`) and picks the faster (`decide`)."""
    if mode not in SPECULATIVE_MODES:
        raise ValueError(f"speculative mode must be one of {SPECULATIVE_MODES}, got {mode!r}")
    has_mtp = engine.model.config.num_nextn_predict_layers >= 1
    if mode == "on" and not has_mtp:
        raise ValueError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers >= 1)")
    if mode != "auto":
        return SpeculativeChoice(mode == "on", mode, f"speculative decoding: {mode} (as asked)")
    if not has_mtp:
        return SpeculativeChoice(False, mode, "speculative decoding: off (auto): the model has no MTP modules")
    return decide(probe_decode(engine, prompts))


@torch.no_grad()
def greedy_generate(engine: "Engine", prompts: Sequence[Sequence[int]], max_tokens: int, speculative: str = "auto",
                    stop_token_ids: Sequence[int] | None = None, max_len: int | None = None
                    ) -> tuple[SpeculativeChoice, list[SpeculativeOutput]]:
    """Greedy completions of `prompts` (token ids), decoded speculatively (one prompt at a time) or by the
    engine's batch as `choose_speculative(engine, prompts, speculative)` decides; the tokens are the same
    either way. Stops: stop_token_ids (default: the engine's EOS ids), kept in token_ids. Plain outputs carry
    no drafts and one round per token. max_len: the speculative cache length (default: what it needs)."""
    ids = [engine._encode(p) for p in prompts]
    choice = choose_speculative(engine, ids, speculative)
    stops = sorted(engine.eos_token_ids if stop_token_ids is None else set(stop_token_ids))
    if choice.speculative:
        return choice, [speculative_generate(engine.model, x, max_tokens, stop_token_ids=stops, max_len=max_len,
                                             fast_decode=engine.fast is not None, compile=engine.compile)
                        for x in ids]
    from .sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stops, ignore_eos=True)
    outs = [r.outputs[0] for r in engine.generate(ids, params)]
    return choice, [SpeculativeOutput(c.token_ids, c.finish_reason, 0, 0, len(c.token_ids), len(c.token_ids))
                    for c in outs]
