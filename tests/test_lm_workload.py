"""The language model in the workload (model=tiny_llama, data=stdlib_licenses): the base keeps its
output layer, a trial's measured bytes and FLOPs equal the predictions, the profile's gradients
are the token loss's, and the peak at the configured sequence length is predicted to the byte."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from autorank.app import CONF_DIR  # noqa: E402
from autorank.cost import predict_peak_training_bytes, predict_saved_bytes, train_step_flops  # noqa: E402
from autorank.cost.live import measure_peak_training  # noqa: E402
from autorank.cost.loss import training_loss  # noqa: E402
from autorank.models import ModelSpec, tiny_llama, transformer_blocks  # noqa: E402
from autorank.plan import Choice, Plan, build_model_from_factory  # noqa: E402
from autorank.search.gradients import weight_grad  # noqa: E402
from autorank.search.profile import capture  # noqa: E402
from autorank.workload.device import DeviceProfile  # noqa: E402
from autorank.workload.textdata import TextData  # noqa: E402
from autorank.workload.workload import Paths, TrainerConfig, Workload  # noqa: E402

SEQ, BATCH = 16, 4
SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=64)


def corpus(tmp_path):
    up = tmp_path / "up"
    down = tmp_path / "down"
    up.mkdir()
    down.mkdir()
    code = "".join(f"def f{i}(x):\n    return x * {i} + self.y\n\n" for i in range(60))
    prose = "".join(f"Licence clause {i}: the work may be copied and shared under these terms.\n" for i in range(40))
    (up / "a.py").write_text(code)
    (down / "b.txt").write_text(prose)
    return TextData(upstream=[str(up / "*.py")], downstream=[str(down / "*.txt")], seq_len=SEQ,
                    batch_size=BATCH, max_bytes=None, val_fraction=0.2)


def workload(tmp_path):
    spec = ModelSpec(build=functools.partial(tiny_llama, **SMALL))
    trainer = TrainerConfig(steps=3, lr=0.1, pretrain_epochs=1, pretrain_batch_size=8)
    paths = Paths(root=str(tmp_path), output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    return Workload(DeviceProfile("dev", 1024, 0, 0, 1.0), spec, corpus(tmp_path), trainer, paths)


def last_block_plan(model):
    _, block = transformer_blocks(model)[-1]
    return Plan({**{n: Choice.lora(4, [2, 8, 16]) for n in block[:4]},
                 **{n: Choice.asi([2, 8, 16]) for n in block[4:]}, "lm_head": Choice.full()})


def test_lm_workload_base_trial_settings_and_device_runner(tmp_path, capsys):
    wl = workload(tmp_path)
    assert wl.loss == "token" and wl.input_shape == (BATCH, SEQ) and wl.num_classes == 256
    x = wl.example_input()
    assert x.dtype == torch.int64 and x.shape == (BATCH, SEQ)
    model = wl.model
    # the output layer is the pretrained one (same vocabulary): not replaced by a fresh head
    state = torch.load(wl.checkpoint_path, weights_only=True)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    stats = json.loads(wl.checkpoint_path.with_suffix(".json").read_text())
    assert stats["upstream_val_perplexity"] == pytest.approx(math.exp(stats["upstream_val_loss"]))
    assert stats["bn_recompute_batches"] == 0
    # the plan file's model: the factory's own kwargs, no num_classes; the device rebuilds it
    ft = wl.finetune_settings()
    assert "num_classes" not in ft.model_kwargs and ft.input_shape == (BATCH, SEQ)
    rebuilt = build_model_from_factory(ft.model_factory, ft.model_kwargs)
    rebuilt.load_state_dict(state)  # strict: the same parameter names and shapes
    was_training = model.training
    with torch.no_grad():  # and the same function: the base's logits, to the bit
        assert torch.equal(rebuilt.eval()(x).logits, model.eval()(x).logits)
    model.train(was_training)

    plan = last_block_plan(model)
    res = wl.finetune(plan, max_steps=3)
    assert res.extra["steps"] == 3 and 0.0 <= res.val_accuracy <= 1.0
    assert math.isfinite(res.val_loss) and res.val_loss == res.extra["val_loss"]
    assert res.measured_activation_bytes == predict_saved_bytes(model, x, plan).activation_bytes > 0
    assert res.measured_flops == train_step_flops(model, x, plan) > 0

    # the device runner on the exported plan: tokens in, next-token loss, the output layer kept
    from autorank.device.runner import main
    from autorank.search.planfile import export_plan

    plan.meta["finetune"] = ft.to_dict()
    export_plan(plan, tmp_path / "plan.yaml")
    (xt, yt), (xv, yv) = wl.data.tensors("downstream", "train"), wl.data.tensors("downstream", "val")
    torch.save({"x": xt, "y": yt, "x_val": xv, "y_val": yv}, tmp_path / "tokens.pt")
    out = tmp_path / "tuned.pt"
    capsys.readouterr()
    assert main([str(tmp_path / "plan.yaml"), str(wl.checkpoint_path), str(tmp_path / "tokens.pt"),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = res.measured_activation_bytes
    assert f"saved activations per step (batch {BATCH}, measured on the first step): measured {n:,} bytes, predicted {n:,} bytes" in text
    assert "output layer kept" in text and "validation next-token accuracy" in text and "perplexity" in text
    tuned = torch.load(out, weights_only=True)
    assert not torch.equal(tuned["lm_head.weight"], state["lm_head.weight"])  # trained from the checkpoint's
    assert torch.equal(tuned["model.embed_tokens.weight"], state["model.embed_tokens.weight"])  # frozen


def test_vocabulary_mismatch_is_a_config_error_before_pretraining(tmp_path):
    from autorank.errors import ConfigError

    wl = workload(tmp_path)
    wl.spec = ModelSpec(build=functools.partial(tiny_llama, **{**SMALL, "vocab_size": 128}))
    with pytest.raises(ConfigError, match="model.build.vocab_size=256"):
        wl.prepare(progress=False)
    assert not (tmp_path / "cache" / "checkpoints").exists()  # nothing pretrained


def test_profile_gradients_are_the_token_losses():
    torch.manual_seed(0)
    model = tiny_llama(**SMALL).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (BATCH, SEQ), generator=g), torch.randint(0, 256, (BATCH, SEQ), generator=g)
    name = "model.layers.1.mlp.down_proj"
    inputs, grads = capture(model, [name], x, y, loss="token")
    assert inputs[name].shape == (BATCH, SEQ, 64) and grads[name].shape == (BATCH, SEQ, 32)
    model.zero_grad()
    training_loss(model(x), y, "token").backward()
    mod = model.get_submodule(name)
    assert torch.allclose(weight_grad(mod, inputs[name], grads[name]), mod.weight.grad, atol=1e-6)


def test_peak_at_the_configured_sequence_length_equals_measured():
    """The job's shape (conf/data/stdlib_licenses.yaml: batch x seq_len) on the job's model
    (conf/model/tiny_llama.yaml): one LoRA + ASI plan's phase peaks predicted to the byte."""
    data = yaml.safe_load((CONF_DIR / "data" / "stdlib_licenses.yaml").read_text())
    kw = {k: v for k, v in yaml.safe_load((CONF_DIR / "model" / "tiny_llama.yaml").read_text())["build"].items()
          if not k.startswith("_")}
    torch.manual_seed(0)
    model = tiny_llama(**kw).train()
    g = torch.Generator().manual_seed(2)
    shape = (data["batch_size"], data["seq_len"])
    x, y = torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, shape, generator=g)
    plan = last_block_plan(model)
    peak = predict_peak_training_bytes(model, x, plan, loss="token")
    from autorank.plan import apply_plan

    live = measure_peak_training(apply_plan(model, plan), x, y, loss="token")
    assert (peak.forward_peak_bytes, peak.backward_peak_bytes, peak.step_peak_bytes) == (
        live.forward_peak_bytes, live.backward_peak_bytes, live.step_peak_bytes)
    assert live.peak_bytes <= peak.total_bytes


