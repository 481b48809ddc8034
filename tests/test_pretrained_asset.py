"""The shipped demo backbone (weaktr/assets/<DEMO_ASSET>.*) loads with the current architecture and is better than
random init.

Fast (< 30 s on a 2-core CPU): builds the demo WeakTr and Segmenter, and recomputes the classifier's val mAP on the
SYNTH_PRETRAIN val images (regenerated: the generator is seeded per image, so n_train does not change them).
"""

import pytest
import torch

from weaktr.synth import make_synthetic
from weaktr.model import create_weaktr, load_pretrained
from weaktr.pretrain import (DEMO_ASSET, DEMO_BACKBONE, asset_card, asset_path, create_classifier, load_classifier,
                             load_split_tensors, sha256, val_metrics, PretrainCfg)
from weaktr.segmenter import create_segmenter, load_segmenter_encoder


@pytest.fixture(scope="module")
def card():
    return asset_card(DEMO_ASSET)


@pytest.fixture(scope="module")
def val_split(card, tmp_path_factory):
    p = dict(card["data"]["params"])
    p["n_train"] = 1
    root = make_synthetic(tmp_path_factory.mktemp("pre") / "syn",
                          **{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
    imgs, _, labels = load_split_tensors(root, "val")
    return imgs, labels


def test_card_is_complete(card):
    path = asset_path(DEMO_ASSET)
    for k in ("command", "date", "wall_time_s", "architecture", "metrics", "machine", "versions", "sha256", "data"):
        assert k in card, k
    assert card["command"].startswith("papermill nbs/runs/pretrain_backbone.ipynb")
    assert card["machine"]["cpu"] and card["machine"]["cores"] >= 1
    assert {"torch", "timm"} <= set(card["versions"])
    assert card["sha256"] == sha256(path), "weights file does not match its card"
    assert path.stat().st_size < 8 * 2**20, "the asset should stay a few MB"
    assert card["architecture"]["backbone"] == DEMO_BACKBONE["backbone"]
    assert card["architecture"]["kwargs"] == {k: v for k, v in DEMO_BACKBONE.items() if k != "backbone"}


def test_loads_into_demo_weaktr(card):
    arch = card["architecture"]
    torch.manual_seed(0)
    m = create_weaktr(arch["backbone"], 6, **arch["kwargs"])
    rep = load_pretrained(m, asset_path(DEMO_ASSET))
    assert rep.missing and all(k.startswith(("head.", "adaptive_attention_fusion.")) for k in rep.missing), rep.missing
    assert rep.unexpected == []
    clf = load_classifier(asset_path(DEMO_ASSET), card)
    D = arch["kwargs"]["embed_dim"]
    # CLS replicated into 6 class tokens
    assert torch.equal(m.cls_token.detach(), clf.cls_token.detach().expand(1, 6, D))
    assert torch.equal(m.blocks[0].attn.qkv.weight.detach(), clf.blocks[0].attn.qkv.weight.detach())
    with torch.no_grad():
        out = m.eval()(torch.randn(2, 3, 64, 64))
    assert all(o.shape == (2, 6) and torch.isfinite(o).all() for o in out)


def test_loads_into_demo_segmenter(card):
    arch = card["architecture"]
    seg = create_segmenter(arch["backbone"], 7, **arch["kwargs"])
    rep = load_segmenter_encoder(seg, asset_path(DEMO_ASSET))
    assert [k for k in rep.missing if not k.startswith("encoder.head.")] == []
    clf = load_classifier(asset_path(DEMO_ASSET), card)
    assert torch.equal(seg.encoder.blocks[-1].mlp.fc2.weight.detach(), clf.blocks[-1].mlp.fc2.weight.detach())
    with torch.no_grad():
        assert seg.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7, 64, 64)


def test_pretrained_beats_random_init(card, val_split):
    imgs, labels = val_split
    clf = load_classifier(asset_path(DEMO_ASSET), card)
    m = val_metrics(clf, imgs, labels)
    assert m["val_map"] == pytest.approx(card["metrics"]["val_map"], abs=1e-4), "card metric not reproduced"
    arch = card["architecture"]
    cfg = PretrainCfg(backbone=arch["backbone"], **arch["kwargs"])
    torch.manual_seed(0)
    rnd = val_metrics(create_classifier(cfg, arch["num_classes"]), imgs, labels)
    # measured for the shipped asset: val mAP 0.99 vs 0.24 from random init (8 "palette" classes, 400 val images)
    assert m["val_map"] > rnd["val_map"] + 0.1, (m, rnd)
