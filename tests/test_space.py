"""Search-space files: which layers are candidates."""

import pytest
import yaml

from autorank.search.space import SPACES_DIR, SearchSpace, load_space
from autorank.models import mcunet_like, small_cnn


def test_first_last_spread_pick_the_named_layers():
    from autorank.plan import candidate_layers

    model = mcunet_like(5, width_mult=0.5)
    names = candidate_layers(model)
    sp = SearchSpace(name="t", first=3, last=2, spread=3)
    got = sp.resolve(model)
    middle = names[3:-2]
    # space.py's spacing: middle[round(i * (len(middle) - 1) / (k - 1))] for i in 0..k-1
    # mcunet_like x0.5: 43 conv/linear layers, 38 between the first 3 and the last 2; the middle
    # pick is round(37 / 2) = 18 (Python rounds half to even), not len(middle) // 2 = 19
    assert len(names) == 43 and len(middle) == 38
    assert got == names[:3] + [middle[0], middle[18], middle[37]] + names[-2:]
    assert len(got) == 8 and got == [n for n in names if n in got]  # forward order, no repeats


def test_default_space_spans_first_and_last_layers():
    from autorank.plan import candidate_layers

    model = mcunet_like(5, width_mult=0.5)
    names = candidate_layers(model)
    got = load_space("default").resolve(model)
    assert got == names[:8] + names[-4:]


def test_space_larger_than_the_model_is_refused():
    with pytest.raises(ValueError, match="exceed"):
        SearchSpace(name="t", first=3, last=3).resolve(small_cnn(5))


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        SearchSpace.from_dict({"name": "t", "last": 2, "frist": 3})


@pytest.mark.parametrize("option", sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
def test_every_space_option_picks_its_first_and_last_layers(option):
    """Each option of the `space` config group, loaded by name, by its composed mapping (as the
    app passes it) and by file path, is the same space and picks what its keys say."""
    from autorank.plan import candidate_layers

    d = yaml.safe_load((SPACES_DIR / f"{option}.yaml").read_text())
    assert d.pop("path") is None  # overridable on the command line: space.path=...
    by_name, by_mapping = load_space(option), load_space({**d, "path": None})
    assert by_name == by_mapping == load_space(SPACES_DIR / f"{option}.yaml") and by_name.name == option
    model = mcunet_like(5, width_mult=0.5)
    names = candidate_layers(model)
    got = by_name.resolve(model)
    assert got[:by_name.first] == names[:by_name.first] and got[len(got) - by_name.last:] == names[-by_name.last:]
    assert len(got) == by_name.first + by_name.last + by_name.spread


def test_space_path_wins_over_the_groups_keys(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("last: 2\nlevels: [0.5]\n")
    composed = {**load_space("default").to_dict(), "path": str(own)}  # space.path=... on the default
    sp = load_space(composed)
    assert (sp.name, sp.first, sp.last, sp.levels) == ("mine", 0, 2, (0.5,))
    assert sp.resolve(small_cnn(5)) == ["conv3", "fc"]


def test_space_file_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"not found \(available: .*'last4'.*space.path="):
        load_space("nosuchspace")
    nested = tmp_path / "nested.yaml"
    nested.write_text("last: 2\npath: other.yaml\n")
    with pytest.raises(ValueError, match="`path` belongs on the command line"):
        load_space(nested)
