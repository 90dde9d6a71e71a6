"""Zero-shot accuracy through lm-eval: scoring on answers known in advance, our local task
definitions against lm-eval's built-in ones, explicit BOS, the per-checkpoint cache, the record."""
import bz2
import json
import math
import os
from pathlib import Path

import pytest
import torch

from ttvq_bench.evaluate import zeroshot as Z
from ttvq_bench.evaluate.tasks import loaders
from ttvq_bench.models.base import LoadedModel
from ttvq_bench.models.tokenizers import HFTokenizer
from ttvq_bench.record.cache import Cache

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
DATA = Path(os.environ.get("TTVQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))  # as conftest


# -------------------------------------------------------------------------------------------
# a model whose answers are known: it puts (almost) all probability on one byte, everywhere


def _byte_tokenizer():
    """Pure byte-level BPE without merges: one token per byte, exactly reproducible."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([], trainers.BpeTrainer(vocab_size=259, special_tokens=["<pad>", "<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _rigged_model(hf_tok, favourite: str) -> LoadedModel:
    """A Llama whose every next-token distribution is ~one-hot on `favourite`: the blocks add
    nothing to the residual (o_proj, down_proj = 0), the final norm keeps only dimension 0,
    which every embedding sets to 1, and the head maps dimension 0 to `favourite` alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    fav = hf_tok.convert_tokens_to_ids(favourite)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.01)
        emb[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[fav, 0] = 50.0
    tok = HFTokenizer(hf_tok)
    fp = f"rigged-{favourite}"  # the same for both models on purpose: only the weights differ
    return LoadedModel(model=model, tokenizer=tok, name="rigged", fingerprint=fp, info={})


RIG_TASKS = {
    # multiple choice, the gold choice is the favourite byte: certain to win
    "rig_win": ("multiple_choice", [{"q": "x", "choices": ["a", "b"], "label": 0},
                                    {"q": "yy", "choices": ["b", "a", "c"], "label": 1},
                                    {"q": "z z", "choices": ["c", "b", "a"], "label": 2}]),
    # multiple choice, the gold choice is never the favourite: certain to lose
    "rig_lose": ("multiple_choice", [{"q": "x", "choices": ["a", "b"], "label": 1},
                                     {"q": "yy", "choices": ["b", "a", "c"], "label": 0},
                                     {"q": "z z", "choices": ["c", "b", "a"], "label": 0}]),
    # loglikelihood: acc = the target is the greedy continuation
    "rig_greedy": ("loglikelihood", [{"q": "x", "target": "aaa"}, {"q": "yb", "target": "a"}]),
    "rig_not_greedy": ("loglikelihood", [{"q": "x", "target": "aab"}, {"q": "ya", "target": "b"}]),
}


def _write_rig_tasks(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    docs = {name: rows for name, (_, rows) in RIG_TASKS.items()}
    (folder / "rig_docs.py").write_text(
        "import datasets\n"
        f"DOCS = {docs!r}\n"
        "def load(name=None, **_):\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(DOCS[name])})\n")
    for name, (kind, _) in RIG_TASKS.items():
        body = (f"task: {name}\ncustom_dataset: !function rig_docs.load\ndataset_kwargs: {{name: {name}}}\n"
                f"output_type: {kind}\ntest_split: test\ndoc_to_text: q\nmetadata: {{version: 1.0}}\n")
        if kind == "multiple_choice":
            body += ("doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n"
                     "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
                     "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
        else:
            body += ("doc_to_target: target\ntarget_delimiter: ''\nmetric_list:\n"
                     "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
                     "  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
        (folder / f"{name}.yaml").write_text(body)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rig_tasks")
    _write_rig_tasks(folder)
    hf_tok = _byte_tokenizer()
    return folder, _rigged_model(hf_tok, "a"), _rigged_model(hf_tok, "b")


def _zs_cfg(compose, folder, *more):
    return compose(["logger=none", f"eval.zeroshot.include_path={folder}",
                    f"eval.zeroshot.tasks=[{','.join(RIG_TASKS)}]", "eval.zeroshot.batch_size=4", *more])


def test_scoring_on_known_answers(compose, rig, tmp_path):
    folder, model_a, _ = rig
    res = Z.evaluate_zeroshot(_zs_cfg(compose, folder), model_a, Cache(tmp_path), progress=False)
    t = res["tasks"]
    assert t["rig_win"]["acc"] == 1.0 and t["rig_win"]["acc_norm"] == 1.0
    assert t["rig_lose"]["acc"] == 0.0 and t["rig_lose"]["acc_norm"] == 0.0
    assert t["rig_greedy"]["acc"] == 1.0 and t["rig_not_greedy"]["acc"] == 0.0
    assert t["rig_win"]["n"] == 3 and t["rig_win"]["acc_stderr"] == 0.0
    assert t["rig_greedy"]["perplexity"] < 1.01 < t["rig_not_greedy"]["perplexity"]
    assert res["average"] == pytest.approx(0.5)
    assert res["bos"] is True and res["limit"] is None and res["lm_eval_version"] == "0.4.13"
    assert all(r["source"] == "include_path" and r["cached"] is False for r in t.values())
    assert all(r["metric"] == "acc" for r in t.values())  # none of these computes acc_mutual_info


def test_per_document_outputs_beside_the_result(compose, rig, tmp_path):
    """samples.jsonl per task in its cache entry (path in the record), one line per document
    with the choices' log-likelihoods and the document's metrics; they agree with the task's
    acc, survive the cache, and pair two models document by document."""
    from ttvq_analysis.paired import paired_zeroshot

    folder, model_a, model_b = rig
    cfg, cache = _zs_cfg(compose, folder, "eval.zeroshot.tasks=[rig_win,rig_greedy]"), Cache(tmp_path)
    a = Z.evaluate_zeroshot(cfg, model_a, cache, progress=False)["tasks"]
    rows = [json.loads(line) for line in Path(a["rig_win"]["samples"]).read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [0, 1, 2] and [r["target"] for r in rows] == [0, 1, 2]
    assert [len(r["resps"]) for r in rows] == [2, 3, 3] and all(r["acc"] == 1.0 for r in rows)
    best = [max(range(len(r["resps"])), key=lambda i: r["resps"][i][0]) for r in rows]
    assert best == [0, 1, 2]  # the favourite byte wins, as acc says
    greedy = [json.loads(line) for line in Path(a["rig_greedy"]["samples"]).read_text().splitlines()]
    assert [r["acc"] for r in greedy] == [1.0, 1.0] and all(r["resps"][0][1] is True for r in greedy)
    again = Z.evaluate_zeroshot(cfg, model_a, cache, progress=False)["tasks"]["rig_win"]
    assert again["cached"] is True and again["samples"] == a["rig_win"]["samples"]
    b = Z.evaluate_zeroshot(cfg, model_b, cache, progress=False)["tasks"]
    p = paired_zeroshot(a["rig_win"]["samples"], b["rig_win"]["samples"], "acc")
    assert p["n"] == 3 and p["diff"] == 1.0 and p["a_only"] == 3 and p["b_only"] == 0


def test_cache_is_per_checkpoint(compose, rig, tmp_path):
    """Same tokenizer, config, fingerprint string and tasks; only the weights differ: the
    second model must be evaluated, not served the first one's answers."""
    folder, model_a, model_b = rig
    cfg, cache = _zs_cfg(compose, folder, "eval.zeroshot.tasks=[rig_win,rig_lose]"), Cache(tmp_path)
    a = Z.evaluate_zeroshot(cfg, model_a, cache, progress=False)
    b = Z.evaluate_zeroshot(cfg, model_b, cache, progress=False)
    assert [r["cached"] for r in b["tasks"].values()] == [False, False]
    assert a["tasks"]["rig_win"]["acc"] == 1.0 and b["tasks"]["rig_win"]["acc"] == 0.0
    assert b["tasks"]["rig_lose"]["acc"] == pytest.approx(2 / 3)  # its gold is "b" in docs 0 and 1
    assert a["weights_hash"] != b["weights_hash"]
    again = Z.evaluate_zeroshot(cfg, model_a, cache, progress=False)
    assert [r["cached"] for r in again["tasks"].values()] == [True, True]
    assert {k: r["acc"] for k, r in again["tasks"].items()} == {k: r["acc"] for k, r in a["tasks"].items()}
    # quantizing the weights in place (what a job does) changes the key as well
    with torch.no_grad():
        model_a.model.lm_head.weight[0, 1] += 1e-3
    moved = Z.evaluate_zeroshot(cfg, model_a, cache, progress=False)
    assert not any(r["cached"] for r in moved["tasks"].values())


def test_bos_is_explicit(rig, shared_data):
    _, model_a, _ = rig
    bos = model_a.tokenizer.bos_id
    with_bos = Z.make_lm(model_a, bos=True, batch_size=2)
    without = Z.make_lm(model_a, bos=False, batch_size=2)
    ids = model_a.tokenizer.encode("ab c")
    assert with_bos.tok_encode("ab c") == [bos] + ids and without.tok_encode("ab c") == ids
    assert with_bos.tok_encode("ab c", add_special_tokens=False) == ids
    # llama2.c: the converted tokenizer adds BOS itself when asked; still exactly one
    from ttvq_bench.models.llama2c import load_llama2c

    lm = load_llama2c(shared_data / "stories260K" / "stories260K.bin", shared_data / "stories260K" / "tok512.model")
    text = "Once upon a time, there was a cat."
    assert Z.make_lm(lm, bos=True, batch_size=2).tok_encode(text) == [1] + lm.tokenizer.encode(text)
    assert Z.make_lm(lm, bos=False, batch_size=2).tok_encode(text) == lm.tokenizer.encode(text)


def test_continuation_longer_than_context(rig):
    """lm-eval asserts on a continuation longer than the model's context; ours is scored in
    context-sized pieces. This model's next-token distribution depends on the last token only,
    so the pieces must add up to the unsplit log-likelihood."""
    from lm_eval.api.instance import Instance

    _, model_a, _ = rig
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=("xy", cont), idx=0)
            for cont in (" aaaaaaaaaaaaaaaaaaaa", " aabaaaaaaaaaaaaaaaaa", " ab")]
    small = Z.make_lm(model_a, bos=True, batch_size=4, max_length=8)
    whole = Z.make_lm(model_a, bos=True, batch_size=4, max_length=64)
    got, ref = small.loglikelihood(reqs), whole.loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in ref] == [False, False, False]  # " " is never greedy
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], rel=1e-5)
    assert small.n_split == 2 and whole.n_split == 0


def test_seeded_subsample():
    a = Z.subsample(1000, 50, 1234, "piqa")
    assert a == sorted(a) and len(set(a)) == 50 and a == Z.subsample(1000, 50, 1234, "piqa")
    assert a != Z.subsample(1000, 50, 1235, "piqa") and a != Z.subsample(1000, 50, 1234, "arc_easy")
    assert Z.subsample(40, 50, 0, "x") is None and Z.subsample(40, None, 0, "x") is None


def test_config_errors(compose):
    from ttvq_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown zero-shot task 'piqaa'"):
        Z.check_config(compose(["eval.zeroshot.tasks=[piqaa]"]))
    with pytest.raises(ConfigError, match="limit"):
        Z.check_config(compose(["eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=0"]))
    Z.check_config(compose(["eval.zeroshot.tasks=[piqa,lm_eval:piqa,default_lastword]"]))


@pytest.mark.slow
def test_builtin_task_is_never_downloaded():
    """lm_eval:<name> reads the HF datasets cache only; without it, one clear line (indexing
    lm-eval's built-in tasks takes 5-20 s, hence slow)."""
    from ttvq_bench.errors import ConfigError, DataError

    with Z._hub_offline(), Z._quiet(False):
        with pytest.raises(ConfigError, match="no built-in task 'piqaa'"):
            Z.build_tasks(["lm_eval:piqaa"], None)
        try:
            task, source = Z.build_tasks(["lm_eval:piqa"], None)["lm_eval:piqa"]
        except DataError as e:
            assert "nothing is downloaded" in str(e) and "\n" not in str(e)
        else:  # this machine's datasets cache has PIQA: then it is lm-eval's own task
            assert source == "lm_eval" and task.config.dataset_path == "baber/piqa"


# -------------------------------------------------------------------------------------------
# our local definitions render what lm-eval's built-in tasks render for the same documents


def _builtin_task(yaml_rel: str, docs: list[dict], split: str, **overrides):
    """lm-eval's built-in task config, verbatim, with its Hub dataset swapped for `docs`."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(LM_EVAL_TASKS / yaml_rel, resolve_func=True)
    for k in ("dataset_path", "dataset_name", "tag"):
        cfg.pop(k, None)
    cfg.update(training_split=None, validation_split=None, test_split=None, **overrides)
    cfg[f"{split}_split"] = split
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    return ConfigurableTask(config=cfg)


def _rendered(task, n: int):
    task.build_all_requests(limit=n, rank=0, world_size=1)
    reqs = sorted((i.doc_id, i.idx, i.request_type, i.args) for i in task.instances)
    docs = list(task.eval_docs)[:n]
    targets = [task.doc_to_target(d) for d in docs]
    c = task.config
    proto = (c.output_type, c.target_delimiter, c.fewshot_delimiter,
             [m["metric"] for m in c.metric_list], [m.get("aggregation") for m in c.metric_list])
    return reqs, targets, proto


def _ours(name: str, task_data: Path):
    with Z._hub_offline(), Z._quiet(False):
        return Z.build_tasks([name], str(task_data))[name][0]


def _assert_same(ours, builtin, n: int):
    r_ours, r_builtin = _rendered(ours, n), _rendered(builtin, n)
    assert len(r_ours[0]) >= n
    assert r_ours == r_builtin


K = 25  # documents compared per task


@pytest.fixture(scope="module")
def small_task_data(tmp_path_factory):
    """The first K items of each local file, in the same layout (a user's own copies)."""
    src = DATA / "mc"
    if not (src / "piqa" / "dev.jsonl").is_file():
        pytest.skip(f"shared task data not found at {src}")
    dst = tmp_path_factory.mktemp("mc")
    for rel in ("piqa/dev.jsonl", "piqa/dev-labels.lst", "winogrande/dev-labels.lst", "lambada/lambada_test.jsonl",
                *(f"arc/ARC-{s}-{p}.jsonl" for s in ("Easy", "Challenge") for p in ("test", "validation"))):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        lines = (src / rel).read_text(encoding="utf-8").splitlines(keepends=True)[:K]
        (dst / rel).write_text("".join(lines), encoding="utf-8")
    wino = json.loads((src / "winogrande/winogrande_1.1_dev.json").read_text(encoding="utf-8"))[:K]
    (dst / "winogrande/winogrande_1.1_dev.json").write_text(json.dumps(wino), encoding="utf-8")
    (dst / "hellaswag").mkdir()
    with bz2.open(src / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        head = [next(f) for _ in range(6 * len(HELLASWAG_VAL_HEAD))]
    with bz2.open(dst / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("".join(head))
    return dst


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_piqa_matches_builtin(small_task_data):
    labels = (small_task_data / "piqa/dev-labels.lst").read_text().split()
    hf = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
          for r, y in zip(_jsonl(small_task_data / "piqa/dev.jsonl"), labels)]
    _assert_same(_ours("piqa", small_task_data), _builtin_task("piqa/piqa.yaml", hf, "validation"), K)


@pytest.mark.parametrize("name,subset", [("arc_easy", "Easy"), ("arc_challenge", "Challenge")])
def test_arc_matches_builtin(small_task_data, name, subset):
    hf = _jsonl(small_task_data / f"arc/ARC-{subset}-test.jsonl")  # ai2_arc's rows are these
    builtin = _builtin_task(f"arc/{name}.yaml", hf, "test")
    ours = _ours(name, small_task_data)
    assert builtin.config.task == ours.config.task == name
    _assert_same(ours, builtin, K)


def test_winogrande_matches_builtin(small_task_data):
    labels = (small_task_data / "winogrande/dev-labels.lst").read_text().split()
    rows = json.loads((small_task_data / "winogrande/winogrande_1.1_dev.json").read_text())
    hf = [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y}
          for r, y in zip(rows, labels)]
    _assert_same(_ours("winogrande", small_task_data), _builtin_task("winogrande/default.yaml", hf, "validation"), K)


def test_lambada_matches_builtin(small_task_data):
    hf = _jsonl(small_task_data / "lambada/lambada_test.jsonl")
    _assert_same(_ours("lambada_openai", small_task_data), _builtin_task("lambada/lambada_openai.yaml", hf, "test"), K)


# The first items of HellaSwag's validation set as the Hugging Face dataset holds them
# (rowanz/hellaswag data/hellaswag_val.jsonl, MIT): the local file begins with the same items.
HELLASWAG_VAL_HEAD = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he", 3, ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."]),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady", 3, ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, with other individuals visible in the background.", "the child and a different man", 2, ["are then shown paddling down a river in a boat while a woman talks.", "are driving the canoe, they go down the river flowing side to side.", "sit in a canoe while the man paddles.", "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."]),
    ("High jump", "A boy is running down a track.", "the boy", 2, ["runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.", "stands on his hands and springs."]),
    ("High jump", "The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat.", "the boy", 1, ["turns his body around on the mat.", "gets up from the mat.", "continues to lift his body over the pole.", "wiggles out of the mat."]),
    ("High jump", "The boy lands on his back on to a red mat. The boy gets up from the mat.", "the boy", 1, ["starts doing spins.", "celebrates by clapping and flexing both arms.", "is dancing on the mat.", "does jump jacks on his stick."]),
    ("Playing harmonica", "A man is standing in front of a camera. He starts playing a harmonica for the camera.", "he", 2, ["begins to play the harmonica with his body while looking at the camera.", "seems to be singing while playing the harmonica.", "rocks back and forth to the music as he goes.", "painted a fence in front of the camera."]),
    ("Sumo", "A cartoon animation video is shown with people wandering around and rockets being shot.", "two men", 0, ["fight robots of evil and ends with a to be continued.", "are then shown in closeups shooting a shot put.", "push a child in a speedboat in the water.", "look in the cameraman's eye and smile."]),
    ("Sharpening knives", "A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he", 1, ["opens a can of oil put oil on the knife, and puts oil on a knife and press it through a can filled with oil then cuts several pieces from the sandwiches.", "takes a small stone from the flowing river and smashes it on another stone.", "uses the knife to shave his leg.", "sand the rocks and tops them by using strong pressure."]),
    ("Sharpening knives", "Then he takes a small stone from the flowing river and smashes it on another stone. He starts to crush the small stone to smaller pieces.", "he", 1, ["cuts the center stone in half and blow it on to make it bigger.", "grind it hard to make the pieces smaller.", "eventually brings it back into view and adds it to the smaller ones to make a small triangular shaped piece.", "starts to party with them and throw the pieces by hand while they celebrate."]),
]
# WikiHow items (tags, empty ctx_b), with one ActivityNet item whose ctx_b has a capital.
HELLASWAG_WIKIHOW = [
    ("Health", "[header] How to cope with suicidal thoughts [title] Put off any plans. [step] Promise yourself that you'll wait 48 hours before doing anything. Remember, thoughts don't have the power to force you to act.", "", 3,
     ["Even when you do, there may be a small image of the future still lurking around your brain. [substeps] For instance, don't tell yourself that you can't make it.", "You're doing something, and no one can force you to act. It's completely natural to feel negative thoughts before you act.", "Do not panic if people talk to you (even if it's about quitting smoking). Have a plan for how you're going to react to a group of people who bring on suicidal thoughts.", "Sometimes extreme pain can distort our perception. Waiting before taking action will give your mind time to clear."]),
    ("Family Life", "[header] How to entertain a toddler [title] Ask the toddler what he or she would like to do. [title] Visit a site like [www.kiddio.org] to find activities.", "", 0,
     ["Try some arts and crafts like washable paints. [substeps] Keep it simple.", "Make sure you get a tablet.", "Go outside.", "Watch a movie."]),
    ("Bathing dog", "A woman washes a dog in a tub. She rinses the soap off.", "the woman and Bob", 2,
     ["dry the dog.", "leave.", "pet the dog.", "sing."]),
]


