"""Paper presets (configs/*.yaml): they parse, name only parameters of the stages' run notebooks, agree with the
stage modules' reference constants, flatten for papermill, and every stage of the VOC preset starts on voc-mini.

The voc-mini run keeps every preset value except the overrides listed in `TINY` (sizes, a tiny backbone, no weight
files, a few images/steps) and the dataset plumbing of voc-mini (its `SegmentationClass` holds the Aug masks).
"""
import io
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from weaktr.core import REPO_ROOT, cfg_from_flat, shared_data
from weaktr.grid import STAGES, check_preset, load_preset, main, notebook_parameters, stage_notebook

PRESETS = ["configs/voc.yaml", "configs/coco.yaml", "configs/voc_vit_s_dagger.yaml"]


def _cfg_classes():
    from weaktr.camgen import CamGenCfg
    from weaktr.evaluate import EvalCfg
    from weaktr.pseudo import PseudoCfg
    from weaktr.train_cam import CamTrainCfg
    from weaktr.train_seg import SegTrainCfg
    return dict(train_cam=CamTrainCfg, gen_cams=CamGenCfg, pseudo_labels=PseudoCfg, train_seg=SegTrainCfg,
                evaluate=EvalCfg)


def _norm(v):
    "Tuples -> lists (what a YAML file gives back)."
    if isinstance(v, (tuple, list)): return [_norm(x) for x in v]
    if isinstance(v, dict): return {k: _norm(x) for k, x in v.items()}
    return v


@pytest.mark.parametrize("path", PRESETS)
def test_preset_parses_and_names_only_parameters(path):
    pre = load_preset(REPO_ROOT / path)
    assert list(pre) == list(STAGES), f"{path}: every stage, in pipeline order"
    classes = _cfg_classes()
    for stage, params in pre.items():
        fields = set(classes[stage].__dataclass_fields__)
        extra = set(params) - fields
        assert not extra, f"{path} [{stage}]: not {classes[stage].__name__} fields: {extra}"
        cfg_from_flat(classes[stage], params)                     # names, types and value choices accepted
        nb = stage_notebook(stage)
        if nb.is_file():                                          # keys are parameters of the run notebook
            known = notebook_parameters(nb)
            extra = set(params) - set(known)
            assert not extra, f"{path} [{stage}]: not parameters of {nb.name}: {extra}"
    assert check_preset(REPO_ROOT / path) == {}
    assert "~" not in yaml.safe_dump(pre), "~ paths are expanded"


@pytest.mark.parametrize("path", PRESETS)
def test_preset_fills_omitted_parameters_from_the_config_defaults(path):
    """A preset holds only what differs from the paper recipe (the config defaults); load_preset fills the rest, so
    every loaded section names every run-notebook parameter, and never the notebook's defaults (the CPU demo's)."""
    import dataclasses
    from weaktr.grid import stage_defaults
    raw, pre, classes = load_preset(REPO_ROOT / path, defaults=False), load_preset(REPO_ROOT / path), _cfg_classes()
    for stage, cls in classes.items():
        ref = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
               for f in dataclasses.fields(cls)}
        assert set(pre[stage]) == set(ref) == set(stage_defaults(stage))
        for k, v in pre[stage].items():
            want = raw[stage][k] if k in raw[stage] else ref[k]
            assert _norm(v or None) == _norm(want or None), f"{path} [{stage}] {k}: {v!r}, expected {want!r}"
        nb = stage_notebook(stage)
        if nb.is_file(): assert set(notebook_parameters(nb)) == set(pre[stage]), f"{path} [{stage}]"


def test_preset_files_hold_only_differences():
    "A key written in configs/voc.yaml either differs from the config default or is a path / placeholder to edit."
    import dataclasses
    raw, classes = load_preset(REPO_ROOT / "configs/voc.yaml", defaults=False), _cfg_classes()
    keep = {"run_dir", "data_root", "checkpoint", "cams_dir", "pseudo_dir", "pretrained", "init_path"}
    for stage, cls in classes.items():
        ref = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
               for f in dataclasses.fields(cls)}
        same = [k for k, v in raw[stage].items() if k not in keep and _norm(v or None) == _norm(ref[k] or None)]
        assert not same, f"configs/voc.yaml [{stage}] repeats config defaults: {same}"


