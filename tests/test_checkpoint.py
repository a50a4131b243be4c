"""HF-layout checkpoints: round trips with transformers, sharding, MTP layers, FP8 blocks, named errors."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import CheckpointError, to_hf_state_dict
from oracle import YARN, hf_model, random_model, tiny_config


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("over", [dict(num_nextn_predict_layers=0, rope_scaling=YARN), dict(index_topk=5)])
def test_nanoseek_save_transformers_load(tmp_path, over):
    import transformers

    model = random_model(tiny_config(**over), seed=11)
    model.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    assert (_logits(model, x) - ref(x).logits.detach()).abs().max() < 1e-4


@pytest.mark.parametrize("over", [dict(num_nextn_predict_layers=0), dict(num_nextn_predict_layers=0, index_topk=5,
                                                                         rope_scaling=YARN)])
def test_transformers_save_nanoseek_load(tmp_path, over):
    model = random_model(tiny_config(**over), seed=12)
    ref = hf_model(model)
    ref.save_pretrained(tmp_path)
    back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    assert (_logits(back, x) - ref(x).logits.detach()).abs().max() < 1e-4


def test_mtp_layer_saved_at_layer_n_and_loaded_back(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = random_model(cfg, seed=13)
    model.save_pretrained(tmp_path)
    names = load_file(tmp_path / "model.safetensors").keys()
    n = cfg.num_hidden_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"model.layers.{n}.{k}" in names
    back = nanoseek.from_pretrained(tmp_path)
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        a, b = model(x, mtp=True), back(x, mtp=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_sharded_save_writes_index_and_loads(tmp_path):
    model = random_model(tiny_config(), seed=14)
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))
    back = nanoseek.from_pretrained(tmp_path)
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    assert torch.equal(_logits(model, x), _logits(back, x))
    # saving again unsharded removes the stale shards and index
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))


def _quantise_like_published(w: torch.Tensor):
    """The published FP8 layout, written independently of nanoseek.fp8: per 128x128 block,
    scale_inv = amax / 448, fp8 = w / scale_inv, ragged edge blocks included."""
    out, inp = w.shape
    so, si = math.ceil(out / 128), math.ceil(inp / 128)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    s = torch.empty(so, si)
    deq = torch.empty_like(w)
    for i in range(so):
        for j in range(si):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale = blk.abs().max().clamp_min(1e-4) / 448.0
            qb = (blk / scale).to(torch.float8_e4m3fn)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb
            deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb.float() * scale
            s[i, j] = scale
    return q, s, deq


def _fp8_config():
    # dims above 128 and not multiples of it, so edge blocks are ragged
    return tiny_config(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=144,
                       kv_lora_rank=130, num_attention_heads=2, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=40,
                       num_nextn_predict_layers=1)


def test_published_fp8_checkpoint_loads_dequantised(tmp_path):
    model = random_model(_fp8_config(), seed=15)
    tensors = to_hf_state_dict(model)
    on_disk, deq_sd = {}, {}
    for k, v in tensors.items():
        quantised = (k.endswith(".weight") and v.dim() == 2 and "embed_tokens" not in k and "lm_head" not in k
                     and "shared_head.head" not in k and not k.endswith("mlp.gate.weight") and "eh_proj" not in k)
        if quantised:
            q, s, deq = _quantise_like_published(v.float())
            on_disk[k], on_disk[k[:-6] + "weight_scale_inv"] = q, s
            deq_sd[k] = deq
        else:
            on_disk[k] = v.clone()
    save_file(on_disk, str(tmp_path / "model.safetensors"))
    cfg = model.config.replace(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                    "weight_block_size": [128, 128]})
    cfg.save(tmp_path)
    # the reference: the same model with every quantised weight replaced by its dequantised value
    ref = random_model(cfg, seed=15)
    ref_hf = to_hf_state_dict(ref)
    ref_hf.update(deq_sd)
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            if name.endswith("experts.gate_up_proj"):
                pre = name[: -len(".gate_up_proj")]
                p.copy_(torch.stack([torch.cat([ref_hf[f"{pre}.{e}.gate_proj.weight"], ref_hf[f"{pre}.{e}.up_proj.weight"]])
                                     for e in range(p.shape[0])]))
            elif name.endswith("experts.down_proj"):
                pre = name[: -len(".down_proj")]
                p.copy_(torch.stack([ref_hf[f"{pre}.{e}.down_proj.weight"] for e in range(p.shape[0])]))
            elif name in ref_hf:
                p.copy_(ref_hf[name])
    loaded = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a, b, orig = loaded(x, mtp=True), ref(x, mtp=True), model(x)
    assert (a.logits - b.logits).abs().max() < 1e-4
    assert (a.mtp_logits[0] - b.mtp_logits[0]).abs().max() < 1e-4
    assert (a.logits - orig.logits).abs().max() > 1e-4  # quantisation really happened
    kept = nanoseek.from_pretrained(tmp_path, dtype=torch.float32, keep_fp8=True)
    assert kept.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert (_logits(kept, x) - b.logits).abs().max() < 1e-4


def test_fp8_save_round_trip(tmp_path):
    model = random_model(_fp8_config(), seed=16)
    model.save_pretrained(tmp_path, fp8=True)
    on_disk = load_file(tmp_path / "model.safetensors")
    w = on_disk["model.layers.1.self_attn.q_b_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert on_disk["model.layers.1.self_attn.q_b_proj.weight_scale_inv"].shape == (1, 2)  # [ceil(48*?/128), ceil(144/128)]
    assert on_disk["model.embed_tokens.weight"].dtype == torch.float32
    assert on_disk["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    orig, loaded = model.state_dict(), back.state_dict()
    for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.2.mlp.experts.gate_up_proj",
                 "model.layers.3.self_attn.kv_b_proj.weight"):
        err = (loaded[name] - orig[name]).abs()
        assert err.max() > 0 and (err <= orig[name].abs() / 16 + 1e-3).all(), name  # e4m3: 3 mantissa bits
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.mlp.gate.weight", "model.norm.weight",
                 "model.layers.3.eh_proj.weight"):
        assert torch.equal(loaded[name], orig[name]), name


# The published FP8 layout (DeepSeek-V3 / R1 / V3.2 on the Hub): the weights of these Linears are float8_e4m3fn
# with a weight_scale_inv, in the main layers and in the MTP block's decoder layer alike. Everything else stays in
# the model dtype: embeddings, lm_head, norms, the router (mlp.gate), e_score_correction_bias, the indexer's
# weights_proj, and the MTP module's embed_tokens, enorm, hnorm, eh_proj and shared_head.
_PUBLISHED_FP8 = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b"
                            r"|indexer\.wk)|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


@pytest.mark.parametrize("over", [dict(), dict(index_topk=5, index_n_heads=4, index_head_dim=32)])
def test_fp8_save_quantises_exactly_the_published_set_and_loads_in_transformers(tmp_path, over):
    import transformers

    # every dim a multiple of 128 or at most 128: transformers' CPU dequantisation derives the block size from the
    # scale grid (rows // scale_rows), which is wrong for ragged edge blocks (nanoseek's own tests cover those)
    cfg = tiny_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
                      kv_lora_rank=96, num_attention_heads=2, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
                      num_nextn_predict_layers=1, **over)
    model = random_model(cfg, seed=18)
    model.save_pretrained(tmp_path, fp8=True)
    on_disk = load_file(tmp_path / "model.safetensors")
    weights = {k for k in on_disk if not k.endswith("weight_scale_inv")}
    expected = {k for k in weights if _PUBLISHED_FP8.search(k)}
    assert {k for k in weights if on_disk[k].dtype == torch.float8_e4m3fn} == expected
    assert {k for k in on_disk if k.endswith("weight_scale_inv")} == {k[: -len("weight")] + "weight_scale_inv" for k in expected}
    n = model.config.num_hidden_layers
    for k in ("eh_proj", "enorm", "hnorm", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert on_disk[f"model.layers.{n}.{k}.weight"].dtype == torch.float32, k
    assert f"model.layers.{n}.self_attn.kv_b_proj.weight" in expected  # the MTP block's decoder layer is FP8
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # README_WEIGHTS.md's config, no skip list: loaders tell FP8 weights by their module classes or by the
    # weight_scale_inv beside them
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    from nanoseek.fp8 import quantize_model_for_inference  # in-memory FP8 inference swaps the same Linears

    swapped = {name + ".weight" for name in quantize_model_for_inference(random_model(cfg, seed=18))}
    assert swapped == {k for k in expected if ".experts." not in k}  # fused routed experts are not nn.Linear

    back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    eh = f"model.layers.{n}.eh_proj.weight"
    assert torch.equal(back.state_dict()[eh], model.state_dict()[eh])
    kept = nanoseek.from_pretrained(tmp_path, dtype=torch.float32, keep_fp8=True)
    assert type(kept.mtp_layers[0].eh_proj) is torch.nn.Linear
    assert kept.mtp_layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = back(x, mtp=True), kept(x, mtp=True)
    assert (a.logits - b.logits).abs().max() < 1e-4 and (a.mtp_logits[0] - b.mtp_logits[0]).abs().max() < 1e-4
    # transformers (no MTP) loads the main model of the same folder, dequantising on CPU, to the same weights
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    own = back.state_dict()
    for k, v in ref.state_dict().items():
        if "rotary" not in k:
            torch.testing.assert_close(v, own[k], rtol=0, atol=1e-7, msg=k)
    # 5 tokens: no more than index_topk keys, so DSA selects them all (selection ties are tested in test_dsa.py)
    with torch.no_grad():
        assert (ref(x[:, :5]).logits - back(x[:, :5]).logits).abs().max() < 1e-4


def _saved(tmp_path, **over):
    model = random_model(tiny_config(**over), seed=17)
    model.save_pretrained(tmp_path)
    return model


def test_mismatched_checkpoint_names_every_offending_tensor(tmp_path):
    _saved(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.self_attn.o_proj.weight"]
    del sd["model.layers.2.mlp.experts.3.up_proj.weight"]
    sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(7)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        nanoseek.from_pretrained(tmp_path)
    msg = str(e.value)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.2.mlp.experts.3.up_proj.weight",
                 "model.layers.0.self_attn.bogus.weight", "model.norm.weight: shape [7]"):
        assert name in msg
    loose = nanoseek.from_pretrained(tmp_path, strict=False)  # non-strict loads what matches
    assert any("model.norm.weight" in p for p in loose.load_problems)


def test_truncated_and_corrupt_files_are_named(tmp_path):
    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        nanoseek.from_pretrained(tmp_path)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage json!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        nanoseek.from_pretrained(tmp_path)
    f.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        nanoseek.from_pretrained(tmp_path)


def test_missing_shard_pickles_and_fp8_without_scale(tmp_path):
    _saved(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002.safetensors"):
        nanoseek.from_pretrained(tmp_path / "a")
    nanoseek.ModelConfig.from_preset("tiny").save(tmp_path / "b")
    torch.save({"w": torch.zeros(1)}, tmp_path / "b" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        nanoseek.from_pretrained(tmp_path / "b")
    _saved(tmp_path / "c")
    sd = load_file(tmp_path / "c" / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv is missing"):
        nanoseek.from_pretrained(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        nanoseek.from_pretrained(tmp_path / "nowhere")


def test_tied_embeddings_survive_save_and_load(tmp_path):
    model = random_model(tiny_config(tie_word_embeddings=True), seed=18)
    model.save_pretrained(tmp_path)
    back = nanoseek.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    x = torch.randint(0, model.config.vocab_size, (1, 10))
    assert torch.equal(_logits(model, x), _logits(back, x))


def test_bf16_cast_keeps_rope_frequencies_in_fp32():
    model = random_model(tiny_config(rope_scaling=YARN), seed=19)
    inv = model.model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.model.rotary.inv_freq, inv)


def test_transformers_written_folder_loads_as_a_model_without_mtp(tmp_path):
    """transformers' DeepseekV3Config writes num_nextn_predict_layers: 1 (its default) but never saves an MTP layer."""
    import warnings

    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=21)
    ref = hf_model(model)
    ref.config.num_mtp_layers = 1  # transformers' default, as a twin built from DeepseekV3Config() keeps it
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    said = [w for w in caught if "MTP" in str(w.message)]
    assert len(said) == 1 and "num_nextn_predict_layers=0" in str(said[0].message)
    assert back.config.num_nextn_predict_layers == 0 and not back.mtp_layers
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    assert (_logits(back, x) - ref(x).logits.detach()).abs().max() < 1e-4
    # a folder missing some MTP tensors, but not all, is still refused
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.3.enorm.weight"] = torch.ones(model.config.hidden_size)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors"):
        nanoseek.from_pretrained(tmp_path)


