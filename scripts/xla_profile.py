"""Where a compiled step's time goes: a profiler trace's per-op device times, attributed to our source lines.

`scripts/bench_train.py --profile DIR` runs one more step under `jax.profiler.trace(DIR)` and keeps this summary in
its JSON line; any jitted function can use it the same way:

    compiled = jax.jit(f).lower(*args).compile(profile_compiler_options(jax.default_backend()))
    with jax.profiler.trace(directory):
        jax.block_until_ready(compiled(*args))
    hlo = compiled.as_text()
    rows = by_source(op_times(trace_file(directory), module_name(hlo)), op_sources(hlo))

Two inputs, joined on the HLO instruction's name:
  - `op_times`: the trace's events that carry an `hlo_op` stat, on the device planes (`/device:GPU:0`: one event
    per kernel, several kernels per op possible) or, with none, on the host (the CPU backend), each less the
    events nested in it (a host loop's event spans its body's), summed per op over the step (a loop body's ops
    count once per iteration). Lines a profiler derives from others ("XLA Ops", "XLA Modules", ...) are skipped
    so that nothing counts twice, unless a device has no other (a TPU: then its "XLA Ops" line).
  - `op_sources`: the optimised HLO's metadata per instruction: the JAX op name (`jit(step)/.../transpose(jvp())/
    bsr,rhn->bshn/dot_general`) and its innermost Python frame, either the `stack_frame_id` tables of recent XLA or
    the older `source_file`/`source_line`. A fusion that computes a dot is attributed to its dot (whose time
    dominates it), any other fusion to its root (XLA's own rule for a fusion's metadata).
`by_source` groups the ops by (file:line, function, primitive, forward or transpose): on the dense stage it tells
the expansion's transposes (mla.py, `transpose(...)` einsums) from the attention kernels and the optimiser.
`by_kernel` ranks the same time by the events' own names (`op_times(..., by="kernel")`; on a GPU the kernels'),
which separates the kernels that one Triton call or one source line launches.
Concurrent streams overlap, so the summed time may exceed the step's wall time.
"""

from __future__ import annotations

import collections
import pathlib
import re

# XLA on a GPU records runs of ops as CUDA graphs ("command buffers"), whose kernels the trace names by the buffer
# (`hlo_op` "command_buffer_12") rather than by their ops: a step compiled for profiling turns them off.
PROFILE_COMPILER_OPTIONS = {"gpu": {"xla_gpu_enable_command_buffer": ""}}

# Lines a profiler derives from the kernels' own events (xprof's names): counting them would count twice.
DERIVED_LINES = frozenset({"XLA Ops", "XLA Modules", "Framework Name Scope", "Framework Ops", "Source code",
                           "Steps", "Launch Stats", "XLA TraceMe", "TensorFlow Ops", "TensorFlow Name Scope"})

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')
_TABLE_ROW = re.compile(r'^(\d+)\s+(?:"(.*)"|\{(.*)\})\s*$')


def trace_file(directory) -> pathlib.Path:
    """The newest `.xplane.pb` under a `jax.profiler.trace` directory."""
    files = sorted(pathlib.Path(directory).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {directory}: was the step run inside jax.profiler.trace?")
    return files[-1]


def op_times(xplane_path, module: str | None = None, by: str = "op") -> dict[str, tuple[float, int]]:
    """HLO instruction name -> (its events' total duration in ns, their count), from the device planes if any
    carry `hlo_op` events, else from the host's (see the module docstring); module: only the events of this HLO
    module (`module_name`), since instruction names repeat from one module to the next. by="kernel": keyed by the
    events' own names instead (on a GPU the kernels': `_key_grads_kernel`, `nvjet_sm90_...`), which tells apart
    the kernels that one op launches (a Triton call's several, cuBLAS's choice)."""
    if by not in ("op", "kernel"):
        raise ValueError(f"by must be 'op' or 'kernel', not {by!r}")
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(xplane_path))
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    for group in (device, [p for p in planes if p.name.startswith("/host:")]):
        times = _hlo_op_events(group, module, by)
        if times:
            return times
    return {}


def profile_compiler_options(platform: str) -> dict:
    """The compiler options (`Lowered.compile(options)`) under which a step's trace names every op: on a GPU
    without command buffers (`PROFILE_COMPILER_OPTIONS`); elsewhere none."""
    return dict(PROFILE_COMPILER_OPTIONS.get(platform, {}))


def module_name(hlo_text: str) -> str:
    """The module's name, as the trace's `hlo_module` stats give it ("jit_train_step")."""
    match = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
    if not match:
        raise ValueError("not an HLO module's text: it does not start with 'HloModule <name>'")
    return match.group(1)


def _hlo_op_events(planes, module: str | None = None, by: str = "op") -> dict[str, tuple[float, int]]:
    """Per op (total ns, events) over the planes' own lines; where those have none, over their "XLA Ops" lines
    (a TPU's ops are there alone)."""
    for wanted in (lambda name: name not in DERIVED_LINES, lambda name: name == "XLA Ops"):
        totals = collections.defaultdict(lambda: [0.0, 0])
        for plane in planes:
            for line in plane.lines:
                if not wanted(line.name):
                    continue
                for op, self_ns in _self_times(line.events, module, by):
                    totals[op][0] += self_ns
                    totals[op][1] += 1
        if totals:
            return {op: (ns, count) for op, (ns, count) in totals.items()}
    return {}


