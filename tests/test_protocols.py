"""Published protocols: `model=hf` and the llama presets use GPTQ's llama_eval convention (the
text tokenized once with one BOS at its start, windows input_ids[:, i*seqlen:(i+1)*seqlen], mean
NLL over the shifted tokens, exp of the mean); checked against GPTQ's own loop on the local
WikiText-2 with stories260K's real tokenizer."""
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")


def test_windows_and_perplexity_equal_gptq_llama_eval(compose, shared_data, tmp_path):
    from ttvq_bench.data.corpora import load_text
    from ttvq_bench.evaluate.protocol import Evaluation
    from ttvq_bench.models import load_model
    from ttvq_bench.record.cache import Cache

    seqlen, limit = 512, 40
    cfg = compose(["model=llama2c", f"paths.data_root={shared_data}", "data=wikitext2_raw", f"eval.ppl.seqlen={seqlen}",
                   "eval.ppl.bos=false", "eval.ppl.bos_text=true", f"eval.ppl.max_windows={limit}",
                   "eval.kl.enabled=false", "eval.speed.enabled=false"])
    lm = load_model(cfg.model, Cache(tmp_path), False)
    record = {"ppl": {}, "protocol": {}, "kl": {}, "top1": {}}
    Evaluation(cfg, lm, Cache(tmp_path)).run(record, type("W", (), {"log": lambda self, _: None})(), False)

    # GPTQ's datautils + llama_eval, written out (the tokenizer adds BOS at the text's start).
    text = load_text(cfg.data, "eval")[0]
    ids = torch.tensor([[lm.tokenizer.bos_id] + lm.tokenizer.encode(text)])
    nsamples = min(ids.numel() // seqlen, limit)
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = lm.model(input_ids=batch).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen)
    ref = math.exp(float(torch.stack(nlls).sum() / (nsamples * seqlen)))

    proto = record["protocol"]["wikitext2_raw"]
    assert proto["n_windows"] == nsamples and proto["n_tokens"] == nsamples * (seqlen - 1) and proto["bos_text"]
    assert record["ppl"]["wikitext2_raw"] == pytest.approx(ref, rel=1e-6)


def test_hf_models_bring_a_papers_protocol(compose):
    cfg = compose(["model=hf", "model.path=/models/x"])
    assert (cfg.eval.ppl.seqlen, cfg.eval.ppl.bos, cfg.eval.ppl.bos_text) == (2048, False, True)
    assert (cfg.calib.seqlen, cfg.calib.sampler, cfg.model.storage_dtype) == (2048, "gptq", "float16")
    exp = compose(["experiment=llama2_wikitext2", "model.path=/models/x"])
    assert (exp.data.kind, exp.calib.corpus.kind, exp.calib.split) == ("wikitext2_raw", "wikitext2_raw", "train")
    tiny = compose([])
    assert (tiny.eval.ppl.seqlen, tiny.eval.ppl.bos) == (256, True)  # the tiny models keep theirs


def test_gptq_sampler_is_gptqs():
    import random

    from ttvq_bench.data.windows import calib_windows

    ids = list(range(10_000))
    w = calib_windows(ids, 4, 100, None, 0, "gptq")
    random.seed(0)
    starts = [random.randint(0, len(ids) - 100 - 1) for _ in range(4)]
    assert w.tolist() == [ids[s : s + 100] for s in starts]
