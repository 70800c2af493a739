"""The sparse stages' distillation target on the GPU kernel (`pallas_kernels.sparse_distribution`) against the
float32 reference: the head-averaged attention distribution over each query's slots, with the forward's
log-sum-exp and without it (the kernel's own first pass), and the log-sum-exp output of `sparse_mla` that feeds it,
gradients included. Interpret mode on CPU; on a GPU also the compiled kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from conftest import rel_err
from pallas_kernels import dispatch
from pallas_kernels.sparse_attention import sparse_mla_pallas
from pallas_kernels.sparse_attention_reference import sparse_attention_distribution_reference, sparse_mla_reference
from pallas_kernels.sparse_distribution import sparse_attention_distribution_pallas
from test_pallas_kernels import IMPLS, ON_GPU, SPARSE_SHAPE_WIDE, SPARSE_SHAPES, _flags, _sparse_inputs

SCALE = 0.3
# The kernels under test: the Pallas kernel in interpret mode; on a GPU also compiled, and the Gluon kernel in both
# program shapes (Hopper, bf16 only: a test gives it its bf16 inputs, and runs the Pallas kernel for the rest).
KERNELS = ["interpret"] + (["pallas", "gluon-all_heads", "gluon-half_heads"] if ON_GPU else [])
# heads 20 over blocks of 16: two head blocks, the second with 12 padded heads
TILES = dict(block_h=16, block_k=16)


def _distribution(kernel, q, kv, idx, lse, value_dim):
    if kernel.startswith("gluon") and (lse is None or q.dtype != jnp.bfloat16):
        kernel = "pallas"  # the Gluon kernel takes bf16 inputs and the forward's lse
    if kernel.startswith("gluon"):
        return sparse_attention_distribution_pallas(q, kv, idx, lse, scale=SCALE, value_dim=value_dim,
                                                    kernel="gluon", gluon_shape=kernel.split("-")[1])
    return sparse_attention_distribution_pallas(q, kv, idx, lse, scale=SCALE, value_dim=value_dim, **TILES,
                                                kernel="pallas", interpret=kernel == "interpret")


def _forward_lse(kernel, q, kv, idx, value_dim):
    impl = "interpret" if kernel == "interpret" else "pallas"
    return sparse_mla_pallas(q, kv, idx, scale=SCALE, value_dim=value_dim, return_lse=True, **_flags(impl))[1]


def _want(q, kv, idx):
    with jax.default_matmul_precision("highest"):
        return sparse_attention_distribution_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx,
                                                       scale=SCALE)


def _tol(kernel, dtype):
    return 1e-5 if kernel == "interpret" and dtype == jnp.float32 else 2e-3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SPARSE_SHAPES + [SPARSE_SHAPE_WIDE])
def test_distribution_equals_reference_with_and_without_the_forward_lse(kernel, dtype, shape):
    """Ragged shapes: heads, widths and slot counts off the tiles, -1 slots, and query 0 of each row without a
    valid slot (its distribution is all zero, every other one sums to 1)."""
    q, kv, idx = _sparse_inputs(2, *shape, dtype)
    value_dim = shape[4]
    want = _want(q, kv, idx)
    lse = _forward_lse(kernel, q, kv, idx, value_dim)
    for given in (lse, None):
        got = _distribution(kernel, q, kv, idx, given, value_dim)
        assert got.shape == idx.shape and got.dtype == jnp.float32
        assert rel_err(got, want) < _tol(kernel, dtype), given is None
        np.testing.assert_array_equal(np.asarray(got)[np.asarray(idx) < 0], 0.0)
        sums = np.asarray(got).sum(-1)
        np.testing.assert_array_equal(sums[:, 0], 0.0)
        np.testing.assert_allclose(sums[:, 1:], 1.0, rtol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_distribution_with_invalid_slots_anywhere_over_several_blocks(kernel):
    """200 slots (4 blocks of the Gluon kernel's 64, 13 of the Pallas tiles here) with the -1 slots shuffled among
    the valid ones in every block, and 72 heads, padded in either Gluon shape: each block must mask its own -1s."""
    q, kv, idx = _sparse_inputs(5, 1, 6, 300, 72, 128, 64, 200, jnp.bfloat16)
    idx = jnp.asarray(np.random.default_rng(0).permuted(np.asarray(idx), axis=-1))
    got = _distribution(kernel, q, kv, idx, _forward_lse(kernel, q, kv, idx, 128), 128)
    assert rel_err(got, _want(q, kv, idx)) < 2e-3
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(idx) < 0], 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_distribution_where_whole_slot_blocks_are_empty(kernel):
    """Rows whose valid slots end inside, at the edge of, or before whole 16-slot blocks of -1 (skipped blocks
    must store zeros), one with -1 between valid slots, and repeated ids (each occurrence has its own share, as
    in the attention)."""
    dtype = jnp.float32 if kernel in ("interpret", "pallas") else jnp.bfloat16
    q, kv, _ = _sparse_inputs(9, 1, 6, 80, 20, 16, 16, 64, dtype)
    rng = np.random.default_rng(10)
    idx = np.full((1, 6, 64), -1, np.int32)
    for t, count in enumerate((1, 16, 17, 40, 64)):
        idx[0, t, :count] = np.sort(rng.choice(80, count, replace=False))
    idx[0, 5, [3, 48, 49, 50]] = [5, 70, 5, 70]
    idx = jnp.asarray(idx)
    want = _want(q, kv, idx)
    lse = _forward_lse(kernel, q, kv, idx, 16)
    for given in (lse, None):
        got = _distribution(kernel, q, kv, idx, given, 16)
        assert rel_err(got, want) < _tol(kernel, dtype), given is None
        np.testing.assert_array_equal(np.asarray(got)[np.asarray(idx) < 0], 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_distribution_under_jit_and_vmap_equals_unmapped(kernel):
    q, kv, idx = _sparse_inputs(4, 2, 5, 30, 20, 8, 4, 7, jnp.bfloat16)
    lse = _forward_lse(kernel, q, kv, idx, 8)

    def one(q_, kv_, idx_, lse_):
        return _distribution(kernel, q_, kv_, idx_, lse_, 8)
    mapped = jax.jit(jax.vmap(one))(q[:, None], kv[:, None], idx[:, None], lse[:, None])[:, 0]
    np.testing.assert_allclose(mapped, one(q, kv, idx, lse), rtol=1e-6, atol=1e-7)


def test_gluon_kernel_choice_is_validated():
    q, kv, idx = _sparse_inputs(4, 2, 5, 30, 4, 8, 4, 7, jnp.bfloat16)
    with pytest.raises(ValueError, match="gluon_shape"):
        sparse_attention_distribution_pallas(q, kv, idx, scale=SCALE, value_dim=8, gluon_shape="wide")
    with pytest.raises(ValueError, match="kernel must be one of"):
        sparse_attention_distribution_pallas(q, kv, idx, scale=SCALE, value_dim=8, kernel="cuda")
    with pytest.raises(ValueError, match="lse"):  # the Gluon kernel needs the forward's lse, on any platform
        sparse_attention_distribution_pallas(q, kv, idx, scale=SCALE, value_dim=8, kernel="gluon")


def test_distribution_errors_name_the_offending_input():
    q, kv, idx = _sparse_inputs(4, 2, 5, 30, 4, 8, 4, 7, jnp.float32)
    with pytest.raises(ValueError, match="lse"):
        sparse_attention_distribution_pallas(q, kv, idx, jnp.zeros((2, 5, 3)), scale=SCALE, value_dim=8,
                                             interpret=True)
    with pytest.raises(ValueError, match="kv"):
        sparse_attention_distribution_pallas(q, kv[:, :, :-1], idx, scale=SCALE, value_dim=8, interpret=True)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention_distribution_pallas(q, kv, idx[:, :4], scale=SCALE, value_dim=8, interpret=True)


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_dispatch_gives_the_target_with_the_attentions_lse_and_no_gradient(impl):
    """The model's path: `sparse_mla(..., return_lse=True)` then `sparse_attention_distribution(lse=...)`, in every
    implementation; the target is constant (zero gradient), the attention's gradient is not."""
    q, kv, idx = _sparse_inputs(6, 2, 5, 30, 20, 8, 4, 7, jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(idx.shape), jnp.float32)

    def target_objective(q_, kv_):
        _, lse = pallas_kernels.sparse_mla(q_, kv_, idx, scale=SCALE, value_dim=8, impl=impl, return_lse=True)
        dist = pallas_kernels.sparse_attention_distribution(q_, kv_, idx, scale=SCALE, value_dim=8, lse=lse,
                                                            impl=impl)
        return jnp.sum(dist * weights), dist

    (_, got), grads = jax.value_and_grad(target_objective, argnums=(0, 1), has_aux=True)(q, kv)
    assert rel_err(got, _want(q, kv, idx)) < (2e-3 if impl == "pallas" else 1e-5)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


# widths the Gluon forward and backward take (R a multiple of 128, 64 heads): on a GPU the bf16 case runs them
GLUON_WIDTHS = (1, 3, 200, 64, 128, 64, 128)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol,shape", [(jnp.float32, 1e-5, SPARSE_SHAPES[1]),
                                             (jnp.bfloat16, 3e-2, SPARSE_SHAPES[1]),
                                             (jnp.bfloat16, 3e-2, GLUON_WIDTHS)])
