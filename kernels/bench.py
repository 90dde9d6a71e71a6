"""Kernel speed benchmark over real LLM layer shapes, every kernel side by side in one process.

    python -m ttvq_kernels.bench [--shapes llama2-7b,llama3-8b,llama2-70b,own] [--shape 4096x4096]
                                 [--layouts vptq2,aqlm2,...] [--batch 1,4,16] [--max-weights N]
                                 [--threads 1] [--out FILE]

For each shape (out x in), layout (`synthetic.LAYOUTS`, random weights built directly) and
batch, it times every kernel that supports the call on this device (the selector's choice is
starred), plus on CPU the torch LUT for orientation "in", against the dense matmul of the same
shape (fp16 on a GPU, fp32 on a CPU) on the same input. Per row: median ms, bytes the kernel
moves (estimated, see `moved_bytes`), effective GB/s, speed-up over dense, and the fraction of
the memory bound reached: (compressed bytes / measured copy bandwidth) / time, 1.0 = at the
bound. Prints a table and writes JSON with the device, versions and how each time was taken.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from ttvq_kernels import device as devices
from ttvq_kernels.layout import scalar_layout, vq_passes
from ttvq_kernels.lut import lut_torch
from ttvq_kernels.selector import KERNELS, select
from ttvq_kernels.synthetic import LAYOUTS
from ttvq_kernels.timing import copy_bandwidth_gbs, median_ms

# model -> {layer name: (out, in)}
SHAPES = {
    "llama2-7b": {"q/k/v/o": (4096, 4096), "qkv fused": (12288, 4096), "gate/up": (11008, 4096),
                  "down": (4096, 11008), "head": (32000, 4096)},
    "llama3-8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
                  "head": (128256, 4096)},
    "llama2-70b": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
    # the embedded default model (model=tiny): width 192, GQA 2 of 4 heads, MLP 520, vocab ~512
    "own": {"q/o": (192, 192), "k/v": (96, 192), "gate/up": (520, 192), "down": (192, 520), "head": (512, 192)},
}
GRAPH_MAX_BYTES = 256 << 20  # GPU: CUDA graphs when the dense fp16 weight is below this (launch-bound)


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures: a small ratio on a loaded box stays positive, never 0.0."""
    return float(f"{x:.{digits}g}")


def shape_list(models: list[str], extra: list[str]) -> dict[tuple[int, int], list[str]]:
    """(out, in) -> names, each shape once."""
    out: dict[tuple[int, int], list[str]] = {}
    for m in models:
        for name, s in SHAPES[m].items():
            out.setdefault(s, []).append(f"{m} {name}")
    for s in extra:
        o, i = (int(v) for v in s.lower().split("x"))
        out.setdefault((o, i), []).append("custom")
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layout_bytes(layer) -> int:
    """Bytes of the kernel-friendly copy the Triton kernels read (layout.py)."""
    if layer.kind == "scalar":
        lay = scalar_layout(layer)
        return _nbytes([lay.codes, lay.zeros, lay.groups, layer.scales, layer.bias_for_forward()])
    return sum(_nbytes([p.codebook, p.codes, p.line_map, p.scale, p.nbias]) for p in vq_passes(layer))


def moved_bytes(kernel: str, layer, T: int, dtype: torch.dtype) -> int:
    """Bytes a call moves through memory, at least once each (an estimate: caches ignored)."""
    e = torch.tensor([], dtype=dtype).element_size()
    io = T * (layer.in_features + layer.out_features) * e
    n = layer.n_weights
    if kernel == "dense":
        return n * e + io
    if kernel == "torch":  # the cached fp32 weight, converted per call when x is not fp32
        return n * 4 + (0 if dtype == torch.float32 else 2 * n * e) + io
    if kernel == "torch_lut":  # int64 codes, the table written and read
        table = T * layer.M * layer.nv * max(layer.codebook_sizes) * 4
        return layer.M * layer.n_reg * layer.nv * 8 + 2 * table + io
    extra = 2 * n * e if kernel == "triton_dequant" else 0  # the scratch weight, written and read
    if kernel == "triton_vq_lut":
        extra = 2 * T * layer.M * layer.nv * max(layer.codebook_sizes) * 4
    return layout_bytes(layer) + extra + io + T * layer.out_features * 4  # + the fp32 accumulator


def candidates(layer, x: torch.Tensor) -> list[tuple[str, object]]:
    """(name, fn) of every kernel that supports the call, and the CPU-only torch LUT."""
    out = [(name, (lambda k=k: k.run(layer, x))) for name, k in KERNELS.items() if k.supports(layer, x)]
    if x.device.type == "cpu" and layer.kind == "vq" and layer.orientation == "in" and not layer.n_outliers:
        out.append(("torch_lut", lambda: lut_torch(layer, x)))
    return out


