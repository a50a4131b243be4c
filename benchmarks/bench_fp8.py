"""FP8 training against the same run without FP8: the loss gap (the V3 report: under 0.25% relative),
and on a GPU the step time of FP8 against bf16. Both runs share the data, the initial weights and the
seed, side by side in one invocation.

    python benchmarks/bench_fp8.py              # tiny preset, 150 steps on CPU (a few minutes)
    python benchmarks/bench_fp8.py --quick      # seconds
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from nanoseek.train.common import read_metrics
from nanoseek.train.pretrain import PretrainConfig, pretrain


def run(out: str, fp8: bool, args) -> tuple[list[dict], float]:
    cfg = PretrainConfig(out_dir=out, preset=args.preset, steps=args.steps, seq_len=args.seq_len,
                         batch_size=args.batch_size, warmup=max(1, args.steps // 10), lr=args.lr, fp8=fp8,
                         embedded_docs=args.docs, vocab_size=args.vocab, eval_every=args.steps, save_every=args.steps,
                         log_every=5, tensorboard=False, seed=0, device=args.device, digit_group=1,
                         embedded_tasks=["arithmetic"], embedded_levels=[1, 2])
    t = time.perf_counter()
    pretrain(cfg)
    return read_metrics(out), time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.batch_size, args.docs, args.vocab = 10, 64, 4, 300, 400
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        ref, t_ref = run(f"{d}/ref", False, args)
        f8, t_f8 = run(f"{d}/fp8", True, args)
    last = lambda m: [r["loss"] for r in m if "loss" in r][-4:]
    a, b = sum(last(f8)) / 4, sum(last(ref)) / 4
    ev = lambda m: [r["eval_loss"] for r in m if "eval_loss" in r][-1]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.machine()
    print(f"# FP8 vs high precision, preset {args.preset}, {args.steps} steps x {args.batch_size}x{args.seq_len} tokens, "
          f"{dev}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| run | final train loss (mean of last 4 logs) | held-out loss | wall time (s) |")
    print("|---|---|---|---|")
    print(f"| high precision | {b:.4f} | {ev(ref):.4f} | {t_ref:.0f} |")
    print(f"| FP8 (V3 recipe) | {a:.4f} | {ev(f8):.4f} | {t_f8:.0f} |")
    print(f"relative train-loss gap {100 * (a - b) / b:+.2f}%, held-out gap {100 * (ev(f8) - ev(ref)) / ev(ref):+.2f}% "
          f"(V3 report: < 0.25%); time ratio FP8/ref {t_f8 / t_ref:.2f}x")


if __name__ == "__main__":
    main()
