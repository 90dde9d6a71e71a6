import os
from pathlib import Path

import pytest
import torch

# Kernels run in Triton's interpreter on CPU; it must be set before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TTVQ_DATA", ROOT.parent / "shared" / "data"))

# A tiny "tiny" model: trains in a few seconds, enough for end-to-end runs.
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=88", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.seq_len=64",
    "model.tiny.steps=30", "model.tiny.batch_size=4", "model.tiny.vocab_size=300",
    "calib.n=8", "calib.seqlen=64", "eval.ppl.seqlen=64", "eval.ppl.max_windows=8",
    "logger=none", "logger.progress=false",
]


@pytest.fixture
def shared_data() -> Path:
    if not (DATA / "stories260K" / "stories260K.bin").is_file():
        pytest.skip(f"shared data not found at {DATA} (set TTVQ_DATA)")
    return DATA


@pytest.fixture(scope="module")
def shared_data_module() -> Path:
    if not (DATA / "stories260K" / "stories260K.bin").is_file():
        pytest.skip(f"shared data not found at {DATA} (set TTVQ_DATA)")
    return DATA


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache dir per session so the tiny model trains once for all tests."""
    return tmp_path_factory.mktemp("cache")


def cache_with_tiny_model(tiny_cache: Path, dest: Path) -> Path:
    """A cache directory of its own holding the session's tiny model (trained once, copied)."""
    import shutil
    import subprocess
    import sys

    from ttvq_bench.models.tiny import CACHE_KIND

    src = Path(tiny_cache) / CACHE_KIND
    if not src.exists():
        assert subprocess.run([sys.executable, "-m", "ttvq_bench", *TINY, "method=fp16", f"cache_dir={tiny_cache}",
                               f"results_dir={dest.parent / 'warm'}", f"hydra.run.dir={dest.parent / 'warm'}"],
                              cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    shutil.copytree(src, dest / CACHE_KIND)
    return dest


@pytest.fixture
def compose():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from ttvq_bench.config import register_configs

    register_configs()

    def _compose(overrides=()):
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return hcompose("config", overrides=list(overrides))

    return _compose


@pytest.fixture
def tiny_cfg(compose, tiny_cache, tmp_path):
    def make(*overrides):
        return compose(TINY + [f"cache_dir={tiny_cache}", f"results_dir={tmp_path / 'results'}", *overrides])

    return make


def quantize_recording(cfg, method):
    """Quantize cfg's model with `method` through the block loop, keeping each layer's stored
    state as `quantize_layer` returned it (before any training). Returns (lm, calib, init)."""
    from ttvq_bench.data.calib import calibration_ids
    from ttvq_bench.models import load_model
    from ttvq_bench.record.cache import Cache
    from ttvq_methods.blockwise import quantize_blockwise

    cache = Cache(cfg.cache_dir)
    lm = load_model(cfg.model, cache, False)
    calib, _ = calibration_ids(cfg.calib, lm.tokenizer, cache)
    init = {}
    real = method.quantize_layer

    def recording(name, layer, H):
        q = real(name, layer, H)
        init[name] = {k: v.clone() for k, v in q.state_dict().items()}
        return q

    method.quantize_layer = recording
    quantize_blockwise(lm.model, calib, method, batch_size=4, progress=False)
    return lm, calib, init
