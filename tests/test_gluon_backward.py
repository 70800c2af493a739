"""The Gluon kernels of the sparse MLA backward (`pallas_kernels.sparse_attention_backward_gluon`: d_kv, which
also stores dS, then d_q from dS) and their dispatch.

Gluon has no interpreter: on CPU the kernels are compiled for sm_90 (shared memory, spills, the dot shapes, the
vector stores and atomics), and the wrapper's padding, chunking over tokens and vmap folding run around stand-in
launches that compute each kernel's outputs from exactly what it is handed (padded operands, the chunk's first
token, the buffers it adds to or writes into). Their gradients are checked against the float32 reference's on a
Hopper GPU (tests marked gpu).
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
from pallas_kernels.sparse_attention import (GLUON_SMEM_BYTES, Tiles, gluon_backward_width_reason,
                                             gluon_d_kv_smem_bytes, gluon_d_q_parts, resolve_backward_kernel,
                                             sparse_mla_pallas)
from pallas_kernels.sparse_attention_reference import sparse_mla_reference

# (heads, R, P, slots) as the wrapper pads them
COMPILE_CASES = [(128, 512, 64, 2048), (64, 256, 32, 256), (64, 128, 64, 128), (64, 256, 128, 192)]


def _ptxas_log(ptx, tmp_path):
    from triton.backends.nvidia.compiler import get_ptxas
    (tmp_path / "kernel.ptx").write_text(ptx)
    return subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(tmp_path / "kernel.ptx"), "-o",
                           str(tmp_path / "kernel.cubin")], capture_output=True, text=True, check=True).stderr


def _assert_fits_registers(log):
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


def _wgmma_shapes(ptx):
    return Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_gluon_d_kv_compiles_with_slots_on_the_dot_rows_and_does_not_spill(case, tmp_path):
    """Per slot block: S^T and dP^T as m64n64 chains ((R + P) / 16 and R / 16 steps), then the scatter's dots from
    registers, m64n128 per 128 value columns (dS^T q and P^T dO: 2 x 4 steps) and m64nP for the rope columns
    (4 steps); one warpgroup, shared memory within the estimate the dispatch checks, 16-byte atomic adds, and dS
    stored in 16-byte pieces."""
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_backward_gluon")
    heads, r, p, k = case
    constants = gluon.kernel_constants((1, 5, heads, r + p), 300, k, r, 0.1, chunk=3)
    compiled, _ = _gluon.compile_gluon(gluon._d_kv_kernel, ["*bf16", "*bf16", "*i32", "*bf16", "*fp32", "*fp32",
                                                            "*i32", "*fp32", "*fp32", "*bf16"],
                                       num_warps=4, capability=90, constexprs=constants)
    assert compiled.metadata.num_warps == 4
    assert compiled.metadata.shared <= gluon_d_kv_smem_bytes(r, p) <= GLUON_SMEM_BYTES
    ptx = compiled.asm["ptx"]
    want = Counter({"m64n64k16": (r + p) // 16 + r // 16}) + Counter({"m64n128k16": r // 128 * 2 * 4})
    want += Counter({f"m64n{p}k16": 4})
    assert _wgmma_shapes(ptx) == want, _wgmma_shapes(ptx)
    atoms = re.findall(r"atom\.global\.gpu\.relaxed\.add\.(\w+)\.f32", ptx)
    assert atoms and set(atoms) == {"v4"}, set(atoms)
    assert set(re.findall(r"st\.global\.([\w.]+)", ptx)) == {"v4.b32"}  # dS, 8 slots per store
    _assert_fits_registers(_ptxas_log(ptx, tmp_path))


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_gluon_d_q_compiles_to_one_dot_per_column_part_and_does_not_spill(case, tmp_path):
    """Per slot block and warpgroup, two k = 64 chains (4 steps each) from shared memory: dS x the part's value
    columns and dS x its rope columns; 128 heads (8 warps) per program where the heads allow; a 4-deep ring of
    operands within shared memory; no spills."""
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_backward_gluon")
    heads, r, p, k = case
    warps, parts = gluon.d_q_warps(heads), gluon_d_q_parts(r, p)
    constants = gluon.d_q_kernel_constants((1, 5, heads, r + p), 300, k, r, chunk=3)
    compiled, _ = _gluon.compile_gluon(gluon._d_q_kernel, ["*bf16", "*i32", "*bf16", "*i32", "*bf16", "*bf16"],
                                       num_warps=warps, capability=90, constexprs=constants)
    assert compiled.metadata.num_warps == warps == (8 if heads == 128 else 4)
    ring = gluon.D_Q_STAGES * (16 * warps * 64 + 64 * (r + p) // parts) * 2
    assert ring <= compiled.metadata.shared <= ring + 1024 and compiled.metadata.shared <= GLUON_SMEM_BYTES
    assert _wgmma_shapes(compiled.asm["ptx"]) == Counter({f"m64n{r // parts}k16": 4}) + Counter(
        {f"m64n{p // parts}k16": 4}), _wgmma_shapes(compiled.asm["ptx"])
    _assert_fits_registers(_ptxas_log(compiled.asm["ptx"], tmp_path))


def test_gluon_d_kv_width_limits_and_the_kernel_choice():
    assert gluon_backward_width_reason(512, 64) is None  # DeepSeek-V3.2
    assert gluon_backward_width_reason(256, 128) is None and gluon_backward_width_reason(128, 16) is None
    assert "multiple of 128" in gluon_backward_width_reason(64, 64)
    assert "shared memory" in gluon_backward_width_reason(512, 128)  # fits the pieces, not the shared memory
    assert gluon_d_q_parts(512, 64) == 2 and gluon_d_q_parts(256, 32) == 1 and gluon_d_q_parts(256, 128) == 2
    assert "at least 16" in gluon_backward_width_reason(512, 16)  # d_q's 2 parts would get 8 rope columns each
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

def _chunk_rows(first, chunk, num_q):
    """The chunk's token ids and whether each exists (the last chunk's tail does not)."""
    tokens = first[0] + jnp.arange(chunk)
    return jnp.minimum(tokens, num_q - 1), tokens < num_q


def _stand_in_d_kv(q, kv, indices, d_out, lse, delta, first, d_kv_in, *, out_shape, grid, input_output_aliases,
                   **constants):
    """The d_kv kernel by the formulas of its docstring, in float32, for the chunk's tokens: d_kv_in plus their
    contributions, and their dS (scaled, rounded to the input dtype) as [B, CHUNK, H, K], garbage (NaN) for
    tokens past the end, which the d_q kernel must not read."""
    heads, value_dim, scale, chunk = constants["HEADS"], constants["VALUE_DIM"], constants["SCALE"], constants["CHUNK"]
    assert input_output_aliases == {7: 0} and d_kv_in.shape == out_shape[0].shape
    assert out_shape[1].shape == (q.shape[0], chunk, heads, indices.shape[-1]) and out_shape[1].dtype == q.dtype
    assert heads % 64 == 0 and indices.shape[-1] % 64 == 0 and indices.shape[-1] >= 128
    assert grid == (chunk * heads // 64, q.shape[0]) and constants["NUM_Q"] == q.shape[1]
    tokens, exists = _chunk_rows(first, chunk, q.shape[1])
    q, d_out, lse, delta, indices = (x[:, tokens] for x in (q, d_out, lse, delta, indices))
    q, kv, d_out = (x.astype(jnp.float32) for x in (q, kv, d_out))
    indices = jnp.where(exists[None, :, None], indices, -1)
    rows = kv[jnp.arange(kv.shape[0])[:, None, None], jnp.maximum(indices, 0)]  # [B, C, K, L]
    logits = jnp.einsum("bthl,btkl->bthk", q, rows)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    probs = jnp.where((indices >= 0)[:, :, None], jnp.exp(scale * logits - lse[..., None]), 0.0)
    d_probs = jnp.einsum("bthr,btkr->bthk", d_out, rows[..., :value_dim])
    d_logits = scale * probs * (d_probs - delta[..., None])
    contrib = jnp.einsum("bthk,bthl->btkl", d_logits, q)
    contrib = contrib.at[..., :value_dim].add(jnp.einsum("bthk,bthr->btkr", probs, d_out))
    contrib = jnp.where((indices >= 0)[..., None], contrib, 0.0)
    d_kv = jax.vmap(lambda d, c, i: d.at[jnp.maximum(i, 0)].add(c))(
        d_kv_in, contrib.reshape(contrib.shape[0], -1, contrib.shape[-1]), indices.reshape(indices.shape[0], -1))
    d_s = jnp.where(exists[None, :, None, None], d_logits, jnp.nan).astype(out_shape[1].dtype)
    return jax.pure_callback(lambda *x: x, tuple(out_shape), d_kv, d_s)


def _stand_in_d_q(kv, indices, d_s, first, d_q_in, *, out_shape, grid, input_output_aliases, **constants):
    """The d_q kernel: the chunk's existing tokens' rows of d_q_in replaced by dS . rows (in the input dtype)."""
    chunk, heads, parts = constants["CHUNK"], constants["HEADS"], constants["PARTS"]
    assert input_output_aliases == {4: 0} and d_q_in.shape == out_shape.shape and d_q_in.dtype == out_shape.dtype
    assert constants["VALUE_DIM"] + constants["ROPE_DIM"] == kv.shape[-1] and parts >= 1
    assert grid == (chunk * heads // (16 * constants["num_warps"]) * parts, kv.shape[0])
    tokens, exists = _chunk_rows(first, chunk, out_shape.shape[1])
    ids = indices[:, tokens]
    rows = kv[jnp.arange(kv.shape[0])[:, None, None], jnp.maximum(ids, 0)].astype(jnp.float32)
    rows = jnp.where((ids >= 0)[..., None], rows, 0.0)  # cp.async zero-fills -1 slots' rows
    d_q = jnp.einsum("bthk,btkl->bthl", d_s.astype(jnp.float32), rows).astype(out_shape.dtype)
    d_q = jax.vmap(lambda out, new: out.at[jnp.where(exists, tokens, out.shape[0])].set(new, mode="drop"))(
        d_q_in, d_q)
    return jax.pure_callback(lambda x: x, out_shape, d_q)


def _stand_in_launch(*arrays, kernel, out_shape, grid, num_warps, input_output_aliases, **constants):
    """`gluon_call` for `sparse_backward_gluon`'s two kernels, through callbacks with no batching rule (as
    jax-triton's)."""
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_backward_gluon")
    if kernel is gluon._d_kv_kernel:
        assert num_warps == 4
        return _stand_in_d_kv(*arrays, out_shape=out_shape, grid=grid, input_output_aliases=input_output_aliases,
                              **constants)
    assert kernel is gluon._d_q_kernel and num_warps == gluon.d_q_warps(constants["HEADS"])
    return _stand_in_d_q(*arrays, out_shape=out_shape, grid=grid, input_output_aliases=input_output_aliases,
                         num_warps=num_warps, **constants)


