"""The profile's cache file: its JSON carries the sha256 of its own content, and reading one checks
that digest and every field's type, so a truncated, edited or overwritten file is found before a
search trusts it (autorank.search.profile rebuilds it then, saying so in one line)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from autorank.workload.cachefile import CacheDamaged

__all__ = ["dump_profile", "read_profile"]

_INT_LIST = "a list of whole numbers"
# field -> (required, check, what it must be)
_TOP = {
    "key": (True, lambda v: isinstance(v, str), "a string"),
    "space": (True, lambda v: isinstance(v, dict), "a mapping"),
    "layers": (True, lambda v: isinstance(v, list) and bool(v), "a non-empty list"),
    "ref_peak_bytes": (False, lambda v: _is_int(v), "a whole number"),
    "ref_transient_bytes": (False, lambda v: _is_int(v), "a whole number"),
    "meta": (False, lambda v: isinstance(v, dict), "a mapping"),
    "order": (False, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
}
_BYTES = (False, lambda v: _mapping(v, _is_int), "a mapping of whole numbers")
_LAYER = {
    "name": (True, lambda v: isinstance(v, str), "a string"),
    "kind": (True, lambda v: v in ("conv", "linear", "block"), "conv, linear or block"),
    "input_shape": (True, lambda v: _ints(v), _INT_LIST),
    "choices": (True, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of choices"),
    "ranks": (True, lambda v: _mapping(v, _ints), "a mapping of rank lists"),
    "sensitivity": (True, lambda v: _mapping(v, _is_num), "a mapping of numbers"),
    "alone_peak_bytes": _BYTES, "with_first_peak_bytes": _BYTES,
    "alone_transient_bytes": _BYTES, "with_first_transient_bytes": _BYTES,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _mapping(v: Any, check) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def dump_profile(body: dict[str, Any]) -> str:
    """The profile's fields as JSON with `sha256`, the digest of the rest, beside them."""
    return json.dumps({**body, "sha256": _digest(body)}, indent=1, sort_keys=True)


def _check(d: Any, rules: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise CacheDamaged(f"{where} is a {type(d).__name__}, not a mapping")
    unknown = sorted(set(d) - set(rules))
    if unknown:
        raise CacheDamaged(f"{where} has unknown fields {unknown[:5]}")
    for name, (required, ok, what) in rules.items():
        if name not in d:
            if required:
                raise CacheDamaged(f"{where} lacks `{name}`")
        elif not ok(d[name]):
            raise CacheDamaged(f"{where}'s `{name}` is not {what}")


def read_profile(text: str | bytes) -> dict[str, Any]:
    """The profile's fields from `text` (dump_profile's form; a file written before the digest
    was kept has none and is checked by its fields alone); CacheDamaged when the text is not JSON,
    its digest differs, or a field is missing or of the wrong type."""
    try:
        d = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheDamaged(f"not valid JSON: {e}") from e
    if isinstance(d, dict) and "sha256" in d:
        digest = d.pop("sha256")
        if digest != _digest(d):
            raise CacheDamaged("its sha256 differs from the one recorded when it was written")
    _check(d, _TOP, "the profile")
    for i, lp in enumerate(d["layers"]):
        _check(lp, _LAYER, f"layer {i}")
    return d
