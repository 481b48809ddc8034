"""CAM generation + pseudo labels end to end on a few synthetic images (two image sizes), and the two run notebooks."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weaktr.camgen import CamGenCfg, cams_reference, generate_cams, load_cams
from weaktr.testing import tiny_weaktr
from weaktr.core import atomic_torch_save
from weaktr.synth import make_synthetic, synthetic_dataset
from weaktr.data import read_mask
from weaktr.pseudo import PseudoCfg, make_pseudo_labels

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "nbs" / "runs"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    "6 train + 2 val synthetic images (48 px, C = 3); two train images resized to 64 x 40 (image and mask)."
    root = make_synthetic(tmp_path_factory.mktemp("data") / "synth", n_train=6, n_val=2, size=48, num_classes=3, seed=0)
    for id in ("train_00001", "train_00004"):
        img, mask = root / "JPEGImages" / f"{id}.png", root / "SegmentationClass" / f"{id}.png"
        Image.open(img).convert("RGB").resize((64, 40), Image.BICUBIC).save(img)
        m = Image.open(mask)
        pal = m.getpalette()
        m = m.resize((64, 40), Image.NEAREST)
        m.putpalette(pal)
        m.save(mask)
    return root


@pytest.fixture(scope="module")
def phase1_run(tmp_path_factory):
    "A Phase-1 run folder as weaktr.learner / train_cam leave it: best.pt {model, config, ...} + config.json."
    d = tmp_path_factory.mktemp("phase1")
    atomic_torch_save(dict(format="weaktr.learner.best/1", model=tiny_weaktr(3).state_dict(), config=dict(lr=1e-3),
                           epoch=3, step=12), d / "best.pt")
    (d / "config.json").write_text(json.dumps(dict(backbone="deit_tiny_patch16_224", pool="avg", fusion="v3")))
    return d


def test_generate_resume_pseudo_end_to_end(synth, phase1_run, tmp_path):
    torch.set_num_threads(1)
    gen_dir = tmp_path / "gen"
    cfg = CamGenCfg(run_dir=str(gen_dir), checkpoint=str(phase1_run), data="synthetic", data_root=str(synth),
                    split="train",
                    scales=(1.0, 0.8), amp="off", batch_size=4, num_workers=1, device="cpu")
    s1 = generate_cams(cfg)
    assert (s1["n_generated"], s1["n_skipped"]) == (6, 0)
    assert s1["checkpoint"] == str(phase1_run / "best.pt")
    assert json.loads((gen_dir / "config.json").read_text())["checkpoint"] == str(phase1_run)
    ds = synthetic_dataset(synth, "train")
    model = tiny_weaktr(3)
    for i in (0, 1):                                # a 48 x 48 and a 64 x 40 image: the stored maps are the reference's
        s = ds[i]
        maps, ids = load_cams(gen_dir / "cams" / f"{s['id']}.npz")
        assert ids.tolist() == s["labels"].nonzero().flatten().tolist()
        assert maps.shape == (len(ids), s["image"].height, s["image"].width)
        ref = cams_reference(model, s["image"], s["labels"], scales=(1.0, 0.8))
        np.testing.assert_allclose(maps, ref[ids].numpy(), atol=1e-3)      # float16 storage

    s2 = generate_cams(cfg)                                       # resume: nothing to do
    assert (s2["n_generated"], s2["n_skipped"]) == (0, 6)
    (gen_dir / "cams" / "train_00004.npz").unlink()
    s3 = generate_cams(cfg)                                       # one file lost: only it is made again
    assert (s3["n_generated"], s3["n_skipped"]) == (1, 5)

    pcfg = PseudoCfg(run_dir=str(tmp_path / "ps"), cams_dir=str(gen_dir), data="synthetic", data_root=str(synth),
                     split="train",
                     threshold_mode="fixed", threshold=0.5, crf="voc", workers=2)
    p1 = make_pseudo_labels(pcfg)
    assert (p1["n_written"], p1["n_skipped"], p1["n_scored"]) == (6, 0, 6)
    for id in ds.ids:
        lab = read_mask(tmp_path / "ps" / "pseudo" / f"{id}.png")
        _, ids = load_cams(gen_dir / "cams" / f"{id}.npz")
        H, W = ds.read_mask(id).shape
        assert lab.shape == (H, W) and lab.dtype == np.uint8
        assert set(np.unique(lab).tolist()) <= {0, *(ids + 1).tolist()}   # background or one of the image's classes
    with Image.open(tmp_path / "ps" / "pseudo" / "train_00000.png") as im: assert im.mode == "P"
    p2 = make_pseudo_labels(pcfg)                                 # resume: all skipped, same score
    assert (p2["n_written"], p2["n_skipped"]) == (0, 6) and p2["miou"] == p1["miou"]
    s = json.loads((tmp_path / "ps" / "summary.json").read_text())
    assert s["threshold"] == 0.5 and 0 < s["label_free_threshold"] < 1


def _papermill(nb, out, **params):
    import papermill as pm
    env_path = os.environ["PATH"]
    # the kernelspec runs `python`: the venv's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_path}"
    try:
        return pm.execute_notebook(str(RUNS / nb), str(out), parameters=params, cwd=str(RUNS), kernel_name="python3",
                                   progress_bar=False)
    finally:
        os.environ["PATH"] = env_path


def _has_figure(path):
    nb = json.loads(Path(path).read_text())
    return any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


def test_run_notebooks_smoke(synth, tmp_path):
    t0 = time.time()
    _papermill("gen_cams.ipynb", tmp_path / "gen.ipynb", smoke=True, checkpoint="", run_dir=str(tmp_path / "gen"),
               data_root=str(synth), split="train")
    took = time.time() - t0
    s = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert s["n_generated"] == 6 and len(list((tmp_path / "gen" / "cams").glob("*.npz"))) == 6
    assert _has_figure(tmp_path / "gen.ipynb")
    assert took < 60, f"gen_cams smoke run took {took:.0f} s"

    t0 = time.time()
    _papermill("pseudo_labels.ipynb", tmp_path / "ps.ipynb", smoke=True, cams_dir=str(tmp_path / "gen"),
               run_dir=str(tmp_path / "ps"), data_root=str(synth), split="train", threshold_mode="sweep", workers=2)
    took = time.time() - t0
    s = json.loads((tmp_path / "ps" / "summary.json").read_text())
    assert s["n_written"] == 6 and s["threshold"] == s["sweep_best_threshold"]
    assert (tmp_path / "ps" / "sweep.csv").is_file() and (tmp_path / "ps" / "sweep.png").is_file()
    assert _has_figure(tmp_path / "ps.ipynb")
    assert took < 60, f"pseudo_labels smoke run took {took:.0f} s"


def test_run_notebook_bad_parameter_fails_in_first_cell(synth, tmp_path):
    from papermill.exceptions import PapermillExecutionError
    with pytest.raises(PapermillExecutionError) as e:
        _papermill("gen_cams.ipynb", tmp_path / "bad.ipynb", smoke=True, checkpoint="", run_dir=str(tmp_path / "run"),
                   data_root=str(synth), scales=[0.8, 1.0])
    nb = json.loads((tmp_path / "bad.ipynb").read_text())
    tags = [t for c in nb["cells"] if "papermill-error-cell-tag" not in (t := c["metadata"].get("tags", []))]
    first_after = max(i for i, t in enumerate(tags) if "parameters" in t or "injected-parameters" in t) + 1
    assert e.value.cell_index == first_after
    assert e.value.ename == "ValueError" and "first scale must be 1.0" in e.value.evalue
    assert not (tmp_path / "run").exists()