def run(shapes, layouts, batches, dev, dtype, max_weights, repeats, copy_mb=256,
        log=print) -> tuple[list[dict], list[dict], float]:
    rows, skipped = [], []
    bw = copy_bandwidth_gbs(dev, copy_mb << 20)
    log(f"copy bandwidth {bw:.1f} GB/s on {devices.name(dev)}")
    for (o, i), names in shapes.items():
        if o * i > max_weights:
            skipped.append({"shape": [o, i], "names": names, "why": f"more than --max-weights {max_weights}"})
            continue
        W = torch.randn(o, i, device=dev, dtype=dtype) * 0.02
        books: dict = {}
        for lname in layouts:
            t0 = time.perf_counter()
            layer = LAYOUTS[lname][1](o, i, 0, books).to(dev)
            limit_ms = layer.stored_bits() / 8 / (bw * 1e9) * 1e3
            log(f"{o}x{i} {lname}: built in {time.perf_counter() - t0:.1f}s")
            for T in batches:
                x = torch.randn(T, i, device=dev, dtype=dtype)
                graph = dev.type == "cuda" and o * i * 2 < GRAPH_MAX_BYTES
                dense_ms, _ = median_ms(lambda: F.linear(x, W), dev, graph=graph, repeats=repeats)
                chosen = select(layer, x)
                for kname, fn in candidates(layer, x):
                    ms, how = median_ms(fn, dev, graph=graph, repeats=repeats)
                    nb = moved_bytes(kname, layer, T, dtype)
                    rows.append({"shape": [o, i], "names": names, "layout": lname, "bpw": round(layer.bpw(), 3),
                                 "batch": T, "kernel": kname,
                                 "selected": kname in KERNELS and KERNELS.get(kname) is chosen, "ms": round(ms, 4), "bytes": nb,
                                 "gbs": _sig(nb / (ms * 1e-3) / 1e9), "dense_ms": round(dense_ms, 4),
                                 "speedup": _sig(dense_ms / ms), "limit_ms": round(limit_ms, 4),
                                 "of_limit": _sig(limit_ms / ms), **how})
            del layer
            gc.collect()
        del W
    return rows, skipped, bw


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate([[f"{r['shape'][0]}x{r['shape'][1]}", r["layout"], r["bpw"], r["batch"],
                      r["kernel"] + ("*" if r["selected"] else ""), r["ms"], r["gbs"], r["dense_ms"], r["speedup"],
                      r["of_limit"]] for r in rows],
                    headers=["shape", "layout", "bpw", "T", "kernel", "ms", "GB/s", "dense ms", "x dense", "of bound"],
                    tablefmt="github")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m ttvq_kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b,llama2-70b", help=f"of {','.join(SHAPES)}; '' for none")
    ap.add_argument("--shape", action="append", default=[], help="extra OUTxIN (repeatable)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {','.join(LAYOUTS)}")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (default 1)")
    ap.add_argument("--max-weights", type=float, default=None,
                    help="skip shapes with more weights (default: no limit on GPU, 60e6 on CPU)")
    ap.add_argument("--repeats", type=int, default=10, help="CPU: timed calls per median")
    ap.add_argument("--copy-mb", type=int, default=256, help="buffer size of the copy-bandwidth measurement")
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    max_w = args.max_weights if args.max_weights is not None else (float("inf") if dev.type == "cuda" else 60e6)
    shapes = shape_list([s for s in args.shapes.split(",") if s], args.shape)
    layouts = [s for s in args.layouts.split(",") if s]
    unknown = [s for s in layouts if s not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    batches = [int(b) for b in args.batch.split(",")]
    t0 = time.perf_counter()
    rows, skipped, bw = run(shapes, layouts, batches, dev, dtype, max_w, args.repeats, args.copy_mb,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
    import triton

    result = {"command": " ".join(["python -m ttvq_kernels.bench", *(argv if argv is not None else sys.argv[1:])]),
              "device": devices.name(dev), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "copy_gbs": round(bw, 2), "platform": platform.platform(), "torch": torch.__version__, "triton": triton.__version__,
              "layouts": {k: LAYOUTS[k][0] for k in layouts}, "rows": rows, "skipped": skipped,
              "wall_s": round(time.perf_counter() - t0, 1)}
    print(table(rows))
    for s in skipped:
        print(f"skipped {s['shape'][0]}x{s['shape'][1]} ({', '.join(s['names'])}): {s['why']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
