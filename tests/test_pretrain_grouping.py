"""The attention-grouping pretraining option (weaktr.pretrain, nbs/15_pretrain.ipynb)."""
import torch

from weaktr.pretrain import (AttentionTap, PretrainCfg, create_classifier, grid_groups, grouping_kl, grouping_targets,
                             own_object_mass)


def _vit():
    torch.manual_seed(0)
    return create_classifier(PretrainCfg(embed_dim=32, depth=3, num_heads=4, drop_path_rate=0.0), 5)


def test_grouping_loss_reaches_only_the_supervised_heads():
    vit = _vit()
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[:, 8:40, 16:48] = 2
    T = grouping_targets(grid_groups(masks, 8))
    with AttentionTap(vit, (2,), 2) as tap: vit(x)
    grouping_kl(tap.maps[2], T).backward()
    g = vit.blocks[2].attn.qkv.weight.grad                       # rows: q (4 heads x 8) | k | v
    q, k, v = g[:32].abs().sum(1), g[32:64].abs().sum(1), g[64:].abs().sum(1)
    assert q[:16].sum() > 0 and k[:16].sum() > 0                 # heads 0, 1: trained
    assert q[16:].sum() == 0 and k[16:].sum() == 0 and v.sum() == 0   # heads 2, 3 and the values: free
    assert vit.blocks[1].attn.qkv.weight.grad.abs().sum() > 0    # earlier blocks feed the supervised heads
    assert all(p.grad is None for p in vit.head.parameters())    # the classifier head plays no part


def test_targets_and_mass_definitions():
    g = torch.tensor([[0, 2, 2, 0, 0, 1]])
    T = grouping_targets(g)
    assert torch.allclose(T.sum(-1), torch.ones(1, 6))
    assert T[0, 1].tolist() == [0, .5, .5, 0, 0, 0] and T[0, 5].tolist() == [0, 0, 0, 0, 0, 1]
    r = own_object_mass(T, g)
    assert r["own_mass"] == 1.0 and abs(r["own_share"] - (2 / 6 * 2 + 1 / 6) / 3) < 1e-6
    r = own_object_mass(torch.ones(1, 6, 6), g)                  # uniform rows: mass = area share
    assert abs(r["own_mass"] - r["own_share"]) < 1e-6
    A = torch.zeros(1, 1, 7, 7)
    A[0, 0, 1:, 1:] = T[0]
    assert grouping_kl(A, T).item() < 1e-6
    A[0, 0, 1:, 0] = 0.5
    A[0, 0, 1:, 1:] *= 0.5                                       # half of every row on the CLS token
    assert abs(grouping_kl(A, T).item() - torch.log(torch.tensor(2.0)).item()) < 1e-5
