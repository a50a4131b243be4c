"""GRPO head to head: nanoseek against TRL's GRPOTrainer on the same model, task, shape and seeds.

Setup (issue 14): a ~1M-parameter DeepSeek-V3 config (4 layers, hidden 128, dense MLA attention; `--moe`: layers
1-3 DeepSeekMoE with 8 routed experts, top-2, 1 shared), a character tokenizer with DeepSeek's special tokens,
warm-started by one SFT run on 2-digit addition ("Q: a+b= A:" rendered by nanoseek's chat template with
thinking off). Both trainers then run GRPO from that one folder with the same shape: 8 prompts x 8
completions, 8 new tokens, temperature 1, lr 3e-5 constant, AdamW betas (0.9, 0.95), no KL, loss `dapo`, eps
0.2, 100 steps, reward 1 iff the first integer of the completion equals a+b. Each run is its own process with
the same thread count; TRL and nanoseek alternate seed by seed.

Judged before any run (fixed here, not after): held-out greedy accuracy on 1,000 test pairs that neither SFT
nor GRPO ever sees, measured for both sides by one evaluator (transformers' greedy `generate` on the saved
folder), gain = after - before; completions/s = completions / summed step wall time (rollout included).
Printed: per-seed rows, the mean gain of each side with its standard error over seeds, a two-sided
permutation test on the difference of mean gains, and the per-seed and median throughput ratios.

    pip install -e ".[bench]"                                       # trl 1.16 + datasets
    python benchmarks/bench_grpo_trl.py --seeds 0 1 2 3 4 5 6 7 --out runs/h2h          # ~40 min on 2 cores
    python benchmarks/bench_grpo_trl.py --moe --seeds 0 1 2 3 4 5 6 7 --out runs/h2h_moe
    python benchmarks/bench_grpo_trl.py --seeds 0 --steps 5 --out /tmp/h2h                # the mechanics
    python benchmarks/bench_grpo_trl.py --threads 2 --async-rollouts --seeds 0 1 2 --out runs/h2h_t2
        # both sides on both cores: TRL with 2 torch threads, nanoseek's rollout (a worker process) and update on one each

Runs whose metrics.json exists are reused (delete the folder to rerun); the SFT folder is built once per --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

LO, HI = 10, 99
N_TEST, N_DEV = 1000, 200
SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>")  # nanoseek.tokenizer's special tokens, ids 0..6
BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK = SPECIALS


# ------------------------------------------------------------------------------------------- task and data


def split_pairs(seed: int = 0):
    """All 8,100 (a, b) pairs with 10 <= a, b <= 99, split once into disjoint test / dev / train."""
    pairs = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[N_TEST + N_DEV:], pairs[N_TEST:N_TEST + N_DEV], pairs[:N_TEST]


def question(a: int, b: int) -> str:
    return f"Q: {a}+{b}= A:"


def chat_prompt(a: int, b: int) -> str:
    """What nanoseek's chat template renders for one user turn with thinking off (checked in `sft_folder`)."""
    return BOS + USER + question(a, b) + ASSISTANT + END_THINK


_NUM = re.compile(r"\d+")


def first_number(s: str):
    m = _NUM.search(s)
    return int(m.group()) if m else None


# ------------------------------------------------------------------------------------------- model and SFT


def build_tokenizer():
    """The task's characters (no merges) + DeepSeek's special tokens; the think tags are added, not special."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"Q: {a}+{b}= A: {a + b}" for a in range(LO, HI + 1) for b in range(LO, HI + 1)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1, special_tokens=list(SPECIALS), show_progress=False))
    tok.decoder = decoders.Fuse()
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in (THINK, END_THINK):
            added["special"] = False
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token=BOS,
                                 eos_token=EOS, pad_token=PAD)
    hf.padding_side = "left"
    return hf


def build_model(tok, moe: bool, seed: int):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=384 if moe else 512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=64, tie_word_embeddings=True,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              num_nextn_predict_layers=0, rope_interleave=True, n_routed_experts=8, num_experts_per_tok=2,
              n_shared_experts=1, moe_intermediate_size=64, n_group=2, topk_group=1, routed_scaling_factor=2.5,
              norm_topk_prob=True, first_k_dense_replace=1 if moe else 4)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw))
    g = model.generation_config
    g.bos_token_id, g.eos_token_id, g.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model


def greedy_accuracy(model, tok, pairs, max_new_tokens: int = 8, batch_size: int = 250) -> float:
    """The one evaluator of both sides: transformers' greedy generate on the chat-rendered prompt."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            enc = tok([chat_prompt(a, b) for a, b in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            comps = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(first_number(c) == a + b for (a, b), c in zip(chunk, comps))
    return correct / len(pairs)


