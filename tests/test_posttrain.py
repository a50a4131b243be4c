"""R1's data loop on a micro teacher: rejection sampling keeps verified, well-formed, single-language
samples; distillation trains a dense Qwen2-compatible student on them; evaluation reports pass@1 and maj@k."""

import json

import pytest
import torch

import nanoseek
from nanoseek.tasks import make_problems, solve
from nanoseek.train.common import read_metrics
from nanoseek.train.distill import DistillConfig, distill
from nanoseek.train.evaluate import EvalConfig, evaluate, score_problems
from nanoseek.train.rejection import RejectionConfig, rejection_sample
from nanoseek.train.sft import SFTConfig, sft


@pytest.fixture(scope="module")
def teacher(micro_base, tmp_path_factory):
    """The micro base, SFT'd until it recites the solutions of 12 training problems."""
    problems = make_problems("arithmetic", 12, level=1, lang="en", seed=5, split="train")
    records = []
    for p in problems:
        reasoning, answer = solve(p)
        records.append({"messages": [{"role": "user", "content": p.prompt},
                                     {"role": "assistant", "content": f"The answer is {answer}.",
                                      "reasoning_content": reasoning}]})
    out = tmp_path_factory.mktemp("teacher")
    model = sft(SFTConfig(init_from=str(micro_base), out_dir=str(out), records=records, steps=160, batch_size=12,
                          lr=3e-3, warmup=5, eval_fraction=0.0, tensorboard=False, max_len=160))
    return model, problems


def test_rejection_sampling_keeps_only_verified_wellformed_samples(teacher, tmp_path):
    model, problems = teacher
    path, stats = rejection_sample(RejectionConfig(model=str(model), out=str(tmp_path / "rs.jsonl"), num_prompts=12,
                                                   k=3, temperature=0.5, max_tokens=80, seed=5, keep_per_prompt=2))
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert stats["samples"] == 36 and stats["kept"] == len(recs) > 0
    assert stats["correct"] >= stats["kept"]
    by_prompt = {p.prompt: p for p in problems}
    for r in recs:
        user, assistant = r["messages"]
        assert user["content"] in by_prompt
        assert assistant["content"].startswith("The answer is") and assistant["reasoning_content"]
        assert by_prompt[user["content"]].answer in assistant["content"]
    assert json.loads((tmp_path / "rs.stats.json").read_text())["kept"] == len(recs)
    # a strict language filter drops everything written in English for a Chinese-language bar
    _, strict = rejection_sample(RejectionConfig(model=str(model), out=str(tmp_path / "none.jsonl"), num_prompts=12,
                                                 k=1, temperature=0.5, max_tokens=80, seed=5, max_completion_tokens=1))
    assert strict["kept"] == 0 and strict["dropped_overlong"] == strict["correct"]


def test_distillation_trains_a_qwen2_student_on_teacher_samples(teacher, tmp_path):
    import transformers

    model, _ = teacher
    path, stats = rejection_sample(RejectionConfig(model=str(model), out=str(tmp_path / "rs.jsonl"), num_prompts=12,
                                                   k=2, temperature=0.5, max_tokens=80, seed=5, keep_per_prompt=2))
    out = distill(DistillConfig(teacher=str(model), out_dir=str(tmp_path / "d"), data=[str(path)], steps=60, min_samples=0,
                                batch_size=8, lr=3e-3, warmup=2, max_len=160, tensorboard=False, logit_kd=True,
                                student_overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, intermediate_size=128)))
    m = [r for r in read_metrics(out.parent) if "loss" in r]
    assert m[-1]["loss"] < 0.6 * m[0]["loss"] and "kd_loss" in m[-1]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == nanoseek.ModelConfig.load(model).vocab_size
    student = nanoseek.load_dense(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, cfg["vocab_size"], (1, 12))
    with torch.no_grad():
        assert (student(x).logits - ref(x).logits).abs().max() < 1e-4
    res = evaluate(EvalConfig(model=str(out), num_problems=4, k=2, max_tokens=16, out=str(tmp_path / "e.json")))
    assert 0 <= res["pass@1"] <= 1 and json.loads((tmp_path / "e.json").read_text())["k"] == 2


def test_distillation_into_the_teacher_made_dense(teacher, tmp_path):
    """student_from="teacher": the student starts as the teacher with its MoE layers merged into dense SwiGLUs, so
    it starts knowing what the teacher knows (a fresh student starts near a uniform guess, ln V), and the
    distilled folder is a dense DeepSeek model transformers reads."""
    import math

    import transformers

    model, _ = teacher
    path, _ = rejection_sample(RejectionConfig(model=str(model), out=str(tmp_path / "rs.jsonl"), num_prompts=12,
                                               k=2, temperature=0.5, max_tokens=80, seed=5, keep_per_prompt=2))
    out = distill(DistillConfig(teacher=str(model), out_dir=str(tmp_path / "d"), data=[str(path)], steps=10,
                                min_samples=0, batch_size=8, lr=1e-3, warmup=2, max_len=160, tensorboard=False,
                                logit_kd=True, student_from="teacher", log_every=1))
    merged = json.loads((tmp_path / "d" / "student_init" / "prune.json").read_text())
    assert merged["dense"] and merged["kept"]["1"] and len(merged["kept"]["1"]) == 3  # (128 - 32) / 32 experts
    first = [r for r in read_metrics(out.parent) if "loss" in r][0]
    vocab = nanoseek.ModelConfig.load(model).vocab_size
    assert first["loss"] < 0.5 * math.log(vocab), first
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"].startswith("deepseek") and cfg["first_k_dense_replace"] == cfg["num_hidden_layers"]
    student = nanoseek.from_pretrained(out)
    assert not any(layer.is_moe for layer in student.model.layers)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, vocab, (1, 12))
    with torch.no_grad():
        assert (student(x).logits - ref(x).logits).abs().max() < 1e-4


def test_eval_pass_at_1_and_majority_vote(teacher):
    from nanoseek.tokenizer import Tokenizer

    model_dir, problems = teacher
    model, tok = nanoseek.from_pretrained(model_dir), Tokenizer.load(model_dir)
    greedy = score_problems(model, tok, problems, k=1, temperature=0.0, max_tokens=80)
    assert greedy["pass@1"] > 0 and greedy["format_rate"] > 0  # it recites some of its training problems
    assert abs(greedy["per_task"]["arithmetic/L1/en"]["pass@1"] - greedy["pass@1"]) < 1e-9
    sampled = score_problems(model, tok, problems, k=5, temperature=1.5, max_tokens=80, seed=1)
    assert set(sampled) >= {"pass@1", "maj@5", "format_rate", "mean_length", "per_task", "transcripts"}
    assert 0 <= sampled["pass@1"] <= 1 and 0 <= sampled["maj@5"] <= 1


def test_distill_tops_up_with_records_of_its_own_focus():
    """A weak teacher's samples are topped up with cold-start records of the stage's tasks, levels and languages
    (English level-2 arithmetic here), not the whole embedded mix (other tasks, Chinese)."""
    from nanoseek.train.distill import DistillConfig, filler_records

    recs = filler_records(DistillConfig(tasks=["arithmetic"], levels=[2], langs=["en"]), 200)
    assert len(recs) == 200
    for r in recs:
        q = r["messages"][0]["content"]
        assert q.startswith(("What is", "Compute")) and ("+" in q or "-" in q), q
        assert not any("\u4e00" <= ch <= "\u9fff" for ch in q + r["messages"][1]["reasoning_content"]), q
        assert "x" not in q.split("?")[0] and "*" not in q  # level 2: no multiplication
