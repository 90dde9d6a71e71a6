"""Load a llama2.c checkpoint (Karpathy's `.bin`) into a transformers `LlamaForCausalLM`.

Two fp32 layouts from llama2.c's export.py are read:
- legacy (v0): 7 int32 header fields (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len; a negative vocab_size means the classifier is not shared), then
  token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis
  (cos, sin: seq_len x head_dim/2 each, unused here), and the classifier if not shared;
- version 1: a 256-byte header (magic "ak42", version, the same 7 fields with a positive
  vocab_size, a shared-classifier byte), then the norms first (rms_att, rms_ffn, rms_final),
  token_embedding, wq, wk, wv, wo, w1, w2, w3, and the classifier if not shared.
The quantized version 2 (Q8_0) is refused with a DataError.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ttvq_bench.errors import DataError
from ttvq_bench.hashing import hash_bytes, hash_file
from ttvq_bench.models.base import LoadedModel
from ttvq_bench.models.tokenizers import SentencePieceTokenizer

_MAGIC = 0x616B3432  # "ak42", first uint32 of a version >= 1 export
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def _read_header(path: Path) -> tuple[dict, bool, int, int]:
    """Returns (params, shared_classifier, offset of the first weight, format version)."""
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise DataError(f"llama2.c checkpoint {path} is truncated: {len(head)} bytes, no full header")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == _MAGIC:
        if len(head) < 256:
            raise DataError(f"llama2.c checkpoint {path} is truncated: {len(head)}-byte header, expected 256")
        version, *vals = struct.unpack("<8i", head[4:36])
        if version != 1:
            raise DataError(f"llama2.c checkpoint {path} has export version {version}; only fp32 versions 0 and 1 are supported")
        shared = bool(head[36])
        return dict(zip(_FIELDS, vals)), shared, 256, 1
    vals = struct.unpack("<7i", head[:28])
    params = dict(zip(_FIELDS, vals))
    shared = params["vocab_size"] > 0
    params["vocab_size"] = abs(params["vocab_size"])
    return params, shared, 28, 0


def _check_params(p: dict, path: Path) -> None:
    # A file that is not a llama2.c checkpoint gives nonsense here; say so instead of failing
    # later with a reshape error.
    ok = all(p[k] > 0 for k in _FIELDS) and p["dim"] % p["n_heads"] == 0 and p["n_heads"] % p["n_kv_heads"] == 0
    if not ok or (p["dim"] // p["n_heads"]) % 2:
        raise DataError(f"{path} is not a llama2.c checkpoint (header {p})")


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c rotates interleaved pairs (x[2i], x[2i+1]) of each head; HF Llama rotates the
    two halves (x[i], x[i + head_dim/2]). Reordering each head's output rows from interleaved
    to halves makes HF's rotation compute the same thing (the HF convert script's permute)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def load_llama2c(path, tokenizer_path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not path.is_file():
        raise DataError(f"llama2.c checkpoint not found: {path} (model.path; the default is under paths.data_root: set paths.data_root=DIR or TTVQ_DATA)")
    tokenizer = SentencePieceTokenizer(tokenizer_path)  # DataError if missing

    p, shared, offset, version = _read_header(path)
    _check_params(p, path)
    dim, hidden, L, nh, nkv, vocab, seq_len = (p[k] for k in _FIELDS)
    head_dim = dim // nh
    kv_dim = head_dim * nkv

    # (name, shape) in file order; freq_cis is kept in the list so the offsets line up.
    per_layer = {
        "rms_att": (L, dim), "wq": (L, dim, dim), "wk": (L, kv_dim, dim), "wv": (L, kv_dim, dim),
        "wo": (L, dim, dim), "rms_ffn": (L, dim), "w1": (L, hidden, dim), "w2": (L, dim, hidden),
        "w3": (L, hidden, dim),
    }
    if version == 0:
        order = [("emb", (vocab, dim))] + [(k, per_layer[k]) for k in per_layer] + [
            ("rms_final", (dim,)), ("freq_cos", (seq_len, head_dim // 2)), ("freq_sin", (seq_len, head_dim // 2))]
    else:
        order = [("rms_att", per_layer["rms_att"]), ("rms_ffn", per_layer["rms_ffn"]), ("rms_final", (dim,)),
                 ("emb", (vocab, dim))] + [(k, per_layer[k]) for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    if not shared:
        order.append(("classifier", (vocab, dim)))

    n_floats = sum(int(np.prod(s)) for _, s in order)
    expected, actual = offset + 4 * n_floats, path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header implies"
        raise DataError(f"llama2.c checkpoint {path} is {what}: {actual} bytes, expected {expected} for header {p}")

    flat = np.fromfile(path, dtype="<f4", count=n_floats, offset=offset)
    arrays, pos = {}, 0
    for name, shape in order:
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(flat[pos : pos + n].reshape(shape).copy())
        pos += n

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=L,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=head_dim,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,  # llama2.c's run.c and model.py
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shared,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    # sdpa and eager agree to ~1e-6 with the reference forward in fp32 (tests/test_llama2c.py);
    # sdpa is the faster of the two.
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)

    with torch.no_grad():
        m = model.model
        m.embed_tokens.weight.copy_(arrays["emb"])
        m.norm.weight.copy_(arrays["rms_final"])
        for i, layer in enumerate(m.layers):
            att, mlp = layer.self_attn, layer.mlp
            layer.input_layernorm.weight.copy_(arrays["rms_att"][i])
            layer.post_attention_layernorm.weight.copy_(arrays["rms_ffn"][i])
            att.q_proj.weight.copy_(_permute_rotary(arrays["wq"][i], nh))
            att.k_proj.weight.copy_(_permute_rotary(arrays["wk"][i], nkv))
            att.v_proj.weight.copy_(arrays["wv"][i])
            att.o_proj.weight.copy_(arrays["wo"][i])
            mlp.gate_proj.weight.copy_(arrays["w1"][i])
            mlp.down_proj.weight.copy_(arrays["w2"][i])
            mlp.up_proj.weight.copy_(arrays["w3"][i])
        if shared:
            # transformers ties lm_head to embed_tokens when tie_word_embeddings is set;
            # check rather than trust it, since an untied head would keep random weights.
            if model.lm_head.weight.data_ptr() != m.embed_tokens.weight.data_ptr():
                model.lm_head.weight = m.embed_tokens.weight
        else:
            model.lm_head.weight.copy_(arrays["classifier"])

    model = model.to(dtype).eval()
    n_params = sum(t.numel() for t in model.parameters())  # parameters() counts a tied weight once
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=path.stem,
        fingerprint=hash_bytes(f"{hash_file(path)}|{tokenizer.fingerprint()}".encode()),
        info={"format": "llama2c", "path": str(path), "n_params": n_params, "llama2c_version": version},
    )
