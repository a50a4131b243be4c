"""The one training loop (nanoseek.train.trainer): resume, phases, the lr hook, lazy metrics and rank-0 writes on a
toy stage; then every stage honours keep_checkpoints, stop_after and time_limit_s the same way."""

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek.train.trainer as T
from nanoseek.train.common import read_metrics
from nanoseek.train.distill import DistillConfig
from nanoseek.train.dsa import DSAConfig, dsa
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.sft import SFTConfig, sft

MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


# ---------------------------------------------------------------------------------------------- a toy stage


class Toy(torch.nn.Linear):
    def __init__(self):
        super().__init__(4, 1)

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / "model.safetensors"))
        (Path(folder) / "config.json").write_text("{}")


@dataclass
class ToyConfig:
    out_dir: str
    steps: int = 6
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    stop_after: int | None = None
    time_limit_s: float | None = None
    resume: bool = True
    tensorboard: bool = False
    seed: int = 0
    device: str = "cpu"


def toy_stage(cfg: ToyConfig, phases: bool = False, dist=None, on_step=None, lr_at=None, **fit_kw):
    """A stage in the loop's terms: a model, an optimizer (or one per phase), and a step that draws its batch from
    the global RNG (so a resume must restore it) and returns its loss."""
    run = T.Trainer("toy", cfg, dist=dist)
    torch.manual_seed(1)
    model = Toy()
    if run.resumed:
        model.load_state_dict(load_file(str(run.resume_from / "model.safetensors")))
    make = lambda phase: torch.optim.AdamW(model.parameters(), lr=0.1 if phase == "a" else 0.05)
    run.restore(T.Phases(lambda s: "a" if s < 3 else "b", make) if phases else make("a"), config_json="{}\n")

    def train_step(step, opt):
        x = torch.randn(8, 4)
        loss = ((model(x) - x.sum(-1, keepdim=True)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
        return {"loss": loss.item(), "num_tokens": 8}

    out = run.fit(train_step, cfg.steps, model, None, lr_at=lr_at or (lambda s, _: 0.1 / (1 + s)), **fit_kw)
    return out, model


@pytest.mark.parametrize("phases", [False, True])
@pytest.mark.parametrize("stop", [2, 3, 4])
def test_a_stopped_and_resumed_toy_run_equals_an_uninterrupted_one(tmp_path, phases, stop):
    """stop_after checkpoints and stops; the next call resumes RNG, optimizer, lr and step to the same weights and
    records. With phases, a checkpoint at the boundary (step 3) must not carry phase a's AdamW state into phase b."""
    full, wf = toy_stage(ToyConfig(out_dir=str(tmp_path / "full")), phases)
    stopped, _ = toy_stage(ToyConfig(out_dir=str(tmp_path / "part"), stop_after=stop), phases)
    assert stopped.name == f"step_{stop:07d}" and not (tmp_path / "part" / "model").exists()
    state = torch.load(stopped / "trainer_state.pt", weights_only=True)
    assert state["step"] == stop and state.get("stage") == (("a" if stop <= 3 else "b") if phases else None)
    resumed, wr = toy_stage(ToyConfig(out_dir=str(tmp_path / "part")), phases)
    assert resumed == tmp_path / "part" / "model" and (resumed / "model.safetensors").exists()
    assert torch.equal(wf.weight, wr.weight) and torch.equal(wf.bias, wr.bias)
    clean = lambda d: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in read_metrics(d)]
    assert clean(tmp_path / "full") == clean(tmp_path / "part")
    assert [r["step"] for r in read_metrics(tmp_path / "part")] == [1, 2, 3, 4, 5, 6]


def test_phase_optimizer_state_stays_in_its_phase(tmp_path):
    """Resuming inside phase a restores its AdamW state; resuming at the start of phase b builds a fresh one."""
    toy_stage(ToyConfig(out_dir=str(tmp_path / "a"), stop_after=2), phases=True)
    run = T.Trainer("toy", ToyConfig(out_dir=str(tmp_path / "a")))
    model = Toy()
    run.restore(T.Phases(lambda s: "a" if s < 3 else "b", lambda p: torch.optim.AdamW(model.parameters())))
    assert run.phase == "a" and len(run.optimizer.state) == 2  # weight and bias moments restored
    toy_stage(ToyConfig(out_dir=str(tmp_path / "b"), stop_after=3), phases=True)
    run = T.Trainer("toy", ToyConfig(out_dir=str(tmp_path / "b")))
    run.restore(T.Phases(lambda s: "a" if s < 3 else "b", lambda p: torch.optim.AdamW(model.parameters())))
    assert run.phase == "b" and len(run.optimizer.state) == 0


def test_time_limit_makes_the_step_that_spends_it_the_last(tmp_path, monkeypatch):
    """A fake clock advances 10 s per step: with a 25 s budget step 3 is the last one; it is recorded, checkpointed
    and published as if steps had been 3. The lr hook sees the elapsed seconds (GRPO's clock-following cosine)."""
    clock = [0.0]
    monkeypatch.setattr(T, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    seen = []

    def lr_at(step, elapsed_s):
        seen.append(elapsed_s)
        return 0.01

    out, _ = toy_stage(ToyConfig(out_dir=str(tmp_path / "t"), steps=100, time_limit_s=25),
                       on_step=lambda s: clock.__setitem__(0, clock[0] + 10), lr_at=lr_at)
    assert out == tmp_path / "t" / "model" and (out / "model.safetensors").exists()
    m = read_metrics(tmp_path / "t")
    assert [r["step"] for r in m] == [1, 2, 3] and m[-1]["stopped_by_time_limit"] == 1
    assert "stopped_by_time_limit" not in m[-2]
    assert seen == [0, 10, 20]
    assert [p.name for p in (tmp_path / "t" / "checkpoints").glob("step_*")] == ["step_0000003"]


def test_a_met_target_ends_the_run_and_a_later_call_publishes_that_step(tmp_path):
    """stop_when: the evaluation at step 4 meets the target (eval every 2 steps, losses 1, 0.5, 0.25, ...), so step
    4 is the last: recorded with reached_target, checkpointed, published, although steps is 100. A second call
    into the folder resumes that checkpoint and trains nothing more; without the target the run goes on."""
    losses = iter([1.0, 0.5, 0.25, 0.125])
    run_kw = dict(evaluate=lambda: {"eval_loss": next(losses)}, stop_when=lambda rec: rec["eval_loss"] <= 0.5)
    cfg = ToyConfig(out_dir=str(tmp_path / "t"), steps=100, eval_every=2, log_every=100)
    out, model = toy_stage(cfg, **run_kw)
    assert out == tmp_path / "t" / "model" and (out / "model.safetensors").exists()
    m = read_metrics(tmp_path / "t")
    assert [(r["step"], r.get("eval_loss"), r.get("reached_target")) for r in m] == [
        (1, None, None), (2, 1.0, None), (4, 0.5, 1)]
    assert _checkpoints(tmp_path / "t") == ["step_0000004"]
    assert torch.load(tmp_path / "t" / "checkpoints" / "step_0000004" / "trainer_state.pt",
                      weights_only=True)["ended"] is True
    again, model2 = toy_stage(cfg, **run_kw)  # resumes at 4: already ended
    assert again == out and torch.equal(model.weight, model2.weight)
    assert [r["step"] for r in read_metrics(tmp_path / "t")] == [1, 2, 4]
    free, _ = toy_stage(ToyConfig(out_dir=str(tmp_path / "f"), steps=6, eval_every=2, log_every=100),
                        evaluate=lambda: {"eval_loss": 0.1}, stop_when=lambda rec: False)
    assert [r["step"] for r in read_metrics(tmp_path / "f")] == [1, 2, 4, 6]


def test_keep_checkpoints_and_record_cadence(tmp_path):
    """save_every=1 with keep_checkpoints=1 leaves one checkpoint; records at step 1, every log_every, evaluations
    and the last step; a callable metric is computed only for the steps recorded."""
    calls = []
    cfg = ToyConfig(out_dir=str(tmp_path / "k"), steps=7, save_every=1, keep_checkpoints=1, log_every=3, eval_every=5)
    run = T.Trainer("toy", cfg)
    model = Toy()
    run.restore(torch.optim.SGD(model.parameters(), lr=0.01))

    def train_step(step, opt):
        return {"loss": float(step), "expensive": lambda: calls.append(step + 1) or {"stat": step + 1}}

    run.fit(train_step, cfg.steps, model, None, evaluate=lambda: {"eval_loss": 0.5})
    m = read_metrics(tmp_path / "k")
    assert [r["step"] for r in m] == [1, 3, 5, 6, 7] and calls == [1, 3, 5, 6, 7]
    assert all(r["stat"] == r["step"] for r in m) and [r["step"] for r in m if "eval_loss" in r] == [5, 7]
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("step_*")) == ["step_0000007"]


def test_only_rank_0_writes(tmp_path):
    """The distributed hook: a rank other than 0 trains but writes no log, checkpoint or model folder."""
    toy_stage(ToyConfig(out_dir=str(tmp_path / "r1"), steps=2, save_every=1), dist=T.SingleProcess(rank=1))
    assert not (tmp_path / "r1" / "metrics.jsonl").exists() and not (tmp_path / "r1" / "checkpoints").exists()
    assert not (tmp_path / "r1" / "model").exists()


# ---------------------------------------------------------------------------------------------- every stage


@pytest.mark.parametrize("cls,kw", [(PretrainConfig, {}), (SFTConfig, {"init_from": "x"}), (GRPOConfig, {}),
                                    (DistillConfig, {})])
@pytest.mark.parametrize("field,value", [("keep_checkpoints", 0), ("stop_after", 0), ("time_limit_s", -1.0)])
def test_every_stage_config_has_the_loop_fields_and_checks_them(cls, kw, field, value):
    cfg = cls(**kw)
    assert (cfg.keep_checkpoints, cfg.stop_after, cfg.time_limit_s) == (2, None, None)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} .*got {value!r}"):
        cls(**kw, **{field: value})


