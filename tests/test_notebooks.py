"""The notebooks in analysis/notebooks run headless (papermill) on the records of a small real
sweep and write the tables the records say; in git they carry no outputs."""
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from ttvq_bench.run import run_job

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis" / "notebooks"
ZS = ("eval.zeroshot.tasks=[default_continuation]", "eval.zeroshot.limit=16", "eval.zeroshot.batch_size=16")
TTVQ = ("method=ttvq", "bits=2", "method.block_epochs=1", "method.peft_epochs=1")


def real_sweep(tiny_cfg, root: Path) -> list[dict]:
    """fp16, RTN and GPTQ at 2 and 3 bits with zero-shot, and TTVQ's index_update ablation at 2
    bits: real jobs on the tiny test model, in-process (one small sweep's records)."""
    points = [("method=fp16", *ZS)] + [(f"method={m}", f"bits={b}", *ZS) for m in ("rtn", "gptq") for b in (2, 3)] \
        + [(*TTVQ, f"method.index_update={u}") for u in ("latent", "frozen")]
    return [run_job(tiny_cfg(*point, "sweep=nb", "threads=1"), root / f"job{i}") for i, point in enumerate(points)]


def _run(name: str, workdir: Path, **params) -> tuple[dict, float]:
    """Execute a notebook headless in `workdir` with these parameters; (the executed notebook, seconds)."""
    import papermill

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    nb = papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(workdir / f"{name}.out.ipynb"),
                                    parameters=params, progress_bar=False, cwd=str(workdir), kernel_name="python3")
    return nb, time.time() - t0


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), path.name
        assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1, path.name
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["ablations.ipynb", "paper_tables.ipynb"]


def test_notebooks_on_a_real_sweep(tiny_cfg, tmp_path):
    for needed in ("papermill", "ipykernel"):  # the dev extra; without it, skipped before the sweep runs
        pytest.importorskip(needed, reason="the notebooks run headless with the dev extra (papermill, ipykernel)")
    records = real_sweep(tiny_cfg, tmp_path)
    results = tmp_path / "results"  # where tiny_cfg puts them
    check_paper_tables(records, results, tmp_path / "paper")
    check_ablations(records, results, tmp_path / "abl")


def check_paper_tables(records: list[dict], results: Path, out: Path) -> None:
    nb, seconds = _run("paper_tables", out, results=str(results), corpus="default", out=str(out))
    t = pd.read_csv(out / "main_table.csv").fillna({"setting": ""})
    by_key = {(r["method"], r["bits"]): r for r in records if r["method"] != "ttvq"}
    table = t[t["method"] != "ttvq"]
    assert table[["method", "bits"]].values.tolist()[0] == ["fp16", 16] and len(table) == len(by_key) == 5
    for _, row in table.iterrows():
        r = by_key[(row["method"], row["bits"])]
        assert row["ppl default"] == pytest.approx(r["ppl"]["default"], rel=1e-12)
        assert row["bpw"] == pytest.approx(r["bpw"], rel=1e-12) and row["over_budget"] == r["over_budget"]
        zs = r["zeroshot"]["tasks"]["default_continuation"]
        assert zs["metric"] == "acc_mutual_info" and row["default_continuation acc_mutual_info"] == pytest.approx(zs["acc_mutual_info"])
        assert row["zs avg"] == pytest.approx(r["zeroshot"]["average"])
    assert sorted(t.loc[t["method"] == "ttvq", "setting"]) == ["block_epochs=1,peft_epochs=1",
                                                               "index_update=frozen,block_epochs=1,peft_epochs=1"]
    assert r"\toprule" in (out / "main_table.tex").read_text()
    assert (out / "ppl_vs_bpw_tiny_default.png").stat().st_size > 1000
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs) and any("text/markdown" in o.get("data", {}) for o in outputs)
    print(f"paper_tables.ipynb: {seconds:.1f}s")


def check_ablations(records: list[dict], results: Path, out: Path) -> None:
    nb, seconds = _run("ablations", out, results=str(results), corpus="default", method="ttvq",
                       rows="method.index_update", ref="fp16", out=str(out))
    t = pd.read_csv(out / "ablation_table.csv").set_index("method.index_update")
    fp16 = next(r for r in records if r["method"] == "fp16")["ppl"]["default"]
    for r in (r for r in records if r["method"] == "ttvq"):
        row = t.loc[r["config"]["method"]["index_update"]]
        assert row["w2 ppl"] == pytest.approx(r["ppl"]["default"], rel=1e-12)
        assert row["w2 x_ref"] == pytest.approx(r["ppl"]["default"] / fp16, rel=1e-12)
        assert row["w2 bpw"] == pytest.approx(r["bpw"], rel=1e-12)
    assert sorted(t.index) == ["frozen", "latent"]
    print(f"ablations.ipynb: {seconds:.1f}s")
