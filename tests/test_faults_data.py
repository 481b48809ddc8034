"""Fault-injection tests for the data layer, the Learner and Phase-1 training (issue 16, items 3, 6-12, 16).

Each test feeds the bad input / interruption the issue found and asserts the fixed behaviour; every one of them
failed on the code before the fix. Small tmp-dir datasets only, CPU, no timing.
"""
import json, re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from weaktr.data import (DataError, convert_cls_labels_npy, folder_dataset, open_dataset, read_image,
                         voc_dataset, write_mask)

torch.set_num_threads(1)


def _folder(root, rows, names=("cat", "dog"), n=3, size=(8, 6)):
    "An own-images folder: images/im<k>.png, labels.csv with `rows`, names.txt (unless names is None)."
    root = Path(root)
    (root / "images").mkdir(parents=True)
    for k in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 30 * k, np.uint8)).save(root / "images" / f"im{k}.png")
    (root / "labels.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    if names is not None: (root / "names.txt").write_text("\n".join(names) + "\n")
    return root


def _voc(root, sizes, mask_sizes=None):
    "A VOC-layout folder with one image per (W, H) in `sizes` and masks of `mask_sizes` (default: the same)."
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"): (root / sub).mkdir(parents=True)
    ids = [f"im{k}" for k in range(len(sizes))]
    for i, (W, H), (mW, mH) in zip(ids, sizes, mask_sizes or sizes):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{i}.png")
        m = np.zeros((mH, mW), np.uint8)
        m[: mH // 2] = 1
        write_mask(root / "SegmentationClass" / f"{i}.png", m)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root


# ------------------------------------------------------------ item 3: -p smoke True with the default data

def test_smoke_default_synthetic_builds(tmp_path, monkeypatch):
    "make_default_synthetic(smoke=True) gave 'got multiple values for keyword argument n_train'."
    monkeypatch.setenv("WEAKTR_RUNS", str(tmp_path))
    from weaktr.synth import make_default_synthetic
    from weaktr.train_cam import CamTrainCfg, resolve_data_root
    root = make_default_synthetic(smoke=True)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["splits"] == dict(train=16, val=8) and root.parent == tmp_path / "data"
    assert resolve_data_root(CamTrainCfg(data="synthetic", data_root="", smoke=True)) == root  # the run notebook's path


# ------------------------------------------------------------ item 6: 16-bit PNGs

def test_16bit_png_keeps_its_grey_levels(tmp_path):
    "A 16-bit grey PNG (PIL mode I;16) read back every pixel as 255."
    g = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)            # 0 .. 65520
    Image.fromarray(g).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = np.asarray(read_image(tmp_path / "g16.png"))
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], np.rint(g / 257).astype(np.uint8))   # full range -> 0..255, linear
    assert img.min() == 0 and len(np.unique(img)) > 50
    e8 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)         # an 8-bit image stored as 16 bit
    Image.fromarray(e8).save(tmp_path / "e8.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "e8.png"))[..., 1], np.arange(256).reshape(16, 16))


def test_16bit_png_through_a_dataset(tmp_path):
    root = _voc(tmp_path / "v", [(8, 6)])
    Image.fromarray(np.full((6, 8), 32896, np.uint16)).save(root / "JPEGImages" / "im0.png")     # 32896 = 128 * 257
    s = voc_dataset(root, "train")[0]
    assert np.asarray(s["image"]).max() == 128


# ------------------------------------------------------------ item 8: size guard

def _big_png(path, W, H):
    Image.new("RGB", (W, H), (10, 20, 30)).save(path, compress_level=1)
    return path


def test_size_guard_refuses_a_huge_image_naming_it(tmp_path):
    "A 6000x4000 image went on to CAM generation (140 GB); now refused from its header with the file's name."
    p = _big_png(tmp_path / "huge.png", 6000, 4000)
    with pytest.raises(DataError, match=r"huge\.png is 6000x4000 .*max_pixels=.*max_side"):
        read_image(p)
    from weaktr.data import MAX_PIXELS
    assert MAX_PIXELS < 4000 * 3000 <= 6000 * 4000        # a 12 MP phone photo is refused too (35 GB in CAM generation)
    small = read_image(p, max_side=1024)                   # ... or downscaled at load
    assert small.size == (1024, 683)
    assert read_image(p, max_pixels=None).size == (6000, 4000)


def test_size_guard_in_every_dataset_and_max_side_downscales_masks(tmp_path):
    root = _voc(tmp_path / "v", [(60, 40), (3000, 2000)])
    ds = open_dataset("voc", root, "train", max_pixels=5000)
    assert ds[0]["image"].size == (60, 40)
    with pytest.raises(DataError, match=r"JPEGImages/im1\.png is 3000x2000"): ds[1]
    with pytest.raises(DataError, match=r"im1\.png"): ds.check_sizes()       # header only, before a long run
    ds = open_dataset("voc", root, "train", max_side=50, max_pixels=5000)
    s = ds[1]
    assert s["image"].size == (50, 33) and s["mask"].shape == (33, 50)        # mask follows (nearest: values kept)
    assert set(np.unique(s["mask"])) == {0, 1} and ds.image_size("im1") == (50, 33)
    assert ds[0]["image"].size == (50, 33)
    with pytest.raises(ValueError, match="max_side"): open_dataset("voc", root, "train", max_side=0)


def test_max_side_reaches_cam_generation(tmp_path):
    "CAM generation reads images through the dataset: the guard and max_side apply there too (CAMs at the loaded size)."
    from weaktr.camgen import _raw_sample, evaluate_cams, image_sizes
    from weaktr.testing import tiny_weaktr
    root = _voc(tmp_path / "v", [(60, 40), (3000, 2000)])
    with pytest.raises(DataError, match=r"im1\.png is 3000x2000"):
        _raw_sample(open_dataset("voc", root, "train", max_pixels=5000), 1)
    ds = open_dataset("voc", root, "train", max_side=64, max_pixels=5000)
    s = _raw_sample(ds, 1, need_mask=True)
    assert s["image"].size == (64, 43) and s["mask"].shape == (43, 64)
    assert image_sizes(ds, [0, 1]) == [(40, 60), (43, 64)]
    r = evaluate_cams(tiny_weaktr(20).eval(), ds, thresholds=[0.5])
    assert 0 <= r["cam_miou"] <= 1



# ------------------------------------------------------------ item 9: mask/image size mismatch

def test_mask_size_mismatch_named_at_check_and_first_read(tmp_path):
    root = _voc(tmp_path / "v", [(8, 6), (8, 6)], [(8, 6), (7, 6)])
    ds = voc_dataset(root, "train")
    msg = r"mask .*SegmentationClass/im1\.png is 7x6 \(WxH\) but image .*JPEGImages/im1\.png is 8x6"
    with pytest.raises(DataError, match=msg): ds.check_sizes()
    with pytest.raises(DataError, match=msg): ds.read_mask("im1")        # the CAM check's route (not ds[i])


# ------------------------------------------------------------ item 11: CSV path traversal

@pytest.mark.parametrize("entry", ["../../outside/secret.jpg", "ABS"])
def test_folder_csv_cannot_escape_the_image_folder(tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(outside / "secret.jpg")
    entry = str(outside / "secret.jpg") if entry == "ABS" else entry
    root = _folder(tmp_path / "a" / "b", ["im0.png,cat", f"{entry},dog"])
    assert (root / "images"
            / "../../outside/secret.jpg").resolve() == (outside / "secret.jpg").resolve() or entry != "ABS"
    with pytest.raises(DataError, match=r"labels\.csv: image '.*secret\.jpg' is not a path inside the image folder"):
        open_dataset("folder", root)


# ------------------------------------------------------------ item 12: CSV without names.txt, empty labels

def test_folder_needs_names_and_rejects_typos_and_empty_labels(tmp_path):
    root = _folder(tmp_path / "f", ["im0.png,cat", "im1.png,dgo", "im2.png,dog"], names=None)
    with pytest.raises(FileNotFoundError, match=r"names\.txt not found"): open_dataset("folder", root)
    with pytest.raises(DataError, match="class names are required.*'dgo'"):
        folder_dataset(root / "images", root / "labels.csv")
    (root / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"line 3 \(image 'im1.png'\): unknown class name 'dgo'"):
        open_dataset("folder", root)
    (root / "labels.csv").write_text("image,labels\nim0.png,cat\nim1.png,\nim2.png,dog\n")
    with pytest.raises(DataError, match=r"line 3 \(image 'im1.png'\): empty 'labels' field"):
        open_dataset("folder", root)
    (root / "labels.csv").write_text("image,labels\nim0.png,cat\nim1.png, ; \nim2.png,dog\n")
    with pytest.raises(DataError, match=r"line 3 \(image 'im1.png'\): empty 'labels' field"):
        open_dataset("folder", root)
    (root / "labels.csv").write_text("image,labels\nim0.png,cat\nim1.png,dog;cat\nim2.png,dog\n")
    ds = open_dataset("folder", root)
    assert ds.class_names == ("cat", "dog") and ds[1]["labels"].tolist() == [1.0, 1.0]
    assert open_dataset("folder", root, names=["dog", "cat"]).class_names == ("dog", "cat")


# ------------------------------------------------------------ item 16: pickle opt-in

class _Payload:
    "Unpickling it creates a file: proof that code from the .npy ran."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.touch, (Path(self.marker),))


def test_npy_converter_needs_explicit_opt_in_and_warns(tmp_path):
    marker = tmp_path / "PWNED"
    np.save(tmp_path / "evil.npy", np.array({"a": _Payload(str(marker))}, dtype=object), allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(DataError, match="allow_pickle=True"):
        convert_cls_labels_npy(tmp_path / "evil.npy", tmp_path / "out.json")
    assert not marker.exists()                                 # refused before unpickling anything
    root = _voc(tmp_path / "v", [(8, 6)])
    with pytest.raises(DataError, match=r"unpickling runs code.*allow_pickle=True"):
        voc_dataset(root, "train", labels=str(tmp_path / "evil.npy"))
    np.save(tmp_path / "ok.npy", {"im0": np.array([1, 0], np.float32)}, allow_pickle=True)
    with pytest.warns(UserWarning, match="UNPICKLING .*ok.npy"):
        out = convert_cls_labels_npy(tmp_path / "ok.npy", tmp_path / "ok.json", allow_pickle=True)
    assert json.loads(out.read_text()) == {"im0": [1]}


# ------------------------------------------------ items 7 and 9: the Learner keeps only good epochs, and keeps them

def _toy(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :1] * 2 - x[:, 1:2]).tanh())


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 1))


