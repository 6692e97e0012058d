"""Transformer linear layers: ASI on (B, L, D) inputs, LoRA and LoRA + ASI (fp64 gradients),
the plan's LoRA choices, and apply/remove on the tiny ViT and the Hugging Face Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autorank.models import SelfAttention, transformer_blocks, vit_tiny
from autorank.plan import Choice, Plan, apply_plan, candidate_layers, remove_plan
from autorank.shortcut import ASILinear, FrozenLinear, LoRALinear, tucker_reconstruct

DT = torch.float64
B, L, D, OUT = 4, 12, 16, 10


def linear_and_input(seed=0, shape=(B, L, D)):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(shape[-1], OUT).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=DT))
        lin.bias.copy_(torch.randn(OUT, generator=g, dtype=DT))
    x = torch.randn(shape, generator=g, dtype=DT)
    gy = torch.randn(*shape[:-1], OUT, generator=g, dtype=DT)
    return lin, x, gy


def grads(module, x, gy, params):
    x = x.clone().requires_grad_(True)
    (module(x) * gy).sum().backward()
    out = [x.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("ranks", [[B, L, D], [B, 99, 99]], ids=["full", "clipped"])
def test_asi_linear_on_sequences_full_rank_gradients_are_autograds(ranks):
    lin, x, gy = linear_and_input()
    ref = grads(lin, x, gy, [lin.weight, lin.bias])
    asi = ASILinear(copy.deepcopy(lin), ranks)
    got = grads(asi, x, gy, [asi.base_layer.weight, asi.base_layer.bias])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ranks", [[2, 5, 6], [B, 5, 6], [B, L, 6]], ids=["all", "keep_batch", "features"])
def test_asi_linear_low_rank_gradient_is_the_gradient_on_the_reconstruction(ranks):
    lin, x, gy = linear_and_input(seed=1)
    asi = ASILinear(copy.deepcopy(lin), ranks).record_factors()
    xg = x.clone().requires_grad_(True)
    (asi(xg) * gy).sum().backward()
    x_hat = tucker_reconstruct(*asi.last_factors())
    assert x_hat.shape == x.shape and not torch.allclose(x_hat, x)  # really compressed
    ref = grads(lin, x_hat, gy, [lin.weight, lin.bias])
    torch.testing.assert_close(asi.base_layer.weight.grad, ref[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(asi.base_layer.bias.grad, ref[2])
    # grad_input stays exact: it needs only the weight
    torch.testing.assert_close(xg.grad, grads(lin, x, gy, [lin.weight])[0])
    # keep_batch: the batch mode has no factor; the saved bytes are the core and the other factors
    factors = asi.last_factors()[1]
    assert (factors[0] is None) == (ranks[0] == B)
    assert asi.saved_bytes(x.shape, DT) == 8 * (ranks[0] * ranks[1] * ranks[2] + sum(
        s * r for s, r in zip(x.shape, ranks) if r < s))


def explicit_lora(lin, a, b, scaling, x):
    """y = x W^T + bias + scaling * x A^T B^T, written out."""
    return x @ lin.weight.t() + lin.bias + scaling * (x @ a.t()) @ b.t()


def test_lora_is_lora_and_starts_as_the_base_layer():
    lin, x, gy = linear_and_input(seed=2)
    lin.requires_grad_(False)
    lora = LoRALinear(copy.deepcopy(lin), rank=3, alpha=6, seed=7).to(DT)
    torch.testing.assert_close(lora(x), lin(x))  # B starts at zero
    with torch.no_grad():
        lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(0))
    a, b = lora.lora_A.weight.detach(), lora.lora_B.weight.detach()
    assert lora.scaling == 2.0 and a.shape == (3, D) and b.shape == (OUT, 3)
    torch.testing.assert_close(lora(x), explicit_lora(lin, a, b, 2.0, x))
    torch.testing.assert_close(lora(x), F.linear(x, lin.weight + lora.delta_weight(), lin.bias))
    # gradients: A, B and the input, against autograd on the explicit formula
    a_ref, b_ref = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    (explicit_lora(lin, a_ref, b_ref, 2.0, xr) * gy).sum().backward()
    got = grads(lora, x, gy, [lora.lora_A.weight, lora.lora_B.weight])
    for g, r in zip(got, [xr.grad, a_ref.grad, b_ref.grad]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    # A's start comes from the seed, not the global RNG
    torch.manual_seed(123)
    again = LoRALinear(copy.deepcopy(lin), rank=3, alpha=6, seed=7).to(DT)
    assert torch.equal(again.lora_A.weight, LoRALinear(copy.deepcopy(lin), 3, 6, seed=7).to(DT).lora_A.weight)
    assert not torch.equal(again.lora_A.weight, LoRALinear(copy.deepcopy(lin), 3, 6, seed=8).to(DT).lora_A.weight)


def test_lora_asi_full_rank_equals_lora_and_low_rank_uses_the_reconstruction():
    lin, x, gy = linear_and_input(seed=3)
    lin.requires_grad_(False)
    plain = LoRALinear(copy.deepcopy(lin), rank=3, seed=1).to(DT)
    with torch.no_grad():
        plain.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    params = lambda m: [m.lora_A.base_layer.weight if m.asi_ranks else m.lora_A.weight, m.lora_B.weight]  # noqa: E731
    ref = grads(plain, x, gy, params(plain))
    full = LoRALinear(copy.deepcopy(lin), rank=3, asi_ranks=[B, L, D], seed=1).to(DT)
    full.lora_B.load_state_dict(plain.lora_B.state_dict())
    assert full.asi_ranks == [B, L, D] and isinstance(full.lora_A, ASILinear)
    for g, r in zip(grads(full, x, gy, params(full)), ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    low = LoRALinear(copy.deepcopy(lin), rank=3, asi_ranks=[B, 4, 5], seed=1).to(DT)
    low.lora_B.load_state_dict(plain.lora_B.state_dict())
    low.lora_A.record_factors()
    got = grads(low, x, gy, params(low))
    x_hat = tucker_reconstruct(*low.lora_A.last_factors())
    # A's gradient: LoRA's on the reconstructed input (the chain through B at the exact A x)
    gz = (gy @ plain.lora_B.weight.detach()) * plain.scaling  # dL/d(A x)
    torch.testing.assert_close(got[1], gz.reshape(-1, 3).t() @ x_hat.reshape(-1, D), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[0], ref[0])  # input and B gradients exact
    torch.testing.assert_close(got[2], ref[2])


def test_lora_choice_strings_and_plan_file_round_trip(tmp_path):
    assert str(Choice.lora(8)) == "lora[8]" and str(Choice.lora(8, [4, 64, 32])) == "lora[8]+asi[4,64,32]"
    for text in ("lora[8]", "lora[8]+asi[4,64,32]", "lora[1]+asi[1]"):
        assert str(Choice.parse(text)) == text
    assert Choice.parse("lora[8]+asi[4,64,32]") == Choice("lora", rank=8, ranks=(4, 64, 32))
    for bad in ("lora", "lora[]", "lora[0]", "lora[2,3]", "lora[8]+asi[]", "lora[8]+asi[0,1]"):
        with pytest.raises(ValueError):
            Choice.parse(bad)
    with pytest.raises(ValueError):
        Choice("asi", ranks=(2,), rank=3)
    plan = Plan({"a": Choice.lora(4), "b": Choice.lora(2, [2, 8, 16]), "c": Choice.asi([2, 8, 16])})
    for suffix in (".yaml", ".json"):
        assert Plan.load(plan.save(tmp_path / f"p{suffix}")).layers == plan.layers


def tiny_llama_model():
    transformers = pytest.importorskip("transformers")
    assert transformers
    from autorank.models import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4)


def vit_model():
    torch.manual_seed(0)
    return vit_tiny(num_layers=2, hidden_dim=32, mlp_dim=64)


def mixed_plan(model):
    q, k, v, o, up1, *_, down = transformer_blocks(model)[-1][1]
    return Plan({q: Choice.lora(4), k: Choice.lora(2, [2, 4, 8]), v: Choice.asi([2, 4, 8]), o: Choice.full(),
                 down: Choice.asi([2, 4, 8]), candidate_layers(model)[-1]: Choice.full()})


@pytest.mark.parametrize("make", [vit_model, tiny_llama_model], ids=["vit", "llama"])
def test_apply_and_remove_restore_transformers_exactly(make):
    model = make()
    names = candidate_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    plan = mixed_plan(model)
    apply_plan(model, plan)
    q, k, v, o, up1, *_, down = transformer_blocks(model)[-1][1]
    got = dict(model.named_modules())
    assert isinstance(got[q], LoRALinear) and got[q].asi_ranks is None
    assert isinstance(got[k], LoRALinear) and got[k].asi_ranks == [2, 4, 8]
    assert isinstance(got[v], ASILinear) and isinstance(got[down], ASILinear)
    assert got[o] is modules[o] and isinstance(got[up1], FrozenLinear)  # frozen inside the region: lean
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"{q}.lora_A.weight" in trained and f"{k}.lora_A.base_layer.weight" in trained
    assert f"{q}.base_layer.weight" not in trained and f"{o}.weight" in trained and f"{v}.base_layer.weight" in trained
    assert not any(n.startswith(names[0]) for n in trained)  # before the region: frozen
    model(example_input(model))  # runs
    remove_plan(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert all(m is modules[n] for n, m in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())


def example_input(model):
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return torch.randint(0, model.config.vocab_size, (2, 8))
    return torch.randn(2, 3, 32, 32)


def test_vit_attention_equals_torchvisions():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 7, 16)
    attn = SelfAttention.from_multihead(mha)
    torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])
    assert [n for n, m in attn.named_modules() if isinstance(m, nn.Linear)] == ["q_proj", "k_proj", "v_proj",
                                                                                 "out_proj"]
    with pytest.raises(ValueError):
        attn(x, x + 1, x)


def test_transformer_blocks_name_each_blocks_linear_layers():
    vit = vit_model()
    blocks = transformer_blocks(vit)
    assert [name for name, _ in blocks] == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert [n.rsplit(".", 2)[-2:] for n in blocks[1][1]] == [
        ["self_attention", "q_proj"], ["self_attention", "k_proj"], ["self_attention", "v_proj"],
        ["self_attention", "out_proj"], ["mlp", "0"], ["mlp", "3"]]
    apply_plan(vit, mixed_plan(vit))
    assert transformer_blocks(vit) == blocks  # a plan applied is seen through
    from autorank.models import mcunet_like

    assert transformer_blocks(mcunet_like()) == []  # no stack of blocks with linear layers


def test_wrappers_read_the_base_layers_weight():
    lin, _, _ = linear_and_input()
    for wrapper in (ASILinear(lin, [2, 3, 4]), FrozenLinear(lin), LoRALinear(lin, 2)):
        assert wrapper.weight is lin.weight and wrapper.bias is lin.bias
        assert "weight" not in dict(wrapper.named_parameters(recurse=False))
