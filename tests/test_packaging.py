"""A non-editable install works outside the checkout: the wheel carries the Hydra config tree,
the task yamls and the launcher plugin, and both entry points run."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_wheel_runs_outside_the_checkout(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q"]
    # Built from a copy: setuptools leaves build/ in the source tree, and a stale build/lib would
    # put modules deleted since into the wheel.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                            "results", "outputs", "multirun", "wandb"))
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "w").glob("ttvq_bench-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # ahead of the editable install
    where = subprocess.run([sys.executable, "-c", "import ttvq_bench, ttvq_conf; print(ttvq_bench.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert str(tmp_path / "site") in where.stdout, where.stderr
    cfg = subprocess.run([sys.executable, "-m", "ttvq_bench", "--cfg", "job", "method=vptq", "experiment=stories260k_ref"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0 and "sampler: stream" in cfg.stdout, cfg.stderr[-2000:]
    script = subprocess.run([str(tmp_path / "site" / "bin" / "ttvq-bench"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "== Configuration groups ==" in script.stdout, script.stderr[-2000:]
    assert "vptq" in script.stdout and "stories260k_ref" in script.stdout  # the packaged groups
    # the embedded default model travels in the wheel and is what the default recipe loads
    emb = subprocess.run([sys.executable, "-c", "from ttvq_bench.models import tiny; "
                          "print(tiny.EMBEDDED, tiny.embedded_matches(tiny.TinyModelConfig()))"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert emb.stdout.split() == [str(tmp_path / "site" / "ttvq_bench" / "models" / "tiny_default"), "True"], emb.stderr


def test_triton_only_where_kernels_need_it():
    # a CPU install must not pull triton (690 MB it never runs); the kernels and dev extras ask for it
    from importlib.metadata import requires

    reqs = requires("ttvq-bench")
    triton = [r for r in reqs if r.startswith("triton")]
    assert triton and all("extra ==" in r for r in triton), triton
    assert {r.split('extra == "')[1].rstrip('"') for r in triton} == {"kernels", "dev"}
