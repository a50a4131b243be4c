"""The R1 demonstration on a CPU: a tiny DeepSeek-V3 model is pre-trained and cold-start SFT'd on the
embedded arithmetic corpus, then GRPO'd on held-out-checked arithmetic for at most `--grpo-minutes`;
prints held-out accuracy before and after GRPO (greedy, test split: 4096 problems of the judged level, 512 of
each other) and writes the curves as PNG. GRPO defaults: trained and judged on level 2 (2-3 digit + and -),
16 prompts x 8 samples at temperature 0.6, lr 7e-5 with a cosine decay over the budget (docs/results.md has
the runs behind them).

    python benchmarks/r1_demo.py --out runs/r1_demo            # ~25 minutes on a 2-core CPU
    python benchmarks/r1_demo.py --out /tmp/r1 --quick         # a minute: the mechanics only

Stages are resumable (run the same command again); a stage whose `model` folder exists is skipped, so
GRPO settings can be compared from one pre-trained and SFT'd model. Pre-training is longer than the 15-minute `nanoseek
run` preset allows: the tiny model learns to copy operands from the prompt (the loss drops from ~0.75
to ~0.3) only after ~2.5M tokens, and GRPO needs a policy that is right some of the time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nanoseek.train.common import read_metrics
from nanoseek.train.evaluate import EvalConfig, evaluate
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.sft import SFTConfig, sft


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/r1_demo")
    ap.add_argument("--pretrain-steps", type=int, default=900)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--grpo-minutes", type=float, default=10.0)
    ap.add_argument("--grpo-lr", type=float, default=7e-5)
    ap.add_argument("--level", type=int, default=2, help="arithmetic level GRPO is judged on")
    ap.add_argument("--train-levels", type=int, nargs="+", default=[2],
                    help="levels GRPO trains on, drawn uniformly (level 2 is level 3's +/- part)")
    ap.add_argument("--seed", type=int, default=0, help="GRPO seed (problems, sampling, the curve's problem set)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step")
    ap.add_argument("--generations", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--temperature", type=float, default=0.6, help="rollout sampling temperature")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mu", type=int, default=1, help="policy updates per rollout (num_iterations)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                    help="cosine: down to 10%% of the lr over the time budget")
    ap.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])
    ap.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    ap.add_argument("--format-weight", type=float, default=0.2)
    ap.add_argument("--dynamic-sampling", action="store_true")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--final-problems", type=int, default=4096,
                    help="held-out problems of the judged level, before/after (4096: binomial std < 1 point; "
                         "512 of each other level)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    focus = dict(embedded_tasks=["arithmetic"], embedded_levels=[1, 2], embedded_langs=["en", "zh"])
    q = args.quick
    t0 = time.perf_counter()
    done = lambda stage: out / stage / "model" if (out / stage / "model" / "config.json").exists() else None
    base = done("base") or pretrain(PretrainConfig(out_dir=str(out / "base"), preset="tiny", vocab_size=1024,
                                   digit_group=1,
                                   embedded_docs=600 if q else 6000, seq_len=256, batch_size=16,
                                   steps=10 if q else args.pretrain_steps, warmup=2 if q else 20, lr=3e-3,
                                   eval_every=100, save_every=100, tensorboard=False, **focus))
    t_pre = time.perf_counter() - t0
    model = done("sft") or sft(SFTConfig(init_from=str(base), out_dir=str(out / "sft"),
                          embedded_records=300 if q else 3000,
                          steps=5 if q else args.sft_steps, batch_size=16, lr=1e-3, warmup=2 if q else 10,
                          max_len=256, tensorboard=False, **focus))
    t_sft = time.perf_counter() - t0 - t_pre
    t1 = time.perf_counter()
    final = grpo(GRPOConfig(init_from=str(model), out_dir=str(out / "grpo"), steps=2 if q else 1000,
                            levels=args.train_levels or [args.level], prompts_per_step=args.prompts,
                            num_generations=args.generations, temperature=args.temperature,
                            max_tokens=args.max_tokens, eval_max_tokens=128, lr=args.grpo_lr, warmup=args.warmup,
                            lr_schedule=args.lr_schedule,
                            num_iterations=args.mu, scale_rewards=args.scale_rewards, loss_type=args.loss_type,
                            dynamic_sampling=args.dynamic_sampling,
                            reward_weights={"accuracy": 1.0,
                                            **({"format": args.format_weight} if args.format_weight else {})},
                            eval_levels=[args.level], eval_every=args.eval_every, eval_problems=8 if q else 128,
                            time_limit_s=args.grpo_minutes * 60, seed=args.seed, tensorboard=False))
    t_grpo = time.perf_counter() - t1
    m = read_metrics(out / "grpo")
    evals = [(r["step"], r["eval_accuracy"]) for r in m if "eval_accuracy" in r]
    before, after = evals[0][1], evals[-1][1]
    wide = {}
    n_final = 8 if q else args.final_problems
    others = [lvl for lvl in (1, 2, 3) if lvl != args.level]
    for name, path in (("SFT", model), ("GRPO", final)):  # a larger held-out set than the in-run curve's
        wide[name] = {}
        for levels, n in (([args.level], n_final), (others, 8 if q else 512)):  # the other levels: for context
            r = evaluate(EvalConfig(model=str(path), levels=levels, num_problems=n, k=1, temperature=0.0,
                                    max_tokens=128))
            wide[name].update({k: v["pass@1"] for k, v in r["per_task"].items()})
    key = f"arithmetic/L{args.level}/en"
    plot_curves(out / "grpo_curves.png", m, wide, key, n_final, 8 if q else 128,
                f"level{'s' if len(args.train_levels or [1]) > 1 else ''} "
                f"{'+'.join(map(str, args.train_levels or [args.level]))}, T={args.temperature:g}")
    res = {"pretrain_s": t_pre, "sft_s": t_sft, "grpo_s": t_grpo, "grpo_steps": m[-1]["step"],
           "heldout_before": before, "heldout_after": after, "gain_points": 100 * (after - before),
           "final_problems": n_final, "final_before": wide["SFT"][key], "final_after": wide["GRPO"][key],
           "final_gain_points": 100 * (wide["GRPO"][key] - wide["SFT"][key]),
           "eval_curve": evals, "per_level": wide, "args": vars(args)}
    (out / "r1_demo.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def plot_curves(path: Path, m: list[dict], wide: dict, key: str, n_final: int, n_curve: int, train_label: str,
                window: int = 10):
    """Four panels: held-out and training accuracy, reward and zero-spread groups, entropy, and the
    off-policy statistics (clip fraction, masked sequences). Per-step series are averaged over `window` steps."""
    from nanoseek.report import _plt, _series

    def smooth(k):
        xs, ys = _series(m, k)
        return xs, [sum(ys[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ys))]

    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), dpi=100)
    a = axes[0][0]
    a.plot(*_series(m, "eval_accuracy"), marker="o", markersize=3, label=f"held-out, greedy ({n_curve} problems)")
    a.plot(*smooth("accuracy"), label=f"training rollouts, {train_label} (mean of {window} steps)")
    last = m[-1]["step"]
    a.plot([0, last], [wide["SFT"][key], wide["GRPO"][key]], "s", color="k",
           label=f"held-out, greedy ({n_final} problems)")
    a.set_title("accuracy")
    b = axes[0][1]
    b.plot(*smooth("reward"), label="mean reward")
    b.plot(*smooth("zero_spread_frac"), label="zero-spread groups (no gradient)")
    b.set_title(f"reward (mean of {window} steps)")
    c = axes[1][0]
    c.plot(*smooth("entropy"), label="entropy of trained rows (nats/token)")
    c.set_title(f"policy entropy (mean of {window} steps)")
    d = axes[1][1]
    d.plot(*smooth("clip_frac"), label="clip fraction")
    d.plot(*smooth("masked_seq_frac"), label="off-policy masked sequences")
    xs, ys = smooth("ratio")
    d.plot(xs, [y - 1 for y in ys], label="mean ratio pi/pi_old - 1")
    d.set_title(f"off-policy statistics (mean of {window} steps)")
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xlabel("GRPO step")
    fig.suptitle("GRPO on a tiny DeepSeek-V3, 10 minutes on one CPU core")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
