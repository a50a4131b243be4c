"""The main job end to end (micro preset): every stage runs, every stage's model folder loads in
transformers, the report holds what it promises, and a killed run resumes where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch


@pytest.mark.slow
def test_micro_run_end_to_end_killed_and_resumed(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek.cli", "run", "--preset", "micro", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "sft" / "checkpoints").exists():  # kill it inside the SFT stage
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "pretrain" / "model" / "config.json").exists() and not (out / "report.md").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout
    assert "pretrain: already done, skipped" in log and "dsa: already done, skipped" in log
    assert "[9/9] report" in log and "min left" in log
    assert f"next: nanoseek chat --model {out / 'grpo' / 'model'}" in log
    # stderr is a pipe: plain progress lines, no carriage returns; the distill stage says "distill"
    assert "\r" not in done.stderr and "distill: 4/4" in done.stderr, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text()) == {"preset": "micro", "fp8": False, "seed": 0}
    from nanoseek.cli import main

    assert main(["run", "--preset", "cpu", "--out", str(out)]) == 2  # another preset into this folder: refused

    report = (out / "report.md").read_text()
    for section in ("## Model", "## Held-out evaluation", "## Stages", "## Rejection sampling", "Pre-training loss",
                    "Expert load balance", "DSA indexer", "GRPO", "| distilled student |", "maj@"):
        assert section in report, section
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"tokenizer", "pretrain", "dsa", "sft", "grpo", "rejection", "distill", "eval"}

    import transformers

    for stage, arch in (("pretrain", "DeepseekV3ForCausalLM"), ("dsa", "DeepseekV32ForCausalLM"),
                        ("sft", "DeepseekV32ForCausalLM"), ("grpo", "DeepseekV32ForCausalLM"),
                        ("distill", "Qwen2ForCausalLM")):
        folder = out / stage / "model"
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert type(model).__name__ == arch
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        ids = tok.apply_chat_template([{"role": "user", "content": "1+1"}], add_generation_prompt=True, thinking=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert model(torch.tensor([ids])).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_micro_run_with_fp8_reports_the_loss_gap(tmp_path):
    from nanoseek.cli import main

    threads = torch.get_num_threads()
    assert main(["run", "--preset", "micro", "--fp8", "--out", str(tmp_path / "r")]) == 0
    assert torch.get_num_threads() == threads  # the preset's thread count (2) does not leak into the caller
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## FP8" in report and "relative gap" in report and "FP8 vs high precision" in report
    assert (tmp_path / "r" / "pretrain_no_fp8" / "model" / "config.json").exists()
