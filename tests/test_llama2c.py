"""llama2.c loader against the real stories260K checkpoint.

The reference forward below is written from llama2.c's run.c (RMSNorm, rotary on interleaved
pairs, GQA attention, SwiGLU) over arrays this file reads itself with numpy, so a wrong
offset, a missing q/k permutation or a wrong norm eps in the loader shows up as a logit gap.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ttvq_bench.errors import DataError
from ttvq_bench.models.llama2c import load_llama2c

from conftest import DATA

CKPT = DATA / "stories260K" / "stories260K.bin"
TOK = DATA / "stories260K" / "tok512.model"
STORIES = DATA / "tinystories" / "tinystories_val.txt"

pytestmark = [
    pytest.mark.skipif(not (CKPT.is_file() and TOK.is_file() and STORIES.is_file()), reason=f"shared data not found under {DATA}"),
    # Tiny model: with several threads on a busy machine thread sync dominates (greedy
    # decoding took 5 s on 2 threads vs 0.7 s on 1).
    pytest.mark.usefixtures("one_thread"),
]

FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
LAYER_ARRAYS = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")


def read_legacy(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Independent reader of the legacy layout (README of the shared data)."""
    raw = path.read_bytes()
    p = dict(zip(FIELDS, struct.unpack("<7i", raw[:28])))
    p["shared"] = p["vocab_size"] > 0
    p["vocab_size"] = abs(p["vocab_size"])
    d, h, L, V, S = p["dim"], p["hidden_dim"], p["n_layers"], p["vocab_size"], p["seq_len"]
    hs = d // p["n_heads"]
    kv = hs * p["n_kv_heads"]
    shapes = {
        "emb": (V, d), "rms_att": (L, d), "wq": (L, d, d), "wk": (L, kv, d), "wv": (L, kv, d), "wo": (L, d, d),
        "rms_ffn": (L, d), "w1": (L, h, d), "w2": (L, d, h), "w3": (L, h, d), "rms_final": (d,),
        "freq_cos": (S, hs // 2), "freq_sin": (S, hs // 2),
    }
    if not p["shared"]:
        shapes["classifier"] = (V, d)
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    out, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    assert pos == flat.size, "reader and file disagree on the layout"
    return p, out


def reference_logits(p: dict, w: dict[str, np.ndarray], tokens: list[int]) -> torch.Tensor:
    """Forward pass as llama2.c's run.c computes it, for all positions at once, in float64."""
    t = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in w.items()}
    d, nh, nkv = p["dim"], p["n_heads"], p["n_kv_heads"]
    hs, T = d // nh, len(tokens)
    kv_dim = hs * nkv

    def rmsnorm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    # run.c: for i in 0..dim step 2: freq = 1 / 10000^((i % head_size) / head_size), and the
    # pair (v[i], v[i+1]) is rotated by pos * freq (q over dim, k over kv_dim).
    i = torch.arange(0, d, 2, dtype=torch.float64)
    freq = 1.0 / 10000.0 ** ((i % hs) / hs)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, dim/2)
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rotate(v, n):  # v: (T, n) with n = dim or kv_dim
        v0, v1 = v[:, 0::2], v[:, 1::2]
        c, s = cos[:, : n // 2], sin[:, : n // 2]
        out = torch.empty_like(v)
        out[:, 0::2] = v0 * c - v1 * s
        out[:, 1::2] = v0 * s + v1 * c
        return out

    x = t["emb"][tokens]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for l in range(p["n_layers"]):
        xb = rmsnorm(x, t["rms_att"][l])
        q = rotate(xb @ t["wq"][l].T, d).view(T, nh, hs)
        k = rotate(xb @ t["wk"][l].T, kv_dim).view(T, nkv, hs)
        v = (xb @ t["wv"][l].T).view(T, nkv, hs)
        heads = []
        for hd in range(nh):
            kh = hd // (nh // nkv)  # GQA: consecutive query heads share a kv head
            att = (q[:, hd] @ k[:, kh].T) / hs**0.5
            heads.append(torch.softmax(att.masked_fill(mask, float("-inf")), -1) @ v[:, kh])
        x = x + torch.cat(heads, -1) @ t["wo"][l].T
        xb = rmsnorm(x, t["rms_ffn"][l])
        g = xb @ t["w1"][l].T
        x = x + ((g * torch.sigmoid(g)) * (xb @ t["w3"][l].T)) @ t["w2"][l].T
    x = rmsnorm(x, t["rms_final"])
    return x @ (t["emb"] if p["shared"] else t["classifier"]).T


@pytest.fixture(scope="module")
def loaded():
    return load_llama2c(CKPT, TOK)


@pytest.fixture(scope="module")
def tokens(loaded):
    text = STORIES.read_text(encoding="utf-8")[:2000]
    return [loaded.tokenizer.bos_id] + loaded.tokenizer.encode(text)[:63]


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double()


def test_header_and_metadata(loaded):
    p, w = read_legacy(CKPT)
    assert (p["dim"], p["hidden_dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], p["vocab_size"]) == (
        64, 172, 5, 8, 4, 512)
    assert p["shared"]
    # The stored freq_cis table holds llama2.c's rotary angles: checks this reader's offsets
    # and the frequencies the reference uses.
    hs = p["dim"] // p["n_heads"]
    ang = np.arange(p["seq_len"])[:, None] / 10000.0 ** (np.arange(0, hs, 2) / hs)[None, :]
    assert np.allclose(w["freq_cos"], np.cos(ang), atol=1e-4) and np.allclose(w["freq_sin"], np.sin(ang), atol=1e-4)

    m = loaded.model
    assert loaded.name == "stories260K"
    assert loaded.info["format"] == "llama2c" and loaded.info["n_params"] == 260_032
    assert not m.training and m.dtype == torch.float32
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    assert len(m.model.layers) == 5
    assert loaded.fingerprint == load_llama2c(CKPT, TOK).fingerprint


def test_parity_with_reference_forward(loaded, tokens):
    p, w = read_legacy(CKPT)
    ref = reference_logits(p, w, tokens)
    got = hf_logits(loaded.model, tokens)
    diff = (ref - got).abs().max().item()
    print(f"stories260K parity: max abs logit diff {diff:.3g} over {len(tokens)} tokens")
    assert diff < 1e-4
    # and with eager attention too (the loader picks sdpa)
    loaded.model.config._attn_implementation = "eager"
    try:
        assert (ref - hf_logits(loaded.model, tokens)).abs().max().item() < 1e-4
    finally:
        loaded.model.config._attn_implementation = "sdpa"


def test_greedy_generation(loaded):
    bos = loaded.tokenizer.bos_id
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([[bos]]), max_new_tokens=200, do_sample=False)
    text = loaded.tokenizer.decode(out[0, 1:].tolist())
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"
    ), text[:200]


