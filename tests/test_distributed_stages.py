"""The training stages under torchrun: `python -m nanoseek <stage>` on 2 ranks (gloo, 1 thread each, launched as
plain subprocesses with torchrun's environment variables) against the same command in one process, fp32, the same
global batch: the logged losses agree to 1e-5 for 10 steps (pretrain with FSDP only and with FSDP + EP 2, SFT with
EP 2 and a short last batch, GRPO with EP 2 and the same rollouts, DSA with EP 2 through both phases, distillation
with its teacher samples drawn once); a 2-rank run resumes from its sharded checkpoint bit-exactly (and at 1 rank,
and a 1-rank checkpoint at 2 ranks, to 1e-5; DSA from a warm-up checkpoint across the phase change, distillation
after stop_after); rank 0's consolidated model folder is the one-process format (the dense student's too); keep
routing replays the sampler's experts under EP.

Run as a script (`python tests/test_distributed_stages.py routing OUT MODEL`), this file is the routing check's
worker.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ranks import launch_ranks

STEPS = 10
DSA_WARMUP = 4  # DSA: steps 1-4 warm the indexers up (everything else frozen), 5-10 train sparse
MODEL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
         "qk_rope_head_dim": 8, "v_head_dim": 16}  # 8 routed experts in 2 groups: an ep rank can get no rows


def distinct_chars(prompt, completion, problem) -> float:
    """GRPO's reward in these runs: it differs between a group's completions, so advantages are not zero."""
    return len(set(completion)) / 8.0


def launch(world: int, *argv: str, script: Path | None = None, timeout: float = 240) -> None:
    """`python -m nanoseek *argv` (or `python script *argv`) on `world` ranks, torchrun's environment."""
    launch_ranks(world, [sys.executable, str(script), *argv] if script else [sys.executable, "-m", "nanoseek", *argv],
                 timeout)


def metrics(out: Path) -> dict[int, dict]:
    return {d["step"]: d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def max_diff(a: dict, b: dict, key: str, steps=range(1, STEPS + 1)) -> float:
    assert all(key in a[s] and key in b[s] for s in steps), key
    return max(abs(a[s][key] - b[s][key]) for s in steps)


class Runs:
    """Each run once per session, on demand (a test asks for the runs it compares)."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def tokenizer(self) -> Path:
        folder = self.root / "tok"
        if not folder.exists():
            from nanoseek.data.corpus import embedded_corpus
            from nanoseek.tokenizer import train_tokenizer

            train_tokenizer(embedded_corpus(200, seed=0), vocab_size=400).save(str(folder))
        return folder

    def get(self, name: str) -> Path:
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]

    def args(self, stage: str) -> tuple[str, ...]:
        """The stage's command line for a 10-step run (every run of a stage the same, but --out-dir and --ep)."""
        base = ("--log-every", "1", "--no-tensorboard")
        if stage == "pretrain":
            return (*base, "--steps", str(STEPS), "--tokenizer", str(self.tokenizer()), "--embedded-docs", "100",
                    "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--eval-every", "5",
                    "--eval-batches", "1", "--save-every", "5", "--model-overrides", json.dumps(MODEL))
        if stage == "sft":  # batch 3 on 2 ranks: every micro-batch is padded with an empty row
            return (*base, "--steps", str(STEPS), "--init-from", str(self.get("pretrain-1") / "model"),
                    "--embedded-records", "24", "--max-len", "96", "--batch-size", "3", "--warmup", "1", "--lr",
                    "1e-3", "--eval-every", "5", "--eval-batches", "1", "--save-every", "10")
        if stage == "grpo":  # a KL term, two updates per rollout (the second one off-policy), 3-row minibatches
            return (*base, "--steps", str(STEPS), "--init-from", str(self.get("pretrain-1") / "model"),
                    "--prompts-per-step", "2", "--num-generations", "4", "--max-tokens", "8", "--no-eval",
                    "--minibatch-size", "3", "--num-iterations", "2", "--lr", "1e-3", "--beta", "0.04",
                    "--save-every", "10", "--reward", "test_distributed_stages:distinct_chars")
        if stage == "dsa":  # top-8 of up to 32 keys; checkpoints at 3 (warm-up), 6, 9 and 10 (sparse)
            return (*base, "--init-from", str(self.get("pretrain-1") / "model"), "--embedded-docs", "100",
                    "--seq-len", "32", "--batch-size", "4", "--index-topk", "8", "--warmup-steps", str(DSA_WARMUP),
                    "--sparse-steps", str(STEPS - DSA_WARMUP), "--eval-every", "5", "--eval-batches", "1",
                    "--save-every", "3", "--keep-checkpoints", "10")
        # distill: the teacher samples 4 prompts x 2 (a 10-step model solves none: 24 filler records), logit KD
        return (*base, "--steps", str(STEPS), "--teacher", str(self.get("pretrain-1") / "model"), "--num-prompts",
                "4", "--samples-per-prompt", "2", "--max-tokens", "8", "--min-samples", "24", "--batch-size", "4",
                "--max-len", "96", "--warmup", "1", "--lr", "1e-3", "--logit-kd", "--keep-checkpoints", "10")

    def _run(self, name: str) -> Path:
        out = self.root / name
        stage, world, *rest = name.split("-")
        if rest and rest[0] == "stopped":  # stop_after 5, then a second call resumes
            launch(int(world), stage, "--out-dir", str(out), "--stop-after", "5", *self.args(stage))
            assert not (out / "model").exists()
            launch(int(world), stage, "--out-dir", str(out), *self.args(stage))
            return out
        ep = ("--ep", rest[0]) if rest else ()
        launch(int(world), stage, "--out-dir", str(out), *ep, *self.args(stage))
        return out

    def resumed(self, src: str, world: int, at: int = 5) -> Path:
        """`src`'s run rolled back to its checkpoint at step `at` and run again on `world` ranks."""
        name = f"{src}-resumed-at-{world}"
        if name not in self.done:
            out = self.root / name
            shutil.copytree(self.get(src), out)
            shutil.rmtree(out / "model")
            for ckpt in (out / "checkpoints").glob("step_*"):
                if int(ckpt.name.removeprefix("step_")) > at:
                    shutil.rmtree(ckpt)
            (out / "checkpoints" / "latest").write_text(f"step_{at:07d}\n")
            stage, _, *rest = src.split("-")
            ep = ("--ep", rest[0]) if rest and world > 1 else ()
            launch(world, stage, "--out-dir", str(out), *ep, *self.args(stage))
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("dist_stages"))


