"""Training in channels-last layout (trainer.channels_last, on by default on CPU): the same
loss, gradients and saved bytes as the default layout, ASI and lean companions included."""

import copy

import pytest
import torch
import torch.nn.functional as F

from autorank.cost import measure_saved_bytes, predict_saved_bytes
from autorank.models import mcunet_like
from autorank.plan import Choice, Plan, apply_plan, candidate_layers, finetune_mode
from autorank.workload.module import PlanModule, to_layout, use_channels_last


def plans(model):
    c = candidate_layers(model)
    return {
        "plain every layer": Plan({n: Choice.full() for n in c}),
        "asi first 4, rest full": Plan({**{n: Choice.asi([2, 4, 6, 6]) for n in c[:4]},
                                        **{n: Choice.full() for n in c[4:]}}),
        "asi keep-batch late": Plan({**{n: Choice.asi([2, 3, 2, 2]) for n in c[-5:-1]}, c[-1]: Choice.full()}),
    }


@pytest.mark.parametrize("kind", ["plain every layer", "asi first 4, rest full", "asi keep-batch late"])
def test_channels_last_step_matches_the_default_layout(kind):
    torch.manual_seed(0)
    base = finetune_mode(mcunet_like(num_classes=5, width_mult=0.25), True)
    x, y = torch.randn(2, 3, 24, 24), torch.randint(0, 5, (2,))
    plan = plans(base)[kind]
    out = {}
    for cl in (False, True):
        m = apply_plan(copy.deepcopy(base), plan)
        mod = PlanModule(m, channels_last=cl)
        xb = to_layout(x, cl)
        assert xb.is_contiguous(memory_format=torch.channels_last) == cl
        saved = measure_saved_bytes(lambda: mod(xb), m).activation_bytes
        torch.manual_seed(1)  # the same dropout mask in both layouts
        loss = F.cross_entropy(mod(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        out[cl] = (float(loss.detach()), grads, saved)
    (l0, g0, s0), (l1, g1, s1) = out[False], out[True]
    assert abs(l0 - l1) < 1e-5  # fp32: the layouts sum in different orders
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5)
    assert s0 == s1 == predict_saved_bytes(base, x, plan).activation_bytes


def test_channels_last_setting():
    assert use_channels_last("auto", "cpu") and not use_channels_last("auto", "gpu")
    assert use_channels_last(True, "gpu") and not use_channels_last(False, "cpu")
    with pytest.raises(ValueError, match="channels_last"):
        use_channels_last("yes", "cpu")
    x2 = torch.randn(3, 4)
    assert to_layout(x2, True) is x2  # 2-D features (a linear-only suffix) stay as they are
