"""The composed config checked before any work: `check_config(cfg)` is the app's first step, before
torch, the data or the pretraining are touched (a bad value costs a second, not a pretraining).

Each bad value is a ConfigError whose message names the override, the value given and what is
allowed; the app prints it as one line and exits 2. Only values the user chooses are checked here;
what needs the model or the data (a space's layers, a checkpoint that does not fit, a budget below
the smallest plan) is checked where those are first known, still before any trial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from autorank.errors import ConfigError
from autorank.io import check_output, read_mapping

__all__ = ["check_config", "check_folder", "check_writable", "run_folder_error", "SPACE_FORM"]

SPACE_FORM = ("a YAML mapping of search-space keys such as `last: 4`, `choices: [frozen, full, asi]`, "
              "`levels: [0.8, 0.9]` (see autorank/conf/space/default.yaml)")

# (key, kind, low, none allowed, why): kind "int" is a whole number >= low; "pos" a finite
# number > low; "num" a finite number >= low.
RULES: list[tuple[str, str, float, bool, str]] = [
    ("trainer.max_epochs", "int", 1, False, "-1 would mean 'no limit' to Lightning, 0 no training"),
    ("trainer.steps", "int", 1, True, "SGD steps of a full fine-tune; null: trainer.max_epochs"),
    ("trainer.pretrain_epochs", "int", 1, False, "epochs of the one-off upstream pretraining"),
    ("trainer.pretrain_patience", "int", 1, True,
     "epochs without a better upstream val accuracy before pretraining stops; null: every pretrain_epochs"),
    ("trainer.pretrain_batch_size", "int", 1, False, "samples per pretraining step"),
    ("trainer.lr", "pos", 0, False, "the SGD learning rate"),
    ("trainer.pretrain_lr", "pos", 0, False, "the pretraining learning rate"),
    ("trainer.momentum", "num", 0, False, "SGD momentum, 0 <= m < 1"),
    ("trainer.weight_decay", "num", 0, False, "0 for none"),
    ("data.batch_size", "int", 1, False, "the device's training batch"),
    ("data.input_size", "int", 1, False, "image side in pixels"),
    ("data.seq_len", "int", 1, False, "tokens per training window (text data)"),
    ("data.max_bytes", "int", 1, True, "bytes read per corpus (text data); null: every matching file whole"),
    ("search.n_trials", "int", 1, False, "finished trials the study should hold"),
    ("search.timeout", "pos", 0, True, "seconds for this run's trials; null: no limit"),
    ("search.trial_steps", "int", 1, True, "SGD steps per trial; null: epochs"),
    ("search.max_epochs", "int", 1, True, "epochs per trial; null: trainer.max_epochs"),
    ("search.refit_steps", "int", 1, True, "SGD steps of a refit; null: no refit"),
    ("search.refit_top", "int", 0, False, "front plans refit at full fidelity"),
    ("search.n_calibration_batches", "int", 1, False, "batches the profile reads"),
    ("device.ram_mb", "pos", 0, False, "the device's RAM in MB"),
    ("device.os_mb", "num", 0, False, "MB the OS keeps"),
    ("device.runtime_mb", "num", 0, False, "MB the Python/torch runtime holds when ready to train"),
    ("device.gflops_fp32", "pos", 0, False, "sustained GFLOP/s"),
    ("device.budget_mb", "pos", 0, True, "the training budget in MB; null: ram_mb - os_mb - runtime_mb - first-step overhead"),
    ("trainer.resume_cache_mb", "num", 0, False, "MB of run end states kept for refits; 0: off"),
    ("data.max_per_class", "int", 1, True, "training images per class; null: all"),
    ("data.val_max_per_class", "int", 1, True, "validation images per class; null: all"),
    ("search.heartbeat_s", "pos", 0, True, "seconds between a running trial's heartbeats"),
    ("sampler.n_startup_trials", "int", 0, False, "random trials before the sampler models the front"),
    ("sampler.population_size", "int", 2, False, "NSGA-II's population"),
    *[(f"model.build.{k}", "int", 1, False, why) for k, why in (
        ("width", "channels of the first conv"), ("hidden_size", "the model width"),
        ("num_layers", "transformer blocks"), ("num_heads", "attention heads"),
        ("intermediate_size", "the MLP width"), ("max_seq_len", "the longest sequence the model takes"),
        ("vocab_size", "tokens the model predicts"), ("image_size", "the ViT's input side in pixels"),
        ("patch_size", "the ViT's patch side in pixels"), ("hidden_dim", "the ViT's width"),
        ("mlp_dim", "the ViT's MLP width"))],
    ("model.build.width_mult", "pos", 0, False, "channel multiplier of the model"),
    ("model.runtime_mb", "num", 0, False, "MB the model's library adds to the device runtime"),
]
# (key, allowed values, why): a value outside the list is refused
CHOICES: list[tuple[str, tuple, str]] = [
    ("trainer.feature_cache", ("memory", "disk", "off"), "where prefix features are kept"),
    ("trainer.channels_last", ("auto", True, False), "the training layout; auto: channels-last on CPU"),
    ("trainer.pretrain_optimizer", ("adam", "sgd"), "the pretraining optimizer"),
    *[(k, (True, False), "a switch") for k in ("trainer.bn_eval", "trainer.progress", "search.n_trials_total",
                                               "search.references", "search.warm_start", "export.device_check")],
]
UPPER = {"trainer.momentum": 1.0, "data.val_fraction": 1.0}


def _value(cfg: Any, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key; a value that cannot be resolved (an unset ${oc.env:...})
    is a ConfigError naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, node) if node else cfg
    if parent is None or not hasattr(parent, "keys") or leaf not in parent:
        return False, None
    try:
        return True, OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key} cannot be read: {first}") from e


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_value(key: str, value: Any, kind: str, low: float, none_ok: bool, why: str) -> None:
    """ConfigError when `value` breaks the rule (see RULES)."""
    if value is None:
        if none_ok:
            return
        raise ConfigError(f"{key} is not set: {why}")
    high = UPPER.get(key)
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        allowed = f"a whole number >= {low:g}"
    else:
        ok = _is_number(value) and math.isfinite(value) and (value > low if kind == "pos" else value >= low)
        ok = ok and (high is None or value < high)
        allowed = f"a finite number {'>' if kind == 'pos' else '>='} {low:g}" + (f" and < {high:g}" if high else "")
    if not ok:
        null = " or null" if none_ok else ""
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}{null} ({why})")


def check_choice(key: str, value: Any, allowed: tuple, why: str) -> None:
    """ConfigError unless `value` is one of `allowed` (booleans by identity: 1 is not true)."""
    if not any(value is a if isinstance(a, bool) else (isinstance(value, str) and value == a) for a in allowed):
        names = ", ".join(str(a).lower() if isinstance(a, bool) else a for a in allowed)
        raise ConfigError(f"{key}={value!r} is not allowed: expected one of {names} ({why})")


def check_model_fits_data(cfg: Any) -> None:
    """The documented ranges that tie two values together: a language model's data.seq_len at
    most its model.build.max_seq_len (rotary positions); a ViT's image side a multiple of its
    patch side; the model width divisible by the heads."""
    seq, max_seq = _value(cfg, "data.seq_len")[1], _value(cfg, "model.build.max_seq_len")[1]
    if isinstance(seq, int) and isinstance(max_seq, int) and seq > max_seq:
        raise ConfigError(f"data.seq_len={seq} is above the model's model.build.max_seq_len={max_seq} (the longest "
                          "sequence it takes): lower data.seq_len or raise model.build.max_seq_len")
    size, patch = _value(cfg, "model.build.image_size")[1], _value(cfg, "model.build.patch_size")[1]
    if isinstance(size, int) and isinstance(patch, int) and size % patch:
        raise ConfigError(f"model.build.image_size={size} (data.input_size) is not a multiple of "
                          f"model.build.patch_size={patch}: choose an input size that the patches tile")
    heads = _value(cfg, "model.build.num_heads")[1]
    for key in ("model.build.hidden_size", "model.build.hidden_dim"):
        width = _value(cfg, key)[1]
        if isinstance(width, int) and isinstance(heads, int) and width % heads:
            raise ConfigError(f"{key}={width} is not divisible by model.build.num_heads={heads}: each head "
                              "takes an equal share of the width")


def check_writable(path: str | Path, what: str, inputs: dict | None = None) -> None:
    """ConfigError unless a file can be written at `path` and it is none of `inputs`
    (autorank.io.check_output: the one guard every writer uses)."""
    check_output(path, what=what, inputs=inputs, error=ConfigError)


def check_folder(key: str, value: Any) -> None:
    """ConfigError unless `value` is a folder where files can be created (made if missing): the
    run folder, the cache."""
    folder = Path(str(value)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={folder} is a file, not a folder: give a folder path ({key}=...)")
    probe = folder / ".autorank-folder"
    try:
        check_output(probe, what=key, error=ConfigError)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"{key}={probe}", f"{key}={folder}")) from None


def run_folder_error(argv: list[str], cwd: str, env: dict) -> str | None:
    """Hydra creates the run folder before autorank's code runs, and a folder it cannot create
    ends in its traceback: the line to print instead, or None. The folder is hydra.run.dir's
    literal part (before any ${...}) or <paths.root>/outputs, paths.root from the command line,
    $AUTORANK_ROOT or the working directory. Hydra's own flags (--help, -m, ...) are left to it."""
    if any(a.startswith("-") for a in argv):
        return None
    over = dict(a.split("=", 1) for a in argv if "=" in a)
    root = over.get("paths.root") or env.get("AUTORANK_ROOT") or cwd
    run = over.get("hydra.run.dir", "${paths.root}/outputs/").replace("${paths.root}", root)
    run = run.split("${", 1)[0].rstrip("/") or "."
    try:
        check_folder("hydra.run.dir", Path(cwd) / run)
    except ConfigError as e:
        hint = "" if "hydra.run.dir" in over else " (the run folder: <paths.root>/outputs; run elsewhere or set paths.root=...)"
        return str(e) + hint
    return None


