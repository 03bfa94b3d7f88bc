"""Plain-text tables for the operator commands (`ctl`, `db check`): what people read.

Scripts pass `--json` and get the server's JSON unchanged; this module only draws. It knows
no command: a JSON object becomes aligned `label  value` lines, a nested object a titled
section, a list of objects a table (an actor's `children` indented under it), and values get
units from their key: `*_secs` and `seconds` as durations, `*_bytes` and `bytes` as sizes,
`amount` and `balance` (piconero) in XMR, booleans as yes/no, null as `-`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

PICONERO = 10**12
XMR_KEYS = frozenset({"amount", "balance"})
LABELS = {"bytes": "size", "seconds": "took"}  # a key that is only a unit
UNITS = ("_secs", "_bytes")
GAP = "  "


def xmr(piconero: int) -> str:
    """1500000000000 → "1.5 XMR" (exact: integer arithmetic)."""
    sign = "-" if piconero < 0 else ""
    whole, frac = divmod(abs(piconero), PICONERO)
    digits = f"{frac:012d}".rstrip("0")
    return f"{sign}{whole}{'.' + digits if digits else ''} XMR"


def duration(secs: float) -> str:
    """0.008 → "8 ms", 2.1 → "2.1 s", 75 → "1 min 15 s", 3700 → "1 h 1 min"."""
    if secs < 1:
        ms = secs * 1000
        return f"{ms:.0f} ms" if ms >= 1 else f"{ms:.2f} ms"
    if secs < 60:
        return f"{secs:.1f} s"
    whole = int(secs)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                      ("min", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // sub_size} {sub}"
    raise AssertionError("unreachable")  # pragma: no cover


def size(n: int) -> str:
    """51200 → "50.0 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    for suffix in UNITS:
        key = key.removesuffix(suffix)
    return key.replace("_", " ")


def cell(key: str, value: Any) -> str:
    """One value as text, its unit taken from its key; one line, whatever it holds."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if key in XMR_KEYS and isinstance(value, int):
            return xmr(value)
        if key.endswith("_secs") or key == "seconds":
            return duration(value)
        if (key.endswith("_bytes") or key == "bytes") and isinstance(value, int):
            return size(value)
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return ", ".join(cell(key, v) for v in value) or "-"
    text = str(value) if not isinstance(value, dict) else ", ".join(
        f"{label(k)} {cell(k, v)}" for k, v in value.items())
    return " ".join(text.split()) or "-"  # an error's newlines would break the row


def pairs(items: Sequence[tuple[str, Any]], indent: str = "") -> list[str]:
    """`label  value` lines, the values aligned."""
    width = max((len(label(k)) for k, _ in items), default=0)
    return [f"{indent}{label(k):<{width}}{GAP}{cell(k, v)}".rstrip() for k, v in items]


def _flatten(rows: Sequence[Mapping[str, Any]], depth: int = 0
             ) -> Iterator[tuple[int, Mapping[str, Any]]]:
    for row in rows:
        yield depth, row
        children = row.get("children")
        if isinstance(children, list):
            yield from _flatten([c for c in children if isinstance(c, Mapping)], depth + 1)


def table(rows: Sequence[Mapping[str, Any]], indent: str = "") -> list[str]:
    """Aligned columns under upper-case headers; free text (`*error`) goes last, a tree's
    children are indented under their parent in the first column."""
    flat = list(_flatten(rows))
    keys: list[str] = []
    for _, row in flat:
        keys.extend(k for k in row if k != "children" and k not in keys)
    keys.sort(key=lambda k: k.endswith("error"))  # stable: the rest keep their order
    grid = [[label(k).upper() for k in keys]]
    for depth, row in flat:
        cells = [cell(k, row.get(k)) for k in keys]
        if cells:
            cells[0] = GAP * depth + cells[0]
        grid.append(cells)
    widths = [max(len(r[i]) for r in grid) for i in range(len(keys))]
    return [indent + GAP.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in grid]


def _is_table(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping)
                                                           for v in value)


def render(data: Any) -> str:
    """A command's JSON answer for people."""
    if not isinstance(data, Mapping):
        return cell("", data)
    if len(data) == 1:
        (key, only), = data.items()
        if only == []:
            return f"{label(key)}: none"
        if _is_table(only):
            return "\n".join(table(only))
    blocks = _blocks(data, "")
    return "\n".join(line for block in _spaced(blocks) for line in block)


def _blocks(data: Mapping[str, Any], indent: str) -> list[list[str]]:
    """Runs of scalars as one aligned block; each object or table a titled block."""
    blocks: list[list[str]] = []
    run: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) or _is_table(value):
            if run:
                blocks.append(pairs(run, indent))
                run = []
            inner = indent + GAP
            body = (table(value, inner) if _is_table(value) else
                    [line for b in _spaced(_blocks(value, inner)) for line in b])
            blocks.append([f"{indent}{label(key)}", *body])
        else:
            run.append((key, value))
    if run:
        blocks.append(pairs(run, indent))
    return blocks


def _spaced(blocks: list[list[str]]) -> Iterator[list[str]]:
    """The blocks, a blank line between two."""
    for i, block in enumerate(blocks):
        if i:
            yield [""]
        yield block