def test_sparse_mla_lse_and_its_gradient_equal_reference(impl, dtype, tol, shape):
    """lse is an output of the kernels' custom_vjp: its cotangent folds into the backward's delta (d logit_j
    gains d_lse p_j). Values and gradients of out and lse together against autodiff of the float32 reference;
    query 0 has no valid slot (lse = -inf, no gradient)."""
    q, kv, idx = _sparse_inputs(5, *shape, dtype)
    value_dim = shape[4]
    rng = np.random.default_rng(6)
    d_out = jnp.asarray(rng.standard_normal(q.shape[:3] + (value_dim,)), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)

    def objective(fn):
        def run(q_, kv_):
            out, lse = fn(q_, kv_)
            finite = jnp.isfinite(lse)
            return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(jnp.where(finite, lse, 0.0) * d_lse), lse
        return run

    with jax.default_matmul_precision("highest"):
        (_, want_lse), want_grads = jax.value_and_grad(objective(
            lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=SCALE, value_dim=value_dim, return_lse=True)),
            argnums=(0, 1), has_aux=True)(q.astype(jnp.float32), kv.astype(jnp.float32))
        (_, got_lse), got_grads = jax.value_and_grad(objective(
            lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=SCALE, value_dim=value_dim, return_lse=True,
                                              **_flags(impl))), argnums=(0, 1), has_aux=True)(q, kv)
    assert np.all(np.asarray(got_lse[:, 0]) == -np.inf)
    assert rel_err(got_lse[:, 1:], want_lse[:, 1:]) < (1e-5 if dtype == jnp.float32 else 2e-3)
    tol = max(tol, 2e-3) if impl == "pallas" else tol
    for got, want in zip(got_grads, want_grads, strict=True):
        assert rel_err(got, want) < tol
    # the lse's share of the gradient is not negligible: dropping it must fail the check above
    with jax.default_matmul_precision("highest"):
        without = jax.grad(lambda q_: jnp.sum(sparse_mla_reference(q_, kv.astype(jnp.float32), idx, scale=SCALE,
                                                                   value_dim=value_dim) * d_out))(
            q.astype(jnp.float32))
    assert rel_err(without, want_grads[0]) > 3 * tol


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_decode_returns_the_lse_of_all_splits(impl):
    q, kv, idx = _sparse_inputs(3, 2, 4, 40, 4, 16, 16, 40, jnp.float32)
    with jax.default_matmul_precision("highest"):
        _, want = sparse_mla_reference(q, kv, idx, scale=SCALE, value_dim=16, return_lse=True)
        out, lse = dispatch.sparse_mla(q[:, 2:3], kv, idx[:, 2:3], scale=SCALE, value_dim=16, impl=impl,
                                       return_lse=True)
    assert out.shape == (2, 1, 4, 16) and lse.shape == (2, 1, 4)
    assert rel_err(lse[:, 0], want[:, 2]) < (2e-3 if impl == "pallas" else 1e-5)


