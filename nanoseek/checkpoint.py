"""Hugging Face-layout checkpoints in and out: config.json + safetensors (single or sharded with
model.safetensors.index.json), FP8 e4m3 weights with 128x128 `weight_scale_inv` blocks, MTP layers.

Loading is strict by default: every missing, unexpected or wrongly shaped tensor is collected and
reported in ONE error. Nothing is ever unpickled (safetensors only). The model is built on the meta
device and each tensor is materialised once, directly from the file.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import DeepSeekModel

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
# weights stored in FP8 in published checkpoints: every Linear but embeddings, heads, the router, the V3.2
# indexer's weights_proj and the MTP block's eh_proj (published V3/R1/V3.2 keep model.layers.61.eh_proj.weight in
# bf16 with no weight_scale_inv; vLLM and SGLang build it as a plain nn.Linear); norms and biases are not Linears
_NOT_QUANTISED = re.compile(r"(embed_tokens|lm_head|shared_head\.head|mlp\.gate\.weight|norm|e_score_correction_bias|weights_proj|eh_proj|bias$)")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names every offending file or tensor."""


# ---------------------------------------------------------------------------------------------- key maps
def to_hf_state_dict(model: DeepSeekModel) -> dict[str, torch.Tensor]:
    """nanoseek parameters -> HF tensor names: fused experts split per expert, MTP copies of embed/head."""
    cfg = model.config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :I]
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, I:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            out[name] = t
    for k in range(cfg.num_nextn_predict_layers):
        i = cfg.num_hidden_layers + k
        out[f"model.layers.{i}.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        out[f"model.layers.{i}.shared_head.head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def expected_hf_shapes(model: DeepSeekModel) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this model, computed on the meta device."""
    return {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


@contextmanager
def _no_weight_init():
    """torch.nn.init's in-place initialisers as no-ops, for building a model on the meta device: there is nothing to
    initialise, and the first meta-tensor init imports torch._dynamo (~2 s added to every process that loads a
    model). Process-wide while it is open (construction takes milliseconds)."""
    names = [n for n in vars(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


# ---------------------------------------------------------------------------------------------- reading
class _Reader:
    """Opens every safetensors shard lazily; maps tensor name -> shard file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        single = folder / SINGLE_NAME
        if index.exists():
            self.where = _read_index(index)
            missing_files = sorted({str(p) for p in self.where.values() if not p.exists()})
            if missing_files:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing_files)}")
        elif single.exists():
            self.where = None
            files = [single]
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            if not found:
                bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
                hint = f" (found {', '.join(bins)}: pickle checkpoints are never loaded; convert to safetensors)" if bins else ""
                raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
            files = [folder / f for f in found]
            self.where = None
        self.handles = {}
        if self.where is None:
            self.where = {}
            for f in files:
                for k in self._open(f).keys():
                    self.where[k] = f

    def _open(self, path: Path):
        if path not in self.handles:
            _check_header(path)
            try:
                self.handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        return self.handles[path]

    def keys(self):
        return self.where.keys()

    def _holding(self, name: str):
        path = self.where[name]
        h = self._open(path)
        if name not in h.keys():
            raise CheckpointError(f"{path}: index says it holds {name!r}, but it does not")
        return path, h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._holding(name)[1].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (F32, BF16, F8_E4M3, I64, BOOL, ...)."""
        return self._holding(name)[1].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        path, h = self._holding(name)
        try:
            return h.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e}); the file may be truncated") from None


def _check_header(path: Path) -> None:
    """Detect truncated/corrupt files before safetensors does, with an error naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: header is not valid JSON (corrupt file)") from None
    end = _check_header_entries(path, header)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: tensors need {8 + n + end} bytes but the file has {size} (truncated)")