def test_non_strict_load_never_leaves_uninitialised_memory(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = random_model(cfg, seed=22)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("model.layers.3.")}  # drop the MTP layer...
    del sd["model.layers.1.post_attention_layernorm.weight"]  # ...and a norm, so MTP is not simply switched off
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError):
        nanoseek.from_pretrained(tmp_path)
    for _ in range(3):  # garbage in freshly allocated memory would show up on some attempt
        back = nanoseek.from_pretrained(tmp_path, strict=False)
        for name, t in back.state_dict().items():
            assert torch.isfinite(t).all() and t.abs().max() < 100, name
        assert torch.equal(back.model.layers[1].post_attention_layernorm.weight, torch.ones(cfg.hidden_size))
        assert back.model.layers[3].enorm.weight.eq(1).all()
        assert abs(back.model.layers[3].eh_proj.weight.std() - cfg.initializer_range) < 0.02  # normal(0, std)
        I = cfg.moe_intermediate_size
        experts = back.model.layers[2].mlp.experts
        assert torch.equal(experts.gate_up_proj[4], model.model.layers[2].mlp.experts.gate_up_proj[4])
        assert not torch.equal(experts.gate_up_proj[5, I:], model.model.layers[2].mlp.experts.gate_up_proj[5, I:])
        assert torch.equal(experts.gate_up_proj[5, :I], model.model.layers[2].mlp.experts.gate_up_proj[5, :I])