@pytest.mark.slow
def test_cli_llm_end_to_end_and_device_runner(tmp_path):
    """The whole job on a made-up corpus (tiny_llama of 2 blocks, width 32, windows of 16): pretraining,
    profile, 3 trials, refit, front, export; the exported plan applied with torch + transformers
    alone; the device runner on it."""
    import os
    import subprocess
    import sys

    import optuna

    from autorank.plan import apply_plan, load_base_weights, remove_plan
    from autorank.search.records import TrialRecord

    data = corpus(tmp_path)
    env = {**os.environ, "AUTORANK_ROOT": str(tmp_path)}
    args = ["model=tiny_llama", "data=stdlib_licenses", "space=llm", *[f"model.build.{k}={v}" for k, v in SMALL.items()],
            f"data.upstream=[{data.patterns['upstream'][0]}]", f"data.downstream=[{data.patterns['downstream'][0]}]",
            f"data.seq_len={SEQ}", "data.batch_size=8", "data.max_bytes=null", "data.val_fraction=0.2",
            "trainer.pretrain_epochs=1", "trainer.steps=4", "trainer.lr=0.1", "space.last=8", "space.lora_ranks=[2]",
            "space.levels=[0.9]", "search.trial_steps=3", "search.n_trials=3", "search.refit_top=1", "~tracking"]
    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", *args, f"export.path={tmp_path}/plan.yaml"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "val loss" in p.stdout and "perplexity" in p.stdout  # the front table, the exported plan's line
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    recs = [TrialRecord.from_frozen(t) for t in study.trials if t.state.is_finished()]
    assert len(recs) == 3
    done = [r for r in recs if r.state == "complete" and r.duplicate_of is None]
    assert done and all(0 < r.val_loss < 10 and 0 <= r.val_accuracy <= 1 for r in done)
    assert all(r.measured_activation_bytes == r.predicted_activation_bytes for r in done)
    refits = study.user_attrs["refit"]
    assert refits and all(math.isfinite(v["val_loss"]) and v["steps"] == 4 for v in refits.values())

    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.layers["lm_head"].kind == "full"
    assert all(n.startswith(("model.layers.1.", "lm_head")) for n in plan.layers)
    ft = plan.meta["finetune"]
    assert "num_classes" not in ft["model_kwargs"] and ft["input_shape"] == [8, SEQ]
    assert math.isfinite(plan.meta["refit_val_loss"]) and math.isfinite(plan.meta["val_loss"])
    # applies with torch + transformers alone; one step trains; remove_plan restores the modules
    (ckpt,) = (tmp_path / ".cache" / "autorank" / "checkpoints").glob("tiny_llama-*.pt")
    model = build_model_from_factory(ft["model_factory"], ft["model_kwargs"])
    load_base_weights(model, ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, plan).train()
    x, y = data.tensors("downstream", "train")
    training_loss(model(x[:8]), y[:8], "token").backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is None
    remove_plan(model)
    assert list(model.state_dict()) == list(before) and all(torch.equal(model.state_dict()[k], v)
                                                             for k, v in before.items())
    # the device runner: tokens in, the predicted bytes measured
    (xv, yv) = data.tensors("downstream", "val")
    torch.save({"x": x, "y": y, "x_val": xv, "y_val": yv}, tmp_path / "tokens.pt")
    r = subprocess.run([sys.executable, "-m", "autorank.device", str(tmp_path / "plan.yaml"), str(ckpt),
                        str(tmp_path / "tokens.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(+0.00%)" in r.stdout and "validation next-token accuracy" in r.stdout
