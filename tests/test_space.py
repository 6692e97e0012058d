"""Search-space files: which layers are candidates."""

import pytest

from autorank.search.space import SearchSpace, load_space
from autorank.workload.models import mcunet_like, small_cnn


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
