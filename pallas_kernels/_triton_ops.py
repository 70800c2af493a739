"""Two operations that Pallas's Triton lowering emits in a slow form, re-lowered to the form Hopper runs fast.

Both hook into private jax modules (`jax._src.pallas.triton`), so each one checks at import that the names it
needs exist, and otherwise falls back to the public Pallas operation (correct, slower). The CPU tests run the
kernels in interpret mode, where both have the plain operation's semantics; the GPU tests compile them
(tests/test_pallas_kernels.py, tests/test_distill.py).

`fp8_dot_nt(a, b)`, fp8 x fp8 -> fp32. Pallas lowers `lax.dot_general` to `tt.dot` with maxNumImpreciseAcc = 0,
and Triton picks Hopper's fp8 tensor-core instruction (wgmma) only when it may let the tensor core's own
accumulator, narrower than fp32 for fp8, sum at least 32 products. With 0 it falls back to mma.sync, which has no
fp8 form on Hopper: an H100 profile of the fp8 indexer showed no wgmma, 255 registers and a kernel slower than
bf16. Here `tt.dot` gets maxNumImpreciseAcc = the contraction length: each dot is one tensor-core accumulation
chain, then fp32 (DeepGEMM promotes to fp32 every 128 products too; the indexer's dots contract 128). Measured:
the fp8 indexer-scores kernel went from 279 to 513 TFLOP/s at 32K (docs/BENCHMARKS.md). Elsewhere the dot is exact
in fp32 (products of two e4m3 values are exact in fp32).

`atomic_add_relaxed(ref, idx, val)`: `pltriton.atomic_add` emits acq_rel atomics, which also order every other
memory access of the thread around each add. Gradient accumulation needs only atomicity (nothing reads the
buffer before the kernel ends), so this emits relaxed ones. In interpret mode it is a scatter-add, so lanes that
name the same element all add, as on the GPU (Pallas's own rule keeps one of them). Measured on an H100, sparse MLA
backward at 32K with 1024 queries: 24.9 ms with acq_rel adds, 17.8 ms relaxed, 17.0 ms with plain stores in their
place (a wrong result, to see what the atomics still cost).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

_CONTRACT_LAST = (((1,), (1,)), ((), ()))


def _exact(a, b):
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), _CONTRACT_LAST,
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _make_fp8_dot():
    """The fp8_dot_nt primitive, or None when this jax's Triton lowering is not where we expect it."""
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import mlir
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as triton_lowering
        rules, zeros = triton_lowering.triton_lowering_rules, triton_lowering._zeros
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jax release
        return None
    primitive = jax_core.Primitive("fp8_dot_nt")

    def abstract_eval(a, b):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"fp8_dot_nt takes a [M, K] and b [N, K], got {a.shape} and {b.shape}")
        return jax_core.ShapedArray((a.shape[0], b.shape[0]), jnp.float32)

    def triton_rule(ctx, a, b):
        (m, k), (n, _) = ctx.avals_in[0].shape, ctx.avals_in[1].shape
        acc = zeros(ir.RankedTensorType.get([m, n], ir.F32Type.get()))
        return tt_dialect.dot(a, tt_dialect.trans(b, (1, 0)), acc, max_num_imprecise_acc=k)

    primitive.def_impl(_exact)
    primitive.def_abstract_eval(abstract_eval)
    mlir.register_lowering(primitive, mlir.lower_fun(_exact, multiple_results=False))
    rules[primitive] = triton_rule
    return primitive