@pytest.fixture
def backward_stand_in(monkeypatch):
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


@pytest.mark.parametrize("d_s_bytes", [1 << 30, 2 * 2 * 64 * 128 * 3])  # one chunk; chunks of 3 tokens of 4
def test_gluon_backward_wrapper_pads_chunks_and_maps_under_vmap(backward_stand_in, monkeypatch, d_s_bytes):
    """The padding, chunking and vmap folding of `_gluon_backward` around the stand-in launches: d_q and d_kv from
    the forward's lse and delta (-1 and padded slots add nothing, the repeated row adds three times, padded widths
    and heads are cut or zero) equal autodiff of the reference, in one launch of each kernel or in chunks of 3
    tokens (the last chunk's tail skipped), unmapped and under jit(vmap) (one folded launch per chunk)."""
    from pallas_kernels import sparse_attention
    q, kv, idx = _inputs(1, 2, 4, 40, 20, 96, 24, 70, jnp.float32)  # heads 20 -> 64, R 96 -> 128, P 24 -> 32
    d_out = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:3] + (96,)), jnp.float32)
    out = sparse_mla_reference(q, kv, idx, scale=0.3, value_dim=96)
    logits = jnp.einsum("bthl,btkl->bthk", q, kv[jnp.arange(2)[:, None, None], jnp.maximum(idx, 0)]) * 0.3
    lse = jax.nn.logsumexp(jnp.where((idx >= 0)[:, :, None], logits, -jnp.inf), axis=-1)
    delta = jnp.sum(d_out * out, axis=-1)
    want_q, want_kv = _reference_gradients(q, kv, idx, d_out, 96)
    monkeypatch.setattr(sparse_attention, "_gluon_unavailable", lambda *a: None)
    assert backward_stand_in.chunk_tokens(2, 4, 64, 128, d_s_bytes) == (4 if d_s_bytes > 1e6 else 3)

    def gradients(q_, kv_, idx_, d_out_, lse_, delta_):
        return sparse_attention._gluon_backward(q_, kv_, idx_, d_out_, lse_, delta_, scale=0.3, value_dim=96,
                                                d_s_bytes=d_s_bytes)

    def unpadded(d_q, d_kv):
        assert d_q.shape[-2:] == (64, 160) and d_kv.shape[-1] == 160
        assert not jnp.any(d_q[..., 20:, :]) and not jnp.any(d_kv[..., 96:128]) and not jnp.any(d_kv[..., 152:])
        return (jnp.concatenate([x[..., :96], x[..., 128:152]], axis=-1) for x in (d_q[..., :20, :], d_kv))

    got_q, got_kv = unpadded(*gradients(q, kv, idx, d_out, lse, delta))
    assert rel_err(got_q, want_q) < 1e-5 and rel_err(got_kv, want_kv) < 1e-5
    stacked = [jnp.stack([x, x]) for x in (q, kv, idx, d_out, lse, delta)]
    got_q, got_kv = unpadded(*jax.jit(jax.vmap(gradients))(*stacked))
    assert got_kv.shape == (2,) + want_kv.shape and rel_err(got_kv[1], want_kv) < 1e-5
    assert got_q.shape == (2,) + want_q.shape and rel_err(got_q[1], want_q) < 1e-5
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
def test_gluon_backward_equals_reference_gradients(shape, dtype):
    """d_q and d_kv by the Gluon kernels against autodiff of the float32 reference, each as close as the Pallas
    kernels' (their dS is rounded to the input dtype at other points)."""
    _require_gluon()
    q, kv, idx = _inputs(3, *shape, dtype)
    value_dim = shape[4]
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape[:3] + (value_dim,)), dtype)
    want = _reference_gradients(q, kv, idx, d_out, value_dim)
    got = _gradients(q, kv, idx, d_out, value_dim, "gluon")
    pallas = _gradients(q, kv, idx, d_out, value_dim, "pallas")
    for name, g, p, w in zip(("d_q", "d_kv"), got, pallas, want, strict=True):
        assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all(), name
        error, pallas_error = rel_err(g, w), rel_err(p, w)
        assert error < (1.5e-2 if dtype == jnp.bfloat16 else 4e-3) and error < 1.5 * pallas_error + 1e-3, (
            name, error, pallas_error)


