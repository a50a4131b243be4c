"""A lean decode step: one token per cache row, absorbed MLA over the LatentCache, the same maths as
`DeepSeekModel(ids, positions, cache, absorb=True)` in about a third of the operator calls.

Why it exists: at batch 1-16 a decode step of a small model is bound by per-operator overhead and by
reading the weights, not by FLOPs (an 8M-parameter model does ~16 MFLOP per token, 0.1 ms of one core,
while the generic forward takes ~5 ms). What this step does differently:
  - weights are kept transposed, (in, out) contiguous: for a few rows `x @ W^T` with W^T contiguous runs
    1.3-2x faster on CPU than F.linear on the (out, in) layout (measured: docs/benchmarks.md);
  - the q_a and kv_a projections share one GEMM (same input), so do gate and up;
  - RoPE for every layer is one (B, r, r) rotation matrix per step, applied with bmm; the matrix also
    performs the de-interleave that `rope_interleaved` does, so the cache layout is unchanged;
  - the causal mask is one additive bias per step, fused with the softmax scale into one baddbmm;
  - W_UK and W_UV are applied per head with bmm (no einsum), the residual adds ride on addmm;
  - routed experts: only the experts that received tokens run, on views of their packed weights;
  - DSA (V3.2): the layer's own Indexer writes its keys to the cache and, once a query sees more than
    index_topk keys, scores them; `select_topk`'s choice becomes -inf on the step's attention bias;
  - int8 (per channel) models: the fused projections' int8 rows are stacked into one GEMM through torch's int8
    weight-only kernel (`_Int8`, `quant.int8_weight_only_mm`), as `IntLinear` runs them in the generic forward;
    compiled too (the routed experts through `nanoseek::routed_experts_int8`).

`FastDecoder(model, compile=True)` runs the step through `torch.compile` (inductor's C++ backend on CPU):
elementwise chains fuse into single loops and the Python per-operator cost goes. The tensor maths is the
same code (`_run`); only the routed experts differ in form: a few token-expert pairs gather their experts'
weights and run one bmm, more go through the `nanoseek::routed_experts` op (the eager loop), opaque to the
compiler because it decides on the host which experts run. The layers' packed weights are views of one
flat buffer, so the compiled graph takes them as one input (each input costs a guard on every call).

Packed weights follow the parameters: when a parameter changed in place (optimizer steps and
load_state_dict bump the tensors' version counters) every packed tensor is refreshed in place, one copy per
source view and no allocation; when one moved or was cast (its storage changed) the weights are packed anew.
A trainer sharing the model (GRPO) never decodes with stale weights. The packed copy costs one extra copy of
the weights in memory, which is why `Engine` uses this step by default on CPU only (see
`Engine(fast_decode=...)`).

Shape legend: B = rows, D = hidden, H = heads, R = kv_lora_rank, r = qk_rope_head_dim, dn/dv = nope/value
head dims, S = keys read this step, E = routed experts, K = experts per token, V = vocab.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DeepSeekModel
from ..model.mla import select_topk
from ..quant import QUANTIZED_MODULES, IntLinear, QuantizedExperts, int8_weight_only_mm


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `FastDecoder` cannot run `model` (None when it can). Of the quantised formats it runs int8 per channel
    (torch's int8 weight-only kernel, as the generic forward does); the others dequantise in the generic forward."""
    if not isinstance(model, DeepSeekModel):
        return f"{type(model).__name__} is not a DeepSeekModel"
    for name, m in model.named_modules():
        if isinstance(m, IntLinear) and m.bits == 8 and m.group is None:
            continue
        if isinstance(m, QuantizedExperts) and m.fmt == "int8":
            continue
        if isinstance(m, QUANTIZED_MODULES):
            return f"{name} keeps quantised weights (FP8 or int {type(m).__name__}: the generic forward dequantises them)"
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            return f"{name} is a {type(m).__name__} (FP8 layers use the generic forward)"
        if type(m).__name__ == "QuantizedLinear":
            return f"{name} keeps FP8 weights (the generic forward dequantises them)"
        if getattr(m, "fp8", False):
            return f"{name} runs FP8 GEMMs (the generic forward does them)"
    return None


def select(model: nn.Module, fast_decode: bool | None, compile: bool, auto: bool) -> "FastDecoder | None":
    """The model's shared FastDecoder or None, as Engine and speculative_generate choose it: fast_decode True =
    required, False = never, None = when `auto` and the model is supported; compile=True needs it."""
    if compile and fast_decode is False:
        raise ValueError("compile=True compiles the fast decode step: it needs fast_decode True or None")
    if not (compile or fast_decode or (fast_decode is None and auto)):
        return None
    reason = unsupported_reason(model)
    if reason is None:
        return FastDecoder.for_model(model)
    if fast_decode or compile:
        raise ValueError(f"{'compile' if compile else 'fast_decode'}=True but {reason}")
    return None


