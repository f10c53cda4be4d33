"""Matmul FLOPs per chip per step of a compiled XLA program, loop bodies counted by their trip counts.

XLA's own `compiled.cost_analysis()["flops"]` counts a while-loop body once, so for DiT's scan over blocks it
reports about one block's worth. This counts every dot and convolution of the compiled (per-chip) program
from its shapes, 2 FLOPs per multiply-add, each computation times how often it runs per step
(dit_jax.analysis.collectives.run_counts: scan trip counts, nested calls and fusions):
- dot: output elements x the product of the lhs contracting dimensions;
- convolution (how TPU programs write matmuls; batched ones and weight gradients with windows over padded
  or lhs-dilated inputs): output elements x kernel input features x the window positions that land on
  input elements, per output position.
Elementwise work (norms, softmax, the optimizer) is not included: it is what cost_analysis adds on top.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np

from dit_jax.analysis.collectives import parse_computations, run_counts, split_instruction

_DIMS = re.compile(r"^\(?\s*[a-z]+\d*(?:e\d+m\d+\w*)?\[([\d,]*)\]")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")


def _dims(shape_text: str) -> Optional[List[int]]:
    """Dimensions of an array shape; None for a tuple."""
    if shape_text.startswith("("):
        return None
    m = _DIMS.match(shape_text)
    return [int(d) for d in m.group(1).split(",") if d] if m else None


def _macs(op: str, out: List[int], rest: str, shapes: Dict[str, Optional[List[int]]]) -> int:
    args = _OPERANDS.findall(rest.split(")", 1)[0])
    lhs = shapes.get(args[0]) if args else None
    rhs = shapes.get(args[1]) if len(args) > 1 else None
    n_out = int(np.prod(out, dtype=np.int64))
    if op == "dot":
        m = _CONTRACT.search(rest)
        if lhs is None or m is None:
            raise ValueError(f"dot without a known lhs shape or contracting dims: {rest[:200]}")
        return n_out * int(np.prod([lhs[int(c)] for c in m.group(1).split(",") if c], dtype=np.int64))
    m = _LABELS.search(rest)
    if lhs is None or rhs is None or m is None:
        raise ValueError(f"convolution without known operand shapes or dim_labels: {rest[:200]}")
    lhs_l, rhs_l, out_l = m.groups()
    win = _window(rest)
    hits, spatial_out = 1, 1
    for k in range(sum(c.isdigit() for c in lhs_l)):
        o_size = out[out_l.index(str(k))]
        spatial_out *= o_size
        hits *= _window_hits(lhs[lhs_l.index(str(k))], o_size, *(win[a][k] for a in _WINDOW_ATTRS))
    return n_out // max(spatial_out, 1) * rhs[rhs_l.index("i")] * hits


_WINDOW_ATTRS = ("size", "stride", "pad_lo", "lhs_dilate", "rhs_dilate")


def _window(rest: str) -> Dict[str, List[int]]:
    """A convolution's window attributes per spatial dimension (XLA's defaults where not written)."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(f.split("=", 1) for f in m.group(1).split()) if m else {}
    n = len(fields["size"].split("x")) if "size" in fields else 0

    def get(key: str) -> List[int]:
        return [int(v) for v in fields[key].split("x")] if key in fields else [1] * n

    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * n
    return {"size": get("size"), "stride": get("stride"), "pad_lo": pads, "lhs_dilate": get("lhs_dilate"),
            "rhs_dilate": get("rhs_dilate")}


def _window_hits(length: int, out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
    """(output position, window position) pairs of one spatial dimension that land on an input element
    (not on padding or on a hole of an lhs-dilated input). The TPU writes batched matmuls and weight
    gradients as such windows: e.g. a window of 2 over an input dilated by 2 hits one element."""
    x = np.arange(out)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate - pad_lo  # (out, size)
    return int(np.sum((x >= 0) & (x % lhs_dilate == 0) & (x // lhs_dilate < length)))


def matmul_flops(hlo_text: str) -> int:
    """2 x the multiply-adds of every dot and convolution one chip runs per step (see the module docstring)."""
    comps, entry = parse_computations(hlo_text)
    mult, _ = run_counts(comps, entry)
    total = 0
    for name, lines in comps.items():
        k = mult.get(name, 0)
        if not k:
            continue
        shapes: Dict[str, Optional[List[int]]] = {}
        for line in lines:
            parts = split_instruction(line)
            if parts is None:
                continue
            iname, shape, op, rest = parts
            shapes[iname] = _dims(shape)
            if op in ("dot", "convolution") and shapes[iname] is not None:
                total += 2 * k * _macs(op, shapes[iname], rest, shapes)
    return total
