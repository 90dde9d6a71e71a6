"""A run's identity: the run_id that decides whether a job has already been done.

It is a hash of everything that defines the result and nothing else: the resolved config
without where things are written or logged and without any path (a job run through another
data root, a symlink, or on another machine of a cluster is the same job), plus the content
those paths point at (the model's fingerprint, the evaluation and calibration texts, the
zero-shot tasks' files, a given checkpoint's content hash) and the version of the code that
decides the result (scoped: editing one method leaves every other method's run_ids alone).
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ttvq_bench.data.corpora import load_text
from ttvq_bench.hashing import hash_bytes, hash_file, hash_obj
from ttvq_bench.record.versions import code_hash

# Keys that do not change a result (where it is written, how it is logged, whether cached).
NON_DEFINING = ("logger", "results_dir", "cache_dir", "cache", "force", "save_checkpoint", "sweep", "paths", "threads",
                "device")  # where a job computes is recorded (record.device); the compute dtype is model.dtype
# Keys that name where content lives; the content itself enters the identity instead.
PATH_KEYS = ("model.path", "model.tokenizer", "data.path", "data.calib_path", "calib.corpus.path",
             "calib.corpus.calib_path", "eval.zeroshot.task_data", "eval.zeroshot.include_path", "checkpoint")
RUN_CODE = ("ttvq_bench.run",)  # the harness itself: loading, evaluation, records


def defining_config(cfg, q) -> dict:
    """The resolved config as plain values, minus NON_DEFINING and PATH_KEYS, with method, bits
    and head as the quantization really has them (a checkpoint's own)."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out = {k: v for k, v in plain.items() if k not in NON_DEFINING}
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    out.update(method=q.method_config, bits=q.bits, head=q.head_config)
    return out


def eval_corpora(cfg) -> list:
    if not cfg.eval.ppl.enabled:
        return []
    corpora = [cfg.data]
    for kind in cfg.eval.ppl.extra:
        # Extra corpora use the data group's default paths for that kind.
        corpora.append(OmegaConf.merge(cfg.data, {"name": kind, "kind": kind, "path": _default_path(cfg, kind)}))
    return corpora


def _default_path(cfg, kind: str) -> str | None:
    root = cfg.paths.data_root
    return {"tinystories": f"{root}/tinystories/tinystories_val.txt", "wikitext2": f"{root}/wikitext2",
            "wikitext2_raw": f"{root}/wikitext2"}.get(kind)


def run_identity(cfg, lm, q) -> tuple[str, dict]:
    """(run_id, the defining config recorded with it)."""
    defining = defining_config(cfg, q)
    content = {
        "model": lm.fingerprint,
        "eval_text": {c.name: hash_bytes(load_text(c, "eval")[0].encode()) for c in eval_corpora(cfg)},
        "calib_text": hash_bytes(load_text(cfg.calib.corpus, str(cfg.calib.split))[0].encode()) if q.needs_calibration else None,
        "checkpoint": (q.checkpoint_meta.get("content_sha") or hash_file(q.checkpoint)) if q.checkpoint else None,
        "code": code_hash(RUN_CODE + q.code_roots()),
    }
    if cfg.eval.zeroshot.tasks:
        from ttvq_bench.evaluate.zeroshot import tasks_content

        content["zeroshot"] = tasks_content(cfg)
    return hash_obj({"config": defining, **content}), defining
