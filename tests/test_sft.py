"""SFT stage: assistant-only loss mask, memorisation + greedy reproduction, exact resume, named input
errors, and an output folder that nanoseek and transformers both load."""

import json
import math
from dataclasses import replace as dataclasses_replace
import shutil

import pytest
import torch

import nanoseek
from nanoseek import DeepSeekModel, ModelConfig
from nanoseek.data.corpus import embedded_corpus, embedded_sft_records
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.common import read_metrics
from nanoseek.train.sft import (SFTConfig, SFTStream, collate, masked_ce_sum, masked_router_stats, render_samples,
                                sft, shifted_targets)


def _tiny_model(vocab_size: int, tokenizer, seed: int = 0) -> DeepSeekModel:
    mc = ModelConfig.from_preset(
        "tiny", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_group=2, topk_group=1,
        num_experts_per_tok=2, max_position_embeddings=512, num_nextn_predict_layers=1,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(seed)
    model = DeepSeekModel(mc)
    model.init_weights(seed=seed)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and immune to oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny MoE+MTP model with a trained tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(embedded_corpus(200, seed=0), vocab_size=400)
    model = _tiny_model(int(math.ceil(tok.vocab_size / 64) * 64), tok)
    model.save_pretrained(folder)
    tok.save(str(folder))
    return folder


def _records(n=4, seed=1):
    return embedded_sft_records(n, seed=seed, langs=("en",), tasks=("arithmetic",), levels=(1,))


def _cfg(base, out, **kw):
    d = dict(out_dir=str(out), init_from=str(base), records=_records(), eval_fraction=0.0, steps=8, batch_size=4,
             lr=3e-3, warmup=0, schedule="constant", log_every=1, save_every=100, tensorboard=False, device="cpu")
    d.update(kw)
    return SFTConfig(**d)


# ---------------------------------------------------------------------------------------------- loss mask


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 + 3 = 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "The answer is 8.", "reasoning_content": "4 + 4 = 8"}]


def test_loss_mask_covers_exactly_the_assistant_tokens(base):
    tok = Tokenizer.load(str(base))
    model = nanoseek.from_pretrained(base, dtype=torch.float32)
    cfg = _cfg(base, base / "unused")
    (sample,), _ = render_samples([("chat", CHAT, None)], tok, cfg)
    batch = collate([sample], [[0]], tok.pad_id)
    tgt = shifted_targets(batch)
    # the targets are exactly the final turn after `<｜Assistant｜><think>`: reasoning, </think>, answer, EOS
    learned = tok.decode(tgt[tgt != -100])
    assert learned == "4 + 4 = 8</think>The answer is 8.<｜end▁of▁sentence｜>"
    with torch.no_grad():
        logits = model(batch.tokens[:, :-1]).logits
    base_loss = masked_ce_sum(logits, tgt)

    def loss_with_token_changed(j):  # change token j as a TARGET only (the logits stay those of the original)
        toks = batch.tokens.clone()
        toks[0, j] = (toks[0, j] + 1) % tok.vocab_size
        return masked_ce_sum(logits, shifted_targets(batch._replace(tokens=toks)))

    ids = batch.tokens[0].tolist()
    user_j = ids.index(tok.user_id) + 1  # first token of the first user message
    first_answer_j = max(i for i, t in enumerate(ids) if t == tok.assistant_id) + 3  # inside the final turn
    history_j = ids.index(tok.assistant_id) + 2  # first content token of the earlier assistant turn
    assert torch.equal(loss_with_token_changed(user_j), base_loss)
    assert torch.equal(loss_with_token_changed(history_j), base_loss)  # history turns untrained by default
    assert not torch.equal(loss_with_token_changed(first_answer_j), base_loss)

    # all_assistant_turns: the earlier turn's content + EOS count too (never its opening tags)
    (both,), _ = render_samples([("chat", CHAT, None)], tok, _cfg(base, base / "unused", all_assistant_turns=True))
    t2 = shifted_targets(collate([both], [[0]], tok.pad_id))
    assert tok.decode(t2[t2 != -100]) == ("The answer is 5.<｜end▁of▁sentence｜>"
                                          "4 + 4 = 8</think>The answer is 8.<｜end▁of▁sentence｜>")
    # MTP depth 1 (token i+2 from position i): the same assistant tokens, predicted one step earlier
    t1 = shifted_targets(batch, 1)
    assert torch.equal(t1[t1 != -100], tgt[tgt != -100])


