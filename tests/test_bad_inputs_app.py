"""The app's own files and a user's odd inputs (docs/RELIABILITY.md, `## Bad input`), a table per class:

- caches are ours: a damaged cached base model or profile (truncated, random bytes, corrupt JSON,
  wrong types, an edited value) is named in one warning line and rebuilt; a cache folder without
  room (EFBIG under a file-size limit, ENOSPC) is one error line;
- every documented range is refused by autorank.validate before any work;
- space-file values of the wrong type, a run folder that cannot be created, undecodable images:
  one line, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from autorank.errors import ConfigError
from autorank.models import small_cnn
from autorank.search.profile import Profile, profile_layers
from autorank.search.space import SearchSpace
from autorank.workload import base as base_mod
from autorank.workload.data import DatasetMissing, ImageFolderData

# the smoke preset (conf/experiment/smoke.yaml) with one pretraining epoch and two-step refits
SMOKE = "+experiment=smoke"
SMALL = [SMOKE, "trainer.pretrain_epochs=1", "trainer.steps=2", "search=knapsack", "~tracking",
         "export.device_check=false"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- class 4: caches are verified when read and rebuilt when damaged -------------------------------

def _pretrain_args(small_workload, cache: Path, out: Path) -> tuple:
    wl = small_workload(out.parent)  # the tests' small model and data (conftest)
    return (wl.spec, wl.data, cache), dict(epochs=1, lr=0.002, momentum=0.9, seed=0, batch_size=32, output_dir=out,
                                     progress=False)


@pytest.fixture(scope="module")
def cached_base(tmp_path_factory, small_workload):
    """(cache dir, checkpoint path): a small base model pretrained once for this module."""
    cache = tmp_path_factory.mktemp("cache")
    args, kw = _pretrain_args(small_workload, cache, cache / "out")
    return cache, base_mod.base_checkpoint(*args, **kw)


def _side(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


BASE_DAMAGE = {  # name -> (what is done to the cache, a word of the reason given)
    "checkpoint truncated": (lambda pt: pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2]), "bytes"),
    "checkpoint random bytes": (lambda pt: pt.write_bytes(os.urandom(pt.stat().st_size)), "sha256"),
    "record corrupt JSON": (lambda pt: pt.with_suffix(".json").write_text('{"key": {'), "unreadable"),
    "record random bytes": (lambda pt: pt.with_suffix(".json").write_bytes(os.urandom(300)), "unreadable"),
    "record wrong types": (lambda pt: pt.with_suffix(".json").write_text(json.dumps(
        {**_side(pt), "checkpoint": {"bytes": "abc", "sha256": 3}})), "malformed"),
    "record missing": (lambda pt: pt.with_suffix(".json").unlink(), "missing"),
    "checkpoint random bytes, record from before records were kept": (lambda pt: (
        pt.with_suffix(".json").write_text(json.dumps({k: v for k, v in _side(pt).items() if k != "checkpoint"})),
        pt.write_bytes(os.urandom(pt.stat().st_size))), "cannot be read"),
    "record of other settings": (lambda pt: pt.with_suffix(".json").write_text(json.dumps(
        {**_side(pt), "key": {"epochs": 99}})), "settings"),
}


@pytest.mark.parametrize("case", sorted(BASE_DAMAGE))
def test_damaged_base_model_is_named_and_pretrained_again(tmp_path, cached_base, case, caplog, monkeypatch,
                                                          small_workload):
    import shutil

    shutil.copytree(cached_base[0] / "checkpoints", tmp_path / "cache" / "checkpoints")
    damage, word = BASE_DAMAGE[case]
    pt = tmp_path / "cache" / "checkpoints" / cached_base[1].name
    damaged = pt if case.startswith("checkpoint") else pt.with_suffix(".json")  # the file damaged
    damage(pt)
    bad = damaged.read_bytes() if damaged.exists() else None
    calls = []
    real = base_mod.pretrain
    monkeypatch.setattr(base_mod, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    args, kw = _pretrain_args(small_workload, tmp_path / "cache", tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="autorank.workload.base"):
        path = base_mod.base_checkpoint(*args, **kw)
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith(f"cached base model {pt} is damaged (") and word in lines[0]
    assert lines[0].endswith(": pretraining it again")
    assert calls == [1] and path == pt
    rebuilt = pt.read_bytes()
    assert damaged.read_bytes() != bad and _side(pt)["checkpoint"] == {"bytes": len(rebuilt), "sha256": sha(rebuilt)}
    base_mod.load_weights(small_cnn(num_classes=5, width=8), pt)  # loads
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autorank.workload.base"):
        assert base_mod.base_checkpoint(*args, **kw) == pt  # whole again: read, not trained
    assert calls == [1] and not caplog.records


def test_cache_written_before_records_is_kept_and_recorded(tmp_path, cached_base, monkeypatch, small_workload):
    import shutil

    shutil.copytree(cached_base[0] / "checkpoints", tmp_path / "cache" / "checkpoints")
    pt = tmp_path / "cache" / "checkpoints" / cached_base[1].name
    side = _side(pt)
    del side["checkpoint"]
    pt.with_suffix(".json").write_text(json.dumps(side))
    monkeypatch.setattr(base_mod, "pretrain", lambda *a, **k: pytest.fail("a whole old cache was retrained"))
    args, kw = _pretrain_args(small_workload, tmp_path / "cache", tmp_path / "out")
    assert base_mod.base_checkpoint(*args, **kw) == pt
    assert _side(pt)["checkpoint"]["sha256"] == sha(pt.read_bytes())


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _edit_json(p: Path, fn) -> None:
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


PROFILE_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:200]), "not valid JSON"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(2000)), "not valid JSON"),
    "not a mapping": (lambda p: p.write_text("[1, 2]"), "not a mapping"),
    "an edited number": (lambda p: _edit_json(p, lambda d: d.update(ref_peak_bytes=1)), "sha256"),
    "layers of the wrong type": (lambda p: _edit_json(p, lambda d: (d.pop("sha256"), d.update(layers="abc"))),
                                 "`layers` is not a non-empty list"),
    "ranks of the wrong type": (lambda p: _edit_json(p, lambda d: (d.pop("sha256"), d["layers"][0].update(
        ranks={"asi@0.5": "abc"}))), "`ranks` is not"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_DAMAGE))
def test_damaged_profile_is_named_and_profiled_again(tmp_path, case, caplog):
    batches = [(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4)]
    space = SearchSpace(name="t", last=2, levels=(0.5,))
    path = tmp_path / "p.json"
    first = profile_layers(_tiny(), batches, space, key="k", cache_path=path, progress=False)
    damage, words = PROFILE_DAMAGE[case]
    damage(path)
    bad = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="autorank.search.profile"):
        again = profile_layers(_tiny(), batches, space, key="k", cache_path=path, progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith(f"cached profile {path} is damaged (") and words in lines[0]
    assert lines[0].endswith(": profiling again")
    assert sha(path.read_bytes()) != sha(bad) and Profile.from_json(path.read_bytes()) == again == first


FEATURE_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot be read"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(3000)), "cannot be read"),
    "wrong content": (lambda p: torch.save({"features": torch.ones(2)}, p), "not the features"),
    "another key": (lambda p: torch.save({**torch.load(p), "key": "{}"}, p), "another prefix"),
}


@pytest.mark.parametrize("case", sorted(FEATURE_DAMAGE))
def test_damaged_feature_cache_is_named_and_computed_again(tmp_path, case, caplog):
    from autorank.workload.features import FeatureCache

    batches = lambda: [(torch.arange(12.0).reshape(4, 3), torch.arange(4))]  # noqa: E731
    first = FeatureCache(tmp_path).get({"k": 1}, nn.Identity(), batches)
    path = FeatureCache(tmp_path).path({"k": 1})
    damage, words = FEATURE_DAMAGE[case]
    damage(path)
    bad = path.read_bytes()
    cache = FeatureCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="autorank.workload.features"):
        again = cache.get({"k": 1}, nn.Identity(), batches)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"cached features {path} is damaged (") and words in lines[0]
    assert lines[0].endswith(": computing them again") and cache.misses == 1
    assert path.read_bytes() != bad and torch.equal(again[0], first[0])
    assert torch.equal(FeatureCache(tmp_path).get({"k": 1}, None, None)[0], first[0])  # whole again: read


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    from autorank.errors import ConfigError
    from autorank.models import small_cnn
    from autorank.search.profile import Profile
    from autorank.workload.base import save_cached
    d = Path(sys.argv[1])
    try:
        if sys.argv[2] == "base model":
            save_cached(d / "checkpoints" / "m.pt", small_cnn(num_classes=4, width=8), {"k": 1}, {})
        else:
            Profile(key="k" * 5000, space={}, layers=[]).save(d / "profile-x.json")
    except ConfigError as e:
        print(e)
        sys.exit(2)
""")


