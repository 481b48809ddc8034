"""The attention-head explorer headless, at DeiT-S size (12 layers x 6 heads): figures, widget wiring, readable
errors, and that every interaction after the one forward pass stays instant on a CPU."""
from __future__ import annotations
import datetime, io, time

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from weaktr.synth import make_synthetic, synthetic_dataset
from weaktr.model import create_weaktr
from weaktr.viz import (analyze_image, fused_map, head_map, affinity_row, pseudo_label, plot_head_grid, plot_overlay,
                        plot_summary, attention_mass_threshold, map_iou, png_bytes, source_map, SOURCES)
from weaktr.explorer import head_explorer, HeadExplorer

torch.set_num_threads(1)
C = 6


@pytest.fixture(scope="module")
def deit_s():
    "A random-init WeakTr with DeiT-S's layout (12 blocks x 6 heads, D=384, patch 16)."
    torch.manual_seed(0)
    return create_weaktr("deit_small_patch16_224", C, drop_path_rate=0.0).eval()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("synth") / "s", n_train=4, n_val=0, size=64, num_classes=C, seed=3)
    return synthetic_dataset(root, "train")


def photo(W=320, H=240, seed=0) -> Image.Image:
    "A smooth random RGB picture (something a user might upload)."
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.BICUBIC)