def test_right_padding_and_packing_never_leak_into_real_tokens(base):
    """No attention mask is passed: a sample's loss is the same alone and right-padded next to a longer
    one; packed rows never score a target from another sample, at any MTP depth."""
    tok = Tokenizer.load(str(base))
    model = nanoseek.from_pretrained(base, dtype=torch.float32)
    samples, _ = render_samples([("r", r["messages"], None) for r in _records(3, seed=5)], tok, _cfg(base, base / "u"))
    samples.sort(key=lambda s: len(s.ids))
    with torch.no_grad():
        alone = collate(samples, [[0]], tok.pad_id)
        out_a = model(alone.tokens[:, :-1])
        la = masked_ce_sum(out_a.logits, shifted_targets(alone))
        padded = collate(samples, [[0], [2]], tok.pad_id)
        assert (padded.tokens[0] == tok.pad_id).sum() > 0
        out_p = model(padded.tokens[:, :-1])
        lp = masked_ce_sum(out_p.logits[:1], shifted_targets(padded)[:1])
    assert torch.allclose(la, lp, rtol=1e-5)
    # expert loads and the balance loss skip the pads: the padded row scores like the sample alone
    valid = padded.seg[:, :-1] >= 0
    load, _ = masked_router_stats(out_p.router[0], valid)
    assert load.sum() == valid.sum() * model.config.num_experts_per_tok
    _, bal = masked_router_stats(out_p.router[0], valid & torch.tensor([[True], [False]]))
    assert abs(float(bal) - float(out_a.router[0].balance_loss)) < 1e-4, (float(bal), float(out_a.router[0].balance_loss))

    packed = collate(samples, [[0, 1, 2]], tok.pad_id)
    for k in (0, 1, 2):
        own = sum(int((shifted_targets(collate(samples, [[i]], tok.pad_id), k) != -100).sum()) for i in range(3))
        assert int((shifted_targets(packed, k) != -100).sum()) == own

    stream = SFTStream(samples, batch_size=2, max_len=sum(len(s.ids) for s in samples[:2]), packing=True, seed=0,
                       pad_id=tok.pad_id)
    rows = stream.epoch_rows(0)
    assert sorted(i for r in rows for i in r) == [0, 1, 2] and len(rows) < 3  # every sample once, some shared
    assert rows == SFTStream(samples, 2, stream.max_len, True, 0, tok.pad_id).epoch_rows(0)  # deterministic


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cfg = _cfg(base, out, steps=60, lr=5e-3, warmup=5, schedule="cosine", log_every=5)
    return cfg, sft(cfg)


def _greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), mtp=False).logits[0, -1].argmax()))
    return ids


def test_short_sft_memorises_and_greedy_reproduces_the_answer(trained, base):
    cfg, folder = trained
    logs = [m for m in read_metrics(cfg.out_dir) if "loss" in m]
    assert logs[-1]["loss"] < 0.3 * logs[0]["loss"], (logs[0]["loss"], logs[-1]["loss"])
    assert logs[-1]["mtp_loss"] < logs[0]["mtp_loss"]  # the MTP module trains too
    assert all("tokens_per_s" in m and "lr" in m and m["truncated_frac"] == 0 for m in logs)
    assert "load_max_min_ratio" in logs[-1] and 0 < logs[-1]["balance_loss"]
    model = nanoseek.from_pretrained(folder, dtype=torch.float32)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the aux-loss-free bias moved (it starts at zero)
    assert model.mtp_layers[0].mlp.gate.e_score_correction_bias.abs().sum() > 0  # the MTP module's gate too

    tok = Tokenizer.load(str(folder))
    msgs = cfg.records[0]["messages"]
    prompt = tok.apply_chat_template(msgs[:-1], thinking=True, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, thinking=True, add_generation_prompt=False)
    assert full[: len(prompt)] == prompt
    n = 12
    assert _greedy(model, prompt, n)[len(prompt):] == full[len(prompt): len(prompt) + n]


def test_output_folder_loads_in_nanoseek_and_transformers(trained):
    import transformers

    _, folder = trained
    assert (folder / "tokenizer.json").exists() and not (folder / "trainer_state.pt").exists()
    ours = nanoseek.from_pretrained(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "Compute 1 + 2."}]
    ids = hf_tok.apply_chat_template(msgs, thinking=True, add_generation_prompt=True, return_dict=False)
    assert ids == Tokenizer.load(str(folder)).apply_chat_template(msgs, thinking=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x).logits - ref(x).logits).abs().max() < 1e-4


