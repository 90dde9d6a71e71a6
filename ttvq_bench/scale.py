"""Scale benchmark: what quantizing a real-sized model costs, measured on a few of its blocks.

    python -m ttvq_bench.scale [--models llama2-7b,llama3-8b,llama2-70b] [--methods rtn,gptq,vptq,ttvq]
        [--blocks 2,4] [--calib 32x512] [--bits 2] [--device auto] [--threads 1]
        [--set METHOD.KEY=VALUE ...] [--out FILE]
    python -m ttvq_bench.scale kmeans [--n 1000000] [--k 4096] [--d 6] [--iters 10] [--device auto]

A random-initialised Llama with the real layer shapes (and vocabulary) of the named model but
only `blocks` decoder blocks is quantized by each method through the harness's own block loop
(methods/blockwise.py), on random calibration tokens; each (model, blocks, method) runs in a
process of its own, so its peak memory is its own. Printed and written (--out, JSON):
  * seconds per block per stage (targets, hessian, quantize, finetune, forward; mean over the
    blocks), the input capture, the end-to-end stage (finalize), and the whole run;
  * peak host memory (max RSS) and peak device memory (torch.cuda.max_memory_allocated), and
    the model's own bytes: with 2 and 4 blocks the device peak must not grow with depth;
  * the extrapolation to the full model: blocks x the full depth, plus the end-to-end stage
    scaled by depth (it runs over every block).
Calibration is sized to the machine (32 x 512 on a CPU, 128 x 2048 on a GPU by default):
Hessian and block-stage costs grow linearly with the calibration tokens, k-means does not.

`kmeans` compares methods/vq/kmeans.py with faiss and scikit-learn (where installed) on one
set of vectors: wall time and the k-means objective (mean squared distance to the nearest
centroid), same K, d, iterations and init.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# name -> (hidden, intermediate, heads, kv heads, vocab, full depth)
MODELS = {
    "llama2-7b": (4096, 11008, 32, 32, 32000, 32),
    "llama3-8b": (4096, 14336, 32, 8, 128256, 32),
    "llama2-70b": (8192, 28672, 64, 8, 32000, 80),
    "tiny": (192, 520, 4, 2, 512, 4),  # the embedded default's shapes: a seconds-long check of this script
}
# Reduced settings a CPU can finish (recorded with the row; on a GPU the defaults run).
CPU_SETTINGS = {"vptq": {"kmeans_iters": 5}, "ttvq": {"block_epochs": 1, "peft_epochs": 1, "init_args": {"vptq": {"kmeans_iters": 5}}},
                # 2x8 g8 (the paper's other 2-bit shape): 1x16 g8's k-means and beam search over 65,536
                # codewords would take hours per layer on one thread; 2 Adam steps and 1 beam-search round
                "aqlm": {"num_codebooks": 2, "kmeans_iters": 5, "steps_per_epoch": 2, "max_epochs": 1, "ft_epochs": 1},
                "jlcm": {"kmeans_iters": 10, "epochs": 1}}
STAGES = ("targets_s", "hessian_s", "quantize_s", "finetune_s", "forward_s")


def build_model(name: str, blocks: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, vocab, _ = MODELS[name]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=blocks, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def run_one(model_name: str, blocks: int, method_name: str, bits: int, n: int, seqlen: int, device: str,
            overrides: dict) -> dict:
    """One (model, blocks, method) in this process: the row of the table."""
    from ttvq_bench.device import resolve_device, resolve_dtype
    from ttvq_methods.base import make_config
    from ttvq_methods.bits import count_bits
    from ttvq_methods.blockwise import quantize_blockwise
    from ttvq_methods.registry import METHODS

    dev = resolve_device(device)
    dtype = getattr(torch, resolve_dtype("auto", dev))
    model = build_model(model_name, blocks, dtype)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    calib = torch.randint(0, MODELS[model_name][4], (n, seqlen), generator=torch.Generator().manual_seed(0))
    cls = METHODS.get(method_name)
    method = cls(make_config(cls.Config, overrides, method_name), bits)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    stats = quantize_blockwise(model, calib, method, batch_size=8 if dev.type == "cuda" else 4, progress=False,
                               device=None if dev.type == "cpu" else dev)
    total = time.perf_counter() - t0
    per_block = {s: sum(b.get(s, 0.0) for b in stats["blocks"].values()) / blocks for s in STAGES}
    block_s = sum(per_block.values())
    other = total - block_s * blocks  # input capture, prepare and the end-to-end stage
    depth = MODELS[model_name][5]
    return {"model": model_name, "blocks": blocks, "method": method_name, "bits": bits, "calib": f"{n}x{seqlen}",
            "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "settings": overrides, "per_block_s": {k: round(v, 3) for k, v in per_block.items()},
            "block_s": round(block_s, 3), "other_s": round(other, 3), "total_s": round(total, 3),
            "full_model_h": round((block_s * depth + other * depth / blocks) / 3600, 3), "full_depth": depth,
            "model_gb": round(model_bytes / 2**30, 3),
            "peak_host_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_device_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None,
            "bpw": round(count_bits(model)["bpw"], 4), "shape": method.report().get("shape")}


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    head = ["model", "blocks", "method", "bpw", "calib", "device", *[s.removesuffix("_s") for s in STAGES], "block s",
            "capture+e2e s", "full model h", "model GB", "peak host GB", "peak dev GB"]
    body = [[r["model"], r["blocks"], r["method"], r["bpw"], r["calib"], r["device"], *[r["per_block_s"][s] for s in STAGES],
             r["block_s"], r["other_s"], r["full_model_h"], r["model_gb"], r["peak_host_gb"], r["peak_device_gb"]]
            if "error" not in r else [r["model"], r["blocks"], r["method"], "", r.get("calib"), "", "error: " + r["error"]]
            for r in rows]
    return tabulate(body, headers=head, tablefmt="github")


def sweep(args) -> int:
    rows, out = [], Path(args.out) if args.out else None
    gpu = args.device != "cpu" and torch.cuda.is_available()
    n, seqlen = map(int, (args.calib or ("128x2048" if gpu else "32x512")).split("x"))
    for model_name in args.models.split(","):
        for blocks in map(int, args.blocks.split(",")):
            for method_name in args.methods.split(","):
                settings = {} if gpu else CPU_SETTINGS.get(method_name, {})
                settings = {**settings, **{k.split(".", 1)[1]: _value(v) for k, v in (s.split("=", 1) for s in args.set)
                                           if k.split(".", 1)[0] == method_name}}
                cmd = [sys.executable, "-m", "ttvq_bench.scale", "one", json.dumps(
                    {"model_name": model_name, "blocks": blocks, "method_name": method_name, "bits": args.bits, "n": n,
                     "seqlen": seqlen, "device": args.device, "overrides": settings})]
                print(f"# {model_name} x{blocks} blocks, {method_name} (calib {n}x{seqlen}) ...", flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
                if p.returncode == 0 and last.startswith("{"):
                    rows.append(json.loads(last))
                else:
                    err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
                    rows.append({"model": model_name, "blocks": blocks, "method": method_name, "calib": f"{n}x{seqlen}",
                                 "error": err if p.returncode >= 0 else f"killed by signal {-p.returncode} (out of memory?)"})
                if out:
                    out.write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


def kmeans_compare(args) -> int:
    """Ours against faiss and scikit-learn on the same vectors (Gaussian mixture), same init."""
    from tabulate import tabulate

    from ttvq_bench.device import resolve_device
    from ttvq_methods.vq.kmeans import kmeans, nearest

    dev = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.k * 2, args.d, generator=g)
    x = centers[torch.randint(0, len(centers), (args.n,), generator=g)] + 0.3 * torch.randn(args.n, args.d, generator=g)
    rows = []

    def objective(C: torch.Tensor) -> float:
        _, dist = nearest(x.to(dev), C.to(dev).float(), return_dist=True)
        return float(dist.mean())

    t0 = time.perf_counter()
    res = kmeans(x.to(dev), args.k, init="random", iters=args.iters, tol=0.0, seed=0)
    rows.append(["ttvq (methods/vq/kmeans.py)", str(dev), round(time.perf_counter() - t0, 2), objective(res.centroids)])
    try:
        import faiss

        t0 = time.perf_counter()
        km = faiss.Kmeans(args.d, args.k, niter=args.iters, seed=0, gpu=dev.type == "cuda", max_points_per_centroid=10**9)
        km.train(x.numpy())
        rows.append(["faiss.Kmeans", "cuda" if dev.type == "cuda" else "cpu", round(time.perf_counter() - t0, 2),
                     objective(torch.from_numpy(km.centroids))])
    except ImportError:
        rows.append(["faiss.Kmeans", "-", "not installed", None])
    try:
        from sklearn.cluster import KMeans

        t0 = time.perf_counter()
        km = KMeans(args.k, init="random", n_init=1, max_iter=args.iters, tol=0.0, random_state=0, algorithm="lloyd").fit(x.numpy())
        rows.append(["sklearn.cluster.KMeans", "cpu", round(time.perf_counter() - t0, 2),
                     objective(torch.from_numpy(km.cluster_centers_).float())])
    except ImportError:
        rows.append(["sklearn.cluster.KMeans", "-", "not installed", None])
    print(f"# N={args.n} vectors, d={args.d}, K={args.k}, {args.iters} Lloyd iterations, random init, "
          f"{torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["k-means", "device", "seconds", "objective (mean sq. dist.)"], tablefmt="github"))
    return 0


def _value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING)
    if argv[:1] == ["one"]:  # a child process: one row, as the last line of stdout
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(run_one(**json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv[:1] == ["kmeans"]:
        for k, v in (("--n", 1_000_000), ("--k", 4096), ("--d", 6), ("--iters", 10)):
            ap.add_argument(k, type=int, default=v)
        ap.add_argument("--device", default="auto")
        args = ap.parse_args(argv[1:])
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        return kmeans_compare(args)
    ap.add_argument("--models", default="llama2-7b")
    ap.add_argument("--methods", default="rtn,gptq,vptq,ttvq")
    ap.add_argument("--blocks", default="2")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--calib", default=None, help="NxSEQLEN (default 32x512 on a CPU, 128x2048 on a GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE, e.g. vptq.kmeans_iters=100")
    ap.add_argument("--out", default=None)
    return sweep(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
