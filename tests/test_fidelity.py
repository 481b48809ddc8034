"""Issue 15: the paths users start from follow the reference by default: a foreign position grid is resized with the
reference's `--finetune` formula (Phase 1), and Phase 2 normalises with the statistics of the backbone family."""
import json
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F

import weaktr.train_seg as ts
from weaktr.data import open_dataset, read_mask, write_mask
from weaktr.evaluate import EvalCfg, MODEL_JSON, evaluate_seg, load_seg_checkpoint
from weaktr.model import create_weaktr, load_pretrained, resize_pos_grid
from weaktr.segmenter import NORMS, norm_stats, resolve_norm
from weaktr.synth import make_synthetic
from weaktr.transforms import SEG_MEAN, SEG_STD

torch.set_num_threads(1)


def reference_finetune_pos(pos_embed_checkpoint, C, new_size):
    "WeakTr main.py --finetune (DeiT's recipe, the CLS row repeated C times): the formula the loader must reproduce."
    D = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - 1) ** 0.5)
    extra_tokens = pos_embed_checkpoint[:, :1].repeat(1, C, 1)
    pos_tokens = pos_embed_checkpoint[:, 1:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, D).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


@pytest.fixture(scope="module")
def deit_s_files(tmp_path_factory):
    "DeiT-S-like state dicts (random timm models, no downloads) at 384 px (24x24 grid) and 224 px (14x14)."
    d = tmp_path_factory.mktemp("deit")
    out = {}
    for size in (384, 224):
        torch.manual_seed(size)
        vit = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=size)
        with torch.no_grad(): vit.pos_embed.normal_(0, 0.02)          # perturbed, as a trained grid is not constant
        torch.save({"model": vit.state_dict()}, d / f"deit_s_{size}.pth")
        out[size] = (d / f"deit_s_{size}.pth", vit.pos_embed.detach().clone())
    return out


def test_foreign_grid_is_resized_like_the_reference(deit_s_files):
    path, pe = deit_s_files[384]
    assert pe.shape == (1, 1 + 24 * 24, 384)
    torch.manual_seed(0)
    m = create_weaktr("deit_small_patch16_224", 20)
    rep = load_pretrained(m, path)
    want = reference_finetune_pos(pe, 20, 14)
    assert torch.equal(m.pos_embed.detach(), want)                      # bit-identical to the reference formula
    assert "24x24 -> 14x14 (bicubic, reference)" in " ".join(rep.notes)
    m2 = create_weaktr("deit_small_patch16_224", 20, pretrained=path)    # the builder's default is the same
    assert torch.equal(m2.pos_embed.detach(), want)


def test_timm_resize_is_a_named_option_and_differs(deit_s_files):
    path, pe = deit_s_files[384]
    m = create_weaktr("deit_small_patch16_224", 20)
    load_pretrained(m, path, pos_resize="timm")
    want = reference_finetune_pos(pe, 20, 14)
    got = m.pos_embed.detach()
    assert torch.equal(got[:, :20], want[:, :20])                       # class rows: the same either way
    rel = float((got[:, 20:] - want[:, 20:]).abs().max() / want[:, 20:].abs().max())
    assert rel > 0.3                                                    # antialiasing changes a shrunk grid a lot
    m2 = create_weaktr("deit_small_patch16_224", 20, pretrained=path, pos_resize="timm")
    assert torch.equal(m2.pos_embed.detach(), got)
    with pytest.raises(ValueError, match="pos_resize"):
        load_pretrained(m, path, pos_resize="bilinear")


def test_same_grid_unchanged(deit_s_files):
    path, pe = deit_s_files[224]
    for method in ("reference", "timm"):
        m = create_weaktr("deit_small_patch16_224", 20)
        load_pretrained(m, path, pos_resize=method)
        assert torch.equal(m.pos_embed.detach()[:, 20:], pe[:, 1:])
        assert torch.equal(m.pos_embed.detach(), reference_finetune_pos(pe, 20, 14))


def test_resize_pos_grid_non_square_target():
    torch.manual_seed(0)
    g = torch.randn(1, 6 * 6, 8)
    out = resize_pos_grid(g, (6, 6), (4, 5))
    want = F.interpolate(g.reshape(1, 6, 6, 8).permute(0, 3, 1, 2), size=(4, 5), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 20, 8)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="expected 6x6"):
        resize_pos_grid(g[:, :30], (6, 6), (4, 4))


# --- Phase-2 input normalisation (norm) ---------------------------------------------------------------------------


@pytest.mark.parametrize("backbone,want", [
    ("deit_small_patch16_224", "imagenet"),                    # the reference recipe (mmseg's rounded ImageNet stats)
    ("deit_tiny_patch16_224", "imagenet"),
    ("vit_small_patch16_384", "vit"),                          # WeakTr-dagger: timm 0.5.4's AugReg in21k -> in1k
    ("vit_small_patch16_384.augreg_in21k_ft_in1k", "vit"),
    ("vit_base_patch16_224.orig_in21k", "vit"),
    ("vit_small_patch14_dinov2", "imagenet"),                  # DINOv2: Segmenter's "deit"
    ("eva02_small_patch14_224.mim_in22k", "clip"),             # EVA-02: CLIP statistics
])
def test_auto_norm_per_backbone_family(backbone, want):
    assert resolve_norm("auto", backbone) == want


def test_norm_statistics():
    assert norm_stats("imagenet") == (SEG_MEAN, SEG_STD)
    assert norm_stats("imagenet")[0] == tuple(v / 255 for v in (123.68, 116.28, 103.53))
    assert norm_stats("vit") == ((0.5,) * 3, (0.5,) * 3)
    assert norm_stats("0.1,0.2,0.3/0.4,0.5,0.6") == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert set(NORMS) == {"imagenet", "vit", "clip"}


