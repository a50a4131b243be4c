"""DSA continued training: the dense warm-up raises indexer recall, the sparse stage trains the whole model."""


import pytest
import torch

import nanoseek
from nanoseek.train.common import read_metrics
from nanoseek.train.dsa import DSAConfig, add_indexer, dsa


def test_warmup_raises_recall_then_sparse_stage_trains_everything(micro_base, tmp_path):
    out = dsa(DSAConfig(init_from=str(micro_base), out_dir=str(tmp_path / "dsa"), index_topk=16, seq_len=128,
                        batch_size=4, warmup_steps=30, sparse_steps=6, embedded_docs=600, eval_every=30,
                        tensorboard=False))
    m = read_metrics(out.parent)
    init = m[0]
    after_warmup = next(r for r in m if r["step"] == 30)
    assert init["stage"] == "init" and after_warmup["stage"] == "warmup"
    assert after_warmup["indexer_recall"] > init["indexer_recall"] + 0.15
    # the warm-up leaves the dense model untouched: same dense-attention LM loss as the reference
    base, model = nanoseek.from_pretrained(micro_base), nanoseek.from_pretrained(out)
    assert model.config.index_topk == 16 and model.config.model_type == "deepseek_v32"
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed and any(".mlp." in k for k in changed)  # sparse stage moved the main weights
    assert "eval_loss_sparse" in m[-1] and "eval_loss_dense" in m[-1]
    assert abs(m[-1]["eval_loss_sparse"] - m[-1]["eval_loss_dense"]) < 0.5


def test_warmup_only_updates_the_indexer(micro_base, tmp_path):
    out = dsa(DSAConfig(init_from=str(micro_base), out_dir=str(tmp_path / "w"), index_topk=16, seq_len=128,
                        batch_size=2, warmup_steps=3, sparse_steps=0, embedded_docs=300, tensorboard=False))
    base, model = nanoseek.from_pretrained(micro_base).state_dict(), nanoseek.from_pretrained(out).state_dict()
    for k, v in base.items():
        assert torch.equal(v, model[k]), k
    assert any(".indexer." in k for k in model if k not in base)


def test_resume_mid_run_matches(micro_base, tmp_path):
    kw = dict(init_from=str(micro_base), index_topk=16, seq_len=128, batch_size=2, warmup_steps=3, sparse_steps=3,
              embedded_docs=300, tensorboard=False, save_every=100)
    a = dsa(DSAConfig(out_dir=str(tmp_path / "a"), **kw))
    dsa(DSAConfig(out_dir=str(tmp_path / "b"), stop_after=4, **kw))
    b = dsa(DSAConfig(out_dir=str(tmp_path / "b"), **kw))
    sa, sb = nanoseek.from_pretrained(a).state_dict(), nanoseek.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dsa_output_loads_in_transformers(micro_base, tmp_path):
    import transformers

    model = add_indexer(nanoseek.from_pretrained(micro_base), index_topk=8).eval()
    cfg = model.config.replace(num_nextn_predict_layers=0)
    plain = nanoseek.DeepSeekModel(cfg)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    plain.eval().save_pretrained(tmp_path / "m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        assert (plain(x).logits - ref(x).logits).abs().max() < 1e-4


def test_bad_dsa_config_is_named(micro_base, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        DSAConfig(init_from=str(micro_base), index_topk=64, seq_len=64)
    with pytest.raises(ValueError, match="init_from"):
        DSAConfig(init_from=str(tmp_path))