def _hf_hellaswag(items):
    return [{"activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": f"{ca} {cb}" if cb else ca, "label": str(y),
             "endings": e} for a, ca, cb, y, e in items]


def _klosax(s: str) -> str:
    """The preprocessing that wrote the local file (klosax/hellaswag_text_data extract_hellaswag.cpp)."""
    for a, b in (("[header]", ""), ("[step]", ""), ("[substeps]", ""), (" [title]", ". "), ("[title] ", ""),
                 ("[title].", ""), ("  ", " ")):
        s = s.replace(a, b)
    return s[1:] if s.startswith(" ") else s


def _write_local_hellaswag(folder: Path, docs: list[dict]) -> None:
    (folder / "hellaswag").mkdir(parents=True, exist_ok=True)
    with bz2.open(folder / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(f"{_klosax(d['activity_label'])}: {_klosax(d['ctx'])}\n{d['label']}\n")
            f.write("".join(_klosax(e) + "\n" for e in d["endings"]))


def _hellaswag_builtin(docs):
    return _builtin_task("hellaswag/hellaswag.yaml", docs, "validation")


def test_hellaswag_local_file_matches_builtin(small_task_data):
    """The real local file's first items against the Hugging Face rows they came from."""
    hf = _hf_hellaswag(HELLASWAG_VAL_HEAD)
    _assert_same(_ours("hellaswag", small_task_data), _hellaswag_builtin(hf), len(hf))


def test_hellaswag_wikihow_matches_builtin(tmp_path):
    hf = _hf_hellaswag(HELLASWAG_VAL_HEAD[:2] + HELLASWAG_WIKIHOW)
    _write_local_hellaswag(tmp_path, hf)
    _assert_same(_ours("hellaswag", tmp_path), _hellaswag_builtin(hf), len(hf))


def test_hellaswag_known_loss(tmp_path):
    """What the local file cannot give back: lm-eval strips *before* removing tags, so an
    ending that begins with a tag keeps a leading space there; the local file has none."""
    hf = _hf_hellaswag([("Health", "[header] How to rest [title] Sleep.", "", 0,
                         ["[step] Lie down.", "Run.", "Jump.", "Sing."])])
    _write_local_hellaswag(tmp_path, hf)
    ours = _ours("hellaswag", tmp_path).eval_docs[0]
    builtin = _hellaswag_builtin(hf).eval_docs[0]
    assert ours["query"] == builtin["query"] == "Health: How to rest. Sleep."
    assert builtin["choices"][0] == " Lie down." and ours["choices"][0] == "Lie down."
    assert ours["choices"][1:] == builtin["choices"][1:]


def test_hellaswag_context_split():
    assert loaders.split_hellaswag_context("A man is on a roof. he") == ("A man is on a roof.", "he")
    assert loaders.split_hellaswag_context("How to x. Do y.") == ("How to x. Do y.", "")
    assert loaders.split_hellaswag_context("no sentence end") == ("no sentence end", "")


# -------------------------------------------------------------------------------------------
# the embedded default's own tasks, through a whole job


def test_default_tasks_shape():
    cont, last = loaders.continuation_items(), loaders.lastword_items()
    assert len(cont) > 150 and len(last) > 150
    for it in cont:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["label"] < 4
        assert len(it["context"].split()) == loaders.CONT_CONTEXT_WORDS
    for it in last:
        words = it["text"].split(" ")
        assert words[-1].isalpha() and words[-1] in words[:-1]
    assert cont == loaders.continuation_items()  # deterministic


def test_default_continuation_record(compose, rig, tmp_path):
    folder, model_a, _ = rig
    cfg = compose(["logger=none", "eval.zeroshot.tasks=[default_continuation]", "eval.zeroshot.limit=8"])
    r = Z.evaluate_zeroshot(cfg, model_a, Cache(tmp_path), progress=False)["tasks"]["default_continuation"]
    assert r["n"] == 8 and r["n_total"] > 150 and r["source"] == "default_corpus"
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_mutual_info", "acc_mutual_info_stderr"} <= set(r)
    assert "perplexity" not in r
    # the discriminative metric of this task scores it, in the average too
    res = Z.evaluate_zeroshot(_zs_cfg(compose, folder, "eval.zeroshot.tasks=[default_continuation,rig_lose]",
                                      "eval.zeroshot.limit=8"), model_a, Cache(tmp_path), progress=False)
    cont, other = res["tasks"]["default_continuation"], res["tasks"]["rig_lose"]
    assert cont["metric"] == "acc_mutual_info" and other["metric"] == "acc" and cont["acc_mutual_info"] != cont["acc"]
    assert res["average"] == pytest.approx((cont["acc_mutual_info"] + other["acc"]) / 2)


def test_job_records_zeroshot(tiny_cfg, tmp_path):
    from ttvq_bench.run import run_job

    over = ("method=fp16", "eval.zeroshot.tasks=[default_lastword]", "eval.zeroshot.limit=12",
            "eval.zeroshot.batch_size=8")
    rec = run_job(tiny_cfg(*over), tmp_path / "a")
    zs = rec["zeroshot"]
    r = zs["tasks"]["default_lastword"]
    assert r["n"] == 12 and r["n_total"] > 150 and r["source"] == "default_corpus" and r["cached"] is False
    assert 0 <= r["acc"] <= 1 and math.isfinite(r["acc_stderr"]) and r["perplexity"] > 1 and "acc_norm" not in r
    assert zs["average"] == r["acc"] and zs["limit"] == 12 and zs["bos"] is True
    assert zs["lm_eval_version"] == "0.4.13" and zs["num_fewshot"] == 0
    # forced rerun of the same job: the same weights, so the answers come from the cache
    again = run_job(tiny_cfg(*over, "force=true"), tmp_path / "b")
    assert again["zeroshot"]["tasks"]["default_lastword"]["cached"] is True
    assert again["zeroshot"]["tasks"]["default_lastword"]["acc"] == r["acc"]
