"""Small building blocks shared by every layer: initialised weights, RMSNorm, LayerNorm, and the einsum they use.

Weights are stored in `param_dtype` and cast to the compute dtype at use; normalisations compute in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from indexcache_jax.config import ModelConfig


def weight(rngs: nnx.Rngs, config: ModelConfig, *shape: int) -> nnx.Param:
    """A projection weight ~ N(0, initializer_range^2), the DeepSeek/HF initialisation.

    Outside tracing the numbers are drawn on the host by NumPy, seeded from the nnx key: XLA on the CPU compiles
    a separate random-number kernel for every weight shape, which made a tiny model take ~10 s to build. Under a
    trace (jit, eval_shape) they come from jax.random: same distribution, other values.
    """
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        init = jax.random.normal(key, shape, jnp.float32)
    else:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        init = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return nnx.Param(jnp.asarray(init * config.initializer_range, dtype=config.param_dtype))


def project(spec: str, x, w: nnx.Param, dtype):
    """einsum(spec, x, w) in the compute dtype; the spec string is the shape documentation."""
    return jnp.einsum(spec, x.astype(dtype), w[...].astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (the indexer's key norm)."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        x32 = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