def test_presets_agree_with_stage_constants():
    """The presets restate the stage modules' reference constants (§phase1, §phase2-recipe: the config defaults and
    the COCO overrides) and the documented per-dataset flags."""
    import dataclasses
    from weaktr.evaluate import MS_RATIOS
    from weaktr.train_cam import CAM_TRAIN_COCO, CamTrainCfg
    from weaktr.train_seg import SEG_TRAIN_COCO, SegTrainCfg
    voc, coco, dagger = (load_preset(REPO_ROOT / p) for p in PRESETS)
    skip = {"run_dir", "data_root", "pseudo_dir", "pretrained", "init_path", "data_kw", "cam_batch_size"}
    for pre, cam, seg in ((voc, {}, {}), (coco, CAM_TRAIN_COCO, SEG_TRAIN_COCO)):
        for k, v in dataclasses.asdict(CamTrainCfg(**cam)).items():
            if k in skip: continue
            assert _norm(pre["train_cam"][k]) == _norm(v), f"train_cam.{k}: {pre['train_cam'][k]} != {v}"
        for k, v in dataclasses.asdict(SegTrainCfg(**seg)).items():
            if k in skip: continue
            assert _norm(pre["train_seg"][k]) == _norm(v), f"train_seg.{k}: {pre['train_seg'][k]} != {v}"
        assert pre["train_cam"]["pretrained"].endswith("weights/deit_small_patch16_224-cd65a155.pth")
        assert pre["train_cam"]["embed_dim"] == pre["train_cam"]["depth"] == 0      # the backbone's own, not the demo's
        ev = pre["evaluate"]
        assert _norm(ev["ratios"]) == list(MS_RATIOS) and ev["two_output"] and ev["crf"]
    assert voc["gen_cams"]["scales"] == [1.0, 1.2] and voc["pseudo_labels"]["threshold"] == 0.43         # HEAD VOC docs
    # HEAD COCO docs
    assert coco["gen_cams"]["scales"] == [1.0, 0.8, 1.2] and coco["pseudo_labels"]["threshold"] == 0.42
    assert (voc["pseudo_labels"]["crf"], coco["pseudo_labels"]["crf"],
            coco["evaluate"]["crf_preset"]) == ("voc", "coco", "coco")
    assert (voc["train_cam"]["lr"], coco["train_cam"]["lr"]) == (6e-4, 2e-4)
    # WeakTr-dagger: Phase 2 only (method notes §phase2-backbones); Phase 1 and the CAM labels are the DeiT-S ones
    assert dagger["train_seg"]["backbone"] == "vit_small_patch16_384"
    assert dagger["train_seg"]["pseudo_dir"] == voc["train_seg"]["pseudo_dir"]
    for st in ("train_cam", "gen_cams", "pseudo_labels"): assert dagger[st] == voc[st]
    assert dagger["train_seg"]["norm"] == "vit"                                   # mean 0.5 / std 0.5 for the in21k ViT
    assert {k: v for k, v in dagger["train_seg"].items() if k not in ("run_dir", "backbone", "init_path", "norm")} == \
           {k: v for k, v in voc["train_seg"].items() if k not in ("run_dir", "backbone", "init_path", "norm")}


def test_export_preset_cli():
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["export-preset", str(REPO_ROOT / "configs/coco.yaml"), "gen_cams", "--set", "data_root=/data/coco",
                   "--set", "max_images=4"])
    assert rc == 0
    flat = yaml.safe_load(buf.getvalue())
    assert flat == {**_norm(load_preset(REPO_ROOT / "configs/coco.yaml", "gen_cams")), "data_root": "/data/coco",
                    "max_images": 4}
    buf = io.StringIO()
    with redirect_stdout(buf): rc = main(["check-preset", *(str(REPO_ROOT / p) for p in PRESETS)])
    assert rc == 0 and buf.getvalue().count(": ok") == 3, buf.getvalue()


TINY = dict(
    # 4 heads: AAF reduction 8 leaves 0 units
    train_cam=dict(backbone="vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, reduction=2,
                   pretrained="", epochs=1, max_steps=2,
                   batch_size=4, max_train_images=8, max_val_images=4, cam_eval_max_images=2, num_workers=0,
                   img_size=112),
    gen_cams=dict(max_images=4, num_workers=0, batch_size=2),
    pseudo_labels=dict(max_images=4, workers=1),
    train_seg=dict(backbone="deit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, init="random", init_path="",
                   epochs=2, max_steps=2, max_train_images=4, max_val_images=1, num_workers=0, crop_size=240,
                   base_size=260,
                   gc_window=60, window_size=240, window_stride=160),
    evaluate=dict(max_images=1, ratios=[1.0], n_fig=1),
)


