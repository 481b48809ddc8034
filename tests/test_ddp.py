"""DDP through torchrun (gloo, 2 CPU processes): ranks stay identical, match a 1-process run with the same global batch,
only rank 0 writes, and a killed DDP run resumes bitwise (each rank gets its own RNG state back)."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, sys, torch
from torch import nn
from torch.utils.data import TensorDataset
from weaktr.learner import fit, cleanup_distributed
torch.set_num_threads(1)
out, phase = sys.argv[1], sys.argv[2]
rank = int(os.environ.get("RANK", 0))
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 6, generator=g); y = (2 * x[:, :1] - x[:, 1:2]).tanh()
data = TensorDataset(x, y)

class Net(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 1))
        self.unused = nn.Linear(1, 1)                  # never gets a gradient: find_unused_parameters at work
    def forward(self, x): return self.body(x)
def model(dropout):
    torch.manual_seed(0 if rank == 0 else 1)          # rank 1 starts elsewhere: DDP must broadcast rank 0's weights
    return Net(dropout)
def loss_fn(m, b):
    xb, yb = b
    p = m(xb)
    return nn.functional.mse_loss(p, yb), {"mae": (p - yb).abs().mean()}
def eval_fn(m, e):
    with open(f"{out}/evaluated_by_rank{rank}", "a") as f: f.write(f"{e}\n")
    return {"val_mse": nn.functional.mse_loss(m(x), y).item()}
cfg = dict(epochs=3, batch_size=16, lr=3e-3, lr_scale_by_batch=False, warmup_epochs=1, amp="off", device="cpu",
           num_workers=0, log_every=1, select_metric="val_mse", select_mode="min", progress=False, plot=False)

def save(L, name): torch.save(L.model.state_dict(), f"{out}/{name}_rank{L.rank}_of{L.world_size}.pt")
def kill(L):
    if L.epoch == 1: raise KeyboardInterrupt
if phase == "first":
    save(fit(model(0.0), loss_fn, data, cfg, f"{out}/plain", eval_fn=eval_fn), "plain")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        save(fit(model(0.3), loss_fn, data, cfg, f"{out}/drop_a", eval_fn=eval_fn), "drop_a")
        try: fit(model(0.3), loss_fn, data, cfg, f"{out}/drop_b", eval_fn=eval_fn, callbacks=dict(on_epoch_end=kill))
        except KeyboardInterrupt: pass
else:
    save(fit(model(0.3), loss_fn, data, cfg, f"{out}/drop_b", eval_fn=eval_fn, resume=True), "drop_b")
cleanup_distributed()
'''


GLOO_ABORT = "terminate called without an active exception"

def _run(cmd, env, timeout=120, fresh_dir=None):
    "Run `cmd`; a launch killed by gloo's intermittent C++ abort (seen once in ~5 runs on a 2-core machine under heavy"
    "load) is launched once more — from a clean `fresh_dir` if given; a resume launch may simply resume again."
    t = time.time()
    for attempt in (0, 1):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if r.returncode == 0 or attempt or GLOO_ABORT not in r.stderr: break
        if fresh_dir is not None: shutil.rmtree(fresh_dir, ignore_errors=True)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return time.time() - t


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_ranks_match_single_process_and_resume(tmp_path):
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    _run([sys.executable, str(script), str(single), "first"], env)
    _run([*torchrun, str(script), str(ddp), "first"], env, fresh_dir=ddp)
    _run([*torchrun, str(script), str(ddp), "resume"], env)
    w = lambda d, name, r, ws: torch.load(d / f"{name}_rank{r}_of{ws}.pt", weights_only=True)

    # 1. both ranks end with identical weights, equal to a 1-process run with the same global batch (16)
    w0, w1, ws = w(ddp, "plain", 0, 2), w(ddp, "plain", 1, 2), w(single, "plain", 0, 1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
        torch.testing.assert_close(w0[k], ws[k], rtol=0, atol=2e-6, msg=f"DDP != single process for {k}")

    # 2. rank 0 alone writes logs and evaluates; the logged losses are reduced over ranks (= the 1-process means)
    rd, rs = ([json.loads(l) for l in (d / "plain/metrics.jsonl").read_text().splitlines()] for d in (ddp, single))
    assert [(r["kind"], r["step"]) for r in rd] == [(r["kind"], r["step"]) for r in rs]   # no line twice
    for a, b in zip(rd, rs):
        for k in ("loss", "mae", "train_loss", "train_mae", "val_mse", "lr"):
            if k in a: assert abs(a[k] - b[k]) < 1e-5, (k, a, b)
    assert (ddp / "evaluated_by_rank0").exists() and not (ddp / "evaluated_by_rank1").exists()
    ck = torch.load(ddp / "plain/last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 3 * 64 // 16
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])              # ranks are seeded seed + rank

    # 3. a DDP run with dropout, killed after epoch 1 and resumed by a new torchrun, is bitwise the straight run
    a0, a1 = w(ddp, "drop_a", 0, 2), w(ddp, "drop_a", 1, 2)
    b0, b1 = w(ddp, "drop_b", 0, 2), w(ddp, "drop_b", 1, 2)
    for k in a0: assert torch.equal(a0[k], b0[k]) and torch.equal(a0[k], a1[k]) and torch.equal(b0[k], b1[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("time", "epoch_time_s", "eval_time_s")}
                       for l in p.read_text().splitlines()]
    assert strip(ddp / "drop_a/metrics.jsonl") == strip(ddp / "drop_b/metrics.jsonl")
