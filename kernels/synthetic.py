"""Random stored quantized layers of any shape and layout, built directly (no quantizer): what
the kernel tests and the speed benchmark run on. Speed does not depend on the values, and the
tests compare every kernel with the layer's own dequantize(), so any values do.

`LAYOUTS` names the layouts the benchmark measures at 2-4 bits (bpw before norms/outliers).
"""
from __future__ import annotations

import torch

from ttvq_methods.scalar import ScalarQuantLinear, n_groups_for
from ttvq_methods.vq.layer import VQLinear


def random_vq(out_f: int, in_f: int, d: int, sizes: list[int], orientation: str = "out", *, n_out: int = 0,
              outlier_d: int = 0, outlier_k: int = 0, norm: str = "none", norm_bias: bool = False,
              has_bias: bool = False, lora_rank: int = 0, seed: int = 0,
              codebook: torch.Tensor | None = None) -> VQLinear:
    """A stored VQLinear with random codebooks, codes, outlier lines, norms, bias and LoRA.
    `codebook`: an fp16 (K, d) tensor to share as codebook0 (a model-wide shared codebook)."""
    g = torch.Generator().manual_seed(seed)
    L = VQLinear(in_f, out_f, d, sizes, orientation, n_out, outlier_d if outlier_k else 0, outlier_k, norm,
                 norm_bias, has_bias, lora_rank)
    for m, K in enumerate(sizes):
        getattr(L, f"codebook{m}").copy_(torch.randn(K, d, generator=g).half() * 0.5**m)
    codes = [torch.randint(0, K, (L.n_reg, L.nv), generator=g) for K in sizes]
    lines = torch.randperm(L.n_lines, generator=g)[:n_out].sort().values if n_out else None
    ocodes = ovals = None
    if n_out and outlier_k:
        L.outlier_codebook.copy_(torch.randn(outlier_k, outlier_d, generator=g).half() * 3)
        ocodes = torch.randint(0, outlier_k, (n_out, L.nvo), generator=g)
    elif n_out:
        ovals = torch.randn(n_out, L.line_len, generator=g) * 3
    L.set_codes(codes, lines, ocodes, ovals)
    if norm != "none":
        n = L.n_lines if norm == "line" else 1
        L.set_norm(torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1 if norm_bias else None)
    if has_bias:
        L.bias.copy_(torch.randn(out_f, generator=g).half())
    if lora_rank:
        L.lora_A.copy_(torch.randn(lora_rank, in_f, generator=g).half() * 0.1)
        L.lora_B.copy_(torch.randn(out_f, lora_rank, generator=g).half() * 0.1)
    if codebook is not None:
        L.share("codebook0", codebook, "model")
    return L.eval()


def random_scalar(out_f: int, in_f: int, bits: int, group_size: int = 128, *, sym: bool = False,
                  act_order: bool = False, has_bias: bool = False, seed: int = 0) -> ScalarQuantLinear:
    """A stored ScalarQuantLinear with random codes, fp16-exact scales and zeros; `act_order`
    stores a permuted column -> group map (g_idx)."""
    g = torch.Generator().manual_seed(seed)
    G = n_groups_for(in_f, group_size)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scales = (torch.rand(out_f, G, generator=g) * 0.1 + 0.01).half().float()
    zeros = torch.randint(0, 2**bits, (out_f, G), generator=g).float()
    g_idx = ScalarQuantLinear._default_g_idx(in_f, group_size, G)[torch.randperm(in_f, generator=g)] if act_order else None
    bias = torch.randn(out_f, generator=g) if has_bias else None
    return ScalarQuantLinear.from_codes(codes, scales, zeros, bits, group_size, sym, g_idx, bias).eval()


# name -> (description, builder(out, in, seed, shared codebooks by (K, d)))
LAYOUTS = {
    "vptq2": ("VQ out, d=4, K=256 shared, line norm (2 bpw)",
              lambda o, i, s, books: random_vq(o, i, 4, [256], "out", norm="line", seed=s, codebook=books.setdefault(
                  (256, 4), torch.randn(256, 4, generator=torch.Generator().manual_seed(1)).half()))),
    "vptq3": ("VQ out, d=4, K=4096, line norm (3 bpw, 16-bit codes in memory)",
              lambda o, i, s, books: random_vq(o, i, 4, [4096], "out", norm="line", seed=s)),
    "aqlm2": ("VQ in, d=8, M=2 x K=256, line norm (2 bpw)",
              lambda o, i, s, books: random_vq(o, i, 8, [256, 256], "in", norm="line", seed=s)),
    "aqlm3": ("VQ in, d=8, M=3 x K=256, line norm (3 bpw)",
              lambda o, i, s, books: random_vq(o, i, 8, [256, 256, 256], "in", norm="line", seed=s)),
    "rtn2": ("scalar 2-bit, groups of 128", lambda o, i, s, books: random_scalar(o, i, 2, 128, seed=s)),
    "rtn3": ("scalar 3-bit, groups of 128", lambda o, i, s, books: random_scalar(o, i, 3, 128, seed=s)),
    "rtn4": ("scalar 4-bit, groups of 128", lambda o, i, s, books: random_scalar(o, i, 4, 128, seed=s)),
}
