"""Tokens/s of the pre-training step with 1 process against 2 (`torchrun`, FSDP2; FSDP2 + expert parallelism).

    python benchmarks/bench_scaling.py                       # 2 rounds, tiny preset, 8 x 256, 30 steps
    python benchmarks/bench_scaling.py --rounds 3 --steps 40

Every launch gets 1 thread a process (OMP_NUM_THREADS=1) and the same global batch; the launches alternate
(1, 2, 2+EP, 1, 2, 2+EP, ...) so drift in the machine hits every row alike. Tokens/s is `tokens_per_s` from
each run's metrics.jsonl (the global batch's tokens over the step time), the median over the steps after
the first third (warm-up and first-step allocation excluded), then the median over rounds. Run it on a quiet
machine: two processes on two cores leave nothing for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROWS = {
    "1 process": [],
    "2 processes, FSDP": ["torchrun"],
    "2 processes, FSDP + EP 2": ["torchrun", "--ep", "2"],
}


def launch(row: list[str], out: Path, args) -> list[float]:
    """One pre-training run; returns tokens/s of each logged step after the warm-up third."""
    stage = ["pretrain", "--out", str(out), "--preset", args.preset, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", "1",
             "--log-every", "1", "--eval-every", "100000", "--no-tensorboard"]
    if row and row[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "nanoseek", *stage, *row[1:]]
    else:
        cmd = [sys.executable, "-m", "nanoseek", *stage]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r.get("step", 0) > args.steps // 3]
    if not tps:
        raise SystemExit(f"{out}/metrics.jsonl: no tokens_per_s rows after step {args.steps // 3}")
    return tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (split across the processes)")
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    results: dict[str, list[float]] = {name: [] for name in ROWS}
    work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    try:
        for r in range(args.rounds):
            for i, (name, row) in enumerate(ROWS.items()):
                med = statistics.median(launch(row, work / f"r{r}_{i}", args))
                results[name].append(med)
                print(f"round {r}: {name:26s} {med:8.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(results["1 process"])
    print(f"\n| pretrain step ({args.preset}, {args.batch_size} x {args.seq_len}, 1 thread per process) "
          "| tokens/s | vs 1 process |")
    print("|---|---:|---:|")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