# (heads, R, P, K) padded, as the wrapper passes them
GLUON_COMPILE_CASES = [(128, 512, 64, 2048), (128, 16, 16, 128), (256, 256, 32, 384)]


@pytest.mark.parametrize("shape", ["all_heads", "half_heads"])
@pytest.mark.parametrize("case", GLUON_COMPILE_CASES)
def test_gluon_kernel_compiles_for_hopper_within_its_shared_memory_and_does_not_spill(case, shape, tmp_path):
    """Gluon has no interpreter: compiled for sm_90 on any machine, the kernel fits the shared memory that the
    dispatch's check assumes, issues one m64n64 dot per 16 latent columns with q from registers (the A operand a
    register vector, not a shared-memory descriptor) and keeps its registers."""
    import re

    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import _gluon
    from pallas_kernels import sparse_distribution_gluon as gluon
    from pallas_kernels.sparse_distribution import gluon_smem_bytes
    from test_gluon_kernels import SMEM_LIMIT, _ptxas_log
    heads, r, p, k = case
    constants = gluon.kernel_constants((1, 5, heads, r + p), 300, k, r, 0.1, shape)
    compiled, _ = _gluon.compile_gluon(gluon._distribution_kernel, ["*bf16", "*bf16", "*i32", "*fp32", "*fp32"],
                                       num_warps=gluon.num_warps_for(shape), capability=90, constexprs=constants)
    assert compiled.metadata.shared <= gluon_smem_bytes(r, p, shape) <= SMEM_LIMIT
    ptx = compiled.asm["ptx"]
    dots = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.bf16\.bf16 \{[^}]*\}, (\S)", ptx)
    assert dots == [("m64n64k16", "{")] * ((r + p) // 16), dots
    log = _ptxas_log(ptx, tmp_path)
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


def test_gluon_shape_and_width_limits():
    """"auto" takes 64 heads per program up to 64 heads; latent widths past the register-resident q's limit are
    left to the Pallas kernel, with the reason."""
    from pallas_kernels.sparse_distribution import _gluon_unavailable, gluon_shape_for
    assert [gluon_shape_for(h) for h in (1, 64, 65, 128, 256)] == ["half_heads"] * 2 + ["all_heads"] * 3
    q = jnp.zeros((1, 2, 4, 512 + 128), jnp.bfloat16)
    lse = jnp.zeros((1, 2, 4), jnp.float32)
    assert "576 columns" in _gluon_unavailable(q, q[:, :, 0], lse, 512)
