"""Small building blocks shared by every layer: initialised weights, RMSNorm, LayerNorm, and the einsum they use.

Weights are stored in `param_dtype` and cast to the compute dtype at use, or once before a loop that uses them
(`compute_copies`); normalisations compute in float32.
"""

import functools

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


# A weight's copy in the compute dtype, made once outside a loop that would otherwise cast it in every iteration
# (`compute_copies`, `with_compute_copies`): Variable metadata that `project` reads.
COMPUTE_COPY = "compute_copy"


def project(spec: str, x, w: nnx.Param, dtype):
    """einsum(spec, x, w) in the compute dtype; the spec string is the shape documentation. The weight's gradient
    comes out of its dot in the weight's own dtype (float32 master weights: not rounded to bf16 first), and
    a compute-dtype copy attached to it (`with_compute_copies`) stands in for its cast (`_project`)."""
    dtype = jnp.dtype(dtype)
    value = w[...]
    copy = w.get_metadata().get(COMPUTE_COPY)
    return _project(spec, dtype, x, value, copy if copy is not None and copy.dtype == dtype else value.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _project(spec: str, dtype, x, w, w_c):
    """einsum(spec, x, w) in `dtype`, where w_c is w in `dtype` (its cast, or a copy made before); w_c gets no
    gradient: w gets it all."""
    del w
    return jnp.einsum(spec, x.astype(dtype), w_c)


def _project_fwd(spec, dtype, x, w, w_c):
    x_c = x.astype(dtype)
    return jnp.einsum(spec, x_c, w_c), (x_c, w_c, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _project_bwd(spec, dtype, residuals, cotangent):
    # Autodiff would take the weight's gradient in the compute dtype, rounded, then cast it to float32; inside query
    # chunks (block.py) every chunk added that rounded part to the float32 sum in a pass of its own, which XLA folds
    # into the float32 dot's output instead (session 51: those adds 134 -> 17 ms a dense step at 32K).
    x_c, w_c, x_like, w_like = residuals
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    d_x = jnp.einsum(f"{out},{w_spec}->{x_spec}", cotangent, w_c, preferred_element_type=dtype)
    weight_spec, weight_dtype = f"{x_spec},{out}->{w_spec}", w_like.dtype

    def mixed(x_c, cotangent):  # e.g. bf16 x bf16 -> f32 on the tensor cores
        return jnp.einsum(weight_spec, x_c, cotangent, preferred_element_type=weight_dtype)

    def upcast(x_c, cotangent):
        # XLA's CPU runtime lacks some mixed-precision dots (eagerly, "Unsupported element type for
        # DotThunk::Execute: BF16 x BF16 = F32"): on a CPU the operands are cast first (the same products, exact
        # in f32, and the same f32 sums)
        return jnp.einsum(weight_spec, x_c.astype(weight_dtype), cotangent.astype(weight_dtype))

    if x_c.dtype == weight_dtype and cotangent.dtype == weight_dtype:
        d_w = upcast(x_c, cotangent)
    else:
        d_w = jax.lax.platform_dependent(x_c, cotangent, cpu=upcast, default=mixed)
    return d_x.astype(x_like.dtype), d_w, None


_project.defvjp(_project_fwd, _project_bwd)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def compute_copies(module: nnx.Module, dtype) -> list:
    """The module's weights (its Params of two or more dims) cast to `dtype`, without a gradient, in the order of
    its Params; None for those kept as they are (vectors, or already in `dtype`). Why: inside a loop over query
    chunks (block.py) XLA casts the float32 master weights again in every chunk (~1.1 ms a chunk and pass for a
    DeepSeek-V3.2 dense layer on an H100); made before the loop and passed in, they are cast once."""
    return [compute_copy(p, dtype) for p in jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=_is_variable)]


def compute_copy(w: nnx.Param, dtype):
    """`compute_copies` for one weight: w cast to `dtype` without a gradient, or None for a vector or a weight
    already in `dtype`."""
    value, dtype = w[...], jnp.dtype(dtype)
    if value.ndim < 2 or not jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == dtype:
        return None
    return jax.lax.stop_gradient(value.astype(dtype))


def with_compute_copy(w: nnx.Param, copy) -> nnx.Param:
    """w, whose projections read `copy` (`compute_copy(w, ...)`, or None: w itself) instead of casting it."""
    return w if copy is None else w.replace(**{COMPUTE_COPY: copy})


def with_compute_copies(module: nnx.Module, copies: list) -> nnx.Module:
    """A module that computes as `module` (the same weight values, so their gradients are the same) whose
    projections read `copies` (from `compute_copies(module, ...)`) instead of casting the weights."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params, is_leaf=_is_variable)
    if len(leaves) != len(copies):
        raise ValueError(f"{len(copies)} compute copies for a module of {len(leaves)} Params")
    leaves = [with_compute_copy(p, c) for p, c in zip(leaves, copies, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


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
