"""Forward+backward training throughput: nanoseek vs transformers DeepseekV3ForCausalLM, same config,
same weights, same threads, side by side in one run, at fp32 and bf16.

Precision rows: nanoseek bf16 = bf16 weights between steps, fp32 master weights and fp32 AdamW state
(nanoseek.precision.MasterWeights); transformers bf16 = the model cast to bf16 (`.to(torch.bfloat16)`, the
usual way to train it in bf16 without a trainer: bf16 weights AND bf16 AdamW state, no masters), fp32 =
both models in fp32. Every contender steps in turn (interleaved), and each one's median step is reported.

    python benchmarks/bench_train.py                 # small-like config (~8.5M params), 2 threads, fp32 + bf16
    python benchmarks/bench_train.py --threads 1 --precisions fp32,bf16
    python benchmarks/bench_train.py --quick         # seconds, for CI smoke
    python benchmarks/bench_train.py --profile bf16  # torch.profiler top ops of nanoseek's bf16 step
    python benchmarks/bench_train.py --config tiny --batch 16 --threads-sweep   # nanoseek at 1 vs 2 threads
    python benchmarks/bench_train.py --loss-gap 200  # pretrain() at fp32 and bf16, same seed and data: loss gap
    python benchmarks/bench_train.py --threads 1 --gemm-bound   # + each step's GEMM and attention-kernel time: the
                                                               #   ceiling of the ratio
    python benchmarks/bench_train.py --threads 1 --compile      # + nanoseek under torch.compile (compile time printed)
"""

from __future__ import annotations

import argparse
import platform
import time

import copy
import functools

import torch

from nanoseek import DeepSeekModel, ModelConfig
from nanoseek import precision as P
from nanoseek.checkpoint import to_hf_state_dict
from nanoseek.train.common import make_optimizer

CONFIGS = {
    # ~8.5M parameters: the size the issue quotes for transformers' 3,300 tokens/s on this machine
    "bench": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
                  kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=1024,
                  num_nextn_predict_layers=0, torch_dtype="float32"),
    "quick": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=32,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=256,
                  num_nextn_predict_layers=0, torch_dtype="float32"),
}


def hf_twin(model: DeepSeekModel):
    """transformers DeepseekV3ForCausalLM (fp32) holding exactly `model`'s main-model weights (no MTP layer);
    the decode benchmark uses it too."""
    import transformers

    cfg = model.config
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in (
        "architectures", "model_type", "rope_scaling", "torch_dtype", "scoring_func", "topk_method", "moe_layer_freq",
        "num_nextn_predict_layers", "quantization_config")}
    hf_cfg = transformers.DeepseekV3Config(**d, num_mtp_layers=0)
    hf_cfg._attn_implementation = "sdpa"
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg).float()
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    sd = {k: v for k, v in to_hf_state_dict(model).items() if not k.startswith(mtp) and ".experts." not in k}
    # transformers fuses experts in memory (gate_up_proj [E, 2I, D], down_proj [E, D, I]) as nanoseek does
    sd.update({k: v for k, v in model.state_dict().items() if ".experts." in k and not k.startswith(mtp)})
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight transfer failed: missing {missing}, unexpected {unexpected}")
    return ref


