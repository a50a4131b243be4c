"""The speedrun: the main job (`nanoseek run`, default preset) three times with different seeds, then the
table of held-out pass@1 (SFT, GRPO, distilled student) with means and spreads, and the wall time.

    python benchmarks/speedrun.py                          # seeds 0 1 2 into runs/speedrun/seed<N>
    python benchmarks/speedrun.py --seeds 0 1 2 3 --out runs/speedrun --preset cpu
    python benchmarks/speedrun.py --table-only            # re-print the table from finished runs

Each run is a separate `nanoseek run` process in a fresh folder (a finished folder is reused: the run
skips its finished stages, so a killed speedrun continues). Runs go one after another: timings are only
meaningful on a quiet machine. The seed changes every stage's randomness (initialisation, data order,
sampling) and which test-split problems are judged (the eval seed is 1234 + seed): each run draws its own
1,024, fixed before training, and judges SFT, GRPO and the student on that same draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = [("SFT", "SFT"), ("GRPO", "GRPO"), ("distilled student", "student")]


def run_one(out: Path, seed: int, preset: str) -> float:
    """One `nanoseek run` in its own process; returns the wall seconds this call spent."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "nanoseek", "run", "--out", str(out), "--seed", str(seed), "--preset", preset]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def collect(out: Path) -> dict:
    """The numbers of one finished run, from its report_summary.json."""
    s = json.loads((out / "report_summary.json").read_text())
    e = s["evals"]
    row = {short: e[name]["pass@1"] for name, short in ROWS}
    row.update({f"{short}_se": e[name].get("pass@1_se", float("nan")) for name, short in ROWS})
    row["n"] = e["SFT"]["num_problems"]
    row["gain"] = row["GRPO"] - row["SFT"]
    row["ratio"] = row["student"] / row["GRPO"] if row["GRPO"] else float("nan")
    row["minutes"] = s["total_seconds"] / 60
    return row


def table(rows: dict[int, dict]) -> str:
    cols = [("SFT", "SFT pass@1", 1), ("GRPO", "GRPO pass@1", 1), ("gain", "GRPO - SFT (points)", 1),
            ("student", "student pass@1", 1), ("ratio", "student / GRPO", 1), ("minutes", "wall (min)", 0)]
    md = ["| seed | problems | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]

    def cell(r, key, pct):
        v = r[key]
        if key in ("SFT", "GRPO", "student"):
            return f"{100 * v:.1f}% +- {100 * r[key + '_se']:.1f}"
        if key == "gain":
            return f"{100 * v:+.1f}"
        if key == "ratio":
            return f"{100 * v:.0f}%"
        return f"{v:.1f}"

    for seed, r in rows.items():
        md.append(f"| {seed} | {r['n']} | " + " | ".join(cell(r, c[0], c[2]) for c in cols) + " |")
    if len(rows) > 1:
        agg = []
        for key, _, _ in cols:
            vals = [r[key] for r in rows.values()]
            m, sd = statistics.mean(vals), statistics.stdev(vals)
            scale = 1 if key == "minutes" else 100
            agg.append(f"{scale * m:.1f} (sd {scale * sd:.1f}, {scale * min(vals):.1f} to {scale * max(vals):.1f})")
        md.append("| mean (spread) | | " + " | ".join(agg) + " |")
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/speedrun")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--table-only", action="store_true", help="print the table of the finished runs, run nothing")
    args = ap.parse_args(argv)
    rows = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed{seed}"
        if not args.table_only:
            run_one(folder, seed, args.preset)
        if (folder / "report_summary.json").is_file():
            rows[seed] = collect(folder)
    if not rows:
        print("no finished runs", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