def sft_folder(out: Path, moe: bool, target: float, threads: int) -> Path:
    """One warm start shared by every run: next-token SFT on the training pairs until dev accuracy >= target."""
    folder = out / "sft_model"
    if (folder / "sft_info.json").exists():
        return folder
    import torch

    from nanoseek.tokenizer import Tokenizer as NsTokenizer

    torch.set_num_threads(threads)
    train, dev, _ = split_pairs()
    tok = build_tokenizer()
    model = build_model(tok, moe, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng, step, acc, t0 = random.Random(1), 0, 0.0, time.time()
    while acc < target and step < 20_000:
        enc = tok([chat_prompt(*p) + f" {sum(p)}" + EOS for p in (rng.choice(train) for _ in range(128))],
                  return_tensors="pt", padding=True)
        model.train()
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            acc = greedy_accuracy(model, tok, dev)
            print(f"[sft] step {step} loss {loss.item():.4f} dev acc {acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ns_ids = NsTokenizer.load(str(folder)).apply_chat_template([{"role": "user", "content": question(12, 34)}],
                                                                thinking=False, add_generation_prompt=True)
    if ns_ids != tok(chat_prompt(12, 34))["input_ids"]:  # both sides must see the same prompt tokens
        raise SystemExit(f"nanoseek's prompt ids {ns_ids} differ from the benchmark's for {chat_prompt(12, 34)!r}")
    (folder / "sft_info.json").write_text(json.dumps({"steps": step, "dev_acc": acc, "seconds": time.time() - t0}))
    return folder


# ------------------------------------------------------------------------------------------- the two workers


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(a.init)
    tok.padding_side = "left"
    model = DeepseekV3ForCausalLM.from_pretrained(a.init, dtype=torch.float32)
    train, _, _ = split_pairs()
    rng = random.Random(a.seed + 123)
    rows = [rng.choice(train) for _ in range(max(2000, a.steps * a.prompts * 2))]
    ds = Dataset.from_dict({"prompt": [chat_prompt(x, y) for x, y in rows], "answer": [x + y for x, y in rows]})

    def correct_sum(prompts, completions, answer, **kw):
        return [1.0 if first_number(c) == int(ans) else 0.0 for c, ans in zip(completions, answer)]

    cfg = GRPOConfig(output_dir=str(Path(a.run_dir) / "trl"), use_cpu=True, bf16=False, fp16=False,
                     activation_checkpointing=False, per_device_train_batch_size=a.prompts * a.generations,
                     num_generations=a.generations, max_completion_length=a.max_tokens, temperature=1.0,
                     learning_rate=a.lr, lr_scheduler_type="constant", beta=0.0, loss_type="dapo", epsilon=0.2,
                     max_steps=a.steps, logging_steps=1, save_strategy="no", report_to="none", seed=a.seed,
                     dataloader_pin_memory=False, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0)
    step_times, begin = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begin[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - begin[0])

    trainer = GRPOTrainer(model=model, reward_funcs=correct_sum, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    model.save_pretrained(Path(a.run_dir) / "model")
    tok.save_pretrained(Path(a.run_dir) / "model")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"step_times": step_times, "rewards": rewards}


def run_nanoseek(a) -> dict:
    from nanoseek.tasks import load_jsonl_task, register_task
    from nanoseek.train.common import read_metrics
    from nanoseek.train.grpo import GRPOConfig, grpo

    train, _, _ = split_pairs()
    jsonl = Path(a.run_dir) / "add_train.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": question(x, y), "answer": x + y}) + "\n" for x, y in train))
    register_task(load_jsonl_task(str(jsonl), name="add2"), overwrite=True)

    def correct_sum(prompt, completion, problem):
        return 1.0 if first_number(completion) == int(problem.answer) else 0.0

    cfg = GRPOConfig(init_from=a.init, out_dir=str(Path(a.run_dir) / "nanoseek"), tasks=["add2"], thinking=False,
                     steps=a.steps, prompts_per_step=a.prompts, num_generations=a.generations, max_tokens=a.max_tokens,
                     temperature=1.0, lr=a.lr, lr_schedule="constant", weight_decay=0.0, grad_clip=1.0,
                     minibatch_size=a.prompts * a.generations, loss_type="dapo", scale_rewards="group", beta=0.0,
                     eps_low=0.2, eps_high=0.2, off_policy_delta=None, reward_weights={}, eval_every=a.steps,
                     eval_problems=1, save_every=a.steps, seed=a.seed, device="cpu", resume=False, tensorboard=False,
                     async_rollouts=a.async_rollouts)
    model_dir = grpo(cfg, extra_rewards={"correct": correct_sum})
    logs = [r for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "reward" in r]
    os.symlink(Path(model_dir).resolve(), Path(a.run_dir) / "model")
    res = {"step_times": [r["step_s"] for r in logs], "rewards": [r["reward"] for r in logs]}
    if a.async_rollouts:  # a step's own time leaves out its next rollout, which ran beside it: use the wall clock
        res["wall_s"] = logs[-1]["time"] - logs[0]["time"] + logs[0]["step_s"]
    return res


