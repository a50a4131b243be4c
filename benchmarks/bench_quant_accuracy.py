"""Accuracy, bytes on disk and bytes in memory of every weight format and of expert pruning (issue 15).

For each format: quantise the float model (nanoseek.quant), write the folder (`nanoseek convert --quantize`
does the same), load it back as stored, and score greedy pass@1 on held-out problems with nanoseek's evaluator
(nanoseek.train.evaluate.score_problems: the engine, the chat template, the rule checker). Pruning: keep half
the routed experts per layer by router load on a calibration JSONL (nanoseek.prune), then score in fp32.
Standard error: sqrt(p (1 - p) / n), the binomial one. No timing here (decode speed: bench_decode.py).

    python benchmarks/bench_quant_accuracy.py --model /work/runs/h2h_moe/sft_model \\
        --jsonl add2_test.jsonl --calib add2_calib.jsonl --out runs/quant_eval --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a float DeepSeek model folder with tokenizer files")
    ap.add_argument("--jsonl", required=True, help="held-out {prompt, answer} lines (nanoseek eval --jsonl)")
    ap.add_argument("--calib", default="embedded", help="calibration set for pruning: a JSONL or 'embedded'")
    ap.add_argument("--num-problems", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int8-g128", "int4-g128", "fp8"])
    ap.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True, help="also keep half the experts")
    ap.add_argument("--out", required=True, help="folder for the converted models and results.json")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from nanoseek.prune import prune
    from nanoseek.quant import load_for_inference, quantize, save_quantized, state_bytes
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.evaluate import EvalConfig, held_out_problems, score_problems

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(a.model)
    problems = held_out_problems(EvalConfig(jsonl=a.jsonl, tasks=[], num_problems=a.num_problems))

    def score(model) -> float:
        return score_problems(model, tok, problems, k=1, temperature=0.0, max_tokens=a.max_tokens,
                              thinking=a.thinking, max_batch_size=250)["pass@1"]

    rows = []
    runs = [(fmt, None) for fmt in a.formats] + ([("fp32", "prune")] if a.prune else [])
    for fmt, kind in runs:
        if kind == "prune":
            from nanoseek.config import ModelConfig

            E = ModelConfig.load(a.model).n_routed_experts
            folder = out / f"pruned{E // 2}"
            info = prune(a.model, folder, keep_experts=E // 2, calib=a.calib, num_samples=256)
            name = f"pruned to {E // 2}/{E} experts (fp32)"
        else:
            folder = out / fmt
            m = load_for_inference(a.model)
            quantize(m, fmt)
            save_quantized(m, folder, tokenizer=tok)
            name, info = fmt, None
        model = load_for_inference(folder, fmt)  # as stored: bf16 in bf16, fp8 kept in fp8
        p = score(model)
        n = len(problems)
        row = {"format": name, "pass@1": p, "se": math.sqrt(p * (1 - p) / n), "n": n,
               "params": model.config.num_parameters(),
               "disk_bytes": folder_bytes(folder), "memory_bytes": state_bytes(model)}
        if info:
            row["group_limited"] = info["group_limited"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
