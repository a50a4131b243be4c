"""Paths that the full-forward parity tests (test_model.py) do not reach, each against an oracle that is not
nanoseek itself:

- cached / absorbed generation (LatentCache decode, the Engine's greedy generate, FastDecoder) against
  transformers' DeepseekV3ForCausalLM / DeepseekV32ForCausalLM `generate(do_sample=False)` (its DynamicCache path);
- the MTP modules (`model(ids, mtp=True).mtp_logits`, `lm_losses`, `mtp_loss`, `model.mtp_step`) against a
  written-out transcription of the V3 report's equations (21)-(25), with the transformer block TRM_k and the
  main model's representation h^0 taken from transformers.

All in fp32 on tiny random configs (tests/oracle.py); logits within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.fast_decode import FastDecoder
from nanoseek.checkpoint import to_hf_state_dict
from nanoseek.train.pretrain import lm_losses, mtp_loss
from oracle import YARN, hf_model, random_model, tiny_config

TOL = 1e-4


def _hf_greedy(ref, prompt: torch.Tensor, n: int):
    """transformers' greedy generate with its KV cache: (new tokens (B, n), per-step logits (B, n, V))."""
    ref.generation_config.eos_token_id = None  # run all n steps
    ref.generation_config.pad_token_id = 0
    with torch.no_grad():
        g = ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True)
    return g.sequences[:, prompt.shape[1]:], torch.stack(g.logits, dim=1)


# ---------------------------------------------------------------------------------------- cached generation

CACHED_CASES = {
    "v3": {},
    "no_q_lora_yarn": dict(q_lora_rank=None, rope_scaling=YARN),
    "one_expert_per_token": dict(num_experts_per_tok=1, n_group=1, topk_group=1),
    # DeepseekV32ForCausalLM: cached indexer keys too. 32 indexer heads: a score sum_h w_h ReLU(q_h . k) is exactly
    # 0 only when every head's ReLU is 0 (~2^-32 here, ~2^-8 at 8 heads), and at an exact tie on the top-k
    # boundary the choice is each implementation's tie rule (torch.topk's in transformers), not the maths
    "dsa_topk_below_context": dict(index_topk=6, index_n_heads=32),
}


@pytest.mark.parametrize("prefill_absorb", [False, True])
@pytest.mark.parametrize("case", sorted(CACHED_CASES))
def test_cached_absorbed_decode_matches_transformers_generate(case, prefill_absorb):
    """Prefill into a LatentCache, then one token at a time in absorbed mode (W_UK / W_UV folded, attention over
    the cached latents): the logits of every step equal transformers' greedy generate over its DynamicCache."""
    cfg = tiny_config(num_nextn_predict_layers=0, **CACHED_CASES[case])
    model = random_model(cfg, seed=21)
    ref = hf_model(model)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    n = 8
    want_ids, want_logits = _hf_greedy(ref, prompt, n)
    cache = model.new_cache(2, prompt.shape[1] + n, num_layers=cfg.num_hidden_layers)
    P = prompt.shape[1]
    got = []
    with torch.no_grad():
        out = model(prompt, positions=torch.arange(P).expand(2, P), cache=cache, absorb=prefill_absorb)
        got.append(out.logits[:, -1])
        for t in range(n - 1):
            tok = want_ids[:, t:t + 1]  # transformers' own greedy tokens (checked equal below)
            out = model(tok, positions=torch.full((2, 1), P + t), cache=cache, absorb=True)
            got.append(out.logits[:, -1])
    got = torch.stack(got, dim=1)
    assert (got - want_logits).abs().max().item() < TOL
    assert torch.equal(got.argmax(-1), want_ids)


# FastDecoder does not run DSA models (fast_decode.unsupported_reason; tested in test_fast_decode), so the DSA
# case runs with the model's own absorbed forward only
@pytest.mark.parametrize("case,fast_decode", [("v3", False), ("v3", True), ("one_expert_per_token", False),
                                              ("one_expert_per_token", True), ("dsa_topk_below_context", False)])
