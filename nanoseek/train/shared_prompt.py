"""GRPO's shared-prompt training forward: the G completions of a prompt share one copy of its tokens.

Unpacked, a group is G rows `prompt + completion_i`, and the prompt's P tokens go through the model G times.
Packed, the group is one row `prompt, c_1, c_2, ..., c_G`: every completion's positions restart at P, and the
attention mask lets a token of c_i see the prompt and c_i's earlier tokens only. Every completion token then
has the same inputs, positions, visible keys (in the same order) and forced experts as unpacked, so its logits
are the same up to float rounding, and so is the gradient (the prompt's activations receive the sum of the
completions' gradients either way). The model runs P + sum(L_i) positions instead of G P + sum(L_i) (issue 14's
setup: 81 instead of 200 per group); attention becomes one (P + sum L_i)^2 mask per group instead of G causal
(P + L_i)^2 ones, which costs more when completions are much longer than the prompt.

Shapes: N rows of the GRPO batch (build_batch), n of them in this minibatch, grouped into B packed rows of
length T; L completion tokens per row (padded); K routed experts per token.
"""

from __future__ import annotations

import torch


def prompt_groups(batch: dict, rows: list[int]) -> list[list[int]]:
    """Indices into `rows` grouped by identical prompt tokens, in order of first appearance."""
    ids, plen = batch["ids"][rows].tolist(), batch["prompt_len"][rows].tolist()
    groups: dict[tuple, list[int]] = {}
    for k, (row, P) in enumerate(zip(ids, plen)):
        groups.setdefault(tuple(row[:P]), []).append(k)
    return list(groups.values())


def packed_mask(segment: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: query t sees key s when s is a prompt token (segment 0) or in t's own segment, at a
    position not after t's. Padding (segment -1) sees padding only, so no row is empty."""
    sq, sk = segment.unsqueeze(2), segment.unsqueeze(1)
    return (((sk == 0) & (sq >= 0)) | (sk == sq)) & (positions.unsqueeze(1) <= positions.unsqueeze(2))


def pack(batch: dict, rows: torch.Tensor, pad_id: int) -> dict:
    """The minibatch `rows` of a build_batch batch as packed rows: ids / positions (B, T), mask (B, T, T),
    routing (per MoE layer (B, T, K), or None) and where each row's logits are: the logits predicting
    completion token j of rows[k] sit at packed row `row[k]`, position `at[k, j]`."""
    rows_l = rows.tolist()
    groups = prompt_groups(batch, rows_l)
    ids_l, plen, clen = batch["ids"].tolist(), batch["prompt_len"].tolist(), batch["completion_len"].tolist()
    L = batch["pos"].shape[1]
    # per packed row, as Python lists: token ids, positions, segment (0 prompt, i completion i), and the
    # (row, position) of the unpacked batch each packed token copies
    cols: dict[str, list[list[int]]] = {k: [] for k in ("ids", "positions", "segment", "src_row", "src")}
    row, at = [0] * len(rows_l), [[0] * L for _ in rows_l]
    for b, g in enumerate(groups):
        n0 = rows_l[g[0]]
        P = plen[n0]
        r = dict(ids=ids_l[n0][:P], positions=list(range(P)), segment=[0] * P, src_row=[n0] * P, src=list(range(P)))
        for i, k in enumerate(g, start=1):
            n, lc = rows_l[k], clen[rows_l[k]]
            off = len(r["ids"])
            r["ids"] += ids_l[n][P:P + lc]
            r["positions"] += range(P, P + lc)
            r["segment"] += [i] * lc
            r["src_row"] += [n] * lc
            r["src"] += range(P, P + lc)
            row[k] = b
            if lc:  # token 0 comes from the prompt's last position, token j from the completion's token j - 1
                at[k][:lc] = [P - 1] + list(range(off, off + lc - 1))
        for key in cols:
            cols[key].append(r[key])
    T = max(len(r) for r in cols["ids"])
    fill = dict(ids=pad_id, positions=0, segment=-1, src_row=0, src=0)
    ids, positions, segment, src_row, src = (torch.tensor([r + [fill[key]] * (T - len(r)) for r in cols[key]])
                                             for key in ("ids", "positions", "segment", "src_row", "src"))
    row, at = torch.tensor(row), torch.tensor(at)
    routing = None
    if batch.get("routing") is not None:  # the sampler's experts, copied from the unpacked positions
        routing = [r[src_row, src] for r in batch["routing"]]
        real = segment >= 0
        routing = [r.masked_fill(~real.unsqueeze(-1), -1) for r in routing]
    return dict(ids=ids, positions=positions, mask=packed_mask(segment, positions), routing=routing, row=row, at=at)

