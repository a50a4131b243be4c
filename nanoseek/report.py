"""The main job's report: report.md (plots as PNG files beside it) and report.html (plots embedded).

Built only from what the stages wrote (metrics.jsonl, eval JSON, stats), so it can be regenerated
from a finished run folder: `build_report(run_dir, summary)`.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .train.common import atomic_write_text, read_metrics


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the report's plots need matplotlib: pip install 'nanoseek[plot]' (setup.sh installs it)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str, stage: str | None = None) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if key in r and isinstance(r[key], (int, float)) and (stage is None or r.get("stage") == stage):
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def plot_lines(path: Path, title: str, curves: list[tuple[str, list, list]], xlabel: str = "step", ylabel: str = "",
               logy: bool = False) -> Path | None:
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, xs, ys in curves:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 15 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_load_heatmap(path: Path, records: list[dict]) -> Path | None:
    """Expert load share over training (mean over MoE layers): rows = experts, columns = logged steps."""
    rows = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
    if not rows:
        return None
    import numpy as np

    steps = [s for s, _ in rows]
    grid = np.array([np.mean(np.array(l), axis=0) for _, l in rows]).T  # (E, logs)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    E = grid.shape[0]
    im = ax.imshow(grid * E, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=[steps[0], steps[-1], E - 0.5, -0.5])
    ax.set_title("expert load / uniform load (1.0 = balanced), mean over MoE layers")
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pm(e: dict) -> str:
    se = e.get("pass@1_se")
    return f"{e['pass@1']:.3f}" + (f" +- {se:.3f}" if isinstance(se, float) else "")


def _sampling(summary: dict, k: int) -> str:
    t = summary.get("eval_temperature", 0.6)
    return "greedy decoding, one answer per problem" if t == 0 else f"{k} samples per problem at temperature {t}"


def _headline(summary: dict) -> list[str]:
    """The run's result in its first lines: SFT, GRPO and the student on the same held-out problems."""
    evals = summary.get("evals", {})
    sft, rl, student = evals.get("SFT"), evals.get("GRPO"), evals.get("distilled student")
    if not (sft and rl):
        return []
    k = sft.get("k", 1)
    md = ["## Result\n", f"Held-out pass@1 on {sft.get('num_problems', '?')} test problems per row "
          f"({', '.join(sft.get('per_task', {})) or 'held out'}; {_sampling(summary, k)}; +- one standard error):\n",
          "| model | pass@1 | against the stage before |", "|---|---|---|",
          f"| SFT (cold start) | {_pm(sft)} | |",
          f"| GRPO | {_pm(rl)} | {100 * (rl['pass@1'] - sft['pass@1']):+.1f} points over SFT |"]
    if student:
        ratio = student["pass@1"] / rl["pass@1"] if rl["pass@1"] > 0 else float("nan")
        md.append(f"| distilled dense student | {_pm(student)} | {100 * ratio:.0f}% of the GRPO teacher |")
    return md + [""]


