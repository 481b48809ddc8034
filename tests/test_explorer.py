"""The attention-head explorer headless, at DeiT-S size (12 layers x 6 heads): figures, widget wiring, one head
state, readable messages for every bad input, exports. Speed is measured in bench/bench_explorer.py, not here."""
from __future__ import annotations
import datetime, io, json, os

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from weaktr.synth import make_synthetic, synthetic_dataset
from weaktr.model import create_weaktr
from weaktr.viz import (analyze_image, effective_weights, fused_map, head_map, affinity_row, pseudo_label,
                        plot_head_grid, plot_overlay, plot_summary, attention_mass_threshold, map_iou, png_bytes,
                        source_map, binarize, map_note, grad_cam, SOURCES)
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
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


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
    z = np.ones((12, 6), bool)
    z[:6] = False                                                        # first half of the layers off
    m = fused_map(an, an.present[0], z, "refined")                      # one masked re-fusion of a 72 x 614 x 614 stack
    assert m.shape == (h, w) and not np.allclose(m, fused_map(an, an.present[0], None, "refined"))
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
    one_hot = np.zeros(an.grid, np.float32)
    one_hot[1, 2] = 1
    np.testing.assert_array_equal(attention_mass_threshold(one_hot, 0.3), one_hot > 0)


def test_widget_wiring(deit_s, synth, tmp_path):
    box = head_explorer(deit_s, synth, images=[photo()], export_dir=tmp_path / "exp", max_side=320)
    ex: HeadExplorer = box.explorer
    assert len(ex._cells) == 72 and len(ex.grid_box.children) == 1 + 6 + 12 * 7
    assert ex.main.value[:4] == b"\x89PNG"
    ex.image_dd.value = ("img", 0)                                      # the 320x240 picture: 20 x 15 patches
    assert ex.analysis.grid == (15, 20)

    def act(name, fn):
        before = ex.main.value
        fn()
        assert ex.main.value != before, f"{name} did not change the view"
        assert not [m for m in ex.messages if m[0] == "error"], ex.messages

    act("source", lambda: setattr(ex.source, "value", "fused"))
    act("head click", ex._cells[7, 3][1].click)
    assert (ex.layer.value, ex.head.value, ex.source.value) == (7, 3, "head")
    np.testing.assert_array_equal(ex.current_map(), head_map(ex.analysis, 7, 3, ex.cls_dd.value))
    ex.source.value = "refined"
    ex.click_mode.value = "toggle"
    act("head off", ex._cells[11, 0][1].click)
    act("layer off", lambda: setattr(ex._rows[5], "value", False))
    assert not any(b.value for b in ex._cols)                           # layer 5 is off: no column is all on
    act("column on", lambda: setattr(ex._cols[2], "value", True))       # a click on h2: the whole column on ...
    act("column off", lambda: setattr(ex._cols[2], "value", False))    # ... and a second one: head 2 of every layer off
    z = ex.mask_grid()
    assert not z[11, 0] and not z[5].any() and not z[:, 2].any() and z.sum() == 72 - 1 - 6 - 11
    np.testing.assert_allclose(ex.current_map(), fused_map(ex.analysis, ex.cls_dd.value, z, "refined"))
    act("all on", ex.all_on.click)
    assert ex.head_mask is None
    h, w = ex.analysis.grid
    act("click on the image", lambda: setattr(ex.click_grid, "index", 3 * w + 4))   # the button over patch (3, 4)
    np.testing.assert_allclose(ex.current_map(), affinity_row(ex.analysis, (3, 4)))
    act("opacity", lambda: setattr(ex.alpha, "value", 0.2))
    act("colormap", lambda: setattr(ex.cmap, "value", "magma"))
    ex.source.value = "refined"
    act("mass", lambda: setattr(ex.mass, "value", 0.5))
    before = ex.view2.value
    ex.compare.value = "refined_uniform"                                # side by side: learned vs uniform head weights
    assert ex.view2.value != before and "uniform head weights" in ex.view2_title.value
    ex.compare.value = "gradcam"                                        # the Grad-CAM baseline beside WeakTr's map
    assert "Grad-CAM" in ex.view2_title.value and "IoU" not in ex.view2_title.value   # this photo has no GT
    np.testing.assert_allclose(ex.current_map("gradcam"), grad_cam(ex.analysis, ex.cls_dd.value))
    p = ex.export_grid()
    assert Image.open(p).size[0] > 300


