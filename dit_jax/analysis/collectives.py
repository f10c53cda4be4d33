"""Collectives in a compiled XLA program: count, buffer bytes and bytes moved per chip per step, by kind.

The compiled text of an SPMD program is one device's program, so every shape in it is per chip. Per kind:
- count / count_per_step: logical collectives; a loop body is listed once but runs its trip count times per
  step (the scan over blocks: depth times), so *_per_step follows while-loops (XLA's known_trip_count, or
  the constant of a counted loop's `i < N` condition) and calls into nested computations.
- result_bytes(_per_step): the arrays a collective produces (an all-gather's gathered array, a
  reduce-scatter's shard). That is a buffer size, not traffic.
- moved_bytes_per_step: bytes each chip sends per step by the usual ring estimates, n the group size read
  from the collective's replica_groups: all-reduce 2(n-1)/n x buffer, all-gather (n-1)/n x result,
  reduce-scatter (n-1)/n x operand (= (n-1) x result), all-to-all (n-1)/n x buffer, collective-permute
  and collective-broadcast 1 x buffer. Labelled "bytes moved per chip per step (ring estimate)".

Two TPU forms are undone here. libtpu writes a reduce-scatter as a fusion whose computation is named
"all-reduce-scatter..." (an all-reduce followed by a dynamic-slice of this chip's part); it is counted as the
reduce-scatter it is. libtpu also overlaps an all-gather with compute by spreading it over several fusions
(a start ending in an AsyncCollectiveStart custom call, continuations inside matmul fusions marked with a
continuation_config, a done ending in AsyncCollectiveDone), each holding a copy of the same all-gather: that
is one collective, counted at its start.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
MOVED_LABEL = "bytes moved per chip per step (ring estimate)"
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONST = re.compile(r"=\s*[su]32\[\]\S*\s+constant\((\d+)\)")
_CALLEES = re.compile(r"(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OP_NOISE = re.compile(r"jit\([^)]*\)/|(?:while/body|closed_call|cond/branch_\d+_fun|checkpoint|rematted_computation|"
                       r"DiT\._(?:scan|run)_blocks)/")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_REPLICAS = re.compile(r"\breplica_count=(\d+)")
# replica_groups, three spellings: explicit {{0,1},{2,3}}; iota [groups,size]<=[...]; a mesh and its axes
# mesh['axis_0'=4,'axis_1'=2] {'axis_1'} (optionally with device_ids=(...) between them).
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,\s]*\})?")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,?\s*device_ids=\(.*?\))?\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'\s*=\s*(\d+)")
_GROUP_AXIS = re.compile(r"'([^']+)'(?:\s*:\s*\(\d+\)\s*(\d+))?")
# libtpu's overlapped all-gather: a fusion ending in this custom call starts it, fusions marked with this
# backend config progress it inside matmuls, a fusion ending in the done custom call finishes it.
_ASYNC_DONE = 'custom_call_target="AsyncCollectiveDone"'
_CONTINUATION = '"continuation_config"'
_RING = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
         "reduce-scatter": lambda n: float(n - 1), "all-to-all": lambda n: (n - 1) / n,
         "ragged-all-to-all": lambda n: (n - 1) / n, "collective-permute": lambda n: 1.0,
         "collective-broadcast": lambda n: 1.0}  # x result bytes


def _array_bytes(shape_text: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(shape_text):
        size = _DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4)
        n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
        total += int(n * size)
    return total


def _tuple_elements(shape_text: str) -> List[str]:
    """Top-level elements of a tuple shape "(a, (b, c), d)"; a non-tuple is one element."""
    t = shape_text.strip()
    if not t.startswith("("):
        return [t]
    parts, depth, cur = [], 0, ""
    for ch in t[1:-1]:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    return parts + [cur]


def _result_bytes(shape_text: str, op: str) -> int:
    """Bytes a collective produces: its result arrays; async starts of all-gather / collective-permute
    return (operands, results, ...) and count their results only."""
    if op in ("all-gather-start", "collective-permute-start"):
        elems = _tuple_elements(shape_text)
        if len(elems) >= 2:
            return _array_bytes(elems[1])
    return _array_bytes(shape_text)


def group_size(attrs: str, num_devices: int) -> Optional[int]:
    """Devices in each replica group of a collective (its attribute text); None when not written there."""
    m = _GROUPS_MESH.search(attrs)
    if m:
        sizes = {a: int(s) for a, s in _MESH_AXIS.findall(m.group(1))}
        axes = _GROUP_AXIS.findall(m.group(2))  # 'axis_1', or a sub-axis 'axis_1':(pre)size
        if not axes:
            return num_devices
        return int(np.prod([int(sub) if sub else sizes[a] for a, sub in axes], dtype=np.int64))
    m = _GROUPS_IOTA.search(attrs)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(attrs)
    if m:  # {} is one group of every device
        return len(re.findall(r"\d+", m.group(1))) if m.group(1) else num_devices
    return None


def _header_int(pattern, header: str) -> int:
    m = pattern.search(header)
    return int(m.group(1)) if m else 1


def split_instruction(line: str) -> Optional[Tuple[str, str, str, str]]:
    """'%x = SHAPE opcode(operands), attrs' -> (name, shape text, opcode, rest) or None."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = rest.split("(", 1)[0].strip()
    return m.group(1), shape, op, rest


def _trip_from_condition(comps: Dict[str, List[str]], m) -> int:
    """Trip count of a counted loop (a scan: counter from 0, `counter < N`): the integer constant its
    condition compares with; 1 when that is not what the condition looks like."""
    lines = comps.get(m.group(1), []) if m else []
    consts = [int(c.group(1)) for c in map(_INT_CONST.search, lines) if c]
    if len(consts) == 1 and any("direction=LT" in line for line in lines):
        return max(consts[0], 1)
    return 1


def parse_computations(hlo_text: str) -> Tuple[Dict[str, List[str]], Optional[str]]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    comps: Dict[str, List[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    return comps, entry


def run_counts(comps: Dict[str, List[str]], entry: Optional[str]) -> Tuple[Dict[str, int], set]:
    """(how often each computation runs per step, the computations that continue a collective started
    elsewhere: libtpu's continuation fusions and async-collective done fusions)."""
    mult: Dict[str, int] = {}
    continued = {c for c, lines in comps.items() if any(_ASYNC_DONE in line for line in lines)}

    def visit(name: str, k: int, seen: Tuple[str, ...]) -> None:
        if name not in comps or name in seen:
            return
        mult[name] = mult.get(name, 0) + k
        for line in comps[name]:
            parts = split_instruction(line)
            if parts is None:
                continue
            _, _, op, rest = parts
            trip = 1
            if op == "while":
                t = _TRIP.search(rest)
                trip = int(t.group(1)) if t else _trip_from_condition(comps, _CONDITION.search(rest))
            callees = _CALLEES.findall(rest)
            for b in _BRANCHES.findall(rest):
                callees += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
            for c in callees:
                is_body = op == "while" and (f"body=%{c}" in rest or f"body={c}" in rest)
                if op == "fusion" and _CONTINUATION in rest:
                    continued.add(c)
                visit(c, k * (trip if is_body else 1), seen + (name,))

    if entry is not None:
        visit(entry, 1, ())
    return mult, continued


def _each(hlo_text: str) -> Iterator[Tuple[str, str, int, int, float, Optional[int]]]:
    """(kind, op_name, runs per step, result bytes, bytes moved per run, group size or None) of every
    collective reached from the entry computation (see the module docstring)."""
    comps, entry = parse_computations(hlo_text)
    header = hlo_text.split("\n", 1)[0]
    devices = _header_int(_PARTITIONS, header) * _header_int(_REPLICAS, header)
    mult, continued = run_counts(comps, entry)
    callers = {}  # fused computation -> the op_name of its fusion instruction (fused collectives carry none)
    for lines in comps.values():
        for line in lines:
            c, on = _CALLS.search(line), _OP_NAME.search(line)
            if c and on:
                callers.setdefault(c.group(1), on.group(1))
    for name, lines in comps.items():
        k = mult.get(name, 0)
        if not k or name in continued:  # not reached from the entry; or counted where it started
            continue
        for line in lines:
            parts = split_instruction(line)
            if parts is None:
                continue
            _, shape, op, rest = parts
            kind = op[:-6] if op.endswith("-start") else op
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            n = group_size(rest, devices)
            if n is None and kind not in ("collective-permute", "collective-broadcast"):
                n_ring, n = devices, None  # unknown: at most every device
            else:
                n_ring = n or 1
            result = _result_bytes(shape, op)
            moved = _RING[kind](n_ring) * result if n_ring > 1 or kind == "collective-permute" else 0.0
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):  # libtpu's reduce-scatter
                kind, result, moved = "reduce-scatter", result // n_ring, (n_ring - 1) / n_ring * result
            on = _OP_NAME.search(rest)
            op_name = on.group(1) if on else callers.get(name, "")
            yield kind, op_name, k, result, moved, (None if kind == "collective-permute" else n)


def collectives(hlo_text: str) -> Dict[str, Dict[str, float]]:
    """{kind: {count, count_per_step, result_bytes, result_bytes_per_step, moved_bytes_per_step,
    group_sizes, group_size_unknown}} of a compiled program (see the module docstring; an async pair counts
    once; a collective whose replica groups are not written in a known form is assumed to span every device
    and counted in group_size_unknown)."""
    out: Dict[str, Dict[str, float]] = {}
    for kind, _, k, result, moved, n in _each(hlo_text):
        r = out.setdefault(kind, {"count": 0, "count_per_step": 0, "result_bytes": 0, "result_bytes_per_step": 0,
                                  "moved_bytes_per_step": 0, "group_sizes": [], "group_size_unknown": 0})
        r["group_size_unknown"] += n is None and kind != "collective-permute"
        r["count"] += 1
        r["count_per_step"] += k
        r["result_bytes"] += result
        r["result_bytes_per_step"] += k * result
        r["moved_bytes_per_step"] += k * moved
        if n is not None and n not in r["group_sizes"]:
            r["group_sizes"] = sorted(r["group_sizes"] + [n])
    for r in out.values():
        r["moved_bytes_per_step"] = int(round(r["moved_bytes_per_step"]))
    return out


def collectives_by_op(hlo_text: str, top: int = 8) -> List[Dict[str, object]]:
    """The collectives grouped by kind and the JAX operation they come from (XLA's op_name metadata, the
    jit and loop wrappers dropped), the most bytes moved first: where a program's traffic comes from. XLA
    combines small collectives of one kind into one (e.g. a block's gradient all-reduces), which then carries
    the name of one of its parts."""
    rows: Dict[Tuple[str, str], Dict[str, object]] = {}
    for kind, op_name, k, result, moved, _ in _each(hlo_text):
        op_name = _OP_NOISE.sub("", op_name)
        r = rows.setdefault((kind, op_name), {"kind": kind, "op_name": op_name, "count_per_step": 0,
                                              "moved_bytes_per_step": 0.0})
        r["count_per_step"] += k
        r["moved_bytes_per_step"] += k * moved
    out = sorted(rows.values(), key=lambda r: -r["moved_bytes_per_step"])[:top]
    return [dict(r, moved_bytes_per_step=int(round(r["moved_bytes_per_step"]))) for r in out]


def moved_bytes_per_step(colls: Dict[str, Dict[str, float]]) -> int:
    """All kinds together: bytes each chip sends per step (ring estimate)."""
    return int(sum(r["moved_bytes_per_step"] for r in colls.values()))