class _Int8:
    """An int8 per-channel weight as the step keeps it: q (..., N, K) int8 in the Linear layout, fp32 scales
    (..., N); `x @ W` becomes `int8_weight_only_mm` (torch's int8 weight-only kernel on bf16 activations, as
    `IntLinear.forward`); [e] is expert e's. Quantised weights are frozen: packed once, never reloaded."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    def __getitem__(self, e) -> "_Int8":
        return _Int8(self.q[e], self.scale[e])


def _mm(x: torch.Tensor, w) -> torch.Tensor:
    """x @ W for a packed weight: (in, out) float, or _Int8."""
    if not isinstance(w, torch.Tensor):
        return int8_weight_only_mm(x, w.q, w.scale)
    return _reduction_mm(x, w) if _fuse_as_reduction(x, w) else x @ w


def _addmm(h: torch.Tensor, x: torch.Tensor, w) -> torch.Tensor:
    """h + x @ W (one addmm for float weights)."""
    if isinstance(w, torch.Tensor) and not _fuse_as_reduction(x, w):
        return torch.addmm(h, x, w)
    return h + _mm(x, w)


def _onednn(t: torch.Tensor) -> bool:
    """Whether GEMMs on t run through oneDNN (bf16, any float but fp32) rather than MKL (fp32). A oneDNN call costs
    ~12 us whatever its size (MKL's 3-5 us) and copies an operand that is not dense in its batch dimension, so the
    step shapes its bf16 GEMMs around that: few-row GEMMs fused as reductions when compiled, the routed experts as
    one padded bmm, the attention scores without a transposed operand (docs/benchmarks.md)."""
    return t.dtype != torch.float32


# Compiled, a bf16 GEMM of a few rows becomes a reduction that inductor fuses into one C++ loop (~5 us for
# 1 x 256 @ 256 x 256; ~25 such GEMMs a step outside the experts); from ~8 rows on oneDNN's GEMM wins. Eager, the
# reduction would materialise (rows, in, out).
_REDUCTION_ROWS = 4


def _fuse_as_reduction(x: torch.Tensor, w: torch.Tensor) -> bool:
    return _onednn(w) and x.shape[0] <= _REDUCTION_ROWS and torch.compiler.is_compiling()


def _reduction_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ w (in, out) as a sum of products, accumulated in fp32 (as the GEMM accumulates)."""
    return (x.unsqueeze(-1).float() * w.float()).sum(1).to(x.dtype)


def _int8_packable(m: nn.Module) -> bool:
    return isinstance(m, IntLinear) and m.bits == 8 and m.group is None and m.in_features % 16 == 0


def _float_weight(m: nn.Module) -> torch.Tensor:
    """A Linear's (out, in) weight in float: the parameter, or an int8 one dequantised (a fresh tensor)."""
    return m.dequantized_weight() if hasattr(m, "dequantized_weight") else m.weight


# cpp_wrapper: the graph's kernel calls are made from C++, not Python; size_asserts off: the inputs are the
# decoder's own packed weights and cache, shapes checked by construction
_COMPILE_OPTIONS = {"cpp_wrapper": True, "size_asserts": False}
_RECOMPILE_LIMIT = 64


def _compile(fn):
    """torch.compile(fn) as the step compiles it. Dynamo keeps one graph cache per code object: every decoder's
    graphs (guarded on the decoder, its shapes and its weights' kinds) count against one recompile limit, 8 by
    default, and fullgraph turns reaching it into an error; a process that compiles decoders for several models or
    weight formats (a benchmark, the test suite) needs more, so the limit is raised to at least 64."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, options=_COMPILE_OPTIONS)


class _Packed:
    """Weights laid out for the step. Each packed tensor is built once, by `pack`, from views of the model's
    parameters in the packed layout (concatenated along `dim`); `reload` refreshes every one in place after
    the parameters changed in place (an optimizer step): one copy per source, no allocation, and each tensor
    keeps its storage, so the compiled step's flat buffer (see `_flatten`) stays valid."""

    def pack(self, name: str, *sources: torch.Tensor, dim: int = -1) -> None:
        sources = [s.detach() for s in sources]
        setattr(self, name, torch.cat(sources, dim))  # a copy even of one source: reload writes into it
        dim %= sources[0].dim()
        off = 0
        for s in sources:
            self.__dict__.setdefault("_sources", []).append((name, dim, off, s))
            off += s.shape[dim]

    def reload(self) -> None:
        for name, dim, off, s in self.__dict__.get("_sources", []):
            getattr(self, name).narrow(dim, off, s.shape[dim]).copy_(s)

    def pack_linear(self, name: str, *linears: nn.Module) -> None:
        """The Linears' weights side by side as one (in, out) GEMM: int8 when every one is int8 per channel with a
        width the kernel reads (`_Int8`, their rows stacked), else float (int8 ones dequantised: a quantised
        weight is frozen, so its float copy is packed once, never reloaded)."""
        if all(_int8_packable(m) for m in linears):
            setattr(self, name, _Int8(torch.cat([m.weight for m in linears]),
                                      torch.cat([m.weight_scale[:, 0] for m in linears])))
        elif any(hasattr(m, "dequantized_weight") for m in linears):
            setattr(self, name, torch.cat([_float_weight(m).detach().t() for m in linears], dim=-1))
        else:
            self.pack(name, *[m.weight.t() for m in linears])


class _Layer(_Packed):
    """One decoder layer's weights, packed for the step (projections transposed to (in, out))."""

    def __init__(self, layer):
        a = layer.self_attn
        H, dn, dv, R = a.H, a.dn, a.dv, a.R
        self.eps_in, self.eps_post = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
        self.pack("w_in", layer.input_layernorm.weight)
        self.pack("w_post", layer.post_attention_layernorm.weight)
        self.q_lora = hasattr(a, "q_a_proj")
        if self.q_lora:  # one GEMM for [q_a; kv_a]: both read the normalised input
            self.qr = a.q_a_proj.out_features
            self.pack_linear("wa", a.q_a_proj, a.kv_a_proj_with_mqa)
            self.ba = None
            if a.q_a_proj.bias is not None:
                self.pack("ba", a.q_a_proj.bias, a.kv_a_proj_with_mqa.bias)
            self.eps_qa = a.q_a_layernorm.eps
            self.pack("w_qa", a.q_a_layernorm.weight)
            self.pack_linear("wq", a.q_b_proj)
        else:  # q_proj and kv_a stay apart (q needs no norm in between, but the outputs differ in use)
            self.qr = 0
            self.pack_linear("wa", a.q_proj, a.kv_a_proj_with_mqa)
            bias = a.kv_a_proj_with_mqa.bias
            self.ba = None
            if bias is not None:
                self.pack("ba", bias.new_zeros(a.q_proj.out_features), bias)
            self.nq = a.q_proj.out_features
        self.eps_kv = a.kv_a_layernorm.eps
        self.pack("w_kv", a.kv_a_layernorm.weight)
        kv_b = _float_weight(a.kv_b_proj).view(H, dn + dv, R)  # applied per head by bmm: float (int8 dequantised)
        self.pack("w_uk", kv_b[:, :dn])  # (H, dn, R): q_nope -> latent space
        self.pack("w_uv", kv_b[:, dn:].transpose(1, 2))  # (H, R, dv): latent -> value space
        self.pack_linear("wo", a.o_proj)
        self.bo = None
        if a.o_proj.bias is not None:
            self.pack("bo", a.o_proj.bias)
        self.H, self.dn, self.dv, self.R, self.r, self.scale = H, dn, dv, R, a.r, a.softmax_scale
        self.indexer = a.indexer  # DSA: key selection reuses the Indexer module, as routing reuses Gate
        self.is_moe = layer.is_moe
        mlp = layer.mlp
        if self.is_moe:
            self.gate = mlp.gate  # routing reuses Gate.forward: the selection maths lives in one place
            self._pack_experts(mlp.experts)
            sh = mlp.shared_experts
            self.shared = sh is not None
            if self.shared:
                self.Is = sh.gate_proj.out_features
                self.pack_linear("ws_gu", sh.gate_proj, sh.up_proj)
                self.pack_linear("ws_down", sh.down_proj)
        else:
            self.I = mlp.gate_proj.out_features
            self.pack_linear("w_gu", mlp.gate_proj, mlp.up_proj)
            self.pack_linear("w_down", mlp.down_proj)

    def _pack_experts(self, ex) -> None:
        """Routed experts: float (E, D, 2I) and (E, I, D), or int8 (`_Int8` in the stored (E, out, in) layout)."""
        E, I2, D = ex.gate_up_proj.shape
        self.I = I2 // 2
        if not hasattr(ex, "expert_weight"):  # float Experts
            self.pack("w_gu", ex.gate_up_proj.transpose(1, 2))  # (E, D, 2I)
            self.pack("w_down", ex.down_proj.transpose(1, 2))  # (E, I, D)
        elif D % 16 == 0 and self.I % 16 == 0:  # int8 per channel (unsupported_reason lets no other format in)
            self.w_gu = _Int8(ex.gate_up_proj, ex.gate_up_proj_scale[..., 0])
            self.w_down = _Int8(ex.down_proj, ex.down_proj_scale[..., 0])
        else:  # widths the int8 kernel cannot read: dequantised once
            self.w_gu = torch.stack([ex.expert_weight("gate_up_proj", e).t() for e in range(E)])
            self.w_down = torch.stack([ex.expert_weight("down_proj", e).t() for e in range(E)])

    def rebased(self, flat: torch.Tensor) -> "_Layer":
        """A copy whose packed tensors are views of `flat` at the offsets `_flatten` recorded: inside the
        compiled step the weights arrive as one graph input, not ~15 per layer (each input costs a guard
        and wrapper time on every call)."""
        new = object.__new__(_Layer)
        new.__dict__.update(self.__dict__)
        for k, (off, shape) in self.spec.items():
            setattr(new, k, flat[off: off + math.prod(shape)].view(shape))
        return new


_UNFLATTENED = object()  # FastDecoder._flat before the first compiled call after a repack


def _flatten(layers: list[_Layer]) -> torch.Tensor | None:
    """Move every packed tensor of `layers` into one flat buffer (each becomes a view of it, `spec` records
    where); None, leaving the layers as they are, when the tensors do not share one dtype and device."""
    items = [(L, k, v) for L in layers for k, v in vars(L).items() if isinstance(v, torch.Tensor)]
    if len({(v.dtype, v.device) for _, _, v in items}) != 1:
        return None
    flat = torch.cat([v.reshape(-1) for _, _, v in items])
    off = 0
    for L, k, v in items:
        L.__dict__.setdefault("spec", {})[k] = (off, tuple(v.shape))
        setattr(L, k, flat[off: off + v.numel()].view(v.shape))
        off += v.numel()
    return flat


class _MTP(_Packed):
    """MTP module k's extra weights (its decoder block is a _Layer)."""

    def __init__(self, layer):
        self.block = _Layer(layer)
        self.eps_e, self.eps_h, self.eps_out = layer.enorm.eps, layer.hnorm.eps, layer.shared_head.norm.eps
        self.pack("w_e", layer.enorm.weight)
        self.pack("w_h", layer.hnorm.weight)
        self.pack_linear("w_eh", layer.eh_proj)
        self.pack("w_out", layer.shared_head.norm.weight)

    def reload(self) -> None:
        super().reload()
        self.block.reload()


class _Step:
    """What every layer of one step shares: RoPE rotations, the causal bias, the cache slots."""

    def __init__(self, latent, index_keys, rot, bias, rows, cols, B, S, cos, sin, causal, sel=None):
        self.latent, self.index_keys, self.rot, self.bias, self.B, self.S = latent, index_keys, rot, bias, B, S
        self.rows, self.cols = rows, cols  # cache row and position of each query token (B*T,)
        self.cos, self.sin, self.causal = cos, sin, causal  # (B, T, r/2) each; (B, T, S) True = key visible
        self.sel = sel  # (B,) the cache rows of the batch, None = rows 0..B-1

    def read(self, cache: torch.Tensor, li: int) -> torch.Tensor:
        """Layer li's first S positions of the batch's cache rows: (B, S, .), a view for rows 0..B-1."""
        return cache[li, : self.B, : self.S] if self.sel is None else cache[li, :, : self.S].index_select(0, self.sel)


class FastDecoder(_Packed):
    """`FastDecoder(model)(ids, positions, cache)` -> (logits (B, V), expert ids per MoE layer [(B, K)]).

    ids: (B, 1) long, the token fed to each cache row; positions: list of B ints, where each row's token
    sits (its latent is written there; keys 0..position are read). Rows are independent, as in the engine.
    `forward` takes T tokens per row (speculative verification), `mtp_step` runs an MTP module.
    compile: run the main-model step through `torch.compile` by default (see `compiled_run`)."""

    def __init__(self, model: DeepSeekModel, compile: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastDecoder cannot run this model: {reason}")
        self.model = model
        self._params = list(model.parameters())
        self._key = None
        self.layers: list[_Layer] = []
        self.mtp: list[_MTP] = []
        self.num_packs = 0  # how many times the weights were (re)packed
        self.compile = compile  # the default of forward(compiled=...) and mtp_step(compiled=...)
        self._compiled = self._compiled_mtp = None
        # int8 weights: the step rounds activations to bf16 for the int8 kernel around the absorbed attention, the
        # generic forward around the expanded one, so there the two differ by more than float rounding
        self.int8 = any(isinstance(m, QUANTIZED_MODULES) for m in model.modules())

    def compiled_run(self):
        """`_run_flat` through `torch.compile` (inductor; on CPU it needs a C++ compiler), built on first use. The
        first calls compile: 10-30 s on a laptop-class CPU, once for the first shape and once more when the batch
        or the key length first changes (later shapes reuse a dynamic-shape graph; inductor's on-disk cache makes
        the next process faster). Weights are graph inputs, so repacked weights (optimizer steps) are read
        without recompiling."""
        if self._compiled is None:
            self._compiled = _compile(self._run_flat)
        return self._compiled

    @classmethod
    def for_model(cls, model: DeepSeekModel) -> "FastDecoder":
        """The model's shared FastDecoder (engines and speculative calls on one model share one packed copy)."""
        fast = model.__dict__.get("_fast_decoder")
        if fast is None or any(p is not q for p, q in itertools.zip_longest(fast._params, model.parameters())):
            # none yet, or the model's parameters were replaced since (quantised in place, converted): its packs
            # would hold the old weights
            fast = cls(model)
            model.__dict__["_fast_decoder"] = fast  # a plain attribute: not a submodule, not in the state dict
        return fast

    def _state_key(self) -> tuple[list[int], list[int]]:
        return [p._version for p in self._params], [p.data_ptr() for p in self._params]  # data_ptr: moves, casts

    def refresh(self) -> None:
        """Bring the packed weights up to date if any parameter changed since the last pack: in place when every
        parameter kept its storage (an optimizer step, load_state_dict), else packed anew (a move or a cast)."""
        key = self._state_key()
        if key == self._key:
            return
        with torch.no_grad():
            if self._key is not None and key[1] == self._key[1]:
                for packed in [self, *self.layers, *self.mtp]:
                    packed.reload()
            else:
                self._pack()
        self._key = key
        self.num_packs += 1

    def weights_changed(self) -> None:
        """The parameters were written where their version counters cannot tell (shared memory, by another
        process): the next call reloads the packed weights in place."""
        if self._key is not None:
            self._key = ([-1] * len(self._params), self._key[1])

    def _pack(self) -> None:
        m, cfg = self.model, self.model.config
        self.layers = [_Layer(layer) for layer in m.model.layers[: cfg.num_hidden_layers]]
        self._flat = _UNFLATTENED  # flattened on the first compiled call: eager steps do not need it
        self.mtp = [_MTP(layer) for layer in m.mtp_layers]
        self.embed = m.model.embed_tokens.weight.detach()  # the parameter itself: read by row, never packed
        self.eps_norm = m.model.norm.eps
        self.__dict__.pop("_sources", None)
        self.pack("w_norm", m.model.norm.weight)
        self.pack_linear("w_head", m.lm_head)
        self._rot_index = self._rotation_index(cfg.qk_rope_head_dim, cfg.rope_interleave, self.embed.device)

    @staticmethod
    def _rotation_index(r: int, interleaved: bool, device) -> torch.Tensor:
        """Flat (r*r) positions of cos, -sin, cos, sin in the rotation matrix M with rope(x) = x @ M.

        interleaved pairs (x_2i, x_2i+1) -> out_i, out_h+i (the de-interleaved layout of rope_interleaved);
        half-split pairs (x_i, x_h+i) -> out_i, out_h+i (rope_half)."""
        h = r // 2
        i = torch.arange(h)
        first, second = (2 * i, 2 * i + 1) if interleaved else (i, h + i)
        rows = torch.cat([first, second, second, first])
        cols = torch.cat([i, i, h + i, h + i])
        return (rows * r + cols).to(device)

    def _step(self, positions: torch.Tensor, latent: torch.Tensor, index_keys: torch.Tensor | None, S: int,
              dtype, sel: torch.Tensor | None = None) -> _Step:
        """positions (B, T) -> the per-step tensors every layer shares; S = max(positions) + 1 keys are read;
        sel: the cache rows of the batch (None = rows 0..B-1)."""
        B, T = positions.shape
        flat = positions.reshape(-1)
        cos, sin = self.model.model.rotary(flat.view(-1, 1), dtype)  # (B*T, 1, r/2), YaRN included
        cos, sin = cos.flatten(1), sin.flatten(1)
        r = 2 * cos.shape[1]
        vals = torch.cat([cos, -sin, cos, sin], dim=-1)
        rot = cos.new_zeros(B * T, r * r).index_copy_(1, self._rot_index, vals).view(B * T, r, r)
        keys = torch.arange(S, device=positions.device)
        hidden = keys > positions[..., None]  # (B, T, S): key s visible iff s <= position
        bias = torch.zeros(B, T, 1, S, dtype=dtype, device=positions.device)
        bias.masked_fill_(hidden.unsqueeze(2), float("-inf"))
        if T > 1:  # queries are (token, head) pairs, token-major: one bias row per pair
            bias = bias.expand(B, T, self.model.config.num_attention_heads, S).reshape(B, -1, S)
        else:
            bias = bias.view(B, 1, S)  # broadcast over heads
        rows = (torch.arange(B, device=positions.device) if sel is None else sel).repeat_interleave(T)
        return _Step(latent, index_keys, rot, bias, rows, flat, B, S, cos.view(B, T, -1), sin.view(B, T, -1), ~hidden,
                     sel)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, positions: list[int], cache, compiled: bool | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pos = torch.tensor(positions, device=self.model.lm_head.weight.device).view(-1, 1)
        logits, _, routing = self.forward(ids.view(-1, 1), pos, cache, kv_len=max(positions) + 1, compiled=compiled)
        return logits[:, 0], [r[:, 0] for r in routing]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, kv_len: int | None = None,
                compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """ids, positions (B, T) -> logits (B, T, V), final normalised hidden (B, T, D), expert ids per MoE
        layer [(B, T, K)]: `DeepSeekModel(ids, positions, cache, absorb=True)`. kv_len: max(positions) + 1 when
        the caller knows it (saves a host sync). compiled: use the compiled step (None = self.compile).
        A `cache.rows_view(rows)` runs the batch on those cache rows (eager only): the engine's decode step skips
        its idle rows that way."""
        self.refresh()
        S = int(positions.max()) + 1 if kv_len is None else kv_len
        if S > cache.max_len:
            raise ValueError(f"position {S - 1} is beyond the cache length {cache.max_len}")
        sel = cache.rows
        if self.compile if compiled is None else compiled:
            if sel is not None:
                raise ValueError("the compiled step reads cache rows 0..B-1: pass the whole cache, not a rows_view")
            if self._flat is _UNFLATTENED:
                self._flat = _flatten(self.layers)  # None: mixed dtypes, the layers stay as they are
            return self.compiled_run()(self._flat, ids, positions, cache.latent, cache.index_keys, S)
        return self._run(ids, positions, cache.latent, cache.index_keys, S, sel=sel)

    def _run_flat(self, flat: torch.Tensor | None, ids: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor,
                  index_keys: torch.Tensor | None, S: int):
        """`_run` with the layers' packed weights taken from `flat` (what `compile=True` compiles); flat None:
        from the layers themselves."""
        layers = None if flat is None else [L.rebased(flat) for L in self.layers]
        return self._run(ids, positions, latent, index_keys, S, layers)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, index_keys: torch.Tensor | None,
             S: int, layers: list[_Layer] | None = None, sel: torch.Tensor | None = None):
        """The step's tensor maths (no host syncs outside the routed experts); sel: the batch's cache rows."""
        B, T = ids.shape
        h = F.embedding(ids.reshape(-1), self.embed)  # (B*T, D)
        D = h.shape[-1]
        st = self._step(positions, latent, index_keys, S, h.dtype, sel)
        routing = []
        for li, L in enumerate(self.layers if layers is None else layers):
            h = self._attention(L, li, h, st, D)
            h, ids_l = self._mlp(L, h, D)
            if ids_l is not None:
                routing.append(ids_l.view(B, T, -1))
        h = F.rms_norm(h, (D,), self.w_norm, self.eps_norm)
        return _mm(h, self.w_head).view(B, T, -1), h.view(B, T, D), routing

    @torch.no_grad()
    def mtp_step(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache,
                 compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k on (B, T) positions: `DeepSeekModel.mtp_step(k, h_prev, next_ids, positions, cache,
        absorb=True)`; the module's cache layer is num_hidden_layers + k - 1. compiled: as in `forward`."""
        if cache.rows is not None:
            raise ValueError("mtp_step reads cache rows 0..B-1: pass the whole cache, not a rows_view")
        self.refresh()
        S = int(positions.max()) + 1
        if S > cache.max_len:
            raise ValueError(f"position {S - 1} is beyond the cache length {cache.max_len}")
        if self.compile if compiled is None else compiled:
            if self._compiled_mtp is None:  # its own graph (the MTP block's weights are not in the flat buffer)
                self._compiled_mtp = _compile(self._mtp_run)
            return self._compiled_mtp(k, h_prev, next_ids, positions, cache.latent, cache.index_keys, S)
        return self._mtp_run(k, h_prev, next_ids, positions, cache.latent, cache.index_keys, S)

    def _mtp_run(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                 latent: torch.Tensor, index_keys: torch.Tensor | None, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        M = self.mtp[k - 1]
        B, T, D = h_prev.shape
        e = F.rms_norm(F.embedding(next_ids.reshape(-1), self.embed), (D,), M.w_e, M.eps_e)
        h = _mm(torch.cat([e, F.rms_norm(h_prev.reshape(-1, D), (D,), M.w_h, M.eps_h)], dim=-1), M.w_eh)
        st = self._step(positions, latent, index_keys, S, h.dtype)
        h = self._attention(M.block, self.model.config.num_hidden_layers + k - 1, h, st, D)
        h, _ = self._mlp(M.block, h, D)
        h = F.rms_norm(h, (D,), M.w_out, M.eps_out)
        return _mm(h, self.w_head).view(B, T, -1), h.view(B, T, D)

    def _attention(self, L: _Layer, li: int, h, st: _Step, D: int):
        H, dn, R, r = L.H, L.dn, L.R, L.r
        N = h.shape[0]  # B * T query tokens
        x = F.rms_norm(h, (D,), L.w_in, L.eps_in)
        a = _mm(x, L.wa) if L.ba is None else _addmm(L.ba, x, L.wa)
        q_latent = None
        if L.q_lora:
            q_latent = F.rms_norm(a[:, : L.qr], (L.qr,), L.w_qa, L.eps_qa)
            q = _mm(q_latent, L.wq)
            kv = a[:, L.qr:]
        else:
            q, kv = a[:, : L.nq], a[:, L.nq:]
        bias = st.bias if L.indexer is None else self._sparse_bias(L, li, x, q_latent, st)
        q = q.view(N, H, dn + r)
        q_lat = torch.bmm(q[..., :dn].transpose(0, 1), L.w_uk)  # (H, N, R): W_UK folded into the query
        q_pe = torch.bmm(q[..., dn:], st.rot)  # (N, H, r)
        qq = torch.cat([q_lat.transpose(0, 1), q_pe], dim=-1).view(st.B, -1, R + r)  # (B, T*H, R + r)
        c = F.rms_norm(kv[:, :R], (R,), L.w_kv, L.eps_kv)
        k_pe = torch.bmm(kv[:, R:].unsqueeze(1), st.rot).squeeze(1)  # (N, r)
        # an index_put_ on the whole cache, (layer, row, position) indices: written through a per-layer view
        # the compiled graph would copy the whole cache twice per step
        cache = st.latent  # (layers, rows, max_len, R + r)
        cache.index_put_((torch.full_like(st.rows, li), st.rows, st.cols), torch.cat([c, k_pe], dim=-1).to(cache.dtype))
        lat = st.read(cache, li)  # (B, S, R + r), this step's entries included
        if not _onednn(lat):
            scores = torch.baddbmm(bias, qq, lat.transpose(1, 2), alpha=L.scale)  # (B, T*H, S), causal bias added
        else:  # oneDNN would copy the transposed slice first (~0.5 ms a layer at batch 16, latent 576): lat @ qq^T
            scores = torch.bmm(lat, qq.transpose(1, 2)).transpose(1, 2) * L.scale + bias
        o = torch.bmm(scores.softmax(dim=-1), lat[..., :R]).view(N, H, R)
        o = torch.bmm(o.transpose(0, 1), L.w_uv).transpose(0, 1).reshape(N, H * L.dv)  # W_UV after attention
        h = _addmm(h, o, L.wo)
        return h if L.bo is None else h + L.bo

    def _sparse_bias(self, L: _Layer, li: int, x, q_latent, st: _Step) -> torch.Tensor:
        """DSA: write this step's indexer keys to the cache; the causal bias, plus -inf on the keys outside each
        query's top-`index_topk` by index score once more keys than that are visible (`MLA.forward`'s selection,
        through the layer's own Indexer and `select_topk`)."""
        B, T, N = st.B, st.cos.shape[1], x.shape[0]
        x3, q3 = x.view(B, T, -1), q_latent.view(B, T, -1)
        st.index_keys.index_put_((torch.full_like(st.rows, li), st.rows, st.cols),
                                 L.indexer.keys(x3, st.cos, st.sin).reshape(N, -1).to(st.index_keys.dtype))
        if st.S <= L.indexer.topk:
            return st.bias
        scores = L.indexer(x3, q3, st.cos, st.sin, st.read(st.index_keys, li)).masked_fill(~st.causal, float("-inf"))
        outside = ~select_topk(scores, L.indexer.topk)  # (B, T, S)
        extra = torch.zeros_like(scores, dtype=st.bias.dtype).masked_fill_(outside, float("-inf"))
        if T > 1:  # one bias row per (token, head) pair, token-major, as in `_step`
            return st.bias + extra.unsqueeze(2).expand(B, T, L.H, st.S).reshape(B, -1, st.S)
        return st.bias + extra  # (B, 1, S): broadcast over heads

    def _mlp(self, L: _Layer, h, D):
        x = F.rms_norm(h, (D,), L.w_post, L.eps_post)
        if not L.is_moe:
            g = _mm(x, L.w_gu)
            return _addmm(h, F.silu(g[:, : L.I]) * g[:, L.I:], L.w_down), None
        ids, w, _ = L.gate(x)  # (N, K) ids, fp32 weights
        if not torch.compiler.is_compiling():
            h = routed_experts(x, ids, w, L.w_gu, L.w_down, base=h)  # adds into h: no zeros, no extra add
        elif _gathers(ids.numel(), L.w_gu, L.w_down):
            # up to 2 E (token, expert) pairs of small experts: gather their weights, one bmm each way (no host sync)
            flat = ids.reshape(-1)
            xs = x.repeat_interleave(ids.shape[1], 0)
            g = _pair_mm(xs, L.w_gu, flat)
            a = F.silu(g[:, : L.I]) * g[:, L.I:]
            y = _pair_mm(a, L.w_down, flat)  # (N*K, D)
            y = (y.view(*ids.shape, -1) * w.unsqueeze(-1).to(y.dtype)).sum(1)
            h = h + y
        elif isinstance(L.w_gu, _Int8):
            h = h + torch.ops.nanoseek.routed_experts_int8(x, ids, w, L.w_gu.q, L.w_gu.scale, L.w_down.q,
                                                           L.w_down.scale)
        else:
            h = h + torch.ops.nanoseek.routed_experts(x, ids, w, L.w_gu, L.w_down)
        if L.shared:
            s = _mm(x, L.ws_gu)
            h = _addmm(h, F.silu(s[:, : L.Is]) * s[:, L.Is:], L.ws_down)
        return h, ids


def _num_experts(w) -> int:
    return (w if isinstance(w, torch.Tensor) else w.q).shape[0]


def _pair_mm(x: torch.Tensor, w, experts: torch.Tensor) -> torch.Tensor:
    """Row i of x times expert experts[i]'s weight, for a few rows (the compiled step's gather path): float
    weights gathered into one bmm; int8 ones row by row through the int8 kernel (the eager step's numerics)."""
    if isinstance(w, torch.Tensor):
        return torch.bmm(x.unsqueeze(1), w[experts]).squeeze(1)
    pick = lambda t, i: t[experts[i: i + 1]][0]  # a one-element index tensor: a gather, no host sync
    return torch.cat([_mm(x[i: i + 1], _Int8(pick(w.q, i), pick(w.scale, i))) for i in range(x.shape[0])])


# Under compile, up to 2 E (token, expert) pairs whose experts' weights total at most 16 MB take the gather path:
# copying those weights inside the graph costs less than the opaque op's host round trip and per-expert calls
# (bench model, 16 experts of 384 KB fp32, compiled step: batch 4 +20-70%, batch 16 +0-35% in fp32, bf16 and int8;
# docs/benchmarks.md); larger experts or batches call the op, which reads each expert once.
_GATHER_PAIRS_PER_EXPERT = 2
_GATHER_BYTES = 16 << 20


def _gathers(pairs: int, w_gu, w_down) -> bool:
    E = _num_experts(w_gu)
    per_expert = sum(t[0].numel() * t.element_size() for w in (w_gu, w_down)
                     for t in ((w,) if isinstance(w, torch.Tensor) else (w.q, w.scale)))
    return pairs <= _GATHER_PAIRS_PER_EXPERT * E and pairs * per_expert <= _GATHER_BYTES


def routed_experts(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor,
                   base: torch.Tensor | None = None) -> torch.Tensor:
    """base (zeros if None) + sum_k w[n, k] * expert_{ids[n, k]}(x[n]) for packed experts w_gu (E, D, 2I),
    w_down (E, I, D): only the experts that received tokens run (one host sync for the counts)."""
    N, K = ids.shape
    I = w_down.shape[1] if isinstance(w_down, torch.Tensor) else w_down.q.shape[2]  # (E, I, D) float, int8 (E, D, I)
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // K
    xs = x.index_select(0, token)  # (N*K, D) sorted by expert (x[token]: the same rows, ~4x slower here)
    E = _num_experts(w_gu)
    counts_t = torch.bincount(flat, minlength=E)
    counts = counts_t.tolist()  # the host sync
    experts = [e for e, n in enumerate(counts) if n]
    cap = max(counts)
    if (isinstance(w_gu, torch.Tensor) and _onednn(w_gu) and len(experts) * _PAD_SHARE >= E
            and E * cap <= _PAD_SHARE * len(flat)):  # and padding at most quadruples the rows
        y = _padded_experts(xs, flat[order], counts_t, cap, w_gu, w_down, I)
    else:
        sizes = [counts[e] for e in experts]
        g = torch.cat([_mm(xe, w_gu[e]) for e, xe in zip(experts, xs.split(sizes))])
        a = (F.silu(g[:, :I]) * g[:, I:]).split(sizes)
        y = torch.cat([_mm(ae, w_down[e]) for e, ae in zip(experts, a)])
    y = y * w.reshape(-1).index_select(0, order).unsqueeze(-1).to(y.dtype)
    return (torch.zeros_like(x) if base is None else base).index_add(0, token, y)


# oneDNN (bf16) experts take one padded bmm each way once a quarter of them or more have tokens, not ~30 calls a
# layer in the loop (for fp32 the padding's extra rows cost more than MKL's cheap calls). A skewed batch, where
# padding every expert to the busiest one's count would more than quadruple the rows, keeps the loop.
_PAD_SHARE = 4


def _padded_experts(xs: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, cap: int, w_gu: torch.Tensor,
                    w_down: torch.Tensor, I: int) -> torch.Tensor:
    """The rows xs (M, D), sorted by expert (experts (M,) ascending, counts (E,) rows each), through their experts
    as two batched GEMMs over all E experts, each expert's rows zero-padded to cap: (M, D) out, rows in xs's order.
    Every row is its own GEMM row, so padding changes no real row's sums."""
    slot = torch.arange(len(experts), device=xs.device) - (counts.cumsum(0) - counts)[experts]  # row within expert
    buf = xs.new_zeros(w_gu.shape[0], cap, xs.shape[1]).index_put_((experts, slot), xs)  # (E, cap, D)
    g = torch.bmm(buf, w_gu)  # (E, cap, 2I)
    return torch.bmm(F.silu(g[..., :I]) * g[..., I:], w_down)[experts, slot]


@torch.library.custom_op("nanoseek::routed_experts", mutates_args=())
def _routed_experts_op(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, w_gu: torch.Tensor,
                       w_down: torch.Tensor) -> torch.Tensor:
    return routed_experts(x, ids, w, w_gu, w_down)


@_routed_experts_op.register_fake
def _(x, ids, w, w_gu, w_down):
    return torch.empty_like(x)


@torch.library.custom_op("nanoseek::routed_experts_int8", mutates_args=())
def _routed_experts_int8_op(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, q_gu: torch.Tensor,
                            s_gu: torch.Tensor, q_down: torch.Tensor, s_down: torch.Tensor) -> torch.Tensor:
    return routed_experts(x, ids, w, _Int8(q_gu, s_gu), _Int8(q_down, s_down))


@_routed_experts_int8_op.register_fake
def _(x, ids, w, q_gu, s_gu, q_down, s_down):
    return torch.empty_like(x)

