"""Rich tables shared by several commands (layers, metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from mpq.model import LoadedModel


def human(n: float) -> str:
    """A count with a k/M/G suffix."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def layer_table_view(model: LoadedModel, granularity: str = "layer") -> Table:
    """The model's quantizable layer groups as a rich table."""
    groups = model.groups(granularity)
    by_name = {lay.name: lay for lay in model.layers}
    total_params = sum(g.params for g in groups) or 1
    total_macs = sum(g.macs for g in groups) or 1
    table = Table(title=f"{model.source.name}: {len(groups)} quantizable {granularity} groups at "
                        f"{model.imgsz}x{model.imgsz}", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("group")
    table.add_column("type")
    if granularity == "layer":
        table.add_column("shape (out, in/g, k)")
    else:
        table.add_column("layers", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("% MACs", justify="right")
    for g in groups:
        if granularity == "layer":
            lay = by_name[g.layers[0]]
            k = "x".join(map(str, lay.kernel))
            if lay.groups > 1:
                dw = " dw" if lay.groups == lay.in_channels else f" g{lay.groups}"
            else:
                dw = ""
            shape = f"{lay.out_channels}, {lay.in_channels // lay.groups}, {k}{dw}"
        else:
            shape = str(g.size)
        table.add_row(str(g.index), g.name, g.kind, shape, human(g.params), human(g.macs),
                      f"{100 * g.macs / total_macs:.1f}")
    table.add_section()
    table.add_row("", "total", "", "", human(total_params), human(total_macs), "100.0")
    return table
