"Metrics: confusion matrix / mIoU against independent implementations on random data."
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix as sk_confusion

from weaktr.metrics import class_map, confusion_matrix, iou_table, miou, sample_map


@pytest.mark.parametrize("K", [2, 21, 91])
def test_confusion_matches_sklearn(K):
    rng = np.random.default_rng(K)
    gt = rng.integers(0, K, (64, 80))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, K, (64, 80))
    v = gt != 255
    ref = sk_confusion(gt[v], pred[v], labels=np.arange(K))
    g = gt.astype(np.uint8) if K < 255 else gt
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(pred), g, K), ref)


def test_miou_direct_tp_fp_fn_dataset_level():
    "Dataset-level IoU (sum counts, then divide) is not the mean of per-image IoUs: check we do the former."
    rng = np.random.default_rng(1)
    K, tot, tp, fp, fn = 5, None, np.zeros(5), np.zeros(5), np.zeros(5)
    for _ in range(6):
        g = rng.integers(0, K, (30, 30))
        g[:3] = 255
        p = np.where(rng.random(g.shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, K, g.shape))
        c = confusion_matrix(p, g, K)
        tot = c if tot is None else tot + c
        for k in range(K):
            v = g != 255
            tp[k] += ((p == k) & (g == k) & v).sum()
            fp[k] += ((p == k) & (g != k) & v).sum()
            fn[k] += ((p != k) & (g == k) & v).sum()
    m, per = miou(tot)
    np.testing.assert_allclose(per, tp / (tp + fp + fn))
    assert abs(m - np.mean(tp / (tp + fp + fn))) < 1e-12


def test_perfect_prediction_and_table():
    g = np.arange(12).reshape(3, 4) % 3
    m, per = miou(confusion_matrix(g, g, 4))
    assert m == 1.0 and np.isnan(per[3])
    assert "| **mIoU** | **100.00** |" in iou_table(per, ["bg", "a", "b", "c"])


def test_class_map_matches_sklearn_macro():
    rng = np.random.default_rng(2)
    labels = (rng.random((50, 20)) < 0.2).astype(int)
    labels[:, 0] = 0                                                      # class 0 has no positive
    scores = rng.random((50, 20)) + labels * 0.3
    m, per = class_map(scores, labels)
    assert np.isnan(per[0])
    np.testing.assert_allclose(m, average_precision_score(labels[:, 1:], scores[:, 1:], average="macro"))
    # per-sample AP == sklearn's "samples" average when every image has a positive
    keep = labels.sum(1) > 0
    np.testing.assert_allclose(sample_map(scores, labels),
                               average_precision_score(labels[keep].T, scores[keep].T, average="macro"))
