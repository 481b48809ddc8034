"""The shipped backbones are timm models: `timm.create_model(<asset name>)` builds the card's architecture,
`pretrained=True` loads the shipped weights (offline), and WeakTr / the Segmenter are built from the name alone."""
import pytest
import timm
import torch
from safetensors.torch import load_file

import weaktr  # noqa: F401  (registers the shipped assets)
from weaktr.model import create_weaktr, load_pretrained
from weaktr.segmenter import create_segmenter, load_segmenter_encoder
from weaktr.zoo import DEMO_ASSET, asset_card, asset_path, backbone_arch, register_asset, shipped_assets


@pytest.fixture(scope="module")
def weights():
    return load_file(str(asset_path(DEMO_ASSET)))


def test_registered_on_import():
    assert DEMO_ASSET in shipped_assets()
    assert timm.is_model(DEMO_ASSET) and DEMO_ASSET in timm.list_models(pretrained=True)


def test_create_model_builds_card_architecture():
    kw = asset_card(DEMO_ASSET)["architecture"]["kwargs"]
    m = timm.create_model(DEMO_ASSET)
    g = kw["img_size"] // kw["patch_size"]
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (kw["embed_dim"], kw["depth"], kw["num_heads"])
    assert tuple(m.patch_embed.patch_size) == (kw["patch_size"],) * 2 and tuple(m.patch_embed.grid_size) == (g, g)
    assert tuple(m.pos_embed.shape) == (1, 1 + g * g, kw["embed_dim"])
    assert m.num_classes == asset_card(DEMO_ASSET)["architecture"]["num_classes"]
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 3, kw["img_size"], kw["img_size"])).shape == (2, m.num_classes)


def test_pretrained_gives_the_asset_tensors_exactly(weights):
    m = timm.create_model(DEMO_ASSET, pretrained=True)
    sd = m.state_dict()
    assert sorted(sd) == sorted(weights)
    for k, v in weights.items():
        assert torch.equal(sd[k], v.float()), k
    rnd = timm.create_model(DEMO_ASSET)
    assert not torch.equal(rnd.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    headless = timm.create_model(DEMO_ASSET, pretrained=True, num_classes=0)   # head dropped, backbone kept
    assert torch.equal(headless.blocks[-1].mlp.fc2.weight, weights["blocks.3.mlp.fc2.weight"].float())


def test_backbone_arch_matches_card():
    kw = asset_card(DEMO_ASSET)["architecture"]["kwargs"]
    assert backbone_arch(DEMO_ASSET) == dict(backbone=DEMO_ASSET, **{k: kw[k] for k in
                                             ("embed_dim", "depth", "num_heads", "patch_size", "img_size")})


def test_create_weaktr_by_name(weights):
    arch = backbone_arch(DEMO_ASSET)
    m = create_weaktr(DEMO_ASSET, 5, img_size=arch["img_size"])                 # no patch/width/depth/heads kwargs
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size) == (arch["embed_dim"], arch["depth"], arch["num_heads"],
                                                                 arch["patch_size"])
    g = arch["img_size"] // arch["patch_size"]
    assert m.src_grid == (g, g)
    rep = load_pretrained(m, asset_path(DEMO_ASSET))
    assert rep.unexpected == [] and all(k.startswith(("head.", "adaptive_attention_fusion.")) for k in rep.missing)
    assert torch.equal(m.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"].float())
    with torch.no_grad():
        out = m.eval()(torch.randn(1, 3, arch["img_size"], arch["img_size"]))
    assert all(o.shape == (1, 5) for o in out)
    m0 = create_weaktr(DEMO_ASSET, 2)                                    # no img_size: the asset's own size
    assert (m0.img_size, m0.config["img_size"], m0.src_grid) == (arch["img_size"], arch["img_size"], (g, g))
    assert create_weaktr(DEMO_ASSET, 2, img_size=2 * arch["img_size"]).src_grid == (2 * g, 2 * g)  # explicit wins


def test_create_segmenter_by_name(weights):
    S = backbone_arch(DEMO_ASSET)["img_size"]
    seg = create_segmenter(DEMO_ASSET, 4, img_size=S)
    load_segmenter_encoder(seg, asset_path(DEMO_ASSET))
    assert torch.equal(seg.encoder.blocks[-1].mlp.fc2.weight, weights["blocks.3.mlp.fc2.weight"].float())
    with torch.no_grad():
        assert seg.eval()(torch.randn(1, 3, S, S)).shape == (1, 4, S, S)


def test_unknown_asset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"vit_synth_nope\.json not found \(shipped assets: \['vit_synth_d128"):
        backbone_arch("vit_synth_nope")
    with pytest.raises(FileNotFoundError, match="shipped assets"):
        register_asset("vit_synth_nope")
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("vit_synth_nope")
    with pytest.raises(ValueError, match="shadow timm's own model"):
        register_asset("vit_tiny_patch16_224")
