"""Attention with an explicit boolean mask on CPU: SDPA's flash kernel against the eager product that `MLA` uses up to
`EAGER_MASKED_MAX_KEYS` keys (`nanoseek.model.mla.masked_attention`: one baddbmm adding the mask as a -inf bias,
softmax, bmm), forward + backward, fp32, one thread, the two alternating shape by shape.

The mask is GRPO's packed layout in miniature (causal, a block of keys hidden from the second half of the queries);
v's head dim is smaller than q's as in MLA (SDPA's kernel gets v zero-padded, as `MLA._sdpa` pads it). Rows B are
chosen so B * T is about `--tokens`. Prints one line per (heads, head dim, T): both medians and their ratio.

    python benchmarks/bench_attention.py                       # GRPO's shapes (4 heads, 48/32) and two larger ones
    python benchmarks/bench_attention.py --heads 4 --dims 48 32 --lengths 56
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_decode import median_ms
from nanoseek.model.mla import masked_attention


def packed_mask(B: int, T: int) -> torch.Tensor:
    m = torch.ones(B, T, T, dtype=torch.bool).tril()
    m[:, T // 2:, T // 4: T // 2] = False
    return m


def compare(H: int, d: int, dv: int, T: int, tokens: int, repeats: int) -> tuple[float, float]:
    B = max(1, tokens // T)
    mask, scale = packed_mask(B, T), d ** -0.5
    q, k = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, dv, requires_grad=True)
    grad = torch.randn(B, H, T, dv)

    def sdpa():
        o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - dv)), attn_mask=mask.unsqueeze(1), scale=scale)
        o[..., :dv].backward(grad)

    def eager():
        masked_attention(q, k, v, mask, scale).backward(grad)

    a, b = [], []
    for _ in range(3):  # alternating rounds; the medians of the rounds' medians
        a.append(median_ms(sdpa, repeats))
        b.append(median_ms(eager, repeats))
    return sorted(a)[1], sorted(b)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[4, 16, 8])
    ap.add_argument("--dims", type=int, nargs="+", default=[48, 32, 96, 64, 192, 128],
                    help="q/k and v head dims, one pair per --heads entry")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 56, 128, 256, 512, 1024])
    ap.add_argument("--tokens", type=int, default=1024, help="rows x length per call")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if len(a.dims) != 2 * len(a.heads):
        ap.error("--dims takes a (q/k, v) pair per --heads entry")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), fp32, forward + backward")
    print("| heads | q/k, v dim | keys T | rows | SDPA ms | eager ms | SDPA / eager |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for i, H in enumerate(a.heads):
        d, dv = a.dims[2 * i], a.dims[2 * i + 1]
        for T in a.lengths:
            s, e = compare(H, d, dv, T, a.tokens, a.repeats)
            print(f"| {H} | {d}, {dv} | {T} | {max(1, a.tokens // T)} | {s:.2f} | {e:.2f} | {s / e:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
