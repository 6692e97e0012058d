"""data.downstream_shift: fixed transforms of the downstream images only, exact, in the cache keys."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from autorank.errors import ConfigError
from autorank.workload.data import DigitsData, ImageData, shift_images


@pytest.mark.parametrize("shift, expect", [
    ("invert", lambda x: 1.0 - x),
    ("rot90", lambda x: torch.rot90(x, 1, dims=(-2, -1))),
    ("rot180", lambda x: x.flip(-1).flip(-2)),
    ("hflip", lambda x: x.flip(-1)),
    ("invert+rot270", lambda x: torch.rot90(1.0 - x, 3, dims=(-2, -1))),
])
def test_downstream_images_are_the_shifted_originals(shift, expect):
    plain, shifted = DigitsData(input_size=8), DigitsData(input_size=8, downstream_shift=shift)
    for part in ("train", "val"):
        x0, y0 = plain.tensors("downstream", part)
        x1, y1 = shifted.tensors("downstream", part)
        torch.testing.assert_close(x1, expect(x0), rtol=0, atol=0)
        assert torch.equal(y0, y1)
        assert torch.equal(plain.tensors("upstream", part)[0], shifted.tensors("upstream", part)[0])
    assert not torch.equal(plain.tensors("downstream", "train")[0], shifted.tensors("downstream", "train")[0])
    # the shift is in the downstream key (feature caches), not in the upstream one (the base model)
    assert shifted.key("upstream") == plain.key("upstream")
    assert shifted.key("downstream") == {**plain.key("downstream"), "downstream_shift": shift}


def test_inverted_batches_are_the_negated_normalised_batches():
    plain, shifted = DigitsData(input_size=12, batch_size=16), DigitsData(input_size=12, batch_size=16,
                                                                          downstream_shift="invert")
    (x0, y0), (x1, y1) = next(iter(plain.loader("downstream", "val"))), next(iter(shifted.loader("downstream", "val")))
    # bilinear resize is linear with weights summing to 1: resize(1 - x) = 1 - resize(x)
    torch.testing.assert_close(x1, -x0, rtol=0, atol=1e-6)
    assert torch.equal(y0, y1) and x1.shape == (16, 3, 12, 12)


def test_uint8_images_invert_in_their_range():
    x = torch.tensor([[[[0, 7], [200, 255]]]], dtype=torch.uint8)
    assert shift_images(x, "invert").tolist() == [[[[255, 248], [55, 0]]]]
    assert shift_images(x, "invert").dtype == torch.uint8
    assert torch.equal(shift_images(x, None), x) and torch.equal(shift_images(x, "none"), x)


def test_unknown_shift_is_a_config_error():
    with pytest.raises(ConfigError, match="rot45"):
        DigitsData(downstream_shift="invert+rot45")
    assert isinstance(DigitsData(), ImageData) and DigitsData().downstream_shift is None


def test_shift_from_a_config_override(compose_cfg):
    cfg = compose_cfg(["+data=digits", "++data.downstream_shift=invert"], config_name=None)
    data = instantiate(cfg.data)
    assert data.downstream_shift == "invert"
    x0 = DigitsData().tensors("downstream", "val")[0]
    torch.testing.assert_close(data.tensors("downstream", "val")[0], 1.0 - x0, rtol=0, atol=0)
