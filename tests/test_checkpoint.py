"""Our checkpoint directory (Orbax parameters + YAML config): exact round trip, dtype override, atomic writes,
and clear errors for paths that are not checkpoints."""

import jax
import numpy as np
import pytest

from conftest import SMALL
from indexcache_jax import Config, IndexCacheConfig, forward, init_params
from indexcache_jax.checkpoint import load_model, save_model


@pytest.fixture(scope="module")
def model():
    config = Config(model=SMALL, indexcache=IndexCacheConfig(pattern="FSFS"))
    return config, init_params(SMALL, seed=5)


def test_round_trip_is_exact_and_keeps_the_pattern(model, tmp_path):
    config, params = model
    save_model(tmp_path / "ckpt", config, params)
    assert not (tmp_path / "ckpt.partial").exists()
    config_back, params_back = load_model(tmp_path / "ckpt")
    assert config_back == config and str(config_back.pattern()) == "FSFS"
    leaves, leaves_back = jax.tree.leaves(params), jax.tree.leaves(params_back)
    assert len(leaves) == len(leaves_back)
    for a, b in zip(leaves, leaves_back, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    tokens = np.random.default_rng(0).integers(0, SMALL.vocab_size, (1, 12))
    np.testing.assert_array_equal(forward(params, tokens, "FSFS", config=SMALL),
                                  forward(params_back, tokens, "FSFS", config=config_back.model))


def test_dtype_override_casts_all_but_the_router_bias(model, tmp_path):
    config, params = model
    save_model(tmp_path / "ckpt", config, params)
    config16, params16 = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert config16.model.dtype == config16.model.param_dtype == "bfloat16"
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(params16)}
    assert all(d == np.dtype("float32") for k, d in dtypes.items() if "e_score_correction_bias" in k)
    assert sum(d == jax.numpy.bfloat16 for d in dtypes.values()) == len(dtypes) - 1  # one router-bias leaf


def test_refuses_to_overwrite_and_names_bad_paths(model, tmp_path):
    config, params = model
    save_model(tmp_path / "ckpt", config, params)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(tmp_path / "ckpt", config, params)
    save_model(tmp_path / "ckpt", config, params, overwrite=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model checkpoint"):
        load_model(tmp_path / "empty")
    # a config that does not match the stored parameters
    text = (tmp_path / "ckpt" / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 40")
    (tmp_path / "ckpt" / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"do not match .*config.yaml: \['dense_layers'\]\['indexer'\]"
                                         r"\['weights_proj'\] stored \[1, 32, 4\], config implies \[1, 40, 4\]"):
        load_model(tmp_path / "ckpt")