def test_tokenizer(loaded):
    tok = loaded.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    stories = STORIES.read_text(encoding="utf-8").split("\n\n")
    story = stories[0].strip()
    ids = tok.encode(story)
    assert ids and tok.bos_id not in ids and tok.decode(ids) == story

    # The transformers tokenizer built from the .model must give sentencepiece's ids.
    hf = tok.hf
    assert hf is not None, "sentencepiece -> transformers conversion failed its check"
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (1, 2, 512)
    wiki = DATA / "wikitext2" / "wiki.test.raw"
    sample = stories[:1500] + (wiki.read_text(encoding="utf-8").split("\n")[:1500] if wiki.is_file() else [])
    sample += ["", "  two  spaces ", "\ttab\nnewline", "<s> literal </s>", "caf\u00e9 \u65e5\u672c \U0001f600 42"]
    want = tok.sp.encode(sample)
    got = hf(sample, add_special_tokens=False)["input_ids"]
    mismatched = [s for s, a, b in zip(sample, want, got) if a != b]
    assert not mismatched, mismatched[:3]
    assert hf("Once upon")["input_ids"][0] == 1  # BOS when special tokens are asked for
    assert hf.decode(tok.encode(story)) == story


def _write_legacy(path: Path, p: dict, w: dict[str, np.ndarray], shared: bool, classifier=None):
    hdr = [p[k] for k in FIELDS]
    hdr[5] = p["vocab_size"] if shared else -p["vocab_size"]
    names = ["emb", *LAYER_ARRAYS, "rms_final", "freq_cos", "freq_sin"]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *hdr))
        for n in names:
            f.write(np.ascontiguousarray(w[n], dtype="<f4").tobytes())
        if not shared:
            f.write(np.ascontiguousarray(classifier, dtype="<f4").tobytes())


def test_unshared_classifier_and_version1(tmp_path, loaded, tokens):
    p, w = read_legacy(CKPT)
    rng = np.random.default_rng(0)
    cls = (w["emb"] + 0.05 * rng.standard_normal(w["emb"].shape)).astype(np.float32)

    # legacy with a separate classifier (negative vocab_size)
    unshared = tmp_path / "unshared.bin"
    _write_legacy(unshared, p, w, shared=False, classifier=cls)
    m = load_llama2c(unshared, TOK)
    assert m.model.lm_head.weight.data_ptr() != m.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.model.lm_head.weight, torch.from_numpy(cls))
    ref = reference_logits({**p, "shared": False}, {**w, "classifier": cls}, tokens)
    assert (ref - hf_logits(m.model, tokens)).abs().max().item() < 1e-4
    assert m.fingerprint != loaded.fingerprint

    # version 1 export of the same weights (export.py version1_export layout)
    v1 = tmp_path / "v1.bin"
    with open(v1, "wb") as f:
        hdr = struct.pack("<Ii7iB", 0x616B3432, 1, *[p[k] for k in FIELDS], 1)
        f.write(hdr + b"\0" * (256 - len(hdr)))
        for n in ["rms_att", "rms_ffn", "rms_final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]:
            f.write(np.ascontiguousarray(w[n], dtype="<f4").tobytes())
    m1 = load_llama2c(v1, TOK)
    assert m1.info["llama2c_version"] == 1
    assert torch.equal(hf_logits(m1.model, tokens), hf_logits(loaded.model, tokens))

    # version 2 (Q8_0) is refused
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, *[p[k] for k in FIELDS], 1).ljust(256, b"\0") + b"\0" * 64)
    with pytest.raises(DataError, match="version 2"):
        load_llama2c(v2, TOK)


def test_bf16(tokens):
    m = load_llama2c(CKPT, TOK, dtype=torch.bfloat16)
    assert m.model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m.model(torch.tensor([tokens])).logits).all()


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_llama2c(tmp_path / "nope.bin", TOK)
    with pytest.raises(DataError, match="not found"):
        load_llama2c(CKPT, tmp_path / "nope.model")

    raw = CKPT.read_bytes()
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_llama2c(trunc, TOK)
    trunc.write_bytes(raw[:10])
    with pytest.raises(DataError, match="truncated"):
        load_llama2c(trunc, TOK)
    longer = tmp_path / "longer.bin"
    longer.write_bytes(raw + b"\0" * 8)
    with pytest.raises(DataError, match="longer"):
        load_llama2c(longer, TOK)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all, just some text" * 10)
    with pytest.raises(DataError):
        load_llama2c(junk, TOK)
