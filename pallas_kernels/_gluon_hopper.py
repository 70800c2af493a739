"""What every Hopper Gluon kernel here declares and does alike: where a wgmma's accumulator lives in registers, the
shared-memory buffers its operands are read from, the wait for its cp.async copies before a dot reads them, and the
store of an accumulator's rows.

Every kernel stacks its warps along the rows of its dots (each warpgroup its own m64 rows), so one helper names that
layout for any column count; the sparse forward's seesaw kernel, whose two warpgroups split the columns instead,
spells its own out.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared


@gluon.constexpr_function
def wgmma_layout(columns, num_warps, k=16):
    """The register layout of a wgmma accumulator with `columns` columns, the warps stacked along the rows.
    k: the instruction's depth (16 for 16-bit inputs, 32 for fp8)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, k])


@gluon.jit
def operand_buffer(dtype: gl.constexpr, shape: gl.constexpr):
    """A shared-memory buffer for wgmma operands: `shape` [rows, columns], or [slots, rows, columns] for a ring, in
    the NVMMA layout of one [rows, columns] tile."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(shape[len(shape) - 2:], dtype)
    return gl.allocate_shared_memory(dtype, shape, layout)


@gluon.jit
def wait_for_copies(outstanding: gl.constexpr):
    """Wait until at most `outstanding` of this thread's cp.async groups are in flight, then for every thread (so
    the CTA's copies up to that group have landed, and every warp is past what it issued before: with synchronous
    dots, done reading the slots the next copies overwrite), and make the landed rows visible to wgmma, which reads
    shared memory through the async proxy."""
    async_copy.wait_group(outstanding)
    gl.thread_barrier()
    fence_async_shared()


@gluon.jit
def store_rows(dst_ptr, first_row, row_stride, acc):
    """dst[(first_row + r) * row_stride + c] = acc[r, c] in dst's dtype, from acc's own register layout (row
    offsets in int64: a gradient of B x S x H x N elements passes 2^31)."""
    layout: gl.constexpr = acc.type.layout
    rows = gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, layout))
    columns = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    offsets = (first_row + rows).to(gl.int64) * row_stride
    gl.store(dst_ptr + offsets[:, None] + columns[None, :], acc.to(dst_ptr.dtype.element_ty))