def _self_times(events, module: str | None = None, by: str = "op"):
    """(hlo_op, or the event's name where by="kernel"; duration less that of the hlo_op events nested in it) per
    event of one line (where module is given, without the events whose `hlo_module` stat names another; an event
    without that stat is kept): on a host line a loop's or a call's event spans its body's ops, which would
    otherwise count twice."""
    ops = sorted(((e.start_ns, e.duration_ns, stats["hlo_op"] if by == "op" else e.name)
                  for e, stats in ((e, dict(e.stats)) for e in events)
                  if stats.get("hlo_op") and module in (None, stats.get("hlo_module", module))),
                 key=lambda t: (t[0], -t[1]))
    self_ns, enclosing = [duration for _, duration, _ in ops], []  # enclosing: indices of the open events
    for i, (start, duration, _) in enumerate(ops):
        while enclosing and start >= ops[enclosing[-1]][0] + ops[enclosing[-1]][1]:
            enclosing.pop()
        if enclosing:
            self_ns[enclosing[-1]] -= duration
        enclosing.append(i)
    return [(op, max(ns, 0.0)) for (_, _, op), ns in zip(ops, self_ns, strict=True)]


def op_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (JAX op name, "file:line function" of its innermost frame, or "" where the HLO
    has none), from a compiled module's `as_text()`."""
    tables, body = _split_tables(hlo_text.splitlines())
    metadata, dot_of_computation, calls = {}, {}, {}
    computation = None
    for line in body:
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        name, opcode = instruction.groups()
        op_name = _OP_NAME.search(line)
        metadata[name] = (op_name.group(1) if op_name else "", _frame(line, tables))
        if opcode in ("dot", "convolution") and computation is not None:
            dot_of_computation.setdefault(computation, name)
        callee = _CALLS.search(line)
        if opcode == "fusion" and callee:
            calls[name] = callee.group(1)
    for fusion, callee in calls.items():  # a fusion that computes a dot is the dot's
        if callee in dot_of_computation:
            metadata[fusion] = metadata[dot_of_computation[callee]]
    return metadata


def _split_tables(lines):
    """The stack-frame tables ("FileNames", "FunctionNames", "FileLocations", "StackFrames": id -> row) and the
    remaining lines."""
    tables, body, current = {}, [], None
    for line in lines:
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line.strip(), {})
            continue
        row = _TABLE_ROW.match(line) if current is not None else None
        if row:
            key, text, fields = row.groups()
            current[int(key)] = text if text is not None else dict(f.split("=", 1) for f in fields.split())
            continue
        current = None
        body.append(line)
    return tables, body


def _frame(line: str, tables) -> str:
    source = _SOURCE.search(line)
    if source:
        return f"{_short(source.group(1))}:{source.group(2)}"
    frame_id = _FRAME_ID.search(line)
    if not frame_id:
        return ""
    try:
        frame = tables["StackFrames"][int(frame_id.group(1))]
        location = tables["FileLocations"][int(frame["file_location_id"])]
        file_name = tables["FileNames"][int(location["file_name_id"])]
        function = tables["FunctionNames"][int(location["function_name_id"])]
    except KeyError:
        return ""
    return f"{_short(file_name)}:{location['line']} {function}"


def _short(path: str) -> str:
    """The last two parts of a path (`indexcache_jax/mla.py`): enough to find it, short enough to read."""
    return "/".join(pathlib.PurePath(path).parts[-2:])


def _primitive(op_name: str) -> str:
    """The op name's last part, after its einsum's spec where it has one ("bsr,rhn->bshn dot_general")."""
    parts = op_name.split("/")
    return f"{parts[-2]} {parts[-1]}" if len(parts) > 1 and "->" in parts[-2] else parts[-1]


def by_kernel(times: dict[str, tuple[float, int]], top: int = 15) -> list[dict]:
    """`op_times(..., by="kernel")` as rows of kernel, ms, events and share, largest first; the rest in one "other"
    row."""
    total = sum(ns for ns, _ in times.values()) or 1.0
    rows = [{"kernel": name, "ms": round(ns / 1e6, 3), "events": count, "share": round(ns / total, 4)}
            for name, (ns, count) in sorted(times.items(), key=lambda kv: -kv[1][0])]
    return _fold_rest(rows, top, lambda rest: {"kernel": f"other ({len(rest)} kernels)"})


def by_source(times: dict[str, tuple[float, int]], sources: dict[str, tuple[str, str]], top: int = 25) -> list[dict]:
    """The ops' time grouped by (frame, primitive, transpose or not), largest first: rows of source, primitive,
    ms, events, ops (how many HLO instructions) and share of the summed time; the rest in one "other" row."""
    groups = collections.defaultdict(lambda: [0.0, 0, 0])
    for op, (ns, count) in times.items():
        op_name, frame = sources.get(op, ("", ""))
        primitive = _primitive(op_name) if op_name else op
        key = (frame or "(no source)", primitive + (" [transpose]" if "transpose(" in op_name else ""))
        groups[key][0] += ns
        groups[key][1] += count
        groups[key][2] += 1
    total = sum(ns for ns, _, _ in groups.values()) or 1.0
    rows = [{"source": frame, "primitive": primitive, "ms": round(ns / 1e6, 3), "events": count, "ops": ops,
             "share": round(ns / total, 4)}
            for (frame, primitive), (ns, count, ops) in sorted(groups.items(), key=lambda kv: -kv[1][0])]
    return _fold_rest(rows, top, lambda rest: {"source": "other", "primitive": f"{len(rest)} groups"})


def _fold_rest(rows: list[dict], top: int, label) -> list[dict]:
    """The first `top` rows, then one row for the rest: label(rest)'s fields and the sums of their numbers."""
    if len(rows) <= top:
        return rows
    rest = rows[top:]
    folded = label(rest)
    for field in ("ms", "events", "ops", "share"):
        if field in rest[0]:
            total = sum(r[field] for r in rest)
            folded[field] = round(total, 4 if field == "share" else 3) if isinstance(total, float) else total
    return rows[:top] + [folded]
