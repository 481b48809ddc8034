"""The reading-group walkthrough (nbs/walkthrough.ipynb) runs top to bottom under papermill: on the synthetic set
(quick mode), and on real VOC images with a DeiT-S-shaped Phase-1 checkpoint given as a parameter."""
from __future__ import annotations
import json, os, sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "walkthrough.ipynb"


def run_walkthrough(out: Path, **params) -> dict:
    import papermill as pm
    env_path, backend = os.environ["PATH"], os.environ.pop("MPLBACKEND", None)   # the kernel's own inline backend,
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_path}"      # as a reader's; `python` on PATH
    try:
        pm.execute_notebook(str(NB), str(out), parameters=params, cwd=str(NB.parent), kernel_name="python3",
                            progress_bar=False)
    finally:
        os.environ["PATH"] = env_path
        if backend is not None: os.environ["MPLBACKEND"] = backend
    nb = json.loads(out.read_text())
    return "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                     for o in c.get("outputs", []))


def test_walkthrough_quick_synthetic(tmp_path):
    text = run_walkthrough(tmp_path / "walkthrough.ipynb", quick=True, train_steps=30, n_images=4)
    assert "4 blocks x 4 heads" in text or "blocks x" in text
    assert "pseudo-label mIoU" in text and "GC mutes" in text and "walkthrough ran in" in text
    # one figure per call: no cell shows more pictures than it has show(...) calls (a pyplot figure returned by a
    # helper used to be displayed a second time by the inline backend), and the data cell shows exactly one
    nb = json.loads((tmp_path / "walkthrough.ipynb").read_text())
    for c in nb["cells"]:
        if c["cell_type"] != "code": continue
        n_img = sum("image/png" in o.get("data", {}) for o in c.get("outputs", []))
        src = "".join(c["source"])
        assert n_img <= src.count("show("), (c.get("id"), n_img, src[:80])
        if "plot_samples(ds" in src: assert n_img == 1, n_img


def test_walkthrough_with_checkpoint_and_voc(tmp_path):
    from weaktr.core import shared_data
    try:
        voc = shared_data("voc-mini")
    except FileNotFoundError as e:
        pytest.skip(f"VOC sample not available: {e}")
    from weaktr.model import create_weaktr
    torch.manual_seed(0)
    model = create_weaktr("deit_small_patch16_224", 20, drop_path_rate=0.0)   # DeiT-S layout, random weights
    ckpt = tmp_path / "phase1.pt"
    torch.save({"model": model.state_dict(), "epoch": 0}, ckpt)
    text = run_walkthrough(tmp_path / "walkthrough_voc.ipynb", checkpoint=str(ckpt), data="voc", data_root=str(voc),
                           n_images=2, max_side=224)
    assert f"loaded {ckpt}" in text and "12 blocks x 6 heads = 72 attention maps" in text
    assert "pseudo-label mIoU" in text and "walkthrough ran in" in text
