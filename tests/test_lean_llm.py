"""Lean companions in a language model's trained region (autorank.shortcut.lean_llm): the SwiGLU
product keeps gate(x) and up(x), not silu(gate(x)) too; gradients equal autograd's (fp64), bytes
predicted = measured, apply / remove exact. And why there is no lean RMSNorm (measured)."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import torch
from torch import nn

from autorank.cost import measure_saved_bytes, predict_saved_bytes
from autorank.cost.loss import logits_of
from autorank.models import transformer_blocks
from autorank.plan import Choice, Plan, apply_plan, candidate_layers, remove_plan
from autorank.shortcut import ASILinear, FrozenLinear, LeanSwiGLU, LoRALinear, swiglu

transformers = pytest.importorskip("transformers")

DT = torch.float64
B, L, D, I = 3, 7, 16, 24


def mlp_of(cls_name: str) -> nn.Module:
    """A Hugging Face SwiGLU MLP (width 16, intermediate 24), fp64, random weights."""
    configs = {"LlamaMLP": ("llama", transformers.LlamaConfig, {"mlp_bias": True}),
               "MistralMLP": ("mistral", transformers.MistralConfig, {}),
               "Qwen2MLP": ("qwen2", transformers.Qwen2Config, {})}
    family, config_cls, extra = configs[cls_name]
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    return getattr(module, cls_name)(config_cls(hidden_size=D, intermediate_size=I, num_attention_heads=2, num_key_value_heads=2,
                                                 hidden_act="silu", **extra)).to(DT)


def with_parts(mlp: nn.Module, kind: str) -> nn.Module:
    """The MLP with its projections as a plan would make them (weights kept), every parameter
    random (LoRA's B starts at 0: its A would get no gradient)."""
    wrap = {"plain": lambda m: m, "frozen": FrozenLinear, "asi": lambda m: ASILinear(m, [2, 4, 8]),
            "lora": lambda m: LoRALinear(m.requires_grad_(False), 3),
            "lora_asi": lambda m: LoRALinear(m.requires_grad_(False), 3, asi_ranks=[2, 4, 8])}
    kinds = {"mixed": ("frozen", "lora", "asi")}.get(kind, (kind,) * 3)
    for name, k in zip(("gate_proj", "up_proj", "down_proj"), kinds):
        if k == "frozen":
            getattr(mlp, name).requires_grad_(False)
        setattr(mlp, name, wrap[k](getattr(mlp, name)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / p.shape[-1] ** 0.5)
    return mlp


def step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and the trained parameters' gradients of one backward."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * gy).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("cls_name", ["LlamaMLP", "MistralMLP", "Qwen2MLP"])
@pytest.mark.parametrize("kind", ["plain", "frozen", "asi", "lora", "lora_asi", "mixed"])
def test_lean_swiglu_gradients_are_autograds(cls_name, kind):
    plain = with_parts(mlp_of(cls_name), kind)
    lean = LeanSwiGLU(copy.deepcopy(plain))
    g = torch.Generator().manual_seed(2)
    x, gy = torch.randn(B, L, D, generator=g, dtype=DT), torch.randn(B, L, D, generator=g, dtype=DT)
    want, got = step(plain, x, gy), step(lean, x, gy)
    assert len(got) == len(want) >= 2 + (0 if kind == "frozen" else 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(w.abs().max() > 1e-3 for w in want[1:])  # every gradient compared is really there


@pytest.mark.parametrize("needs", ["gate", "up", "both"])
def test_swiglu_keeps_gate_and_up_not_silu(needs):
    """The plain product keeps silu(gate) and up (SiLU also gate): three tensors when both need a
    gradient. swiglu keeps gate and up; when only up needs one, it is the plain product."""
    gate, up = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    gate.requires_grad_(needs in ("gate", "both"))
    up.requires_grad_(needs in ("up", "both"))
    one = gate.numel() * 4

    def plain():
        return torch.nn.functional.silu(gate * 1) * (up * 1)

    def lean():
        return swiglu(gate * 1, up * 1)

    want = {"gate": 2 * one, "up": one, "both": 3 * one}[needs]
    assert measure_saved_bytes(plain).activation_bytes == want
    assert measure_saved_bytes(lean).activation_bytes == (one if needs == "up" else 2 * one)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(gate, up[:, :1])


def test_rms_norm_with_a_frozen_weight_keeps_its_input_and_rstd_only():
    """Why no lean RMSNorm: inside a trained region its weight is frozen, and Hugging Face's
    LlamaRMSNorm then keeps x (float32: x.to(float32) is x) and rstd, all a custom Function would
    keep; only a trained weight adds the normalised x."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(D)
    x = torch.randn(B, L, D, requires_grad=True)
    x_bytes, rstd_bytes = B * L * D * 4, B * L * 4
    for trained, want in ((False, x_bytes + rstd_bytes), (True, 2 * x_bytes + rstd_bytes)):
        norm.requires_grad_(trained)
        assert measure_saved_bytes(lambda: norm(x), norm).activation_bytes == want
        assert predict_saved_bytes(norm, x).activation_bytes == want


def llama(layers=2):
    torch.manual_seed(0)
    from autorank.models import tiny_llama

    return tiny_llama(hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=2)


def plans(model) -> dict[str, Plan]:
    q, k, v, o, gate, up, down = transformer_blocks(model)[-1][1]
    head, block = candidate_layers(model)[-1], [q, k, v, o, gate, up, down]
    return {
        "full": Plan({n: Choice.full() for n in block + [head]}),
        "asi": Plan({n: Choice.asi([2, 4, 8]) for n in block} | {head: Choice.full()}),
        "lora_asi": Plan({n: Choice.lora(2, [2, 4, 8]) for n in block} | {head: Choice.full()}),
        "mixed": Plan({q: Choice.full(), up: Choice.lora(2), down: Choice.asi([2, 4, 8]), head: Choice.full()}),
        "from_up": Plan({up: Choice.full(), down: Choice.full(), head: Choice.full()}),  # gate outside
    }


@pytest.mark.parametrize("kind", ["full", "asi", "lora_asi", "mixed", "from_up"])
def test_llama_plans_lean_mlp_bytes_and_gradients(kind):
    """On tiny_llama (fp64): the lean plan's gradients equal the same plan's without lean
    companions; its saved bytes are predicted to the byte and are one (B, L, I) tensor less."""
    base = llama().to(DT).train()
    plan = plans(base)[kind]
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mlp = transformer_blocks(base)[-1][0] + ".mlp"
    runs = {}
    for lean in (True, False):
        p = dataclasses.replace(plan, lean=lean)
        model = apply_plan(copy.deepcopy(base), p)
        assert isinstance(model.get_submodule(mlp), LeanSwiGLU) == (lean and kind != "from_up")
        measured = measure_saved_bytes(lambda: logits_of(model(x)), model).activation_bytes
        predicted = predict_saved_bytes(base, x, p)
        assert predicted.unknown_ops == [] and predicted.activation_bytes == measured
        logits_of(model(x)).square().mean().backward()
        runs[lean] = measured, {n: q.grad for n, q in model.named_parameters() if q.requires_grad}
    intermediate = 2 * 9 * 48 * 8  # silu(gate(x)), fp64
    assert runs[False][0] - runs[True][0] == (0 if kind == "from_up" else intermediate)
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[True][1]) >= 3
    for name, grad in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], grad, rtol=1e-10, atol=1e-10, msg=name)


def test_apply_remove_restore_the_mlp_exactly():
    """Names resolve through the lean MLP (plan names, transformer_blocks, the state dict's keys);
    remove_plan puts back the very modules, in the mode the model was last set to."""
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    blocks, names = transformer_blocks(model), candidate_layers(model)
    plan = plans(model)["mixed"]
    apply_plan(model, plan)
    mlp = model.get_submodule(blocks[-1][0] + ".mlp")
    assert isinstance(mlp, LeanSwiGLU) and mlp.get_base_layer() is modules[blocks[-1][0] + ".mlp"]
    assert isinstance(mlp.up_proj, LoRALinear) and isinstance(mlp.down_proj, ASILinear)
    assert isinstance(mlp.gate_proj, FrozenLinear)  # frozen, inside the region
    assert transformer_blocks(model) == blocks and candidate_layers(model) == names
    assert not any(".mlp.base_layer." in k for k in model.state_dict())  # the MLP's weights listed once
    model.eval()
    remove_plan(model)
    assert all(m is modules[n] for n, m in model.named_modules()) and len(dict(model.named_modules())) == len(modules)
    assert not any(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