def test_voc_preset_stages_start_on_voc_mini(tmp_path):
    "Every stage of configs/voc.yaml runs on voc-mini, chained through the preset's links, with only TINY overridden."
    try: root = shared_data("voc-mini")
    except FileNotFoundError as e: pytest.skip(f"voc-mini not available: {e}")
    from weaktr.camgen import generate_cams, resolve_paths
    from weaktr.evaluate import evaluate_seg
    from weaktr.pseudo import make_pseudo_labels
    from weaktr.train_cam import check_cam_cfg, train_cam
    from weaktr.train_seg import train_seg
    classes, t0 = _cfg_classes(), time.time()
    pre = load_preset(REPO_ROOT / "configs/voc.yaml")
    run = lambda rel: str(tmp_path / Path(rel).relative_to("runs/voc"))             # runs/voc/<x> -> tmp/<x>
    def params(stage):
        p = {**pre[stage], **TINY[stage], "data_root": str(root)}
        if "device" in classes[stage].__dataclass_fields__: p["device"] = "cpu"
        for k in ("run_dir", "checkpoint", "cams_dir", "pseudo_dir"):
            if k in p and p[k].startswith("runs/voc/"): p[k] = run(p[k])
        if (p.get("data_kw") or {}).get("mask_dir") == "SegmentationClassAug":      # voc-mini keeps the Aug masks here
            p["data_kw"] = {**p["data_kw"], "mask_dir": "SegmentationClass"}
        if "progress" in classes[stage].__dataclass_fields__: p["progress"] = False
        return cfg_from_flat(classes[stage], p)

    s1 = train_cam(check_cam_cfg(params("train_cam"), base_dir=REPO_ROOT))
    assert s1["steps"] == 2 and s1["num_classes"] == 20 and s1["model"]["fusion"] == "v3"
    assert (tmp_path / "train_cam" / "best.pt").is_file()
    s2 = generate_cams(resolve_paths(params("gen_cams"), REPO_ROOT))
    assert s2["n_generated"] == 4 and len(list((tmp_path / "gen_cams" / "cams").glob("*.npz"))) == 4
    s3 = make_pseudo_labels(resolve_paths(params("pseudo_labels"), REPO_ROOT))
    assert s3["threshold"] == 0.43 and s3["n_written"] == 4 and s3["n_scored"] == 4 and 0 <= s3["miou"] <= 1
    cfg4 = params("train_seg")
    assert cfg4.pseudo_dir == str(tmp_path / "pseudo_labels" / "pseudo")
    s4 = train_seg(cfg4)
    assert s4["steps"] == 2 and s4["n_cls"] == 21 and s4["n_train"] == 4
    s5 = evaluate_seg(params("evaluate"))
    assert s5["finished"] and s5["crf"] == "voc" and 0 <= s5["headline_miou"] <= 1
    print(f"voc-mini preset chain: {time.time() - t0:.1f} s")


def test_dagger_segmenter_builds():
    """configs/voc_vit_s_dagger.yaml's Phase-2 encoder (timm vit_small_patch16_384 at 480 px) builds with the preset's
    kwargs."""
    from weaktr.segmenter import create_segmenter
    from weaktr.train_seg import SegTrainCfg, segmenter_kwargs
    cfg = cfg_from_flat(SegTrainCfg, load_preset(REPO_ROOT / "configs/voc_vit_s_dagger.yaml", "train_seg"))
    m = create_segmenter(**segmenter_kwargs(cfg, 21))
    assert m.encoder.pos_embed.shape[1] == 1 + 30 * 30 and m.encoder.patch_embed.proj.kernel_size == (16, 16)


def test_resolved_configs_unchanged():
    """Every pipeline (demo, quick) and configs/*.yaml stage resolves to the committed snapshot, config and Learner
    config alike (tools/resolved_configs.py; after a deliberate change: `python tools/resolved_configs.py --write`)."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("resolved_configs", REPO_ROOT / "tools" / "resolved_configs.py")
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    old = json.loads((REPO_ROOT / "tests" / "resolved_configs.json").read_text())
    assert rc.diff(old, rc.resolved()) == []