def _rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header through `edit(header) -> new header`, keeping the data bytes."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = edit(json.loads(data[8: 8 + n]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _rename_field(h):
    h["model.norm.weight"]["offsets"] = h["model.norm.weight"].pop("data_offsets")
    return h


def _entry_not_object(h):
    h["model.norm.weight"] = 5
    return h


def _edit_json(name, edit):
    def mutate(folder):
        p = folder / name
        p.write_text(json.dumps(edit(json.loads(p.read_text()))))
    return mutate


def _edit_tensors(edit):
    def mutate(folder):
        sd = load_file(folder / "model.safetensors")
        edit(sd)
        save_file(sd, str(folder / "model.safetensors"))
    return mutate


def _weight_map_entry_outside(folder):
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name, shard = next(iter(d["weight_map"].items()))
    (folder.parent / "x.safetensors").write_bytes((folder / shard).read_bytes())  # a real file: only the path is wrong
    d["weight_map"][name] = "../x.safetensors"
    index.write_text(json.dumps(d))


def _corrupt_tokenizer(folder):
    (folder / "tokenizer.json").write_text('{"model": 3, "version": ')


_BAD_FOLDERS = {
    # case: (mutation of a saved folder, regex the CheckpointError must match: the file and the field)
    "header_renamed_key": (lambda f: _rewrite_header(f / "model.safetensors", _rename_field),
                           r"model\.safetensors.*model\.norm\.weight.*data_offsets"),
    "header_is_a_list": (lambda f: _rewrite_header(f / "model.safetensors", lambda h: list(h)),
                         r"model\.safetensors: header is a JSON list"),
    "header_entry_not_object": (lambda f: _rewrite_header(f / "model.safetensors", _entry_not_object),
                                r"model\.safetensors.*'model\.norm\.weight' is a JSON int"),
    "index_weight_map_list": (_edit_json("model.safetensors.index.json", lambda d: {**d, "weight_map": list(d["weight_map"])}),
                              r"model\.safetensors\.index\.json: field 'weight_map' must be an object"),
    "index_entry_outside": (_weight_map_entry_outside, r"model\.safetensors\.index\.json.*weight_map.*\.\./x\.safetensors.*outside"),
    "config_is_a_list": (lambda f: (f / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object"),
    "config_bool_for_int": (_edit_json("config.json", lambda d: {**d, "num_hidden_layers": True}),
                            r"config\.json.*num_hidden_layers.*True"),
    "int_tensor": (_edit_tensors(lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)})),
                   r"model\.norm\.weight: dtype I64 in model\.safetensors, expected a floating-point tensor"),
    "bool_tensor": (_edit_tensors(lambda sd: sd.update({"lm_head.weight": torch.ones(97, 64, dtype=torch.bool)})),
                    r"lm_head\.weight: dtype BOOL in model\.safetensors"),
    "corrupt_tokenizer": (_corrupt_tokenizer, r"tokenizer\.json: not a valid tokenizer file"),
}