def interleaved_median(fns: dict, n_steps: int) -> dict:
    """Alternate the contenders step by step and take each one's median step time, so background
    load on the machine hits both alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(n_steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def trainer_tokens_per_s(cfg: ModelConfig, B: int, T: int, steps: int, precision: str = "fp32") -> float:
    """Tokens/s logged by nanoseek's own pre-training loop on the same model config (balance loss, bias
    updates, clipping, AdamW, data loading included; MTP off, as in the rows above)."""
    import tempfile

    from nanoseek.train.common import read_metrics
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    over = {k: getattr(cfg, k) for k in CONFIGS["quick" if cfg.hidden_size == 64 else "bench"] if k != "torch_dtype"}
    with tempfile.TemporaryDirectory() as d:
        pretrain(PretrainConfig(out_dir=d, preset="tiny", model_overrides=over, vocab_size=min(cfg.vocab_size, 2048),
                                seq_len=T, batch_size=B, steps=steps + 2, warmup=1, log_every=1, eval_every=10_000,
                                save_every=10_000, embedded_docs=3000, tensorboard=False, precision=precision))
        tps = sorted(r["tokens_per_s"] for r in read_metrics(d) if "tokens_per_s" in r and r["step"] > 2)
    return tps[len(tps) // 2]


def contenders(cfg: ModelConfig, ours: DeepSeekModel, ref, inp, labels, precisions, compiled: bool = False) -> dict:
    """{name: one training step (forward + backward + clip + AdamW)} for each model and precision; with
    `compiled`, also nanoseek's step with the model under torch.compile (its compile time printed, not counted)."""
    V = cfg.vocab_size
    fns = {}

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1))

    for prec in precisions:
        ref_p = copy.deepcopy(ref)
        if prec == "bf16":
            ref_p.to(torch.bfloat16)
        opt_r = torch.optim.AdamW(ref_p.parameters(), lr=1e-4)

        def step_ref(m=ref_p, opt=opt_r):
            loss_of(m(inp).logits).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        ours_p = copy.deepcopy(ours)
        opt_o, ctx = P.prepare(ours_p, lambda named, m=ours_p: make_optimizer(m, 1e-4, params=named), prec)

        def step_ours(m=ours_p, opt=opt_o, ctx=ctx, fwd=ours_p):
            with ctx:
                logits = fwd(inp, mtp=False).logits
            loss_of(logits).backward()
            P.clip_grad_norm_(m, opt, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[f"transformers {prec}"] = step_ref
        fns[f"nanoseek {prec}"] = step_ours
        if compiled:
            m_c = copy.deepcopy(ours)
            opt_c, ctx_c = P.prepare(m_c, lambda named, m=m_c: make_optimizer(m, 1e-4, params=named), prec)
            step_c = functools.partial(step_ours, m=m_c, opt=opt_c, ctx=ctx_c, fwd=torch.compile(m_c))
            t = time.perf_counter()
            step_c(), step_c()  # the compile (and a recompile, if the second call needs one)
            print(f"# torch.compile, nanoseek {prec}: {time.perf_counter() - t:.0f} s for the first two steps")
            fns[f"nanoseek compiled {prec}"] = step_c
    return fns


def profile(fn, steps: int, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            fn()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# the fused attention kernels (forward and backward); transformers' math-path attention is bmm's, counted above
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def kernel_ms(fn, steps: int) -> tuple[float, float]:
    """(GEMM, attention-kernel) milliseconds per step, from the torch profiler's self times: matrix products
    (mm / addmm / bmm / baddbmm, the same MKL / oneDNN kernels for any implementation of the model) and the fused
    flash-attention kernels, the two kinds of work no Python-level change removes."""
    from torch.profiler import ProfilerActivity, profile as prof

    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            fn()
    ev = p.key_averages()
    return tuple(sum(e.self_cpu_time_total for e in ev if e.key in ops) / 1e3 / steps
                 for ops in (GEMM_OPS, ATTENTION_OPS))


def gemm_bound(fns: dict, med: dict, steps: int) -> None:
    """What a step cannot go below: each contender's GEMM and attention-kernel time (profiled) beside its step
    time (the interleaved medians), and the most nanoseek could reach against transformers if everything but
    those kernels cost nothing."""
    km = {name: kernel_ms(fn, steps) for name, fn in fns.items()}
    best_tf = min(t for name, t in med.items() if name.startswith("transformers"))
    print("| training step | step ms | GEMM ms | attention kernel ms | rest ms | ceiling vs transformers, same "
          "precision | ceiling vs transformers' best |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in med.items():
        (g, a), ms = km[name], t * 1e3
        prec = name.split()[-1]
        ceil = (f"{med['transformers ' + prec] * 1e3 / (g + a):.2f}x", f"{best_tf * 1e3 / (g + a):.2f}x") \
            if name.startswith("nanoseek") else ("", "")
        print(f"| {name} | {ms:.0f} | {g:.0f} | {a:.0f} | {ms - g - a:.0f} | {ceil[0]} | {ceil[1]} |")


def threads_sweep(fns: dict, steps: int, threads=(1, 2)) -> dict:
    """The same steps at each thread count, interleaved: {f"{name} @{n} threads": fn}."""
    def at(fn, n):
        def run():
            torch.set_num_threads(n)
            fn()
        return run

    return {f"{name} @{n} thread{'s' * (n > 1)}": at(fn, n) for name, fn in fns.items() for n in threads}


def loss_gap(steps: int, precisions=("fp32", "bf16"), seed: int = 0) -> None:
    """pretrain() on the tiny preset at each precision, same seed, data and tokenizer; the final losses and
    their relative gap to fp32 (the V3 report's bar for FP8 is < 0.25%)."""
    import tempfile

    from nanoseek.train.common import read_metrics
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    kw = dict(preset="tiny", embedded_docs=3000, embedded_tasks=["arithmetic"], embedded_levels=[1, 2],
              vocab_size=1024, digit_group=1, seq_len=128, batch_size=8, steps=steps, warmup=min(20, steps // 10),
              lr=3e-3, eval_every=steps, eval_batches=32, save_every=10 ** 6, log_every=10, tensorboard=False,
              seed=seed)
    res = {}
    for prec in precisions:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            pretrain(PretrainConfig(out_dir=d, precision=prec, **kw))
            m = read_metrics(d)
            tail = [r["loss"] for r in m if "loss" in r][-5:]
            res[prec] = dict(train=sum(tail) / len(tail), eval=[r["eval_loss"] for r in m if "eval_loss" in r][-1],
                             seconds=time.perf_counter() - t)
    print(f"# loss gap: pretrain() tiny preset, {steps} steps x 8 x 128 tokens, seed {seed}, "
          f"{torch.get_num_threads()} threads")
    print("| precision | train loss (mean of last 5 logged) | eval loss (32 batches) | rel. gap (eval) | wall s |")
    print("|---|---|---|---|---|")
    ref = res[precisions[0]]
    for prec, r in res.items():
        print(f"| {prec} | {r['train']:.4f} | {r['eval']:.4f} | {(r['eval'] - ref['eval']) / ref['eval']:+.2%} | "
              f"{r['seconds']:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trainer", action="store_true", help="skip the rows measured through nanoseek's pretrain()")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--config", choices=["bench", "quick", "tiny"], default=None,
                    help="model config (default bench; tiny = the cpu pipeline preset's model)")
    ap.add_argument("--threads-sweep", action="store_true", help="nanoseek only, at 1 and 2 threads, interleaved")
    ap.add_argument("--loss-gap", type=int, metavar="STEPS", help="pretrain() fp32 vs bf16 for STEPS steps, then exit")
    ap.add_argument("--profile", choices=["fp32", "bf16"], help="profile nanoseek's step at this precision, then exit")
    ap.add_argument("--gemm-bound", action="store_true",
                    help="also each step's GEMM and attention-kernel time (profiled) and the ratio nanoseek would "
                         "reach with nothing else")
    ap.add_argument("--compile", action="store_true", help="also nanoseek's step with the model under torch.compile")
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if args.profile:
        precisions = [args.profile]
    torch.set_num_threads(args.threads)
    if args.loss_gap:
        loss_gap(args.loss_gap, tuple(precisions))
        return
    torch.manual_seed(0)
    name = args.config or ("quick" if args.quick else "bench")
    cfg = ModelConfig(**CONFIGS[name]) if name in CONFIGS else ModelConfig.from_preset(name, num_nextn_predict_layers=0)
    B, T = (2, 64) if args.quick else (args.batch, args.seq)
    steps = 2 if args.quick else args.steps
    ours = DeepSeekModel(cfg).train()
    ref = hf_twin(ours).train()
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    inp, labels = x[:, :-1], x[:, 1:]
    with torch.no_grad():
        ours.eval(), ref.eval()
        diff = (ours(inp).logits - ref(inp).logits).abs().max().item()
        ours.train(), ref.train()

    fns = contenders(cfg, ours, ref, inp, labels, precisions, compiled=args.compile)
    if args.profile:
        profile(fns[f"nanoseek {args.profile}"], steps)
        return
    if args.threads_sweep:
        fns = threads_sweep({k: f for k, f in fns.items() if k.startswith("nanoseek")}, steps)
    med = interleaved_median(fns, steps)
    if args.threads_sweep:
        print(f"# nanoseek training step, config {name}, batch {B} x seq {T}")
        print("| training step | tokens/s |\n|---|---|")
        for k, t in med.items():
            print(f"| {k} | {B * T / t:,.0f} |")
        return
    results = {name: B * T / t for name, t in med.items()}
    if not args.no_trainer:
        for prec in precisions:
            results[f"nanoseek trainer {prec} (pretrain())"] = trainer_tokens_per_s(cfg, B, T, steps, prec)
    n = cfg.num_parameters()
    print(f"# forward+backward+clip+AdamW, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"bf16 matrix units: {'yes' if P.cpu_has_fast_bf16() else 'no (AVX2-class: bf16 GEMMs are emulated)'}, "
          f"torch {torch.__version__}")
    print(f"config: {n / 1e6:.1f}M params ({cfg.num_parameters(active=True) / 1e6:.1f}M active), batch {B} x seq {T}; "
          f"max |logit diff| {diff:.1e} (fp32)")
    if args.gemm_bound:
        gemm_bound(fns, med, steps)
    tf = {p: results[f"transformers {p}"] for p in precisions}
    best = max(tf.values())
    print("| training step | tokens/s | vs transformers, same precision | vs transformers' best |")
    print("|---|---|---|---|")
    for name, tps in results.items():
        prec = next(p for p in precisions if p in name.split())
        print(f"| {name} | {tps:,.0f} | {tps / tf[prec]:.2f}x | {tps / best:.2f}x |")


if __name__ == "__main__":
    main()
