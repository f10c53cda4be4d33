"""Collectives in a compiled XLA program: count and bytes per step by kind, loops unrolled by their trip counts.

XLA's text lists a loop body once; a collective inside a `lax.scan` over 28 blocks runs 28 times per step,
so the counts follow while-loops (known trip counts, or the constant of a simple `i < N` condition) and
calls into nested computations.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import numpy as np


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONST = re.compile(r"=\s*[su]32\[\]\S*\s+constant\((\d+)\)")
_CALLEES = re.compile(r"(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


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


def _collective_bytes(shape_text: str, op: str) -> int:
    """Bytes a collective produces: its result arrays; async starts of all-gather / collective-permute
    return (operands, results, ...) and count their results only."""
    if op in ("all-gather-start", "collective-permute-start"):
        elems = _tuple_elements(shape_text)
        if len(elems) >= 2:
            return _array_bytes(elems[1])
    return _array_bytes(shape_text)


def _split_instruction(line: str) -> Optional[Tuple[str, str, str]]:
    """'%x = SHAPE opcode(operands), attrs' -> (shape text, opcode, rest) or None."""
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
    return shape, op, rest


def _trip_from_condition(comps: Dict[str, List[str]], m) -> int:
    """Trip count of a counted loop (a scan: counter from 0, `counter < N`): the integer constant its
    condition compares with; 1 when that is not what the condition looks like."""
    lines = comps.get(m.group(1), []) if m else []
    consts = [int(c.group(1)) for c in map(_INT_CONST.search, lines) if c]
    if len(consts) == 1 and any("direction=LT" in line for line in lines):
        return max(consts[0], 1)
    return 1


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
    """{kind: {count, bytes, count_per_step, bytes_per_step}} of the compiled program.

    count/bytes: collective instructions as written (an async pair counts once); *_per_step multiplies
    those inside loops (the scan over blocks, gradient accumulation) by the loops' trip counts (XLA's
    known_trip_count, else the constant a counted loop's condition compares with).
    bytes: the arrays the instruction produces (the gathered / reduced / permuted buffers)."""
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
    # Multiplier of every computation: how often it runs per step.
    mult: Dict[str, int] = {}

    def visit(name: str, k: int, seen: Tuple[str, ...]) -> None:
        if name not in comps or name in seen:
            return
        mult[name] = mult.get(name, 0) + k
        for line in comps[name]:
            parts = _split_instruction(line)
            if parts is None:
                continue
            _, op, rest = parts
            trip = 1
            if op == "while":
                t = _TRIP.search(rest)
                trip = int(t.group(1)) if t else _trip_from_condition(comps, _CONDITION.search(rest))
            callees = _CALLEES.findall(rest)
            for b in _BRANCHES.findall(rest):
                callees += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
            for c in callees:
                is_body = op == "while" and f"body=%{c}" in rest or f"body={c}" in rest
                visit(c, k * (trip if is_body else 1), seen + (name,))

    if entry is not None:
        visit(entry, 1, ())
    out: Dict[str, Dict[str, int]] = {}
    for name, lines in comps.items():
        k = mult.get(name, 0)
        for line in lines:
            parts = _split_instruction(line)
            if parts is None:
                continue
            shape, op, _ = parts
            kind = op[:-6] if op.endswith("-start") else op
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            nb = _collective_bytes(shape, op)
            r = out.setdefault(kind, {"count": 0, "bytes": 0, "count_per_step": 0, "bytes_per_step": 0})
            r["count"] += 1
            r["bytes"] += nb
            r["count_per_step"] += k
            r["bytes_per_step"] += k * nb
    return out