def test_resume_matches_an_uninterrupted_run(base, tmp_path):
    kw = dict(steps=None, epochs=5, batch_size=2, grad_accum=2, packing=True, max_len=200, records=_records(8, seed=3),
              eval_fraction=0.2, eval_every=2, warmup=1, schedule="cosine")
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full = sft(_cfg(base, full_dir, **kw))
    stopped = sft(_cfg(base, part_dir, stop_after=3, **kw))
    assert stopped.name == "step_0000003" and not (part_dir / "model").exists()
    resumed = sft(_cfg(base, part_dir, **kw))
    a, b = nanoseek.from_pretrained(full).state_dict(), nanoseek.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("e_score_correction_bias" in k for k in a)  # the MoE bias is part of what must match

    drop = ("time", "tokens_per_s")
    clean = lambda d: [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(d)]
    m_full, m_part = clean(full_dir), clean(part_dir)
    assert m_full == m_part
    assert any("eval_loss" in m for m in m_full)
    # resuming on other data is refused, not silently continued
    shutil.rmtree(part_dir / "model")
    with pytest.raises(ValueError, match="differs"):
        sft(_cfg(base, part_dir, **{**kw, "records": _records(8, seed=4)}))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_named_errors(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:3"):
        sft(_cfg(base, tmp_path / "o1", records=None, data=[str(bad)]))
    ends_with_user = tmp_path / "user_last.jsonl"
    ends_with_user.write_text(json.dumps(good) + "\n" + json.dumps({"messages": good["messages"][:1]}) + "\n")
    with pytest.raises(ValueError, match=f"{ends_with_user}:2.*assistant"):
        sft(_cfg(base, tmp_path / "o2", records=None, data=[str(ends_with_user)]))

    no_tok = tmp_path / "no_tok"
    shutil.copytree(base, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ValueError, match=f"tokenizer.json in {no_tok}"):
        sft(_cfg(base, tmp_path / "o3", init_from=str(no_tok)))
    with pytest.raises(ValueError, match=f"config.json in {tmp_path}"):
        sft(_cfg(base, tmp_path / "o4", init_from=str(tmp_path)))
    with pytest.raises(ValueError, match="init_from"):
        SFTConfig(out_dir=str(tmp_path / "o5"))
    with pytest.raises(ValueError, match="no SFT conversations"):  # never a silent fallback to embedded data
        sft(_cfg(base, tmp_path / "o8", records=[]))
    with pytest.raises(ValueError, match="max_len"):
        _cfg(base, tmp_path / "o6", max_len=4)
    with pytest.raises(ValueError, match="does_not_exist.jsonl"):
        _cfg(base, tmp_path / "o7", data=[str(tmp_path / "does_not_exist.jsonl")])


def test_sft_data_with_tool_calls_and_tools_renders_as_the_template(tmp_path):
    """A JSONL record with `tools` and a tool-call turn: the tool calls, the tool message and the tools section
    reach the rendered sample (nothing dropped on the way), with the template's loss mask; a bad tools entry is
    named by file:line."""
    from nanoseek.tokenizer import TOOL_CALLS_BEGIN, TOOLS_HEADER
    from nanoseek.tools import tool_schemas
    from nanoseek.train.sft import load_records

    tok = train_tokenizer(embedded_corpus(100, seed=0), vocab_size=300)
    tools = tool_schemas(["calculator"])
    call = {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": "12*34"})}}
    messages = [{"role": "user", "content": "What is 12*34?"},
                {"role": "assistant", "content": None, "reasoning_content": "Use the tool.", "tool_calls": [call]},
                {"role": "tool", "content": "408"},
                {"role": "assistant", "content": "The answer is 408.", "reasoning_content": "It says 408."}]
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": tools}) + "\n")
    cfg = SFTConfig(init_from=str(tmp_path), data=[str(path)], thinking=True)
    chats = load_records(cfg)
    assert chats[0][2] == tools and chats[0][1][1]["tool_calls"] == [call]
    samples, _ = render_samples(chats, tok, dataclasses_replace(cfg, max_len=4096))
    want_ids, want_mask = tok.encode_chat_with_mask(messages, thinking=True, tools=tools)
    assert samples[0].ids.tolist() == want_ids and samples[0].mask.tolist() == want_mask
    text = tok.decode(want_ids)
    assert TOOLS_HEADER.strip() in text and TOOL_CALLS_BEGIN in text and "408" in text
    begin = tok.tool_token_id(TOOL_CALLS_BEGIN)
    at = [i for i, t in enumerate(want_ids) if t == begin]
    assert len(at) == 2 and want_mask[at[0]] == 0 and want_mask[at[1]] == 1  # the tools section's format line; the
    # assistant's call, which the model learns to write
    path.write_text(json.dumps({"messages": messages, "tools": [{"type": "function"}]}) + "\n")
    with pytest.raises(ValueError, match=r"tools.jsonl:1: tools"):
        load_records(cfg)
