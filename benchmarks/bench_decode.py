"""Decode speed and cache size: nanoseek's Engine against transformers' `generate`, plus MTP speculative decoding.

Same weights in both (nanoseek's model copied into DeepseekV3ForCausalLM), same threads, fp32 on CPU, greedy,
a fixed number of new tokens. Decode tokens/s = B * (N - 1) / (time(N new tokens) - time(1 new token)), so
prefill is left out. Cache bytes per token: nanoseek's LatentCache (latent + roped key per layer) against the
tensors transformers' DynamicCache actually holds after generate. MTP: the MTP module is first fitted briefly
(main model frozen) on the main model's own greedy continuations, then speculative decoding is timed against
plain greedy at batch 1.

    python benchmarks/bench_decode.py --quick          # seconds
    python benchmarks/bench_decode.py --config small   # the ~75M-parameter preset (default: bench, ~8M)
    python benchmarks/bench_decode.py --threads 1 --mtp-steps 0 --batches 1 16 64 --gemm-floor   # + what the
                                                       # weight GEMMs alone cost a step: the ceiling of the ratio

Weight formats (`--formats`): the same model in each nanoseek.quant format, each through the Engine it gets by
default (fp32 / bf16 / int8 per channel: the FastDecoder step; the group-wise int and fp8 weights: the generic
forward, so an fp32 generic-forward row is added as their like-for-like reference), decode tokens/s at each batch
with the formats alternating within every round, and the ratio to fp32; `--model` times a trained folder:

    python benchmarks/bench_decode.py --threads 1 --formats fp32 bf16 int8 int8-g128 int4-g128 fp8
    python benchmarks/bench_decode.py --threads 1 --formats fp32 bf16 int8 --model runs/main/grpo/model
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanoseek import DeepSeekModel, ModelConfig  # noqa: E402
from nanoseek.engine import Engine, SamplingParams, speculative_generate  # noqa: E402


def build_config(name: str, quick: bool) -> ModelConfig:
    if name == "bench":  # the ~8.5M-parameter config the training benchmark uses (the reference scale)
        from bench_train import CONFIGS

        cfg = ModelConfig(**{**CONFIGS["bench"], "num_nextn_predict_layers": 1})
    else:
        cfg = ModelConfig.from_preset(name, torch_dtype="float32")
    if quick:  # tiny sizes: the whole script in seconds
        cfg = ModelConfig.from_preset("tiny", torch_dtype="float32", vocab_size=512, num_hidden_layers=2)
    return cfg


def hf_twin(model: DeepSeekModel):
    """transformers DeepseekV3ForCausalLM holding exactly `model`'s main-model weights, set up for greedy generate."""
    from bench_train import hf_twin as twin

    ref = twin(model).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref


def median_ms(fn, repeats: int = 20) -> float:
    """Milliseconds of fn(), the median of `repeats` calls after two warm-up calls."""
    ts = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts[2:])[repeats // 2]


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def hf_generate(ref, prompts: torch.Tensor, n: int):
    return ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, return_dict_in_generate=True)


