"""The Gluon d_kv kernel of the sparse MLA backward (`pallas_kernels.sparse_attention_backward_gluon`) and its
dispatch.

Gluon has no interpreter: on CPU the kernel is compiled for sm_90 (shared memory, spills, the dot shapes of the
transposed schedule), and the wrapper's padding and vmap folding run around a stand-in launch that computes d_kv
from exactly what the kernel is handed (padded q, dO, ids, lse, delta). Its gradients are checked against the
float32 reference's on a Hopper GPU (tests marked gpu).
"""

import re
import subprocess
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from pallas_kernels import _gluon
from pallas_kernels.sparse_attention import (GLUON_SMEM_BYTES, Tiles, gluon_d_kv_smem_bytes,
                                             gluon_d_kv_width_reason, resolve_backward_kernel, sparse_mla_pallas)
from pallas_kernels.sparse_attention_reference import sparse_mla_reference

# (heads, R, P, slots) as the wrapper pads them
COMPILE_CASES = [(128, 512, 64, 2048), (64, 256, 32, 256), (64, 128, 64, 128), (64, 256, 128, 192)]


def _compile(heads, r, p, k):
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_backward_gluon")
    constants = gluon.kernel_constants((1, 5, heads, r + p), 300, k, r, 0.1)
    compiled, _ = _gluon.compile_gluon(gluon._d_kv_kernel, ["*bf16", "*bf16", "*i32", "*bf16"] + ["*fp32"] * 4,
                                       num_warps=4, capability=90, constexprs=constants)
    return compiled


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_gluon_d_kv_compiles_with_slots_on_the_dot_rows_and_does_not_spill(case, tmp_path):
    """Per slot block: S^T and dP^T as m64n64 chains ((R + P) / 16 and R / 16 steps), then the scatter's dots from
    registers, m64n128 per 128 value columns (dS^T q and P^T dO: 2 x 4 steps) and m64nP for the rope columns
    (4 steps); one warpgroup, shared memory within the estimate the dispatch checks, 16-byte atomic adds."""
    from triton.backends.nvidia.compiler import get_ptxas
    heads, r, p, k = case
    compiled = _compile(*case)
    assert compiled.metadata.num_warps == 4
    assert compiled.metadata.shared <= gluon_d_kv_smem_bytes(r, p) <= GLUON_SMEM_BYTES
    ptx = compiled.asm["ptx"]
    shapes = Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    want = Counter({"m64n64k16": (r + p) // 16 + r // 16}) + Counter({"m64n128k16": r // 128 * 2 * 4})
    want += Counter({f"m64n{p}k16": 4})
    assert shapes == want, shapes
    atoms = re.findall(r"atom\.global\.gpu\.relaxed\.add\.(\w+)\.f32", ptx)
    assert atoms and set(atoms) == {"v4"}, set(atoms)
    (tmp_path / "kernel.ptx").write_text(ptx)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(tmp_path / "kernel.ptx"), "-o",
                          str(tmp_path / "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


def test_gluon_d_kv_width_limits_and_the_kernel_choice():
    assert gluon_d_kv_width_reason(512, 64) is None  # DeepSeek-V3.2
    assert gluon_d_kv_width_reason(256, 128) is None and gluon_d_kv_width_reason(128, 16) is None
    assert "multiple of 128" in gluon_d_kv_width_reason(64, 64)
    assert "shared memory" in gluon_d_kv_width_reason(512, 128)  # fits the pieces, not the shared memory
    assert resolve_backward_kernel("pallas", False, jnp.bfloat16, 512, 64) == "pallas"
    assert resolve_backward_kernel("auto", True, jnp.bfloat16, 512, 64) == "pallas"  # interpret mode
    assert resolve_backward_kernel("auto", False, jnp.bfloat16, 64, 64) == "pallas"  # too narrow for the kernel
    assert resolve_backward_kernel("auto", False, jnp.float32, 512, 64) == "pallas"
    with pytest.raises(ValueError, match="backward_kernel must be one of"):
        resolve_backward_kernel("triton", False, jnp.bfloat16, 512, 64)
    with pytest.raises(ValueError, match="backward_kernel='gluon' cannot run: it takes value widths"):
        resolve_backward_kernel("gluon", False, jnp.bfloat16, 48, 16)
    with pytest.raises(ValueError, match="backward_kernel='gluon' cannot run: .*float32"):
        resolve_backward_kernel("gluon", False, jnp.float32, 128, 64)
    with pytest.raises(ValueError, match="backward_kernel='gluon' cannot run: the Pallas interpreter"):
        resolve_backward_kernel("gluon", True, jnp.bfloat16, 128, 64)
    if not _gluon.available():
        assert resolve_backward_kernel("auto", False, jnp.bfloat16, 512, 64) == "pallas"


# ---- on CPU: the wrapper around a stand-in launch -----------------------------------------------------------------

def _stand_in_launch(q, kv, indices, d_out, lse, delta, zeros, *, kernel, out_shape, grid, num_warps,
                     input_output_aliases, **constants):
    """`gluon_call` for `sparse_d_kv_gluon`: d_kv by the formulas of the kernel's docstring, in float32, from the
    padded operands and constants it is handed, through a callback with no batching rule (as jax-triton's)."""
    del kernel, num_warps
    assert input_output_aliases == {6: 0} and zeros.shape == out_shape.shape  # d_kv starts at zero
    heads, value_dim, scale = constants["HEADS"], constants["VALUE_DIM"], constants["SCALE"]
    assert heads % 64 == 0 and indices.shape[-1] % 64 == 0 and indices.shape[-1] >= 128
    assert grid == (q.shape[1] * heads // 64, q.shape[0])
    q, kv, d_out = (x.astype(jnp.float32) for x in (q, kv, d_out))
    rows = kv[jnp.arange(kv.shape[0])[:, None, None], jnp.maximum(indices, 0)]  # [B, T, K, L]
    logits = jnp.einsum("bthl,btkl->bthk", q, rows)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    probs = jnp.where((indices >= 0)[:, :, None], jnp.exp(scale * logits - lse[..., None]), 0.0)
    d_probs = jnp.einsum("bthr,btkr->bthk", d_out, rows[..., :value_dim])
    d_logits = scale * probs * (d_probs - delta[..., None])
    contrib = jnp.einsum("bthk,bthl->btkl", d_logits, q)
    contrib = contrib.at[..., :value_dim].add(jnp.einsum("bthk,bthr->btkr", probs, d_out))
    contrib = jnp.where((indices >= 0)[..., None], contrib, 0.0)
    d_kv = jax.vmap(lambda c, i: jnp.zeros(out_shape.shape[1:], jnp.float32).at[jnp.maximum(i, 0)].add(c))(
        contrib.reshape(contrib.shape[0], -1, contrib.shape[-1]), indices.reshape(indices.shape[0], -1))
    return jax.pure_callback(lambda x: x, out_shape, d_kv)


@pytest.fixture
def d_kv_stand_in(monkeypatch):
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_backward_gluon")  # needs triton, not a GPU
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(gluon, "gluon_call", _stand_in_launch)
    return gluon


def _inputs(seed, b, t, s, h, r, p, k, dtype, holes=0.3):
    """Random q, kv and slot rows with keys shared between queries, -1 slots anywhere, a query with no valid slot
    and a row repeated within one query."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, r + p)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, s, r + p)), dtype)
    idx = rng.integers(0, s, (b, t, k)).astype(np.int32)
    idx[rng.random(idx.shape) < holes] = -1
    idx[:, 0] = -1
    idx[:, 1 % t, :3] = 5 % s  # one row taken three times by one query: added once per occurrence
    return q, kv, jnp.asarray(idx)


def _gradients(q, kv, idx, d_out, value_dim, backward_kernel, scale=0.3):
    _, vjp = jax.vjp(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=scale, value_dim=value_dim,
                                                       tiles=Tiles(forward_kernel="pallas",
                                                                   backward_kernel=backward_kernel)), q, kv)
    return vjp(d_out)


def _reference_gradients(q, kv, idx, d_out, value_dim, scale=0.3):
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=scale, value_dim=value_dim),
                         q.astype(jnp.float32), kv.astype(jnp.float32))
        return vjp(d_out.astype(jnp.float32))


def test_gluon_d_kv_wrapper_pads_heads_slots_and_widths_and_maps_under_vmap(d_kv_stand_in, monkeypatch):
    """The padding and vmap folding of `_gluon_d_kv` around the stand-in launch: d_kv from the forward's lse and
    delta (-1 and padded slots add nothing, the repeated row adds three times, padded widths and heads are cut or
    zero) equals autodiff of the reference, unmapped and under jit(vmap) (one folded launch)."""
    from pallas_kernels import sparse_attention
    q, kv, idx = _inputs(1, 2, 4, 40, 20, 96, 24, 70, jnp.float32)  # heads 20 -> 64, R 96 -> 128, P 24 -> 32
    d_out = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:3] + (96,)), jnp.float32)
    out = sparse_mla_reference(q, kv, idx, scale=0.3, value_dim=96)
    logits = jnp.einsum("bthl,btkl->bthk", q, kv[jnp.arange(2)[:, None, None], jnp.maximum(idx, 0)]) * 0.3
    lse = jax.nn.logsumexp(jnp.where((idx >= 0)[:, :, None], logits, -jnp.inf), axis=-1)
    delta = jnp.sum(d_out * out, axis=-1)
    want = _reference_gradients(q, kv, idx, d_out, 96)[1]
    monkeypatch.setattr(sparse_attention, "_gluon_unavailable", lambda *a: None)

    def d_kv(q_, kv_, idx_, d_out_, lse_, delta_):
        padded = sparse_attention._gluon_d_kv(q_, kv_, idx_, d_out_, lse_, delta_, scale=0.3, value_dim=96)
        return jnp.concatenate([padded[..., :96], padded[..., 128:152]], axis=-1)

    assert rel_err(d_kv(q, kv, idx, d_out, lse, delta), want) < 1e-5
    stacked = [jnp.stack([x, x]) for x in (q, kv, idx, d_out, lse, delta)]
    got = jax.jit(jax.vmap(d_kv))(*stacked)
    assert got.shape == (2,) + want.shape and rel_err(got[1], want) < 1e-5
    assert resolve_backward_kernel("auto", False, jnp.bfloat16, 96, 24) == "gluon"


# ---- on a Hopper GPU -----------------------------------------------------------------------------------------

def _require_gluon():
    if not _gluon.available():
        pytest.skip(str(_gluon.unavailable_reason()))


# (B, T, S, H, R, P, K): padded heads, slots not a multiple of 64, R padded, DeepSeek-V3.2, wider rope, batch 2
GPU_SHAPES = [(2, 5, 300, 20, 128, 64, 100), (1, 6, 3000, 128, 512, 64, 2048), (2, 4, 500, 64, 256, 32, 600),
              (1, 3, 900, 96, 256, 128, 300), (2, 3, 70, 16, 96, 24, 130)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.gpu
def test_gluon_d_kv_equals_reference_gradients(shape, dtype):
    """d_kv by the Gluon kernel against autodiff of the float32 reference, as close as the Pallas kernel's; d_q
    (Pallas in both) equal."""
    _require_gluon()
    q, kv, idx = _inputs(3, *shape, dtype)
    value_dim = shape[4]
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape[:3] + (value_dim,)), dtype)
    want_q, want_kv = _reference_gradients(q, kv, idx, d_out, value_dim)
    got_q, got_kv = _gradients(q, kv, idx, d_out, value_dim, "gluon")
    pallas_q, pallas_kv = _gradients(q, kv, idx, d_out, value_dim, "pallas")
    assert got_kv.dtype == dtype and np.isfinite(np.asarray(got_kv, np.float32)).all()
    error, pallas_error = rel_err(got_kv, want_kv), rel_err(pallas_kv, want_kv)
    assert error < (1.5e-2 if dtype == jnp.bfloat16 else 4e-3) and error < 1.5 * pallas_error + 1e-3, (
        error, pallas_error)
    np.testing.assert_array_equal(np.asarray(got_q, np.float32), np.asarray(pallas_q, np.float32))
    assert rel_err(got_q, want_q) < 1.5e-2


@pytest.mark.gpu
def test_gluon_d_kv_under_vmap_and_jit_equals_the_unmapped_gradients():
    _require_gluon()
    q, kv, idx = _inputs(5, 2, 4, 400, 32, 128, 64, 200, jnp.bfloat16)
    d_out = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape[:3] + (128,)), jnp.bfloat16)
    qs = jnp.stack([q, -q, q[:, ::-1]])
    got = jax.jit(jax.vmap(lambda q_: _gradients(q_, kv, idx, d_out, 128, "gluon")[1]))(qs)
    for v in range(3):
        want = _gradients(qs[v], kv, idx, d_out, 128, "gluon")[1]
        assert rel_err(got[v], want) < 1e-6
