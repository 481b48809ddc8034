"""Real-data and synthetic-data tests for weaktr.data (voc-mini, coco-mini, make_synthetic, transforms).

Tests that need the shared samples skip with the path they looked in.
"""
import hashlib, json, shutil, time

import numpy as np
import pytest
import torch
from PIL import Image

from weaktr.core import shared_data
from weaktr.data import (COCO80_IDS, COCO_CLASSES, COCO_UNUSED_IDS, IGNORE_INDEX, VOC_CLASSES, DataError, coco_dataset,
                         coco_lut, convert_cls_labels_npy, folder_dataset, mask_to_rgb, read_image, read_mask,
                         read_label_json, voc_dataset, voc_palette, write_mask)
from weaktr.transforms import (IMAGENET_MEAN, IMAGENET_STD, SEG_MEAN, SEG_STD, cat_max_ratio_crop_box, ms_flip_views,
                               on_image, phase1_collate, phase1_eval_transform, phase1_train_transform,
                               seg_eval_transform, seg_train_transform)
from weaktr.synth import SYNTH_DEFAULT, make_synthetic, synthetic_dataset

torch.set_num_threads(1)


def _shared(name):
    try: return shared_data(name)
    except FileNotFoundError as e: pytest.skip(f"{name} not found at {e}")


@pytest.fixture(scope="module")
def voc(): return _shared("voc-mini")


@pytest.fixture(scope="module")
def coco(): return _shared("coco-mini")


def _mini_copy(src, dst, ids):
    "A VOC-layout copy of a few ids (images, masks, list) to corrupt in a tmp dir."
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"): (dst / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages")
        shutil.copy(src / "SegmentationClass" / f"{i}.png", dst / "SegmentationClass")
    (dst / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return dst


# ---------------------------------------------------------------- voc-mini

def test_voc_every_pair_loads_and_labels_match_json(voc):
    ds = voc_dataset(voc, "all", mask_dir="SegmentationClass", labels="masks")
    assert len(ds) == 742 and ds.num_classes == 20 and ds.class_names == VOC_CLASSES
    ref = read_label_json(voc / "cls_labels.json")
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].mode == "RGB" and s["mask"].dtype == np.uint8
        assert s["mask"].shape == (s["image"].height, s["image"].width)
        vals = set(np.unique(s["mask"]).tolist())
        assert vals <= set(range(21)) | {IGNORE_INDEX}, (s["id"], vals)
        assert s["labels"].shape == (20,) and s["labels"].dtype == torch.float32
        assert [c + 1 for c in s["labels"].nonzero().flatten().tolist()] == ref[s["id"]], s["id"]


def test_voc_palette_decoding_matches_raw_pil(voc, tmp_path):
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[:25]
    seen_ignore = False
    for i in ids:
        p = voc / "SegmentationClass" / f"{i}.png"
        with Image.open(p) as im:
            assert im.mode == "P"
            raw = np.array(im)                                   # the palette indices, as PIL stores them
            pal = np.array(im.getpalette()[:3 * 256], np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(read_mask(p), raw)
        np.testing.assert_array_equal(pal[:21], voc_palette()[:21])          # the file's colours are the VOC map
        seen_ignore |= bool((raw == IGNORE_INDEX).any())
        # the same mask saved as VOC colours decodes back to the same indices
        Image.fromarray(mask_to_rgb(raw)).save(tmp_path / "rgb.png")
        np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), raw)
        # and our writer round-trips it value for value
        write_mask(tmp_path / "w.png", raw)
        np.testing.assert_array_equal(read_mask(tmp_path / "w.png"), raw)
    assert seen_ignore                                                      # official val masks carry the 255 band


