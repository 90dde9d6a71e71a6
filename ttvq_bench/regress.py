"""Regression grid on tiny real models: every method at 2 and 3 bits, fixed seeds, small but
real settings; perplexity, KL and bpw checked against golden values kept in the repository
(tests/golden/regression.json), and the orderings the project's claims rest on.

    python -m ttvq_bench.regress              # run the grid, compare, print the table (exit 1 on a failure)
    python -m ttvq_bench.regress --update     # run it and rewrite the golden file (`git diff` shows what moved)
    python -m ttvq_bench.regress --models tiny

The golden file is only ever written by --update. Bands: perplexity within 2%, KL within 5%
(and 1e-4 absolute), bpw exact. stories260K is skipped where ../shared/data is absent.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "regression.json"
BANDS = {"ppl": 0.02, "kl": 0.05}  # relative; bpw exact
KL_ABS = 1e-4

COMMON = ["threads=1", "logger=none", "logger.progress=false", "eval.kl.enabled=true"]
MODELS = {
    # the embedded default's recipe, smaller so the grid fits CI (trained in ~30 s)
    "tiny": ["model.tiny.hidden_size=96", "model.tiny.intermediate_size=264", "model.tiny.num_layers=2",
             "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.seq_len=128", "model.tiny.steps=250",
             "calib.n=32", "calib.seqlen=128", "eval.ppl.seqlen=128", "eval.ppl.max_windows=40"],
    "stories260K": ["experiment=stories260k_ref", "calib.n=64", "eval.ppl.max_windows=100"],
}
FAST_TTVQ = ["method.block_epochs=3", "method.peft_epochs=2", "method.block_batch_size=8", "method.peft_batch_size=8"]
METHODS = {
    "fp16": ["method=fp16"],
    "rtn": ["method=rtn"],
    "gptq": ["method=gptq"],
    "kmeans": ["method=kmeans"],
    "vptq": ["method=vptq"],
    "ttvq-init": ["method=ttvq", "method.blockwise=false", "method.peft=false"],  # TTVQ's init alone
    "ttvq": ["method=ttvq", *FAST_TTVQ],
    "aqlm": ["method=aqlm", "method.ft_epochs=3"],
    "jlcm": ["method=jlcm", "method.epochs=3"],
}
BITS = (2, 3)
VQ, SCALAR = ("vptq", "ttvq", "aqlm", "jlcm"), ("rtn", "gptq")  # the claimed VQ methods (plain k-means is an ablation baseline)


def points(models: list[str]) -> list[tuple[str, str, int]]:
    return [(m, meth, b) for m in models for meth in METHODS for b in ((16,) if meth == "fp16" else BITS)]


def key(model: str, method: str, bits: int) -> str:
    return f"{model}/{method}/w{bits}"


def available(models: list[str]) -> list[str]:
    data = ROOT.parent / "shared" / "data"
    return [m for m in models if m != "stories260K" or (data / "stories260K" / "stories260K.bin").is_file()]


def run_grid(models: list[str], workdir: Path, progress=print) -> dict[str, dict]:
    """Every point of the grid, in this process (calibration and Hessians shared by the cache)."""
    from hydra import compose, initialize_config_module

    from ttvq_bench.config import register_configs
    from ttvq_bench.run import run_job

    register_configs()
    data = ROOT.parent / "shared" / "data"
    out = {}
    with initialize_config_module(version_base="1.3", config_module="ttvq_conf"):
        for model, method, bits in points(models):
            t0 = time.time()
            cfg = compose("config", overrides=[*MODELS[model], *METHODS[method], f"bits={min(bits, 8)}", *COMMON,
                                               f"paths.data_root={data}", f"cache_dir={workdir / 'cache'}",
                                               f"results_dir={workdir / 'results'}"])
            rec = run_job(cfg, workdir / "runs" / key(model, method, bits).replace("/", "_"))
            corpus = next(iter(rec["ppl"]))
            out[key(model, method, bits)] = {"ppl": rec["ppl"][corpus], "kl": rec["kl"][corpus], "top1": rec["top1"][corpus],
                                             "bpw": rec["bpw"]}
            progress(f"{key(model, method, bits):28s} ppl {rec['ppl'][corpus]:9.4f}  KL {rec['kl'][corpus]:.4f}  "
                     f"bpw {rec['bpw']:.4f}  ({time.time() - t0:.1f} s)")
    return out


def compare(results: dict, golden: dict) -> list[str]:
    """Every entry against its golden value; a missing golden entry is a failure too."""
    bad = []
    for k, r in results.items():
        g = golden.get(k)
        if g is None:
            bad.append(f"{k}: no golden value (run --update)")
            continue
        if r["bpw"] != g["bpw"]:
            bad.append(f"{k}: bpw {r['bpw']} != golden {g['bpw']}")
        for m, rel in BANDS.items():
            tol = rel * abs(g[m]) + (KL_ABS if m == "kl" else 0)
            if abs(r[m] - g[m]) > tol:
                bad.append(f"{k}: {m} {r[m]:.6g} is {100 * (r[m] / g[m] - 1) if g[m] else float('inf'):+.2f}% "
                           f"from golden {g[m]:.6g} (band ±{100 * rel:g}%)")
    return bad


def orderings(results: dict) -> list[str]:
    """The claims: VQ beats scalar at 2 bits, 3 bits beats 2 bits for every method, fp16 is
    best, TTVQ beats its own init."""
    bad = []
    models = sorted({k.split("/")[0] for k in results})
    for m in models:
        r = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(m + "/")}
        ppl = {k: v["ppl"] for k, v in r.items()}
        for vq in VQ:
            for sc in SCALAR:
                if f"{vq}/w2" in ppl and f"{sc}/w2" in ppl and not ppl[f"{vq}/w2"] < ppl[f"{sc}/w2"]:
                    bad.append(f"{m}: {vq} does not beat {sc} at 2 bits ({ppl[f'{vq}/w2']:.4g} vs {ppl[f'{sc}/w2']:.4g})")
        for meth in set(k.split("/")[0] for k in r) - {"fp16"}:
            if not r[f"{meth}/w3"]["ppl"] < r[f"{meth}/w2"]["ppl"]:
                bad.append(f"{m}: {meth} 3 bits ({r[f'{meth}/w3']['ppl']:.4g}) is not better than 2 bits ({r[f'{meth}/w2']['ppl']:.4g})")
        best = ppl.get("fp16/w16")
        if best is not None and any(v < best for k, v in ppl.items() if k != "fp16/w16"):
            bad.append(f"{m}: a quantized model beats fp16 ({min(ppl.items(), key=lambda kv: kv[1])})")
        for b in BITS:
            if f"ttvq/w{b}" in ppl and not ppl[f"ttvq/w{b}"] < ppl[f"ttvq-init/w{b}"]:
                bad.append(f"{m}: TTVQ does not beat its own init at {b} bits ({ppl[f'ttvq/w{b}']:.4g} vs {ppl[f'ttvq-init/w{b}']:.4g})")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--update", action="store_true", help="rewrite the golden file with this run's values")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--workdir", default=None, help="cache and records (default: a temporary directory)")
    args = ap.parse_args(argv)
    models = available(args.models.split(","))
    t0 = time.time()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ttvq-regress-"))
    results = run_grid(models, workdir)
    print(f"grid: {len(results)} points on {', '.join(models)} in {time.time() - t0:.0f} s")
    bad = orderings(results)
    if args.update:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden.update(results)
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        bad = compare(results, json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}) + bad
    for b in bad:
        print(f"FAIL {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
