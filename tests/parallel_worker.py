"""One rank of the multi-process proofs in test_parallel.py (launched as W plain subprocesses with torchrun's
environment variables; WORLD_SIZE=1 runs the one-process reference through the same code).

    python tests/parallel_worker.py OUT_DIR --ep 2 --steps 10

Trains the tiny preset on a fixed global batch per step (fp32, AdamW, clipping, MTP + balance loss, bias
update from the global loads) and writes OUT_DIR/rank{r}.pt with the per-step global losses and grad norms,
step-0 logits (this rank's rows) and full gradients, the expert biases, and this rank's parameter and
optimizer-state bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import DeepSeekModel  # noqa: E402
from nanoseek.parallel import (all_reduce_mean, clip_grad_norm_, destroy, global_loads, init_distributed,  # noqa: E402
                               local_bytes, parallelize, shard_batch)

GLOBAL_BATCH, SEQ = 4, 16
GAMMA, ALPHA, MTP_LAMBDA = 0.01, 1e-3, 0.3


def config() -> ModelConfig:
    return ModelConfig.from_preset("tiny", num_hidden_layers=3, vocab_size=512)


def global_batch(step: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)  # the same global batch at every world size
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)


def gates(model):
    return [layer.mlp.gate for layer in model.model.layers if layer.is_moe]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist = init_distributed(ep=a.ep)
    cfg = config()
    torch.manual_seed(0)
    model = DeepSeekModel(cfg).train()  # every rank builds the same weights
    model = parallelize(model, dist.mesh, precision="fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    out_dir = Path(a.out)
    rec = {"loss": {}, "grad_norm": {}, "bias": {}}
    step = 0
    while step < a.steps:
        tokens = shard_batch(global_batch(step, cfg.vocab_size), dist)
        out = model(tokens[:, :-1], mtp=True)
        V = out.logits.shape[-1]
        main_loss = F.cross_entropy(out.logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        mtp = F.cross_entropy(out.mtp_logits[0].reshape(-1, V), tokens[:, 2:].reshape(-1))
        loss = main_loss + MTP_LAMBDA * mtp + ALPHA * out.balance_loss
        loss.backward()
        if step == 0:
            rec["logits"] = out.logits.detach().clone()
            rec["grads"] = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                            for n, p in model.named_parameters()}
        gnorm = clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads = global_loads([r.load for r in out.router + out.mtp_router], dist)
        with torch.no_grad():  # aux-loss-free balancing (V3 sec. 2.1.2) from the global loads
            for gate, load in zip(gates(model), loads):
                gate.e_score_correction_bias.add_(GAMMA * torch.sign(load.mean() - load))
        step += 1
        rec["loss"][step] = all_reduce_mean(loss.detach(), dist)
        rec["grad_norm"][step] = float(gnorm)
    rec["bias"] = [g.e_score_correction_bias.clone() for g in gates(model)]
    rec["param_bytes"] = local_bytes(model.parameters())
    rec["optim_bytes"] = local_bytes(t for s in opt.state.values() for t in s.values() if t.dim() > 0)
    torch.save(rec, out_dir / f"rank{dist.rank}.pt")
    destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
