"""Zero-shot accuracy through lm-evaluation-harness, on the (quantized) model in memory, offline.

The model goes to lm-eval as an `HFLM` subclass holding the very module the job quantized (never
reloaded, never tied again), and lm-eval scores the tasks itself (`lm_eval.evaluator.evaluate`,
0-shot).

Tasks (`eval.zeroshot.tasks`):
  piqa arc_easy arc_challenge hellaswag winogrande lambada_openai
      our definitions in `tasks/` (lm-eval's prompts, choices, targets and metrics) reading the
      local copies under `eval.zeroshot.task_data` (formats: the shared data README);
  default_continuation default_lastword
      the embedded default's own tasks, built from the default corpus's held-out split;
  lm_eval:<name>
      lm-eval's built-in task <name> itself, from the Hugging Face datasets cache; never
      downloaded (the hub is forced offline), so it fails with one line when not cached;
  any task of a yaml in `eval.zeroshot.include_path` (your own tasks; they win over ours).

Protocol (all of it in the returned dict):
- BOS: with `bos=true` every context (and context+continuation) is encoded as [BOS] + text,
  whatever the tokenizer's own post-processor does; with `bos=false` never. An empty context
  is conditioned on BOS either way (lm-eval's rule; none of our tasks has one).
- `limit`: a seeded subsample of each task's documents, `random.Random(f"{seed}/{task}")
  .sample(range(n), limit)` sorted, passed to lm-eval as `samples` (lm-eval's own `limit`
  takes the first documents); `null` = all documents.
- stderr: lm-eval's closed form for a mean (`mean_stderr`) over the per-document values; no
  bootstrap (bootstrap_iters=0: it would fork a process pool for lambada's perplexity only).
- Longer inputs than the model's context (`max_position_embeddings`) are cut from the left by
  lm-eval (`n_truncated` requests per task); a continuation that alone exceeds the context,
  where lm-eval would stop on an assert, is scored in consecutive context-sized pieces
  (`n_split`), i.e. its log-likelihood under the model's context limit.
- Score: a task's `metric` is acc_mutual_info where the task computes it (its yaml lists it:
  the metric that discriminates on that task, e.g. `default_continuation`, where a small model
  mostly picks the choice likely on its own), else acc. The summary line and `average` use it.
- Under torchrun each process scores a contiguous share of lm-eval's log-likelihood requests
  and the results are gathered in order on every process (ttvq_bench/distributed.py).
- Per-document outputs: `samples.jsonl` in the task's cache entry, its path in the record
  (`tasks.<name>.samples`): per document lm-eval's doc_id and doc hash, the target, every
  request's (log-likelihood, is-greedy) and the per-document metric values, so two methods can
  be compared document by document (`ttvq_analysis.paired`).
- Cache: one entry per task under `<cache_dir>/zeroshot/<key>`, key = hash of the weights in
  memory (`hash_tensors` of the state dict, so two checkpoints never share one), the model and
  tokenizer fingerprints, the rendered requests' content (documents, prompts, choices,
  targets), the selected indices, bos, batch size, max length and the lm-eval version.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path

import torch

from ttvq_bench.device import batch_size_for
from ttvq_bench.distributed import gather_lists, shard
from ttvq_bench.errors import ConfigError, DataError
from ttvq_bench.hashing import hash_obj, hash_tensors
from ttvq_methods.model_walk import module_device

log = logging.getLogger("ttvq")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUILTIN_PREFIX = "lm_eval:"
CACHE_KIND = "zeroshot"
# Bump when the scoring path here changes in a way the cache key cannot see
# (2: entries hold the per-document outputs and the task's scored metric).
ZEROSHOT_VERSION = 2
SAMPLES_FILE = "samples.jsonl"
# The metric a task is scored by: the first of these that it computes.
SCORE_METRICS = ("acc_mutual_info", "acc")


# -------------------------------------------------------------------------------------------
# config


def shipped_tasks(folder: Path = TASKS_DIR) -> list[str]:
    """Task names defined by the yamls in `folder` (ours by default; read without lm-eval)."""
    return sorted(m.group(1) for p in Path(folder).rglob("*.yaml")
                  if (m := re.search(r"^task:\s*(\S+)\s*$", p.read_text(encoding="utf-8"), re.M)))


def check_config(cfg) -> None:
    """Checks `eval.zeroshot` before any work (cheap: no lm-eval import; for `config.validate`)."""
    zs = cfg.eval.zeroshot
    for key in ("limit", "batch_size"):
        v = zs[key]
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise ConfigError(f"eval.zeroshot.{key}={v!r} must be a positive integer or null")
    names = list(zs.tasks)
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.zeroshot.tasks={names} names a task twice")
    known = set(shipped_tasks())
    extra = zs.get("include_path")
    if extra:
        if not Path(str(extra)).is_dir():
            raise ConfigError(f"eval.zeroshot.include_path={extra!r} is not a directory")
        known |= set(shipped_tasks(Path(str(extra))))
    for name in names:
        if not name.startswith(BUILTIN_PREFIX) and name not in known:
            raise ConfigError(f"unknown zero-shot task {name!r}: ours are {sorted(shipped_tasks())}; "
                              f"lm-eval's built-in ones are named {BUILTIN_PREFIX}<name>")


def tasks_content(cfg) -> dict:
    """What the configured tasks read, as content hashes (a run's identity, never paths): for
    our standard tasks their yaml and every file of their folder under task_data; for tasks of
    include_path their yamls; lm-eval's built-in ones are named by lm-eval's version (recorded)."""
    from ttvq_bench.evaluate.tasks.loaders import DATA_DIRS

    zs = cfg.eval.zeroshot
    out = {}
    for name in zs.tasks:
        h = hashlib.sha256()
        if name in DATA_DIRS and zs.task_data:
            folder = Path(str(zs.task_data)).expanduser() / DATA_DIRS[name]
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                h.update(str(f.relative_to(folder)).encode() + hashlib.sha256(f.read_bytes()).digest())
        yamls = [p for d in [TASKS_DIR] + ([Path(str(zs.include_path))] if zs.include_path else [])
                 for p in sorted(d.rglob("*.yaml"))]
        for p in yamls:
            h.update(p.read_bytes())
        out[name] = h.hexdigest()[:16]
    return out


# -------------------------------------------------------------------------------------------
# the job's entry point


def evaluate_zeroshot(cfg, lm, cache, record: dict | None = None, progress: bool = True) -> dict:
    """Zero-shot accuracy of `lm` (a LoadedModel, as quantized in memory) on the configured tasks."""
    check_config(cfg)
    zs = cfg.eval.zeroshot
    t0 = time.time()
    with _hub_offline(), _quiet(progress):
        import lm_eval

        task_data = str(Path(str(zs.task_data)).expanduser().resolve()) if zs.task_data else None
        tasks = build_tasks(list(zs.tasks), task_data, zs.get("include_path"))
        context = getattr(lm.model.config, "max_position_embeddings", 2048)
        bs = batch_size_for(lm.model, context, module_device(lm.model), zs.batch_size)
        hflm = make_lm(lm, bos=zs.bos, batch_size=bs, progress=progress)
        base = {
            "zeroshot_version": ZEROSHOT_VERSION, "lm_eval": lm_eval.__version__,
            "weights": hash_tensors(lm.model.state_dict().items()), "model": lm.fingerprint,
            "tokenizer": lm.tokenizer.fingerprint(), "bos": bool(zs.bos), "batch_size": bs,
            "max_length": hflm.max_length, "dtype": str(next(lm.model.parameters()).dtype),
        }
        per_task = {}
        for name, (task, source) in tasks.items():
            per_task[name] = _evaluate_task(hflm, name, task, source, zs, base, cache)
    scores = [r[r["metric"]] for r in per_task.values()]
    return {
        "tasks": per_task,
        "average": sum(scores) / len(scores),
        "average_of": "each task's `metric`: acc_mutual_info where the task computes it, else acc",
        "lm_eval_version": base["lm_eval"],
        "bos": bool(zs.bos),
        "limit": zs.limit,
        "seed": zs.seed,
        "num_fewshot": 0,
        "batch_size": bs,
        "max_length": base["max_length"],
        "task_data": task_data,
        "weights_hash": base["weights"],
        "subsample": "random.Random(f'{seed}/{task}').sample(range(n), limit), sorted; all when limit is null or >= n",
        "stderr": "lm-eval mean_stderr (sample std / sqrt(n)) of the per-document values",
        "wall_s": round(time.time() - t0, 3),
    }


def _evaluate_task(hflm, name: str, task, source: str, zs, base: dict, cache) -> dict:
    docs = task.eval_docs  # lm-eval rebuilds these (process_docs) on every access: once here
    n_total = len(docs)
    indices = subsample(n_total, zs.limit, zs.seed, name)
    key = hash_obj({**base, "task": name, "content": task_content_hash(task, indices, docs), "indices": indices})
    entry = cache.path(CACHE_KIND, key)
    if cache.has(CACHE_KIND, key):
        res = json.loads((entry / "result.json").read_text())
        log.info("zeroshot[%s] from cache: %s", name, _score_line(res))
        return {**res, "samples": str(entry / SAMPLES_FILE), "cached": True}
    t0 = time.time()
    res = run_task(hflm, task, indices)
    samples = res.pop("samples")
    res.update({"n_total": n_total, "source": source, "wall_s": round(time.time() - t0, 3)})
    with cache.writing(CACHE_KIND, key) as tmp:
        (tmp / "result.json").write_text(json.dumps(res, indent=1))
        with open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    log.info("zeroshot[%s] %s (%.1fs)", name, _score_line(res), res["wall_s"])
    return {**res, "samples": str(entry / SAMPLES_FILE), "cached": False}


def _score_line(res: dict) -> str:
    m = res["metric"]
    err = res.get(f"{m}_stderr")
    return f"{m} {res[m]:.4f}" + (f" ± {err:.4f}" if err is not None else "") + f" (n={res['n']})"


def subsample(n: int, limit: int | None, seed: int, name: str) -> list[int] | None:
    """Indices of the documents to evaluate (sorted), or None for all of them."""
    if limit is None or limit >= n:
        return None
    return sorted(random.Random(f"{seed}/{name}").sample(range(n), limit))


def task_content_hash(task, indices: list[int] | None, docs=None) -> str:
    """Hash of what the task asks on the selected documents: prompt, choices, target, and the
    config fields that shape the requests and the metrics."""
    docs = task.eval_docs if docs is None else docs
    idx = range(len(docs)) if indices is None else indices
    c = task.config
    rows = []
    for i in idx:
        doc = docs[i]
        choices = task.doc_to_choice(doc) if c.doc_to_choice is not None else None
        rows.append([task.doc_to_text(doc), choices, task.doc_to_target(doc)])
    metrics = [m["metric"] if isinstance(m["metric"], str) else m["metric"].__name__ for m in (c.metric_list or [])]
    return hash_obj({"rows": rows, "output_type": c.output_type, "target_delimiter": c.target_delimiter,
                     "fewshot_delimiter": c.fewshot_delimiter, "metrics": metrics, "version": task.VERSION},
                    n=16)


def run_task(hflm, task, indices: list[int] | None) -> dict:
    """lm-eval's own 0-shot evaluation of one task; returns acc/acc_norm (+ stderr), n, the
    scored `metric`, ..., and `samples`: the per-document outputs (`sample_row`).

    `lm_eval.evaluator.evaluate` rather than `simple_evaluate`: the latter only adds seeding of
    the global generators (nothing is random in 0-shot loglikelihood scoring) and an
    environment report that runs `pip list` in a subprocess on every call."""
    from lm_eval.api.metrics import mean_stderr
    from lm_eval.evaluator import evaluate

    name = task.task_name
    task.set_config(key="num_fewshot", value=0)
    hflm.n_truncated = hflm.n_split = 0
    out = evaluate(lm=hflm, task_dict=_task_manager(()).load([task]), bootstrap_iters=0, log_samples=True,
                   samples={name: indices} if indices is not None else None)
    metrics = out["results"][name]
    samples = out["samples"][name]
    res: dict = {"n": int(out["n-samples"][name]["effective"])}
    for m in ("acc", "acc_norm", "acc_mutual_info"):
        if f"{m},none" in metrics:
            values = [float(s[m]) for s in samples]
            res[m] = float(metrics[f"{m},none"])
            res[f"{m}_stderr"] = float(mean_stderr(values)) if len(values) > 1 else None
    if "perplexity,none" in metrics:
        res["perplexity"] = float(metrics["perplexity,none"])
    if "acc" not in res:
        raise ConfigError(f"zero-shot task {name!r} reports no acc (metrics: {sorted(metrics)})")
    res["metric"] = next(m for m in SCORE_METRICS if m in res)
    res["samples"] = [sample_row(s) for s in samples]
    res["task_version"] = out["versions"].get(name)
    res["n_truncated"] = hflm.n_truncated  # requests whose context was cut from the left
    res["n_split"] = hflm.n_split  # requests whose continuation alone exceeded the context
    return res


def sample_row(s: dict) -> dict:
    """One document's outputs from lm-eval's logged sample: ids, target, every request's
    filtered response ((log-likelihood, is-greedy) for our loglikelihood and multiple-choice
    tasks) and the per-document metric values."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        return float(v) if hasattr(v, "__float__") else str(v)

    return {"doc_id": int(s["doc_id"]), "doc_hash": s.get("doc_hash"), "target": plain(s.get("target")),
            "resps": plain(s.get("filtered_resps")), **{m: plain(s[m]) for m in s.get("metrics", []) if m in s}}


# -------------------------------------------------------------------------------------------
# tasks


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool = False, task_data: str | None = None):
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's ~15k built-in tasks takes seconds.
    return TaskManager(include_path=list(include) or None, include_defaults=defaults,
                       metadata={"task_data": task_data} if task_data else None)


