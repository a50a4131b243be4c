"""Expert pruning from router statistics, and expert ablations: a smaller (or ablated) valid checkpoint.

    loads = expert_loads(model, token_lists)          # per MoE layer: tokens routed to each expert
    pruned = prune_experts(model, loads, keep=4)      # a new DeepSeekModel with 4 routed experts per layer

Pruning keeps, in every MoE layer, the `keep` routed experts that received the most tokens on a calibration set
(the embedded tasks' worked problems by default) and drops the rest: their gate_up/down weights, their rows of
the router weight and their entries of e_score_correction_bias. Routing renormalises by construction: the
gate scores only the kept experts (softmax scoring: the softmax runs over the kept ones; sigmoid scoring: the
top-k weights are divided by their sum when norm_topk_prob), so the combine weights of a token sum as before.

Group-limited routing (n_group, topk_group) needs equal groups. When n_group divides `keep` and each group
keeps at least 2 experts (V3 scores a group by its top-2), every group keeps its keep/n_group most used experts:
the groups, n_group and topk_group stay as they were. Otherwise the `keep` most used experts of the layer are
kept and group limiting is switched off (n_group = topk_group = 1): a token then chooses among all kept experts.
`keep` = n_routed_experts changes nothing (same tensors, same routing).

Ablations (same shapes, a valid checkpoint): `ablate_routed` layers lose their routed experts' contribution
and `ablate_shared` layers their shared expert's, by zeroing the down projections (an expert with a zero
down_proj adds exactly 0 to the residual stream).

Densifying (`densify`, `nanoseek prune --dense`) turns every MoE layer into a dense SwiGLU of the model's
`intermediate_size`: the shared expert's rows followed by the `keep` routed experts with the largest mean combine
weight on the calibration set (0 for a token that did not choose it), each expert's down projection scaled by that
mean, the kept means rescaled to the layer's total. With constant routing (every expert chosen with the same weight)
the dense layer equals the MoE layer exactly; otherwise it is the starting point of a distilled dense student.

Shape legend: E = routed experts, K' = kept experts, D = hidden, I = expert width, F = dense width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import DeepSeekModel


def calibration_token_lists(tokenizer, calib: str = "embedded", num_samples: int = 128, max_len: int = 512,
                            seed: int = 0) -> list[list[int]]:
    """Token id lists to count expert loads on. calib "embedded": the embedded tasks' worked problems (prompt,
    reasoning and answer; levels 1-2, English). Otherwise a JSONL file whose lines hold "text", or "prompt" with
    an optional "completion" / "solution" / "answer" (joined by a space), or chat "messages"."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if calib == "embedded":
        from .data.corpus import embedded_corpus

        texts = embedded_corpus(num_samples, seed=seed, langs=("en",), levels=(1, 2))
    else:
        path = Path(calib)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist (or pass 'embedded')")
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            if "text" in rec:
                texts.append(str(rec["text"]))
            elif "prompt" in rec:
                tail = next((rec[k] for k in ("completion", "solution", "answer") if k in rec), "")
                texts.append(f"{rec['prompt']} {tail}".rstrip())
            elif "messages" in rec:
                texts.append("\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict)))
            else:
                raise ValueError(f"{path}:{i}: a calibration line needs a 'text', 'prompt' or 'messages' field, "
                                 f"got {sorted(rec)}")
            if len(texts) >= num_samples:
                break
        if not texts:
            raise ValueError(f"calibration file {path} holds no records")
    out = [tokenizer.encode(t)[:max_len] for t in texts]
    return [ids for ids in out if ids]


def moe_layers(model: DeepSeekModel) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, MoE module) for the main model's MoE layers, then the MTP modules' (index continues)."""
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if getattr(layer, "is_moe", False)]


def expert_loads(model: DeepSeekModel, token_lists: list[list[int]]) -> dict[int, torch.Tensor]:
    """{layer index: (E,) fp32 tokens routed to each expert} over the calibration sequences (one forward each,
    MTP modules included when the model has them)."""
    return _router_totals(model, token_lists)[0]


def mean_combine_weights(model: DeepSeekModel, token_lists: list[list[int]]) -> dict[int, torch.Tensor]:
    """{layer index: (E,) fp32 mean over calibration tokens of each expert's combine weight (routed scaling
    included; 0 for a token that did not route to it)}: the weight a dense merge gives each expert."""
    _, weights, tokens = _router_totals(model, token_lists)
    return {i: w / max(1, tokens[i]) for i, w in weights.items()}


@torch.no_grad()
def _router_totals(model: DeepSeekModel, token_lists: list[list[int]]):
    """Per MoE layer: (E,) routed token counts, (E,) summed combine weights, and the number of tokens seen."""
    if not token_lists:
        raise ValueError("no calibration sequences (all were empty after tokenising)")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to prune")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    totals = {i: torch.zeros(m.gate.E) for i, m in layers}
    weights = {i: torch.zeros(m.gate.E) for i, m in layers}
    tokens = {i: 0 for i, _ in layers}
    mtp = model.config.num_nextn_predict_layers > 0
    for ids in token_lists:
        x = torch.tensor([ids], device=dev)
        if mtp and x.shape[1] <= model.config.num_nextn_predict_layers:
            continue
        out = model(x, mtp=mtp)
        for (i, _), r in zip(layers, list(out.router) + list(out.mtp_router)):
            totals[i] += r.load.cpu()
            weights[i].index_add_(0, r.expert_ids.reshape(-1).cpu(), r.weights.reshape(-1).float().cpu())
            tokens[i] += r.expert_ids[..., 0].numel()
    model.train(was_training)
    return totals, weights, tokens


def _keep_ids(load: torch.Tensor, keep: int, n_group: int, by_group: bool) -> torch.Tensor:
    """Sorted ids of the experts to keep: the most loaded (ties: the lower id), per group when by_group."""
    E = load.numel()
    if not by_group:
        order = sorted(range(E), key=lambda e: (-float(load[e]), e))
        return torch.tensor(sorted(order[:keep]))
    size, per = E // n_group, keep // n_group
    ids = []
    for g in range(n_group):
        members = range(g * size, (g + 1) * size)
        ids += sorted(members, key=lambda e: (-float(load[e]), e))[:per]
    return torch.tensor(sorted(ids))


def check_keep(config, keep: int) -> None:
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise ValueError(f"--keep-experts must be an integer, got {keep!r}")
    if keep > E:
        raise ValueError(f"--keep-experts {keep} is more than the model's n_routed_experts {E}")
    if keep < K:
        raise ValueError(f"--keep-experts {keep} is less than num_experts_per_tok {K} (each token routes to {K} experts)")


@torch.no_grad()
def prune_experts(model: DeepSeekModel, loads: dict[int, torch.Tensor], keep: int) -> tuple[DeepSeekModel, dict]:
    """A new DeepSeekModel (fp32, same device) keeping `keep` routed experts per MoE layer; returns (model, info)
    with info = {"kept": {layer: [expert ids]}, "n_group": .., "topk_group": .., "group_limited": bool}."""
    cfg = model.config
    check_keep(cfg, keep)
    layers = moe_layers(model)
    missing = [i for i, _ in layers if i not in loads]
    if missing:
        raise ValueError(f"no expert loads for MoE layer(s) {missing}")
    G = cfg.n_group
    noaux = cfg.topk_method == "noaux_tc"
    by_group = G > 1 and keep % G == 0 and keep // G >= (2 if noaux else 1) and cfg.n_routed_experts % G == 0
    n_group, topk_group = (G, cfg.topk_group) if by_group else (1, 1)
    if keep == cfg.n_routed_experts:
        n_group, topk_group, by_group = G, cfg.topk_group, G > 1
    kept = {i: _keep_ids(loads[i], keep, G, by_group) for i, _ in layers}
    sd = {k: v for k, v in model.state_dict().items()}
    for i, moe in layers:
        idx = kept[i]
        prefix = next(n for n, m in model.named_modules() if m is moe)
        for name in ("gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj"):
            key = f"{prefix}.{name}"
            if key in sd:
                sd[key] = sd[key].index_select(0, idx.to(sd[key].device)).clone()
    new_cfg = cfg.replace(n_routed_experts=keep, n_group=n_group, topk_group=topk_group)
    with torch.device("meta"):
        new = DeepSeekModel(new_cfg)
    new.load_state_dict(sd, strict=True, assign=True)
    if new_cfg.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.reset_rope()
    new.to(next(model.parameters()).device)
    new.eval()
    info = {"kept": {i: idx.tolist() for i, idx in kept.items()}, "n_group": n_group, "topk_group": topk_group,
            "group_limited": n_group > 1}
    return new, info


def dense_keep(config) -> int:
    """Routed experts a dense merge keeps by default: as many as fit beside the shared expert in the dense
    layers' intermediate_size (the tiny preset: (384 - 64) / 64 = 5; V3: (18432 - 2048) / 2048 = 8)."""
    return (config.intermediate_size - config.n_shared_experts * config.moe_intermediate_size) // \
        config.moe_intermediate_size