@pytest.mark.gpu
def test_gluon_backward_in_chunks_equals_one_launch():
    """A small dS budget: chunks of 3 tokens of 7 (the last chunk's tail skipped) give the one-launch result, d_q
    bit for bit (each token's is computed alone), d_kv up to the order of its atomic adds."""
    _require_gluon()
    q, kv, idx = _inputs(7, 2, 7, 600, 128, 512, 64, 256, jnp.bfloat16)
    d_out = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape[:3] + (512,)), jnp.bfloat16)

    def gradients(d_s_bytes):
        tiles = Tiles(forward_kernel="pallas", backward_kernel="gluon", backward_d_s_bytes=d_s_bytes)
        _, vjp = jax.vjp(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.3, value_dim=512, tiles=tiles),
                         q, kv)
        return vjp(d_out)

    one_q, one_kv = gradients(0)
    chunked_q, chunked_kv = gradients(2 * 2 * 128 * 256 * 3)
    np.testing.assert_array_equal(np.asarray(chunked_q, np.float32), np.asarray(one_q, np.float32))
    assert rel_err(chunked_kv, one_kv) < 1e-2  # bf16 output: the fp32 sums differ in their last bits


@pytest.mark.gpu
def test_gluon_backward_under_vmap_and_jit_equals_the_unmapped_gradients():
    _require_gluon()
    q, kv, idx = _inputs(5, 2, 4, 400, 32, 128, 64, 200, jnp.bfloat16)
    d_out = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape[:3] + (128,)), jnp.bfloat16)
    qs = jnp.stack([q, -q, q[:, ::-1]])
    got_q, got_kv = jax.jit(jax.vmap(lambda q_: _gradients(q_, kv, idx, d_out, 128, "gluon")))(qs)
    for v in range(3):
        want_q, want_kv = _gradients(qs[v], kv, idx, d_out, 128, "gluon")
        np.testing.assert_array_equal(np.asarray(got_q[v], np.float32), np.asarray(want_q, np.float32))
        assert rel_err(got_kv[v], want_kv) < 1e-6
