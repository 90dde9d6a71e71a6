"""load_hf on tiny random Llama / Mistral / Qwen2 models saved to a temporary directory."""
from __future__ import annotations

import pytest
import torch

from ttvq_bench.errors import DataError
from ttvq_bench.models.hf import load_hf

TEXT = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her dog.",
    "The quick brown fox jumps over the lazy dog 123 times.",
] * 20

# Tiny models: with several threads on a busy machine thread sync dominates
# (greedy decoding took 5 s on 2 threads vs 0.7 s on 1).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained in-process, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _tiny(kind: str, seed: int):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    cfg = cfg_cls(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_load_matches_original(tmp_path, tokenizer, kind):
    orig = _tiny(kind, seed=0)
    d = _save(orig, tokenizer, tmp_path / f"tiny-{kind}")
    lm = load_hf(d)
    assert lm.name == f"tiny-{kind}"
    assert lm.info["format"] == "hf" and lm.info["model_type"] == kind
    assert lm.info["n_params"] == sum(t.numel() for t in orig.parameters())
    assert not lm.model.training and lm.model.dtype == torch.float32
    assert len(lm.model.model.layers) == 2

    ids = lm.tokenizer.encode(TEXT[0])
    assert ids == tokenizer(TEXT[0], add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.decode(ids) == TEXT[0]
    assert lm.tokenizer.bos_id == tokenizer.bos_token_id
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(lm.model(x).logits, orig(x).logits, atol=1e-6, rtol=0)

    # fingerprint: stable across loads, changes with the weights
    assert load_hf(d).fingerprint == lm.fingerprint
    other = _save(_tiny(kind, seed=1), tokenizer, tmp_path / f"other-{kind}")
    assert load_hf(other).fingerprint != lm.fingerprint


def test_repo_id_from_local_cache(tmp_path, tokenizer, monkeypatch):
    """A hub repo id resolves through the local cache only (the hub cache layout:
    models--owner--name/refs/main -> snapshots/<commit>/files)."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    orig = _tiny("llama", 0)
    _save(orig, tokenizer, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    lm = load_hf("someone/tiny-llama")
    assert lm.name == "tiny-llama" and lm.info["repo_id"] == "someone/tiny-llama"
    x = torch.tensor([lm.tokenizer.encode(TEXT[1])])
    with torch.no_grad():
        assert torch.allclose(lm.model(x).logits, orig(x).logits, atol=1e-6, rtol=0)


def test_dtype(tmp_path, tokenizer):
    d = _save(_tiny("llama", 0), tokenizer, tmp_path / "m")
    assert load_hf(d, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_missing_and_unsupported(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_hf(tmp_path / "no-such-dir")
    with pytest.raises(DataError, match="not found"):
        load_hf("nobody-here/surely-not-in-the-local-cache")  # offline: no network look-up
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json"):
        load_hf(tmp_path / "empty")

    # config but no weights
    d = _save(_tiny("llama", 0), tokenizer, tmp_path / "noweights")
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DataError):
        load_hf(d)

    # GPT-2 keeps its blocks in transformer.h, not model.layers: the harness cannot walk it
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    d = _save(gpt2, tokenizer, tmp_path / "gpt2")
    with pytest.raises(DataError, match="model.model.layers"):
        load_hf(d)
