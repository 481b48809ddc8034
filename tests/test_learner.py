"""Learner: bitwise resume after a kill, NaN stop with an intact checkpoint, schedules inside the loop, logs,
checkpoints."""
import hashlib, json, math, os, random, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from weaktr.core import cfg_from_flat
from weaktr.learner import (PHASE1_VOC, PHASE1_VOC_V1, PHASE2_VOC, Learner, TrainCfg, effective_lr, fit, lr_at,
                            plot_metrics, poly_lr, read_metrics)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time", "epoch_time_s", "eval_time_s")


class NoisyToy(Dataset):
    "Random regression data; `aug` adds per-item noise from the torch RNG (like a random transform would)."
    def __init__(self, n=40, aug=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (2 * self.x[:, :1] - self.x[:, 1:2]).tanh()
        self.aug = aug
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        x = self.x[i]
        if self.aug: x = x + 0.1 * torch.randn_like(x) + 0.01 * (random.random() + np.random.rand())
        return dict(x=x, y=self.y[i])


class EncDec(nn.Module):
    "Toy 'encoder/decoder' with dropout, a LayerNorm and a parameter that never gets a gradient."
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.3))
        self.decoder = nn.Linear(16, 1)
        self.unused_head = nn.Linear(16, 3)
    def forward(self, x): return self.decoder(self.encoder(x))


def mse_loss(model, batch):
    pred = model(batch["x"])
    return nn.functional.mse_loss(pred.float(), batch["y"]), dict(mae=(pred.float() - batch["y"]).abs().mean(),
                                                                  out_bf16=float(pred.dtype == torch.bfloat16))


def val_eval(model, epoch):
    d = NoisyToy(16, seed=1)
    return dict(val_mse=nn.functional.mse_loss(model(d.x), d.y).item())


BASE = dict(epochs=3, batch_size=8, lr=4e-3, lr_scale_by_batch=False, warmup_epochs=1, amp="off", device="cpu",
            num_workers=0, log_every=2, select_metric="val_mse", select_mode="min", progress=False, plot=False)


def kill_after(n_epochs):
    def cb(learner):
        if learner.epoch == n_epochs: raise KeyboardInterrupt
    return cb


def assert_same_state(a: Learner, b: Learner):
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), f"weights differ: {k}"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for pa, pb in zip(sa["state"].values(), sb["state"].values()):
        for k in pa: assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), f"optimizer state differs: {k}"
    assert a.step == b.step and a.epoch == b.epoch and a.best == b.best
    assert a.scaler.state_dict() == b.scaler.state_dict()


def strip(recs): return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in recs]


@pytest.mark.parametrize("over", [
    dict(),                                                                              # AdamW, fp32
    dict(optimizer="sgd", amp="bf16", grad_accum=2, clip_grad=0.5, decay_all=False,
         lr_scales={"encoder.": 0.1}, num_workers=1, schedule="poly", sched_unit="step", reference_lag=False),
    dict(amp="fp16", drop_last=False, batch_size=6),                               # GradScaler on CPU, short last batch
], ids=["adamw-fp32", "sgd-bf16-accum-clip-groups-worker", "adamw-fp16-scaler"])
def test_resume_is_bitwise(tmp_path, over):
    cfg = {**BASE, **over}
    aug = cfg["num_workers"] > 0
    a = fit(EncDec(), mse_loss, NoisyToy(aug=aug), cfg, tmp_path / "a", eval_fn=val_eval)
    with pytest.raises(KeyboardInterrupt):
        fit(EncDec(), mse_loss, NoisyToy(aug=aug), cfg, tmp_path / "b", eval_fn=val_eval,
            callbacks=dict(on_epoch_end=kill_after(1)))
    assert torch.load(tmp_path / "b/last.pt", weights_only=True)["epoch"] == 1
    torch.manual_seed(1234)
    random.seed(1)
    np.random.seed(1)                                                                   # disturb every global stream
    b = fit(EncDec(seed=7), mse_loss, NoisyToy(aug=aug), cfg, tmp_path / "b", eval_fn=val_eval, resume=True)
    assert_same_state(a, b)
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))     # no duplicated lines
    if cfg["amp"] == "bf16": assert a.history[0]["train_out_bf16"] == 1.0               # the forward ran in bf16 on CPU
    if cfg["amp"] == "fp16": assert a.scaler.is_enabled() and a.scaler.get_scale() > 0