@torch.no_grad()
def densify(model: DeepSeekModel, weights: dict[int, torch.Tensor], keep: int | None = None
            ) -> tuple[DeepSeekModel, dict]:
    """A new dense DeepSeekModel (n_routed_experts 0, every layer a SwiGLU of intermediate_size F): each MoE
    layer becomes [shared expert; the `keep` routed experts of largest mean combine weight `weights[layer]`],
    expert e's down projection times its mean weight (the kept means rescaled to the layer's total), zero rows
    padding the width to F. Returns (model, info) with info = {"kept": {layer: ids}, "scale": {layer: [..]}}."""
    cfg = model.config
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to densify")
    E, I, F = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.intermediate_size
    keep = dense_keep(cfg) if keep is None else keep
    if not isinstance(keep, int) or not 1 <= keep <= E or (cfg.n_shared_experts + keep) * I > F:
        raise ValueError(f"--keep-experts {keep}: a dense merge keeps 1 to {min(E, dense_keep(cfg))} routed experts "
                         f"(n_shared_experts {cfg.n_shared_experts} + kept, each {I} wide, within intermediate_size {F})")
    sd = dict(model.state_dict())
    info: dict = {"kept": {}, "scale": {}}
    for i, moe in layers:
        w = weights[i].float()
        ids = sorted(sorted(range(E), key=lambda e: (-float(w[e]), e))[:keep])
        scale = w[ids] * (w.sum() / w[ids].sum().clamp_min(1e-20))
        prefix = next(n for n, m in model.named_modules() if m is moe)
        gate_up, down = moe.experts.gate_up_proj.float(), moe.experts.down_proj.float()
        parts = [(gate_up[e, :I], gate_up[e, I:], down[e] * scale[j]) for j, e in enumerate(ids)]
        if moe.shared_experts is not None:
            s = moe.shared_experts
            parts.insert(0, (s.gate_proj.weight.float(), s.up_proj.weight.float(), s.down_proj.weight.float()))
        g, u, d = (torch.cat(t, dim=1 if k == 2 else 0) for k, t in enumerate(zip(*parts)))
        pad = F - g.shape[0]
        for key in [k for k in sd if k.startswith(prefix + ".")]:
            del sd[key]
        sd[f"{prefix}.gate_proj.weight"] = _pad_zeros(g, pad, 0)
        sd[f"{prefix}.up_proj.weight"] = _pad_zeros(u, pad, 0)
        sd[f"{prefix}.down_proj.weight"] = _pad_zeros(d, pad, 1)
        info["kept"][i], info["scale"][i] = ids, [round(float(x), 6) for x in scale]
    new_cfg = cfg.replace(n_routed_experts=0, first_k_dense_replace=cfg.num_hidden_layers)
    with torch.device("meta"):
        new = DeepSeekModel(new_cfg)
    dtype = next(model.parameters()).dtype
    new.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=True,
                        assign=True)
    if new_cfg.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.reset_rope()
    new.to(next(model.parameters()).device)
    return new.eval(), info


