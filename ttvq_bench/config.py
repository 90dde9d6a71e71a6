"""Structured configs: the schema every yaml under conf/ is checked against.

Each group (`model`, `data`, `calib`, `eval`, `logger`) is a typed dataclass node, so a misspelt
key, a wrongly typed value or a value outside a closed choice (an enum) fails while Hydra
composes the config. `method` and `head` are polymorphic: every method (head) registers its own
config dataclass as `method/<name>_schema` (`head/<name>_schema`), and its yaml extends that
schema. Names that select from a registry (model kinds, corpus kinds, methods, heads) and range
checks that types cannot express are checked in `validate`, which the run calls before doing
any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ttvq_bench.choices import Choice
from ttvq_bench.dtypes import ComputeDType, DType
from ttvq_bench.errors import ConfigError
from ttvq_bench.models.tiny import TinyModelConfig


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class PathsConfig:
    # Where the user's copies of public datasets live (TinyStories, WikiText-2, ...).
    data_root: str = "${oc.env:TTVQ_DATA,../shared/data}"


@dataclass
class ModelConfig:
    kind: str = MISSING  # a registered model loader: tiny | llama2c | hf
    name: Optional[str] = None  # name in records; default: derived from the checkpoint
    path: Optional[str] = None  # llama2c: the .bin file; hf: a local dir (or a repo id in the HF cache)
    tokenizer: Optional[str] = None  # llama2c: the SentencePiece .model file
    dtype: ComputeDType = ComputeDType.auto  # compute dtype (auto: see ttvq_bench/device.py)
    # Parameters that no method quantizes (embeddings, norms, head) are stored, counted and
    # evaluated at this precision, so the fp16 baseline is exactly what its checkpoint holds.
    storage_dtype: DType = DType.float16
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class CorpusConfig:
    """A text corpus with an evaluation split and a calibration split (never the same text)."""

    name: str = MISSING  # key in records (ppl.<name>)
    kind: str = MISSING  # a registered corpus: default | tinystories | wikitext2 | wikitext2_raw | c4 | file
    path: Optional[str] = None  # file or dir; meaning depends on kind
    calib_path: Optional[str] = None  # kind=file/c4: where calibration text comes from
    # kind=tinystories/file: fraction of documents (from the end) held out for calibration.
    calib_fraction: float = 0.1


class CalibSampler(Choice):
    documents = "documents"  # torch-seeded offsets into the calibration split (the harness's default)
    stream = "stream"  # random.Random(seed).randint(start, N - body): the stories260K reference's
    gptq = "gptq"  # GPTQ's datautils: random.seed(seed); randint(0, N - seqlen - 1) per window


class CalibSplit(Choice):
    calib = "calib"  # the corpus's calibration split (disjoint from its evaluation split)
    all = "all"  # the whole file as it is (the reference protocol's stream; see stream_start)
    train = "train"  # WikiText-2's train split (GPTQ's calibration text)


@dataclass
class CalibConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    n: int = 128  # number of windows
    seqlen: int = 256  # tokens per window (BOS included when bos=true)
    bos: bool = True
    seed: int = 0
    sampler: CalibSampler = CalibSampler.documents
    split: CalibSplit = CalibSplit.calib
    stream_start: float = 0.0  # stream sampler: windows start at or after this fraction of the tokens
    bos_text: bool = False  # one BOS at the start of the tokenized text (what a HF tokenizer's encode gives)


@dataclass
class PPLConfig:
    enabled: bool = True
    seqlen: int = 256
    stride: Optional[int] = None  # None: = seqlen (non-overlapping, GPTQ convention)
    bos: bool = True  # BOS at the start of every window (counts in seqlen)
    bos_text: bool = False  # one BOS at the start of the tokenized text instead (GPTQ's llama_eval)
    max_windows: Optional[int] = None  # None: the whole split
    batch_size: Optional[int] = None  # null: from free device memory (device.batch_size_for; 8 on a CPU)
    extra: List[str] = field(default_factory=list)  # more corpora by kind name, default paths


@dataclass
class KLConfig:
    """KL(FP ‖ quantized) and top-1 agreement on the perplexity windows (evaluate/kl.py)."""

    enabled: bool = True
    topk: int = 1024  # FP log-probs kept per token; vocabularies up to this size give the exact KL


@dataclass
class SpeedConfig:
    """Kernel speed of the quantized layers and end-to-end greedy decoding against the FP
    model (ttvq_kernels.speed; the FP model is loaded again after quantization for it)."""

    enabled: bool = True
    new_tokens: int = 16


@dataclass
class ZeroShotConfig:
    """Zero-shot accuracy through lm-evaluation-harness on the model in memory (no download)."""

    # e.g. [piqa, arc_easy]; empty: skipped. Ours: piqa arc_easy arc_challenge hellaswag winogrande
    # lambada_openai (local files), default_continuation default_lastword (embedded default);
    # lm_eval:<name> = lm-eval's built-in task, from the HF datasets cache only (never downloaded).
    tasks: List[str] = field(default_factory=list)
    limit: Optional[int] = None  # seeded subsample of each task's documents; null: all
    batch_size: Optional[int] = None  # null: from free device memory (device.batch_size_for; 8 on a CPU)
    bos: bool = True  # prepend BOS to every context (recorded)
    seed: int = 1234
    # Where the local copies of the standard task files live (formats: see the README).
    task_data: str = "${paths.data_root}/mc"
    # A folder of your own lm-eval task yamls; their names can go in `tasks` (they win over ours).
    include_path: Optional[str] = None


@dataclass
class EvalConfig:
    ppl: PPLConfig = field(default_factory=PPLConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    init_timeout: float = 10.0  # online: seconds to reach the service before logging offline instead
    project: str = "ttvq-bench"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: `<experiment or sweep>-<date>-<time>` of the sweep's start
    tags: List[str] = field(default_factory=list)  # added to method, w<bits> and experiment
    log_checkpoint: bool = False  # the quantized checkpoint as a `model` artifact (its size again on disk)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # tqdm bars


@dataclass
class Config:
    bits: int = 3  # every method maps this to its own parameters through one documented table
    seed: int = 0
    # torch intra-op threads. None: half the cores this process may use (at least 1): on a
    # shared machine spin-waiting threads fight the other processes (the default job took
    # 11.5 min on 2 busy cores with 2 threads).
    threads: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (ttvq_bench/device.py)
    # The distillation stages' forward passes: bf16 autocast (fp32 master parameters, optimizer
    # and losses), off, or auto = bf16 on a GPU that supports it, off on a CPU (recorded resolved).
    autocast: str = "auto"
    # Absolute per-user defaults, so a run from any directory finds its records and cache.
    results_dir: str = "${oc.env:TTVQ_RESULTS,${oc.env:HOME}/ttvq/results}"
    cache_dir: str = "${oc.env:XDG_CACHE_HOME,${oc.env:HOME}/.cache}/ttvq"
    cache: bool = True
    force: bool = False  # rerun even when an ok record with the same run_id exists
    save_checkpoint: bool = True
    checkpoint: Optional[str] = None  # evaluate this saved quantized checkpoint; skip quantization
    sweep: Optional[str] = None  # sweep/group name; default from the Hydra sweep dir
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: Any = MISSING
    head: Any = MISSING  # the head stage's config (methods/heads/): name + its toggles
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_registered = False


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (before composing, in the app and in tests)."""
    global _registered
    if _registered:
        return
    from ttvq_methods.heads import HEADS
    from ttvq_methods.registry import METHODS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, registry in (("method", METHODS), ("head", HEADS)):
        for name, cls in registry.items():
            cs.store(group=group, name=f"{name}_schema", node=cls.Config)
    _registered = True


