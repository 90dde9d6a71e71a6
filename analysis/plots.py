"""Paper plots from run records (matplotlib, PNG and PDF), built on `main_table`, so they
refuse what the table refuses (mixed protocols, two records in one point) for the same reasons.

Per model:
- perplexity (log scale) and KL against achieved bpw: one series per method (and setting),
  the Pareto front (no other point has both fewer bits and a lower value) as a step line,
  over-budget points hollow, fp16 as a dashed horizontal line (at 16 bpw it
  would squeeze every quantized point against the left edge);
- zero-shot average against achieved bpw (front: fewer bits and higher accuracy);
- kernel speed-up (record `speed.decode.speedup`) against bits; skipped with a note when no
  record has speed.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ttvq_analysis.tables import REFERENCE_BITS, main_table


def pareto_front(x: pd.Series, y: pd.Series, lower_is_better: bool = True) -> pd.Series:
    """True for the points no other point beats on both axes: fewer bits (x) and a better y."""
    front = pd.Series(False, index=x.index)
    best = None
    for i in sorted(x.index, key=lambda i: (x[i], y[i] if lower_is_better else -y[i])):
        if pd.isna(y[i]) or pd.isna(x[i]):
            continue
        if best is None or (y[i] < best if lower_is_better else y[i] > best):
            front[i], best = True, y[i]
    return front


def _label(row) -> str:
    return row["method"] + (f" {row['setting']}" if row.get("setting") else "")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _wrap(label: str, width: int = 40) -> str:
    """A long setting (toggles joined by commas) on several legend lines, broken after commas."""
    lines, cur = [], ""
    for part in label.split(","):
        if cur and len(cur) + len(part) + 1 > width:
            lines.append(cur + ",")
            cur = part
        else:
            cur = f"{cur},{part}" if cur else part
    return "\n".join(lines + [cur])


def _save(fig, out: Path, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(str(p))
    return paths


def metric_vs_bpw(t: pd.DataFrame, col: str, ylabel: str, title: str, lower_is_better: bool = True, log: bool = False):
    """One figure: `col` of table `t` against achieved bpw, front and reference marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    quant = t[(t["bits"] < REFERENCE_BITS) & t[col].notna()]
    for lbl, g in quant.groupby(quant.apply(_label, axis=1), sort=True):
        ok, over = g[~g["over_budget"]], g[g["over_budget"]]
        line = ax.plot(g["bpw"], g[col], "-", alpha=0.35)[0]
        ax.scatter(ok["bpw"], ok[col], color=line.get_color(), zorder=3)
        ax.scatter(over["bpw"], over[col], facecolors="none", edgecolors=line.get_color(), linewidths=1.5, zorder=3)
        ax.plot([], [], "o-", color=line.get_color(), label=_wrap(lbl))
        for _, r in g.iterrows():
            ax.annotate(f"w{r['bits']}", (r["bpw"], r[col]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = quant[pareto_front(quant["bpw"], quant[col], lower_is_better)].sort_values("bpw")
    if len(front):
        ax.step(front["bpw"], front[col], where="post", color="black", linestyle=":", label="Pareto front")
    if quant["over_budget"].any():
        ax.scatter([], [], facecolors="none", edgecolors="gray", linewidths=1.5, label="over budget (hollow)")
    for _, r in t[t["bits"] >= REFERENCE_BITS].iterrows():
        if pd.notna(r[col]):
            ax.axhline(r[col], color="gray", linestyle="--", linewidth=1, label=f"{r['method']} ({r['bpw']:.0f} bpw)")
    vals = t[col].dropna()
    if log and len(vals) and vals.min() > 0 and vals.max() / vals.min() > 5:  # else log ticks say nothing
        ax.set_yscale("log")
    ax.set_xlabel("achieved bpw (decoder linears)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside, never over, the points
    return fig


def speedup_vs_bits(t: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    quant = t[(t["bits"] < REFERENCE_BITS) & t["speedup"].notna()]
    for lbl, g in quant.groupby(quant.apply(_label, axis=1), sort=True):
        ax.plot(g["bits"], g["speedup"], "o-", label=_wrap(lbl))
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="dense reference")
    ax.set_xlabel("bits")
    ax.set_ylabel("decode speed-up over the dense model")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside, never over, the points
    return fig


def plot_all(df: pd.DataFrame, corpus: str, out: str | Path) -> list[str]:
    """Every plot for every model in df; returns one line per file written or plot skipped."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install -e '.[analysis]'") from None

    matplotlib.use("Agg")  # files only, never a window (a headless machine, a notebook kernel)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for model in sorted(df["model"].astype(str).unique()):
        t = main_table(df[df["model"].astype(str) == model], [corpus])
        proto = t.attrs["protocol"].get(corpus, {})
        where = f"{model}, {corpus} (seqlen {proto.get('seqlen')}, {proto.get('n_tokens')} tokens)"
        plots = [(f"ppl {corpus}", f"perplexity on {corpus}", "ppl", True, True),
                 (f"kl {corpus}", f"KL(fp || quantized) on {corpus}", "kl", True, True),
                 ("zs avg", "zero-shot average accuracy", "zeroshot", False, False)]
        for col, ylabel, stem, lower, log in plots:
            if col not in t:
                lines.append(f"note: no {ylabel} in the records of {model}: no {stem} plot")
                continue
            fig = metric_vs_bpw(t, col, ylabel, where, lower_is_better=lower, log=log)
            lines += _save(fig, out, _safe(f"{stem}_vs_bpw_{model}_{corpus}"))
            plt.close(fig)
        if "speedup" not in t:
            lines.append(f"note: no record of {model} has a kernel speed (speed.decode.speedup): no speed-up plot")
            continue
        fig = speedup_vs_bits(t, f"{model}: decode speed-up")
        lines += _save(fig, out, _safe(f"speedup_vs_bits_{model}"))
        plt.close(fig)
    return lines
