"""Every config group and experiment composes; bad keys/values fail at composition or validation."""
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from ttvq_bench.config import validate
from ttvq_bench.errors import ConfigError

GROUPS = ["model", "data", "calib", "method", "head", "eval", "logger"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(compose, group):
    for f in sorted((ROOT / "conf" / group).glob("*.yaml")):
        extra = []
        if group == "model" and f.stem == "hf":
            extra = ["model.path=/some/dir"]
        if group == "data" and f.stem == "file":
            extra = ["data.path=/some/file.txt"]
        cfg = compose([f"{group}={f.stem}", *extra])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        validate(cfg)


def test_every_experiment_composes(compose):
    exps = sorted((ROOT / "conf" / "experiment").glob("*.yaml"))
    assert exps
    for f in exps:
        cfg = compose([f"experiment={f.stem}", *(["model.path=/some/dir"] if f.stem.startswith("llama") else [])])
        validate(cfg)


def test_launchers_compose(compose):
    for launcher in ("local", "slurm"):
        from hydra import compose as hcompose
        from hydra import initialize_config_dir

        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = hcompose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        target = cfg.hydra.launcher._target_
        assert ("LocalLauncher" in target) if launcher == "local" else ("Slurm" in target)


def test_method_schema_typo_fails(compose):
    with pytest.raises(Exception, match="grop_size"):
        compose(["method=rtn", "method.grop_size=32"])


def test_bad_type_fails(compose):
    with pytest.raises(Exception, match="bits"):
        compose(["bits=abc"])


def test_unknown_method_fails(compose):
    with pytest.raises(Exception, match="method/nope"):
        compose(["method=nope"])


@pytest.mark.parametrize("override,key", [
    ("bits=0", "bits"), ("eval.ppl.seqlen=-1", "eval.ppl.seqlen"), ("model.kind=onnx", "model.kind"),
    ("data.kind=books", "data.kind"),
    ("data.calib_fraction=1.5", "data.calib_fraction"), ("eval.ppl.stride=999", "eval.ppl.stride"),
])
def test_validate_names_the_key(compose, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose([override]))


@pytest.mark.parametrize("override, key", [
    ("logger.wandb.mode=sometimes", "logger.wandb.mode"), ("model.storage_dtype=float8", "model.storage_dtype"),
    ("method=vptq method.norm=column", "method.norm"), ("method=vptq method.codebook_scope=everything", "method.codebook_scope"),
    ("method=ttvq method.index_update=sometimes", "method.index_update"), ("method=ttvq method.peft_params=[codebook,lora]", "method.peft_params"),
    ("method=vptq method.kmeans_init=kmeans++", "method.kmeans_init"),
])
def test_closed_choices_fail_while_composing(compose, override, key):
    """Closed choices are enums: Hydra itself rejects another value, naming the key."""
    with pytest.raises(Exception) as e:
        compose(override.split())
    text = f"{e.value} {e.value.__cause__}"
    assert key.split(".")[-1] in text and "expected one of" in text


def test_bits_a_method_cannot_do(compose):
    from ttvq_methods.registry import METHODS

    cls = METHODS.get("rtn")
    with pytest.raises(ConfigError, match="bits=16"):
        cls(cls.Config(), 16)


def test_registered_methods_and_heads_know_their_names():
    from ttvq_methods.heads import HEADS
    from ttvq_methods.registry import METHODS

    assert all(cls.name == n for reg in (METHODS, HEADS) for n, cls in reg.items())
    assert METHODS.get("kmeans").name == "kmeans" and METHODS.get("vptq").name == "vptq"  # a subclass keeps its own


def test_device_and_compute_dtype(tiny_cfg, tmp_path):
    import torch

    from ttvq_bench.device import resolve_device, resolve_dtype
    from ttvq_bench.run import run_job

    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    for bad, needle in (("gpu", "not auto, cpu"), ("cuda:7", "no such CUDA device")):
        if needle.startswith("no such") and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(ConfigError, match=needle):
            run_job(tiny_cfg("method=rtn", f"device={bad}"), tmp_path / bad.replace(":", "_"))
    with pytest.raises(ConfigError, match="autocast='fp8' is not auto, off or bf16"):
        run_job(tiny_cfg("method=rtn", "autocast=fp8"), tmp_path / "fp8")
    rec = run_job(tiny_cfg("method=rtn", "bits=4", "device=cpu"), tmp_path / "cpu")
    assert rec["device"]["compute"] == "cpu" and rec["device"]["dtype"] == "float32"
    assert rec["config"]["model"]["dtype"] == "float32"  # auto, recorded as what ran
    assert rec["config"]["autocast"] == rec["device"]["autocast"] == "off"  # auto on a CPU
    assert rec["protocol"]["default"]["batch_size"] == 8  # eval.ppl.batch_size null on a CPU


def test_batch_size_from_free_memory(monkeypatch):
    """null: on a GPU half the free memory over a window's inference bytes (capped), on a CPU 8;
    a set value is kept; never more than the items there are."""
    import torch

    from ttvq_bench.device import batch_size_for
    from ttvq_bench.evaluate.protocol import Evaluation  # noqa: F401  (the caller)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert batch_size_for(model, 512, cpu, None) == 8 and batch_size_for(model, 512, cpu, 3) == 3
    assert batch_size_for(model, 512, cpu, None, n_items=5) == 5
    per_window = 3 * 4 * 1000 * 512 + 16 * 4 * 64 * 512 + 2 * 4 * 4 * 512 * 512
    free = {"bytes": 40 * per_window}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * free["bytes"]))
    assert batch_size_for(model, 512, gpu, None) == 20
    free["bytes"] = 4 * per_window
    assert batch_size_for(model, 512, gpu, None) == 2 and batch_size_for(model, 512, gpu, 16) == 16
    free["bytes"] = 10
    assert batch_size_for(model, 512, gpu, None) == 1
    free["bytes"] = 10**15
    assert batch_size_for(model, 512, gpu, None) == 256 and batch_size_for(model, 512, gpu, None, n_items=40) == 40
