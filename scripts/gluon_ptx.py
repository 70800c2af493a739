"""pytest plugin: write the PTX of every Gluon kernel compile the tests make into $GLUON_PTX_DIR, one file per
(kernel, signature, constants), with what only the debug information uses stripped.

Why: the Gluon kernels cannot run on a CPU, but they compile there (`_gluon.compile_gluon`, for sm_90). A refactor
that leaves every kernel's PTX unchanged needs no GPU to be trusted; one that changes it needs the GPU tests. So:

    GLUON_PTX_DIR=/tmp/before PYTHONPATH=scripts pytest -n 0 -p gluon_ptx -k "compile" tests/
    (refactor)
    GLUON_PTX_DIR=/tmp/after PYTHONPATH=scripts pytest -n 0 -p gluon_ptx -k "compile" tests/
    diff -r /tmp/before /tmp/after
"""

from __future__ import annotations

import hashlib
import os
import re


_DEBUG_LABEL = re.compile(r"^\$L__tmp\d+:$")  # marks an inlined call's scope for the debug sections only


def stripped(ptx: str) -> str:
    """The PTX without what only the debug information uses, which moves when source lines or helper functions do:
    the debug sections, `.loc` / `.file` lines and the `$L__tmpN` labels of inlined scopes."""
    ptx = re.split(r"\n\s*\.section\s*\.debug", ptx)[0]
    return "\n".join(line for line in ptx.splitlines()
                     if ".loc" not in line and ".file" not in line and not _DEBUG_LABEL.match(line.strip()))


def pytest_configure(config):
    out_dir = os.environ.get("GLUON_PTX_DIR")
    if not out_dir:
        raise RuntimeError("the gluon_ptx plugin writes into $GLUON_PTX_DIR: set it")
    from pallas_kernels import _gluon
    compile_gluon = _gluon.compile_gluon
    os.makedirs(out_dir, exist_ok=True)

    def compile_and_keep_ptx(fn, arg_dtypes, *, num_warps, capability, constexprs):
        compiled, attrs = compile_gluon(fn, arg_dtypes, num_warps=num_warps, capability=capability,
                                        constexprs=constexprs)
        key = repr((fn.__module__, fn.__name__, list(arg_dtypes), num_warps, capability, sorted(constexprs.items())))
        name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}.{hashlib.md5(key.encode()).hexdigest()[:8]}.ptx"
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(f"// {key}\n{stripped(compiled.asm['ptx'])}\n")
        return compiled, attrs

    _gluon.compile_gluon = compile_and_keep_ptx
