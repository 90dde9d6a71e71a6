"""ttvq_analysis: records -> DataFrame -> tables (md/latex/csv), plots, sweep summary, W&B source,
paired zero-shot comparison; every refusal is one ValueError line (the CLI's `error: ...`)."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from ttvq_analysis.load import load_runs
from ttvq_analysis.render import render
from ttvq_analysis.tables import ablation_table, ablation_view, best_mask, main_table, reference_ppl
from ttvq_bench.record.results import append_run


def rec(run_id, method, bits, ppl, seqlen=256, status="ok", t="2026-01-01T00:00:00", **more):
    r = {"run_id": run_id, "status": status, "method": method, "bits": bits, "model": "m", "bpw": bits + 0.25,
         "bpw_model": bits + 1.0, "time": t, "ppl": {"c": ppl}, "kl": {"c": ppl / 100},
         "protocol": {"c": {"seqlen": seqlen, "stride": seqlen, "bos": True, "n_tokens": 100, "split": "eval", "source": "x",
                            "kl": {"exact": True, "topk": None}}},
         "timing": {"quantize_s": 1.0 * bits}, "peak_rss_mb": 500.0, "over_budget": False,
         "config": {"method": {"name": method}}, "quantize": {"source": "quantized", "layers": {"a": {}}}}
    return r | more


def zs(accs: dict, version="0.4.13", metric=None) -> dict:
    tasks = {t: {"acc": a, "acc_norm": a, "n": 50, "task_version": 1.0, "metric": metric or "acc"} for t, a in accs.items()}
    if metric == "acc_mutual_info":
        for t, a in accs.items():
            tasks[t]["acc_mutual_info"] = a + 0.1
    return {"tasks": tasks, "average": sum(r[r["metric"]] for r in tasks.values()) / len(tasks), "lm_eval_version": version,
            "bos": True, "limit": 50, "seed": 1234, "num_fewshot": 0}


# -------------------------------------------------------------------------------------------
# loading


def test_latest_record_wins_failed_are_dropped_and_values_are_numbers(tmp_path):
    append_run(tmp_path, rec("a", "rtn", 2, 100.0))
    append_run(tmp_path, rec("b", "gptq", 2, 20.0))
    append_run(tmp_path, rec("b", "gptq", 2, 19.0, t="2026-01-02T00:00:00"))  # forced rerun wins
    append_run(tmp_path, rec("c", "gptq", 3, 9.0, status="failed"))
    append_run(tmp_path, rec("d", "rtn", 3, float("inf")))  # written as the string "inf"
    df = load_runs(tmp_path)
    assert sorted(df["run_id"]) == ["a", "b", "d"]
    assert df.set_index("run_id").loc["b", "ppl.c"] == 19.0
    assert df["ppl.c"].dtype == float and df.set_index("run_id").loc["d", "ppl.c"] == float("inf")
    assert df["protocol.c.source"].tolist() == ["x"] * 3  # protocol columns kept, text stays text


def test_several_results_dirs_pool_and_keep_their_origin(tmp_path):
    append_run(tmp_path / "one", rec("a", "rtn", 2, 10.0))
    append_run(tmp_path / "two", rec("b", "rtn", 3, 5.0))
    df = load_runs([tmp_path / "one", tmp_path / "two"])
    assert dict(zip(df["run_id"], df["results_dir"])) == {"a": str(tmp_path / "one"), "b": str(tmp_path / "two")}


# -------------------------------------------------------------------------------------------
# the main table


def test_main_table_rows_columns_and_order(tmp_path):
    speed = {"decode": {"speedup": 1.7}}
    # a reference stored at fp32 (32 bpw, nominal 16 bits): its record's over_budget is no mark
    append_run(tmp_path, rec("f", "fp16", 16, 5.0, over_budget=True, zeroshot=zs({"piqa": 0.7, "arc": 0.5})))
    append_run(tmp_path, rec("r2", "rtn", 2, 50.0, over_budget=True, zeroshot=zs({"piqa": 0.5, "arc": 0.3})))
    append_run(tmp_path, rec("g2", "gptq", 2, 20.0, speed=speed, zeroshot=zs({"piqa": 0.6, "arc": 0.4}),
                             config={"method": {"name": "gptq", "group_size": 16, "act_order": True}}))
    append_run(tmp_path, rec("g3", "gptq", 3, 8.0, zeroshot=zs({"piqa": 0.65, "arc": 0.45})))
    t = main_table(load_runs(tmp_path), "c")
    assert t[["method", "bits"]].values.tolist() == [["fp16", 16], ["gptq", 2], ["rtn", 2], ["gptq", 3]]
    assert t["setting"].tolist() == ["", "group_size=16,act_order=true", "", ""]  # toggles vs GPTQConfig defaults
    assert t["over_budget"].tolist() == [False, False, True, False]
    assert t["ppl c"].tolist() == [5.0, 20.0, 50.0, 8.0] and t["kl c"].tolist() == [0.05, 0.2, 0.5, 0.08]
    assert t["piqa acc"].tolist() == [0.7, 0.6, 0.5, 0.65] and t["zs avg"].iloc[1] == pytest.approx(0.5)
    assert t.loc[1, "speedup"] == 1.7 and pd.isna(t.loc[0, "speedup"])
    assert {"bpw", "bpw_model", "quantize_s", "peak_rss_mb"} <= set(t.columns)
    assert all(t[c].dtype.kind in "fi" for c in t.columns if c not in ("method", "setting", "over_budget"))


def test_main_table_scores_mutual_info_tasks_by_it(tmp_path):
    append_run(tmp_path, rec("n", "rtn", 3, 9.0, t="2025-01-01T00:00:00"))  # no zero-shot, first in the file
    append_run(tmp_path, rec("a", "rtn", 2, 10.0, zeroshot=zs({"default_continuation": 0.25}, metric="acc_mutual_info")))
    t = main_table(load_runs(tmp_path), "c").set_index("bits")
    assert t.loc[2, "default_continuation acc_mutual_info"] == pytest.approx(0.35) and "default_continuation acc" not in t
    assert t.loc[2, "zs avg"] == pytest.approx(0.35) and pd.isna(t.loc[3, "zs avg"])


@pytest.mark.parametrize("other, named", [
    ({"seqlen": 2048}, "seqlen is 256"),
    ({"split": "test"}, "split is eval"),
])
def test_refuses_mixed_ppl_protocols_naming_the_difference(tmp_path, other, named):
    append_run(tmp_path, rec("a", "rtn", 2, 100.0))
    r = rec("b", "rtn", 3, 10.0)
    r["protocol"]["c"].update(other)
    append_run(tmp_path, r)
    with pytest.raises(ValueError, match=f"mix protocols: protocol.c.{named} .* vs "):
        main_table(load_runs(tmp_path), "c")


def test_refuses_mixed_zeroshot_protocols_and_task_sets(tmp_path):
    append_run(tmp_path, rec("a", "rtn", 2, 10.0, zeroshot=zs({"piqa": 0.5})))
    append_run(tmp_path, rec("b", "rtn", 3, 9.0, zeroshot=zs({"piqa": 0.6}, version="0.4.9")))
    with pytest.raises(ValueError, match=r"lm_eval_version is 0.4.13 \(runs a\) vs 0.4.9 \(runs b\)"):
        main_table(load_runs(tmp_path), "c")
    append_run(tmp_path / "sets", rec("a", "rtn", 2, 10.0, zeroshot=zs({"piqa": 0.5})))
    append_run(tmp_path / "sets", rec("b", "rtn", 3, 9.0, zeroshot=zs({"piqa": 0.6, "arc": 0.4})))
    with pytest.raises(ValueError, match="averages over different task sets"):
        main_table(load_runs(tmp_path / "sets"), "c")


def test_two_records_in_one_row_or_two_models_are_refused(tmp_path):
    append_run(tmp_path, rec("a", "rtn", 2, 10.0))
    append_run(tmp_path, rec("b", "rtn", 2, 11.0))
    with pytest.raises(ValueError, match="share a cell"):
        main_table(load_runs(tmp_path), "c")
    append_run(tmp_path / "m", rec("a", "rtn", 2, 10.0))
    append_run(tmp_path / "m", rec("b", "rtn", 3, 9.0, model="other"))
    with pytest.raises(ValueError, match="2 models .*--model"):
        main_table(load_runs(tmp_path / "m"), "c")


# -------------------------------------------------------------------------------------------
# rendering


def test_render_formats_bold_best_and_over_budget_mark(tmp_path):
    append_run(tmp_path, rec("f", "fp16", 16, 5.0))  # the reference: never "best"
    append_run(tmp_path, rec("r", "rtn", 2, 30.0))
    append_run(tmp_path, rec("g", "gptq", 2, 20.0))
    append_run(tmp_path, rec("v", "vptq", 2, 10.0, over_budget=True))  # lowest, but over budget: not best
    t = main_table(load_runs(tmp_path), "c")
    md = render(t, "md")
    assert "| vptq †" in md and "† over budget" in md and "**20.000**" in md and "**10.000**" not in md
    assert "**5.000**" not in md and "30.000" in md
    tex = render(t, "latex")
    assert tex.startswith(r"\begin{tabular}{lrrrrrrr}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\textbf{20.000}" in tex and r"vptq $^\dagger$" in tex and r"ppl c" in tex and r"bpw\_model" in tex
    assert "setting" not in t  # every method at its defaults: no column of blanks
    assert tex.count(r"\midrule") == 2  # under the header, and between fp16 and the 2-bit group
    back = pd.read_csv(__import__("io").StringIO(render(t, "csv")))
    assert back["ppl c"].tolist() == [5.0, 20.0, 30.0, 10.0] and back["over_budget"].tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="unknown format 'html'"):
        render(t, "html")


# -------------------------------------------------------------------------------------------
# ablation tables


def test_ablation_table_rows_ratio_and_duplicates(tmp_path):
    def ab(run_id, bits, init, upd, ppl):
        r = rec(run_id, "ttvq", bits, ppl)
        r["config"] = {"method": {"name": "ttvq", "init": init, "index_update": upd}}
        r["timing"] = {"quantize_s": 10.0 * bits}
        return r

    append_run(tmp_path, rec("f", "fp16", 16, 5.0))
    append_run(tmp_path, ab("a", 2, "vptq", "latent", 10.0))
    append_run(tmp_path, ab("b", 2, "vptq", "frozen", 20.0) | {"over_budget": True})
    append_run(tmp_path, ab("c", 3, "vptq", "latent", 6.0))
    df = load_runs(tmp_path)
    ref = reference_ppl(df, "c", "fp16")
    t = ablation_table(df[df["method"] == "ttvq"], "c", ["method.init", "method.index_update"], ref)
    assert t.loc[("vptq", "latent"), ("2", "x_ref")] == pytest.approx(2.0)
    assert t.loc[("vptq", "frozen"), ("2", "ppl")] == 20.0 and t.loc[("vptq", "latent"), ("3", "quantize_s")] == 30.0
    assert t.loc[("vptq", "frozen"), ("2", "over_budget")] == 1.0
    assert pd.isna(t.loc[("vptq", "frozen"), ("3", "ppl")])
    # an over-budget cell is never its bit width's best, though its perplexity is the lowest
    append_run(tmp_path, ab("e", 2, "aqlm", "latent", 9.0) | {"over_budget": True})
    append_run(tmp_path, ab("g", 2, "aqlm", "frozen", 15.0))
    shown = ablation_view(load_runs(tmp_path).query("method == 'ttvq'"), "c", ["method.init", "method.index_update"])
    best = best_mask(shown)
    assert shown.loc[best["w2 ppl"], "w2 ppl"].tolist() == [10.0]
    append_run(tmp_path, ab("d", 2, "vptq", "latent", 11.0))  # a second run in one cell
    with pytest.raises(ValueError, match="share a cell"):
        ablation_table(load_runs(tmp_path).query("method == 'ttvq'"), "c", ["method.init", "method.index_update"])


def test_cli_tables_filters_and_errors(tmp_path, capsys):
    from ttvq_analysis.cli import main

    for run_id, bits, upd, ppl, sweep in [("a", 2, "latent", 10.0, "s1"), ("b", 2, "frozen", 20.0, "s1"),
                                          ("c", 2, "latent", 30.0, "s2")]:
        r = rec(run_id, "ttvq", bits, ppl)
        r.update(config={"method": {"name": "ttvq", "index_update": upd}}, sweep=sweep)
        append_run(tmp_path, r)
    append_run(tmp_path, rec("f", "fp16", 16, 5.0) | {"sweep": "s0"})  # the reference: another sweep
    main(["--results", str(tmp_path), "--corpus", "c", "--method", "ttvq", "--ref", "fp16",
          "--rows", "method.index_update", "--where", "sweep=s1"])
    out = capsys.readouterr().out
    assert "reference fp16 = 5.0000" in out and "| latent" in out and "| frozen" in out and "30.0" not in out
    main(["--results", str(tmp_path), "--corpus", "c", "--where", "sweep=s1", "--format", "csv"])
    csv = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert csv.set_index("ppl c")["setting"].fillna("").to_dict() == {10.0: "", 20.0: "index_update=frozen"}
    main(["--results", str(tmp_path), "--corpus", "c", "--where", "sweep=s2", "--format", "latex"])
    assert r"\begin{tabular}" in capsys.readouterr().out
    # one key twice: either value; different keys: both; text values take shell wildcards
    main(["--results", str(tmp_path), "--corpus", "c", "--where", "sweep=s0", "--where", "sweep=s[2-9]", "--format", "csv"])
    csv = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert csv["ppl c"].tolist() == [5.0, 30.0]
    with pytest.raises(ValueError, match="no records match sweep=x or sweep=y"):
        main(["--results", str(tmp_path), "--corpus", "c", "--where", "sweep=x", "--where", "sweep=y"])
    for bad, msg in [(["--where", "nope=1"], "no such record field 'nope'"), (["--where", "bits=7"], "no records match bits=7"),
                     (["--where", "bits"], "write KEY=VALUE"), (["--model", "zz"], "no records match model=zz")]:
        with pytest.raises(ValueError, match=msg):
            main(["--results", str(tmp_path), "--corpus", "c", *bad])
    # the command line itself: one line, exit 2, no traceback
    p = subprocess.run([sys.executable, "-m", "ttvq_analysis", "--results", str(tmp_path), "--corpus", "nope"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: no records evaluated on nope"


# -------------------------------------------------------------------------------------------
# plots, sweep summary


def test_pareto_front():
    from ttvq_analysis.plots import pareto_front

    x = pd.Series([2.0, 2.5, 3.0, 3.0, 4.0])
    y = pd.Series([10.0, 12.0, 8.0, 9.0, 8.5])
    assert pareto_front(x, y).tolist() == [True, False, True, False, False]
    assert pareto_front(x, y, lower_is_better=False).tolist() == [True, True, False, False, False]


def test_plots_written_and_speed_skipped_with_a_note(tmp_path):
    from ttvq_analysis.plots import plot_all

    append_run(tmp_path, rec("f", "fp16", 16, 5.0))
    append_run(tmp_path, rec("r", "rtn", 2, 30.0, over_budget=True))
    append_run(tmp_path, rec("g", "gptq", 3, 20.0))
    lines = plot_all(load_runs(tmp_path), "c", tmp_path / "plots")
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert made == ["kl_vs_bpw_m_c.pdf", "kl_vs_bpw_m_c.png", "ppl_vs_bpw_m_c.pdf", "ppl_vs_bpw_m_c.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in made)
    assert any(line.startswith("note: no record of m has a kernel speed") for line in lines)
    append_run(tmp_path / "s", rec("g", "gptq", 3, 20.0, speed={"decode": {"speedup": 2.0}}))
    lines = plot_all(load_runs(tmp_path / "s"), "c", tmp_path / "plots_s")
    assert str(tmp_path / "plots_s" / "speedup_vs_bits_m.png") in lines


def test_sweep_summary(tmp_path):
    from ttvq_analysis.summary import sweep_summary

    append_run(tmp_path, rec("a", "rtn", 2, 10.0, sweep="s"))
    append_run(tmp_path, rec("b", "gptq", 2, 9.0, sweep="s", status="failed") | {"bpw": None, "ppl": {}, "kl": {}})
    append_run(tmp_path, rec("c", "gptq", 3, 8.0, sweep="other"))
    # a point killed before it had a record of its own (the local launcher writes this one)
    append_run(tmp_path, {"run_id": None, "status": "failed", "error": "killed by SIGKILL", "sweep": "s",
                          "overrides": ["method=vptq", "bits=3"], "time": "2026-01-01T00:00:01"})
    lines = sweep_summary(str(tmp_path), "s").splitlines()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["method", "bits", "status", "bpw", "ppl c", "kl c"]
    assert rows == [["gptq", "2", "failed", "-", "-", "-"], ["rtn", "2", "ok", "2.250", "10.000", "0.1"],
                    ["vptq", "3", "failed", "-", "-", "-"]]
    assert sweep_summary(str(tmp_path), "nope").startswith("(no summary of sweep 'nope'")
    # a point of this sweep skipped for its existing record (of sweep "other"): its result.json
    (tmp_path / "sweep" / "3_gptq_w3").mkdir(parents=True)
    (tmp_path / "sweep" / "3_gptq_w3" / "result.json").write_text(json.dumps(rec("c", "gptq", 3, 8.0, sweep="other")))
    lines = sweep_summary(str(tmp_path), "s", tmp_path / "sweep").splitlines()
    assert [c.strip() for c in lines[4].split("|")[1:5]] == ["gptq", "3", "skipped", "3.250"] and len(lines) == 6
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "runs.jsonl").write_text('{"status": "ok", "sweep": "s"}\n')  # a record with nothing in it
    bare = sweep_summary(str(tmp_path / "bare"), "s").splitlines()[2]
    assert [c.strip() for c in bare.split("|")[1:4]] == ["?", "-", "ok"]
    (tmp_path / "bad" / "runs.jsonl").mkdir(parents=True)  # unreadable: one line, never an exception
    assert sweep_summary(str(tmp_path / "bad"), "s").startswith("(no summary of sweep 's' in ") and \
        "IsADirectoryError" in sweep_summary(str(tmp_path / "bad"), "s")


# -------------------------------------------------------------------------------------------
# W&B as a source (fake API: the real service is out of reach here)


class FakeFile:
    def __init__(self, text):
        self.text = text

    def download(self, root, replace=False):
        if self.text is None:
            raise ValueError("no such file")  # what a run without the file gives, in some form
        (__import__("pathlib").Path(root) / "result.json").write_text(self.text)


class FakeApiRun:
    def __init__(self, record, attach):
        from ttvq_bench.record.wandb_log import summary

        self.id, self.summary = record["run_id"], summary(record) | {"_runtime": 3, "curves/epoch": 2}
        self.config = {"method": record["config"]["method"], "_wandb": {}}
        self._file = FakeFile(json.dumps(record) if attach else None)

    def file(self, name):
        assert name == "result.json"
        return self._file


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_records_from_wandb_match_the_local_ones(tmp_path):
    a = rec("a", "rtn", 2, 10.0, zeroshot=zs({"piqa": 0.5}))
    b = rec("b", "gptq", 3, 8.0, zeroshot=zs({"piqa": 0.6}))
    for r in (a, b):
        append_run(tmp_path, r)
    api = FakeApi([FakeApiRun(a, attach=True), FakeApiRun(b, attach=False)])  # b: rebuilt from its summary
    df = load_runs([], wandb_path="ent/proj", wandb_api=api, wandb_filters={"group": "g"})
    assert api.calls == [("ent/proj", {"group": "g"})]
    local = load_runs(tmp_path)
    cols = ["ppl.c", "kl.c", "bpw", "protocol.c.seqlen", "protocol.c.split", "zeroshot.tasks.piqa.acc",
            "zeroshot.lm_eval_version", "timing.quantize_s", "setting"]
    pd.testing.assert_frame_equal(df.set_index("run_id")[cols].sort_index(), local.set_index("run_id")[cols].sort_index())
    assert (df["results_dir"] == "wandb:ent/proj").all()
    assert main_table(df, "c")["ppl c"].tolist() == [10.0, 8.0]


# -------------------------------------------------------------------------------------------
# paired zero-shot comparison


def test_paired_zeroshot(tmp_path):
    from ttvq_analysis.paired import paired_zeroshot

    def write(name, accs, hashes=None):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"doc_id": i, "doc_hash": (hashes or "abcd")[i], "acc": a}) + "\n"
                             for i, a in enumerate(accs)))
        return p

    a, b = write("a", [1, 1, 0, 1]), write("b", [1, 0, 0, 0])
    r = paired_zeroshot(a, b, "acc")
    assert r["n"] == 4 and r["a"] == 0.75 and r["b"] == 0.25 and r["diff"] == 0.5
    assert r["a_only"] == 2 and r["b_only"] == 0 and r["stderr"] == pytest.approx(pd.Series([0, 1, 0, 1]).std() / 2)
    with pytest.raises(ValueError, match="different documents"):
        paired_zeroshot(a, write("c", [1, 0, 0, 0], hashes="abXd"), "acc")
    with pytest.raises(ValueError, match="no zero-shot samples"):
        paired_zeroshot(a, tmp_path / "missing.jsonl")
