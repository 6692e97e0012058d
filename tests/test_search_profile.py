"""Profile: HOSVD_eps ranks (tucker's), sensitivity against an exact backward, cache reuse; the
one cached cost predictor."""

import torch
from torch import nn

from autorank.cost import predict_peak_training_bytes, train_step_flops
from autorank.search.cost import PlanCost, peak_parts, plan_key
from autorank.search.profile import Profile, hosvd_reconstruct, mode_svds, profile_layers
from autorank.search.space import SearchSpace
from autorank.shortcut.tucker import hosvd_ranks


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_mode_svds_and_reconstruction_are_tuckers():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    svds = mode_svds(x)
    for n, (s, u) in enumerate(svds):  # the singular values of the unfolding, descending
        ref = torch.linalg.svdvals(x.movedim(n, 0).reshape(x.shape[n], -1).double())
        assert torch.allclose(s, ref, rtol=1e-9, atol=1e-9)
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-9)
    assert torch.allclose(hosvd_reconstruct(x, svds, [4, 3, 5, 5]), x, atol=1e-6)
    xr = hosvd_reconstruct(x, svds, [2, 3, 5, 5])  # rank 2 over the batch mode
    assert torch.linalg.matrix_rank(xr.reshape(4, -1)) == 2
    # the best rank-2 approximation of the batch unfolding (Eckart-Young): its error is the tail
    err = float((xr - x).reshape(4, -1).norm() ** 2)
    assert abs(err - float((svds[0][0][2:] ** 2).sum())) < 1e-4 * err


def test_profile_sensitivity_against_exact_backward(tmp_path):
    model = tiny()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    space = SearchSpace(name="t", last=2, levels=(0.5, 0.8, 1.0))
    prof = profile_layers(model, batches, space, key="k1", cache_path=tmp_path / "p.json",
                          progress=False)
    assert prof.layer_names == ["2", "6"]
    conv = prof.layer("2")
    assert conv.input_shape == [8, 6, 8, 8] and conv.kind == "conv"
    # the ranks are HOSVD_eps ranks as the HOSVD layer computes them, the max over the batches
    inputs = []
    h = model[2].register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
    for x, _ in batches:
        model(x)
    h.remove()
    for eps in (0.5, 0.8, 1.0):
        want = [max(r) for r in zip(*(hosvd_ranks(x, eps) for x in inputs))]
        assert conv.ranks[f"asi@{eps:g}"] == want
    assert conv.ranks["asi@1"] == [8, 6, 8, 8]
    assert conv.sensitivity["full"] == 0.0
    assert conv.sensitivity["asi@1"] < 1e-4  # full ranks: the exact gradient
    assert 0 < conv.sensitivity["asi@0.8"] < conv.sensitivity["asi@0.5"] < conv.sensitivity["frozen"]
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


def test_plan_cost_is_autorank_cost_keyed_by_the_trained_choices():
    model = tiny().train()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))]
    space = SearchSpace(name="t", last=2, levels=(0.5,))
    prof = profile_layers(model, batches, space, progress=False)
    x = torch.zeros(8, 3, 8, 8)
    cost = PlanCost(model, x, prof)
    ch = {"2": "asi@0.5", "6": "full"}
    plan = prof.to_plan(ch)
    # the search's peak is the process's training peak: the tensors and the kernels' scratch
    direct = predict_peak_training_bytes(model, x, plan)
    assert cost.peak(ch).total_bytes == direct.training_bytes and cost.peak(ch).kernel_bytes == 0
    assert cost.peak(ch).transient_bytes == direct.transient_bytes + direct.kernel_bytes
    assert cost.peak(ch).activation_bytes == direct.activation_bytes
    assert cost.flops(ch) == train_step_flops(model, x, plan)
    # frozen layers named or left out: the same plan, one cache entry
    assert plan_key({"2": "frozen", "6": "full"}) == plan_key({"6": "full"})
    assert cost.peak({"2": "frozen", "6": "full"}) is cost.peak({"6": "full"})
    assert len(cost.peaks) == 2
    total, transient = peak_parts(cost.peak(ch))
    assert total == cost.peak(ch).total_bytes and transient == cost.peak(ch).transient_bytes
    assert peak_parts(123) == (123, 0)


def test_a_profile_with_blocks_reads_back_from_its_cache():
    """Blocks offered for recomputation are profile items too: the cache takes them back instead
    of calling the file damaged (which re-profiled every run of the default space)."""
    import dataclasses

    from autorank.search.profile import block_profile

    layer = block_profile("features.2")
    prof = Profile(key="k", layers=[dataclasses.replace(layer, name="a"), layer], space={"name": "s"})
    assert Profile.from_json(prof.to_json()) == prof