def decode_rates(runs: list, B: int, n: int, repeats: int = 3) -> list[float]:
    """Decode tokens/s of each run(k) (k new tokens): B * (n - 1) / (best time(n) - best time(1)). The runs are
    interleaved so that a noisy neighbour on the machine hurts all of them alike."""
    for run in runs:
        run(1), run(n)  # warm-up
    best = [[float("inf"), float("inf")] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            for j, k in enumerate((1, n)):
                t = time.perf_counter()
                run(k)
                best[i][j] = min(best[i][j], time.perf_counter() - t)
    return [B * (n - 1) / max(tn - t1, 1e-9) for t1, tn in best]


def gemm_floor_ms(model: DeepSeekModel, B: int, repeats: int = 20) -> tuple[float, float]:
    """(all, routed experts) milliseconds a B-row decode step spends in its weight GEMMs alone: every weight matrix
    of the main model (no embedding, no MTP) times the rows that reach it (B for attention, MLPs, router and output
    head; the routed experts get B * K (token, expert) pairs spread evenly over min(E, B * K) experts), in order,
    so the weights stream through the caches as in a real step. The routed experts take the faster of the two
    forms the decode steps use: one F.linear per expert hit, or each layer's pairs as one bmm over their gathered
    weights (the compiled step's gather path). Attention over the cache, norms, routing and sampling are left out
    (median of repeats)."""
    cfg, K = model.config, model.config.num_experts_per_tok
    dense, experts = [], []
    for layer in model.model.layers[: cfg.num_hidden_layers]:
        for mod in layer.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, torch.nn.Linear) and w is not None and w.dim() == 2:
                dense.append(w)
            elif hasattr(mod, "gate_up_proj"):  # routed experts: (E, 2I, D) and (E, D, I)
                experts.append((mod.gate_up_proj, mod.down_proj))
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and getattr(gate, "weight", None) is not None and not isinstance(gate, torch.nn.Linear):
            dense.append(gate.weight)  # the router
    dense.append(model.lm_head.weight)
    pairs = B * K
    ids = torch.arange(pairs) % min(cfg.n_routed_experts, pairs)  # even spread, sorted below
    ids = ids.sort().values
    x = {n: torch.randn(B, n, dtype=dense[0].dtype) for n in {w.shape[1] for w in dense}}
    xp = {n: torch.randn(pairs, n, dtype=dense[0].dtype) for n in (cfg.hidden_size, cfg.moe_intermediate_size)}
    hit = ids.unique().tolist()
    rows = {e: (ids == e).nonzero().squeeze(1) for e in hit}

    def per_expert():
        for w_gu, w_down in experts:
            for e in hit:
                F.linear(xp[cfg.hidden_size][rows[e]], w_gu[e])
                F.linear(xp[cfg.moe_intermediate_size][rows[e]], w_down[e])

    def gathered():
        for w_gu, w_down in experts:
            torch.bmm(xp[cfg.hidden_size].unsqueeze(1), w_gu[ids].transpose(1, 2))
            torch.bmm(xp[cfg.moe_intermediate_size].unsqueeze(1), w_down[ids].transpose(1, 2))

    with torch.no_grad():
        e_ms = min(median_ms(per_expert, repeats), median_ms(gathered, repeats)) if experts else 0.0
        d_ms = median_ms(lambda: [F.linear(x[w.shape[1]], w) for w in dense], repeats)
    return d_ms + e_ms, e_ms


