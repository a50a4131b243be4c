"""FP8 training against the same run without FP8: the loss gap (the V3 report: under 0.25% relative),
and on a GPU the step time of FP8 against bf16. Both runs share the data, the initial weights and the
seed, side by side in one invocation.

    python benchmarks/bench_fp8.py              # tiny preset, 150 steps on CPU (a few minutes): the loss gap
    python benchmarks/bench_fp8.py --quick      # seconds
    python benchmarks/bench_fp8.py --gemm       # GPU: one Linear forward+backward at DeepSeek-V3 shapes
    python benchmarks/bench_fp8.py --step       # GPU: a whole training step (fwd + bwd + clip + AdamW)
    python benchmarks/bench_fp8.py --quant      # GPU: the Triton quantisers alone (--tune: then use the fastest)

--gemm and --step time bf16 (autocast over fp32 master weights, as the trainer runs) against the FP8 recipe
(nanoseek.fp8: Hopper blockwise scaled_mm) with the PyTorch quantisers and with the Triton ones, the
contenders alternating within every round; CUDA events / synchronised clocks, warm-ups excluded, medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek.train.common import read_metrics
from nanoseek.train.pretrain import PretrainConfig, pretrain


def run(out: str, fp8: bool, args) -> tuple[list[dict], float]:
    cfg = PretrainConfig(out_dir=out, preset=args.preset, steps=args.steps, seq_len=args.seq_len,
                         batch_size=args.batch_size, warmup=max(1, args.steps // 10), lr=args.lr, fp8=fp8,
                         embedded_docs=args.docs, vocab_size=args.vocab, eval_every=args.steps, save_every=args.steps,
                         log_every=5, tensorboard=False, seed=0, device=args.device, digit_group=1,
                         embedded_tasks=["arithmetic"], embedded_levels=[1, 2])
    t = time.perf_counter()
    pretrain(cfg)
    return read_metrics(out), time.perf_counter() - t


def loss_gap(args):
    if args.quick:
        args.steps, args.seq_len, args.batch_size, args.docs, args.vocab = 10, 64, 4, 300, 400
    with tempfile.TemporaryDirectory() as d:
        ref, t_ref = run(f"{d}/ref", False, args)
        f8, t_f8 = run(f"{d}/fp8", True, args)
    last = lambda m: [r["loss"] for r in m if "loss" in r][-4:]
    a, b = sum(last(f8)) / 4, sum(last(ref)) / 4
    ev = lambda m: [r["eval_loss"] for r in m if "eval_loss" in r][-1]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.machine()
    print(f"# FP8 vs high precision, preset {args.preset}, {args.steps} steps x {args.batch_size}x{args.seq_len} tokens, "
          f"{dev}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| run | final train loss (mean of last 4 logs) | held-out loss | wall time (s) |")
    print("|---|---|---|---|")
    print(f"| high precision | {b:.4f} | {ev(ref):.4f} | {t_ref:.0f} |")
    print(f"| FP8 (V3 recipe) | {a:.4f} | {ev(f8):.4f} | {t_f8:.0f} |")
    print(f"relative train-loss gap {100 * (a - b) / b:+.2f}%, held-out gap {100 * (ev(f8) - ev(ref)) / ev(ref):+.2f}% "
          f"(V3 report: < 0.25%); time ratio FP8/ref {t_f8 / t_ref:.2f}x")


# ---------------------------------------------------------------------------------------------- GPU timing
def _rounds(fns: dict, warmup: int, reps: int, events: bool = True) -> dict:
    """Median milliseconds of each fn; the contenders alternate within every round (fairness under clock drift)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if events:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times[k].append(a.elapsed_time(b))
            else:  # host clock around a synchronised step: includes the CPU-side launch and sync overhead
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def _with_triton(on: bool, fn):
    from nanoseek import fp8_triton

    def call():
        old, fp8_triton.TRITON_QUANTIZE = fp8_triton.TRITON_QUANTIZE, on
        try:
            return fn()
        finally:
            fp8_triton.TRITON_QUANTIZE = old
    return call