# bytes per element of the safetensors dtypes; the floating ones may hold weights
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_ST_FIELDS = ("dtype", "shape", "data_offsets")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header_entries(path: Path, header) -> int:
    """Validate a safetensors header's structure (an object of {dtype, shape, data_offsets} entries) so that a
    malformed one is refused naming the file, the tensor and the field. Returns the end of the data section."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object of tensor entries")
    end = 0
    for name, v in header.items():
        if name == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise CheckpointError(f"{path}: header field '__metadata__' must be an object of strings, got {v!r:.80}")
            continue
        if not isinstance(v, dict):
            raise CheckpointError(f"{path}: header entry {name!r} is a JSON {type(v).__name__}, expected an object with "
                                  f"fields {', '.join(_ST_FIELDS)}")
        missing = [k for k in _ST_FIELDS if k not in v]
        extra = sorted(k for k in v if k not in _ST_FIELDS)
        if missing or extra:
            raise CheckpointError(f"{path}: header entry {name!r} lacks field(s) {missing} / has unknown field(s) "
                                  f"{extra}; expected exactly {', '.join(_ST_FIELDS)}")
        dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(f"{path}: header entry {name!r} field 'dtype' must be a string, got {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: header entry {name!r} field 'shape' must be a list of non-negative "
                                  f"integers, got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: header entry {name!r} field 'data_offsets' must be [begin, end] with "
                                  f"0 <= begin <= end, got {offsets!r:.80}")
        if dtype in _ST_ITEMSIZE:
            numel = 1
            for d in shape:
                numel *= d
            if offsets[1] - offsets[0] != numel * _ST_ITEMSIZE[dtype]:
                raise CheckpointError(f"{path}: header entry {name!r} field 'data_offsets' spans "
                                      f"{offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs "
                                      f"{numel * _ST_ITEMSIZE[dtype]}")
        end = max(end, offsets[1])
    return end


def _read_index(index: Path) -> dict[str, Path]:
    """model.safetensors.index.json -> {tensor name: shard path}; every shard must be a file inside the folder."""
    folder = index.parent
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' field, got a {type(data).__name__}")
    if "weight_map" not in data:
        raise CheckpointError(f"{index}: field 'weight_map' is missing")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: field 'weight_map' must be an object (tensor name -> shard file), "
                              f"got a {type(weight_map).__name__}")
    where = {}
    for k, v in weight_map.items():
        if not isinstance(v, str) or not v:
            raise CheckpointError(f"{index}: field 'weight_map' entry {k!r} must be a shard file name, got {v!r:.80}")
        # judged on the name, not on resolved links: hub caches keep shards as links into a blobs folder
        norm = os.path.normpath(v)
        if os.path.isabs(v) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
            raise CheckpointError(f"{index}: field 'weight_map' entry {k!r} -> {v!r} points outside {folder}")
        where[k] = folder / norm
    return where


def _load_config(cls, folder: Path):
    """cls.load(folder), with every problem of config.json raised as a CheckpointError naming the file."""
    try:
        return cls.load(folder)
    except (CheckpointError, FileNotFoundError):
        raise
    except (ValueError, TypeError, AttributeError) as e:
        msg = str(e)
        raise CheckpointError(msg if "config.json" in msg else f"{folder / 'config.json'}: {msg}") from None


def _dequant(reader: _Reader, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = reader.get(name)
    sname = name[: -len("weight")] + "weight_scale_inv"
    if t.dtype == torch.float8_e4m3fn:
        if sname not in reader.keys():
            raise CheckpointError(f"{name} is float8_e4m3fn but {sname} is missing")
        from .fp8 import dequantize_weight_blocks

        try:
            return dequantize_weight_blocks(t, reader.get(sname).float(), dtype=dtype)
        except ValueError as e:
            raise CheckpointError(f"{sname}: {e}") from None
    return t.to(dtype)


# ---------------------------------------------------------------------------------------------- loading
def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu", strict: bool = True,
                    keep_fp8: bool = False) -> DeepSeekModel:
    """Build a DeepSeekModel from a HF-layout folder (config.json + safetensors).

    dtype: compute dtype (default: config torch_dtype; FP8 weights are dequantised to it).
    keep_fp8: keep FP8 linear weights in FP8 (QuantizedLinear, dequantised per matmul) instead.
    strict: raise one CheckpointError listing every missing / unexpected / mis-shaped tensor."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = _load_config(ModelConfig, folder)
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype)
    reader = _Reader(folder)
    present = set(reader.keys())

    def build(config):
        with torch.device("meta"), _no_weight_init():
            model = DeepSeekModel(config)
        if keep_fp8:
            from .fp8 import quantize_model_for_inference

            fp8_names = {k[: -len(".weight_scale_inv")] for k in present if k.endswith(".weight_scale_inv")}
            with torch.device("meta"), _no_weight_init():
                quantize_model_for_inference(model, skip=lambda name, m: name not in fp8_names)
        return model, expected_hf_shapes(model)

    model, expected = build(config)
    if config.num_nextn_predict_layers > 0:
        # transformers writes num_nextn_predict_layers: 1 (its default) but never saves the MTP layer: a folder with
        # every tensor but the MTP ones is a model without MTP
        mtp = {k for k in expected if (_layer_index(k) or 0) >= config.num_hidden_layers}
        if not mtp & present and all(k in present for k in expected if k not in mtp):
            warnings.warn(f"{folder}: config.json sets num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                          f"checkpoint holds no MTP tensors (as transformers writes it); loading it without MTP "
                          f"(num_nextn_predict_layers=0)", stacklevel=2)
            config = config.replace(num_nextn_predict_layers=0)
            model, expected = build(config)
    scale_names = {k for k in present if k.endswith(".weight_scale_inv")}
    # scales of fused experts are checked through their weights; other scales must belong to a known weight
    ignore = {k for k in scale_names if k[: -len("_scale_inv")] in expected}
    problems, unexpected = check_tensors(reader, expected, present, ignore)
    mtp_extra = [k for k in unexpected if _layer_index(k) is not None and _layer_index(k) >= config.num_hidden_layers]
    if mtp_extra and config.num_nextn_predict_layers == 0:
        problems.append("the checkpoint has MTP layers but config.num_nextn_predict_layers is 0")
    if problems and strict:
        raise CheckpointError(f"{folder}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))

    # to_empty, without empty_like: on meta tensors it runs torch._refs, which imports sympy (~1 s a process)
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.to(dtype)
    if config.tie_word_embeddings:  # to_empty unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    state = model.state_dict()
    loaded = set()
    with torch.no_grad():
        if problems:  # to_empty leaves whatever was in memory: what is not loaded below gets the normal init
            _init_unloaded(model, state, present, config.initializer_range)
        for name, target in state.items():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                _load_experts(reader, name, target, present, dtype)
                loaded.add(name)
                continue
            if name.endswith("weight_scale_inv"):
                if name in present:
                    target.copy_(reader.get(name))
                continue
            if name not in present:
                continue
            if target.dtype == torch.float8_e4m3fn:
                target.copy_(reader.get(name))
            else:
                target.copy_(_dequant(reader, name, target.dtype))
            loaded.add(name)
        if not strict:
            model.load_problems = problems  # what strict mode would have raised
    model.eval()
    return model


def _init_unloaded(model: DeepSeekModel, state: dict, present: set, std: float) -> None:
    """Give every tensor of `state` that the checkpoint does not fully provide the model's normal init
    (normal(0, std) matrices, ones for norms, zeros for biases and the selection bias, ones for FP8 scales)."""
    for name, t in state.items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            keys = [f"{prefix}.{e}.{part}.weight" for e in range(t.shape[0]) for part in ("gate_proj", "up_proj")]
        elif name.endswith("experts.down_proj"):
            keys = [f"{prefix}.{e}.down_proj.weight" for e in range(t.shape[0])]
        else:
            keys = [name]
        if all(k in present for k in keys):
            continue
        if name.endswith("weight_scale_inv"):
            t.fill_(1.0)
        elif t.dim() >= 2:
            t.copy_(torch.randn(t.shape, dtype=torch.float32) * std)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.fill_(1.0)


def check_tensors(reader: "_Reader", expected: dict, present: set, ignore: set = frozenset()) -> tuple[list, list]:
    """Compare a checkpoint's tensors with the expected name -> shape map. Returns (problems, unexpected
    names): one line each for the missing, the unexpected (minus `ignore`), every mis-shaped tensor and every
    tensor that is not floating point (integer or bool data where weights belong).
    Mis-shaped and non-float names are removed from `present`, so they are never copied, even when strict=False."""
    def listing(kind, names):
        return f"{kind} tensors ({len(names)}): {', '.join(names[:50])}" + (" ..." if len(names) > 50 else "")

    problems = []
    missing = sorted(k for k in expected if k not in present)
    unexpected = sorted(k for k in present - set(expected) if k not in ignore)
    if missing:
        problems.append(listing("missing", missing))
    if unexpected:
        problems.append(listing("unexpected", unexpected))
    for k, shape in expected.items():
        if k in present:
            got = reader.shape(k)
            if got != shape:
                problems.append(f"{k}: shape {list(got)} in {reader.where[k].name}, expected {list(shape)}")
                present.discard(k)
    for k in sorted(present & (set(expected) | set(ignore))):
        dt = reader.dtype(k)
        if dt not in _ST_FLOAT:
            problems.append(f"{k}: dtype {dt} in {reader.where[k].name}, expected a floating-point tensor")
            present.discard(k)
    return problems, unexpected


def _layer_index(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _load_experts(reader: _Reader, name: str, target: torch.Tensor, present: set, dtype) -> None:
    prefix = name.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
    fused_gate_up = name.endswith("gate_up_proj")
    I = target.shape[1] // 2 if fused_gate_up else None
    for e in range(target.shape[0]):
        if fused_gate_up:
            for part, rows in (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))):
                key = f"{prefix}.{e}.{part}.weight"
                if key in present:
                    target[e, rows].copy_(_dequant(reader, key, target.dtype))
        else:
            key = f"{prefix}.{e}.down_proj.weight"
            if key in present:
                target[e].copy_(_dequant(reader, key, target.dtype))