def test_voc_splits_and_json_labels(voc):
    sizes = {s: len(voc_dataset(voc, s, labels="json")) for s in ("train", "train_aug", "val")}
    assert sizes == {"train": 333, "train_aug": 379, "val": 363}
    tr, ta, va = (set(voc_dataset(voc, s, mask_dir=None, labels="json").ids) for s in ("train", "train_aug", "val"))
    assert tr <= ta and not (ta & va)
    # a list given as a path works like the split name
    by_path = voc_dataset(voc, voc / "ImageSets/Segmentation/train.txt", mask_dir=None, labels="json")
    assert by_path.ids == voc_dataset(voc, "train", mask_dir=None, labels="json").ids
    # JSON labels equal mask-derived ones on the same ids
    dj, dm = voc_dataset(voc, "train", labels="json"), voc_dataset(voc, "train", labels="masks")
    torch.testing.assert_close(dj.label_matrix(), dm.label_matrix())
    with pytest.raises(FileNotFoundError, match="splits there"): voc_dataset(voc, "trainaug")


def test_voc_truncated_jpeg_raises_naming_file(voc, tmp_path):
    ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[:2]
    root = _mini_copy(voc, tmp_path / "voc", ids)
    bad = root / "JPEGImages" / f"{ids[1]}.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    ds = voc_dataset(root, "train")
    assert ds[0]["image"].size == Image.open(voc / "JPEGImages" / f"{ids[0]}.jpg").size
    with pytest.raises(DataError, match="truncated") as e: ds[1]
    assert str(bad) in str(e.value)
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as e: read_image(bad)
    assert str(bad) in str(e.value)


