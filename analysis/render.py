"""A table (from `tables.py`) as Markdown, LaTeX (booktabs, best value per column in bold) or
CSV. The DataFrame keeps numbers as numbers; only these renderers turn them into text, with
the per-column formats the table carries in `.attrs`."""
from __future__ import annotations

import pandas as pd

from ttvq_analysis.tables import best_mask

FORMATS = ("md", "latex", "csv")
OVER_BUDGET_NOTE = "over budget: achieved bpw above the bit budget (placed by its bpw)"
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def render(table: pd.DataFrame, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    cells, marked = _cells(table)
    best = best_mask(table)
    note = f"† {OVER_BUDGET_NOTE}" if marked else None
    if fmt == "md":
        shown = cells.where(~best[cells.columns], "**" + cells + "**")
        text = shown.to_markdown(index=False, disable_numparse=True, colalign=_align(table, "md"))
        return text + (f"\n\n{note}" if note else "")
    return _latex(table, cells, best, note)


def _cells(table: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """Every shown cell as text ('-' where missing); the mark column folded into the method name."""
    a = table.attrs
    fmts = a.get("formats", {})
    mark = a.get("mark")
    cols = [c for c in table.columns if c != mark]
    cells = pd.DataFrame(index=table.index, columns=cols, dtype=object)
    for c in cols:
        f = fmts.get(c)
        cells[c] = table[c].map(lambda v, f=f: _fmt(v, f))
    marked = bool(mark and table[mark].any())
    if marked:
        cells["method"] = cells["method"] + table[mark].map(lambda m: " †" if m else "")
    return cells, marked


def _fmt(v, f: str | None) -> str:
    if not isinstance(v, (list, tuple)) and pd.isna(v):  # None, NaN, pd.NA
        return "-"
    if f == "flag":
        return "yes" if v else ""
    if f and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, f)
    return str(v)


def _align(table: pd.DataFrame, fmt: str) -> list[str]:
    numeric = [c in table.attrs.get("formats", {}) for c in table.columns if c != table.attrs.get("mark")]
    return [("right" if n else "left") if fmt == "md" else ("r" if n else "l") for n in numeric]


def _tex(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s).replace("†", r"$^\dagger$")


def _latex(table: pd.DataFrame, cells: pd.DataFrame, best: pd.DataFrame, note: str | None) -> str:
    group = table.attrs.get("group")
    lines = [r"\begin{tabular}{" + "".join(_align(table, "latex")) + "}", r"\toprule",
             " & ".join(_tex(str(c)) for c in cells.columns) + r" \\", r"\midrule"]
    prev = None
    for i in cells.index:
        if group is not None and prev is not None and table.at[i, group] != prev:
            lines.append(r"\midrule")
        prev = table.at[i, group] if group is not None else None
        row = [r"\textbf{" + _tex(cells.at[i, c]) + "}" if best.at[i, c] else _tex(cells.at[i, c]) for c in cells.columns]
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if note:
        lines.append(f"% {note}")  # a comment: the caption is the paper's to write
    return "\n".join(lines)
