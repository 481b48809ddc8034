"""Phase-1 training stage: a tiny run end to end, exact resume, overfitting a tiny batch, bad parameters, the papermill
run notebook."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from weaktr.core import cfg_from_flat
from weaktr.synth import make_synthetic
from weaktr.learner import read_metrics
from weaktr.train_cam import HEADS, CamTrainCfg, build_cam_model, check_cam_cfg, train_cam

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RUN_NB = REPO / "nbs" / "runs" / "train_cam.ipynb"
TIME_KEYS = ("time", "epoch_time_s", "eval_time_s")
EVAL_KEYS = ["val_loss", "cam_miou", "cam_threshold", *(f"{k}_map_{h}" for k in ("sample", "class") for h in HEADS)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synth", n_train=16, n_val=8, size=64, num_classes=4)


def tiny(root, run_dir, **kw):
    "A 2-block, 64-dim WeakTr on 64-px images: 4 updates of batch 4 per epoch."
    return {**dict(run_dir=str(run_dir), data="synthetic", data_root=str(root), train_split="train", val_split="val",
                   cam_split="train", cam_eval_max_images=6, backbone="deit_tiny_patch16_224", embed_dim=64, depth=2,
                   num_heads=2, patch_size=8, img_size=64, reduction=2, crop_scale=(0.35, 1.0), eval_crop_pct=1.0,
                   epochs=2, batch_size=4, lr=1e-3, lr_scale_by_batch=False, warmup_epochs=1, reference_lag=False,
                   num_workers=0, log_every=1, cam_t_range=(0.05, 0.95, 0.05), progress=False), **kw}


def epoch_lines(run_dir):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_metrics(run_dir) if r["kind"] == "epoch"]


def test_tiny_run_files_metrics_checkpoints(synth, tmp_path):
    run = tmp_path / "run"
    s = train_cam(tiny(synth, run))
    ep = epoch_lines(run)
    assert [r["epoch"] for r in ep] == [0, 1]
    for r in ep:                                     # the three heads' mAPs (both kinds) and the CAM check, every epoch
        missing = [k for k in EVAL_KEYS if k not in r]
        assert not missing, missing
        assert all(0 <= r[k] <= 1 for k in EVAL_KEYS if "map" in k or k == "cam_miou")
    assert (s["epochs_done"], s["steps"], s["select_metric"]) == (2, 8, "cam_miou")
    assert s["best"]["value"] == max(r["cam_miou"] for r in ep)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert (run / "curves.png").stat().st_size > 10_000
    cfg = cfg_from_flat(CamTrainCfg, json.loads((run / "config.json").read_text()))   # config.json is our flat config
    assert cfg.embed_dim == 64 and cfg.run_dir == str(run)
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    best_map = torch.load(run / "best_map.pt", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == s["best"]["epoch"] + 1      # "epoch": epochs done; "best": 0-based
    assert best["best"]["epoch"] == s["best"]["epoch"] and best_map["best"]["epoch"] == s["best_map"]["epoch"]
    for ck in (last, best, best_map):
        build_cam_model(cfg, 4).load_state_dict(ck["model"])          # strict: the weights fit the config's model


def test_resume_is_a_noop_then_continues_exactly(synth, tmp_path):
    # straight 2-epoch run
    a = train_cam(tiny(synth, tmp_path / "a"))
    # the same run stopped after epoch 0 (max_steps), then resumed: bitwise the same weights and log lines
    b0 = train_cam(tiny(synth, tmp_path / "b", max_steps=4))
    assert b0["epochs_done"] == 1
    with pytest.warns(UserWarning, match="changed config"):
        b = train_cam(tiny(synth, tmp_path / "b"))
    assert (b["epochs_done"], b["steps"]) == (a["epochs_done"], a["steps"])
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert epoch_lines(tmp_path / "a") == epoch_lines(tmp_path / "b")
    # a finished run: resuming trains nothing and changes no checkpoint
    before = (tmp_path / "a" / "last.pt").stat().st_mtime_ns, (tmp_path / "a" / "best.pt").stat().st_mtime_ns
    again = train_cam(tiny(synth, tmp_path / "a"))
    assert (again["steps"], again["best"]) == (a["steps"], a["best"])
    assert before == ((tmp_path / "a" / "last.pt").stat().st_mtime_ns, (tmp_path / "a" / "best.pt").stat().st_mtime_ns)
    assert epoch_lines(tmp_path / "a") == epoch_lines(tmp_path / "b")
    # more epochs: continues from epoch 2
    with pytest.warns(UserWarning, match="changed config"):
        more = train_cam(tiny(synth, tmp_path / "a", epochs=3))
    assert (more["epochs_done"], more["steps"]) == (3, 12)
    assert [r["epoch"] for r in epoch_lines(tmp_path / "a")] == [0, 1, 2]
    # another model in the same folder is refused
    with pytest.raises(ValueError, match="was trained with another config"):
        train_cam(tiny(synth, tmp_path / "a", embed_dim=32))


def test_overfits_a_tiny_batch(synth, tmp_path):
    "8 images, one batch, no augmentation: 30 updates must cut the summed loss clearly."
    run = tmp_path / "overfit"
    train_cam(tiny(synth, run, max_train_images=8, batch_size=8, epochs=30, crop_scale=(1.0, 1.0), auto_augment="",
                   re_prob=0.0, drop_path=0.0, warmup_epochs=0, lr=2e-3, eval_every=30, eval_cam_miou=False,
                   max_val_images=4))
    losses = [r["loss"] for r in read_metrics(run) if r["kind"] == "step"]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)


def test_bad_parameters_fail_clearly(synth, tmp_path):
    base = tiny(synth, tmp_path / "x")
    with pytest.raises(ValueError, match=r"CamTrainCfg.backbone: 'vit_nope_patch16' is not a timm model name"):
        cfg_from_flat(CamTrainCfg, {**base, "backbone": "vit_nope_patch16"})
    with pytest.raises(TypeError, match=r"CamTrainCfg.epochs: expected int"):
        cfg_from_flat(CamTrainCfg, {**base, "epochs": "2"})
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['epoch'\]"):
        cfg_from_flat(CamTrainCfg, {**base, "epoch": 2})
    with pytest.raises(FileNotFoundError, match="CamTrainCfg.data_root: .*no-such-dir is not a folder"):
        check_cam_cfg(cfg_from_flat(CamTrainCfg, {**base, "data": "voc", "data_root": str(tmp_path / "no-such-dir")}))
    with pytest.raises(ValueError, match="data_root: required for data='voc'"):
        train_cam({**base, "data": "voc", "data_root": ""})
    with pytest.raises(FileNotFoundError, match="CamTrainCfg.pretrained: file not found"):
        train_cam({**base, "pretrained": str(tmp_path / "deit.pth")})
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        train_cam({**base, "batch_size": 64})
    assert not (tmp_path / "x" / "last.pt").exists()


def _papermill(out, **params):
    import papermill as pm
    env_path = os.environ["PATH"]
    # the kernelspec runs `python`: the venv's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_path}"
    try:
        return pm.execute_notebook(str(RUN_NB), str(out), parameters=params, cwd=str(RUN_NB.parent),
                                   kernel_name="python3", progress_bar=False)
    finally:
        os.environ["PATH"] = env_path


def test_run_notebook_smoke(synth, tmp_path):
    _papermill(tmp_path / "out.ipynb", smoke=True, run_dir=str(tmp_path / "run"), data_root=str(synth))
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 2 and s["model"]["embed_dim"] == 64 and s["images"]["train"] == 8
    nb = json.loads((tmp_path / "out.ipynb").read_text())
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


def _param_and_first_cells():
    cells = json.loads(RUN_NB.read_text())["cells"]
    p = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    return "".join(cells[p]["source"]), "".join(cells[p + 1]["source"])


@pytest.mark.parametrize("injected, err, msg", [
    ("backbone = 'vit_nope_patch16'", ValueError, "CamTrainCfg.backbone: 'vit_nope_patch16' is not a timm model name"),
    ("epochs = '3'", TypeError, "CamTrainCfg.epochs: expected int"),
    ("epoch = 3", TypeError, r"unknown parameter\(s\) \['epoch'\]"),           # a misspelt papermill -p name
    ("data = 'voc'", ValueError, "CamTrainCfg.data_root: required for data='voc'"),
    ("data = 'voc'; data_root = '/no/such/voc'", FileNotFoundError,
     "CamTrainCfg.data_root: /no/such/voc is not a folder"),
])
def test_run_notebook_bad_parameter_fails_in_first_cell(injected, err, msg):
    "What papermill runs: the parameters cell, the injected overrides, then the first cell, which must raise."
    params, first = _param_and_first_cells()
    ns = {}
    exec(params, ns)
    exec(injected, ns)
    with pytest.raises(err, match=msg):
        exec(first, ns)
    assert "summary" not in ns


def test_run_notebook_parameters_mirror_the_config():
    "The parameters cell names every CamTrainCfg field, with the CAM_TRAIN_DEMO values where the preset has one."
    import dataclasses
    from weaktr.train_cam import CAM_TRAIN_DEMO
    cells = json.loads(RUN_NB.read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
    params = {}
    exec(src, {}, params)
    assert set(params) - {"__annotations__"} == {f.name for f in dataclasses.fields(CamTrainCfg)}
    cfg = cfg_from_flat(CamTrainCfg, {k: v for k, v in params.items() if k != "__annotations__"})
    flat = cfg_from_flat(CamTrainCfg, CAM_TRAIN_DEMO).__dict__
    assert {k: getattr(cfg, k) for k in CAM_TRAIN_DEMO} == {k: v for k, v in flat.items() if k in CAM_TRAIN_DEMO}