@pytest.mark.parametrize("what", ["base model", "profile"])
def test_cache_on_a_full_disk_is_one_line(tmp_path, what):
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), what], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stdout.strip()
    assert "\n" not in line and line.startswith(f"cannot write the cached {what} to {tmp_path}")
    assert "(File too large)" in line and "paths.cache_dir=" in line
    left = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [n for n in left if n.endswith(".pt") or n.startswith(".") or n.startswith("profile")], left


def test_cache_write_enospc_is_one_line(tmp_path, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ConfigError, match=r"cannot write the cached base model to .*No space left on device"):
        base_mod.save_cached(tmp_path / "c" / "m.pt", small_cnn(num_classes=4, width=8), {"k": 1}, {})


# --- class 4: every documented range is refused before any work -----------------------------------

LLM = ["model=tiny_llama", "data=stdlib_licenses"]
VIT = ["model=vit_tiny", "data=digits_vit"]
LIMITS = {  # name -> (overrides, words of the error)
    "seq_len above max_seq_len": (LLM + ["data.seq_len=1024"],
                                  ("data.seq_len=1024", "model.build.max_seq_len=512", "lower data.seq_len")),
    "heads do not divide the width": (LLM + ["model.build.num_heads=3"],
                                      ("model.build.hidden_size=128", "num_heads=3")),
    "ViT patches do not tile": (VIT + ["data.input_size=30"], ("model.build.image_size=30", "patch_size=8")),
    "vocab_size 0": (LLM + ["model.build.vocab_size=0"], ("model.build.vocab_size=0", "a whole number >= 1")),
    "width_mult 0": (["model.build.width_mult=0"], ("model.build.width_mult=0", "a finite number > 0")),
    "channels_last maybe": (["trainer.channels_last=maybe"], ("trainer.channels_last='maybe'", "auto, true, false")),
    "feature_cache ram": (["trainer.feature_cache=ram"], ("trainer.feature_cache='ram'", "memory, disk, off")),
    "pretrain_optimizer": (["trainer.pretrain_optimizer=rmsprop"], ("trainer.pretrain_optimizer='rmsprop'",)),
    "bn_eval 1": (["trainer.bn_eval=1"], ("trainer.bn_eval=1", "true, false")),
    "resume_cache_mb < 0": (["trainer.resume_cache_mb=-1"], ("trainer.resume_cache_mb=-1",)),
    "max_per_class 0": (["data.max_per_class=0"], ("data.max_per_class=0", "or null")),
    "population_size 1": (["sampler=nsga2", "sampler.population_size=1"], ("sampler.population_size=1", ">= 2")),
    "n_startup_trials -1": (["sampler.n_startup_trials=-1"], ("sampler.n_startup_trials=-1", ">= 0")),
    "heartbeat 0": (["search.heartbeat_s=0"], ("search.heartbeat_s=0", "> 0")),
    "cache folder is a file": (["paths.cache_dir={d}/afile"], ("paths.cache_dir=", "afile is a file, not a folder")),
    "cache folder under /proc": (["paths.cache_dir=/proc/autorank/cache"],
                                 ("paths.cache_dir=/proc/autorank/cache cannot be written",)),
}


