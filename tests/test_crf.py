"Dense CRF wrapper: edge snapping, input validation, determinism (synthetic + one real VOC image)."
import numpy as np
import pytest
from PIL import Image

from weaktr.core import shared_data
from weaktr.crf import (CRF_COCO_LABELS, CRF_COCO_PROBS, CRF_VOC_LABELS, CRF_VOC_PROBS, CrfCfg,
                        crf_from_labels, crf_from_probs)


def two_region(H=40, W=56, edge=23, seed=0):
    rng = np.random.default_rng(seed)
    gt = (np.arange(W)[None].repeat(H, 0) >= edge).astype(np.int64)
    img = np.where(gt[..., None] == 1, [220, 200, 40], [30, 40, 160]).astype(np.float64)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8), gt


def iou_fg(a, b): return ((a == 1) & (b == 1)).sum() / ((a == 1) | (b == 1)).sum()


@pytest.mark.parametrize("cfg", [CRF_VOC_LABELS, CRF_COCO_LABELS])
def test_label_crf_snaps_shifted_edge(cfg):
    img, gt = two_region()
    noisy = np.roll(gt, 5, axis=1)
    noisy[:, :5] = 0                                                  # boundary 5 px too far right
    rng = np.random.default_rng(1)
    flip = rng.random(gt.shape) < 0.1
    noisy[flip] = 1 - noisy[flip]
    out = crf_from_labels(img, noisy, 2, cfg)
    assert out.dtype == np.int64 and out.shape == gt.shape
    assert iou_fg(out, gt) > iou_fg(noisy, gt) + 0.1 and iou_fg(out, gt) > 0.95
    np.testing.assert_array_equal(crf_from_labels(img, noisy, 2, cfg), out)


@pytest.mark.parametrize("cfg", [CRF_VOC_PROBS, CRF_COCO_PROBS])
def test_prob_crf_snaps_blurred_map(cfg):
    img, gt = two_region()
    x = np.arange(gt.shape[1])[None].repeat(gt.shape[0], 0)
    p1 = 1 / (1 + np.exp(-(x - 27) / 4.0))                           # soft, shifted ramp
    probs = 1.8 * np.stack([1 - p1, p1]).astype(np.float32)            # unnormalised two-output sum
    out = crf_from_probs(img, probs, cfg)
    assert iou_fg(out, gt) > iou_fg(probs.argmax(0), gt)
    np.testing.assert_array_equal(crf_from_probs(img, probs, cfg), out)


def test_errors():
    img, gt = two_region()
    with pytest.raises(ValueError, match="outside"): crf_from_labels(img, gt + 1, 2)
    with pytest.raises(ValueError, match="outside"): crf_from_labels(img, gt - 1, 2)
    with pytest.raises(TypeError, match="cfg"): crf_from_labels(img, gt, 2, cfg=dict(iters=3))
    with pytest.raises(ValueError, match="gt_prob"): crf_from_labels(img, gt, 2, CrfCfg(4, 3, 83, 5, 3, gt_prob=1.0))
    with pytest.raises(ValueError, match="probs has shape"): crf_from_probs(img, np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="image_u8"): crf_from_probs(img[None], np.ones((2, 40, 56), np.float32))


def test_real_voc_image():
    try: root = shared_data("voc-mini")
    except FileNotFoundError as e: pytest.skip(str(e))
    ids = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))[:1]
    if not ids: pytest.skip(f"no masks under {root / 'SegmentationClass'}")
    img = np.asarray(Image.open(root / "JPEGImages" / f"{ids[0]}.jpg").convert("RGB"))
    gt = np.asarray(Image.open(root / "SegmentationClass" / f"{ids[0]}.png")).astype(np.int64)
    keys = np.unique(gt[gt != 255])
    compact = np.searchsorted(keys, np.where(gt == 255, keys[0], gt))
    rng = np.random.default_rng(0)
    noisy = compact.copy()
    flip = rng.random(gt.shape) < 0.2
    noisy[flip] = rng.integers(0, len(keys), flip.sum())
    out = crf_from_labels(img, noisy, len(keys), CRF_VOC_LABELS)
    v = gt != 255
    assert (out[v] == compact[v]).mean() > (noisy[v] == compact[v]).mean() + 0.1