def test_resume_in_a_fresh_process(tmp_path):
    "The resume happens in a new Python process (nothing leaks through module state)."
    cfg = {**BASE, "epochs": 2}
    a = fit(EncDec(), mse_loss, NoisyToy(), cfg, tmp_path / "a", eval_fn=val_eval)
    with pytest.raises(KeyboardInterrupt):
        fit(EncDec(), mse_loss, NoisyToy(), cfg, tmp_path / "b", eval_fn=val_eval,
            callbacks=dict(on_epoch_end=kill_after(1)))
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_learner import EncDec, NoisyToy, mse_loss, val_eval, BASE
        from weaktr.learner import fit
        L = fit(EncDec(seed=5), mse_loss, NoisyToy(), {{**BASE, "epochs": 2}}, sys.argv[1], eval_fn=val_eval,
                resume=True)
        torch.save(L.model.state_dict(), sys.argv[1] + "/final.pt")
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "b")], env=env, capture_output=True, text=True,
                       timeout=600)   # a hang guard, not a speed check
    assert r.returncode == 0, r.stderr
    wb = torch.load(tmp_path / "b/final.pt", weights_only=True)
    assert all(torch.equal(v, wb[k]) for k, v in a.model.state_dict().items())
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))


def test_checkpoint_contents_load_weights_only(tmp_path):
    L = fit(EncDec(), mse_loss, NoisyToy(), {**BASE, "amp": "fp16"}, tmp_path, eval_fn=val_eval)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)                             # the whole thing, no pickles
    assert {"model", "optimizer", "scaler", "scheduler", "epoch", "step", "rng", "config", "best", "metrics"} <= set(ck)
    assert (ck["epoch"], ck["step"], ck["world_size"]) == (3, 15, 1)
    assert ck["scaler"]["scale"] > 0 and ck["scheduler"]["steps_per_epoch"] == 5
    assert set(ck["rng"][0]) == {"python", "numpy", "torch", "cuda", "loader"}
    assert cfg_from_flat(TrainCfg, ck["config"]) == L.cfg                                # the config round-trips
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    vals = [h["val_mse"] for h in L.history]
    assert best["best"]["value"] == min(vals) and best["best"]["epoch"] == int(np.argmin(vals))
    assert set(best) == {"format", "model", "epoch", "step", "config", "best", "metrics"}
    assert all(torch.equal(best["model"][k], v) for k,
               v in L.model.state_dict().items()) == (best["best"]["epoch"] == 2)
    assert json.loads((tmp_path / "config.json").read_text())["amp"] == "fp16"
    with pytest.raises(ValueError, match="not a Learner checkpoint"):
        Learner(EncDec(), mse_loss, NoisyToy(), BASE, tmp_path).fit(resume=tmp_path / "best.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        Learner(EncDec(), mse_loss, NoisyToy(), BASE, tmp_path / "none").fit(resume=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, bad):
    calls, saved = [], {}
    def loss_fn(model, batch):
        loss, logs = mse_loss(model, batch)
        calls.append(1)
        return (loss * bad if len(calls) == 8 else loss), logs                       # epoch 1, batch 3 (5 per epoch)
    def snapshot(learner):
        saved["bytes"] = hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest()
        saved["w"] = {k: v.clone() for k, v in learner.model.state_dict().items()}
    with pytest.raises(FloatingPointError,
                       match=rf"epoch 1, step 7 \(batch 3 of 5\): loss = {bad}.*last.pt \(epoch 1\) is untouched"):
        fit(EncDec(), loss_fn, NoisyToy(), BASE, tmp_path, eval_fn=val_eval, callbacks=dict(on_epoch_end=snapshot))
    assert hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest() == saved["bytes"]
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.equal(ck["model"][k], saved["w"][k]) for k in saved["w"])
    assert not list(tmp_path.glob(".*.tmp"))                                            # no half-written files