def test_engine_greedy_matches_transformers_generate(case, fast_decode):
    """The Engine batches prompts of different lengths (rows at different positions, more prompts than slots)
    and decodes with the model's absorbed forward or FastDecoder; each prompt's tokens and log-probs (the
    chosen token's and the top 20 of every step) equal transformers' generate on that prompt alone."""
    cfg = tiny_config(num_nextn_predict_layers=0, **CACHED_CASES[case])
    model = random_model(cfg, seed=22)
    ref = hf_model(model)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 2)]
    n = 7
    params = SamplingParams(max_tokens=n, temperature=0, logprobs=True, top_logprobs=20)
    eng = Engine(model, max_batch_size=2, max_len=24, eos_token_ids=[], fast_decode=fast_decode)
    assert (eng.fast is not None) == fast_decode
    outs = eng.generate(prompts, params)
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        want_ids, want_logits = _hf_greedy(ref, torch.tensor([p]), n)
        lp = torch.log_softmax(want_logits[0], dim=-1)  # (n, V)
        assert c.token_ids == want_ids[0].tolist()
        assert (torch.tensor(c.logprobs) - lp.gather(1, want_ids[0].unsqueeze(1)).squeeze(1)).abs().max() < TOL
        for step, top in enumerate(c.top_logprobs):
            ids = torch.tensor([i for i, _ in top])
            assert (torch.tensor([v for _, v in top]) - lp[step, ids]).abs().max() < TOL


# ---------------------------------------------------------------------------------------- MTP, V3 eq. (21)-(25)


def _rms_norm(x, w, eps):
    """RMSNorm written out: w * x / sqrt(mean(x^2) + eps)."""
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _hf_with_mtp_blocks(model):
    """transformers DeepseekV3ForCausalLM with N + D decoder layers: layers N..N+D-1 hold the MTP modules'
    transformer blocks TRM_k (attention + MoE), so TRM_k is transformers' DeepseekV3DecoderLayer, not nanoseek's."""
    import transformers

    cfg = model.config
    N, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    d = cfg.to_hf_dict()
    for k in ("architectures", "model_type", "rope_scaling", "quantization_config", "torch_dtype", "scoring_func",
              "topk_method", "moe_layer_freq", "num_nextn_predict_layers"):
        d.pop(k, None)
    d["num_hidden_layers"] = N + D
    hf_cfg = transformers.DeepseekV3Config(**d, num_mtp_layers=0)
    hf_cfg._attn_implementation = "eager"
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    def mtp_only(k):  # the MTP module's own tensors (not its decoder block's)
        parts = k.split(".", 3)
        own = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")
        return int(parts[2]) >= N and parts[3].startswith(own)

    sd = {k: v for k, v in to_hf_state_dict(model).items()
          if ".experts." not in k and not (k.startswith("model.layers.") and mtp_only(k))}
    sd.update({k: v for k, v in model.state_dict().items() if ".experts." in k})  # fused, as transformers holds them
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    return ref


def _mtp_transcription(model, main_ref, blocks_ref, ids: torch.Tensor) -> list[torch.Tensor]:
    """Depth-k MTP logits for inputs ids (B, T), k = 1..D, written out from the V3 report (sec. 2.2):

    (21) h'_i^k = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))]
    (22) h_{1:T-k}^k = TRM_k(h'_{1:T-k}^k)
    (23) P_{i+k+1}^k = OutHead(h_i^k)

    Order of the concatenation in (21): the report writes [h; emb], but the published checkpoints are used with
    eh_proj(cat(enorm(emb), hnorm(h))) - embedding FIRST - by vLLM (vllm/model_executor/models/deepseek_mtp.py,
    DeepSeekMultiTokenPredictorLayer.forward) and SGLang; the weights (eh_proj's column halves) define the order,
    so we transcribe [RMSNorm(Emb); RMSNorm(h)].
    h^0 is "the representation given by the main model": the final-norm output that the main OutHead reads
    (transformers' last_hidden_state from main_ref, as vLLM passes it). OutHead in the report "linearly maps the
    representation to logits" (then Softmax), so the checkpoint's shared_head.norm belongs to the representation:
    h^k = shared_head.norm(TRM_k(h'^k)), and depth k+1 reads that normalised h^k (the same rule as h^0)."""
    cfg = model.config
    N, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    B, T = ids.shape
    E = model.model.embed_tokens.weight  # shared embedding
    W_out = model.lm_head.weight  # shared output head
    with torch.no_grad():
        h = main_ref.model(ids).last_hidden_state  # h^0 (B, T, D), transformers' main model
        logits = []
        for k in range(1, cfg.num_nextn_predict_layers + 1):
            mod = model.mtp_layers[k - 1]
            n = T - k
            emb = E[ids[:, k:]]  # Emb(t_{i+k}) for i = 0..T-k-1
            x = torch.cat([_rms_norm(emb, mod.enorm.weight, eps), _rms_norm(h[:, :n], mod.hnorm.weight, eps)], -1)
            h_in = x @ mod.eh_proj.weight.T  # (21): M_k in R^{d x 2d}
            pos = torch.arange(n).unsqueeze(0)
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]  # causal, additive (eager attention)
            blk = blocks_ref.model.layers[N + k - 1]  # TRM_k: transformers' decoder layer, MTP block's weights
            h_blk = blk(h_in, attention_mask=mask, position_ids=pos,
                        position_embeddings=blocks_ref.model.rotary_emb(h_in, pos))  # (22)
            h = _rms_norm(h_blk, mod.shared_head.norm.weight, eps)  # h^k
            logits.append(h @ W_out.T)  # (23), before the Softmax
    return logits


