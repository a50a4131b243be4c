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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..model import DeepSeekModel, LatentCache


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
                         fast_decode: bool | None = None, compile: bool = False) -> SpeculativeOutput:
    """Greedy generation of up to max_tokens tokens after prompt_ids (batch size 1), drafting with the MTP
    modules. num_draft: drafts per round (default and maximum: num_nextn_predict_layers). A stop token is
    kept in token_ids and ends generation (finish_reason "stop"). callback(token) gets each token in order.
    fast_decode: draft and verify with `FastDecoder` (as `Engine(fast_decode=...)`: None = on CPU when the model
    supports it). compile: draft and verify with its compiled steps (as `Engine(compile=True)`)."""
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
        low = min(filled[1:])  # forget hidden states no module will read again
        for hk in hist:
            for p in [p for p in hk if p < low]:
                del hk[p]
    return SpeculativeOutput(generated, finish, n_drafted, n_accepted, n_forwards, n_rounds)