def test_toggles_follow_the_heads(deit_s, synth):
    """The bug: after 'all heads on' the L/h toggles kept their old state, so clicking L3 to switch it off switched it
    on."""
    ex = head_explorer(deit_s, synth, max_side=224).explorer
    ex._rows[3].value = False                                           # layer 3 off
    assert [b.value for b in ex._cols] == [False] * 6                   # every column now has an off head (layer 3)
    ex._cols[1].value = True
    ex._cols[1].value = False                                           # two clicks on h1: all on, then all off
    assert not ex.mask_grid()[3].any() and not ex.mask_grid()[:, 1].any()
    assert not any(b.value for b in ex._rows)
    ex.all_on.click()
    assert ex.head_mask is None and all(b.value for b in ex._rows + ex._cols)
    ex._rows[3].value = False                                           # the user clicks L3 to switch it OFF
    z = ex.mask_grid()
    assert not z[3].any() and z[np.arange(12) != 3].all(), "clicking L3 after 'all heads on' must switch layer 3 off"
    ex.click_mode.value = "toggle"
    for hd in range(6): ex._cells[3, hd][1].click()                     # back on head by head: L3 follows
    assert ex._rows[3].value and ex.head_mask is None
    ex._cells[0, 0][1].click()
    assert not ex._rows[0].value and not ex._cols[0].value and ex._rows[1].value and ex._cols[1].value


def test_messages_are_one_readable_line(deit_s, synth, tmp_path):
    ex = head_explorer(deit_s, synth, export_dir=tmp_path / "exp", max_side=224).explorer
    def last_error():
        kind, text = ex.messages[-1]
        assert kind == "error", ex.messages[-1]
        assert "Traceback" not in text and " object at 0x" not in text and "\n" not in text, text
        return text
    # a text file given as checkpoint (was: IndexError: pop from empty list / KeyError)
    for name, data in (("notes.pt", b"hello\nworld\n"), ("junk.pt", bytes(range(256)) * 4)):
        (tmp_path / name).write_bytes(data)
        ex.ckpt_text.value = str(tmp_path / name)
        ex.ckpt_btn.click()
        assert "is not a PyTorch checkpoint" in last_error() and ex.model is deit_s
    (tmp_path / "damaged.pt").write_bytes(b"\x80\x02" + bytes(64))
    ex.ckpt_text.value = str(tmp_path / "damaged.pt")
    ex.ckpt_btn.click()
    msg = last_error()                          # the loader's WeightFileError: names the file and what went wrong
    assert "damaged.pt" in msg and "could not be read" in msg and ex.model is deit_s, msg
    # an unreadable upload (was: cannot identify image file <_io.BytesIO object at 0x...>)
    ex.upload.value = upload_value("photo.png", b"\x89PNG but not really")
    assert last_error() == "upload 'photo.png' is not an image file PIL can read (unknown format or not an image)"
    # dataset index out of range (was: clamped silently by a BoundedIntText)
    ex.index.value = 2
    shown = ex.analysis.id
    ex.index.value = 40
    assert last_error() == "dataset # 40 is out of range: the dataset has 4 images, # 0 to 3"
    assert ex.index.value == 2 and ex.analysis.id == shown
    ex.index.value = -1
    last_error()
    # an absent class: a warning line, and the info says the pseudo label ignores it
    ex.all_classes.value = True
    absent = next(c for c in range(C) if c not in ex.analysis.present)
    ex.cls_dd.value = absent
    kind, text = ex.messages[-1]
    assert kind == "warn" and "is not among this image's labels" in text and "is not among" in ex.info.value
    # the title names the model in words, never a raw settings dict
    assert "{" not in ex.title.value and "12 layers × 6 heads" in ex.title.value
    ex.cls_dd.value = ex.analysis.present[0]