def _make_relaxed_add():
    """The relaxed atomic-add primitive (same operands and interpreter semantics as Pallas's atomic_rmw), or None
    when this jax's Triton lowering is not where we expect it."""
    try:
        from jax._src import core as jax_core
        from jax._src import state
        from jax._src import tree_util
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas import primitives as pallas_primitives
        from jax._src.pallas.triton import lowering as triton_lowering
        from jax._src.pallas.triton import primitives as triton_primitives
        from jax._src.state import discharge as state_discharge
        from jax._src.state import indexing
        from jax._src.state import primitives as state_primitives
        swap_abstract_eval = pallas_primitives._swap_abstract_eval
        pallas_discharge = functools.partial(triton_primitives._atomic_rmw_discharge_rule,
                                             atomic_type=triton_primitives.AtomicOpType.ADD)
        pointers = triton_lowering._compute_pointers_from_indices
        as_value, atomic_rmw = triton_lowering._ensure_ir_value, triton_lowering._atomic_rmw
        relaxed, fadd = tt_dialect.MemSemantic.RELAXED, tt_dialect.RMWOp.FADD
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jax release
        return None
    primitive = jax_core.Primitive("atomic_add_relaxed")
    primitive.def_effectful_abstract_eval(swap_abstract_eval)

    # jax 0.11 calls a discharge rule as rule(ctx, *args) with ctx.in_avals; jax 0.10 as rule(in_avals,
    # out_avals, *args). Unflattening the wrong count of leading arguments fails with "Too few leaves".
    leading = 1 if hasattr(state_discharge, "DischargeContext") else 2

    def discharge(*leading_and_args, args_tree):
        # Pallas's own rule applies an indexed add as one gather-then-set, so of two lanes that name the same
        # element only one add survives; a GPU's atomics apply both. A scatter-add does too.
        context, args_flat = leading_and_args[:leading], leading_and_args[leading:]
        ref, transforms, val, mask = args_tree.unflatten(args_flat)
        if mask is not None or len(transforms) != 1 or not isinstance(transforms[0], indexing.NDIndexer) or any(
                isinstance(i, indexing.Slice) for i in transforms[0].indices):
            return pallas_discharge(*context, *args_flat, args_tree=args_tree)
        where = tuple(transforms[0].indices)
        return (ref.at[where].add(val),) + (None,) * (len(args_flat) - 1), ref[where]

    state_discharge.register_discharge_rule(primitive)(discharge)

    def triton_rule(ctx, *args_flat, args_tree):
        ptr, transforms, val, _ = args_tree.unflatten(args_flat)
        value_aval = args_tree.unflatten(ctx.avals_in)[2]
        transforms = list(transforms)
        if not transforms or not isinstance(transforms[-1], indexing.NDIndexer):
            ref_aval = state.transform_type(transforms, ctx.avals_in[0])
            transforms.append(indexing.NDIndexer.make_trivial_indexer(ref_aval.shape))
        if len(transforms) != 1:
            raise NotImplementedError("atomic_add_relaxed takes one indexer")
        ptr = pointers(ptr, ctx.block_infos[0], transforms[0])
        return atomic_rmw(fadd, ptr, as_value(val, value_aval), semantic=relaxed)

    triton_lowering.triton_lowering_rules[primitive] = triton_rule

    def bind(ref, idx, val):
        x_ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "atomic_add_relaxed")
        args_flat, args_tree = tree_util.tree_flatten((x_ref, transforms, val, None))
        return primitive.bind(*args_flat, args_tree=args_tree)
    return bind


_FP8_DOT = _make_fp8_dot()
_RELAXED_ADD = _make_relaxed_add()


def fp8_dot_nt(a, b):
    """a [M, K] x b [N, K] (float8_e4m3fn) -> f32 [M, N] = a @ b.T. On the GPU: fp8 wgmma, one accumulation chain
    of K products per output, then fp32. Elsewhere: exact in fp32."""
    if a.dtype != jnp.float8_e4m3fn or b.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_dot_nt takes float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    if _FP8_DOT is None:
        return lax.dot_general(a, b, _CONTRACT_LAST, preferred_element_type=jnp.float32)
    return _FP8_DOT.bind(a, b)


def atomic_add_relaxed(ref, idx, val):
    """ref[idx] += val for float refs, atomically, with no ordering of the thread's other memory accesses.
    idx as for `pltriton.atomic_add` (row and column id arrays gather a tile). Returns the old values."""
    if _RELAXED_ADD is None:
        return pltriton.atomic_add(ref, idx, val)
    return _RELAXED_ADD(ref, idx, val)


def reaches_fast_forms() -> dict:
    """Which operations use the fast lowering in this jax (False: the public Pallas form is used instead)."""
    return {"fp8_dot_nt": _FP8_DOT is not None, "atomic_add_relaxed": _RELAXED_ADD is not None}
