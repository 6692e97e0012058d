"""Profile: HOSVD_eps ranks, sensitivity against an exact backward, cache reuse."""

import torch
from torch import nn

from autorank.search.profile import Profile, eps_rank, profile_layers, project, _mode_eig
from autorank.search.space import SearchSpace


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_eps_rank_and_projection():
    ev = torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64)
    assert [eps_rank(ev, e) for e in (0.5, 0.6, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3]
    x = torch.randn(4, 3, 5, 5)
    eig = [_mode_eig(x, m) for m in range(4)]
    assert torch.allclose(project(x, [v for _, v in eig], [4, 3, 5, 5]), x)
    xr = project(x, [v for _, v in eig], [2, 3, 5, 5])  # rank 2 over the batch mode
    assert torch.linalg.matrix_rank(xr.reshape(4, -1)) == 2


def test_profile_sensitivity_against_exact_backward(tmp_path):
    model = tiny()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    space = SearchSpace(name="t", last=2, levels=(0.5, 1.0))
    prof = profile_layers(model, batches, space, key="k1", cache_path=tmp_path / "p.json",
                          progress=False)
    assert prof.layer_names == ["2", "6"]
    conv = prof.layer("2")
    assert conv.input_shape == [8, 6, 8, 8] and conv.kind == "conv"
    assert conv.ranks["asi@1"] == [8, 6, 8, 8]
    assert all(r <= f for r, f in zip(conv.ranks["asi@0.5"], conv.ranks["asi@1"]))
    assert conv.sensitivity["full"] == 0.0
    assert conv.sensitivity["asi@1"] < 1e-4  # full ranks: the exact gradient
    assert 0 < conv.sensitivity["asi@0.5"] < conv.sensitivity["frozen"]
    # frozen = mean ||grad_W|| of an ordinary backward
    norms = []
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        norms.append(float(model[2].weight.grad.norm()))
    assert abs(conv.sensitivity["frozen"] - sum(norms) / 2) < 1e-4 * max(norms)
    # cache: the same key reads the file back, without touching the model
    again = profile_layers(None, batches, space, key="k1", cache_path=tmp_path / "p.json", progress=False)
    assert again == prof
    assert Profile.from_json(prof.to_json()) == prof