@pytest.mark.parametrize("case", sorted(_BAD_FOLDERS))
def test_malformed_checkpoint_files_are_refused_with_one_named_error(tmp_path, case):
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    folder = tmp_path / "ckpt"
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=23)
    model.save_pretrained(folder, max_shard_bytes=60_000 if case.startswith("index") else 5 * 1024 ** 3)
    mutate, match = _BAD_FOLDERS[case]
    if case == "corrupt_tokenizer":
        train_tokenizer(["one two three 123"] * 20, vocab_size=300).save(folder)
    mutate(folder)
    with pytest.raises(CheckpointError, match=match):
        if case == "corrupt_tokenizer":
            Tokenizer.load(folder)
        else:
            nanoseek.from_pretrained(folder)


def test_loading_imports_neither_dynamo_nor_sympy(tmp_path):
    """Loading builds the model on the meta device; meta-tensor init and empty_like go through torch._refs, which
    import torch._dynamo and sympy (~2 s added to every process that loads a model, e.g. each `nanoseek generate`).
    Both must stay out of a process that only loads a folder and runs it."""
    import subprocess
    import sys

    m = random_model(tiny_config(), seed=3)
    m.save_pretrained(tmp_path)
    code = ("import sys, torch, nanoseek\n"
            f"m = nanoseek.from_pretrained({str(tmp_path)!r})\n"
            "m(torch.tensor([[1, 2, 3]]))\n"
            "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    loaded = nanoseek.from_pretrained(tmp_path)
    for (n, p), q in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