def _img_html(p: Path) -> str:
    data = base64.b64encode(p.read_bytes()).decode()
    return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def build_report(run_dir: Path, summary: dict) -> tuple[Path, Path]:
    """summary: {"params": {...}, "stages": {name: {"seconds", "tokens_per_s", ...}}, "evals": {model: eval dict},
    "fp8": {...} | None, "rejection": stats, "config": {...}}."""
    run_dir = Path(run_dir)
    figs = run_dir / "report_files"
    figs.mkdir(exist_ok=True)
    pre = read_metrics(run_dir / "pretrain")
    dsa = read_metrics(run_dir / "dsa")
    grpo = read_metrics(run_dir / "grpo")
    plots: list[tuple[str, Path]] = []

    def add(title, p):
        if p is not None:
            plots.append((title, p))

    add("Pre-training loss", plot_lines(figs / "loss.png", "pre-training: LM and MTP loss", [
        ("LM loss (train)", *_series(pre, "loss")), ("MTP loss (train)", *_series(pre, "mtp_loss")),
        ("LM loss (held out)", *_series(pre, "eval_loss")), ("MTP loss (held out)", *_series(pre, "eval_mtp_loss"))],
        ylabel="cross-entropy"))
    add("Expert load balance", plot_load_heatmap(figs / "expert_load.png", pre))
    add("Load imbalance", plot_lines(figs / "maxvio.png", "MaxVio = max load / mean load - 1",
                                     [("MaxVio", *_series(pre, "maxvio"))]))
    fp8 = summary.get("fp8")
    if fp8:
        ref = read_metrics(Path(fp8["reference_dir"]))
        add("FP8 vs high precision", plot_lines(figs / "fp8.png", "FP8 against the same run without FP8", [
            ("FP8", *_series(pre, "loss")), ("no FP8", *_series(ref, "loss"))], ylabel="LM loss"))
    add("DSA indexer", plot_lines(figs / "dsa.png", "DSA: indexer recall of the dense attention's top-k", [
        ("recall", *_series(dsa, "indexer_recall"))], ylabel="recall"))
    add("GRPO", plot_lines(figs / "grpo_reward.png", "GRPO: reward and accuracy", [
        ("mean reward", *_series(grpo, "reward")), ("train accuracy", *_series(grpo, "accuracy")),
        ("held-out accuracy (greedy)", *_series(grpo, "eval_accuracy"))]))
    add("GRPO completion length", plot_lines(figs / "grpo_length.png", "GRPO: completion length (tokens)", [
        ("mean completion length", *_series(grpo, "completion_length"))]))

    md = ["# nanoseek run report\n", f"Run folder: `{run_dir}`; preset `{summary.get('preset')}`; "
          f"total time {summary.get('total_seconds', 0) / 60:.1f} min on {summary.get('machine', '?')}.\n"]
    md += _headline(summary)
    p = summary.get("params", {})
    if p:
        md += ["## Model\n", "| model | total parameters | active per token |", "|---|---|---|"]
        for name, d in p.items():
            md.append(f"| {name} | {d['total']:,} | {d.get('active', d['total']):,} |")
        md.append("")
    evals = summary.get("evals", {})
    if evals:
        k = next(iter(evals.values())).get("k", 1)
        md += ["## Held-out evaluation\n",
               f"Problems never seen in training (test split); {_sampling(summary, k)}; +- one standard error.\n",
               f"| stage | problems | pass@1 | maj@{k} | format rate | mean length | per level |",
               "|---|---|---|---|---|---|---|"]
        for name, e in evals.items():
            levels = ", ".join(f"{t.split('/')[1]} {v['pass@1']:.3f}" for t, v in e.get("per_task", {}).items())
            md.append(f"| {name} | {e.get('num_problems', '?')} | {_pm(e)} | {e[f'maj@{k}']:.3f} | "
                      f"{e['format_rate']:.3f} | {e['mean_length']:.1f} | {levels} |")
        md.append("")
    stages = summary.get("stages", {})
    if stages:
        md += ["## Stages\n", "| stage | time (s) | tokens/s | notes |", "|---|---|---|---|"]
        for name, d in stages.items():
            tps = d.get("tokens_per_s")
            md.append(f"| {name} | {d.get('seconds', 0):.0f} | {f'{tps:,.0f}' if tps else '-'} | {d.get('notes', '')} |")
        md.append("")
    if fp8:
        md += ["## FP8\n", f"Final LM loss with FP8 {fp8['fp8_loss']:.4f} against {fp8['ref_loss']:.4f} without: "
               f"relative gap {100 * fp8['rel_gap']:.2f}% (the V3 report: under 0.25%).\n"]
    rs = summary.get("rejection")
    if rs:
        md += ["## Rejection sampling\n", f"{rs['samples']} samples from {rs['prompts']} prompts: {rs['correct']} "
               f"correct, {rs['kept']} kept (dropped: {rs['dropped_overlong']} overlong, "
               f"{rs['dropped_mixed_language']} mixed-language, {rs['dropped_format']} malformed, "
               f"{rs['duplicates']} duplicates).\n"]
    md.append("## Curves\n")
    for title, path in plots:
        md += [f"### {title}\n", f"![{title}](report_files/{path.name})\n"]
    trans = summary.get("transcripts", {})
    if trans:
        md.append("## Sample transcripts\n")
        for name, items in trans.items():
            for t in items[:2]:
                md += [f"**{name}** ({'correct' if t['correct'] else 'wrong'}; answer {t['answer']})\n",
                       "```text", f"User: {t['prompt']}", f"Assistant: <think>{t['completion']}", "```\n"]
    text = "\n".join(md)
    md_path = run_dir / "report.md"
    atomic_write_text(md_path, text)
    body = _md_to_html(text, {p.name: p for _, p in plots})
    html_path = run_dir / "report.html"
    atomic_write_text(html_path, "<!doctype html><html><head><meta charset='utf-8'><title>nanoseek report</title>"
                      "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
                      "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}"
                      "pre{background:#f6f6f6;padding:.8em;white-space:pre-wrap}</style></head><body>"
                      + body + "</body></html>\n")
    (run_dir / "report_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    return md_path, html_path


def _md_to_html(text: str, images: dict) -> str:
    """Just enough Markdown for this report: headings, tables, code blocks, images, paragraphs."""
    out, in_code, table = [], False, []

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            flush_table()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("![") and "](" in line:
            name = Path(line.split("](", 1)[1].rstrip(")")).name
            if name in images:
                out.append(_img_html(images[name]))
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush_table()
    return "\n".join(out)