def check_space_file(cfg: Any) -> None:
    """A search-space file named by space.path (or the older search.space=PATH) must hold a
    mapping: an empty file is not 'the defaults'."""
    for key in ("space.path", "search.space"):
        present, value = _value(cfg, key)
        if not present or not isinstance(value, str) or not value:
            continue
        p = Path(value)
        if not p.exists():
            continue  # a space option's name (search.space=last4) or a missing file: load_space says which
        read_mapping(p, what=f"search space file ({key}=)", expected=SPACE_FORM, error=ConfigError)


def check_config(cfg: Any) -> None:
    """Every check of this module, in the order a user reads the config; the first failure raises."""
    device = _value(cfg, "device.name")[1]
    for key, kind, low, none_ok, why in RULES:
        present, value = _value(cfg, key)
        if present:
            if key.startswith("device.") and device:
                why = f"{why}; device {device!r}"
            check_value(key, value, kind, low, none_ok, why)
    for key, allowed, why in CHOICES:
        present, value = _value(cfg, key)
        if present:
            check_choice(key, value, allowed, why)
    check_model_fits_data(cfg)
    present, value = _value(cfg, "data.val_fraction")
    if present and value is not None:
        check_value("data.val_fraction", value, "pos", 0, False, "the held-out share, 0 < f < 1")
    for key in ("search.storage", "tracking.uri"):  # an unset ${oc.env:...} is named here
        _value(cfg, key)
    check_space_file(cfg)
    for key in ("paths.output_dir", "paths.cache_dir"):
        present, value = _value(cfg, key)
        if present and value:
            check_folder(key, value)
    present, value = _value(cfg, "model.checkpoint")
    if present and value:
        path = Path(str(value)).expanduser()
        if path.is_dir():
            raise ConfigError(f"model.checkpoint={path} is a directory: pass the weights file "
                              "(torch.save(model.state_dict(), path)), or null to pretrain one")
        if not path.exists():
            raise ConfigError(f"model.checkpoint={path} does not exist: pass a weights file "
                              "(torch.save(model.state_dict(), path)), or null to pretrain one")
    for key in ("export.path", "export.data_path"):
        present, value = _value(cfg, key)
        if present and value is not None:
            check_writable(value, key)
