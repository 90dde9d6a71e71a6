"""Export: a quantized checkpoint as a plain transformers directory gives the same logits as the
harness's in-memory quantized model; load_quantized restores the quantized layers."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", [("method=gptq", "bits=3"), ("method=vptq", "bits=2", "method.kmeans_iters=5")])
def test_export_reproduces_the_quantized_logits(tiny_cfg, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from ttvq_bench.export import export, load_quantized
    from ttvq_bench.run import run_job
    from ttvq_methods.checkpoint import quantized_layers

    cfg = tiny_cfg(*method)
    rec = run_job(cfg, tmp_path / "run")
    lm = load_quantized(rec["quantize"]["checkpoint"], cache_dir=cfg.cache_dir)
    assert len(quantized_layers(lm.model)) == 14
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    out = export(rec["quantize"]["checkpoint"], tmp_path / "hf", cache_dir=cfg.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_export_cli_one_line_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ttvq_bench", "export", f"checkpoint={tmp_path / 'nope.safetensors'}",
                        f"out={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and [l for l in p.stderr.splitlines() if l.startswith("error:")] == [
        f"error: checkpoint {tmp_path / 'nope.safetensors'}: file not found"]