def bench_quant(args, tune: bool) -> dict:
    """The Triton quantisers alone at DeepSeek-V3 shapes, for each launch shape in a small sweep: median time,
    achieved bandwidth (bytes read + written once), and whether the output is bit-identical to the PyTorch ops.
    tune: keep, per kernel, the fastest bit-identical launch shape for the --gemm / --step runs that follow."""
    from nanoseek import fp8, fp8_triton

    dev = torch.device("cuda")
    info = fp8.fp8_backend_info(dev)
    if not info["triton_quantize"]:
        print(f"Triton quantisers are off on this device: {info}")
        return {}
    default = dict(fp8_triton.TRITON_LAUNCH)
    sweeps = {"rows": [{"rows_br": br, "rows_warps": nw} for br, nw in ((32, 4), (16, 4), (64, 8))],
              "cols": [{"cols_warps": nw, "cols_tmode": tm} for nw in (8, 16) for tm in (0, 1)],
              "blocks": [{"blocks_warps": nw, "blocks_tmode": tm} for nw in (8, 16) for tm in (0, 1)],
              "all (conversion)": [{"fp32->e4m3": "hardware cvt"}, {"fp32->e4m3": "c10 bit arithmetic"}]}
    soft0 = dict(fp8_triton._SOFT_CVT)  # what the probe chose: tuning never changes it
    print(f"\n# Triton quantisers alone, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"defaults {default}, fp32->e4m3 by {info['notes'].get('triton_cvt')}")
    print("| shape | kernel | launch | median us | GB/s | bit-identical |")
    print("|---|---|---|---:|---:|---|")
    totals, out = {}, []
    for M, K, N in ((args.m, 7168, 2048), (args.m, 7168, 18432)):
        g0 = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(M, K, device=dev, generator=g0).bfloat16()
        w = torch.randn(N, K, device=dev, generator=g0) / K ** 0.5
        gy = torch.randn(M, N, device=dev, generator=g0).bfloat16()
        Mp, Np, Kp = (fp8._round_up(d) for d in (M, N, K))
        qx, sx = fp8._act_operands_torch(x, Mp, Kp)
        jobs = {  # kernel family: [(name, run, torch twin, bytes)]
            "rows": [("x 1x128 (fprop)", lambda: fp8_triton.act_operands(x, Mp, Kp), (qx, sx), 3 * M * K)],
            "cols": [("g 1x128 + 128x1 (dgrad, wgrad)", lambda: fp8_triton.cols_operands(gy, Mp, Np, True),
                      fp8._cols_operands_torch(gy, Mp, Np, True), 4 * M * N),
                     ("x 128x1 from its fp8 copy (wgrad)", lambda: fp8_triton.cols_operands(qx, Mp, Kp, False, sx),
                      fp8._cols_operands_torch(qx, Mp, Kp, False, sx), 2 * M * K)],
            "blocks": [("W 128x128 + W^T (fp32 master)", lambda: fp8_triton.weight_operands(w, Np, Kp),
                        fp8._weight_operands_torch(w, Np, Kp), 6 * N * K)],
        }
        jobs["all (conversion)"] = [j for fam in ("rows", "cols", "blocks") for j in jobs[fam]]
        for fam, cfgs in sweeps.items():
            for cfg in cfgs:
                fp8_triton.TRITON_LAUNCH.update(default)
                if "fp32->e4m3" in cfg:  # informative only: the hardware conversion vs c10's bit arithmetic
                    fp8_triton._SOFT_CVT.update(dict.fromkeys(soft0, cfg["fp32->e4m3"] != "hardware cvt"))
                else:
                    fp8_triton._SOFT_CVT.update(soft0)
                    fp8_triton.TRITON_LAUNCH.update(cfg)
                for name, fn, twin, nbytes in jobs[fam]:
                    got = fn()
                    same = all((a is None and b is None) or fp8_triton._bit_equal(a, b) for a, b in zip(twin, got))
                    ms = _rounds({name: fn}, 3, args.reps)[name]
                    key = (fam, tuple(sorted(cfg.items())))
                    if same:
                        totals[key] = totals.get(key, 0.0) + ms
                    else:
                        totals[key] = float("inf")
                    print(f"| {M}x{K}x{N} | {name} | {cfg} | {1e3 * ms:.0f} | {nbytes / ms / 1e6:.0f} | {same} |")
                    out.append({"shape": [M, K, N], "kernel": name, "launch": cfg, "ms": ms, "bytes": nbytes,
                                "bit_identical": same})
        del x, w, gy, qx, sx, jobs
    fp8_triton.TRITON_LAUNCH.update(default)
    fp8_triton._SOFT_CVT.update(soft0)
    best = {}
    for fam in ("rows", "cols", "blocks"):
        cands = {k: v for k, v in totals.items() if k[0] == fam}
        k = min(cands, key=cands.get)
        best.update(dict(k[1]))
    print(f"fastest bit-identical launch shapes (summed over both shapes): {best}")
    if tune:
        fp8_triton.TRITON_LAUNCH.update(best)
        if args.launch_out:
            with open(args.launch_out, "w") as f:
                json.dump(best, f)
    return {"rows": out, "best": best, "default": default}


# (in_features K, out_features N) of DeepSeek-V3 Linears
GEMM_SHAPES = {
    "q_a_proj 7168->1536": (7168, 1536),
    "kv_a_proj 7168->576": (7168, 576),
    "expert up 7168->2048": (7168, 2048),
    "expert down 2048->7168": (2048, 7168),
    "dense MLP up 7168->18432": (7168, 18432),
    "dense MLP down 18432->7168": (18432, 7168),
}


def bench_gemm(args) -> list[dict]:
    from nanoseek import fp8, fp8_triton

    dev = torch.device("cuda")
    info = fp8.fp8_backend_info(dev)
    print(f"# one Linear forward+backward, M={args.m} tokens, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; fp8 backend {info}, Triton launch {fp8_triton.TRITON_LAUNCH}")
    if not info["fast_path"]:
        print("FP8 fast path is OFF on this device: the FP8 numbers below are the reference (numerics) path")
    names = [n for n in GEMM_SHAPES if not args.shapes or any(s in n for s in args.shapes)]
    rows = []
    for name in names:
        K, N = GEMM_SHAPES[name]
        M = args.m
        g0 = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(M, K, device=dev, generator=g0).bfloat16().requires_grad_()
        w = (torch.randn(N, K, device=dev, generator=g0) / K ** 0.5).requires_grad_()  # fp32 master weight
        wb = w.detach().bfloat16().requires_grad_()
        gy = torch.randn(M, N, device=dev, generator=g0).bfloat16()

        def bf16_autocast():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = F.linear(x, w)
            return torch.autograd.grad(y, (x, w), gy)

        def bf16_weights():
            return torch.autograd.grad(F.linear(x, wb), (x, wb), gy)

        def fp8_step():
            return torch.autograd.grad(fp8.fp8_linear(x, w), (x, w), gy)

        Mp, Np, Kp = (fp8._round_up(d) for d in (M, N, K))
        xd = x.detach()
        qx, sx = fp8._act_operands(xd, Mp, Kp)
        qw, qwt, sw, swt = fp8._weight_operands(w.detach(), Np, Kp)
        qg, sg, qgt, sgt = fp8._cols_operands(gy, Mp, Np, True)
        _, _, qxt, sxt = fp8._cols_operands(qx, Mp, Kp, False, sx)

        def fp8_gemms_only():  # the three scaled_mm calls on ready operands: the floor for the FP8 path
            fp8._scaled_mm_nt(qx, sx, qw, sw, True, torch.bfloat16)
            fp8._scaled_mm_nt(qg, sg, qwt, swt, True, torch.bfloat16)
            fp8._scaled_mm_nt(qgt, sgt, qxt, sxt, False, torch.float32)

        def quantisers_only():
            q, s = fp8._act_operands(xd, Mp, Kp)
            fp8._weight_operands(w.detach(), Np, Kp)
            fp8._cols_operands(gy, Mp, Np, True)
            fp8._cols_operands(q, Mp, Kp, False, s)

        fns = {"bf16 autocast (fp32 master)": bf16_autocast, "bf16 (bf16 weights)": bf16_weights}
        if info["fast_path"]:
            fns["fp8 GEMMs only"] = fp8_gemms_only
        fns["fp8, PyTorch quantisers"] = _with_triton(False, fp8_step)
        fns["quantisers only, PyTorch"] = _with_triton(False, quantisers_only)
        if info["triton_quantize"]:
            fns["fp8, Triton quantisers"] = _with_triton(True, fp8_step)
            fns["quantisers only, Triton"] = _with_triton(True, quantisers_only)
        ms = _rounds(fns, args.warmup, args.reps)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref = F.linear(x, w).float()
        err = ((fp8.fp8_linear(x.detach(), w.detach()).float() - ref).norm() / ref.norm()).item()
        flop = 6.0 * M * K * N
        base = ms["bf16 autocast (fp32 master)"]
        print(f"\n## {name}: M={M} K={K} N={N}  (fp8 vs bf16 forward rel. error {err:.4f})")
        print("| variant | median ms | TFLOP/s | speed-up vs bf16 autocast |")
        print("|---|---:|---:|---:|")
        for k, v in ms.items():
            tf = "" if k.startswith("quantisers") else f"{flop / v / 1e9:.0f}"
            print(f"| {k} | {v:.3f} | {tf} | {base / v:.2f}x |")
        rows.append({"shape": name, "M": M, "K": K, "N": N, "ms": ms, "fwd_rel_err_vs_bf16": err})
        del x, w, wb, gy, qx, sx, qw, qwt, sw, swt, qg, sg, qgt, sgt, qxt, sxt
        torch.cuda.empty_cache()
    return rows


# a DeepSeek-V3-shaped MoE model (~1B parameters) whose Linear dims are multiples of 128 except kv_a (576)
STEP_MODEL = dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, num_hidden_layers=4,
                  first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, n_shared_experts=1,
                  num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=32768, max_position_embeddings=4096,
                  num_nextn_predict_layers=1, torch_dtype="float32")


