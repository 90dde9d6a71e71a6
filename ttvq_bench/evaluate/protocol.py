"""A job's evaluation: per corpus the perplexity windows (tokenized once), perplexity, KL to the
full-precision model and top-1 agreement on the same windows, then zero-shot accuracy.

The FP side of the KL is taken from the model as loaded, before anything is quantized
(`take_fp_reference`), and cached per (model, corpus windows, storage dtype)."""
from __future__ import annotations

import logging
import math

from ttvq_bench.data.corpora import load_text
from ttvq_bench.data.windows import ppl_windows
from ttvq_bench.device import batch_size_for
from ttvq_bench.errors import ConfigError, QuantizationError
from ttvq_bench.evaluate.kl import cached_fp_reference, kl_to_reference
from ttvq_bench.evaluate.perplexity import perplexity
from ttvq_bench.hashing import hash_tensors
from ttvq_bench.identity import eval_corpora
from ttvq_bench.record.versions import code_hash
from ttvq_methods.model_walk import module_device, on_device

log = logging.getLogger("ttvq")
CONVENTION = "gptq: text tokenized once, windows of seqlen (BOS first if bos), mean NLL of all predicted tokens"


class Evaluation:
    def __init__(self, cfg, lm, cache, load_reference=None, device=None):
        """load_reference(): the full-precision model again (for kernel speed against it).
        device: where the model evaluates (it returns to host memory after)."""
        self.cfg, self.lm, self.cache, self.load_reference, self.device = cfg, lm, cache, load_reference, device
        p = cfg.eval.ppl
        bos = lm.tokenizer.bos_id if p.bos else None
        if (p.bos or p.bos_text) and lm.tokenizer.bos_id is None:
            raise ConfigError("eval.ppl.bos (or bos_text) is true but the tokenizer has no BOS token")
        head = [lm.tokenizer.bos_id] if p.bos_text else []  # GPTQ's llama_eval: BOS once, at the text's start
        self.corpora = {}
        for corpus in eval_corpora(cfg):
            text, source = load_text(corpus, "eval")
            self.corpora[corpus.name] = (ppl_windows(head + lm.tokenizer.encode(text), p.seqlen, p.stride, bos,
                                                     p.max_windows), source)

    def _reference(self, name: str) -> dict:
        windows = self.corpora[name][0]
        ident = {"model": self.lm.fingerprint, "storage": str(self.cfg.model.storage_dtype),
                 "dtype": str(self.cfg.model.dtype), "windows": hash_tensors([("ids", windows.input_ids),
                                                                              ("from", windows.score_from)]),
                 "code": code_hash(("ttvq_bench.evaluate.kl",))}
        return cached_fp_reference(self.lm.model, windows, self._batch_size(windows), self.cfg.eval.kl.topk,
                                   self.cache, ident)

    def _batch_size(self, windows) -> int:
        """eval.ppl.batch_size, or (null) from the free memory of where the model is now."""
        return batch_size_for(self.lm.model, windows.input_ids.shape[1], module_device(self.lm.model),
                              self.cfg.eval.ppl.batch_size, len(windows.input_ids))

    def take_fp_reference(self) -> None:
        """Compute (or find cached) the FP log-probabilities: call before quantizing."""
        if self.cfg.eval.kl.enabled:
            with on_device(self.lm.model, self.device):
                for name in self.corpora:
                    self._reference(name)

    def run(self, record: dict, wb, progress: bool) -> None:
        with on_device(self.lm.model, self.device):
            self._run(record, wb, progress)

    def _run(self, record: dict, wb, progress: bool) -> None:
        cfg, model = self.cfg, self.lm.model
        for name, (windows, source) in self.corpora.items():
            bs = self._batch_size(windows)
            res = perplexity(model, windows, bs, progress, desc=f"ppl[{name}]")
            if not math.isfinite(res["ppl"]):
                raise QuantizationError(f"perplexity on {name} is not finite ({res['ppl']}): the model's outputs overflow")
            p = cfg.eval.ppl
            record["ppl"][name] = res["ppl"]
            record["protocol"][name] = {
                "seqlen": p.seqlen, "stride": p.stride or p.seqlen, "bos": p.bos, "bos_text": p.bos_text,
                "n_tokens": res["n_tokens"],
                "n_windows": res["n_windows"], "max_windows": p.max_windows, "split": "eval", "source": source,
                "batch_size": bs,
                "convention": CONVENTION}
            line = f"ppl[{name}] = {res['ppl']:.4f}  ({res['n_tokens']} tokens)"
            if cfg.eval.kl.enabled:
                k = kl_to_reference(model, windows, bs, self._reference(name))
                record["kl"][name], record["top1"][name] = k["kl"], k["top1"]
                record["protocol"][name]["kl"] = {"exact": k["exact"], "topk": k["topk"],
                                                  "reference": f"the FP model at {cfg.model.storage_dtype}"}
                line += f"  KL {k['kl']:.4g}  top-1 {k['top1']:.4f}"
            wb.log({f"ppl/{name}": res["ppl"], **({f"kl/{name}": record["kl"][name]} if name in record["kl"] else {})})
            log.info(line)
        if cfg.eval.speed.enabled and self.load_reference is not None:
            from ttvq_kernels.speed import measure

            bos = self.lm.tokenizer.bos_id
            reference = self.load_reference().to(module_device(model))
            record["speed"] = measure(model, reference, [bos if bos is not None else 0], cfg.eval.speed.new_tokens)
            d = record["speed"]["decode"]
            log.info("decode %.1f tokens/s, %.2fx the FP model (%s)", d["tokens_per_s"] or 0, d["speedup"] or 0,
                     ", ".join(f"{k}: {n}" for k, n in d["kernels"].items()) or "no quantized layer")
            wb.log({"speed/decode_speedup": d["speedup"]})
        if cfg.eval.zeroshot.tasks:
            from ttvq_bench.evaluate.zeroshot import evaluate_zeroshot

            record["zeroshot"] = evaluate_zeroshot(cfg, self.lm, self.cache, record, progress)
            wb.log({"zeroshot": record["zeroshot"]})
