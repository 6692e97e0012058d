"""Recomputation on the transformer jobs' models (docs/ARCHITECTURE.md, methods): plain training
of the last 2 blocks with both recomputed trains exactly as plain training does, and its
predicted peak is below ASI's on those blocks, where plain training of them is over it.

    pytest tests/test_recompute_transformers.py -s -m slow    # prints the table (a few minutes)

Peaks depend on shapes only: random weights serve. The shapes are the jobs' (ViT: vit_tiny,
batch 128 at 32 px, 5 classes; LM: tiny_llama, 16 x 128 tokens); ASI at the ranks HOSVD_eps(0.9)
gave the jobs' layer inputs."""

import copy

import pytest
import torch

from autorank.cost import predict_peak_training_bytes, train_step_flops
from autorank.models import transformer_blocks, vit_tiny
from autorank.plan import Choice, Plan, apply_plan, candidate_layers

MB = 2**20


def _vit():
    torch.manual_seed(0)
    return vit_tiny(num_classes=5, in_channels=3, image_size=32).train(), torch.zeros(128, 3, 32, 32), "class", [17, 7, 5]


def _llm():
    pytest.importorskip("transformers")
    from autorank.models import tiny_llama

    torch.manual_seed(0)
    return tiny_llama().train(), torch.zeros(16, 128, dtype=torch.long), "token", [14, 79, 21]


def _plan(model, k: int, asi_ranks=None, recompute: int = 0) -> Plan:
    """Every linear layer of the last k blocks plainly (or ASI at asi_ranks), the head plainly,
    the last `recompute` blocks recomputed."""
    blocks = transformer_blocks(model)
    layers = {n: Choice.asi(asi_ranks) if asi_ranks else Choice.full() for _, ns in blocks[-k:] for n in ns}
    rc = {b: Choice.recompute() for b, _ in blocks[len(blocks) - recompute:]} if recompute else {}
    return Plan(layers | {candidate_layers(model)[-1]: Choice.full()} | rc)


@pytest.mark.slow
@pytest.mark.parametrize("setup", [_vit, _llm], ids=["vit", "llm"])
def test_recomputed_blocks_fit_where_asi_does(setup):
    model, x, loss, ranks = setup()
    rows = {
        "full@k2": _plan(model, 2), "asi@k2": _plan(model, 2, ranks),
        "full@k2 + recompute both": _plan(model, 2, recompute=2),
        "asi@k2 + recompute both": _plan(model, 2, ranks, recompute=2),
        "full@k4 + recompute all": _plan(model, 4, recompute=4),
    }
    peak = {k: predict_peak_training_bytes(model, x, p, loss=loss).total_bytes for k, p in rows.items()}
    flops = {k: train_step_flops(model, x, p) for k, p in rows.items()}
    for k in rows:
        print(f"\n| {setup.__name__[1:]} | {k} | {peak[k] / MB:.2f} | {flops[k] / 1e9:.2f} |")
    budget = peak["asi@k2"]  # the equal-budget line: what ASI of the 2 blocks needs
    assert peak["full@k2"] > budget
    assert peak["full@k2 + recompute both"] < budget
    assert peak["full@k4 + recompute all"] < budget  # even every block, recomputed
    assert peak["asi@k2 + recompute both"] <= peak["full@k2 + recompute both"]
    assert flops["full@k2"] < flops["full@k2 + recompute both"] < flops["full@k4 + recompute all"]


def test_recomputed_training_is_plain_training():
    """Five SGD steps, dropout on: the same weights to the bit, recomputed or not."""
    base, _, _, _ = _vit()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(5)]
    states = []
    for rc in (0, 2):
        m = apply_plan(copy.deepcopy(base), _plan(base, 2, recompute=rc))
        torch.manual_seed(1)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        states.append(m.state_dict())
    plain, recomputed = states
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