def bench_step(args) -> dict:
    from nanoseek import DeepSeekModel, ModelConfig, fp8, fp8_triton
    from nanoseek.train import common as C
    from nanoseek.train.pretrain import lm_losses, update_expert_bias

    dev = torch.device("cuda")
    overrides = json.loads(args.overrides) if args.overrides else (STEP_MODEL if args.step_preset == "bench-1b" else {})
    preset = "small" if args.step_preset == "bench-1b" else args.step_preset
    mc = ModelConfig.from_preset(preset, **{"torch_dtype": "float32", **overrides})
    torch.manual_seed(0)
    base = DeepSeekModel(mc)
    base.init_weights(seed=0)
    base = base.to(dev).train()
    f8 = copy.deepcopy(base)
    names = fp8.convert_to_fp8_training(f8)
    opts = {m: C.make_optimizer(m, 1e-4) for m in (base, f8)}
    info = fp8.fp8_backend_info(dev)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\n# training step (fwd + bwd + clip + AdamW), {preset} + {overrides or 'no overrides'}: "
          f"{n_params / 1e6:.0f}M parameters, {len(names)} modules in FP8, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, fp8 backend {info}, Triton launch {fp8_triton.TRITON_LAUNCH}")
    results = []
    for B in args.step_batch:
        T = args.step_seq
        gen = torch.Generator(device=dev).manual_seed(0)
        batches = [torch.randint(0, mc.vocab_size, (B, T + 1), device=dev, generator=gen) for _ in range(4)]
        it = {id(base): 0, id(f8): 0}
        peak = {}

        def step(model, label):
            def fn():
                tokens = batches[it[id(model)] % len(batches)]
                it[id(model)] += 1
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(tokens[:, :-1], mtp=True)
                main, mtp = lm_losses(model, out, tokens, None)
                loss = main + 0.3 * torch.stack(mtp).mean() + 1e-4 * out.balance_loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opts[model].step()
                opts[model].zero_grad(set_to_none=True)
                update_expert_bias(model, [r.load for r in out.router], 1e-3)
                peak[label] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
            return fn

        fns = {"bf16 autocast": step(base, "bf16 autocast"),
               "fp8, PyTorch quantisers": _with_triton(False, step(f8, "fp8, PyTorch quantisers"))}
        if info["triton_quantize"]:
            fns["fp8, Triton quantisers"] = _with_triton(True, step(f8, "fp8, Triton quantisers"))
        ms = _rounds(fns, args.warmup, args.reps, events=False)
        print(f"\nbatch {B} x {T} tokens")
        print("| variant | median step ms | tokens/s | speed-up vs bf16 | step peak memory over params+states (GiB) |")
        print("|---|---:|---:|---:|---:|")
        for k, v in ms.items():
            print(f"| {k} | {v:.1f} | {B * T / v * 1e3:,.0f} | {ms['bf16 autocast'] / v:.2f}x | {peak[k]:.2f} |")
        results.append({"batch": [B, T], "ms": ms, "peak_gib": peak})
        del batches
        torch.cuda.empty_cache()
    return {"preset": preset, "overrides": overrides, "params": n_params, "launch": dict(fp8_triton.TRITON_LAUNCH),
            "runs": results}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    g = ap.add_argument_group("GPU speed (--gemm / --step; replace the loss-gap run)")
    g.add_argument("--gemm", action="store_true", help="time one Linear fwd+bwd at DeepSeek-V3 shapes")
    g.add_argument("--step", action="store_true", help="time a whole training step, bf16 autocast vs FP8")
    g.add_argument("--quant", action="store_true", help="time the Triton quantisers alone over a launch-shape sweep")
    g.add_argument("--tune", action="store_true", help="--quant, then use its fastest launch shapes for --gemm/--step")
    g.add_argument("--launch-out", default=None, help="--tune: write the chosen launch shapes here (JSON, for "
                   "NANOSEEK_FP8_TRITON_LAUNCH)")
    g.add_argument("--m", type=int, default=8192, help="--gemm: tokens per GEMM")
    g.add_argument("--shapes", nargs="*", default=None, help="--gemm: substrings of the shape names to run")
    g.add_argument("--step-preset", default="bench-1b", help="--step: bench-1b (built in) or a preset name")
    g.add_argument("--overrides", default=None, help="--step: ModelConfig overrides as JSON")
    g.add_argument("--step-batch", type=int, nargs="+", default=[8], help="--step: batch sizes (same models)")
    g.add_argument("--step-seq", type=int, default=1024)
    g.add_argument("--warmup", type=int, default=5)
    g.add_argument("--reps", type=int, default=20)
    g.add_argument("--json", default=None, help="write the --gemm / --step results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.gemm or args.step or args.quant or args.tune):
        return loss_gap(args)
    if not torch.cuda.is_available():
        raise SystemExit("--gemm and --step need a CUDA GPU")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.quant or args.tune:
        res["quant"] = bench_quant(args, args.tune)
    if args.gemm:
        res["gemm"] = bench_gemm(args)
    if args.step:
        res["step"] = bench_step(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
