"""Issue 16, Phase 2 and weight files: a refused train_seg resume leaves the finished run untouched (item 2),
unreadable weight/checkpoint files raise an error naming the file with a hint (item 13), and SegTrainCfg
range-checks its numbers with errors naming the field (item 10). Each test fails on the code before the fix."""
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from weaktr.core import atomic_torch_save
from weaktr.data import open_dataset, read_mask, write_mask
from weaktr.evaluate import EvalCfg, evaluate_seg, load_seg_checkpoint
from weaktr.model import WeightFileError, create_weaktr, load_pretrained, read_state_dict
from weaktr.segmenter import create_segmenter, load_official_segmenter
from weaktr.synth import make_synthetic
from weaktr.train_seg import SEG_SMOKE, SegTrainCfg, train_seg

torch.set_num_threads(1)
TINY = dict(embed_dim=64, depth=2, num_heads=2)
RUN_FILES = ("config.json", "model.json", "last.pt", "best.pt", "summary.json", "metrics.jsonl")


def _pseudo(root, d):
    for id in open_dataset("synthetic", root, "train").ids:
        write_mask(d / f"{id}.png", read_mask(root / "SegmentationClass" / f"{id}.png"))
    return d


def seg_cfg(root, pseudo, run_dir, **kw):
    return SegTrainCfg(**{**SEG_SMOKE, "crop_size": 32, "base_size": 32, "gc_window": 8, "window_size": 32,
                          "window_stride": 21, "epochs": 1, **kw},
                       run_dir=str(run_dir), data="synthetic", data_root=str(root), train_split="train",
                       pseudo_dir=str(pseudo), device="cpu", progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    "A finished one-epoch train_seg run on a 3-class synthetic set, and a 4-class set for the refused resumes."
    d = tmp_path_factory.mktemp("faults2")
    root = make_synthetic(d / "syn", n_train=4, n_val=2, size=32, num_classes=3)
    root4 = make_synthetic(d / "syn4", n_train=4, n_val=2, size=32, num_classes=4)
    cfg = seg_cfg(root, _pseudo(root, d / "pseudo"), d / "run")
    s = train_seg(cfg)
    assert s["finished"]
    return d, cfg, root4, _pseudo(root4, d / "pseudo4")


def _snapshot(run):
    return {f: (run / f).read_bytes() for f in RUN_FILES if (run / f).is_file()}


def _copy_run(finished, name):
    d, cfg, *_ = finished
    run = d / name
    if run.exists(): shutil.rmtree(run)
    shutil.copytree(cfg.run_dir, run)
    return run, replace(cfg, run_dir=str(run))


# --- item 2: a refused resume writes nothing --------------------------------------------------------------------
def test_refused_resume_other_class_count_leaves_run_intact(finished, tmp_path):
    d, cfg, root4, pseudo4 = finished
    run, cfg = _copy_run(finished, "run_k")
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"trained with n_cls=4 classes but this run has K=5.*resume=False"):
        train_seg(replace(cfg, data_root=str(root4), pseudo_dir=str(pseudo4)))
    assert _snapshot(run) == before                                   # config.json / model.json not overwritten
    model, info = load_seg_checkpoint(run)                            # the old run is still evaluable
    assert info["n_cls"] == 4
    s = evaluate_seg(EvalCfg(run_dir=str(tmp_path / "e"), checkpoint=str(run), data="synthetic",
                             data_root=cfg.data_root,
                             ratios=(1.0,), flip=False, crf=False, n_fig=0, progress=False, device="cpu"))
    assert s["finished"] and s["n_cls"] == 4


def test_refused_resume_other_architecture_or_norm_leaves_run_intact(finished):
    run, cfg = _copy_run(finished, "run_arch")
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"last\.pt does not fit this run's model"):
        train_seg(replace(cfg, embed_dim=32, num_heads=2))
    with pytest.raises(ValueError, match=r"was trained with norm='imagenet'.*but this run has norm='vit'"):
        train_seg(replace(cfg, norm="vit"))
    assert _snapshot(run) == before


def test_refused_run_with_bad_input_leaves_run_intact(finished, tmp_path):
    run, cfg = _copy_run(finished, "run_input")
    before = _snapshot(run)
    empty = tmp_path / "no_labels"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="have no pseudo label"):
        train_seg(replace(cfg, pseudo_dir=str(empty), resume=False))
    assert _snapshot(run) == before


# --- item 13: unreadable files are named, with a hint ---------------------------------------------------------
def _truncate(src, dst, keep=0.5):
    b = src.read_bytes()
    dst.write_bytes(b[: int(len(b) * keep)])
    return dst


def test_truncated_resume_checkpoint(finished):
    run, cfg = _copy_run(finished, "run_cut")
    _truncate(run / "last.pt", run / "last.pt")
    before = _snapshot(run)
    with pytest.raises(WeightFileError, match=r"resume checkpoint .*last\.pt .*truncated or corrupt.*resume=False"):
        train_seg(cfg)
    assert _snapshot(run) == before
    with pytest.raises(WeightFileError, match=r"Phase-2 checkpoint .*last\.pt"):
        load_seg_checkpoint(run / "last.pt")


