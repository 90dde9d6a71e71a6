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
