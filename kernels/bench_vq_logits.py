"""VQ-Logits against the dense output head: the time of the logit computation, side by side.

    python -m ttvq_kernels.bench_vq_logits [--shapes 512x64,32000x4096,128256x4096] [--K 64,1024]
                                           [--tokens 1,256] [--threads 1] [--dtype float32] [--out FILE]
    python -m ttvq_kernels.bench_vq_logits clusters RESULTS_DIR [config overrides]

For each head shape (V x d, random weights), codebook size K and token count, on the same random
activations: the dense head `F.linear(x, W)` and the VQ-Logits head (`VQLogitsLinear` through
the kernel selector, i.e. `x @ C.T` over K codewords, then a gather to V), without and with the
per-token scale and bias, each alone and followed by `log_softmax` over V (what a perplexity or
a sampler pays after the logits). Median ms over repetitions (ttvq_kernels.timing.median_ms:
perf_counter on a CPU, no cache flush; triton's do_bench on a GPU), the speed-up over dense,
and the head's parameters and stored bits against the dense head's at the activation dtype.
Prints a markdown table and writes JSON (device, threads, versions, every time).

`clusters`: E[log |cluster(y)|] over the evaluation targets for every ok head=vq_logits record
of RESULTS_DIR/runs.jsonl (its stored map), on the perplexity windows the overrides compose
(e.g. experiment=stories260k_ref paths.data_root=...), one JSON line per record.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys

import torch
import torch.nn.functional as F

from ttvq_bench.dtypes import TORCH_DTYPES
from ttvq_kernels import device as devices
from ttvq_kernels.selector import kernel_name
from ttvq_kernels.timing import median_ms
from ttvq_methods.heads.vq_logits import VQLogitsLinear, cluster_stats, code_bits
from ttvq_methods.packing import unpack


def _shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in spec.split(",") if s]


def _ints(spec: str) -> list[int]:
    return [int(v) for v in spec.split(",") if v]


@torch.no_grad()
def bench_shape(V: int, d: int, Ks: list[int], tokens: list[int], dtype: torch.dtype, dev: torch.device,
                repeats: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(V, d, generator=g) / d ** 0.5).to(dev, dtype)
    rows = []
    for n in tokens:
        x = torch.randn(n, d, generator=g).to(dev, dtype)
        dense_ms, how = median_ms(lambda: F.linear(x, W), dev, repeats=repeats)
        dense_sm_ms, _ = median_ms(lambda: F.log_softmax(F.linear(x, W), -1), dev, repeats=repeats)
        for K in Ks:
            if K > V:
                continue
            for per_token in (False, True):
                C = torch.randn(K, d, generator=g) / d ** 0.5
                m = torch.randint(0, K, (V,), generator=g)
                s, b = (torch.rand(V, generator=g) + 0.5, torch.randn(V, generator=g)) if per_token else (None, None)
                layer = VQLogitsLinear.from_parts(C, m, s, b, dtype="float16").to(dev).eval()
                layer(x)  # builds the cached forward parts (unpacked map, codebook in x's dtype)
                ms, _ = median_ms(lambda: layer(x), dev, repeats=repeats)
                sm_ms, _ = median_ms(lambda: F.log_softmax(layer(x), -1), dev, repeats=repeats)
                head_params = K * d + (2 * V if per_token else 0)
                rows.append({
                    "V": V, "d": d, "K": K, "per_token": per_token, "tokens": n, "kernel": kernel_name(layer, x),
                    "dense_ms": round(dense_ms, 4), "vq_ms": round(ms, 4), "speedup": round(dense_ms / ms, 2),
                    "dense_log_softmax_ms": round(dense_sm_ms, 4), "vq_log_softmax_ms": round(sm_ms, 4),
                    "speedup_with_log_softmax": round(dense_sm_ms / sm_ms, 2),
                    "head_params": head_params, "dense_params": V * d, "param_reduction": round(1 - head_params / (V * d), 5),
                    "head_bits": layer.stored_bits(), "dense_bits": V * d * torch.finfo(dtype).bits,
                    "timer": how["timer"], "repeats": how.get("repeats"),
                })
                del layer
        gc.collect()
    del W
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    head = ("| V x d | K | per-token | tokens | dense ms | VQ ms | speed-up | + log_softmax: dense / VQ ms | speed-up "
            "| head params (reduction) | head bits / dense bits |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['V']} x {r['d']} | {r['K']} | {'yes' if r['per_token'] else 'no'} | {r['tokens']} "
                     f"| {r['dense_ms']:.4g} | {r['vq_ms']:.4g} | {r['speedup']:.3g}x "
                     f"| {r['dense_log_softmax_ms']:.4g} / {r['vq_log_softmax_ms']:.4g} | {r['speedup_with_log_softmax']:.3g}x "
                     f"| {r['head_params']} ({100 * r['param_reduction']:.1f}%) | {r['head_bits'] / r['dense_bits']:.4f} |")
    return "\n".join(lines)


def eval_clusters(results_dir: str, overrides: list[str]) -> list[dict]:
    """For every ok head=vq_logits record in results_dir/runs.jsonl: the cluster statistics of
    its stored map over the targets of the perplexity windows of the config `overrides` compose
    (the protocol the records were evaluated on, e.g. experiment=stories260k_ref)."""
    from hydra import compose, initialize_config_module
    from safetensors import safe_open

    from ttvq_bench.config import register_configs
    from ttvq_bench.data.corpora import load_text
    from ttvq_bench.data.windows import ppl_windows
    from ttvq_bench.models import load_model
    from ttvq_bench.record.cache import Cache
    from ttvq_bench.record.results import read_runs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="ttvq_conf"):
        cfg = compose("config", overrides=overrides)
    lm = load_model(cfg.model, Cache(cfg.cache_dir), False)
    p = cfg.eval.ppl
    text, _ = load_text(cfg.data, "eval")
    head = [lm.tokenizer.bos_id] if p.bos_text else []
    win = ppl_windows(head + lm.tokenizer.encode(text), p.seqlen, p.stride, lm.tokenizer.bos_id if p.bos else None,
                      p.max_windows)
    T = win.input_ids.shape[1]
    scored = torch.arange(T - 1)[None] >= win.score_from[:, None]
    targets = win.input_ids[:, 1:][scored]
    out = []
    for r in read_runs(results_dir):
        if r.get("status") != "ok" or r.get("head") != "vq_logits" or not r["quantize"].get("checkpoint"):
            continue
        hc = r["config"]["head"]
        with safe_open(r["quantize"]["checkpoint"], framework="pt") as f:
            codes = f.get_tensor("lm_head.token_codes")
        tm = unpack(codes, code_bits(hc["K"]), r["quantize"]["head_report"]["V"])
        out.append({"run_id": r["run_id"], "method": r["method"], "K": hc["K"], "per_token": hc["per_token"],
                    **cluster_stats(tm, targets, hc["K"])})
    return out


def main(argv: list[str] | None = None) -> dict | list:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["clusters"]:
        rows = eval_clusters(argv[1], argv[2:])
        for row in rows:
            print(json.dumps(row))
        return rows
    ap = argparse.ArgumentParser(prog="python -m ttvq_kernels.bench_vq_logits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="512x64,32000x4096,128256x4096", help="V x d, comma-separated")
    ap.add_argument("--K", default="64,1024", help="codebook sizes, comma-separated")
    ap.add_argument("--tokens", default="1,256", help="token counts per call (1: decode)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default=None, choices=sorted(TORCH_DTYPES), help="default: float32 on CPU, float16 on GPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    dtype = TORCH_DTYPES[a.dtype or ("float16" if dev.type == "cuda" else "float32")]
    rows = []
    for V, d in _shapes(a.shapes):
        rows += bench_shape(V, d, _ints(a.K), _ints(a.tokens), dtype, dev, a.repeats)
        print(f"{V} x {d} done", file=sys.stderr, flush=True)
    res = {"device": devices.name(dev), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "python": sys.version.split()[0],
           "rows": rows}
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
