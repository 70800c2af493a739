"""Configs load from YAML into typed dataclasses, and every bad value is reported with its field."""

import dataclasses
import typing

import pytest
import yaml

from conftest import REPO, SMALL
from indexcache_jax import ConfigError, IndexCachePattern, load_config
from indexcache_jax.config import Fp8HeadSum
from indexcache_jax.configlib import to_mapping
from pallas_kernels.indexer_reference import FP8_HEAD_SUMS


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base():
    return {"model": to_mapping(SMALL)}


def test_shipped_configs_load_with_their_patterns():
    tiny = load_config(REPO / "configs/tiny.yaml")
    assert tiny.model.num_layers == 8 and tiny.model.moe.first_k_dense_replace == 1
    assert tiny.pattern() == IndexCachePattern("FSSSFSSS")
    big = load_config(REPO / "configs/deepseek_v32_shapes.yaml")
    assert big.model.latent_dim == 576 and big.model.qk_head_dim == 192
    assert big.model.layer_segments == ((0, 3, "dense"), (3, 61, "moe"))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, _base()))
    assert cfg.model == SMALL


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: d["model"].update(index_topk=0), "model.index_topk", "must be > 0, got 0"),
    (lambda d: d["model"].update(index_topk=-3), "model.index_topk", "got -3"),
    (lambda d: d["model"].update(hidden_size="wide"), "model.hidden_size", "must be an integer"),
    (lambda d: d["model"].update(num_heads=4.5), "model.num_heads", "must be an integer"),
    (lambda d: d["model"].update(hiden_size=3), "model", "unknown key(s) ['hiden_size']"),
    (lambda d: d["model"].pop("vocab_size"), "model.vocab_size", "required key is missing"),
    (lambda d: d["model"].update(indexer_rope_layout="zigzag"), "model.indexer_rope_layout", "must be one of"),
    (lambda d: d["model"].update(indexer_fp8_head_sum="fp16"), "model.indexer_fp8_head_sum", "must be one of"),
    (lambda d: d["model"].update(qk_rope_head_dim=7), "model.qk_rope_head_dim", "must be even"),
    (lambda d: d["model"]["moe"].update(n_group=3), "model.moe.n_group", "must divide n_routed_experts=8"),
    (lambda d: d["model"]["moe"].update(first_k_dense_replace=9), "model.moe.first_k_dense_replace", "<= num_layers"),
    (lambda d: d.update(indexcache={"pattern": "FSS"}), "indexcache.pattern", "has 3 letters but the model has 4"),
    (lambda d: d.update(indexcache={"pattern": "SFFF"}), "indexcache.pattern", "layer 0 must be 'F'"),
    (lambda d: d.update(indexcache={"retention": 1.5}), "indexcache.retention", "must be in (0, 1]"),
    (lambda d: d.update(extra=1), "config", "unknown key(s) ['extra']"),
])
def test_bad_values_name_the_field_and_file(tmp_path, edit, field, words):
    data = _base()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert field in message and words in message and str(path) in message


def test_missing_file_and_non_mapping_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_derived_values_are_computed():
    assert SMALL.qk_head_dim == 16 and SMALL.latent_dim == 24
    assert SMALL.softmax_scale == pytest.approx(16 ** -0.5)
    assert SMALL.topk_for(100) == 4 and SMALL.topk_for(3) == 3
    assert dataclasses.replace(SMALL, moe=None).layer_segments == ((0, 4, "dense"),)


def test_the_config_offers_exactly_the_head_sums_the_kernels_take():
    # the config's Literal and the kernels' tuple are two lists of one vocabulary: they must not drift apart
    assert typing.get_args(Fp8HeadSum) == FP8_HEAD_SUMS
