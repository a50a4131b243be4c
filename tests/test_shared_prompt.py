"""GRPO's shared-prompt training forward (nanoseek/train/shared_prompt.py): a group's completions packed behind
one copy of their prompt give the log-probs and gradients of one padded row per completion."""

import random

import pytest
import torch

import nanoseek
from nanoseek.tasks import get_task, sample_problem
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.common import read_metrics
from nanoseek.train.grpo import GRPOConfig, build_batch, grpo, policy_logprobs, rollout
from nanoseek.train.shared_prompt import pack, packed_mask


def _batch(micro_base, model, problems, G=4, **kw):
    tok = Tokenizer.load(micro_base)
    cfg = GRPOConfig(init_from=str(micro_base), prompts_per_step=len(problems), num_generations=G, max_tokens=12,
                     temperature=0.9, top_k=5, top_p=0.9, **kw)
    ro = rollout(model, tok, cfg, problems, step=0)
    moe = sum(1 for layer in model.model.layers[: model.config.num_hidden_layers] if getattr(layer, "is_moe", False))
    k = getattr(model.config, "num_experts_per_tok", 1)
    return cfg, tok, build_batch(ro["seqs"], tok.pad_id, moe, k, cfg.keep_sampling_mask, cfg.keep_routing and moe > 0)


def _problems(n, seed=0, repeat=None):
    rng = random.Random(seed)
    out = [sample_problem(get_task("arithmetic"), rng, 1, "en") for _ in range(n)]
    return out + [out[0]] if repeat else out  # the same problem twice: two groups with one prompt


def _logp_and_grads(model, batch, rows, cfg, packed):
    model.zero_grad()
    logp, _ = policy_logprobs(model, batch, rows, cfg.temperature, forced=True, sampling_mask=True, packed=packed)
    (logp * batch["mask"][rows]).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, cfg, batch, pad_id, rows):
    packed = pack(batch, rows, pad_id)
    assert packed["ids"].shape[0] < len(rows)  # groups were shared
    a, ga = _logp_and_grads(model, batch, rows, cfg, None)
    b, gb = _logp_and_grads(model, batch, rows, cfg, packed)
    m = batch["mask"][rows].bool()
    assert m.sum() > 20
    assert (a - b)[m].abs().max() < 1e-5
    assert (a - batch["old"][rows])[m].abs().max() < 1e-4  # both are the sampler's own log-probs
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:  # float sums in another order: relative to the gradient's size
        assert (ga[name] - gb[name]).norm() <= 1e-5 * ga[name].norm() + 1e-7, name
    return packed


def test_packed_moe_forward_equals_one_row_per_completion_with_keep_routing(micro_base):
    """MoE (keep routing replayed at prompt and completion positions), top-k/top-p sampling masks, the same
    problem twice (its two groups pack into one row), minibatches that cut a group."""
    model = nanoseek.from_pretrained(micro_base)
    cfg, tok, batch = _batch(micro_base, model, _problems(3, repeat=True))
    assert batch["routing"] and (batch["routing"][0] >= 0).any()
    rows = torch.arange(batch["ids"].shape[0])
    packed = _compare(model, cfg, batch, tok.pad_id, rows)
    assert packed["ids"].shape[0] == 3  # 4 groups, 3 distinct prompts
    _compare(model, cfg, batch, tok.pad_id, rows[2:11])  # a minibatch that starts and ends inside groups
    # the packed rows hold each prompt once: P + sum(L_i) real positions per packed row
    real = packed["mask"].diagonal(dim1=1, dim2=2) & (packed["ids"] != tok.pad_id)
    want = sum(int(batch["completion_len"][n]) for n in rows) + sum(
        int(batch["prompt_len"][n]) for n in (0, 4, 8))
    assert int(real.sum()) <= want and int(real.sum()) > want - 3 * 2  # pad-id tokens inside rows aside


def test_packed_forward_on_a_dense_and_a_sparse_attention_model(micro_base):
    """The dense Qwen2-style model (GQA, its own mask path) and a DSA model (the indexer's top-k over the
    visible keys only) give the unpacked log-probs too."""
    from oracle import random_model, tiny_config

    from nanoseek.model.dense import DenseConfig, DenseModel

    V = Tokenizer.load(micro_base).vocab_size
    torch.manual_seed(0)
    dense = DenseModel(DenseConfig.from_preset("student-tiny", vocab_size=V))
    cfg, tok, batch = _batch(micro_base, dense, _problems(2))
    _compare(dense, cfg, batch, tok.pad_id, torch.arange(batch["ids"].shape[0]))
    sparse = random_model(tiny_config(vocab_size=V, index_topk=4), seed=2)
    cfg, tok, batch = _batch(micro_base, sparse, _problems(2))
    _compare(sparse, cfg, batch, tok.pad_id, torch.arange(batch["ids"].shape[0]))


def test_packed_mask_keeps_completions_apart():
    # one packed row: prompt of 3 (segment 0), a completion of 2 (segment 1), one of 2 (segment 2), 1 pad
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, -1]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 0]])
    m = packed_mask(seg, pos)[0]
    assert m[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # completion 2's first token: the prompt and itself
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert m[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # the prompt is causal
    assert m[7].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]  # padding sees padding only


def test_a_three_d_mask_must_be_bool_and_the_right_shape(micro_base):
    model = nanoseek.from_pretrained(micro_base)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="3-D attention_mask"):
        model(ids, attention_mask=torch.ones(1, 4, 5, dtype=torch.bool), mtp=False)
    with pytest.raises(ValueError, match="MTP"):
        model(ids, attention_mask=torch.ones(1, 4, 4, dtype=torch.bool), mtp=True)


def test_grpo_with_and_without_the_shared_prompt_forward_trains_the_same_weights(micro_base, tmp_path):
    kw = dict(init_from=str(micro_base), steps=2, prompts_per_step=3, num_generations=4, max_tokens=12, lr=1e-3,
              adam_epsilon=1e-3, eval_every=100, eval_problems=2, tensorboard=False, minibatch_size=6, levels=[1],
              seed=1, reward_weights={})

    def longer(prompt, completion, problem):  # every group has spread: every row trains
        return len(completion) / 40

    outs, metrics = {}, {}
    for share in (True, False):
        out = grpo(GRPOConfig(out_dir=str(tmp_path / str(share)), share_prompt=share, **kw),
                   extra_rewards={"longer": longer})
        outs[share] = nanoseek.from_pretrained(out).state_dict()
        metrics[share] = [r for r in read_metrics(out.parent) if "loss" in r]
    assert [r["loss"] for r in metrics[True]] == pytest.approx([r["loss"] for r in metrics[False]], abs=1e-5)
    init = nanoseek.from_pretrained(micro_base).state_dict()
    assert any(not torch.equal(outs[True][k], init[k]) for k in init)  # it did train
    for k in init:
        assert torch.allclose(outs[True][k], outs[False][k], atol=1e-5), k
