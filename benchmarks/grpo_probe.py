"""GRPO probe: the main job's GRPO stage again from a run's SFT model, with some settings changed, judged on a
held-out draw of its own (issue 13's probes in docs/results.md).

The cpu preset's GRPO settings (nanoseek.pipeline.RUN_PRESETS) with `--set` overrides, from RUN/sft/model, into
OUT/NAME/grpo; then the preset's evaluation (1,024 level-2 test problems, greedy) of the SFT model and of the
probe's GRPO model on the draw of `--eval-seed` (4242 by default: not the main job's judged draw, seed + 1234, so
probes never tune on the numbers the report states). Prints one JSON line: the overrides, GRPO's seconds, SFT and
GRPO pass@1 on that draw. The SFT evaluation is cached beside the run (RUN/sft_eval<seed>.json).

    python benchmarks/grpo_probe.py --run runs/main --name dyn --set '{"dynamic_sampling": true, "time_limit_s": 300}'
    python benchmarks/grpo_probe.py --run runs/main --name g16 --set '{"prompts_per_step": 8, "num_generations": 16}'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a `nanoseek run` folder (its sft/model is the starting point)")
    ap.add_argument("--name", required=True, help="the probe's folder name under --out")
    ap.add_argument("--set", default="{}", help="JSON object of GRPOConfig fields over the preset's")
    ap.add_argument("--out", default="runs/probes")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="GRPO's seed")
    ap.add_argument("--eval-seed", type=int, default=4242, help="the held-out draw (not the main job's judged one)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from nanoseek.pipeline import RUN_PRESETS
    from nanoseek.train.evaluate import EvalConfig, evaluate
    from nanoseek.train.grpo import GRPOConfig, grpo

    preset = copy.deepcopy(RUN_PRESETS[args.preset])
    sft = Path(args.run) / "sft" / "model"
    if not (sft / "config.json").exists():
        sys.exit(f"grpo_probe: no SFT model in {sft}")
    out = Path(args.out) / args.name
    overrides = json.loads(args.set)
    t0 = time.time()
    model = grpo(GRPOConfig(**{**preset["grpo"], **overrides}, init_from=str(sft), out_dir=str(out / "grpo"),
                            seed=args.seed))
    grpo_s = time.time() - t0
    scores = {}
    for tag, path, f in (("sft", sft, Path(args.run) / f"sft_eval{args.eval_seed}.json"),
                         ("grpo", model, out / f"eval{args.eval_seed}.json")):
        if not f.exists():
            evaluate(EvalConfig(**preset["eval"], model=str(path), out=str(f), seed=args.eval_seed))
        scores[tag] = json.loads(f.read_text())["pass@1"]
    print(json.dumps({"name": args.name, "overrides": overrides, "grpo_s": round(grpo_s), **scores,
                      "gain_points": round(100 * (scores["grpo"] - scores["sft"]), 1)}))


if __name__ == "__main__":
    main()