def fit_mtp(model: DeepSeekModel, prompts: list[list[int]], new: int, steps: int, lr: float = 2e-3,
            batch: int = 8) -> tuple[list[float], list[list[int]]]:
    """Train only the MTP module on the main model's greedy continuations of `prompts` (loss: cross-entropy of
    the MTP logits at i against token i+2; minibatches of `batch` sequences). Returns (losses, sequences)."""
    eng = Engine(model, max_batch_size=16, max_len=len(prompts[0]) + new + 1, eos_token_ids=[])
    outs = eng.generate(prompts, SamplingParams(max_tokens=new, temperature=0))
    seqs = torch.tensor([o.prompt_ids + o.outputs[0].token_ids for o in outs])  # (N, T)
    with torch.no_grad():
        h = torch.cat([model(s).hidden for s in seqs.split(16)])  # (N, T, D): the frozen main model, once
    N, T = seqs.shape
    pos = torch.arange(T - 1).expand(batch, T - 1)
    params = [p for layer in model.mtp_layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        b = torch.randperm(N, generator=gen)[:batch]
        logits, _ = model.mtp_step(1, h[b, :-1], seqs[b, 1:], pos[: len(b)])  # [:, i] predicts token i+2
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 seqs[b, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return losses, seqs.tolist()


def spec_vs_plain(model: DeepSeekModel, prompts: list[list[int]], n: int, compile: bool = False
                  ) -> tuple[float, float, list]:
    """Seconds for plain greedy (Engine, batch 1) and MTP speculative decoding over the prompts, and the
    speculative outputs (checked identical to plain greedy). compile: both with the compiled steps (a first
    untimed pass compiles)."""
    eng = Engine(model, max_batch_size=1, max_len=len(prompts[0]) + n + 1, eos_token_ids=[], compile=compile)
    greedy = SamplingParams(max_tokens=n, temperature=0)
    if compile:
        [(eng.generate([p], greedy), speculative_generate(model, p, n, compile=True)) for p in prompts]
    plain_s = timed(lambda: [eng.generate([p], greedy) for p in prompts], 2)
    spec: list = []
    spec_s = timed(lambda: spec.__setitem__(slice(None), [speculative_generate(model, p, n, compile=compile)
                                                           for p in prompts]), 2)
    want = [eng.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    if [s.token_ids for s in spec] != want:
        raise RuntimeError("speculative decoding diverged from plain greedy decoding")
    return plain_s, spec_s, spec


def format_models(model: DeepSeekModel, formats: list[str]) -> dict[str, DeepSeekModel]:
    """One copy of `model` per weight format (fp32 = the model itself), quantised by nanoseek.quant."""
    from nanoseek.quant import quantize

    out = {}
    for fmt in formats:
        m = model if fmt == "fp32" else copy.deepcopy(model)
        if fmt != "fp32":
            quantize(m, fmt)
        out[fmt] = m.eval()
    return out


def bench_formats(model: DeepSeekModel, args) -> tuple[list, dict]:
    """Decode tokens/s of every format at every batch (formats alternating within each round); returns rows
    (batch, {name: (tok/s, greedy tokens equal to fp32's, tokens)}) and the models."""
    models = format_models(model, args.formats)
    n, cfg, rows = args.new_tokens, model.config, []
    for B in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
        mk = dict(max_batch_size=B, max_len=args.prompt_len + n + 1, eos_token_ids=[])
        engines = {f: Engine(m, **mk) for f, m in models.items()}
        if any(e.fast is None for e in engines.values()) and engines["fp32"].fast is not None:
            engines["fp32 (generic forward)"] = Engine(models["fp32"], fast_decode=False, **mk)
        if args.compile:  # the compiled step of each format that has one, compiled before the timing
            for f, m in models.items():
                if engines[f].fast is not None:
                    engines[f"{f} compiled"] = Engine(m, compile=True, **mk)
                    engines[f"{f} compiled"].generate(prompts, SamplingParams(max_tokens=n, temperature=0))
        runs = [lambda k, e=e: e.generate(prompts, SamplingParams(max_tokens=k, temperature=0))
                for e in engines.values()]
        rates = decode_rates(runs, B, n, args.repeats)
        greedy = SamplingParams(max_tokens=n, temperature=0)
        toks = {f: [o.outputs[0].token_ids for o in e.generate(prompts, greedy)] for f, e in engines.items()}
        same = {f: sum(a == b for x, y in zip(t, toks["fp32"]) for a, b in zip(x, y)) for f, t in toks.items()}
        rows.append((B, {f: (r, same[f], B * n) for f, r in zip(engines, rates)}))
    return rows, models


def print_formats(rows: list, models: dict, threads: int) -> None:
    from nanoseek.engine.fast_decode import unsupported_reason
    from nanoseek.quant import state_bytes

    batches = [B for B, _ in rows]
    print("| format | decode step | weights in memory | " + " | ".join(f"batch {B} tok/s | vs fp32" for B in batches)
          + " | greedy tokens equal to fp32's |")
    print("|---|---|---:|" + "---:|---:|" * len(batches) + "---:|")
    for name in rows[0][1]:
        fmt = name.split(" ")[0]
        step = ("generic" if "generic" in name or unsupported_reason(models[fmt]) is not None
                else "FastDecoder, compiled" if name.endswith("compiled") else "FastDecoder")
        cells = []
        for _, res in rows:
            r, base = res[name][0], res["fp32"][0]
            cells.append(f"{r:,.1f} | {r / base:.2f}x")
        same = ", ".join(f"{res[name][1]}/{res[name][2]}" for _, res in rows)
        print(f"| {name} | {step} | {state_bytes(models[fmt]):,} B | " + " | ".join(cells) + f" | {same} |")
    print(f"\n{threads} threads; decode tokens/s = B * (N - 1) / (time(N tokens) - time(1 token)), best of the "
          "alternating rounds; ratios against the fp32 row (the Engine's default step).")


def run_formats(model: DeepSeekModel, args) -> None:
    """`--formats`: fp32 first (the reference), then the others, each once."""
    args.formats = ["fp32"] + [f for f in dict.fromkeys(args.formats) if f != "fp32"]
    print(f"config {'tiny (quick)' if args.quick else args.config}: {model.config.num_parameters() / 1e6:.1f}M "
          f"parameters, formats {' '.join(args.formats)}, {args.threads} threads, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, batches {args.batches}\n")
    rows, models = bench_formats(model, args)
    print_formats(rows, models, args.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["bench", "small", "tiny"], default="bench", help="model preset (fp32 on CPU)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per sequence (greedy, no EOS)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    ap.add_argument("--mtp-steps", type=int, default=100, 
                    help="MTP fitting steps (minibatch 8) before the speculative run")
    ap.add_argument("--mtp-seqs", type=int, default=64, help="self-generated sequences the MTP module is fitted on")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--quantize", default=None, choices=["fp32", "bf16", "int8", "int8-g128", "int4-g128", "fp8"],
                    help="nanoseek's weights in this format (nanoseek.quant; transformers stays fp32, bf16 for bf16); "
                         "int and fp8 weights run the generic forward (no FastDecoder, no compile, no MTP section)")
    ap.add_argument("--formats", nargs="+", default=None, metavar="FMT",
                    choices=["fp32", "bf16", "int8", "int8-g128", "int4-g128", "fp8"],
                    help="time only the Engine's decode with the weights in each format (fp32 always included as the "
                         "reference), formats alternating within each round; no transformers, no MTP section")
    ap.add_argument("--model", default=None,
                    help="with --formats: a trained float model folder (a pipeline's grpo/model) instead of --config's "
                         "random weights")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; each contender's best counts")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="also each batch's weight-GEMM time alone (gemm_floor_ms) and the ratio to transformers it "
                         "allows")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="leave out Engine(compile=True) (torch.compile of the decode step; needs a C++ compiler)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.prompt_len, args.mtp_steps, args.mtp_seqs, args.batches = 16, 8, 30, 16, [1, 4]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model and not args.formats:
        ap.error("--model times a folder's weight formats: give --formats too")
    if args.gemm_floor and (args.formats or args.quantize not in (None, "fp32", "bf16")):
        ap.error("--gemm-floor times float weights (fp32 or --quantize bf16), without --formats")
    if args.model:
        from nanoseek.model import load_model

        model = load_model(args.model, dtype=torch.float32).eval()
        args.config = args.model
    else:
        model = DeepSeekModel(build_config(args.config, args.quick)).eval()
    cfg = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    if args.formats:
        return run_formats(model, args)
    ref = hf_twin(model)
    if args.quantize not in (None, "fp32"):
        from nanoseek.engine.fast_decode import unsupported_reason
        from nanoseek.quant import quantize, state_bytes

        quantize(model, args.quantize)
        if args.quantize == "bf16":
            ref.to(torch.bfloat16)
        print(f"nanoseek weights in {args.quantize}: {state_bytes(model):,} bytes in memory")
        if unsupported_reason(model) is not None:
            args.compile, args.mtp_steps = False, 0
    n = args.new_tokens
    print(f"config {'tiny (quick)' if args.quick else args.config}: {cfg.num_parameters() / 1e6:.1f}M parameters, "
          f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts (top-{cfg.num_experts_per_tok}), "
          f"{args.quantize or 'fp32'}, "
          f"{args.threads} threads, prompt {args.prompt_len}, {n} new tokens, greedy\n")

    rows, compile_s = [], {}
    hf_cache = None
    for B in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len))
        eng = Engine(model, max_batch_size=B, max_len=args.prompt_len + n + 1, eos_token_ids=[])
        generic = Engine(model, max_batch_size=B, max_len=args.prompt_len + n + 1, eos_token_ids=[], fast_decode=False)
        engines = [eng, generic]
        if args.compile:
            engines.insert(0, Engine(model, max_batch_size=B, max_len=args.prompt_len + n + 1, eos_token_ids=[],
                                     compile=True))
            t = time.perf_counter()
            engines[0].generate(prompts.tolist(), SamplingParams(max_tokens=n, temperature=0))
            compile_s[B] = time.perf_counter() - t
        greedy = SamplingParams(max_tokens=n, temperature=0)
        rates = decode_rates([
            *[lambda k, e=e: e.generate(prompts.tolist(), SamplingParams(max_tokens=k, temperature=0)) for e in engines],
            lambda k: hf_generate(ref, prompts, k)], B, n, args.repeats)
        out = hf_generate(ref, prompts, n)
        agree = [sum(a == b for a, b in zip([o.outputs[0].token_ids for o in e.generate(prompts.tolist(), greedy)],
                                            out.sequences[:, args.prompt_len:].tolist())) for e in engines]
        rows.append((B, rates, agree))
        cache = out.past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        hf_cache = held / (B * cache.layers[0].keys.shape[-2])
        our_cache = eng.cache.bytes_per_token()

    names = (["Engine(compile=True)"] if args.compile else []) + ["Engine (FastDecoder)", "Engine(fast_decode=False)"]
    print("| batch | " + " | ".join(f"nanoseek {m} tok/s | ratio" for m in names)
          + " | transformers generate tok/s | identical greedy outputs |")
    print("|---:|" + "---:|---:|" * len(names) + "---:|---:|")
    for B, rates, agree in rows:
        theirs = rates[-1]
        print(f"| {B} | " + " | ".join(f"{r:.1f} | {r / theirs:.2f}x" for r in rates[:-1])
              + f" | {theirs:.1f} | {'/'.join(map(str, agree))} of {B} |")
    if args.gemm_floor:
        print("\n| batch | transformers step ms | nanoseek's best step ms | weight GEMMs alone ms | of which routed "
              "experts | ceiling vs transformers |")
        print("|---:|---:|---:|---:|---:|---:|")
        for B, rates, _ in rows:
            floor, ex = gemm_floor_ms(model, B)
            print(f"| {B} | {1e3 * B / rates[-1]:.2f} | {1e3 * B / max(rates[:-1]):.2f} | {floor:.2f} | {ex:.2f} | "
                  f"{1e3 * B / rates[-1] / floor:.2f}x |")
    if args.compile:
        print("\nfirst generate with Engine(compile=True), compiling included: "
              + ", ".join(f"batch {B}: {s:.0f} s" for B, s in compile_s.items()))
    print("\n| cache | bytes per token (all layers) | ratio |")
    print("|---|---:|---:|")
    print(f"| nanoseek LatentCache (latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim}) "
          f"| {our_cache:,} | 1.00x |")
    print(f"| transformers DynamicCache (as held after generate) | {hf_cache:,.0f} | {hf_cache / our_cache:.2f}x |")
    H, L, f32 = cfg.num_attention_heads, cfg.num_hidden_layers, 4
    mha = H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * L * f32
    print(f"| expanded per-head K, V (an MHA cache; computed) | {mha:,} | {mha / our_cache:.2f}x |")

    if args.mtp_steps == 0:
        print("\nMTP section skipped (--mtp-steps 0, or quantised weights, which the MTP fit cannot train through)")
        return
    # MTP speculative decoding after a quick fit of the MTP module on self-generated text
    train_prompts = torch.randint(0, cfg.vocab_size, (args.mtp_seqs, args.prompt_len)).tolist()
    t = time.perf_counter()
    losses, _ = fit_mtp(model, train_prompts, n, args.mtp_steps)
    fit_s = time.perf_counter() - t
    held_out = torch.randint(0, cfg.vocab_size, (4, args.prompt_len)).tolist()
    print(f"\nMTP fit: {args.mtp_steps} steps on {args.mtp_seqs} self-generated sequences in {fit_s:.0f} s, "
          f"loss {sum(losses[:5]) / 5:.2f} -> {sum(losses[-5:]) / 5:.2f} (main model frozen)\n")
    print("| batch 1, greedy, 4 prompts | steps | plain tok/s | speculative tok/s | speed-up | acceptance "
          "| main forwards (plain -> spec) | outputs identical |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for compile in (False, True) if args.compile else (False,):
        for name, prompts in (("held-out prompts", held_out), ("training prompts", train_prompts[:4])):
            plain_s, spec_s, spec = spec_vs_plain(model, prompts, n, compile)
            drafted, accepted = sum(s.num_drafted for s in spec), sum(s.num_accepted for s in spec)
            tokens = len(prompts) * n
            print(f"| {name} | {'compiled' if compile else 'eager'} | {tokens / plain_s:.1f} | {tokens / spec_s:.1f} "
                  f"| {plain_s / spec_s:.2f}x | {accepted / max(1, drafted):.2f} "
                  f"| {tokens} -> {sum(s.num_main_forwards for s in spec)} | yes |")


if __name__ == "__main__":
    main()