def build_tasks(names: list[str], task_data: str | None, include_path: str | None = None) -> dict:
    """{name: (lm-eval Task, source)} for the configured names, in order."""
    include = [str(TASKS_DIR)] + ([str(Path(str(include_path)).resolve())] if include_path else [])
    ours = _task_manager(tuple(include), False, task_data)
    out = {}
    for name in names:
        if name.startswith(BUILTIN_PREFIX):
            out[name] = (_builtin_task(name), "lm_eval")
            continue
        if name not in ours.all_tasks:
            raise ConfigError(f"unknown zero-shot task {name!r}")
        src = "default_corpus" if name.startswith("default_") else "local"
        if include_path and name not in shipped_tasks():
            src = "include_path"
        out[name] = (_only_task(ours.load([name]), name), src)
    return out


def _builtin_task(name: str):
    """lm-eval's own task `lm_eval:<task>`, its dataset from the HF datasets cache (offline)."""
    tm = _task_manager((), True)
    base = name[len(BUILTIN_PREFIX):]
    if base not in tm.all_tasks:
        raise ConfigError(f"{name}: lm-eval {_lm_eval_version()} has no built-in task {base!r}")
    try:
        return _only_task(tm.load([base]), name)
    except ConfigError:
        raise
    except Exception as e:  # not in the datasets cache (the hub is offline)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{name}: lm-eval's built-in task needs its dataset in the Hugging Face datasets "
                        f"cache (nothing is downloaded): {type(e).__name__}: {first}") from e