def test_truncated_weight_files(tmp_path):
    torch.manual_seed(0)
    vit = torch.nn.Linear(64, 64)
    sd = {"cls_token": torch.zeros(1, 1, 64), "w": vit.weight.detach().clone()}
    torch.save({"model": sd}, tmp_path / "w.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    cut_pth = _truncate(tmp_path / "w.pth", tmp_path / "cut.pth")
    cut_st = _truncate(tmp_path / "w.safetensors", tmp_path / "cut.safetensors", keep=0.9)
    with pytest.raises(WeightFileError, match=rf"pretrained weights {cut_pth} .*download the ImageNet weights again"):
        load_pretrained(create_weaktr("deit_tiny_patch16_224", 3, img_size=32, reduction=2, **TINY), cut_pth)
    with pytest.raises(WeightFileError, match=rf"{cut_st} .*could not be read as \.safetensors"):
        read_state_dict(cut_st)
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")   # an error page saved as a weights file
    with pytest.raises(WeightFileError, match=r"page\.pth is not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "page.pth")
    seg = create_segmenter("deit_tiny_patch16_224", 4, img_size=32, **TINY)
    atomic_torch_save({"model": seg.state_dict(), "n_cls": 4}, tmp_path / "checkpoint.pth")
    cut = _truncate(tmp_path / "checkpoint.pth", tmp_path / "cut_ck.pth")
    with pytest.raises(WeightFileError, match=rf"Phase-2 checkpoint {cut}"):
        load_official_segmenter(seg, cut)


def test_truncated_init_path(finished, tmp_path):
    d, cfg, *_ = finished
    enc = create_segmenter("deit_tiny_patch16_224", 4, img_size=32, **TINY).encoder
    torch.save(enc.state_dict(), tmp_path / "imnet.pth")
    cut = _truncate(tmp_path / "imnet.pth", tmp_path / "imnet_cut.pth")
    with pytest.raises(WeightFileError, match=rf"init weights \(init_path\) {cut}"):
        train_seg(replace(cfg, run_dir=str(tmp_path / "r"), init="imagenet", init_path=str(cut)))
    assert not (tmp_path / "r").exists()                               # nothing written for a refused run


def test_pickled_objects_are_refused_with_a_clear_message(tmp_path):
    import argparse
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "obj.pt")
    with pytest.raises(WeightFileError, match=r"obj\.pt holds pickled Python objects \(argparse\.Namespace\)"):
        read_state_dict(tmp_path / "obj.pt")


# --- item 10: ranges ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,msg", [
    ("lr", -1e-4, "SegTrainCfg.lr must be > 0"), ("lr", 0.0, "SegTrainCfg.lr must be > 0"),
    ("lr", float("nan"), "SegTrainCfg.lr must be > 0"), ("lr", float("inf"), "SegTrainCfg.lr must be > 0"),
    ("min_lr", -1e-6, "SegTrainCfg.min_lr must be >= 0"), ("min_lr", 1e-3, "min_lr=0.001 is above lr=0.0001"),
    ("enc_lr_scale", -0.1, "SegTrainCfg.enc_lr_scale must be >= 0"),
    ("poly_power", 0.0, "SegTrainCfg.poly_power must be > 0"),
    ("momentum", 1.0, "SegTrainCfg.momentum must be >= 0 and < 1"),
    ("weight_decay", -0.01, "SegTrainCfg.weight_decay must be >= 0"),
    ("drop_path_rate", -0.1, "SegTrainCfg.drop_path_rate must be >= 0 and < 1"),
    ("drop_path_rate", 1.0, "SegTrainCfg.drop_path_rate must be >= 0 and < 1"),
    ("decoder_dropout", 1.2, "SegTrainCfg.decoder_dropout must be >= 0 and < 1"),
    ("gc_start", 0.0, "SegTrainCfg.gc_start must be > 0"),
    ("cat_max_ratio", 1.5, "SegTrainCfg.cat_max_ratio must be > 0 and <= 1"),
    ("norm_eps", -1e-5, "SegTrainCfg.norm_eps must be >= 0"), ("norm", "in21k", "SegTrainCfg.norm: expected 'auto'"),
])
def test_seg_cfg_ranges(field, value, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        SegTrainCfg(**{field: value})


def test_seg_cfg_reference_values_accepted():
    from weaktr.train_seg import SEG_TRAIN_COCO, SEG_TRAIN_DEMO
    for preset in ({}, SEG_TRAIN_COCO, SEG_TRAIN_DEMO, SEG_SMOKE):      # {}: the defaults, the reference VOC run
        SegTrainCfg(**preset)
    SegTrainCfg(min_lr=0.0, weight_decay=0.0, momentum=0.0, drop_path_rate=0.0, decoder_dropout=0.0, norm_eps=0.0,
                cat_max_ratio=1.0)
