"""GRPO (and eval) with any model, any prompt and any reward, as a TRL user brings them: a Qwen2 folder written by
transformers with a character tokenizer that has none of DeepSeek's special tokens, raw prompts, a TRL-signature
reward reading an extra JSONL column, `--jsonl` alone with an explicit held-out file, TRL's option names, the
optimizer settings, and the resume line; through the Python API and the CLI."""

import json
import random

import pytest
import torch

from nanoseek.tasks import Problem, load_jsonl_task, split_problems
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.common import read_metrics
from nanoseek.train.grpo import GRPOConfig, TRL_NAMES, draw_problems, grpo, resolve_rewards
from nanoseek.train.rewards import accuracy_reward, combine_rewards, is_batched_reward, parse_reward_specs

CHARS = list("0123456789+-=?:. QAab\n")


@pytest.fixture(autouse=True)
def _restore_task_registry():
    """grpo / eval register the user's JSONL task globally: leave the registry as it was for other test files."""
    from nanoseek.tasks import TASKS

    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)
SPECIALS = ["<pad>", "<eos>"]


def _char_tokenizer(folder, add_bos: bool = False):
    """A character-level tokenizer.json without DeepSeek's tokens, plus a tokenizer_config.json naming its eos/pad."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    vocab = {t: i for i, t in enumerate(SPECIALS + ["<s>", "<unk>"] + CHARS)}
    tok = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + ["<s>"]])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<s>", "add_bos_token": add_bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return len(vocab)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny Qwen2 folder written by transformers' Qwen2ForCausalLM.save_pretrained, with a character tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("qwen2")
    V = _char_tokenizer(folder)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=1, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(folder))
    return folder


REWARD_MODULE = '''
SEEN = {"calls": 0}

def first_digit_matches(prompts, completions, target, completion_ids, **kwargs):
    """TRL signature: `target` is an extra JSONL column; kwargs hold the other columns and trainer_state."""
    assert len(target) == len(completions) == len(prompts) == len(completion_ids)
    assert all(isinstance(ids, list) for ids in completion_ids)
    assert all(p.endswith("=") for p in prompts), prompts  # only the user's file is trained on
    SEEN["calls"] += 1
    return [float(c.strip()[:1] == t[:1]) + 0.01 * len(c) for c, t in zip(completions, target)]
'''


def _data(tmp_path):
    rng = random.Random(0)
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    rows = lambda n: "".join(json.dumps({"prompt": f"{a}+{b}=", "target": str(a + b)}) + "\n"
                             for a, b in ((rng.randrange(10), rng.randrange(10)) for _ in range(n)))
    train.write_text(rows(6))
    held.write_text(rows(2))
    return train, held


def _reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import my_rewards_mod

    return importlib.reload(my_rewards_mod)


# ---------------------------------------------------------------------------------------------- end to end


def test_grpo_on_a_transformers_qwen2_folder_with_raw_prompts_and_a_trl_reward(qwen_dir, tmp_path, monkeypatch):
    from nanoseek.model import DenseModel, load_model

    mod = _reward_module(tmp_path, monkeypatch)
    train, held = _data(tmp_path)
    cfg = GRPOConfig(init_from=str(qwen_dir), out_dir=str(tmp_path / "api"), jsonl=str(train), eval_jsonl=str(held),
                     prompt_format="raw", thinking=False, steps=2, prompts_per_step=2, num_generations=2, max_tokens=4,
                     lr=1e-3, eval_every=2, tensorboard=False, save_every=100)
    assert cfg.tasks == []  # --jsonl alone: no built-in task mixed in
    out = grpo(cfg, extra_rewards={"digit": mod.first_digit_matches})
    assert mod.SEEN["calls"] >= 2
    m = read_metrics(out.parent)
    steps = [r for r in m if "reward" in r]
    assert len(steps) == 2 and all("reward_digit" in r for r in steps)
    evals = [r for r in m if "eval_reward" in r]  # the held-out file, scored with the user's reward
    assert [r["step"] for r in evals] == [0, 2]
    assert isinstance(load_model(out), DenseModel)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert Tokenizer.load(out).eos_id == 1  # the tokenizer's own config travels with the model
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(str(out))  # still a transformers folder


def test_grpo_cli_with_reward_module_aliases_and_resume(qwen_dir, tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main

    _reward_module(tmp_path, monkeypatch)
    train, held = _data(tmp_path)
    args = ["grpo", "--init-from", str(qwen_dir), "--output_dir", str(tmp_path / "cli"), "--jsonl", str(train),
            "--eval-jsonl", str(held), "--no-chat-template", "--no-thinking", "--reward",
            "my_rewards_mod:first_digit_matches=2.0", "--num_generations", "2", "--per_device_train_batch_size", "4",
            "--max_completion_length", "4", "--learning_rate", "1e-3", "--adam-beta2", "0.99", "--epsilon", "0.1",
            "--save-every", "100", "--no-tensorboard"]
    assert main(args + ["--max_steps", "2"]) == 0
    saved = json.loads((tmp_path / "cli" / "grpo_config.json").read_text())
    assert saved["prompt_format"] == "raw" and saved["tasks"] == [] and saved["prompts_per_step"] == 2
    assert saved["max_tokens"] == 4 and saved["adam_beta2"] == 0.99 and saved["eps_low"] == 0.1
    m = [r for r in read_metrics(tmp_path / "cli") if "reward" in r]
    assert len(m) == 2 and "reward_first_digit_matches" in m[0]
    capsys.readouterr()
    assert main(args + ["--max_steps", "3"]) == 0
    assert f"resuming grpo from step 2 in {tmp_path / 'cli'}" in capsys.readouterr().err
    state = torch.load(tmp_path / "cli" / "checkpoints" / "step_0000003" / "trainer_state.pt", weights_only=True)
    assert all(g["betas"] == (0.9, 0.99) for g in state["optimizer"]["param_groups"])


def test_eval_command_and_engine_take_the_qwen2_folder_raw(qwen_dir, tmp_path):
    from nanoseek.train.evaluate import EvalConfig, evaluate

    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    res = evaluate(EvalConfig(model=str(qwen_dir), tasks=[], jsonl=str(path), prompt_format="raw", k=1,
                              max_tokens=3, temperature=0.0))
    assert res["num_problems"] == 1 and 0.0 <= res["pass@1"] <= 1.0


# ---------------------------------------------------------------------------------------------- pieces


def test_tokenizer_without_deepseek_tokens_works_raw_and_names_the_fix_for_chat(tmp_path):
    _char_tokenizer(tmp_path)
    tok = Tokenizer.load(str(tmp_path))
    assert not tok.has_chat_template
    assert tok.eos_id == 1 and tok.pad_id == 0 and tok.bos_id == 2
    assert tok.decode(tok.encode_prompt("Q: 1+2=")) == "Q: 1+2="
    assert tok.encode_prompt("1+2=") == tok.encode("1+2=")  # no BOS: the config does not add one
    with pytest.raises(ValueError, match="no-chat-template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    _char_tokenizer(tmp_path / "bos", add_bos=True)
    tb = Tokenizer.load(str(tmp_path / "bos"))
    assert tb.encode_prompt("1+2=") == [2] + tb.encode("1+2=")


def test_raw_prompt_ids_are_the_text_as_is(tmp_path):
    from nanoseek.train.evaluate import prompt_ids

    _char_tokenizer(tmp_path)
    tok = Tokenizer.load(str(tmp_path))
    p = Problem("t", 1, "en", "Q: 3+4= A:", "7")
    assert prompt_ids(tok, p, thinking=False, prompt_format="raw") == tok.encode("Q: 3+4= A:")


def test_load_model_dispatches_on_model_type(qwen_dir, tmp_path):
    from nanoseek.model import DenseModel, load_model

    assert isinstance(load_model(qwen_dir), DenseModel)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2"):
        load_model(tmp_path)


def test_accuracy_reward_takes_a_bare_answer_when_no_sentence_is_asked_for():
    assert accuracy_reward(" 5\nQ: 3+4= A: 7", "5", thinking=False) == 0.0  # sentence mode: explicit answers only
    assert accuracy_reward(" 5\nQ: 3+4= A: 7", "5", thinking=False, bare=True) == 1.0  # first line
    assert accuracy_reward("2+3 = 5", "5", thinking=False, bare=True) == 1.0
    assert accuracy_reward("5 apples, not 6", "5", thinking=False, bare=True) == 1.0  # first number
    assert accuracy_reward("6 5", "5", thinking=False, bare=True) == 0.0  # one try: the first number
    assert accuracy_reward("The answer is 4. 5", "5", thinking=False, bare=True) == 0.0  # an explicit answer wins


def test_trl_batched_rewards_get_every_column_and_none_is_skipped():
    seen = {}

    def trl(prompts, completions, **kw):
        seen.update(kw)
        return [1.0, None]

    def per_sample(prompt, completion, problem):
        return 0.5

    assert is_batched_reward(trl) and not is_batched_reward(per_sample)
    probs = [Problem("jsonl:x", 1, "en", "p", "", {"columns": {"target": "a", "src": 1}}),
             Problem("jsonl:x", 1, "en", "q", "", {"columns": {"target": "b"}})]
    r = combine_rewards({}, {"trl": trl, "ps": per_sample})
    totals, comps = r.batch(["p", "q"], ["x", "y"], probs, completion_ids=[[1], [2]])
    assert totals == [1.5, 0.5] and comps["ps"] == [0.5, 0.5]
    assert seen["target"] == ["a", "b"] and seen["src"] == [1, None] and seen["completion_ids"] == [[1], [2]]


def test_reward_specs_and_auto_weights(tmp_path, monkeypatch):
    _reward_module(tmp_path, monkeypatch)
    w, extra = parse_reward_specs(["my_rewards_mod:first_digit_matches=0.5", "accuracy"], None)
    assert w == {"first_digit_matches": 0.5, "accuracy": 1.0} and list(extra) == ["first_digit_matches"]
    cfg = GRPOConfig(reward_funcs=["my_rewards_mod:first_digit_matches", "format"], reward_weights=[2.0, 0.1])
    assert resolve_rewards(cfg)[0] == {"first_digit_matches": 2.0, "format": 0.1}
    assert resolve_rewards(GRPOConfig())[0] == {"accuracy": 1.0, "format": 0.2}
    assert resolve_rewards(GRPOConfig(prompt_format="raw"))[0] == {"accuracy": 1.0}  # bare answers: no format
    assert resolve_rewards(GRPOConfig(), {"mine": lambda p, c, q: 0.0})[0] == {}  # only the user's reward


def test_jsonl_alone_draws_every_line_and_the_split_is_explicit(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i), "hint": i}) + "\n" for i in range(16)))
    task = load_jsonl_task(str(path))
    assert task.problems[3].meta["columns"] == {"hint": 3}
    cfg = GRPOConfig(jsonl=str(path), prompts_per_step=8)
    assert cfg.tasks == []
    drawn = {p.prompt for s in range(40) for p in draw_problems(cfg, s, [task])}
    assert drawn == {f"p{i}" for i in range(16)}  # no line silently held out
    train, held = split_problems(task.problems, 0.25, seed=0)
    assert len(held) == 4 and len(train) == 12 and not {p.prompt for p in held} & {p.prompt for p in train}
    with pytest.raises(ValueError, match="needs jsonl"):
        GRPOConfig(eval_fraction=0.1)
    assert GRPOConfig(jsonl=str(path), tasks=["arithmetic"]).tasks == ["arithmetic"]  # mixing is asked for


def test_trl_names_map_onto_nanoseek_options():
    from nanoseek.cli import _aliases

    cfg = GRPOConfig.from_trl(max_completion_length=7, epsilon=0.1, mask_truncated_completions=True,
                              per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
                              learning_rate=1e-4, max_grad_norm=0.5, adam_beta1=0.8, adam_beta2=0.99,
                              adam_epsilon=1e-6, weight_decay=0.01, scale_rewards=False, loss_type="dapo", beta=0.0)
    assert (cfg.max_tokens, cfg.eps_low, cfg.eps_high, cfg.mask_truncated) == (7, 0.1, 0.1, True)
    assert (cfg.prompts_per_step, cfg.lr, cfg.grad_clip, cfg.scale_rewards) == (4, 1e-4, 0.5, "none")
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == (0.8, 0.99, 1e-6, 0.01)
    assert GRPOConfig.from_dict({"epsilon_high": 0.3, "num_generations": 2}).eps_high == 0.3
    with pytest.raises(ValueError, match="report_to"):
        GRPOConfig.from_trl(report_to="none")
    assert {k: v for k, v in _aliases(GRPOConfig).items() if k in TRL_NAMES} == TRL_NAMES  # the CLI takes them all


def test_eval_every_zero_turns_evaluation_off(qwen_dir, tmp_path):
    train, held = _data(tmp_path)
    out = grpo(GRPOConfig(init_from=str(qwen_dir), out_dir=str(tmp_path / "r"), jsonl=str(train),
                          eval_jsonl=str(held), prompt_format="raw", steps=1, prompts_per_step=2, num_generations=2,
                          max_tokens=3, eval_every=0, tensorboard=False),
               extra_rewards={"len": lambda p, c, q: len(c) / 3})
    m = read_metrics(out.parent)
    assert m and not any(k.startswith("eval_") for r in m for k in r)


def test_sft_takes_the_qwen2_folder_with_raw_prompts(qwen_dir, tmp_path):
    from nanoseek.train.sft import SFTConfig, sft

    records = [{"messages": [{"role": "user", "content": f"{a}+1="},
                             {"role": "assistant", "content": str(a + 1)}]} for a in range(8)]
    out = sft(SFTConfig(init_from=str(qwen_dir), out_dir=str(tmp_path / "sft"), records=records,
                        prompt_format="raw", steps=2, warmup=0, batch_size=4, tensorboard=False))
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    with pytest.raises(ValueError, match="no-chat-template"):
        sft(SFTConfig(init_from=str(qwen_dir), out_dir=str(tmp_path / "sft2"), records=records, steps=1, warmup=0,
                      tensorboard=False))