def test_pretrain_fsdp_ep_two_ranks_logs_the_one_process_losses(runs):
    one, two = metrics(runs.get("pretrain-1")), metrics(runs.get("pretrain-2-2"))
    assert max_diff(one, two, "loss") < 1e-5
    assert max_diff(one, two, "mtp_loss") < 1e-5
    assert max_diff(one, two, "balance_loss") < 1e-5
    assert max_diff(one, two, "grad_norm") < 1e-4
    assert max_diff(one, two, "eval_loss", steps=(5, 10)) < 1e-5
    assert one[STEPS]["loss"] < one[1]["loss"] - 0.3  # it trains: the comparison is not of constants


@pytest.mark.slow
def test_pretrain_fsdp_only_two_ranks_logs_the_one_process_losses(runs):
    one, two = metrics(runs.get("pretrain-1")), metrics(runs.get("pretrain-2"))
    assert max_diff(one, two, "loss") < 1e-5
    assert max_diff(one, two, "grad_norm") < 1e-4


def test_two_rank_run_resumes_from_its_sharded_checkpoint_bit_exactly(runs):
    full, resumed = runs.get("pretrain-2-2"), runs.resumed("pretrain-2-2", world=2)
    assert (full / "checkpoints" / "step_0000005" / "dcp" / ".metadata").exists()  # the sharded state it resumed
    a, b = metrics(full), metrics(resumed)
    assert sorted(b) == sorted(a)
    for s in range(6, STEPS + 1):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert a[s][key] == b[s][key], (s, key)
    assert (full / "model" / "model.safetensors").read_bytes() == (resumed / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_resume_across_world_sizes_gives_the_same_losses(runs):
    one = metrics(runs.get("pretrain-1"))
    two_to_one = metrics(runs.resumed("pretrain-2-2", world=1))
    one_to_two = metrics(runs.resumed("pretrain-1", world=2))
    steps = range(6, STEPS + 1)
    assert max_diff(one, two_to_one, "loss", steps) < 1e-5
    assert max_diff(one, one_to_two, "loss", steps) < 1e-5


def test_consolidated_model_folder_is_the_one_process_folder(runs, tmp_path):
    """The same training, to float tolerance; the bytes one process writes for the 2-rank weights are the 2-rank
    folder's bytes."""
    _same_model_folders(runs.get("pretrain-1") / "model", runs.get("pretrain-2-2") / "model", tmp_path / "resaved")


def test_sft_ep_two_ranks_logs_the_one_process_losses(runs):
    one, two = metrics(runs.get("sft-1")), metrics(runs.get("sft-2-2"))
    assert max_diff(one, two, "loss") < 1e-5
    assert max_diff(one, two, "mtp_loss") < 1e-5
    assert max_diff(one, two, "balance_loss") < 1e-5
    assert max_diff(one, two, "eval_loss", steps=(5, 10)) < 1e-5
    assert max_diff(one, two, "grad_norm") < 1e-4


@pytest.mark.slow
def test_grpo_ep_two_ranks_logs_the_one_process_losses(runs):
    one, two = metrics(runs.get("grpo-1")), metrics(runs.get("grpo-2-2"))
    # the same rollouts: every completion's seed follows its problem's index in the step's draw
    assert all(one[s]["reward"] == two[s]["reward"] for s in range(1, STEPS + 1))
    assert all(one[s]["completion_length"] == two[s]["completion_length"] for s in range(1, STEPS + 1))
    assert max_diff(one, two, "loss") < 1e-5
    assert max_diff(one, two, "grad_norm") < 1e-3
    assert max(abs(one[s]["loss"]) for s in range(1, STEPS + 1)) > 1e-3  # the losses are not all zero


def _same_model_folders(one: Path, two: Path, tmp: Path, tol: float = 1e-4) -> None:
    """Rank 0's consolidated folder against the one-process folder: the same files, config and tokenizer bytes,
    tensor names, dtypes and shapes, weights within `tol`; one process re-saving it writes its bytes."""
    from safetensors.torch import load_file

    from nanoseek.train.evaluate import load_any_model

    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for name in ("config.json", "tokenizer.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < tol
    load_any_model(two, "cpu").save_pretrained(tmp)
    assert (tmp / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_dsa_ep_two_ranks_logs_the_one_process_losses_in_both_phases(runs, tmp_path):
    one, two = metrics(runs.get("dsa-1")), metrics(runs.get("dsa-2-2"))
    phases = ["warmup"] * DSA_WARMUP + ["sparse"] * (STEPS - DSA_WARMUP)
    assert [one[s]["stage"] for s in range(1, STEPS + 1)] == [two[s]["stage"] for s in range(1, STEPS + 1)] == phases
    sparse = range(DSA_WARMUP + 1, STEPS + 1)
    assert max_diff(one, two, "indexer_kl") < 1e-5
    # the KL of a 10-step model's near-uniform attention is ~1e-4: relative to it, float32 rounding
    assert max(abs(one[s]["indexer_kl"] - two[s]["indexer_kl"]) / one[s]["indexer_kl"]
               for s in range(1, STEPS + 1)) < 1e-3
    assert max_diff(one, two, "lm_loss", steps=sparse) < 1e-5
    assert max_diff(one, two, "grad_norm") < 1e-4
    evals = (0, DSA_WARMUP, 5, 10)  # before training, at the phase change, every 5 steps
    for key in ("indexer_recall", "eval_loss_sparse", "eval_loss_dense"):
        assert max_diff(one, two, key, steps=evals) < 1e-5, key
    assert one[DSA_WARMUP]["indexer_recall"] > one[0]["indexer_recall"] + 0.05  # the warm-up trains the indexers
    _same_model_folders(runs.get("dsa-1") / "model", runs.get("dsa-2-2") / "model", tmp_path)


@pytest.mark.slow
def test_dsa_warmup_under_fsdp_trains_only_the_indexers(runs):
    """The warm-up freezes everything but the indexers on the sharded parameters too: at its step-3 checkpoint every
    dense weight (and expert bias) of the 2-rank run is the dense model's, bit for bit; the indexers moved."""
    from safetensors.torch import load_file

    dense = load_file(runs.get("pretrain-1") / "model" / "model.safetensors")
    warm = load_file(runs.get("dsa-2-2") / "checkpoints" / "step_0000003" / "model.safetensors")
    assert set(dense) < set(warm)
    assert all(torch.equal(dense[k], warm[k]) for k in dense)
    final = load_file(runs.get("dsa-2-2") / "model" / "model.safetensors")
    assert all(not torch.equal(warm[k], final[k]) for k in warm if ".indexer.wk." in k)
    assert any(not torch.equal(dense[k], final[k]) for k in dense)  # the sparse phase trains everything


@pytest.mark.slow
def test_dsa_two_rank_run_resumes_across_the_phase_change_bit_exactly(runs):
    """Resumed at step 3 (the warm-up optimizer's sharded state), through the phase change at 4, to 10."""
    full, resumed = runs.get("dsa-2-2"), runs.resumed("dsa-2-2", world=2, at=3)
    assert (full / "checkpoints" / "step_0000003" / "dcp" / ".metadata").exists()
    a, b = metrics(full), metrics(resumed)
    assert sorted(b) == sorted(a)
    for s in range(4, STEPS + 1):
        for key in ("indexer_kl", "grad_norm") + (("lm_loss",) if s > DSA_WARMUP else ()):
            assert a[s][key] == b[s][key], (s, key)
    assert (full / "model" / "model.safetensors").read_bytes() == (resumed / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_distill_two_ranks_sample_the_teacher_once_and_log_the_one_process_losses(runs, tmp_path):
    one_dir, two_dir = runs.get("distill-1"), runs.get("distill-2")
    # rank 0 drew the teacher's samples (the one-process draw) and every rank trained on the same records
    for name in ("teacher_samples.jsonl", "distill_data.json"):
        assert (one_dir / name).read_bytes() == (two_dir / name).read_bytes()
    assert json.loads((two_dir / "distill_data.json").read_text())["filler_records"] > 0
    one, two = metrics(one_dir), metrics(two_dir)
    assert max_diff(one, two, "loss") < 1e-5
    assert max_diff(one, two, "kd_loss") < 1e-5
    assert max_diff(one, two, "grad_norm") < 1e-4
    assert max_diff(one, two, "eval_loss", steps=(STEPS,)) < 1e-5
    assert one[STEPS]["loss"] < one[1]["loss"]
    _same_model_folders(one_dir / "model", two_dir / "model", tmp_path)  # the dense student, tied head included


@pytest.mark.slow
def test_distill_two_ranks_resume_after_stop_after_bit_exactly(runs):
    full, stopped = runs.get("distill-2"), runs.get("distill-2-stopped")
    assert (stopped / "checkpoints" / "step_0000005" / "dcp" / ".metadata").exists()
    a, b = metrics(full), metrics(stopped)
    assert sorted(b) == sorted(a)
    for s in range(6, STEPS + 1):
        for key in ("loss", "kd_loss", "grad_norm"):
            assert a[s][key] == b[s][key], (s, key)
    assert (full / "model" / "model.safetensors").read_bytes() == (stopped / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_keep_routing_is_replayed_under_expert_parallelism(runs):
    out = runs.root / "routing"
    out.mkdir(exist_ok=True)
    launch(2, "routing", str(out), str(runs.get("pretrain-1") / "model"), script=Path(__file__))
    for r in range(2):
        rec = torch.load(out / f"rank{r}.pt")
        assert rec["ep_vs_plain_forced"] < 1e-5  # EP's forward follows the forced experts...
        assert rec["forced_vs_free"] > 1e-3  # ...which are not the ones it would pick


def _routing_worker(out: str, model_dir: str) -> None:
    """Each rank: the model plain and parallelized (FSDP + EP 2); random forced experts for its rows of a batch;
    the EP logits with them against the plain model's with them, and against the plain model's free routing."""
    from nanoseek.checkpoint import load_pretrained
    from nanoseek.parallel import destroy, init_distributed, parallelize, shard_batch

    torch.set_num_threads(1)
    dist = init_distributed(ep=2)
    plain = load_pretrained(model_dir, dtype=torch.float32).eval()
    ep = parallelize(load_pretrained(model_dir, dtype=torch.float32), dist.mesh).eval()
    cfg = plain.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 12), generator=g)
    moe = sum(1 for layer in plain.model.layers[: cfg.num_hidden_layers] if layer.is_moe)
    forced = [torch.rand(4, 12, cfg.n_routed_experts, generator=g).argsort(-1)[..., :cfg.num_experts_per_tok]
              for _ in range(moe)]
    ids, forced = shard_batch(ids, dist), [shard_batch(f, dist) for f in forced]
    with torch.no_grad():
        a = ep(ids, forced_expert_ids=forced, mtp=False).logits
        b = plain(ids, forced_expert_ids=forced, mtp=False).logits
        c = plain(ids, mtp=False).logits
    torch.save({"ep_vs_plain_forced": float((a - b).abs().max()), "forced_vs_free": float((b - c).abs().max())},
               Path(out) / f"rank{dist.rank}.pt")
    destroy()


if __name__ == "__main__" and sys.argv[1] == "routing":
    _routing_worker(sys.argv[2], sys.argv[3])