def test_no_stale_text_and_hints(deit_s, synth, tmp_path):
    ex = head_explorer(deit_s, synth, export_dir=tmp_path / "exp", max_side=224).explorer
    ex.crf.value = False
    ex.source.value = "pseudo"
    assert "pseudo label at t=" in ex.status.value
    ex.source.value = "refined"                                         # switching maps: the pseudo-label line goes
    assert "pseudo label" not in ex.status.value
    p = ex.export_view()
    first = ex.analysis.id
    assert first in ex.export_html.value and p.name.startswith(first)
    ex.next_btn.click()                                                 # a new image: no link to the old export
    assert ex.analysis.id != first and ex.export_html.value == ""
    # an all-zero map: a hint in the status line and the view's title
    ex.set_head_mask(np.zeros((12, 6), bool))
    kind, text = ex.messages[-1]
    assert kind == "warn" and "zero everywhere (every head is switched off)" in text, ex.messages[-3:]
    assert "zero everywhere" in ex.title_main.value
    ex.all_on.click()
    assert "zero everywhere" not in ex.status.value
    # attention mass on a flat map: no speckled outline (ties kept together: all or nothing)
    flat = np.full(ex.analysis.grid, 0.25, np.float32)
    assert binarize(flat, mass=0.5, size=(64, 64)).all()
    assert map_note(flat) == "flat"


def test_exports_record_settings(deit_s, synth, tmp_path):
    ex = head_explorer(deit_s, synth, export_dir=tmp_path / "exp", max_side=224).explorer
    ex.click_mode.value = "toggle"
    ex._cells[2, 3][1].click()
    for p in (ex.export_view(), ex.export_grid()):
        assert (os.stat(p).st_mode & 0o777) == 0o644 and (os.stat(p.with_suffix(".json")).st_mode & 0o777) == 0o644
        meta = json.loads(Image.open(p).text["weaktr:settings"])
        assert meta == json.loads(p.with_suffix(".json").read_text())
        assert meta["image"] == ex.analysis.id and meta["heads_off"] == [[2, 3]] and meta["map"] == "refined"
        assert meta["threshold"] == ex.threshold.value and "12 layers × 6 heads" in meta["model"]


def test_large_upload_works_at_the_working_size(deit_s, synth):
    ex = head_explorer(deit_s, synth).explorer
    ex.add_upload("big.jpg", encode(photo(1280, 960), "JPEG"))
    an = ex.analysis
    assert an.id == "big.jpg" and max(an.image.shape[:2]) <= 448 and max(an.grid) <= 28
    assert any("resized 1280x960 -> 448x336" in t for _, t in ex.messages[-3:]), ex.messages[-3:]
    assert max(ex.base.shape[:2]) <= ex.view_side                       # the display copy, not the 1280 x 960 original


def test_uploads_are_converted_or_refused(deit_s, synth):
    ex = head_explorer(deit_s, synth).explorer
    cases = {"rgba.png": Image.new("RGBA", (100, 80), (10, 200, 30, 128)), "grey.png": photo().convert("L"),
             "palette.png": photo().convert("P"), "cmyk.jpg": photo().convert("CMYK")}
    for name, im in cases.items():
        ex.upload.value = upload_value(name, encode(im, "JPEG" if name.endswith("jpg") else "PNG"))
        assert ex.analysis.id == name and ex.analysis.image.ndim == 3, (name, ex.messages[-1])
        assert any(k == "info" and "converted from" in t for k, t in ex.messages[-3:]), (name, ex.messages[-3:])
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
    ex.ckpt_text.value = str(tmp_path / "voc20.pt")
    ex.ckpt_btn.click()
    assert ex.messages[-1][0] == "error" and "has C=20 classes but the dataset has 6" in ex.messages[-1][1]
    assert ex.model is deit_s
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    ex.ckpt_text.value = str(broken)
    ex.ckpt_btn.click()
    assert ex.messages[-1][0] == "error" and ex.model is deit_s