def _registries() -> dict:
    """Config keys that name a registered entry, and the registry they select from."""
    from ttvq_bench.data.corpora import CORPORA
    from ttvq_bench.models import LOADERS
    from ttvq_methods.heads import HEADS
    from ttvq_methods.registry import METHODS

    return {"model.kind": LOADERS, "data.kind": CORPORA, "calib.corpus.kind": CORPORA,
            "method.name": METHODS, "head.name": HEADS}


def validate(cfg: DictConfig) -> None:
    """Checks beyond types; raises ConfigError with one line naming the key."""
    for key, registry in _registries().items():
        val = OmegaConf.select(cfg, key)
        if val not in registry:
            raise ConfigError(f"{key}={val!r}: unknown {registry.what}; known: {', '.join(registry.names())}")

    def positive(key: str, allow_none: bool = False):
        val = OmegaConf.select(cfg, key)
        if val is None and allow_none:
            return
        if not isinstance(val, int) or val <= 0:
            raise ConfigError(f"{key}={val!r} must be a positive integer")

    for key in ("bits", "calib.n", "calib.seqlen", "eval.ppl.seqlen"):
        positive(key)
    for key in ("calib.seqlen", "eval.ppl.seqlen"):  # BOS (or a first token) and one token to predict
        if OmegaConf.select(cfg, key) < 2:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 2 (a context and a token to predict)")
    for key in ("eval.ppl.stride", "eval.ppl.max_windows", "threads", "eval.ppl.batch_size"):
        positive(key, allow_none=True)
    if cfg.eval.ppl.stride is not None and cfg.eval.ppl.stride > cfg.eval.ppl.seqlen:
        raise ConfigError(f"eval.ppl.stride={cfg.eval.ppl.stride} must be <= eval.ppl.seqlen={cfg.eval.ppl.seqlen}")
    if cfg.model.kind in ("llama2c", "hf") and not cfg.model.path:
        raise ConfigError(f"model.path is required for model.kind={cfg.model.kind}")
    if cfg.model.kind == "llama2c" and not cfg.model.tokenizer:
        raise ConfigError("model.tokenizer (the SentencePiece .model file) is required for model.kind=llama2c")
    if cfg.eval.zeroshot.tasks:  # task names and paths checked before any quantization work
        from ttvq_bench.evaluate.zeroshot import check_config

        check_config(cfg)
    for key in ("eval.ppl", "calib"):
        if OmegaConf.select(cfg, f"{key}.bos") and OmegaConf.select(cfg, f"{key}.bos_text"):
            raise ConfigError(f"{key}.bos and {key}.bos_text are both true: BOS per window or once at the text's start")
    if not 0 <= cfg.calib.stream_start < 1:
        raise ConfigError(f"calib.stream_start={cfg.calib.stream_start} must be in [0, 1)")
    for key in ("data.calib_fraction", "calib.corpus.calib_fraction"):
        v = OmegaConf.select(cfg, key)
        if not 0 < v < 1:
            raise ConfigError(f"{key}={v} must be in (0, 1)")
