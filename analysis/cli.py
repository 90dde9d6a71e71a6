"""`python -m ttvq_analysis [table|plot|summary] ...` (docs/analysis.md).

    python -m ttvq_analysis --results DIR [DIR ...] --corpus NAME[,NAME] [--format md|latex|csv]
        the main table (method x bits, with the fp16 row);
        with --rows KEY,KEY an ablation table (--ref METHOD for the perplexity ratio);
    python -m ttvq_analysis plot --results DIR --corpus NAME --out DIR
        perplexity / KL / zero-shot against achieved bpw, speed-up against bits (PNG and PDF);
    python -m ttvq_analysis summary --results DIR --sweep NAME [--sweep-dir DIR]
        the short table printed at the end of a sweep.

Filters for all: --model, --method, --where KEY=VALUE (repeatable); --wandb ENTITY/PROJECT adds
the runs mirrored to W&B. Bad input raises ValueError; `__main__` prints it as `error: ...`.
"""
from __future__ import annotations

import argparse

from ttvq_analysis.load import default_results_dir, load_runs
from ttvq_analysis.render import FORMATS, render
from ttvq_analysis.select import select

COMMANDS = ("table", "plot", "summary")


def _parser(cmd: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m ttvq_analysis{'' if cmd == 'table' else ' ' + cmd}",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", nargs="+", default=[default_results_dir()],
                    help="results dir(s) holding runs.jsonl (default: $TTVQ_RESULTS, else ~/ttvq/results, as the jobs)")
    if cmd == "summary":
        ap.add_argument("--sweep", required=True)
        ap.add_argument("--sweep-dir", default=None, help="the Hydra sweep dir: its points skipped for an existing record too")
        return ap
    ap.add_argument("--corpus", required=True, help="corpus name, or several comma-separated (main table)")
    ap.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT",
                    help="also load the runs mirrored to W&B (needs the network and an API key)")
    ap.add_argument("--model", default=None, help="only records of this model")
    ap.add_argument("--method", default=None, help="only records of this method")
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE filter on a record field (repeatable)")
    if cmd == "plot":
        ap.add_argument("--out", required=True, help="folder for the PNG and PDF files")
        return ap
    ap.add_argument("--format", default="md", choices=FORMATS)
    ap.add_argument("--rows", default=None, help="comma-separated config keys: an ablation table")
    ap.add_argument("--ref", default=None, help="method whose perplexity is the ratio's denominator (e.g. fp16); "
                    "looked up before --where/--method, among records of the same protocol")
    return ap


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "table"
    args = _parser(cmd).parse_args(argv)
    if cmd == "summary":
        from ttvq_analysis.load import records_frame
        from ttvq_analysis.summary import sweep_records, sweep_table

        recs = [r for d in args.results for r in sweep_records(d, args.sweep, args.sweep_dir)]
        print(render(sweep_table(records_frame(recs, status=None, merge=False), args.sweep), "md"))
        return
    everything = load_runs(args.results, wandb_path=args.wandb)
    df = select(everything, model=args.model, method=args.method, where=args.where)
    corpora = [c for c in args.corpus.split(",") if c]
    if cmd == "plot":
        from ttvq_analysis.plots import plot_all

        for line in plot_all(df, corpora[0], args.out):
            print(line)
        return
    table(args, everything, df, corpora)


def table(args, everything, df, corpora: list[str]) -> None:
    from ttvq_analysis.tables import ablation_view, main_table

    if args.rows:
        if len(corpora) != 1:
            raise ValueError("an ablation table (--rows) is on one --corpus")
        # The reference may come from another sweep (it is checked for the same protocol).
        t = ablation_view(df, corpora[0], args.rows.split(","), args.ref, pool=select(everything, model=args.model))
    else:
        t = main_table(df, corpora)
    head = [f"protocol {what}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for what, p in t.attrs["protocol"].items()]
    head += [f"reference {m} = {v:.4f}" for m, v in t.attrs.get("reference", {}).items() if isinstance(v, float)]
    if args.format == "md":
        print("\n".join(head) + "\n")
    elif args.format == "latex":
        print("\n".join("% " + h for h in head))
    print(render(t, args.format).rstrip("\n"))
