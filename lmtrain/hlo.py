"""The bytes a compiled step moves through collectives, read from its optimised HLO text.

`collective_bytes(compiled.as_text())` walks the module from its ENTRY computation, following
the computations an instruction calls (fusions, async wrappers, conditionals) and multiplying
a while loop's body by its trip count (XLA's `known_trip_count`, or the `i < N` of a scan's
loop condition; a loop with neither counts once, and the result says so). For each collective
it charges the bytes one chip sends or receives in a bandwidth-optimal (ring) algorithm over
its group of n chips:

    all-gather          result x (n - 1) / n
    reduce-scatter      result x (n - 1)          (the operand is n results)
    all-reduce          result x 2 (n - 1) / n    (a reduce-scatter then an all-gather)
    all-to-all          result x (n - 1) / n
    collective-permute  result                    (every chip sends its buffer once)

Async pairs (`-start` / `-done`) count once, at the start. The group size n comes from
`replica_groups` in any of its three spellings ({{0,1},{2,3}}, [G,n]<=[N], mesh[...] {axes}).
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:calls|body|to_apply|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%[^\s,)]+)")  # fmt: skip
_TRIPS = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_FACTOR = {
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1.0,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}


def _array_bytes(shape_text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _top_level(shape_text: str) -> list[str]:
    """The top-level elements of a tuple shape "(a, (b, c), d)" (or [shape] for an array)."""
    s = shape_text.strip()
    if not s.startswith("("):
        return [s]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 1:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start : s.rfind(")")])
    return parts


def _group_size(line: str) -> int:
    """Chips in one replica group of a collective; 2 when the line does not say."""
    if m := _GROUPS_LIST.search(line):
        return max(len([x for x in m.group(1).split(",") if x]), 1)
    if m := _GROUPS_IOTA.search(line):
        return int(m.group(1).split(",")[-1])
    if m := _GROUPS_MESH.search(line):
        sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", m.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(2)))
    return 2


def _moved(op: str, shape_text: str, line: str) -> tuple[str, float] | None:
    """(kind, bytes one chip moves) of one instruction, or None if it is no collective."""
    kind = op.removesuffix("-start")
    if kind not in KINDS or op.endswith("-done"):
        return None
    parts = _top_level(shape_text)
    if op.endswith("-start") and kind == "all-gather" and len(parts) == 2:
        parts = parts[1:]  # (operands, results)
    elif op.endswith("-start") and kind == "collective-permute":
        parts = parts[:1]  # (operand, result, contexts)
    result = sum(sum(_array_bytes(p)) for p in parts)
    n = _group_size(line)
    return kind, result * _FACTOR[kind](max(n, 1))


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    comps, entry, name = {}, "", None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            name = m.group(1)
            comps[name] = []
            entry = name if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


_CONDITION = re.compile(r"condition=%([^\s,)]+)")
_INT_CONSTANT = re.compile(r"= [su](?:32|64)\[\][^ ]* constant\(([0-9]+)\)")


def _trip_count(line: str, comps: dict[str, list[str]]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count, else (libtpu does not write it) the
    bound of a condition `i < N` with one integer constant, the form every lax.scan takes
    (its counter starts at 0 and steps by 1); None when neither says."""
    if t := _TRIPS.search(line):
        return int(t.group(1))
    cond = _CONDITION.search(line)
    body = comps.get(cond.group(1), []) if cond else []
    constants = [int(c) for ln in body for c in _INT_CONSTANT.findall(ln)]
    root = next((ln for ln in body if ln.lstrip().startswith("ROOT")), "")
    if len(constants) == 1 and " compare(" in root and "direction=LT" in root:
        return constants[0]
    return None


def collective_bytes(text: str) -> dict:
    """{kind: bytes one chip moves per step} for KINDS, plus "total" and "unknown_trips" (the
    number of while loops whose trip count XLA did not record: each counted once)."""
    comps, entry = _computations(text)
    totals = dict.fromkeys(KINDS, 0.0)
    unknown = [0]

    def walk(name: str, times: float, depth: int = 0) -> None:
        if depth > 64:
            return
        for line in comps.get(name, ()):
            m = _OP.match(line)
            if not m:
                continue
            shape_text, op = m.group(1), m.group(2)
            moved = _moved(op, shape_text, line)
            if moved:
                totals[moved[0]] += moved[1] * times
            trips = 1
            if op == "while":
                trips = _trip_count(line, comps)
                unknown[0] += trips is None
                trips = trips or 1
            for target in _CALLED.findall(line):
                for callee in re.findall(r"%?([^\s,{}%]+)", target):
                    body = op == "while" and f"body=%{callee}" in line
                    walk(callee, times * (trips if body else 1), depth + 1)

    walk(entry, 1.0)
    return {**totals, "total": sum(totals.values()), "unknown_trips": unknown[0]}


def summary_line(moved: dict) -> str:
    parts = [f"{k} {moved[k] / 2**30:.2f}G" for k in KINDS if moved.get(k)]
    return ", ".join(parts) if parts else "none"