def worker(a) -> None:
    import torch
    from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    res = (run_trl if a.worker == "trl" else run_nanoseek)(a)
    tok = PreTrainedTokenizerFast.from_pretrained(a.init)
    tok.padding_side = "left"
    _, _, test = split_pairs()
    after = greedy_accuracy(DeepseekV3ForCausalLM.from_pretrained(Path(a.run_dir) / "model"), tok, test)
    n = a.prompts * a.generations * len(res["step_times"])
    res.update(framework=a.worker, seed=a.seed, acc_after=after,
               completions_per_s=n / res.get("wall_s", sum(res["step_times"])),
               threads=torch.get_num_threads())
    (Path(a.run_dir) / "metrics.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------- summary


def permutation_p(x: list[float], y: list[float], rounds: int = 20_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(x) - mean(y) under random relabelling of the pooled values."""
    obs, pool, rng, hits = abs(statistics.mean(x) - statistics.mean(y)), x + y, random.Random(seed), 0
    for _ in range(rounds):
        rng.shuffle(pool)
        hits += abs(statistics.mean(pool[:len(x)]) - statistics.mean(pool[len(x):])) >= obs - 1e-12
    return (hits + 1) / (rounds + 1)


def summarise(runs: dict, before: float, seeds: list[int]) -> str:
    se_b = math.sqrt(before * (1 - before) / N_TEST)
    lines = [f"held-out greedy accuracy before GRPO: {before:.3f} +- {se_b:.3f} ({N_TEST} problems)", "",
             "| seed | TRL after | nanoseek after | TRL compl/s | nanoseek compl/s | ratio |", "|---|---|---|---|---|---|"]
    ratios = []
    for s in seeds:
        t, n = runs["trl", s], runs["nanoseek", s]
        ratios.append(n["completions_per_s"] / t["completions_per_s"])
        lines.append(f"| {s} | {t['acc_after']:.3f} | {n['acc_after']:.3f} | {t['completions_per_s']:.0f} | "
                     f"{n['completions_per_s']:.0f} | {ratios[-1]:.2f}x |")
    gains = {fw: [100 * (runs[fw, s]["acc_after"] - before) for s in seeds] for fw in ("trl", "nanoseek")}
    lines.append("")
    for fw, g in gains.items():
        sd = statistics.stdev(g) if len(g) > 1 else float("nan")
        lines.append(f"{fw}: gain {statistics.mean(g):+.1f} points (mean of {len(g)} seeds; sd {sd:.1f}, "
                     f"se {sd / math.sqrt(len(g)):.1f}; min {min(g):+.1f}, max {max(g):+.1f})")
    if len(seeds) > 1:
        diff = statistics.mean(gains["nanoseek"]) - statistics.mean(gains["trl"])
        lines.append(f"nanoseek - TRL: {diff:+.1f} points, permutation p = {permutation_p(gains['nanoseek'], gains['trl']):.3f}")
    lines.append(f"throughput nanoseek / TRL: median {statistics.median(ratios):.2f}x "
                 f"(per seed {min(ratios):.2f}x-{max(ratios):.2f}x)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_grpo_trl", help="folder for the SFT model, runs and summary")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    ap.add_argument("--max-tokens", type=int, default=8, help="new tokens per completion")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--moe", action="store_true", help="the MoE variant (layers 1-3 DeepSeekMoE)")
    ap.add_argument("--sft-target", type=float, default=0.25, help="SFT stops at this dev accuracy")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    ap.add_argument("--only", choices=["trl", "nanoseek"], help="run one side only")
    ap.add_argument("--async-rollouts", action="store_true",
                    help="nanoseek with async_rollouts (rollout and update side by side: at 2 threads a forked "
                         "worker process on one, the update on the other; throughput from the wall clock); its runs "
                         "go to nanoseek_async_s<seed>")
    ap.add_argument("--worker", choices=["trl", "nanoseek"], help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    init = sft_folder(out, a.moe, a.sft_target, a.threads)
    import torch
    from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(init)
    tok.padding_side = "left"
    before = greedy_accuracy(DeepseekV3ForCausalLM.from_pretrained(init, dtype=torch.float32), tok, split_pairs()[2])
    runs = {}
    sides = [a.only] if a.only else ["trl", "nanoseek"]
    for s in a.seeds:
        for fw in sides:  # alternating, seed by seed
            run_dir = out / f"{fw}{'_async' if a.async_rollouts and fw == 'nanoseek' else ''}_s{s}"
            if not (run_dir / "metrics.json").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                cmd = [sys.executable, __file__, "--worker", fw, "--init", str(init), "--run-dir", str(run_dir),
                       "--seed", str(s), "--steps", str(a.steps), "--prompts", str(a.prompts), "--generations",
                       str(a.generations), "--max-tokens", str(a.max_tokens), "--lr", str(a.lr), "--threads",
                       str(a.threads)] + (["--async-rollouts"] if a.async_rollouts else [])
                with open(run_dir / "log.txt", "w") as log:
                    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
                print(f"{fw} seed {s}: {time.time() - t0:.0f} s", flush=True)
            runs[fw, s] = json.loads((run_dir / "metrics.json").read_text())
            print(f"  {fw} seed {s}: after {runs[fw, s]['acc_after']:.3f}, "
                  f"{runs[fw, s]['completions_per_s']:.0f} completions/s", flush=True)
    if a.only:
        return
    text = summarise(runs, before, a.seeds)
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
