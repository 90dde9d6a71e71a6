"""The embedded default model (`model=tiny`) and its corpus, with a much smaller config."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from ttvq_bench.data import default_corpus as dc
from ttvq_bench.hashing import hash_tensors
from ttvq_bench.models import tiny
from ttvq_bench.models.tiny import TinyModelConfig, cache_key, load_tiny
from ttvq_bench.record.cache import Cache

SMALL = TinyModelConfig(
    hidden_size=32,
    intermediate_size=88,  # not a multiple of 32, like the default
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    seq_len=64,
    steps=30,
    batch_size=4,
    lr=3e-3,
    warmup=5,
)


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _logits(lm) -> torch.Tensor:
    ids = lm.tokenizer.encode("The for statement is used to iterate over the elements of a sequence.")
    x = torch.tensor([[lm.tokenizer.bos_id] + ids])
    with torch.no_grad():
        return lm.model(input_ids=x).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("tiny_cache"))
    det_before = torch.are_deterministic_algorithms_enabled()
    rng_before = torch.get_rng_state()
    lm = load_tiny(SMALL, cache, progress=False)
    # training must leave global torch state alone
    assert torch.are_deterministic_algorithms_enabled() == det_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    return cache, lm


def test_loaded_model_shape_and_info(trained):
    cache, lm = trained
    cfg = lm.model.config
    assert lm.name == "tiny"
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32
    assert cfg.hidden_size == 32 and cfg.intermediate_size == 88 and cfg.num_hidden_layers == 2
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()  # tied
    assert cfg.vocab_size == len(lm.tokenizer.hf) == lm.tokenizer.vocab_size
    tok = lm.tokenizer
    assert tok.hf.convert_ids_to_tokens([tok.bos_id, tok.eos_id, tok.hf.pad_token_id]) == ["<s>", "</s>", "<pad>"]
    text = "def f(x):\n    return x ** 2  # squares\n"
    assert tok.decode(tok.encode(text)) == text  # byte-level: lossless
    assert lm.info["format"] == "tiny"
    assert lm.info["n_params"] == sum(p.numel() for p in lm.model.parameters())
    entry = cache.path(tiny.CACHE_KIND, cache_key(SMALL))
    assert lm.info["cache_entry"] == str(entry)
    assert (entry / "model.safetensors").is_file() and (entry / "train_log.json").is_file()


def test_second_load_hits_cache(trained, monkeypatch):
    cache, lm = trained
    entry = cache.path(tiny.CACHE_KIND, cache_key(SMALL))
    mtime = (entry / "model.safetensors").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("cache miss: the model was rebuilt")

    monkeypatch.setattr(tiny, "_build_entry", no_build)
    monkeypatch.setattr(tiny, "train_tiny", no_build)
    again = load_tiny(SMALL, cache, progress=False)
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.fingerprint == lm.fingerprint
    assert torch.equal(_logits(again), _logits(lm))


def test_training_reduces_loss(trained):
    _, lm = trained
    log = lm.info["train_log"]
    assert log == {k: v for k, v in json.loads((trained[0].path(tiny.CACHE_KIND, cache_key(SMALL)) / "train_log.json").read_text()).items() if k != "curve"}
    uniform = math.log(lm.tokenizer.vocab_size)
    assert log["final_train_loss"] < uniform - 0.3
    assert math.isfinite(log["eval_loss"]) and log["eval_loss"] < uniform
    assert log["config"] == asdict(SMALL)
    assert log["eval_windows"] > 0


def test_same_seed_bit_identical_in_another_cache(trained, tmp_path):
    _, lm = trained
    other = load_tiny(SMALL, Cache(tmp_path), progress=False)
    assert other.fingerprint == lm.fingerprint
    a, b = _weights(lm), _weights(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_different_weights(trained, tmp_path):
    _, lm = trained
    cfg = replace(SMALL, seed=1)
    assert cache_key(cfg) != cache_key(SMALL)
    other = load_tiny(cfg, Cache(tmp_path), progress=False)
    assert other.fingerprint != lm.fingerprint
    assert hash_tensors(sorted(_weights(other).items())) != hash_tensors(sorted(_weights(lm).items()))
    # same corpus, so the same tokenizer
    assert other.tokenizer.fingerprint() == lm.tokenizer.fingerprint()


def test_default_corpus_splits():
    train, ev = dc.default_corpus_text("train"), dc.default_corpus_text("eval")
    assert train and ev
    k_train, k_eval = dc.default_corpus_keys("train"), dc.default_corpus_keys("eval")
    assert k_train and k_eval and not set(k_train) & set(k_eval)
    assert k_train == sorted(k_train) and k_eval == sorted(k_eval)
    assert 0.03 < len(ev) / (len(ev) + len(train)) < 0.25
    assert dc.CORPUS_INFO["train"]["n_docs"] == len(k_train)
    assert dc.CORPUS_INFO["eval"]["chars"] == len(ev)
    # deterministic: rebuilt from scratch gives the same text
    dc.default_corpus_text.cache_clear()
    dc._documents.cache_clear()
    assert dc.default_corpus_text("train") == train and dc.default_corpus_text("eval") == ev
    with pytest.raises(ValueError):
        dc.default_corpus_text("test")


def test_default_recipe_loads_the_embedded_weights(tmp_path, monkeypatch):
    # the shipped weights are the default recipe's (a recipe change without `python -m
    # ttvq_bench.models.tiny embed` fails here), loaded without training; any other config,
    # or embedded=false, trains
    assert tiny.embedded_matches(TinyModelConfig())
    assert not tiny.embedded_matches(replace(TinyModelConfig(), steps=449))
    assert not tiny.embedded_matches(SMALL)

    class Trained(Exception):
        pass

    def no_build(*a, **k):
        raise Trained

    monkeypatch.setattr(tiny, "_build_entry", no_build)
    lm = load_tiny(TinyModelConfig(), Cache(tmp_path / "cache"), progress=False)
    log = json.loads((tiny.EMBEDDED / "train_log.json").read_text())
    assert lm.info["source"] == "embedded" and lm.info["n_params"] == log["n_params"] == 1740480
    assert lm.info["train_log"]["config"] == asdict(TinyModelConfig())  # the config that built them
    with pytest.raises(Trained):
        load_tiny(replace(TinyModelConfig(), embedded=False), Cache(tmp_path / "cache"), progress=False)
    assert cache_key(replace(TinyModelConfig(), embedded=False)) == cache_key(TinyModelConfig())


@pytest.mark.regression
def test_embedded_weights_are_what_the_recipe_trains():
    # retrains the default recipe (~3 min on one thread): bit-identical on the CPU the weights
    # were built on; elsewhere float reductions may differ, so the bar is the eval perplexity
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    model, _, log = tiny.train_tiny(TinyModelConfig(), progress=False)
    shipped = load_file(str(tiny.EMBEDDED / "model.safetensors"))
    ref = json.loads((tiny.EMBEDDED / "train_log.json").read_text())
    mine = model.state_dict()
    identical = all(torch.equal(mine[k].half(), v) for k, v in shipped.items())  # shipped in fp16
    assert log["eval_ppl"] == pytest.approx(ref["eval_ppl"], rel=0.01), (log["eval_ppl"], ref["eval_ppl"], identical)