def _lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__


def _only_task(loaded: dict, name: str):
    tasks = list(loaded["tasks"].values())
    if len(tasks) != 1:
        raise ConfigError(f"zero-shot task {name!r} is a group or tag of {len(tasks)} tasks; name one task")
    return tasks[0]


# -------------------------------------------------------------------------------------------
# the model


def make_lm(lm, bos: bool, batch_size: int, progress: bool = True, max_length: int | None = None):
    """The in-memory model as an lm-eval LM (HFLM subclass with explicit BOS)."""
    tok = getattr(lm.tokenizer, "hf", None)
    if tok is None:
        raise DataError(f"zero-shot evaluation needs a transformers tokenizer for {lm.name}; none is available")
    bos_id = lm.tokenizer.bos_id if bos else None
    if bos and bos_id is None:
        raise ConfigError("eval.zeroshot.bos=true but the tokenizer has no BOS token")
    max_length = max_length or getattr(lm.model.config, "max_position_embeddings", None) or 2048
    # A copy: lm-eval sets a pad token on the tokenizer it is given.
    return _lm_class()(lm.model, copy.deepcopy(tok), bos_id, batch_size, max_length, progress)


@functools.lru_cache(maxsize=1)
def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        """HFLM on a model object; BOS is ours to decide, the model is left exactly as given."""

        def __init__(self, model, tokenizer, bos_id, batch_size, max_length, progress):
            self.bos_id, self.progress, self.n_truncated, self.n_split = bos_id, progress, 0, 0
            # HFLM.__init__ calls model.tie_weights(): a quantized head must not be re-tied.
            model.tie_weights = lambda *a, **k: None
            try:
                super().__init__(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size,
                                 max_length=max_length, add_bos_token=bos_id is not None, logits_cache=True)
            finally:
                del model.tie_weights

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            if self.bos_id is not None and add_special_tokens is not False:
                ids = [self.bos_id] + ids
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            """lm-eval's scoring, plus continuations longer than the context (lm-eval stops on an
            assert there): scored in consecutive pieces of at most max_length tokens, each seeing
            as much of what precedes it as fits, so the sum is the continuation's log-likelihood
            under the model's context limit, as for any input cut from the left."""
            L = self.max_length
            flat, owner = [], []
            for i, (req, ctx, cont) in enumerate(requests):
                if len(cont) <= L:
                    flat.append((req, ctx, cont))
                    owner.append(i)
                    self.n_truncated += len(ctx) + len(cont) > L + 1
                    continue
                self.n_split += 1
                toks = ctx + cont
                for a in range(len(ctx), len(toks), L):
                    b = min(a + L, len(toks))
                    start = max(0, b - L - 1)
                    flat.append((None, toks[start:a], toks[a:b]))  # None: not a whole request
                    owner.append(i)
            mine = shard(len(flat))  # under torchrun each process scores its share
            part = flat[mine.start:mine.stop]
            out = gather_lists(super()._loglikelihood_tokens(part, disable_tqdm=disable_tqdm or not self.progress,
                                                             override_bs=override_bs) if part else [])
            res = [[0.0, True] for _ in requests]
            for i, (ll, greedy) in zip(owner, out):
                res[i][0] += ll
                res[i][1] = res[i][1] and greedy
            return [(ll, greedy) for ll, greedy in res]

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

        def get_model_info(self) -> dict:  # HFLM's asks the Hub for a sha
            return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                    "model_dtype": str(next(self.model.parameters()).dtype)}

    return InMemoryLM