@pytest.mark.parametrize("case", sorted(LIMITS))
def test_documented_range_refused_by_validate(tmp_path, compose_cfg, case):
    from autorank.validate import check_config

    (tmp_path / "afile").write_text("x")
    overrides, words = LIMITS[case]
    cfg = compose_cfg(["+device=rpi4", *[o.replace("{d}", str(tmp_path)) for o in overrides]])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("overrides", [[], LLM, LLM + ["data.seq_len=512"], VIT, ["sampler=nsga2"],
                                       ["model=resnet18"], ["model=mobilenet_v2"]])
def test_documented_settings_pass_validate(compose_cfg, overrides):
    from autorank.validate import check_config

    check_config(compose_cfg(["+device=rpi4", *overrides]))  # the limits refuse no shipped option


# --- class 5: space-file values of the wrong type --------------------------------------------------

SPACE_TYPES = {  # file text -> words of the error
    'last: "abc"': ("`last: 'abc'`", "a whole number >= 1"),
    "last: [4]": ("`last: [4]`", "a whole number"),
    "levels: 0.8": ("`levels: 0.8`", "a list of numbers"),
    "levels: [high]": ("`levels: ['high']`", "a list of numbers"),
    'lora_ranks: "abc"': ("`lora_ranks: 'abc'`", "whole numbers"),
    "choices: full": ("`choices: 'full'`", "a list of choices"),
    "layers: 5": ("`layers: 5`", "a list of module names"),
    "overrides: [fc]": ("`overrides: ['fc']`", "a mapping of module name"),
    "hparams: {lr: 0.1}": ("`hparams: {'lr': 0.1}`", "{lr: {low:"),
    "lean: maybe": ("`lean: 'maybe'`", "true or false"),
    "first: 1.5": ("`first: 1.5`", "a whole number >= 0"),
}


