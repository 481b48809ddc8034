"""The "parts" synthetic design (weaktr.synth, nbs/01a_synth.ipynb): deterministic files, VOC layout, whole objects."""
import json

import numpy as np
import pytest
from PIL import Image

from weaktr.synth import SYNTH_DESIGNS, SYNTH_PARTS, make_synthetic, render_synthetic, synth_classes, synthetic_dataset

KW = {k: v for k, v in SYNTH_PARTS.items() if not k.startswith("n_")}


def test_parts_files_are_deterministic_and_voc_laid_out(tmp_path):
    a = make_synthetic(tmp_path / "a", n_train=5, n_val=3, **KW)
    b = make_synthetic(tmp_path / "b", n_train=5, n_val=3, **KW)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "ImageSets/Segmentation/val.txt").read_text().split() == ["val_00000", "val_00001", "val_00002"]
    meta = json.loads((a / "meta.json").read_text())
    assert meta["params"]["design"] == "parts"
    assert meta["class_names"] == [f"{s}-{t}" for s, t in synth_classes(6, "parts")]
    labels = json.loads((a / "cls_labels.json").read_text())
    ds = synthetic_dataset(a, "train")
    for i, id in enumerate(ds.ids):
        mask = np.array(Image.open(a / "SegmentationClass" / f"{id}.png"))
        assert labels[id] == [int(v) for v in np.unique(mask) if v]
        assert ds[i]["labels"].nonzero().flatten().tolist() == [v - 1 for v in labels[id]]


def test_parts_geometry():
    bodies_per_texture = {}
    for c, (part, body) in enumerate(synth_classes(8, "parts")): bodies_per_texture.setdefault(body, []).append(part)
    assert len(bodies_per_texture) == 3 and all(len(v) >= 2 for v in bodies_per_texture.values())  # bodies are shared
    obj = part = dis = 0
    for i in range(40):
        im, m, lay = render_synthetic(np.random.default_rng([7, 0, i]), 64, 6, KW["objects"], KW["clutter"],
                                      KW["obj_scale"], design="parts", layers=True)
        assert ((m > 0) == np.isin(lay, (1, 2))).all()          # the mask is the whole object: body and part
        assert (m[lay == 3] == 0).all()                          # part-less distractor bodies are background
        obj += int((m > 0).sum())
        part += int((lay == 2).sum())
        dis += int((lay == 3).sum())
        for c in np.unique(m[m > 0]): assert (lay[m == c] == 2).any()   # every object shows its part
    assert 0.05 < part / obj < 0.25 and dis > 0


def test_parts_errors():
    assert "parts" in SYNTH_DESIGNS
    with pytest.raises(ValueError, match="1..8"): synth_classes(9, "parts")
    with pytest.raises(ValueError, match="only design='parts'"):
        render_synthetic(np.random.default_rng(0), design="palette", layers=True)