def test_dagger_preset_trains_with_vit_statistics():
    from weaktr.core import REPO_ROOT, cfg_from_flat
    from weaktr.grid import load_preset
    p = load_preset(REPO_ROOT / "configs/voc_vit_s_dagger.yaml", "train_seg")
    assert p["norm"] == "vit"
    cfg = ts.check_seg_cfg(cfg_from_flat(ts.SegTrainCfg, {**p, "init": "random", "init_path": "", "data": "synthetic",
                                                          "data_root": "", "pseudo_dir": ""}))
    assert cfg.norm == "vit"
    voc = load_preset(REPO_ROOT / "configs/voc.yaml", "train_seg")
    assert ts.check_seg_cfg(cfg_from_flat(ts.SegTrainCfg,
                                          {**voc, "init": "random", "init_path": "", "data": "synthetic",
                                           "data_root": "", "pseudo_dir": ""})).norm == "imagenet"
    assert "departure" not in (REPO_ROOT / "configs/voc_vit_s_dagger.yaml").read_text()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A one-epoch train_seg run of a tiny timm `vit_*` encoder with norm='auto' (-> 'vit'), recording the transforms
    used."""
    d = tmp_path_factory.mktemp("norm")
    root = make_synthetic(d / "syn", n_train=4, n_val=2, size=32, num_classes=3)
    for id in open_dataset("synthetic", root, "train").ids:
        write_mask(d / "pseudo" / f"{id}.png", read_mask(root / "SegmentationClass" / f"{id}.png"))
    seen = {}
    orig_tf, orig_eval = ts.seg_train_transform, ts.evaluate_model
    def spy_tf(*a, **kw):
        seen["train"] = (kw.get("mean"), kw.get("std"))
        return orig_tf(*a, **kw)
    def spy_eval(m, ds, cfg, **kw):
        seen["val"] = (cfg.mean, cfg.std)
        return orig_eval(m, ds, cfg, **kw)
    ts.seg_train_transform, ts.evaluate_model = spy_tf, spy_eval
    try:
        cfg = ts.SegTrainCfg(**{**ts.SEG_SMOKE, "backbone": "vit_tiny_patch16_224", "crop_size": 32, "base_size": 32,
                                "gc_window": 8, "window_size": 32, "window_stride": 21, "epochs": 1},
                             run_dir=str(d / "run"), data="synthetic", data_root=str(root), train_split="train",
                             pseudo_dir=str(d / "pseudo"), device="cpu", progress=False)
        s = ts.train_seg(cfg)
    finally:
        ts.seg_train_transform, ts.evaluate_model = orig_tf, orig_eval
    return d, root, cfg, s, seen


def test_train_seg_uses_and_records_the_backbone_norm(vit_run):
    d, root, cfg, s, seen = vit_run
    half = ((0.5,) * 3, (0.5,) * 3)
    assert tuple(map(tuple, seen["train"])) == half and tuple(map(tuple, seen["val"])) == half
    assert s["norm"] == "vit"
    assert json.loads((d / "run" / "config.json").read_text())["norm"] == "vit"
    spec = json.loads((d / "run" / MODEL_JSON).read_text())
    assert spec["norm"] == "vit" and spec["norm_stats"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    _, info = load_seg_checkpoint(d / "run")
    assert info["norm"] == "vit"


def test_evaluate_uses_the_training_norm_and_refuses_another(vit_run, tmp_path):
    d, root, cfg, s, seen = vit_run
    e = EvalCfg(run_dir=str(tmp_path / "e"), checkpoint=str(d / "run"), data="synthetic", data_root=str(root),
                ratios=(1.0,), flip=False, crf=False, n_fig=0, progress=False, device="cpu",
                backbone="deit_small_patch16_224")              # the official-file backbone must not matter here
    out = evaluate_seg(e)
    assert out["norm"] == "vit" and out["infer"]["mean"] == [0.5] * 3 and out["infer"]["std"] == [0.5] * 3
    assert evaluate_seg(replace(e, run_dir=str(tmp_path / "e2"), norm="vit"))["norm"] == "vit"   # explicit, same: fine
    with pytest.raises(ValueError, match=r"EvalCfg\.norm='imagenet' but .* was trained with norm='vit'"):
        evaluate_seg(replace(e, run_dir=str(tmp_path / "e3"), norm="imagenet"))
    assert not (tmp_path / "e3").exists()                                                       # nothing written


def test_legacy_model_json_means_imagenet(vit_run, tmp_path):
    "A model.json written before the norm field: the run was trained with the only statistics the stage had."
    import shutil
    d, root, *_ = vit_run
    run = tmp_path / "old"
    shutil.copytree(d / "run", run)
    spec = json.loads((run / MODEL_JSON).read_text())
    spec.pop("norm")
    spec.pop("norm_stats")
    (run / MODEL_JSON).write_text(json.dumps(spec))
    _, info = load_seg_checkpoint(run)
    assert info["norm"] == "imagenet" and not info["norm_recorded"]


def test_auto_norm_follows_the_starting_weights():
    "The kit's stand-in backbone is named vit_tiny_patch16_224 but was pretrained with ImageNet statistics: auto knows."
    from weaktr.pretrain import asset_path
    cfg = ts.check_seg_cfg(ts.SegTrainCfg(**{**ts.SEG_TRAIN_DEMO, "backbone": "vit_tiny_patch16_224",
                                             "init": "imagenet",
                                             "init_path": str(asset_path())}))
    assert cfg.norm == "imagenet"
    assert ts.auto_norm("vit_small_patch16_384", "phase1")[0] == "imagenet"     # Phase-1 runs use ImageNet statistics
    assert ts.auto_norm("vit_small_patch16_384", "random")[0] == "vit"