def test_dsa_config_has_the_loop_fields_and_checks_them(micro_base):
    cfg = DSAConfig(init_from=str(micro_base))
    assert (cfg.keep_checkpoints, cfg.stop_after, cfg.time_limit_s) == (2, None, None)
    for field, value in (("keep_checkpoints", 0), ("stop_after", -1), ("time_limit_s", 0)):
        with pytest.raises(ValueError, match=rf"DSAConfig\.{field}"):
            DSAConfig(init_from=str(micro_base), **{field: value})


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*"))


def test_pretrain_stops_at_its_time_limit_and_publishes(tmp_path):
    out = tmp_path / "pt"
    final = pretrain(PretrainConfig(out_dir=str(out), embedded_docs=200, vocab_size=400, seq_len=32, batch_size=2,
                                    steps=50, warmup=2, eval_every=100, eval_batches=1, save_every=100, log_every=10,
                                    model_overrides=MICRO, tensorboard=False, device="cpu", time_limit_s=1e-9))
    assert final == out / "model" and (final / "config.json").exists()
    m = read_metrics(out)
    assert m[-1]["step"] == 1 and m[-1]["stopped_by_time_limit"] == 1 and "eval_loss" in m[-1]
    assert _checkpoints(out) == ["step_0000001"]


def test_sft_honours_time_limit_and_keep_checkpoints(micro_base, tmp_path):
    from nanoseek.data.corpus import embedded_sft_records

    out = tmp_path / "sft"
    kw = dict(init_from=str(micro_base), out_dir=str(out), device="cpu", tensorboard=False, steps=20, batch_size=2,
              max_len=128, warmup=0, eval_fraction=0.0, save_every=1, keep_checkpoints=1,
              records=embedded_sft_records(6, seed=1, langs=("en",), tasks=("arithmetic",), levels=(1,)))
    stopped = sft(SFTConfig(stop_after=2, **kw))
    assert stopped.name == "step_0000002" and _checkpoints(out) == ["step_0000002"]
    final = sft(SFTConfig(time_limit_s=1e-9, **kw))  # resumes at 2, spends its budget on step 3
    assert final == out / "model" and _checkpoints(out) == ["step_0000003"]
    assert read_metrics(out)[-1]["step"] == 3 and read_metrics(out)[-1]["stopped_by_time_limit"] == 1