def encode(im: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO(); im.save(buf, format=fmt); return buf.getvalue()


def upload_value(name, data):
    return ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
             "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def test_figures_at_deit_s_size(deit_s, synth):
    s = synth[0]
    an = analyze_image(deit_s, photo(448, 336), labels=s["labels"], class_names=synth.class_names, id="photo")
    L, nh, (h, w) = an.depth, an.num_heads, an.grid
    assert (L, nh, (h, w)) == (12, 6, (21, 28))
    assert an.attn_stack.shape == (72, C + h * w, C + h * w)
    fig = plot_head_grid(an, an.present[0], selected=(11, 5))
    assert isinstance(fig, Figure) and len(fig.axes) == 72
    z = np.ones((12, 6), bool); z[:6] = False                            # first half of the layers off
    t0 = time.perf_counter()
    m = fused_map(an, an.present[0], z, "refined")                      # one masked re-fusion of a 72 x 614 x 614 stack
    t_fuse = time.perf_counter() - t0
    assert m.shape == (h, w) and not np.allclose(m, fused_map(an, an.present[0], None, "refined"))
    assert t_fuse < 2.0, f"re-fusing the heads took {t_fuse:.2f} s"
    for src in SOURCES:
        out = source_map(an, src, an.present[0], 3, 2, z, (5, 7), 0.4, crf=False)
        assert out.shape == ((h, w) if src != "pseudo" else an.image.shape[:2])
    pl = pseudo_label(an, 0.4, head_mask=z)
    assert pl.shape == (336, 448) and set(np.unique(pl)) <= {0} | {c + 1 for c in an.present}
    fig = plot_overlay(an, pl, cls=an.present[0], title="pseudo")
    assert png_bytes(fig)[:4] == b"\x89PNG"


def test_summary_and_iou_with_gt(deit_s, synth):
    s = synth[1]
    an = analyze_image(deit_s, s["image"], s["labels"], s["mask"], synth.class_names, id=s["id"])
    c = an.present[0]
    fig = plot_summary(an, c, crf=False)
    assert len(fig.axes) == 8 and "IoU" in fig.axes[-2].get_title()
    gt = an.mask == c + 1
    assert map_iou(gt, an.mask, c) == 1.0                               # the GT region scores 1
    assert map_iou(~gt & (an.mask != 255), an.mask, c) == 0.0
    one_hot = np.zeros(an.grid, np.float32); one_hot[1, 2] = 1
    np.testing.assert_array_equal(attention_mass_threshold(one_hot, 0.3), one_hot > 0)


def test_widget_wiring_and_speed(deit_s, synth, tmp_path):
    box = head_explorer(deit_s, synth, images=[photo()], export_dir=tmp_path / "exp", max_side=320)
    ex: HeadExplorer = box.explorer
    assert len(ex._cells) == 72 and len(ex.grid_box.children) == 1 + 6 + 12 * 7
    assert ex.main.value[:4] == b"\x89PNG"
    ex.image_dd.value = ("img", 0)                                      # the 320x240 picture: 20 x 15 patches
    assert ex.analysis.grid == (15, 20)

    timings = {}
    def act(name, fn):
        before = ex.main.value
        t0 = time.perf_counter(); fn(); timings[name] = time.perf_counter() - t0
        assert ex.main.value != before, f"{name} did not change the view"
        assert not [m for m in ex.messages if m[0] == "error"], ex.messages

    act("source", lambda: setattr(ex.source, "value", "fused"))
    act("head click", ex._cells[7, 3][1].click)
    assert (ex.layer.value, ex.head.value, ex.source.value) == (7, 3, "head")
    np.testing.assert_array_equal(ex.current_map(), head_map(ex.analysis, 7, 3, ex.cls_dd.value))
    ex.source.value = "refined"
    ex.click_mode.value = "toggle"
    act("head off", ex._cells[11, 0][1].click)
    act("layer off", lambda: setattr(ex.grid_box.children[1 + 6 + 5 * 7], "value", False))   # layer 5's toggle
    act("column off", lambda: setattr(ex.grid_box.children[1 + 2], "value", False))           # head 2 of every layer
    z = ex.mask_grid()
    assert not z[11, 0] and not z[5].any() and not z[:, 2].any() and z.sum() == 72 - 1 - 6 - 11
    np.testing.assert_allclose(ex.current_map(), fused_map(ex.analysis, ex.cls_dd.value, z, "refined"))
    act("all on", ex.all_on.click)
    assert ex.head_mask is None
    rc, pb = ex._picker[37]
    act("patch", pb.click)
    np.testing.assert_allclose(ex.current_map(), affinity_row(ex.analysis, rc))
    act("opacity", lambda: setattr(ex.alpha, "value", 0.2))
    act("colormap", lambda: setattr(ex.cmap, "value", "magma"))
    act("mass", lambda: setattr(ex.mass, "value", 0.5))
    slow = {k: round(v, 2) for k, v in timings.items() if v > 1.5}
    assert not slow, f"interactions should be instant on a CPU, these were not: {slow}"
    p = ex.export_grid()
    assert Image.open(p).size[0] > 300


def test_uploads_are_converted_or_refused(deit_s, synth):
    ex = head_explorer(deit_s, synth).explorer
    cases = {"rgba.png": Image.new("RGBA", (100, 80), (10, 200, 30, 128)), "grey.png": photo().convert("L"),
             "palette.png": photo().convert("P"), "cmyk.jpg": photo().convert("CMYK")}
    for name, im in cases.items():
        ex.upload.value = upload_value(name, encode(im, "JPEG" if name.endswith("jpg") else "PNG"))
        assert ex.analysis.id == name and ex.analysis.image.ndim == 3, (name, ex.messages[-1])
        assert ex.messages[-1][0] == "info" and "converted from" in ex.messages[-1][1], (name, ex.messages[-1])
    n = len(ex.uploads)
    truncated = encode(photo())[:200]
    bad = {"truncated.png": (truncated, "not an image file"), "text.png": (b"hello", "not an image file"),
           "thin.png": (encode(Image.new("RGB", (400, 12))), "smaller than one 16-pixel patch"),
           "line.png": (encode(Image.new("RGB", (2000, 40))), "aspect ratio")}
    for name, (data, why) in bad.items():
        ex.upload.value = upload_value(name, data)
        kind, text = ex.messages[-1]
        assert kind == "error" and why in text and name in text, (name, ex.messages[-1])
        assert "Traceback" not in ex.status.value
    assert len(ex.uploads) == n and ex.analysis.id == "cmyk.jpg"       # refused uploads leave the view alone


def test_class_count_mismatch_is_a_message(deit_s, synth, tmp_path):
    other = create_weaktr("deit_tiny_patch16_224", 20, img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          reduction=2)
    torch.save({"model": other.state_dict()}, tmp_path / "voc20.pt")
    box = head_explorer(str(tmp_path / "voc20.pt"), synth)               # a path to a checkpoint of another class count
    ex = box.explorer
    assert ex.model.num_classes == 20 and ex.analysis is not None and ex.analysis.labels is None
    assert "C=20 class tokens but the dataset has 6" in ex.notice.value
    ex = head_explorer(deit_s, synth).explorer
    ex.ckpt_text.value = str(tmp_path / "voc20.pt"); ex.ckpt_btn.click()
    assert ex.messages[-1][0] == "error" and "has C=20 classes but the dataset has 6" in ex.messages[-1][1]
    assert ex.model is deit_s
    broken = tmp_path / "broken.pt"; broken.write_bytes(b"not a checkpoint")
    ex.ckpt_text.value = str(broken); ex.ckpt_btn.click()
    assert ex.messages[-1][0] == "error" and ex.model is deit_s
