import pandas as pd
import pytest

from ttvq_analysis.load import load_runs
from ttvq_analysis.tables import ppl_table
from ttvq_bench.record.results import append_run


def rec(run_id, method, bits, ppl, seqlen=256, status="ok", t="2026-01-01T00:00:00"):
    return {"run_id": run_id, "status": status, "method": method, "bits": bits, "bpw": bits + 0.25, "time": t,
            "ppl": {"c": ppl}, "protocol": {"c": {"seqlen": seqlen, "stride": seqlen, "bos": True, "n_tokens": 100, "source": "x"}},
            "quantize": {"source": "quantized", "layers": {"a": {}}}}


def test_table_and_latest(tmp_path):
    append_run(tmp_path, rec("a", "rtn", 2, 100.0))
    append_run(tmp_path, rec("b", "gptq", 2, 20.0))
    append_run(tmp_path, rec("b", "gptq", 2, 19.0, t="2026-01-02T00:00:00"))  # forced rerun wins
    append_run(tmp_path, rec("c", "gptq", 3, 9.0, status="failed"))
    df = load_runs(tmp_path)
    assert len(df) == 2
    t = ppl_table(df, "c")
    assert t.loc["gptq", 2] == "19.000 (2.25)" and t.loc["rtn", 2] == "100.000 (2.25)"


def test_refuses_mixed_protocols(tmp_path):
    append_run(tmp_path, rec("a", "rtn", 2, 100.0, seqlen=256))
    append_run(tmp_path, rec("b", "rtn", 3, 10.0, seqlen=2048))
    with pytest.raises(ValueError, match="different protocols"):
        ppl_table(load_runs(tmp_path), "c")


def test_ablation_table_rows_ratio_and_duplicates(tmp_path):
    from ttvq_analysis.tables import ablation_table, reference_ppl

    def ab(run_id, bits, init, upd, ppl):
        r = rec(run_id, "ttvq", bits, ppl)
        r["config"] = {"method": {"init": init, "index_update": upd}}
        r["timing"] = {"quantize_s": 10.0 * bits}
        return r

    append_run(tmp_path, rec("f", "fp16", 16, 5.0))
    append_run(tmp_path, ab("a", 2, "vptq", "latent", 10.0))
    append_run(tmp_path, ab("b", 2, "vptq", "frozen", 20.0))
    append_run(tmp_path, ab("c", 3, "vptq", "latent", 6.0))
    df = load_runs(tmp_path)
    ref = reference_ppl(df, "c", "fp16")
    t = ablation_table(df[df["method"] == "ttvq"], "c", ["method.init", "method.index_update"], ref)
    assert t.loc[("vptq", "latent"), ("2", "x_ref")] == pytest.approx(2.0)
    assert t.loc[("vptq", "frozen"), ("2", "ppl")] == 20.0 and t.loc[("vptq", "latent"), ("3", "quantize_s")] == 30.0
    assert pd.isna(t.loc[("vptq", "frozen"), ("3", "ppl")])
    append_run(tmp_path, ab("d", 2, "vptq", "latent", 11.0))  # a second run in one cell
    with pytest.raises(ValueError, match="share a cell"):
        ablation_table(load_runs(tmp_path).query("method == 'ttvq'"), "c", ["method.init", "method.index_update"])


def test_cli_ablation_with_filters(tmp_path, capsys):
    from ttvq_analysis.tables import main

    for run_id, bits, upd, ppl, sweep in [("a", 2, "latent", 10.0, "s1"), ("b", 2, "frozen", 20.0, "s1"),
                                          ("c", 2, "latent", 30.0, "s2")]:
        r = rec(run_id, "ttvq", bits, ppl)
        r.update(config={"method": {"index_update": upd}}, sweep=sweep)
        append_run(tmp_path, r)
    append_run(tmp_path, rec("f", "fp16", 16, 5.0) | {"sweep": "s0"})  # the reference: another sweep
    main(["--results", str(tmp_path), "--corpus", "c", "--method", "ttvq", "--ref", "fp16",
          "--rows", "method.index_update", "--where", "sweep=s1"])
    out = capsys.readouterr().out
    assert "reference fp16 = 5.0000" in out and "| latent" in out and "| frozen" in out and "30" not in out
    with pytest.raises(SystemExit, match="no such field"):
        main(["--results", str(tmp_path), "--corpus", "c", "--where", "nope=1"])
