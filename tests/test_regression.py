"""The regression grid (ttvq_bench/regress.py) against its golden values, and the orderings the
project's claims rest on. The grid is behind the `regression` marker (.ci/run runs it on its
own: pytest -m regression); the checker itself is tested here on every run."""
import json

import pytest

from ttvq_bench import regress


@pytest.mark.regression
def test_grid_matches_golden_and_claims(tmp_path, one_thread):
    results = regress.run_grid(regress.available(list(regress.MODELS)), tmp_path)
    failures = regress.compare(results, json.loads(regress.GOLDEN.read_text())) + regress.orderings(results)
    assert not failures, "\n".join(failures)


def _grid(**over):
    base = {"fp16/w16": 5.0, "rtn/w2": 500.0, "rtn/w3": 13.0, "gptq/w2": 400.0, "gptq/w3": 8.0, "kmeans/w2": 40.0,
            "kmeans/w3": 7.9, "vptq/w2": 30.0, "vptq/w3": 7.5, "ttvq-init/w2": 50.0, "ttvq-init/w3": 9.0,
            "ttvq/w2": 10.0, "ttvq/w3": 6.5}
    base.update(over)
    return {f"m/{k}": {"ppl": v, "kl": v / 100, "top1": 0.5, "bpw": 2.0} for k, v in base.items()}


def test_checker_catches_a_small_regression():
    golden = _grid()
    assert regress.compare(golden, golden) == [] and regress.orderings(golden) == []
    worse = _grid(**{"gptq/w3": 8.0 * 1.03})  # 3% worse: outside the 2% band
    assert any("gptq/w3: ppl" in f for f in regress.compare(worse, golden))
    assert regress.compare(_grid(**{"gptq/w3": 8.0 * 1.01}), golden) == []  # 1%: inside
    bpw = _grid()
    bpw["m/vptq/w2"] = {**bpw["m/vptq/w2"], "bpw": 2.0001}
    assert any("bpw" in f for f in regress.compare(bpw, golden))
    assert any("no golden" in f for f in regress.compare({"m/new/w2": golden["m/vptq/w2"]}, golden))


def test_checker_catches_a_broken_claim():
    assert any("does not beat its own init" in f for f in regress.orderings(_grid(**{"ttvq/w2": 60.0})))
    assert any("does not beat gptq at 2 bits" in f for f in regress.orderings(_grid(**{"vptq/w2": 450.0})))
    assert any("3 bits" in f for f in regress.orderings(_grid(**{"rtn/w3": 600.0})))
    assert any("beats fp16" in f for f in regress.orderings(_grid(**{"ttvq/w3": 4.9})))
