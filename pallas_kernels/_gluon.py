"""Launch Gluon kernels from JAX.

Gluon is Triton's explicit-layout dialect (`triton.experimental.gluon`): the kernel names each tensor's
distribution over warps, its shared-memory buffers and its async copies, where plain Triton (and Pallas's Triton
backend) choose them. The sparse MLA forward needs that control (`sparse_attention_gluon` says why).

jax-triton's `triton_call` is the bridge from JAX to a Triton kernel: an XLA custom call that launches PTX. It
compiles a `triton.jit` function from Triton IR; a Gluon function is already laid out and needs Triton's Gluon
front end, which jax-triton 0.3.1 does not call. So this module routes Gluon functions to `triton.compile` and
hands its PTX to the same custom call; plain Triton functions go through jax-triton unchanged.

Everything here is imported lazily: the CPU install (and CI) has neither a CUDA jaxlib nor jax-triton.
jax-triton's call has no batching rule (and no JVP): `vmap_by_folding_into_batch` gives a kernel's wrapper one,
by folding the mapped axes into the kernel's own batch axis.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

HOPPER = (9, 0)  # wgmma, which the Gluon kernels use, exists on sm_90 only


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when Gluon kernels can run here, else why not (for the error of an explicit request)."""
    if jax.default_backend() != "gpu":
        return f"the default backend is {jax.default_backend()!r}, not a CUDA GPU"
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is None or tuple(int(x) for x in str(capability).split(".")) != HOPPER:
        return f"the GPU's compute capability is {capability}; the Gluon kernels use Hopper's wgmma (9.0)"
    try:
        _import_jax_triton()
        from triton.experimental import gluon  # noqa: F401
    except ImportError as err:
        return f"{err} (install the GPU extra: pip install -e '.[gpu]')"
    return None


def _import_jax_triton():
    """Import jax_triton, keeping TRITON_CACHE_DIR as it was: its import blanks the variable (its own compile path
    skips Triton's file cache), which would leave every other triton.compile in the process (torch.compile's,
    for one) without a cache directory."""
    before = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    finally:
        if before is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = before
    return jax_triton


def available() -> bool:
    return unavailable_reason() is None


def unavailable_or_unsupported(module: str, *args) -> Optional[str]:
    """`unavailable_reason()`, else `module`'s unsupported_reason(*args) (why its kernels cannot take these inputs):
    the Gluon module, which imports triton, is imported only where Gluon runs, so that a GPU install without
    triton gets the Pallas kernel rather than an ImportError."""
    return unavailable_reason() or importlib.import_module(module).unsupported_reason(*args)


def gluon_call(*arrays, kernel, out_shape, grid, num_warps: int, **constexprs):
    """Run a Gluon kernel on JAX arrays: its pointer arguments are `arrays` then the outputs (`out_shape`), every
    other parameter a compile-time constant given by keyword. Arrays are assumed 16-byte aligned, as jax-triton
    does for Triton kernels."""
    jax_triton = _import_jax_triton()
    _route_gluon_through_triton_compile()
    return jax_triton.triton_call(*arrays, kernel=kernel, out_shape=out_shape, grid=grid, num_warps=num_warps,
                                  num_stages=1, **constexprs)


def vmap_by_folding_into_batch(fn):
    """fn(*arrays) -> pytree of arrays, where every input and output carries the batch on axis 0 and an output's
    row b depends only on the inputs' rows b (a kernel's batch axis) -> the same function, which `jax.vmap` maps
    by folding the mapped axis into axis 0: one launch of fn over axis_size x batch rows, not a loop. Inputs that
    are not mapped are broadcast first (a copy: the kernel reads each row's own pointer range). Nested vmaps
    fold one after another."""

    @jax.custom_batching.custom_vmap
    def mapped(*arrays):
        return fn(*arrays)

    @mapped.def_vmap
    def fold(axis_size, in_batched, *arrays):
        # custom_vmap hands mapped inputs with their mapped axis moved to the front
        arrays = [x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
                  for x, batched in zip(arrays, in_batched, strict=True)]
        out = mapped(*[x.reshape((-1,) + x.shape[2:]) for x in arrays])
        out = jax.tree.map(lambda y: y.reshape((axis_size, -1) + y.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return mapped


def compile_gluon(fn, arg_dtypes, *, num_warps: int, capability: int, constexprs: dict):
    """Compile a Gluon function for compute capability `capability` (e.g. 90) with Triton's Gluon front end, no GPU
    needed -> (triton CompiledKernel, argument attributes). arg_dtypes: Triton type strings of the pointer
    arguments in order ("*bf16", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(fn.arg_names)
    signature = dict(zip(names[:len(arg_dtypes)], arg_dtypes, strict=True))  # the pointers come first
    values = dict(constexprs)
    if "num_warps" in names:
        values["num_warps"] = num_warps
    for name in values:
        signature[name] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(arg_dtypes))}
    source = GluonASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in values.items()},
                            attrs=attrs)
    # triton.compile needs a cache directory, which TRITON_CACHE_DIR="" (as jax-triton's import leaves it) denies:
    # compile into a scratch directory; the compiled kernel is kept in memory (_KERNELS).
    with tempfile.TemporaryDirectory() as scratch, triton.knobs.cache.scope():
        triton.knobs.cache.dir = scratch
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": num_warps})
    return compiled, attrs


_KERNELS: dict = {}


def _kernel(fn, arg_dtypes, num_warps: int, compute_capability: Optional[int], constexprs: dict):
    """(jaxlib TritonKernel, argument attributes) for a Gluon function, compiled once per signature."""
    from jax._src.lib import gpu_triton

    capability = compute_capability or gpu_triton.get_compute_capability(0)
    key = (fn, tuple(arg_dtypes), num_warps, capability, tuple(sorted(constexprs.items())))
    if key not in _KERNELS:
        compiled, attrs = compile_gluon(fn, arg_dtypes, num_warps=num_warps, capability=capability,
                                        constexprs=constexprs)
        # metadata.num_warps: all of them, where warp-specialised partitions add warps to the requested ones
        kernel = gpu_triton.TritonKernel(compiled.metadata.name, compiled.metadata.num_warps, 1,
                                         compiled.metadata.shared,
                                         compiled.asm["ptx"], compiled.asm.get("ttgir", ""), capability)
        _KERNELS[key] = (kernel, attrs)
    return _KERNELS[key]


@functools.lru_cache(maxsize=None)
def _route_gluon_through_triton_compile() -> None:
    from jax_triton import triton_lib
    compile_triton = triton_lib.get_or_create_triton_kernel

    def get_or_create_kernel(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps, num_stages,
                             num_ctas, compute_capability, enable_fp_fusion, metaparams, dump):
        if not getattr(fn, "is_gluon", lambda: False)():
            return compile_triton(backend_init_func, platform, fn, arg_dtypes, scalar_args, num_warps=num_warps,
                                  num_stages=num_stages, num_ctas=num_ctas, compute_capability=compute_capability,
                                  enable_fp_fusion=enable_fp_fusion, metaparams=metaparams, dump=dump)
        if scalar_args:
            raise ValueError("Gluon kernels here take arrays and compile-time constants only, got scalar "
                             f"arguments at positions {[i for i, _, _ in scalar_args]}")
        return _kernel(fn, arg_dtypes, num_warps, compute_capability, metaparams)

    triton_lib.get_or_create_triton_kernel = get_or_create_kernel