# -------------------------------------------------------------------------------------------
# environment


@contextlib.contextmanager
def _hub_offline():
    """The Hugging Face hub and datasets in offline mode for the duration (already-imported
    modules read the flag at import, so it is set on them too)."""
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    import datasets.config
    import huggingface_hub.constants as hub

    old = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = old
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Drop(logging.Filter):
    """Drops lm-eval's expected noise for an in-memory model (each one a known, harmless line)."""

    NOISE = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
             "exceeds model's maximum length", "using test_docs as fewshot_docs", "Using pre-initialized model",
             "Custom kwargs can be passed to `--metadata`", "num_fewshot > 0 but fewshot_split is None")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


@contextlib.contextmanager
def _quiet(progress: bool):
    """lm-eval's INFO lines off (its warnings, minus known noise, stay on), datasets' bars off;
    lm-eval's request bars stay when `progress`. Restores all of it afterwards."""
    import datasets
    import lm_eval.evaluator  # noqa: F401  (creates lm-eval's loggers, so they can be filtered)
    import lm_eval.models.huggingface  # noqa: F401

    root = logging.getLogger("lm_eval")
    loggers = [root] + [logging.getLogger(n) for n, lg in list(logging.root.manager.loggerDict.items())
                        if n.startswith("lm_eval.") and isinstance(lg, logging.Logger)]
    level, filt = root.level, _Drop()
    root.setLevel(logging.WARNING)
    for lg in loggers:
        lg.addFilter(filt)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    import lm_eval.api.task as lm_task

    task_tqdm = lm_task.tqdm  # its "building contexts" bar takes no disable flag
    if not progress:
        lm_task.tqdm = functools.partial(task_tqdm, disable=True)
    try:
        yield
    finally:
        lm_task.tqdm = task_tqdm
        if bars:
            datasets.enable_progress_bars()
        root.setLevel(level)
        for lg in loggers:
            lg.removeFilter(filt)