def _pad_zeros(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """w with n zero rows (dim 0) or columns (dim 1) appended."""
    if n == 0:
        return w.contiguous()
    shape = list(w.shape)
    shape[dim] = n
    return torch.cat([w, w.new_zeros(shape)], dim=dim)


@torch.no_grad()
def ablate(model: DeepSeekModel, routed_layers=(), shared_layers=()) -> None:
    """In place: zero the routed experts' down projections of `routed_layers` and the shared expert's of
    `shared_layers` (layer indices, MoE layers only), so those contributions are exactly 0."""
    moes = dict(moe_layers(model))
    for kind, idxs in (("routed", routed_layers), ("shared", shared_layers)):
        for i in idxs:
            if i not in moes:
                raise ValueError(f"layer {i} is not a MoE layer (MoE layers: {sorted(moes)}); cannot ablate its "
                                 f"{kind} experts")
            if kind == "routed":
                moes[i].experts.down_proj.zero_()
            elif moes[i].shared_experts is None:
                raise ValueError(f"layer {i} has no shared expert (n_shared_experts = 0)")
            else:
                moes[i].shared_experts.down_proj.weight.zero_()


def prune(model_dir, out_dir, keep_experts: int | None = None, calib: str = "embedded", num_samples: int = 128,
          ablate_routed=(), ablate_shared=(), max_len: int = 512, dense: bool = False) -> dict:
    """Load `model_dir`, count expert loads on the calibration set, keep `keep_experts` per layer (None: all,
    e.g. for ablations only), apply the ablations, write `out_dir` (config, weights, tokenizer, prune.json).
    dense: merge every MoE layer into a dense one instead (`densify`; keep_experts None = as many as fit)."""
    from .checkpoint import load_pretrained
    from .tokenizer import Tokenizer

    model = load_pretrained(model_dir, dtype=torch.float32)
    info: dict = {"source": str(model_dir), "n_routed_experts_before": model.config.n_routed_experts}
    if dense:
        ablate(model, ablate_routed, ablate_shared)
        seqs = calibration_token_lists(Tokenizer.load(str(model_dir)), calib, num_samples,
                                       min(max_len, model.config.max_position_embeddings))
        model, merged = densify(model, mean_combine_weights(model, seqs), keep_experts)
        info.update(merged, dense=True, calib=calib, calibration_sequences=len(seqs))
        return _write(model, model_dir, out_dir, info)
    if keep_experts is not None:
        check_keep(model.config, keep_experts)  # before the calibration forwards, not after them
        tok = Tokenizer.load(str(model_dir))
        seqs = calibration_token_lists(tok, calib, num_samples, min(max_len, model.config.max_position_embeddings))
        loads = expert_loads(model, seqs)
        model, kept = prune_experts(model, loads, keep_experts)
        info.update(kept, calib=calib, calibration_sequences=len(seqs), calibration_tokens=sum(map(len, seqs)),
                    loads={i: l.tolist() for i, l in loads.items()})
    ablate(model, ablate_routed, ablate_shared)
    info.update(n_routed_experts=model.config.n_routed_experts, ablate_routed=list(ablate_routed),
                ablate_shared=list(ablate_shared))
    return _write(model, model_dir, out_dir, info)


def _write(model: DeepSeekModel, model_dir, out_dir, info: dict) -> dict:
    out = Path(out_dir)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(model_dir) / name).exists():
            (out / name).write_bytes((Path(model_dir) / name).read_bytes())
    (out / "prune.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
