"""Exact bytes for transformer blocks: predicted == measured, to the byte, on the tiny ViT and the
Hugging Face Llama (CPU, fp32): the saved tensors (saved_tensors_hooks) and the live bytes of each
phase of a training step (autorank.cost.live), for plain, head-only, full, ASI, keep-batch ASI,
LoRA, LoRA + ASI and mixed plans. Also the attention rule by hand."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autorank.cost import measure_saved_bytes, predict_peak_training_bytes, predict_saved_bytes
from autorank.cost.attention import CpuAttention
from autorank.cost.live import measure_peak_training
from autorank.cost.loss import label_shape, logits_of, training_loss
from autorank.models import transformer_blocks, vit_tiny
from autorank.plan import Choice, Plan, apply_plan, candidate_layers, remove_plan
from autorank.shortcut import LeanSwiGLU

B = 2


@functools.cache
def built(name):
    torch.manual_seed(0)
    if name == "vit":
        return vit_tiny(num_layers=2)  # 32 px, patches of 8: L = 17 tokens, width 128
    pytest.importorskip("transformers")
    from autorank.models import tiny_llama

    return tiny_llama(num_layers=2, num_kv_heads=2 if name == "llama_gqa" else None)  # width 128, vocab 256


def batch(name):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g), "class"
    return (torch.randint(0, 256, (B, 32), generator=g), torch.randint(0, 256, (B, 32), generator=g), "token")


def make_plan(model, kind):
    blocks = [linears for _, linears in transformer_blocks(model)]
    block, head = blocks[-1], candidate_layers(model)[-1]  # the last block's linear layers, the head
    lm = hasattr(model, "config")  # the LM's head sees (B, L, D), the ViT's (B, D): the class token
    head_asi = Choice.asi([2, 8, 16] if lm else [2, 16])
    prev = blocks[-2]
    return {
        "plain": None,
        "head": Plan({head: Choice.full()}),
        "last_block_full": Plan({n: Choice.full() for n in block + [head]}),
        "last_block_asi": Plan({n: Choice.asi([2, 8, 16]) for n in block} | {head: Choice.full()}),
        "last_block_asi_keep_batch": Plan({n: Choice.asi([B, 8, 16]) for n in block} | {head: head_asi}),
        "lora": Plan({n: Choice.lora(4) for n in block} | {head: Choice.full()}),
        "lora_asi": Plan({n: Choice.lora(4, [2, 8, 16]) for n in block} | {head: Choice.full()}),
        "mixed_two_blocks": Plan({prev[0]: Choice.lora(2), prev[2]: Choice.asi([1, 4, 8]), prev[-1]: Choice.full(),
                                  block[1]: Choice.lora(4, [B, 4, 32]), block[-1]: Choice.asi([2, 16, 16]),
                                  head: Choice.full()}),
    }[kind]


KINDS = ["plain", "head", "last_block_full", "last_block_asi", "last_block_asi_keep_batch", "lora", "lora_asi",
         "mixed_two_blocks"]
CASES = [(m, k, "sgd") for m in ("vit", "llama") for k in KINDS]
CASES += [("vit", "lora_asi", "adam"), ("llama", "last_block_asi", "adamw"), ("llama_gqa", "plain", "sgd"),
          ("llama_gqa", "lora_asi", "sgd")]


@pytest.mark.parametrize("model_name,kind,optimizer", CASES)
def test_predicted_bytes_equal_measured(model_name, kind, optimizer):
    model = copy.deepcopy(built(model_name)).train()
    x, y, loss = batch(model_name)
    plan = make_plan(model, kind)
    saved = predict_saved_bytes(model, x, plan)
    peak = predict_peak_training_bytes(model, x, plan, optimizer=optimizer, loss=loss)
    if plan is not None:
        apply_plan(model, plan)
    # the LM's plans that train a block run its MLP lean (the product keeps gate(x) and up(x))
    lean_mlp = model_name != "vit" and kind not in ("plain", "head")
    assert any(isinstance(m, LeanSwiGLU) for m in model.modules()) == lean_mlp
    measured = measure_saved_bytes(lambda: logits_of(model(x)), model)
    assert saved.unknown_ops == []
    assert saved.activation_bytes == measured.activation_bytes
    assert saved.input_saved == (plan is None)  # the first layer (patch conv, embedding) saves the batch
    live = measure_peak_training(model, x, y, optimizer=optimizer, loss=loss)
    assert (peak.forward_peak_bytes, peak.backward_peak_bytes, peak.step_peak_bytes) == (
        live.forward_peak_bytes, live.backward_peak_bytes, live.step_peak_bytes)
    assert live.peak_bytes <= peak.total_bytes


def test_compression_shows_in_the_bytes():
    """On the LM's last block: ASI saves less than full training of the same layers; LoRA saves
    about what full does (A needs the whole input), LoRA + ASI less than LoRA."""
    model = built("llama")
    x, _, _ = batch("llama")
    got = {k: predict_saved_bytes(model, x, make_plan(model, k)).activation_bytes
           for k in ("last_block_full", "last_block_asi", "lora", "lora_asi")}
    assert got["last_block_asi"] < got["last_block_full"]
    assert got["lora_asi"] < got["lora"]
    conv = {k: predict_saved_bytes(model, x, make_plan(model, k)).conv_input_bytes
            for k in ("last_block_full", "last_block_asi")}
    assert conv["last_block_asi"] < conv["last_block_full"] / 2


class Attend(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, x):  # x: (B, L, H * E) -> heads (B, H, L, E)
        b, l, d = x.shape
        q, k, v = (t.view(b, l, 4, d // 4).transpose(1, 2) for t in (x * 1, x * 2, x * 3))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)


def test_attention_rule_by_hand():
    x = torch.randn(3, 10, 16, requires_grad=True)
    got = predict_saved_bytes(Attend(), x)
    measured = measure_saved_bytes(lambda: Attend()(x))
    qkv_out = 4 * (3 * 10 * 16 * 4)  # q, k, v and the output, fp32
    lse = 3 * 4 * 10 * 4  # float32 log-sum-exp per (batch, head, query)
    assert got.activation_bytes == measured.activation_bytes == qkv_out + lse
    # with dropout the CPU runs the math path: not covered, and said so
    assert "scaled_dot_product_attention[math]" in predict_saved_bytes(Attend(0.5), x).unknown_ops


def test_meta_attention_takes_the_cpu_kernel():
    q = torch.randn(2, 4, 9, 8)
    cpu = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    m = q.to("meta").requires_grad_(True)
    with CpuAttention():
        meta = F.scaled_dot_product_attention(m, m, m, is_causal=True)
    assert meta.grad_fn.name() == "ScaledDotProductFlashAttentionForCpuBackward0"
    assert (meta.shape, meta.stride()) == (cpu.shape, cpu.stride())
    plain_meta = F.scaled_dot_product_attention(m, m, m, is_causal=True)
    assert plain_meta.grad_fn.name() != meta.grad_fn.name()  # what torch does on meta by itself


def test_token_loss_is_the_flattened_cross_entropy():
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert label_shape(logits.shape, "token") == (2, 5) and label_shape((4, 10), "class") == (4,)
    torch.testing.assert_close(training_loss(logits, labels, "token"),
                               F.cross_entropy(logits.reshape(10, 7), labels.reshape(10)))
    assert training_loss((logits[:, 0],), labels[:, 0]) == F.cross_entropy(logits[:, 0], labels[:, 0])
    with pytest.raises(ValueError):
        training_loss(logits, labels, "regression")


def test_peft_wrapped_llama_bytes_and_restore():
    """A peft-wrapped model takes plans like any other: peft's own LoRA layers alone (no plan),
    then a plan that compresses the input of peft's lora_A (ASI), trains lora_B, puts our
    LoRA + ASI on a layer peft left alone, and trains the head. Bytes exact; removal exact."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(built("llama")),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    x, y, loss = batch("llama")
    pre = "base_model.model.model.layers.1."
    plan = Plan({pre + "self_attn.q_proj.lora_A.default": Choice.asi([2, 8, 16]),
                 pre + "self_attn.q_proj.lora_B.default": Choice.full(),
                 pre + "self_attn.v_proj.lora_A.default": Choice.asi([B, 8, 16]),
                 pre + "self_attn.v_proj.lora_B.default": Choice.full(),
                 pre + "mlp.down_proj": Choice.lora(4, [2, 8, 16]), "base_model.model.lm_head": Choice.full()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in (None, plan):
        m = copy.deepcopy(model)
        saved = predict_saved_bytes(m, x, p)
        peak = predict_peak_training_bytes(m, x, p, loss=loss)
        if p is not None:
            apply_plan(m, p)
            assert sum(q.requires_grad for q in m.parameters()) == 7
        assert saved.unknown_ops == []
        assert saved.activation_bytes == measure_saved_bytes(lambda: logits_of(m(x)), m).activation_bytes
        live = measure_peak_training(m, x, y, loss=loss)
        assert (peak.forward_peak_bytes, peak.backward_peak_bytes, peak.step_peak_bytes) == (
            live.forward_peak_bytes, live.backward_peak_bytes, live.step_peak_bytes)
    apply_plan(model, plan)
    model(x)
    remove_plan(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_attention_flops_by_hand(meta):
    """The CPU attention kernel's FLOPs (the stock counter leaves them at 0), the same on the meta
    shadow (which runs the CPU's kernel) as on real tensors; the rest of Attend is elementwise."""
    from autorank.cost import train_step_flops
    from autorank.cost.meta import real_tensors_only

    x = torch.randn(3, 10, 16, requires_grad=True)
    b, h, s, d = 3, 4, 10, 4
    forward, backward = 2 * b * h * s * s * (d + d), 2 * b * h * s * s * (3 * d + 2 * d)
    if meta:
        assert train_step_flops(Attend(), x) == forward + backward
    else:
        with real_tensors_only():
            assert train_step_flops(Attend(), x) == forward + backward