def test_hover_readout_at_deit_s_size(deit_s, synth):
    "Each patch button's title (hover) names its patch, the map value, the class, the GT under it and the top head."
    ex = head_explorer(deit_s, synth).explorer
    ex.add_upload("photo.png", encode(photo(448, 336)))                # 28 x 21 patches: one button per patch
    an = ex.analysis
    (h, w), C, L = an.grid, an.num_classes, an.depth
    assert (h, w) == (21, 28) and len(ex.click_grid.options) == h * w
    ex.click_mode.value = "toggle"
    ex._rows[4].value = False                                           # layer 4 off: the summary must skip it
    ex.source.value = "cross"
    m, tips, cls = ex.current_map(), ex.click_grid.tooltips, ex.cls_dd.value
    assert len(tips) == h * w and "GT:" not in tips[0]                  # an upload has no GT
    contrib = effective_weights(an, ex.head_mask)[:, None] * an.attn_stack[:, cls, C:]   # (M, P)
    for r, c in ((0, 0), (10, 13), (20, 27)):
        p = r * w + c
        t = tips[p]
        assert t.startswith(f"patch ({r}, {c}) · fused cross-attention S '{an.class_names[cls]}' = {m[r, c]:.3g}"), t
        j = int(contrib[:, p].argmax())
        assert j % L != 4 and f"top head here: L{j % L} h{j // L} " in t, t
    ex.source.value = "gradcam"                                         # no heads in Grad-CAM: no head summary
    assert not any("top head" in t for t in ex.click_grid.tooltips)
    ex.index.value = 1                                                  # a dataset image: GT class under the patch
    assert all(" · GT: " in t for t in ex.click_grid.tooltips)


def test_second_checkpoint_beside(deit_s, synth, tmp_path):
    "Checkpoint B (another DeiT-S) shows the same view beside the main one with both IoUs; bad files are one line."
    torch.manual_seed(5)
    other = create_weaktr("deit_small_patch16_224", C, drop_path_rate=0.0)
    torch.save({"model": other.state_dict()}, tmp_path / "b.pt")
    ex = head_explorer(deit_s, synth, max_side=224).explorer
    ex.source.value = "refined"
    assert ex.load_compare_checkpoint(tmp_path / "b.pt") and ex.compare.value == "ckpt_b"
    anb = ex.analyze_b(ex._shown_key)
    assert (anb.depth, anb.num_heads, anb.grid) == (12, 6, ex.analysis.grid)
    mb = fused_map(anb, ex.cls_dd.value, None, "refined")
    assert np.isclose(ex.iou2, map_iou(mb, anb.mask, ex.cls_dd.value, ex.threshold.value))
    assert f"IoU B {ex.iou2:.2f} vs A {ex.iou:.2f}" in ex.view2_title.value
    assert ex.view2_heads.value.count("<table") == 2
    ex.compare.value = "gt"
    assert ex.view2_heads.value == ""                                   # the weight tables only beside B
    ex.compare.value = "ckpt_b"
    (tmp_path / "notes.pt").write_text("hello\n")
    for bad, why in ((tmp_path / "notes.pt", "is not a PyTorch checkpoint"), (tmp_path / "missing.pt", "not found")):
        ex.ckpt_text.value = str(bad)
        ex.ckpt2_btn.click()
        kind, text = ex.messages[-1]
        assert kind == "error" and why in text and "Traceback" not in text and "\n" not in text, ex.messages[-1]
    assert ex.model2 is not None and ex.compare.value == "ckpt_b"        # B is kept after a bad file
    big = create_weaktr("deit_tiny_patch16_224", C + 1, img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": big.state_dict()}, tmp_path / "c7.pt")
    ex.ckpt_text.value = str(tmp_path / "c7.pt")
    ex.ckpt2_btn.click()
    assert ex.messages[-1][0] == "error" and "has C=7 classes but the model shown has C=6" in ex.messages[-1][1]
    # a B of another shape (2 x 2 heads, patch 8): A's head mask does not apply, the query patch maps by position
    small = create_weaktr("deit_tiny_patch16_224", C, img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    assert ex.load_compare_checkpoint(str(tmp_path / "small.pt"))
    ex.click_mode.value = "toggle"
    ex._cells[7, 2][1].click()                                          # one of A's 72 heads off
    t = ex.view2_title.value
    assert "B has 2 × 2 heads: all on" in t and "heads off" not in t, t
    anb, mb, patch, notes = ex._view_b()
    np.testing.assert_allclose(mb, fused_map(anb, ex.cls_dd.value, None, "refined"))
    h, w = ex.analysis.grid
    ex.click_grid.index = (h - 1) * w + (w - 1)                         # A's last patch: B's last patch
    hb, wb = anb.grid
    assert ex.source.value == "affinity" and ex._view_b()[2] == (hb - 1, wb - 1) and (hb, wb) != (h, w)
