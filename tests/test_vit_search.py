"""The search on transformers: profiling linear layers on (B, L, D) inputs, the LoRA choice keys
(lora@r, lora@r+asi@level) and the plans they map to, and the ViT's cut (no frozen prefix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autorank.errors import ConfigError
from autorank.models import replace_head, split_at_first_trained, vit_tiny
from autorank.plan import Choice, apply_plan, remove_plan
from autorank.search.gradients import hosvd_reconstruct, lowrank_grad, mode_svds, weight_grad
from autorank.search.profile import level_ranks, profile_layers
from autorank.search.space import SearchSpace, lora_key, parse_choice_key, parse_lora_key
from autorank.shortcut import LoRALinear

B, L, D, OUT = 6, 5, 12, 7


def tucker_tensor(ranks, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*ranks, generator=g, dtype=torch.float64)
    for n, (r, s) in enumerate(zip(ranks, shape)):
        u = torch.randn(s, r, generator=g, dtype=torch.float64)
        x = torch.movedim(torch.tensordot(u, x, dims=([1], [n])), 0, n)
    return x


def test_weight_grad_on_sequences_sums_over_batch_and_length():
    torch.manual_seed(0)
    lin = nn.Linear(D, OUT).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    gy = torch.randn(B, L, OUT, dtype=torch.float64)
    lin(x).backward(gy)
    g = weight_grad(lin, x, gy)
    assert torch.allclose(g, lin.weight.grad, atol=1e-12)
    # the same by hand: sum over b and l of gy[b, l] x[b, l]^T
    assert torch.allclose(g, torch.einsum("blo,bld->od", gy, x), atol=1e-12)


def test_ranks_of_a_low_rank_sequence_input_per_mode():
    x = tucker_tensor((2, 3, 4), (B, L, D))
    svds = mode_svds(x)
    assert [len(s) for s, _ in svds] == [B, L, D]
    ranks = level_ranks([svds], x.shape, [0.999999])
    assert ranks["asi@0.999999"] == [2, 3, 4]
    assert ranks["asi@0.999999:b"] == [B, 3, 4]
    # at those ranks the HOSVD reconstruction is exact, so is the weight gradient
    xr = hosvd_reconstruct(x, svds, [2, 3, 4])
    assert torch.allclose(xr, x, atol=1e-9)
    lin = nn.Linear(D, OUT).double()
    gy = torch.randn(B, L, OUT, dtype=torch.float64)
    assert torch.allclose(weight_grad(lin, xr, gy), weight_grad(lin, x, gy), atol=1e-9)
    # one rank fewer on the token mode loses part of the input
    assert float((hosvd_reconstruct(x, svds, [2, 2, 4]) - x).norm()) > 1e-3


def test_lowrank_grad_is_the_best_rank_r_approximation():
    g = torch.randn(OUT, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(g)
    assert torch.allclose(lowrank_grad(g, OUT), g, atol=1e-10)  # full rank: exact
    for r in (1, 3):
        err = float((lowrank_grad(g, r) - g).norm())
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-9)
        assert torch.linalg.matrix_rank(lowrank_grad(g, r)) == r


def test_lora_choice_keys():
    sp = SearchSpace(name="t", last=2, choices=("frozen", "full", "lora", "lora_asi"), levels=(0.9,),
                     lora_ranks=(4, 8))
    assert sp.layer_choices("x") == ["frozen", "full", "lora@4", "lora@8", "lora@4+asi@0.9", "lora@8+asi@0.9"]
    assert parse_lora_key("lora@8+asi@0.9") == (8, 0.9) and parse_lora_key(lora_key(4)) == (4, None)
    assert parse_choice_key("lora@4") == ("lora", None) and parse_choice_key("lora@4+asi@0.9") == ("lora", 0.9)
    for bad in ("lora@", "lora@0", "lora@4+x@1", "lora4"):
        with pytest.raises(ConfigError):
            parse_choice_key(bad)
    with pytest.raises(ConfigError):
        SearchSpace(name="t", last=2, choices=("lora",), lora_ranks=(0,))
    d = sp.to_dict()
    assert d["lora_ranks"] == [4, 8] and SearchSpace.from_dict(d) == sp
    # spaces without LoRA keep their dict (and so their sha: cached profiles and studies)
    assert "lora_ranks" not in SearchSpace(name="t", last=2).to_dict()
    assert SearchSpace.load("vit").uses_lora


def tiny_vit():
    torch.manual_seed(0)
    vit = vit_tiny(num_classes=3, image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                   mlp_dim=32)
    return replace_head(vit, 3).train()  # torchvision zero-initialises the head: no gradient below it


def test_profile_a_vit_lora_sensitivity_and_plans():
    model = tiny_vit()
    names = ["conv_proj", "encoder.layers.encoder_layer_0.self_attention.v_proj",
             "encoder.layers.encoder_layer_0.mlp.3", "heads.head"]
    sp = SearchSpace(name="t", layers=tuple(names), choices=("frozen", "full", "asi", "lora", "lora_asi"),
                     levels=(0.9,), lora_ranks=(1, 16))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    prof = profile_layers(model, batches, sp, progress=False)
    conv, v, mlp, head = (prof.layer(n) for n in names)
    assert conv.input_shape == [4, 3, 16, 16] and not any(c.startswith("lora") for c in conv.choices)
    assert v.input_shape == [4, 5, 16] and mlp.input_shape == [4, 5, 32]  # (B, L, D): 4 patches + class
    assert len(v.ranks["asi@0.9"]) == 3 and v.ranks["lora@1+asi@0.9"] == v.ranks["asi@0.9"]
    assert head.choices == ["full"]
    for lp in (v, mlp):
        s = lp.sensitivity
        assert s["lora@16"] < 1e-6 * s["frozen"]  # rank 16 >= min(out, in) of v_proj (16 x 16): exact
        assert 0 < s["lora@1"] < s["frozen"]
        # LoRA at full rank + ASI: the ASI choice's error alone
        assert s["lora@16+asi@0.9"] == pytest.approx(s["asi@0.9"], rel=1e-4, abs=1e-9)
    plan = prof.to_plan({names[1]: "lora@1", names[2]: "lora@16+asi@0.9", "heads.head": "full"})
    assert plan.layers[names[1]] == Choice.lora(1)
    assert plan.layers[names[2]] == Choice.lora(16, mlp.ranks["asi@0.9"])
    x = batches[0][0]
    ref = model(x)
    apply_plan(model, plan)
    assert isinstance(model.get_submodule(names[1]), LoRALinear)
    assert torch.allclose(model(x), ref, atol=1e-6)  # B starts at zero: the model is unchanged
    remove_plan(model)
    assert type(model.get_submodule(names[1])) is nn.Linear


def test_vit_cut_has_no_frozen_prefix():
    """torchvision's VisionTransformer is no Sequential of blocks: the workload cannot cut it, the
    whole model is the trained suffix and the 'features' it caches are the input images."""
    model = tiny_vit().eval()
    prefix, suffix = split_at_first_trained(model, ["heads.head"])
    assert len(prefix) == 0 and len(suffix) == 1
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(suffix(x), model(x))
    assert F.cross_entropy(suffix(x), torch.tensor([0, 1])).isfinite()


# A 1-block ViT on 16 px digits: the whole job (pretraining, profile, search with LoRA and ASI
# choices, refit, front, export) and the device runner on the exported plan.
VIT_SMALL = ["model=vit_tiny", "data=digits_vit", "data.input_size=16", "data.batch_size=32",
             "model.build.patch_size=8", "model.build.num_layers=1", "model.build.num_heads=2",
             "model.build.hidden_dim=16", "model.build.mlp_dim=32", "trainer.pretrain_epochs=1",
             "trainer.steps=4", "space=vit", "space.last=7", "space.lora_ranks=[2]", "space.levels=[0.9]",
             "search.trial_steps=3", "search.n_trials=6", "search.refit_top=1", "~tracking"]


@pytest.mark.slow
def test_cli_vit_end_to_end_and_device_runner(tmp_path):
    import os
    import subprocess
    import sys

    import optuna

    from autorank.plan import Plan
    from autorank.workload.data import DigitsData

    env = {**os.environ, "AUTORANK_ROOT": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", *VIT_SMALL,
                        f"export.path={tmp_path}/plan.yaml"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert len([t for t in study.trials if t.state.is_finished()]) == 6
    keys = {c for t in study.trials for c in t.user_attrs["autorank"]["choices"].values()}
    assert keys & {"lora@2", "lora@2+asi@0.9", "asi@0.9"}, keys  # the warm starts try ASI
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.layers["heads.head"].kind == "full"
    assert all(n.startswith(("encoder.layers.encoder_layer_0.", "heads.")) for n in plan.layers)
    # the device runner: the plan, the cached base checkpoint, downstream digits at 16 px
    (ckpt,) = (tmp_path / ".cache" / "autorank" / "checkpoints").glob("vit_tiny-*.pt")
    data = DigitsData(input_size=16, batch_size=32, downstream_shift="invert")
    (x, y), (xv, yv) = (next(iter(data.loader("downstream", part, batch_size=64))) for part in ("train", "val"))
    torch.save({"x": x, "y": y, "x_val": xv, "y_val": yv}, tmp_path / "data.pt")
    r = subprocess.run([sys.executable, "-m", "autorank.device", str(tmp_path / "plan.yaml"), str(ckpt),
                        str(tmp_path / "data.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(+0.00%)" in r.stdout and "validation accuracy" in r.stdout