def test_voc_content_errors_name_the_file(voc, tmp_path):
    ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[:3]
    root = _mini_copy(voc, tmp_path / "voc", ids)
    ds = voc_dataset(root, "train")
    mp = root / "SegmentationClass" / f"{ids[0]}.png"
    m = read_mask(mp)
    write_mask(mp, m[:-1])                                                # one row short
    with pytest.raises(DataError, match="but image") as e: ds[0]
    assert str(mp) in str(e.value)
    m2 = m.copy()
    m2[0, 0] = 21
    write_mask(mp, m2)
    with pytest.raises(DataError, match=r"value\(s\) \[21\] outside the class range 0..20"): ds[0]
    (root / "JPEGImages" / f"{ids[2]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"first missing: \['{ids[2]}'\]"): voc_dataset(root, "train")
    (root / "cls_labels.json").write_text(json.dumps({ids[0]: [1]}))
    (root / "ImageSets/Segmentation/two.txt").write_text(f"{ids[0]}\n{ids[1]}\n")
    with pytest.raises(DataError, match=rf"does not cover 1 of the 2 listed ids; first missing: \['{ids[1]}'\]"):
        voc_dataset(root, "two", labels="json")
    (root / "ImageSets/Segmentation/none.txt").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"): voc_dataset(root, "none")
    with pytest.raises(FileNotFoundError, match="dataset root not found"): voc_dataset(tmp_path / "missing")


def test_npy_labels_need_explicit_conversion(tmp_path, voc):
    ref = read_label_json(voc / "cls_labels.json")
    ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    d = {i: np.isin(np.arange(1, 21), ref[i]).astype(np.float32) for i in ids}
    np.save(tmp_path / "cls_labels.npy", d, allow_pickle=True)            # the reference's pickled format
    with pytest.raises(DataError, match="convert_cls_labels_npy"):
        voc_dataset(voc, "train", labels=str(tmp_path / "cls_labels.npy"))
    with pytest.warns(UserWarning, match="UNPICKLING"):
        out = convert_cls_labels_npy(tmp_path / "cls_labels.npy", tmp_path / "cls_labels.json", allow_pickle=True)
    ds = voc_dataset(voc, "train", labels=str(out))
    torch.testing.assert_close(ds.label_matrix(), voc_dataset(voc, "train", labels="json").label_matrix())


def test_csv_labels_and_unknown_name(voc, tmp_path):
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[:4]
    ref = read_label_json(voc / "cls_labels.json")
    rows = [f"{i}.jpg,{';'.join(VOC_CLASSES[c - 1] for c in ref[i])}" for i in ids]
    (tmp_path / "l.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    (tmp_path / "l.txt").write_text("\n".join(ids) + "\n")
    ds = voc_dataset(voc, tmp_path / "l.txt", labels=str(tmp_path / "l.csv"))
    torch.testing.assert_close(ds.label_matrix(), voc_dataset(voc, tmp_path / "l.txt", labels="masks").label_matrix())
    fd = folder_dataset(voc / "JPEGImages", tmp_path / "l.csv", masks_dir=voc / "SegmentationClass",
                        names=list(VOC_CLASSES))
    assert fd.ids == ids and fd[0]["mask"] is not None
    (tmp_path / "bad.csv").write_text("image,labels\n" + rows[0] + "\n" + f"{ids[1]}.jpg,person;unicorn\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3 \(image '.*'\): unknown class name 'unicorn'"):
        folder_dataset(voc / "JPEGImages", tmp_path / "bad.csv", names=list(VOC_CLASSES))


# ---------------------------------------------------------------- coco-mini

def test_coco_mini_both_id_spaces(coco):
    d80 = coco_dataset(coco, "all", class_space="coco80", mask_space="coco80")
    d90 = coco_dataset(coco, "all", class_space="coco90", mask_space="coco80")
    assert (len(d80), d80.num_classes, d90.num_classes) == (128, 80, 90)
    ref = read_label_json(coco / "cls_labels.json")
    to90 = coco_lut("coco80", "coco90")
    ids80 = np.array(COCO80_IDS)
    for i in range(len(d80)):
        a, b = d80[i], d90[i]
        assert a["id"] == b["id"] and a["image"].size == b["image"].size
        np.testing.assert_array_equal(to90[a["mask"]], b["mask"])
        l80 = a["labels"].nonzero().flatten().numpy()
        l90 = b["labels"].nonzero().flatten().numpy()
        np.testing.assert_array_equal(ids80[l80] - 1, l90)            # class index = category_id - 1
        assert [c + 1 for c in l80] == ref[a["id"]]
        assert not set((l90 + 1).tolist()) & set(COCO_UNUSED_IDS)
    # JSON labels (contiguous on disk) land in the same place as mask-derived ones
    j90 = coco_dataset(coco, "all", class_space="coco90", mask_space="coco80", labels="json")
    torch.testing.assert_close(j90.label_matrix(), d90.label_matrix())
    # image 000000000009: bowl, orange, broccoli in COCO terms
    k = d90.ids.index("000000000009")
    assert {COCO_CLASSES[c] for c in d90[k]["labels"].nonzero().flatten().tolist()} == {"bowl", "orange", "broccoli"}
    assert len(coco_dataset(coco, "train2014", mask_space="coco80")) == 83


def test_coco_mini_wrong_mask_space_is_caught(coco):
    ds = coco_dataset(coco, "all", class_space="coco90", mask_space="coco90")   # contiguous masks read as category ids
    ref = read_label_json(coco / "cls_labels.json")
    k = next(i for i, id in enumerate(ds.ids) if set(ref[id]) & set(COCO_UNUSED_IDS))
    with pytest.raises(DataError, match="mask_space='coco80'"): ds[k]


# ---------------------------------------------------------------- synthetic

def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_synthetic_default_timing_consistency_and_loader(tmp_path, capsys):
    t0 = time.perf_counter()
    root = make_synthetic(tmp_path / "syn", **SYNTH_DEFAULT)
    dt = time.perf_counter() - t0
    n = SYNTH_DEFAULT["n_train"] + SYNTH_DEFAULT["n_val"]
    with capsys.disabled(): print(f"\nSYNTH_DEFAULT: {n} images of {SYNTH_DEFAULT['size']} px generated in {dt:.2f} s")
    assert dt < 30
    meta = json.loads((root / "meta.json").read_text())
    assert len(meta["class_names"]) == 6 and meta["params"]["seed"] == 0
    for split, size in (("train", 600), ("val", 150)):
        ds = synthetic_dataset(root, split)
        assert len(ds) == size and ds.class_names == tuple(meta["class_names"])
        counts = torch.zeros(6)
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].size == (64, 64) and s["mask"].shape == (64, 64)
            ids = sorted(int(v) - 1 for v in np.unique(s["mask"]) if v != 0)
            assert 1 <= len(ids) <= 3 and s["labels"].nonzero().flatten().tolist() == ids   # labels == mask ids
            counts += s["labels"]
        assert (counts > 0.08 * size).all(), counts                        # every class is well represented
    torch.testing.assert_close(synthetic_dataset(root, "val", labels="masks").label_matrix(),
                               synthetic_dataset(root, "val").label_matrix())


def test_synthetic_determinism(tmp_path):
    kw = dict(n_train=40, n_val=10, seed=7, clutter=0.8)
    a, b = make_synthetic(tmp_path / "a", **kw), make_synthetic(tmp_path / "b", **kw)
    da, db = _digest(a), _digest(b)
    assert len(da) == 40 + 10 + 40 + 10 + 3 + 2 and da == db              # every file identical, byte for byte
    c = make_synthetic(tmp_path / "c", **{**kw, "seed": 8})
    assert _digest(c)["JPEGImages/train_00000.png"] != da["JPEGImages/train_00000.png"]
    # per-image seeding: a smaller set is a prefix of a larger one
    small = make_synthetic(tmp_path / "s", **{**kw, "n_train": 5})
    assert _digest(small)["JPEGImages/train_00004.png"] == da["JPEGImages/train_00004.png"]
    with pytest.raises(FileExistsError, match="other parameters"): make_synthetic(a, **{**kw, "seed": 1})
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic(tmp_path / "user", n_train=2, n_val=0)


# ---------------------------------------------------------------- transforms

def test_ms_flip_views_order_sizes_and_pil_bicubic(voc):
    img = read_image(voc / "JPEGImages" / "2007_000032.jpg")            # 500 x 281
    W, H = img.size
    views = ms_flip_views(img, (1.0, 0.8, 1.2))
    assert len(views) == 6
    for k, s in enumerate((1.0, 0.8, 1.2)):
        x, xf = views[2 * k], views[2 * k + 1]
        assert x.shape == (3, round(H * s), round(W * s))
        torch.testing.assert_close(xf, x.flip(-1), rtol=0, atol=0)
        ref = np.asarray(img.resize((round(W * s), round(H * s)), Image.BICUBIC), np.float32) / 255
        ref = (torch.from_numpy(ref).permute(2, 0, 1)
               - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="first scale must be 1.0"): ms_flip_views(img, (1.2, 1.0))


def _coded(H, W, seed, block=8):
    "Image whose red channel encodes the mask (10 * class, 250 for ignore)."
    g = np.random.default_rng(seed)
    m = np.kron(g.integers(0, 21, (H // block + 1, W // block + 1)),
                np.ones((block, block), int))[:H, :W].astype(np.uint8)
    m[:3, :] = IGNORE_INDEX
    img = np.stack([np.where(m == 255, 250, m * 10), np.full_like(m, 77), np.full_like(m, 99)], -1).astype(np.uint8)
    return dict(id="coded", image=Image.fromarray(img), mask=m, labels=torch.zeros(20))


def _decode(x):
    return ((x[0] * SEG_STD[0] + SEG_MEAN[0]) * 255).round().long()


def test_seg_train_transform_keeps_mask_aligned():
    torch.manual_seed(0)
    # exact: no interpolation (ratio 1), random crops + flips + padding
    tf = seg_train_transform(crop_size=64, base_size=57, ratio_range=(1.0, 1.0), photometric=False)
    flips = 0
    for k in range(30):
        s = _coded(57, 81, k)
        o = tf(s)
        x, m = o["image"], o["mask"]
        assert x.shape == (3, 64, 64) and m.shape == (64, 64) and m.dtype == torch.int64
        red = _decode(x)
        pad = x.abs().sum(0) == 0
        assert (m[pad] == 255).all() and pad[57:].all()
        inside = ~pad
        exp = torch.where(m == 255, 250, m * 10)
        assert torch.equal(red[inside], exp[inside])
        # a flip is detected by comparing with the un-flipped crop of the source
        flips += int(not torch.equal(m[:57], torch.as_tensor(s["mask"])[:, :64].long()))
    assert flips > 0
    # with resizing (ratio range) the mask still follows the image away from block edges
    tf = seg_train_transform(crop_size=96, base_size=57, ratio_range=(0.5, 2.0), photometric=False)
    agree, frac = [], []
    for k in range(20):
        o = tf(_coded(57, 81, 100 + k, block=16))
        red, m = _decode(o["image"]), o["mask"]
        mf = m[None, None].float()
        flat = (torch.nn.functional.max_pool2d(mf, 5, 1, 2) == -torch.nn.functional.max_pool2d(-mf, 5, 1, 2))[0, 0]
        valid = flat & (m != 255)                                   # pixels 2+ px away from any mask edge
        valid[:2] = valid[-2:] = False
        valid[:, :2] = valid[:, -2:] = False                                   # and from the crop border
        agree.append((red[valid] == m[valid] * 10).float().mean().item())
        frac.append(valid.float().mean().item())
    assert min(agree) > 0.99 and np.mean(frac) > 0.2, (agree, frac)


def test_seg_train_transform_photometric_and_eval():
    torch.manual_seed(1)
    s = _coded(60, 70, 0)
    o = seg_train_transform(crop_size=48, base_size=60, ratio_range=(1.0, 1.0), flip_p=0.0)(s)
    assert o["image"].dtype == torch.float32 and o["mask"].shape == (48, 48)
    lo = (0 - torch.tensor(SEG_MEAN)) / torch.tensor(SEG_STD)
    hi = (1 - torch.tensor(SEG_MEAN)) / torch.tensor(SEG_STD)
    assert ((o["image"] >= lo.view(3, 1, 1) - 1e-5) & (o["image"] <= hi.view(3, 1, 1) + 1e-5)).all()
    e = seg_eval_transform(base_size=30)(s)
    assert e["image"].shape == (3, 30, 35) and e["mask"].shape == (60, 70) and e["orig_size"] == (60, 70)


def test_cat_max_ratio_behaviour():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(120, 120, dtype=torch.uint8)
    mask[80:115, 80:115] = 7
    mask[:, :10] = 255
    def frac(ratio, n=400):
        ok = 0
        for _ in range(n):
            t, l, h, w = cat_max_ratio_crop_box(mask, (48, 48), ratio, generator=g)
            assert (h, w) == (48, 48) and 0 <= t <= 72 and 0 <= l <= 72
            c = mask[t:t + h, l:l + w]
            c = c[c != 255]
            cnt = torch.bincount(c.long())
            ok += int((cnt > 0).sum() > 1 and cnt.max() / cnt.sum() < 0.75)
        return ok / n
    off, on = frac(1.0), frac(0.75)
    assert on > off + 0.4, (off, on)
    # a crop larger than the image takes the full side; a one-class mask still returns a box
    assert cat_max_ratio_crop_box(torch.zeros(20, 30), (48, 48), generator=g) == (0, 0, 20, 30)


def test_phase1_transforms_and_collate(tmp_path):
    tf = phase1_train_transform(224)
    names = [type(t).__name__ for t in tf.transforms]
    assert "ColorJitter" not in names and "RandAugment" in names
    ra = tf.transforms[names.index("RandAugment")]
    assert ra.num_layers == 2 and len(ra.ops) == 15
    assert ra.ops[0].hparams["translate_const"] == 100 and ra.ops[0].hparams["img_mean"] == (124, 116, 104)
    rrc = tf.transforms[0]
    assert rrc.scale == (0.08, 1.0) and "bicubic" in str(rrc.interpolation).lower()
    ev = phase1_eval_transform(224)
    assert ev.transforms[0].size == 256 and ev.transforms[1].size == (224, 224)
    root = make_synthetic(tmp_path / "s", n_train=8, n_val=2)
    ds = synthetic_dataset(root, "train", transform=on_image(phase1_train_transform(64)))
    x, y = phase1_collate([ds[i] for i in range(4)])
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 6) and y.sum(1).min() >= 1
