"""The IndexCache pattern value type: parsing, constructors, validation, runtime flags."""

import numpy as np
import pytest

from indexcache_jax import IndexCachePattern
from indexcache_jax.pattern import as_flags


def test_parse_and_views():
    p = IndexCachePattern.parse("fsss FSSS", num_layers=8)
    assert str(p) == "FSSSFSSS" and p.full_layers == (0, 4) and p.retention == 0.25
    np.testing.assert_array_equal(p.flags, [True, False, False, False, True, False, False, False])
    assert [p.source_layer(i) for i in range(8)] == [0, 0, 0, 0, 4, 4, 4, 4]
    assert p.with_shared(4) == IndexCachePattern("FSSSSSSS")


@pytest.mark.parametrize("n, r, expected", [
    (8, 1.0, "FFFFFFFF"), (8, 0.5, "FSFSFSFS"), (8, 0.25, "FSSSFSSS"), (8, 0.125, "FSSSSSSS"),
    (6, 0.5, "FSFSFS"), (5, 0.4, "FSFSS"), (4, 0.01, "FSSS"),
])
def test_uniform_interleave(n, r, expected):
    assert str(IndexCachePattern.uniform(n, r)) == expected


def test_constructors_agree():
    assert IndexCachePattern.all_full(3) == IndexCachePattern("FFF")
    assert IndexCachePattern.from_full_layers(6, [3, 0]) == IndexCachePattern("FSSFSS")


@pytest.mark.parametrize("text, words", [
    ("FSXS", "contains ['X']"), ("", "non-empty"), ("SFFF", "layer 0 must be 'F'"), ("F-SS", "contains ['-']"),
])
def test_invalid_strings_raise(text, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        IndexCachePattern.parse(text)


def test_wrong_length_and_bad_ids_raise():
    with pytest.raises(ValueError, match="has 3 letters but the model has 4 layers"):
        IndexCachePattern.parse("FSS", num_layers=4)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        IndexCachePattern.from_full_layers(4, [0, 4])
    with pytest.raises(ValueError, match="layer 0 must be 'F'"):
        IndexCachePattern.from_full_layers(4, [1, 2])
    with pytest.raises(ValueError, match="retention"):
        IndexCachePattern.uniform(4, 0.0)
    with pytest.raises(ValueError, match="has 8 layers but the model has 4"):
        as_flags(IndexCachePattern("FSSSFSSS"), 4)