def test_nan_before_any_checkpoint(tmp_path):
    nan_loss = lambda m, b: (mse_loss(m, b)[0] * float("nan"), {})
    with pytest.raises(FloatingPointError, match="epoch 0, step 0 .*no checkpoint was written yet"):
        fit(EncDec(), nan_loss, NoisyToy(), BASE, tmp_path)
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("epochs,warmup,unit", [(60, 5, "epoch"), (7, 2, "epoch"), (6, 2, "step"), (5, 0, "step")])
def test_cosine_matches_timm_scheduler(epochs, warmup, unit):
    "lr_at without the lag = timm CosineLRScheduler stepped per epoch (t_in_epochs) or per update (step_update)."
    from timm.scheduler import CosineLRScheduler
    cfg = cfg_from_flat(TrainCfg, {**PHASE1_VOC, "epochs": epochs, "warmup_epochs": warmup, "sched_unit": unit,
                                   "reference_lag": False})
    spe = 3 if unit == "step" else 1
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=effective_lr(cfg))
    sch = CosineLRScheduler(opt, t_initial=epochs * spe, lr_min=1e-5, warmup_t=warmup * spe, warmup_lr_init=1e-6,
                            t_in_epochs=unit == "epoch")
    for u in range((epochs + 2) * spe):
        if unit == "epoch": sch.step(u)
        else: sch.step_update(u)
        assert math.isclose(opt.param_groups[0]["lr"], lr_at(cfg, u // spe, u % spe, spe), rel_tol=1e-12), u


def test_phase1_cosine_lag_inside_the_loop(tmp_path):
    "Per-epoch lrs the loop really used = lr_at with the lag = timm semantics; linear scaling by the global batch."
    cfg = cfg_from_flat(TrainCfg, {**PHASE1_VOC_V1,
                                   **{k: v for k, v in BASE.items() if k not in ("lr", "lr_scale_by_batch")},
                                   "epochs": 8, "warmup_epochs": 3, "batch_size": 64, "max_steps": None})
    seen = []
    L = fit(EncDec(), mse_loss, NoisyToy(128), cfg, tmp_path, callbacks=dict(
        on_batch_end=lambda l: seen.append((len(l.history), l.optimizer.param_groups[0]["lr"]))))
    eta = 4e-4 * 64 / 512
    want = [1e-6, 1e-6] + [1e-6 + t * (eta - 1e-6) / 3 for t in (1, 2)] + \
           [1e-5 + 0.5 * (eta - 1e-5) * (1 + math.cos(math.pi * t / 8)) for t in (3, 4, 5, 6)]
    got = [lr for e, lr in seen[::2]]                                                    # 2 updates per epoch
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert [h["lr"] for h in L.history] == got


def test_phase2_poly_group_scales_inside_the_loop(tmp_path):
    "Update u (0-based) runs at poly(u / T) × scale; the encoder ends near its 1e-6 floor, the decoder near 1e-5."
    cfg = {**PHASE2_VOC, **{k: BASE[k] for k in ("device", "progress", "plot", "log_every")}, "epochs": 3,
           "num_workers": 0,
           "select_metric": None}
    seen = []
    L = fit(EncDec(), mse_loss, NoisyToy(18), cfg, tmp_path,                            # 18 / 4 -> 5 updates, last of 2
            callbacks=dict(on_batch_end=lambda l: seen.append({g["group_name"]: g["lr"]
                                                               for g in l.optimizer.param_groups})))
    T = 15
    assert len(seen) == T and L.step == T
    for u, lrs in enumerate(seen):
        want = poly_lr(u / 5, 1e-4, 3)
        assert math.isclose(lrs["*"], want, rel_tol=1e-12) and math.isclose(lrs["encoder."], 0.1 * want, rel_tol=1e-12)
    assert {"encoder.", "encoder. no_decay", "*", "* no_decay"} == set(seen[0])
    assert all(g["weight_decay"] == 0.0 for g in L.optimizer.param_groups)
    assert L.optimizer.defaults["nesterov"] and isinstance(L.optimizer, torch.optim.SGD)
    assert abs(poly_lr(3, 1e-4, 3) * 0.1 - 1e-6) < 1e-18


def test_logs_plot_max_steps_and_cadence(tmp_path):
    evals = []
    def ev(model, epoch):
        evals.append(epoch)
        return val_eval(model, epoch)
    cfg = {**BASE, "epochs": 5, "eval_every": 2, "plot": True, "select_metric": None}
    fit(EncDec(), mse_loss, NoisyToy(), cfg, tmp_path, eval_fn=ev)
    assert evals == [1, 3, 4]                                                            # every 2 epochs + the last
    recs = read_metrics(tmp_path)
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [0, 1, 2, 3, 4]
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(2, 26, 2)) and all("mae" in r and "loss" in r for r in steps)
    assert (tmp_path / "metrics.png").stat().st_size > 1000 and not (tmp_path / "best.pt").exists()
    fig = plot_metrics(tmp_path)
    assert len(fig.axes) == 3 and fig.axes[2].get_legend_handles_labels()[1] == ["val_mse"]
    # max_steps: a smoke run stops after 7 updates (mid epoch 1) and saves that state
    M = fit(EncDec(), mse_loss, NoisyToy(), {**BASE, "max_steps": 7}, tmp_path / "smoke")
    ck = torch.load(tmp_path / "smoke/last.pt", weights_only=True)
    assert M.step == 7 and (ck["step"], ck["epoch"]) == (7, 2)


def test_checkpoint_cadence(tmp_path):
    "last.pt every `ckpt_every` epochs and after the last one; callbacks run after the save."
    saves = []
    def seen(l):
        p = tmp_path / "last.pt"
        saves.append(torch.load(p, weights_only=True)["epoch"] if p.exists() else None)
    fit(EncDec(), mse_loss, NoisyToy(), {**BASE, "epochs": 5, "ckpt_every": 2, "select_metric": None}, tmp_path,
        callbacks=dict(on_epoch_end=seen))
    assert saves == [None, 2, 2, 4, 5]


def test_user_dataloader_resume(tmp_path):
    "A ready DataLoader with its own generator and RandomSampler also resumes bitwise."
    def loader():
        g = torch.Generator().manual_seed(3)
        return DataLoader(NoisyToy(aug=True), batch_size=8, sampler=RandomSampler(NoisyToy(), generator=g), generator=g)
    a = fit(EncDec(), mse_loss, loader(), BASE, tmp_path / "a", eval_fn=val_eval)
    with pytest.raises(KeyboardInterrupt):
        fit(EncDec(), mse_loss, loader(), BASE, tmp_path / "b", eval_fn=val_eval,
            callbacks=dict(on_epoch_end=kill_after(2)))
    b = fit(EncDec(), mse_loss, loader(), BASE, tmp_path / "b", eval_fn=val_eval, resume=True)
    assert_same_state(a, b)


def test_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="select_metric='miou' is not among the eval_fn metrics"):
        fit(EncDec(), mse_loss, NoisyToy(), {**BASE, "select_metric": "miou"}, tmp_path, eval_fn=val_eval)
    with pytest.raises(ValueError, match="reserved metric name"):
        fit(EncDec(), mse_loss, NoisyToy(), BASE, tmp_path / "r", eval_fn=lambda m, e: dict(lr=1.0))
    with pytest.raises(ValueError, match=r"lr_scales prefix\(es\) \['backbone.'\] match no trainable parameter"):
        Learner(EncDec(), mse_loss, NoisyToy(), {**BASE, "lr_scales": {"backbone.": 0.1}}, tmp_path)
    with pytest.raises(ValueError, match="unknown callback event"):
        Learner(EncDec(), mse_loss, NoisyToy(), BASE, tmp_path, callbacks=dict(on_step=print))
    with pytest.raises(ValueError, match="yields no batch"):
        Learner(EncDec(), mse_loss, NoisyToy(4), BASE, tmp_path)
    with pytest.raises(TypeError, match="TrainCfg.epochs: expected int"):
        Learner(EncDec(), mse_loss, NoisyToy(), {**BASE, "epochs": "3"}, tmp_path)


def test_config_name(tmp_path):
    "The TrainCfg goes to `config_name` (stages keep their own config.json); '' writes none."
    (tmp_path / "a").mkdir()
    (tmp_path / "a/config.json").write_text('{"stage": "mine"}')
    Learner(EncDec(), mse_loss, NoisyToy(), {**BASE, "epochs": 1}, tmp_path / "a",
            config_name="train_config.json").fit()
    assert json.loads((tmp_path / "a/config.json").read_text()) == {"stage": "mine"}
    assert json.loads((tmp_path / "a/train_config.json").read_text())["epochs"] == 1
    Learner(EncDec(), mse_loss, NoisyToy(), {**BASE, "epochs": 1}, tmp_path / "b", config_name="").fit()
    assert not (tmp_path / "b/config.json").exists() and (tmp_path / "b/last.pt").is_file()
