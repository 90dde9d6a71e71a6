"""Extending the harness without editing it: a method and a head registered from a module
outside the package (TTVQ_PLUGINS) with their yamls on Hydra's search path run end to end on
the tiny model; the kernel selector dispatches to a registered kernel."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from conftest import ROOT, TINY

PLUGIN = '''
from dataclasses import dataclass

import torch

from ttvq_methods.base import Method, TeacherRequest
from ttvq_methods.heads import HEADS, Head
from ttvq_methods.registry import METHODS
from ttvq_methods.scalar import ScalarQuantLinear, rtn_quantize


@dataclass
class ToySignConfig:
    name: str = "toysign"
    group_size: int = 16


@METHODS.register("toysign")
class ToySign(Method):
    """1-bit RTN per group, plus a record of every hook the loop called."""
    Config = ToySignConfig
    supported_bits = (1,)

    def __init__(self, cfg, bits):
        super().__init__(cfg, bits)
        self.calls = {"prepare": 0, "blocks": [], "finalize": 0}

    @property
    def needs_block_targets(self):
        return True

    def teacher_request(self):
        return TeacherRequest(trajectory=True)

    def prepare(self, model, inputs, teacher):
        self.calls["prepare"] += 1
        self.calls["windows"] = int(inputs.hidden.shape[0])

    def quantize_layer(self, name, layer, H):
        codes, scales, zeros = rtn_quantize(layer.weight.data, 1, self.cfg.group_size, False)
        return ScalarQuantLinear.from_codes(codes, scales, zeros, 1, self.cfg.group_size, False, bias=layer.bias)

    def finetune_block(self, ctx):
        self.calls["blocks"].append({"index": ctx.index, "name": ctx.name, "targets": tuple(ctx.targets.shape),
                                     "fp_weights": sorted(ctx.fp_weights),
                                     "teacher_hidden_is_input": bool(ctx.index > 0 or torch.equal(ctx.teacher.hidden(0), ctx.inputs.hidden))})

    def finalize(self, model, calib_ids, teacher):
        self.calls["finalize"] += 1

    def report(self):
        return self.calls


@dataclass
class ToyHeadConfig:
    name: str = "toyhead"


@HEADS.register("toyhead")
class ToyHead(Head):
    Config = ToyHeadConfig
    needs_calibration = True

    def apply(self, model, calib_ids):
        return {"calib_windows": int(calib_ids.shape[0])}
'''


def test_plugin_method_and_head_run_end_to_end(tmp_path, tiny_cache):
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    for group, name in (("method", "toysign"), ("head", "toyhead")):
        (tmp_path / "conf" / group).mkdir(parents=True)
        (tmp_path / "conf" / group / f"{name}.yaml").write_text(textwrap.dedent(f"""\
            defaults:
              - {name}_schema
              - _self_
            """))
    env = {**os.environ, "TTVQ_PLUGINS": "toy_plugin", "PYTHONPATH": str(tmp_path)}
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "ttvq_bench", *TINY, "method=toysign", "head=toyhead", "bits=1",
           f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"cache_dir={tiny_cache}", f"results_dir={results}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((results / "runs.jsonl").read_text().splitlines()[-1])
    assert rec["status"] == "ok" and rec["method"] == "toysign" and rec["head"] == "toyhead"
    assert 1.0 < rec["bpw"] < 4.0  # 1-bit codes plus per-group fp16 scales and zeros
    rep = rec["quantize"]["method_report"]
    assert rep["prepare"] == 1 and rep["finalize"] == 1 and rep["windows"] == 8
    assert [b["index"] for b in rep["blocks"]] == [0, 1] and rep["blocks"][1]["name"] == "model.layers.1"
    assert rep["blocks"][0]["targets"][0] == 8 and "mlp.down_proj" in rep["blocks"][0]["fp_weights"]
    assert all(b["teacher_hidden_is_input"] for b in rep["blocks"])
    assert rec["quantize"]["head_report"] == {"calib_windows": 8}


def test_kernel_selector_dispatches_by_priority_and_support():
    from ttvq_kernels.selector import KERNELS, Kernel, TorchDequant, select
    from ttvq_methods.scalar import ScalarQuantLinear, rtn_quantize

    calls = []

    class Spy(Kernel):
        priority = 5

        @staticmethod
        def supports(layer, x):
            return x.shape[0] == 1  # "decode": one token

        @staticmethod
        def run(layer, x):
            calls.append(tuple(x.shape))
            return TorchDequant.run(layer, x)

    W = torch.randn(6, 8)
    q = ScalarQuantLinear.from_codes(*rtn_quantize(W, 4, -1, False), 4, -1, False)
    KERNELS.register("spy", Spy)
    try:
        assert select(q, torch.randn(1, 8)) is Spy and select(q, torch.randn(3, 8)) is TorchDequant
        y1, y3 = q(torch.ones(1, 8)), q(torch.ones(3, 8))
        assert calls == [(1, 8)] and torch.equal(y1[0], y3[0])
    finally:
        KERNELS.unregister("spy")
    assert select(q, torch.randn(1, 8)) is TorchDequant
