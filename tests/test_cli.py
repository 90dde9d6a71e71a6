"""The command line: bad input gives one clear line and a non-zero exit; sweeps run and skip."""
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from ttvq_bench.record.results import read_runs


def cli(args, tmp_path, tiny_cache, extra_env=None):
    flags = [a for a in args if a.startswith("-")]  # Hydra wants flags before the overrides
    args = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "ttvq_bench", *flags, *TINY, f"cache_dir={tiny_cache}", f"results_dir={tmp_path / 'results'}",
           f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def error_lines(p):
    return [l for l in p.stderr.splitlines() if l.startswith("error:")]


BAD = [
    (["method=nope"], "method/nope"),
    (["method.grop_size=3"], "grop_size"),
    (["bits=abc"], "bits"),
    (["method=rtn", "bits=16"], "bits=16"),
    (["model=llama2c", "model.path=/nonexistent/x.bin", "model.tokenizer=/nonexistent/t.model"], "not found"),
    (["data=file", "data.path=/nonexistent.txt"], "not found"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_input_one_line(args, needle, tmp_path, tiny_cache):
    p = cli(args, tmp_path, tiny_cache)
    assert p.returncode != 0
    lines = error_lines(p)
    assert len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert all(r["status"] != "ok" for r in read_runs(tmp_path / "results"))


def test_corpus_shorter_than_window(tmp_path, tiny_cache):
    f = tmp_path / "short.txt"
    f.write_text("one tiny document\n\nand another one\n")
    p = cli(["method=rtn", "bits=4", "data=file", f"data.path={f}", "calib=default"], tmp_path, tiny_cache)
    assert p.returncode != 0
    lines = error_lines(p)
    assert len(lines) == 1 and "shorter than one window" in lines[0], p.stderr[-2000:]
    assert all(r["status"] != "ok" for r in read_runs(tmp_path / "results"))


def test_sweep_runs_then_skips(tmp_path, tiny_cache):
    p = cli(["-m", "method=rtn,gptq", "bits=2,4"], tmp_path, tiny_cache)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = read_runs(tmp_path / "results")
    assert sorted((r["method"], r["bits"], r["status"]) for r in runs) == [
        ("gptq", 2, "ok"), ("gptq", 4, "ok"), ("rtn", 2, "ok"), ("rtn", 4, "ok")]
    assert len({r["sweep"] for r in runs}) == 1 and runs[0]["sweep"]
    assert summary_rows(p) == [["gptq", "2", "ok"], ["rtn", "2", "ok"], ["gptq", "4", "ok"], ["rtn", "4", "ok"]]
    p = cli(["-m", "method=rtn,gptq", "bits=2,4", "sweep=again"], tmp_path, tiny_cache)
    assert p.returncode == 0
    assert len(read_runs(tmp_path / "results")) == 4  # all four skipped
    assert [s for *_, s in summary_rows(p, "again")] == ["skipped"] * 4


def summary_rows(p, sweep: str = "sweep") -> list[list[str]]:
    """Method, bits, status of the sweep summary table printed at the end of a sweep."""
    lines = p.stdout.split(f"\nsweep {sweep} (records in ", 1)[1].splitlines()[3:]
    return [[c.strip() for c in line.split("|")[1:4]] for line in lines if line.startswith("|")]


def test_sweep_with_a_bad_point_exits_nonzero(tmp_path, tiny_cache):
    p = cli(["-m", "method=rtn", "bits=4,16"], tmp_path, tiny_cache)
    assert p.returncode != 0
    assert any("bits=16" in l for l in error_lines(p))
    assert [(r["bits"], r["status"]) for r in read_runs(tmp_path / "results")] == [(4, "ok")]


def test_local_parallel_launcher(tmp_path, tiny_cache):
    p = cli(["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "method=rtn", "bits=3,4"], tmp_path, tiny_cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted((r["bits"], r["status"]) for r in read_runs(tmp_path / "results")) == [(3, "ok"), (4, "ok")]


def test_local_launcher_gives_each_job_its_own_gpu(tmp_path, tiny_cache):
    """One job per GPU at a time, each seeing only its own; no GPU is needed to check the
    assignment (on a CPU box the jobs run on the CPU with CUDA_VISIBLE_DEVICES set)."""
    p = cli(["-m", "hydra/launcher=local", "hydra.launcher.gpus=[3,5]", "hydra.launcher.n_jobs=4", "method=rtn",
             "bits=2,3,4"], tmp_path, tiny_cache)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = read_runs(tmp_path / "results")
    assert [r["status"] for r in runs] == ["ok"] * 3
    assert {r["device"]["visible_gpus"] for r in runs} == {"3", "5"}  # n_jobs capped at 2: both taken at once
    assert "2 at a time" in p.stdout + p.stderr