@pytest.mark.parametrize("text", sorted(SPACE_TYPES))
def test_space_value_of_the_wrong_type_is_one_line(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        SearchSpace.load(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"search space file {path}: ")
    assert all(w in msg for w in SPACE_TYPES[text]), msg


# --- class 5: images that cannot be decoded --------------------------------------------------------

def _image_folder(root: Path, bad: dict[str, bytes]) -> Path:
    from PIL import Image

    for c in "abcd":
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 10), (40 * i, 60, 0)).save(root / c / f"{i}.png")
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root


def test_undecodable_images_are_skipped_with_one_line(tmp_path, caplog):
    """One broken file among many should not stop a run: skipped, named and counted."""
    root = _image_folder(tmp_path / "img", {"a/broken.jpg": os.urandom(700), "c/cut.png": b"\x89PNG\r\n\x1a\n0"})
    data = ImageFolderData(root=str(root), input_size=8, batch_size=4, val_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="autorank.workload.data"):
        data.setup()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "skipped 2 of 18 files" in lines[0], lines
    assert "a/broken.jpg" in lines[0] and "c/cut.png" in lines[0]
    n = sum(len(data.tensors(t, p)[1]) for t in ("upstream", "downstream") for p in ("train", "val"))
    assert n == 16  # every good image kept


def test_folder_of_only_undecodable_images_is_refused(tmp_path):
    root = tmp_path / "img"
    for c in "ab":
        (root / c).mkdir(parents=True)
        (root / c / "x.jpg").write_bytes(os.urandom(500))
    with pytest.raises(DatasetMissing, match=r"none of its 2 image files can be decoded \(a/x.jpg, b/x.jpg"):
        ImageFolderData(root=str(root), input_size=8).setup()


# --- the app as a user runs it: one line, exit 2 ---------------------------------------------------

CLI = {  # name -> (overrides, words of the error line)
    "run folder under /proc": (["hydra.run.dir=/proc/autorank/run"],
                               ("hydra.run.dir=/proc/autorank/run cannot be written",)),
    "paths.root under /proc": (["paths.root=/proc/autorank"], ("/proc/autorank/outputs cannot be written",)),
    "seq_len above max_seq_len": (LLM + ["data.seq_len=4096"], ("data.seq_len=4096", "max_seq_len=512")),
    "space value of the wrong type": (["space.path={d}/space.yaml"], ("`lora_ranks: 'abc'`", "whole numbers")),
}


def _run_app(d: Path, args: list[str], limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    pre = ""
    if limit_bytes:  # a full disk for every file the app writes: writes past the limit fail (EFBIG)
        pre = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); ")
    code = pre + "import sys; from autorank.app import main; sys.argv[0] = 'autorank'; main()"
    keys = {a.split("=", 1)[0] for a in args}  # another model and data: not the smoke preset's
    base = [a for a in SMALL if "data" not in keys or a != SMOKE]
    return subprocess.run([sys.executable, "-c", code, "+device=rpi4", *base, f"export.path={d}/plan.yaml", *args],
                          cwd=d, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "AUTORANK_ROOT": str(d)})


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [s for s in r.stderr.splitlines() if s.startswith("autorank: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", sorted(CLI))
def test_app_bad_input_is_one_line_exit_2(tmp_path, case):
    (tmp_path / "space.yaml").write_text("last: 2\nchoices: [frozen, full, lora]\nlora_ranks: abc\n")
    overrides, words = CLI[case]
    line = _one_error_line(_run_app(tmp_path, [o.replace("{d}", str(tmp_path)) for o in overrides]))
    assert all(w in line for w in words), line


def test_app_cache_on_a_full_disk_is_one_line_exit_2(tmp_path):
    """The base model is pretrained, then its cache file does not fit: one line, exit 2."""
    line = _one_error_line(_run_app(tmp_path, [], limit_bytes=20_000))
    assert f"cannot write the cached base model to {tmp_path}/.cache/autorank/checkpoints (File too large)" in line
    assert not list((tmp_path / ".cache").rglob("*.pt"))
