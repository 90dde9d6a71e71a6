"""`model=tiny`: a small Llama the harness trains itself on the embedded default corpus.

Recipe (deterministic from `TinyModelConfig.seed`):
  1. byte-level BPE tokenizer (`tokenizers`, vocab `cfg.vocab_size`, specials <pad> <s> </s>)
     trained in-process on the train split of `ttvq_bench.data.default_corpus`;
  2. the train text tokenized once; training sequences are random windows of `seq_len` tokens
     (seeded `torch.Generator`) with BOS prepended, predicting every window token;
  3. `LlamaForCausalLM` (GQA, tied embeddings) trained with AdamW, linear warmup and cosine
     decay, fp32, under `torch.use_deterministic_algorithms(True)`;
  4. model (safetensors) + tokenizer + `train_log.json` saved as one atomic cache entry.

The default recipe's build ships with the package (EMBEDDED): training it takes minutes on one
CPU thread, more than the README's first command can afford with the install, and fewer steps
cost too much quality (README, "The embedded default"). Other configs train here and are
cached; later runs load the entry in ~0.1 s plus the transformers import. Weights are
bit-identical for the same seed (checked across processes and with 1 vs 2 torch threads); float
reductions could still differ on another CPU or stack, which is why the fingerprint hashes the
loaded weights rather than the key.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ttvq_bench.data.default_corpus import CORPUS_INFO, default_corpus_text
from ttvq_bench.hashing import hash_bytes, hash_obj, hash_tensors
from ttvq_bench.models.base import LoadedModel
from ttvq_bench.models.tokenizers import HFTokenizer
from ttvq_bench.record.cache import Cache

log = logging.getLogger("ttvq")

# Bump whenever the training code, data pipeline or saved layout changes: it is part of the
# cache key, so old entries are simply not found any more.
TINY_RECIPE_VERSION = 1
CACHE_KIND = "tiny_model"
# The default recipe's weights, trained once by `python -m ttvq_bench.models.tiny embed` and
# shipped with the package in fp16 (3.5 MB, `store_half`): the README's first command then
# needs no training, and the default model is the same file on every machine (`embed`
# reproduced it byte for byte on the box that built it; elsewhere float reductions may differ:
# the regression test in tests/test_tiny_model.py retrains it and compares the eval perplexity).
EMBEDDED = Path(__file__).with_name("tiny_default")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


@dataclass
class TinyModelConfig:
    vocab_size: int = 512  # BPE vocabulary asked for, specials included (model vocab = len(tokenizer))
    hidden_size: int = 192  # model width; head_dim = hidden_size // num_heads = 48
    intermediate_size: int = 520  # MLP width: deliberately not a multiple of 32/64/128 (520 = 16*32 + 8)
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA: 2 query heads share each KV head)
    seq_len: int = 256  # model context (= max_position_embeddings): BOS + 255 tokens in, 256 targets
    steps: int = 450  # optimizer steps
    batch_size: int = 8  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 30  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on 2-D weights only (not norms)
    grad_clip: float = 1.0  # global grad-norm clip
    seed: int = 0  # seeds init, window sampling (same seed -> same weights)
    # Load the shipped weights (EMBEDDED) when every field above is the default recipe's; false
    # trains them here like any other config. Not part of what the weights depend on.
    embedded: bool = True


def recipe(cfg: TinyModelConfig) -> dict:
    """What the trained weights depend on besides the software stack and the CPU."""
    fields = {k: v for k, v in asdict(cfg).items() if k != "embedded"}
    return {"cfg": fields, "train_text": hash_bytes(default_corpus_text("train").encode("utf-8")),
            "recipe": TINY_RECIPE_VERSION}


def cache_key(cfg: TinyModelConfig) -> str:
    """Everything the built entry depends on."""
    import tokenizers
    import transformers

    r = recipe(cfg)
    return hash_obj({"cfg": r["cfg"], "train_text": r["train_text"], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "recipe": r["recipe"]})


def embedded_matches(cfg: TinyModelConfig) -> bool:
    """Are the shipped weights what `cfg` would train?"""
    f = EMBEDDED / "recipe.json"
    return f.is_file() and json.loads(f.read_text()) == json.loads(json.dumps(recipe(cfg)))


def load_tiny(cfg: TinyModelConfig, cache: Cache, progress: bool = True) -> LoadedModel:
    """Load the tiny Llama of `cfg`: the shipped weights for the default recipe, else from
    `cache`, training it first when missing (~3 min for the default's size)."""
    if cfg.embedded and embedded_matches(cfg):
        log.info("model tiny: the embedded default weights (%s; trained by this recipe, `python -m "
                 "ttvq_bench.models.tiny embed` rebuilds them)", EMBEDDED)
        return _load_entry(EMBEDDED, source="embedded")
    key = cache_key(cfg)
    if cache.lookup(CACHE_KIND, key) is None:
        log.info("training the tiny model (%d steps; a few minutes on 2 CPU cores, once): it is cached at %s",
                 cfg.steps, cache.path(CACHE_KIND, key))
    path = cache.get_or_create(CACHE_KIND, key, lambda tmp: _build_entry(cfg, tmp, progress))
    return _load_entry(path, source="trained")


# ----------------------------------------------------------------------------------------------
# building


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llama_config(cfg: TinyModelConfig, hf_tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )


def _lr_at(step: int, cfg: TinyModelConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _sample_batch(ids: torch.Tensor, cfg: TinyModelConfig, bos: int, g: torch.Generator) -> torch.Tensor:
    """(batch, seq_len + 1): BOS then seq_len consecutive train tokens from a random offset."""
    starts = torch.randint(0, ids.numel() - cfg.seq_len + 1, (cfg.batch_size,), generator=g)
    win = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
    return torch.cat([torch.full((cfg.batch_size, 1), bos, dtype=ids.dtype), win], dim=1)


def _next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, seq_len: int, bos: int, batch_size: int = 16) -> tuple[float, int, int]:
    """Mean next-token loss over the non-overlapping `seq_len`-token windows of `ids`, each
    preceded by BOS, as in training: the model reads BOS + seq_len - 1 tokens and every window
    token is scored. The tail shorter than a window is dropped.
    Returns (loss, n_windows, n_scored_tokens)."""
    n = seq_len
    n_win = ids.numel() // n
    if n_win == 0:
        raise ValueError(f"eval text too short: {ids.numel()} tokens < {n}")
    rows = ids[: n_win * n].view(n_win, n)
    rows = torch.cat([torch.full((n_win, 1), bos, dtype=ids.dtype), rows], dim=1)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n_win, batch_size):
        x = rows[i : i + batch_size]
        total += _next_token_loss(model, x).item() * x.shape[0] * n
    model.train(was_training)
    return total / (n_win * n), n_win, n_win * n


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied embedding appears once
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_tiny(cfg: TinyModelConfig, progress: bool = True, eval_every: int = 0):
    """Train tokenizer + model in memory. Returns (model, hf_tokenizer, log dict).

    Leaves the global torch RNG state and deterministic-algorithms flag as it found them.
    `eval_every > 0` also records the eval loss every that many steps (for tuning).
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    t0 = time.time()
    train_text = default_corpus_text("train")
    hf_tok = train_tokenizer(train_text, cfg.vocab_size)
    tok = HFTokenizer(hf_tok)
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    eval_ids = torch.tensor(tok.encode(default_corpus_text("eval")), dtype=torch.long)
    if train_ids.numel() <= cfg.seq_len:
        raise ValueError(f"train text too short: {train_ids.numel()} tokens")
    t_tok = time.time() - t0

    det_prev = torch.are_deterministic_algorithms_enabled()
    det_warn_prev = torch.is_deterministic_algorithms_warn_only_enabled()
    log: dict = {}
    with torch.random.fork_rng(devices=[]):
        try:
            torch.use_deterministic_algorithms(True)
            torch.manual_seed(cfg.seed)
            g = torch.Generator().manual_seed(cfg.seed)
            model = LlamaForCausalLM(_llama_config(cfg, hf_tok)).float()
            model.train()
            opt = torch.optim.AdamW(
                _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8
            )
            losses: list[float] = []
            curve: list[dict] = []
            t1, c1 = time.time(), time.process_time()
            bar = tqdm(total=cfg.steps, desc="training tiny model", disable=not progress, file=sys.stderr)
            for step in range(cfg.steps):
                lr = _lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = _sample_batch(train_ids, cfg, hf_tok.bos_token_id, g)
                loss = _next_token_loss(model, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                losses.append(loss.item())
                if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                    recent = sum(losses[-10:]) / len(losses[-10:])
                    bar.set_postfix(loss=f"{recent:.3f}", lr=f"{lr:.1e}", refresh=False)
                    point = {"step": step + 1, "train_loss": round(recent, 4)}
                    if eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
                        point["eval_loss"] = round(eval_loss(model, eval_ids, cfg.seq_len, hf_tok.bos_token_id)[0], 4)
                    curve.append(point)
                bar.update(1)
            bar.close()
            t_train, c_train = time.time() - t1, time.process_time() - c1
        finally:
            torch.use_deterministic_algorithms(det_prev, warn_only=det_warn_prev)
    model.eval()
    ev, n_win, n_tok = eval_loss(model, eval_ids, cfg.seq_len, hf_tok.bos_token_id)
    tail = losses[-max(1, cfg.steps // 20):]
    log = {
        "final_train_loss": sum(tail) / len(tail),  # mean over the last 5% of steps
        "last_step_loss": losses[-1],
        "eval_loss": ev,
        "eval_ppl": math.exp(ev),
        "eval_windows": n_win,
        "eval_tokens": n_tok,
        "train_tokens": int(train_ids.numel()),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(hf_tok),
        "tokenize_time_s": t_tok,
        "train_time_s": t_train,
        "train_cpu_time_s": c_train,  # all threads; ~ threads * wall when the CPU is not shared
        "wall_time_s": time.time() - t0,
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
        "config": asdict(cfg),
        "recipe_version": TINY_RECIPE_VERSION,
        "corpus": CORPUS_INFO,
        "versions": _versions(),
    }
    return model, hf_tok, log


def _versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _build_entry(cfg: TinyModelConfig, out: Path, progress: bool) -> None:
    model, hf_tok, log = train_tiny(cfg, progress=progress)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


# ----------------------------------------------------------------------------------------------
# loading


def _load_entry(path: Path, source: str) -> LoadedModel:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval()
    tok = HFTokenizer(PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True))
    log = json.loads((path / "train_log.json").read_text())
    fingerprint = hash_obj(
        {
            "weights": hash_tensors(sorted(model.state_dict().items())),
            "arch": {k: v for k, v in model.config.to_dict().items() if k in _ARCH_KEYS},
            "tokenizer": tok.fingerprint(),
        }
    )
    info = {
        "format": "tiny",
        "source": source,  # embedded (the shipped weights) or trained (here, cached)
        "cache_entry": str(path),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_log": {k: v for k, v in log.items() if k != "curve"},
    }
    return LoadedModel(model=model, tokenizer=tok, name="tiny", fingerprint=fingerprint, info=info)


_ARCH_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
)


def store_half(path: Path) -> None:
    """Rewrite an entry's weights in fp16, the harness's default `model.storage_dtype`: every
    job with that default rounds the loaded weights to it anyway, so the shipped file (half the
    size) gives those jobs the very same model."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.half().save_pretrained(path, safe_serialization=True)


def embed(progress: bool = True) -> Path:
    """Train the default recipe and write it to EMBEDDED (what the package ships)."""
    import shutil
    import tempfile

    cfg = TinyModelConfig()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "entry"
        out.mkdir()
        _build_entry(cfg, out, progress)
        store_half(out)
        (out / "recipe.json").write_text(json.dumps(recipe(cfg), indent=1))
        shutil.rmtree(EMBEDDED, ignore_errors=True)
        shutil.copytree(out, EMBEDDED)
    return EMBEDDED


if __name__ == "__main__":
    if sys.argv[1:] != ["embed"]:
        sys.exit("usage: python -m ttvq_bench.models.tiny embed   (retrain the default recipe into the package)")
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)  # as the README's figures (the weights are the same with 2)
    print(embed())