_CFG = dict(epochs=3, batch_size=8, lr=3e-3, lr_scale_by_batch=False, warmup_epochs=1, amp="off", device="cpu",
            num_workers=0, log_every=2, select_metric=None, progress=False, plot=False)


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y), {}


def test_divergence_guard_stops_before_saving_a_diverged_epoch(tmp_path):
    "A finite loss of 5.9e26 trained on and its epoch was saved, then called 'the last good checkpoint'."
    from weaktr.learner import fit
    calls = []
    def explodes(model, batch):                       # 6 batches per epoch: call 16 = epoch 2, batch 4
        loss, logs = _mse(model, batch)
        calls.append(1)
        return (loss * 5.9e26 if len(calls) >= 16 else loss), logs
    with pytest.raises(FloatingPointError,
                       match=r"training diverged at epoch 2, step 15 \(batch 4 of 6\): loss = .*e\+2[0-9] "
                       r".*diverge_factor=1000.*the last good checkpoint .*last\.pt \(epoch 2\) is untouched"):
        fit(_model(), explodes, _toy(), _CFG, tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert len(ck["guard"]["ref_losses"]) == 12


def test_non_finite_weights_are_never_saved(tmp_path):
    "An update that overflows the weights while its loss was finite: the epoch is neither evaluated nor saved."
    from weaktr.learner import fit
    def poison(learner):
        if learner.epoch == 1 and learner.batch_idx == 5:
            with torch.no_grad(): learner.model[0].weight[0, 0] = float("inf")
    evals = []
    with pytest.raises(FloatingPointError,
                       match=r"parameters are not finite after epoch 1 .*'0\.weight'.*"
                             r"last\.pt \(epoch 1\) is untouched"):
        fit(_model(), _mse, _toy(), _CFG, tmp_path / "run", eval_fn=lambda m, e: evals.append(e) or {},
            callbacks=dict(on_batch_end=poison))
    assert evals == [0] and torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


def test_failing_eval_keeps_the_trained_epoch(tmp_path):
    "An error in the per-epoch check (e.g. a bad mask) used to lose the epoch it evaluated."
    from weaktr.learner import fit, read_metrics
    def eval_fn(model, epoch):
        if epoch == 1: raise DataError("mask x.png is 7x6 (WxH) but image x.jpg is 8x6")
        return dict(v=1.0)
    with pytest.raises(RuntimeError,
                       match=r"eval_fn failed after epoch 1 \(DataError: mask x\.png .*\); the trained epoch is kept"):
        fit(_model(), _mse, _toy(), _CFG, tmp_path / "run", eval_fn=eval_fn)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2
    assert read_metrics(tmp_path / "run")[-1]["eval_error"].startswith("DataError: mask x.png")
    learner = fit(_model(), _mse, _toy(), _CFG, tmp_path / "run", eval_fn=lambda m, e: dict(v=1.0), resume=True)
    assert learner.epoch == 3 and [r["epoch"] for r in learner.history] == [0, 1, 2]


def test_normal_training_does_not_trip_the_guard(tmp_path):
    "The toy regression from a fresh init and the same run at a 10x lr both finish with the guard on (default 1000)."
    from weaktr.learner import fit
    for lr in (3e-3, 3e-2):
        learner = fit(_model(), _mse, _toy(), {**_CFG, "lr": lr, "epochs": 4}, tmp_path / f"lr{lr}")
        assert learner.epoch == 4


def test_phase1_cam_split_sizes_checked_before_training(tmp_path):
    "A mask/image mismatch in the CAM-check split failed only after a full epoch, naming no file."
    from weaktr.synth import make_synthetic
    from weaktr.train_cam import CamTrainCfg, build_datasets
    root = make_synthetic(tmp_path / "s", n_train=8, n_val=4, size=32, num_classes=3)
    write_mask(root / "SegmentationClass" / "train_00003.png", np.zeros((31, 32), np.uint8))
    cfg = CamTrainCfg(data="synthetic", data_root=str(root), train_split="train", val_split="val", cam_split="train",
                      img_size=32, batch_size=4, num_workers=0, progress=False)
    with pytest.raises(DataError,
                       match=r"mask .*SegmentationClass/train_00003\.png is 32x31 \(WxH\) but image "
                             r".*train_00003\.png is 32x32"):
        build_datasets(cfg, root)


# ------------------------------------------------------------ item 10: range checks

@pytest.mark.parametrize("field, value, rng",
                         [("lr", -6e-4, "(0, inf)"), ("lr", 0.0, "(0, inf)"), ("min_lr", -1e-5, "[0, inf)"),
                                              ("warmup_lr", -1e-6, "[0, inf)"), ("lr", float("nan"), "(0, inf)"),
                                              ("weight_decay", -0.1, "[0, inf)"), ("diverge_factor", 0.5, "(1, inf)")])
def test_train_cfg_ranges(field, value, rng):
    from weaktr.learner import TrainCfg
    with pytest.raises(ValueError,
                       match=re.escape(f"TrainCfg.{field}: expected a finite number in {rng}, got {value!r}")):
        TrainCfg(**{field: value})


@pytest.mark.parametrize("field, value, rng", [("lr", -1e-3, r"\(0, inf\)"), ("min_lr", -1.0, r"\[0, inf\)"),
                                              ("warmup_lr", -1e-6, r"\[0, inf\)"), ("drop_path", 1.0, r"\[0, 1\)"),
                                              ("drop_path", -0.1, r"\[0, 1\)"), ("re_prob", 1.5, r"\[0, 1\]"),
                                              ("re_prob", -0.25, r"\[0, 1\]")])
def test_phase1_cfg_ranges(field, value, rng):
    from weaktr.train_cam import CamTrainCfg
    with pytest.raises(ValueError, match=rf"CamTrainCfg\.{field}: expected a finite number in {rng}, got {value!r}"):
        CamTrainCfg(data="synthetic", **{field: value})
    CamTrainCfg(data="synthetic", drop_path=0.0, re_prob=1.0, min_lr=0.0, warmup_lr=0.0)    # the edges that are allowed
