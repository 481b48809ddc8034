"""Phase 2 end to end: train_seg on pseudo-label PNGs (GC on), evaluate_seg with CRF + PNG export, clear errors,
batched == window-by-window inference, COCO-id export, and papermill smoke runs of both run notebooks."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weaktr.core import shared_data
from weaktr.data import COCO80_IDS, open_dataset, read_mask, voc_palette, write_mask
from weaktr.synth import make_synthetic
from weaktr.evaluate import (MS_RATIOS, EvalCfg, InferCfg, evaluate_model, evaluate_seg, export_lut, predict,
                             predict_windowed_reference)
from weaktr.metrics import confusion_matrix, miou
from weaktr.segmenter import create_segmenter
from weaktr.train_seg import SEG_SMOKE, SegTrainCfg, train_seg

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "nbs" / "runs"
TINY = dict(embed_dim=64, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    "A tiny synthetic set (3 classes, 64 px) and a pseudo-label folder holding its GT masks as PNGs."
    d = tmp_path_factory.mktemp("p2")
    root = make_synthetic(d / "syn", n_train=8, n_val=4, size=64, num_classes=3)
    pseudo = d / "pseudo"
    for id in open_dataset("synthetic", root, "train").ids:
        write_mask(pseudo / f"{id}.png", read_mask(root / "SegmentationClass" / f"{id}.png"))
    return root, pseudo


def seg_cfg(root, pseudo, run_dir, **kw):
    return SegTrainCfg(**{**SEG_SMOKE, "crop_size": 64, "base_size": 64, "gc_window": 16, "window_size": 64,
                          "window_stride": 43, "log_every": 1, **kw},
                       run_dir=str(run_dir), data="synthetic", data_root=str(root), train_split="train",
                       pseudo_dir=str(pseudo), device="cpu", progress=False)


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    root, pseudo = synth
    run = tmp_path_factory.mktemp("run") / "seg"
    # start value above the initial loss: GC active from step 1
    s = train_seg(seg_cfg(root, pseudo, run, gc_start=10.0))
    return run, s


def test_train_two_epochs_with_gc(trained):
    run, s = trained
    assert s["finished"] and s["epochs_done"] == 2 and s["steps"] == 4
    assert s["gc_on"] == 1.0 and s["labels"].startswith("pseudo:")
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0 <= r["miou"] <= 1 for r in epochs)
    assert s["miou"] == epochs[-1]["miou"] and s["miou_epoch"] == 1          # headline = last epoch (pitfall 25)
    steps = [r for r in recs if r["kind"] == "step"]
    assert steps[0]["lr"] == pytest.approx(1e-4) and steps[-1]["lr"] < steps[0]["lr"]   # poly, no warm-up
    spec = json.loads((run / "model.json").read_text())
    assert spec["model"]["num_classes"] == 4 and spec["class_names"][0] == "background"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["gc_start"] == 10.0 and "optimizer" in json.loads((run / "train_config.json").read_text())
    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [0.1, 1.0] and all(g["nesterov"] for g in groups)


def test_evaluate_with_crf_and_export(trained, synth, tmp_path):
    root, _ = synth
    run, _ = trained
    out = tmp_path / "eval"
    s = evaluate_seg(EvalCfg(run_dir=str(out), checkpoint=str(run), data="synthetic", data_root=str(root), split="val",
                             ratios=(0.75, 1.0, 1.25), flip=True, two_output=True, crf=True, train_split="train",
                             n_fig=2, progress=False, device="cpu"))
    val = open_dataset("synthetic", root, "val")
    assert s["n_images"] == 4 and s["crf"] == "voc" and s["checkpoint_epoch"] == 2
    assert s["infer"]["window"] == 64 and s["infer"]["base_size"] == 64           # from the run's model.json
    conf, conf_crf = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    for i, id in enumerate(val.ids):
        png = out / "preds" / f"{id}.png"
        im = Image.open(png)
        assert im.mode == "P" and im.size == (64, 64)                           # single-channel palette PNG
        assert np.array_equal(np.array(im.getpalette()[:768], np.uint8).reshape(256, 3), voc_palette())
        pred = np.array(im)
        assert pred.max() <= 3 and np.array_equal(read_mask(png), pred)
        gt = val[i]["mask"]
        conf_crf += confusion_matrix(pred, gt, 4)
        conf += confusion_matrix(read_mask(out / "preds_nocrf" / f"{id}.png"), gt, 4)
    assert s["miou"] == pytest.approx(miou(conf)[0], abs=1e-5)                 # the exported PNGs are what was scored
    assert s["crf_miou"] == pytest.approx(miou(conf_crf)[0], abs=1e-5)        # (fractions, as every stored mIoU)
    assert s["headline_miou"] == s["crf_miou"] and s["pseudo_mask_train_miou"] == s["train"]["crf_miou"]
    assert sorted(p.stem for p in (out / "pseudo_train").iterdir()) == open_dataset("synthetic", root, "train").ids
    assert "| **mIoU** |" in (out / "iou_table.md").read_text() and (out / "predictions.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["finished"]


def test_missing_pseudo_labels(synth, tmp_path):
    root, pseudo = synth
    part = tmp_path / "pseudo"
    ids = open_dataset("synthetic", root, "train").ids
    for id in ids[:5]: write_mask(part / f"{id}.png", read_mask(pseudo / f"{id}.png"))
    with pytest.raises(FileNotFoundError, match=r"3 of 8 training images have no pseudo label <id>\.png") as e:
        train_seg(seg_cfg(root, part, tmp_path / "run"))
    assert all(i in str(e.value) for i in ids[5:])


def test_class_count_mismatch(trained, tmp_path):
    run, _ = trained
    root5 = make_synthetic(tmp_path / "syn5", n_train=8, n_val=2, size=64, num_classes=4)   # K = 5 vs the run's 4
    with pytest.raises(ValueError,
                       match=r"predicts n_cls=4 classes but synthetic split 'val' has 4 classes \+ background = 5"):
        evaluate_seg(EvalCfg(run_dir=str(tmp_path / "e"), checkpoint=str(run / "last.pt"), data="synthetic",
                             data_root=str(root5), progress=False, device="cpu"))
    pseudo5 = tmp_path / "pseudo5"
    for id in open_dataset("synthetic", root5, "train").ids:
        write_mask(pseudo5 / f"{id}.png", read_mask(root5 / "SegmentationClass" / f"{id}.png"))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "last.pt").write_bytes((run / "last.pt").read_bytes())
    with pytest.raises(ValueError, match=r"trained with n_cls=4 classes but this run has K=5"):
        train_seg(seg_cfg(root5, pseudo5, copy))


def test_batched_equals_window_by_window():
    torch.manual_seed(1)
    model = create_segmenter("deit_small_patch16_224", num_classes=5, img_size=32, **TINY).eval()
    img = np.random.default_rng(3).integers(0, 256, (50, 71, 3), dtype=np.uint8)
    for two in (False, True):
        cfg = InferCfg(window=32, stride=21, base_size=44, ratios=MS_RATIOS, flip=True, two_output=two, window_batch=6)
        a, b = predict(model, img, cfg), predict_windowed_reference(model, img, cfg)
        assert a.shape == (5, 50, 71)
        assert float((a - b).abs().max()) < 1e-5 and torch.equal(a.argmax(0), b.argmax(0))
        assert torch.allclose(a.sum(0), torch.full((50, 71), 1.8 if two else 1.0), atol=1e-4)


def test_test_split_export_without_gt(synth, tmp_path):
    "VOC test-server path: a VOC-layout split without GT is predicted and exported, no score."
    root, _ = synth
    s = evaluate_seg(EvalCfg(run_dir=str(tmp_path / "t"), data="voc", data_root=str(root), split="val", gt=False,
                             smoke=True, crf=False, progress=False, device="cpu"))     # random tiny model, K = 21
    assert "miou" not in s and s["n_with_gt"] == 0 and s["n_images"] == 4
    assert all(Image.open(tmp_path / "t" / "preds" / f"val_{i:05d}.png").mode == "P" for i in range(4))


def test_coco_category_id_export(tmp_path):
    "coco80 classes are exported as COCO category ids (0 = background) and read back for scoring."
    try: root = shared_data("coco-mini")
    except FileNotFoundError as e: pytest.skip(str(e))
    ds = open_dataset("coco80", root, "val2014", mask_space="coco80")
    ds.ids = ds.ids[:2]
    torch.manual_seed(0)
    model = create_segmenter("deit_small_patch16_224", num_classes=81, img_size=32, **TINY).eval()
    with torch.no_grad():                                   # bias the decoder so that many classes win somewhere
        model.decoder.mask_norm.bias.copy_(torch.linspace(-0.5, 0.5, 81))
    lut = export_lut("coco80", 81)
    cfg = InferCfg(window=32, stride=32, base_size=40)
    r = evaluate_model(model, ds, cfg, export_dir=tmp_path / "p", lut=lut, progress=False)
    for id in ds.ids:
        ids = np.unique(read_mask(tmp_path / "p" / f"{id}.png"))
        assert set(ids.tolist()) <= {0, *COCO80_IDS}
        probs = predict(model, ds[ds.ids.index(id)]["image"], cfg)
        assert np.array_equal(read_mask(tmp_path / "p" / f"{id}.png"), lut[probs.argmax(0).numpy()])
    r2 = evaluate_model(model, ds, cfg, export_dir=tmp_path / "p", lut=lut, progress=False)  # read back via the inverse
    assert r2["n_predicted"] == 0 and np.array_equal(r2["conf"], r["conf"])


def _papermill(nb, out, **params):
    import papermill as pm
    env_path = os.environ["PATH"]
    # the kernelspec runs `python`: the venv's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_path}"
    try:
        return pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(nb.parent), kernel_name="python3",
                                   progress_bar=False)
    finally:
        os.environ["PATH"] = env_path


def test_run_notebooks_smoke(synth, tmp_path):
    root, pseudo = synth
    _papermill(RUNS / "train_seg.ipynb", tmp_path / "train.ipynb", smoke=True, run_dir=str(tmp_path / "seg"),
               data_root=str(root), pseudo_dir=str(pseudo))
    s = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert s["finished"] and s["steps"] == 4 and s["n_train"] == 8 and s["config"]["embed_dim"] == 64
    _papermill(RUNS / "evaluate.ipynb", tmp_path / "eval.ipynb", smoke=True, run_dir=str(tmp_path / "ev"),
               checkpoint=str(tmp_path / "seg"), data_root=str(root))
    e = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert e["finished"] and e["n_images"] == 4 and e["checkpoint_kind"] == "train_seg" and "crf_miou" in e
    assert len(list((tmp_path / "ev" / "preds").glob("*.png"))) == 4


def test_run_notebook_bad_parameter(synth, tmp_path):
    from papermill.exceptions import PapermillExecutionError
    root, pseudo = synth
    with pytest.raises(PapermillExecutionError) as e:
        _papermill(RUNS / "train_seg.ipynb", tmp_path / "bad.ipynb", smoke=True, run_dir=str(tmp_path / "seg"),
                   data_root=str(root), pseudo_dir=str(pseudo), gc_windw=16)
    assert "unknown parameter(s) ['gc_windw']" in str(e.value)
