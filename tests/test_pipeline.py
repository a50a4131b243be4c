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
                        ("distill", "DeepseekV32ForCausalLM")):  # the student: the teacher made dense
        folder = out / stage / "model"
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert type(model).__name__ == arch
        if stage == "distill":
            assert model.config.first_k_dense_replace == model.config.num_hidden_layers  # no MoE layer
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


@pytest.mark.parametrize("preset", ["cpu", "micro", "gpu"])
def test_dsa_continues_on_pre_trainings_data(preset):
    """The DSA stage continues the pre-trained model (its sparse phase trains every weight): on other data than
    pre-training's it retrains the model there. The cpu preset's DSA ran on the whole embedded mix after an
    English-arithmetic pre-training (dense loss 12.4 against a uniform 6.7; SFT 8 points lower)."""
    from nanoseek.pipeline import RUN_PRESETS
    from nanoseek.train.dsa import DSAConfig
    from nanoseek.train.pretrain import PretrainConfig

    P = RUN_PRESETS[preset]
    fields = ("data", "embedded_tasks", "embedded_levels", "embedded_langs")
    pre, dsa_defaults = PretrainConfig(), DSAConfig.__dataclass_fields__
    for f in fields:
        want = P["pretrain"].get(f, getattr(pre, f))
        got = P["dsa"].get(f, dsa_defaults[f].default_factory())
        assert got == want, (preset, f, got, want)


def test_dsa_warns_when_the_dense_model_does_not_know_its_data(recwarn):
    from nanoseek.train.dsa import DSAConfig, check_data_fits

    cfg = DSAConfig.__new__(DSAConfig)  # the fields the message names, without __post_init__'s folder checks
    cfg.data, cfg.embedded_tasks, cfg.embedded_langs, cfg.embedded_levels = [], [], ["en", "zh"], [1, 2, 3, 4, 5]
    check_data_fits(3.0, 809, cfg)
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"12\.40, above a uniform guess \(ln 809 = 6\.70\).*embedded_langs"):
        check_data_fits(12.4, 809, cfg)


def test_the_report_says_where_a_targeted_sft_ended():
    """The cpu preset's SFT ends at a held-out loss: the stage's note says at which step, or that it never got
    there (the report's stage table); a run without a target has no such note."""
    from nanoseek.pipeline import RUN_PRESETS, _sft_note
    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(**RUN_PRESETS["cpu"]["sft"], init_from="x")
    assert cfg.target_eval_loss is not None and cfg.eval_fraction > 0  # the preset's SFT is targeted
    reached = [{"step": 10, "eval_loss": 0.03}, {"step": 20, "loss": 0.01},
               {"step": 30, "eval_loss": 0.0144, "reached_target": 1}]
    assert _sft_note(reached, cfg) == {"notes": f"step 30 of at most {cfg.steps}: held-out loss 0.0144 <= "
                                                f"{cfg.target_eval_loss}"}
    missed = [{"step": 10, "eval_loss": 0.04}, {"step": cfg.steps, "eval_loss": 0.0252}]
    assert _sft_note(missed, cfg)["notes"].startswith(f"all {cfg.steps} steps: held-out loss 0.0252 never reached")
    assert _sft_note(reached, SFTConfig(init_from="x")) == {}