def test_sft_ends_at_the_first_evaluation_that_meets_target_eval_loss(micro_base, tmp_path):
    """target_eval_loss: the first evaluation (every eval_every steps) at or below it ends the run there; one the
    run never meets leaves it at steps; without held-out records it is refused, naming the field."""
    from nanoseek.data.corpus import embedded_sft_records

    kw = dict(init_from=str(micro_base), device="cpu", tensorboard=False, steps=6, batch_size=2, max_len=128,
              warmup=0, eval_fraction=0.25, eval_every=2, eval_batches=1, save_every=100,
              records=embedded_sft_records(16, seed=1, langs=("en",), tasks=("arithmetic",), levels=(1,)))
    met = sft(SFTConfig(out_dir=str(tmp_path / "met"), target_eval_loss=1e3, **kw))
    m = read_metrics(tmp_path / "met")
    assert met == tmp_path / "met" / "model" and m[-1]["step"] == 2 and m[-1]["reached_target"] == 1
    sft(SFTConfig(out_dir=str(tmp_path / "never"), target_eval_loss=1e-9, **kw))
    m = read_metrics(tmp_path / "never")
    assert [r["step"] for r in m if "eval_loss" in r] == [2, 4, 6] and not any("reached_target" in r for r in m)
    with pytest.raises(ValueError, match="target_eval_loss=0.5 needs held-out records.*eval_fraction is 0"):
        SFTConfig(**{**kw, "eval_fraction": 0.0}, out_dir=str(tmp_path / "x"), target_eval_loss=0.5)
    with pytest.raises(ValueError, match=r"SFTConfig\.target_eval_loss"):
        SFTConfig(**kw, out_dir=str(tmp_path / "y"), target_eval_loss=-1.0)


