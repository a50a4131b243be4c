"""Training precision (nanoseek.precision): bf16 weights between steps with fp32 master weights and fp32
AdamW state, fp32 router, loss close to fp32's, bit-exact resume at bf16, fp32 checkpoints."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import DeepSeekModel, ModelConfig
from nanoseek import precision as P
from nanoseek.train.common import make_optimizer, read_metrics
from nanoseek.train.pretrain import PretrainConfig, lm_losses, pretrain

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain import MICRO, micro_cfg  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed=0):
    cfg = ModelConfig.from_preset("tiny", **MICRO, vocab_size=128, num_nextn_predict_layers=1)
    torch.manual_seed(seed)
    model = DeepSeekModel(cfg)
    model.init_weights(seed=seed)
    return model.train()


def _step(model, opt, x):
    out = model(x[:, :-1], mtp=True)
    main, mtp = lm_losses(model, out, x, None)
    (main + 0.3 * torch.stack(mtp).mean() + 1e-4 * out.balance_loss).backward()
    P.clip_grad_norm_(model, opt, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return main.item()


def test_resolve_maps_the_config_fields():
    assert P.resolve("auto", "auto", False, "cpu") == "fp32"  # today's CPU numbers
    assert P.resolve("auto", "auto", False, "cuda") == "amp"  # today's GPU behaviour (bf16 autocast)
    assert P.resolve("bf16", "auto", False, "cpu") == "bf16"
    assert P.resolve("auto", "bfloat16", False, "cpu") == "bf16"  # deprecated alias
    assert P.resolve("auto", "float32", False, "cuda") == "fp32"
    assert P.resolve("auto", "auto", True, "cpu") == "fp8"  # the old fp8 switch
    with pytest.raises(ValueError, match="precision"):
        P.resolve("fp16")
    with pytest.raises(ValueError, match="precision"):
        PretrainConfig(precision="half")


def test_bf16_keeps_bf16_weights_fp32_masters_and_an_fp32_router():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, ctx = P.prepare(model, lambda named: make_optimizer(model, 1e-3, params=named), "bf16")
    assert isinstance(opt, P.MasterWeights)
    gates = {n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert len(gates) == 2  # a MoE layer and the MTP module's
    fp32 = gates  # the router stays fp32
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in fp32 else torch.bfloat16), n
    for b in (m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")):
        assert b.dtype == torch.float32
    # masters: fp32, exactly the fp32 weights the model started from; every optimised tensor is fp32
    masters = {id(p): m for p, m in opt.pairs}
    for n, p in model.named_parameters():
        if n not in fp32:
            assert masters[id(p)].dtype == torch.float32 and torch.equal(masters[id(p)], before[n]), n
    assert all(q.dtype == torch.float32 for q in opt.params())
    assert len(opt.params()) == sum(1 for _ in model.parameters())
    assert model(torch.randint(0, 128, (1, 9)), mtp=False).logits.dtype == torch.bfloat16


def test_bf16_with_an_fp32_head_gives_fp32_logits():
    model = _model()
    opt = P.MasterWeights(model, lambda named: make_optimizer(model, 1e-3, params=named), fp32_head=True)
    assert model.lm_head.weight.dtype == torch.float32 and opt.hooks
    x = torch.randint(0, 128, (2, 17))
    out = model(x[:, :-1], mtp=True)
    assert out.hidden.dtype == torch.bfloat16  # the residual stream stays bf16
    assert out.logits.dtype == torch.float32 and out.mtp_logits[0].dtype == torch.float32
    _step(model, opt, x)
    assert all(torch.equal(p.detach(), m.detach().to(torch.bfloat16)) for p, m in opt.pairs)


def test_one_step_rounds_the_masters_into_the_bf16_weights():
    model = _model()
    opt, _ = P.prepare(model, lambda named: make_optimizer(model, 1e-2, params=named), "bf16")
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    start = [m.detach().clone() for _, m in opt.pairs]
    # after backward the gradients live on the fp32 masters (the bf16 ones are consumed by the hook)
    out = model(x[:, :-1], mtp=True)
    main, mtp = lm_losses(model, out, x, None)
    (main + torch.stack(mtp).mean()).backward()
    assert all(p.grad is None for p, _ in opt.pairs)
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for _, m in opt.pairs)
    opt.zero_grad()
    _step(model, opt, x)
    moved = 0
    for (p, m), s in zip(opt.pairs, start):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
        moved += not torch.equal(m, s)
    assert moved > 0.9 * len(opt.pairs)
    # the AdamW moments are fp32
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")


def test_gradient_accumulation_sums_in_fp32():
    model = _model()
    opt, _ = P.prepare(model, lambda named: make_optimizer(model, 1e-3, params=named), "bf16")
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(2):
        lm_losses(model, model(x[:, :-1], mtp=False), x, None)[0].backward()
        grads.append([m.grad.clone() for _, m in opt.pairs if m.grad is not None])  # no MTP grads: mtp=False
    assert len(grads[0]) == len(grads[1]) > 10
    for g1, g2 in zip(*grads):  # the second backward adds a bf16 gradient equal to the first into fp32
        assert torch.allclose(g2, 2 * g1, rtol=1e-6, atol=0)


def test_bf16_loss_stays_within_2_percent_of_fp32(tmp_path):
    runs = {}
    for prec in ("fp32", "bf16"):
        out = pretrain(micro_cfg(tmp_path / prec, precision=prec, steps=20, eval_every=10))
        runs[prec] = read_metrics(out.parent)
    a, b = runs["fp32"], runs["bf16"]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    last = lambda m, k: [r[k] for r in m if k in r][-1]
    for key in ("loss", "eval_loss"):
        gap = abs(last(b, key) - last(a, key)) / last(a, key)
        assert gap < 0.02, (key, last(a, key), last(b, key))
    assert a[-1]["loss"] < 0.85 * a[0]["loss"] and b[-1]["loss"] < 0.85 * b[0]["loss"]  # both learn


def test_bf16_resume_is_bit_exact_and_the_saved_model_is_fp32(tmp_path):
    import transformers
    from safetensors import safe_open

    full = pretrain(micro_cfg(tmp_path / "a", precision="bf16"))
    pretrain(micro_cfg(tmp_path / "b", precision="bf16", stop_after=5))  # checkpoints at 4 and 5, then stops
    resumed = pretrain(micro_cfg(tmp_path / "b", precision="bf16"))
    a, b = read_metrics(full.parent), read_metrics(resumed.parent)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra.get("eval_loss") == rb.get("eval_loss"), ra["step"]
    wa, wb = nanoseek.from_pretrained(full).state_dict(), nanoseek.from_pretrained(resumed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the HF folder holds the fp32 masters (not bf16-rounded weights) and loads in transformers
    assert json.loads((full / "config.json").read_text())["torch_dtype"] == "float32"
    rounded = 0
    for f in full.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                assert t.dtype == torch.float32, k
                rounded += torch.equal(t, t.to(torch.bfloat16).float())
    assert rounded < 0.5 * len(wa)  # masters carry bits below bf16's precision
    ours = nanoseek.from_pretrained(full, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ours(x).logits - ref(x).logits).abs().max() < 1e-4


def test_an_fp32_checkpoint_resumes_at_bf16(tmp_path):
    """The masters come from the fp32 weights when the state holds none (switching precision mid-run)."""
    pretrain(micro_cfg(tmp_path, precision="fp32", stop_after=4))
    out = pretrain(micro_cfg(tmp_path, precision="bf16"))
    m = read_metrics(out.parent)
    assert [r["step"] for r in m][-1] == 12 and math.isfinite(m[-1]["loss"])


def test_sft_trains_at_bf16(tmp_path):
    from nanoseek.data.corpus import embedded_corpus, embedded_sft_records
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.sft import SFTConfig, sft

    base = tmp_path / "base"
    tok = train_tokenizer(embedded_corpus(200, seed=0), vocab_size=400)
    mc = ModelConfig.from_preset("tiny", **MICRO, vocab_size=int(math.ceil(tok.vocab_size / 64) * 64),
                                 num_nextn_predict_layers=1, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = DeepSeekModel(mc)
    model.init_weights(seed=0)
    model.save_pretrained(base)
    tok.save(str(base))
    recs = embedded_sft_records(4, seed=1, langs=("en",), tasks=("arithmetic",), levels=(1,))
    kw = dict(init_from=str(base), records=recs, eval_fraction=0.0, steps=6, batch_size=4, lr=3e-3, warmup=0,
              schedule="constant", log_every=1, save_every=100, tensorboard=False, device="cpu")
    losses = {}
    for prec in ("fp32", "bf16"):
        out = sft(SFTConfig(out_dir=str(tmp_path / prec), precision=prec, **kw))
        losses[prec] = [r["loss"] for r in read_metrics(out.parent) if "loss" in r]
        assert _float_dtypes(out) == {torch.float32}
    assert losses["bf16"][-1] < 0.8 * losses["bf16"][0]
    assert abs(losses["bf16"][-1] - losses["fp32"][-1]) / losses["fp32"][-1] < 0.05


def _float_dtypes(folder) -> set:
    from safetensors import safe_open

    out = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            out |= {t.dtype for t in map(st.get_tensor, st.keys()) if t.is_floating_point()}
    return out
