"""Rich views of sensitivity tables and trials."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from search.sensitivity import SensitivityTable


def sensitivity_tables(table: SensitivityTable, top: int = 12) -> list[Table]:
    """The ``top`` most and least sensitive groups of a table as two rich tables."""
    cands = table.candidates()
    order = table.ranking()
    out = []
    for title, names in ((f"Most sensitive ({table.metric})", order[:top]),
                         (f"Least sensitive ({table.metric})", order[-top:][::-1])):
        t = Table(title=title)
        t.add_column("rank", justify="right")
        t.add_column("group")
        for c in cands:
            t.add_column(c, justify="right")
        if table.metric == "fidelity":
            t.add_column("SQNR dB (W4A8)", justify="right")
        for name in names:
            per = table.scores.get(name, {})
            row = [str(order.index(name) + 1), name]
            row += [_num(per.get(c, {}).get("damage")) for c in cands]
            if table.metric == "fidelity":
                row.append(_num(per.get("W4A8", per.get(cands[0], {})).get("sqnr_db"), 1))
            t.add_row(*row)
        out.append(t)
    return out


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v != 0 and abs(v) < 10 ** -digits:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"