# ---------------------------------------------------------------------------------------------- saving
def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Size-bounded shards in name order, each written to a temp file then renamed; stale shards removed."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards, cur, cur_bytes = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = tensors[k]
        cur_bytes += n
    shards.append(cur)
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        save_file({k: v.clone() for k, v in shard.items()}, str(tmp), metadata={"format": "pt"})  # clone: no shared storage
        os.replace(tmp, folder / name)
    index = folder / INDEX_NAME
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        os.replace(tmp, index)
        if (folder / SINGLE_NAME).exists():
            (folder / SINGLE_NAME).unlink()
    elif index.exists():
        index.unlink()
    for stale in folder.glob("model-*-of-*.safetensors"):
        if stale.name not in names:
            stale.unlink()


def save_pretrained(model: DeepSeekModel, path, max_shard_bytes: int = 5 * 1024 ** 3, dtype: torch.dtype | None = None,
                    fp8: bool = False, tokenizer=None) -> Path:
    """Write config.json and safetensors shards (plus index when sharded) atomically into `path`.

    fp8=True quantises every Linear weight (not embeddings, heads, router, norms, the indexer's weights_proj, the
    MTP eh_proj) to float8_e4m3fn with 128x128 weight_scale_inv blocks, as the published checkpoints are stored, and
    writes their quantization_config unchanged (no skip list: loaders tell FP8 weights by their module classes or
    by the weight_scale_inv beside them; docs/model.md, FP8)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    config = model.config
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
                   for k, v in tensors.items()}
        config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    if fp8:
        from .fp8 import quantize_weight_blocks

        q = {}
        for k, v in tensors.items():
            if k.endswith(".weight") and v.dim() == 2 and not _NOT_QUANTISED.search(k):
                w, s = quantize_weight_blocks(v.float())
                q[k], q[k[: -len("weight")] + "weight_scale_inv"] = w, s
            else:
                q[k] = v
        tensors = q
        config = config.replace(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                     "weight_block_size": [128, 128]})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_shards(folder, tensors, max_shard_bytes)
    config.save(folder)
    write_generation_config(folder, config.bos_token_id, config.eos_token_id)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


# DeepSeek-V3's published generation_config.json: what `nanoseek generate/chat`, the server and transformers'
# generate() use when the caller names no temperature / top_p.
GENERATION_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}


def write_generation_config(folder, bos_token_id, eos_token_id) -> None:
    """generation_config.json (transformers' GenerationConfig) with GENERATION_DEFAULTS, atomically."""
    import json
    import os
    import tempfile

    data = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": True, **GENERATION_DEFAULTS}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="generation_config.json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, Path(folder) / "generation_config.json")


def generation_defaults(folder) -> dict:
    """{temperature, top_p} from a model folder's generation_config.json (either may be missing there), else
    GENERATION_DEFAULTS' for a folder without one. A damaged file is a CheckpointError naming it."""
    import json

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return dict(GENERATION_DEFAULTS)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        out = {k: float(data[k]) for k in ("temperature", "top_p") if data.get(k) is not None}
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if data.get("do_sample") is False:  # transformers: greedy whatever the temperature says
        out["temperature"] = 0.0
    return out