def test_dsa_honours_keep_checkpoints_stop_after_and_time_limit(micro_base, tmp_path):
    out = tmp_path / "dsa"
    kw = dict(init_from=str(micro_base), out_dir=str(out), index_topk=8, seq_len=32, batch_size=2, warmup_steps=2,
              sparse_steps=6, embedded_docs=200, eval_every=100, eval_batches=1, save_every=1, keep_checkpoints=1,
              tensorboard=False, device="cpu")
    stopped = dsa(DSAConfig(stop_after=3, **kw))
    assert stopped.name == "step_0000003" and _checkpoints(out) == ["step_0000003"]
    assert torch.load(stopped / "trainer_state.pt", weights_only=True)["stage"] == "sparse"
    final = dsa(DSAConfig(time_limit_s=1e-9, **kw))
    assert final == out / "model" and json.loads((final / "config.json").read_text())["index_topk"] == 8
    assert _checkpoints(out) == ["step_0000004"]
    m = read_metrics(out)
    assert m[-1]["step"] == 4 and m[-1]["stopped_by_time_limit"] == 1 and "indexer_recall" in m[-1]


def test_grpo_honours_keep_checkpoints(micro_base, tmp_path):
    out = tmp_path / "grpo"
    final = grpo(GRPOConfig(init_from=str(micro_base), out_dir=str(out), steps=3, prompts_per_step=2, num_generations=2,
                            max_tokens=4, reward_weights={}, eval_every=0, tensorboard=False, save_every=1,
                            keep_checkpoints=1, device="cpu"),
                 extra_rewards={"len": lambda prompt, completion, problem: len(completion) / 10})
    assert final == out / "model" and _checkpoints(out) == ["step_0000003"]