MTP_CASES = {"two_depths": {}, "two_depths_no_q_lora_one_expert": dict(q_lora_rank=None, num_experts_per_tok=1)}


@pytest.mark.parametrize("case", sorted(MTP_CASES))
def test_mtp_logits_and_losses_match_v3_equations_21_to_25(case):
    cfg = tiny_config(num_nextn_predict_layers=2, **MTP_CASES[case])
    model = random_model(cfg, seed=23)
    tokens = torch.randint(0, cfg.vocab_size, (2, 15), generator=torch.Generator().manual_seed(5))
    ids = tokens[:, :-1]  # inputs t_1..t_T; tokens also holds the last target
    B, T = ids.shape
    want = _mtp_transcription(model, hf_model(model), _hf_with_mtp_blocks(model), ids)
    with torch.no_grad():
        out = model(ids, mtp=True)
    assert len(out.mtp_logits) == 2
    for k, (got, w) in enumerate(zip(out.mtp_logits, want), start=1):
        assert got.shape == (B, T - k, cfg.vocab_size)
        assert (got - w).abs().max().item() < TOL, k
    # (24) L^k = -1/T sum_{i=2+k}^{T+1} log P_i^k[t_i]: position i of depth k predicts token i+k+1 (0-based).
    # The report divides by T although the sum has T-k terms; nanoseek's lm_losses takes the mean over the T-k
    # targets (as Megatron-LM's MTP loss does, and as doc-boundary masking needs): L^k = (T-k)/T * lm_losses_k.
    paper = []
    for k, w in enumerate(want, start=1):
        logp = torch.log_softmax(w, dim=-1).gather(-1, tokens[:, k + 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-k)
        paper.append(-logp.sum(1).mean() / T)  # per sequence, then the batch mean
    _, ours = lm_losses(model, out, tokens, None)
    for k, (p, o) in enumerate(zip(paper, ours), start=1):
        assert abs(p.item() - (T - k) / T * o.item()) < TOL, k
    # (25) L_MTP = lambda / D * sum_k L^k, the objective pretrain adds to the main loss
    lam = 0.3
    per_target = [-torch.log_softmax(w, -1).gather(-1, tokens[:, k + 1:].unsqueeze(-1)).mean()
                  for k, w in enumerate(want, start=1)]
    assert abs(mtp_loss(ours, lam).item() - lam / len(want) * sum(x.item() for x in per_target)) < TOL


@torch.no_grad()
def test_mtp_step_at_depth_one_matches_v3_equations_with_and_without_cache():
    """The speculative-decoding path: `model.mtp_step(1, ...)` (and FastDecoder's) over a whole span without a
    cache, and with a LatentCache filled span by span then one position at a time in absorbed mode (how
    speculative_generate drives it), equals the written-out depth-1 logits."""
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = random_model(cfg, seed=24)
    main_ref = hf_model(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 14), generator=torch.Generator().manual_seed(6))
    T = ids.shape[1]
    want = _mtp_transcription(model, main_ref, _hf_with_mtp_blocks(model), ids)[0]  # (1, T-1, V)
    h0 = main_ref.model(ids).last_hidden_state  # h^0 from transformers

    logits, _ = model.mtp_step(1, h0[:, :-1], ids[:, 1:], torch.arange(T - 1).unsqueeze(0))
    assert (logits - want).abs().max().item() < TOL

    fast = FastDecoder(model)
    for use_fast in (False, True):
        cache = model.new_cache(1, T + 2)  # every layer, MTP modules included
        P = 6
        model(ids[:, :P], positions=torch.arange(P).unsqueeze(0), cache=cache)  # main layers' cache
        rows = []
        lg, _ = model.mtp_step(1, h0[:, :P - 1], ids[:, 1:P], torch.arange(P - 1).unsqueeze(0), cache=cache)
        rows.append(lg)
        for p in range(P - 1, T - 1):  # then one position at a time, as in drafting
            pos = torch.tensor([[p]])
            if use_fast:
                lg, _ = fast.mtp_step(1, h0[:, p:p + 1], ids[:, p + 1:p + 2], pos, cache)
                lg = lg.reshape(1, 1, -1)
            else:
                lg, _ = model.mtp_step(1, h0[:, p:p + 1], ids[:, p + 1:p + 2], pos, cache=cache, absorb=True)
            rows.append(lg)
        got = torch.cat(rows, dim=1)
        assert (got - want).abs().max().item() < TOL, use_fast
