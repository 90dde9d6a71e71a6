"""Datasets for the task yamls next to this file (lm-eval `custom_dataset` functions).

Each function returns a `datasets.DatasetDict` whose rows have the fields of the Hugging Face
dataset that lm-eval's built-in task reads, so the yamls keep lm-eval's prompts, choices,
targets and metrics unchanged; only where the rows come from differs. lm-eval calls them as
`custom_dataset(**metadata, **dataset_kwargs)`; `task_data` (the folder of the local copies,
layout and formats as in the shared data README) arrives through the TaskManager's metadata.

Standard sets (local files -> fields of the built-in task's dataset):
  piqa            piqa/dev.jsonl + dev-labels.lst            -> goal, sol1, sol2, label (int)
  arc_easy/_chal. arc/ARC-{Easy,Challenge}-{test,validation}  -> as is (id, question, choices, answerKey)
  hellaswag       hellaswag/hellaswag_val_full.txt.bz2        -> activity_label, ctx_a, ctx_b, endings, label
  winogrande      winogrande/winogrande_1.1_dev.json + .lst   -> sentence, option1, option2, answer ("1"/"2")
  lambada_openai  lambada/lambada_test.jsonl                  -> text

The embedded default's own tasks are built from the held-out split of the default corpus
(`ttvq_bench.data.default_corpus`), so the default model gets zero-shot numbers with no file at all.
"""
from __future__ import annotations

import bz2
import json
import random
import re
from pathlib import Path

from ttvq_bench.errors import DataError

# The folder under task_data each standard task reads (its files are part of a run's identity).
DATA_DIRS = {"piqa": "piqa", "arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag",
             "winogrande": "winogrande", "lambada_openai": "lambada"}

# -------------------------------------------------------------------------------------------
# standard sets from local files


def _root(task_data) -> Path:
    if not task_data:
        raise DataError("eval.zeroshot.task_data is not set (the folder holding piqa/, arc/, hellaswag/, ...)")
    return Path(str(task_data)).expanduser().resolve()


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: {path} not found (set eval.zeroshot.task_data to the folder of your copies)")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def read_piqa(task_data) -> list[dict]:
    root = _root(task_data) / "piqa"
    rows = _jsonl(_need(root / "dev.jsonl", "piqa"))
    labels = _labels(_need(root / "dev-labels.lst", "piqa labels"))
    if len(rows) != len(labels):
        raise DataError(f"piqa: {len(rows)} items but {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]


def piqa(task_data=None, **_):
    return _dataset({"validation": read_piqa(task_data)})


def read_arc(task_data, subset: str, split: str) -> list[dict]:
    path = _need(_root(task_data) / "arc" / f"{subset}-{split}.jsonl", subset)
    return [{"id": r["id"], "question": r["question"], "choices": {"text": list(r["choices"]["text"]),
             "label": list(r["choices"]["label"])}, "answerKey": r["answerKey"]} for r in _jsonl(path)]


def arc(task_data=None, subset: str = "ARC-Easy", **_):
    splits = {"test": read_arc(task_data, subset, "test")}
    if (_root(task_data) / "arc" / f"{subset}-validation.jsonl").is_file():
        splits["validation"] = read_arc(task_data, subset, "validation")
    return _dataset(splits)


def read_winogrande(task_data) -> list[dict]:
    root = _root(task_data) / "winogrande"
    rows = json.loads(_need(root / "winogrande_1.1_dev.json", "winogrande").read_text(encoding="utf-8"))
    labels = _labels(_need(root / "dev-labels.lst", "winogrande labels"))
    if len(rows) != len(labels):
        raise DataError(f"winogrande: {len(rows)} items but {len(labels)} labels")
    out = []
    for r, y in zip(rows, labels):
        if "correct_option" in r and str(r["correct_option"]) != y:
            raise DataError(f"winogrande: item {r.get('id')} has correct_option {r['correct_option']} but label {y}")
        out.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y})
    return out


def winogrande(task_data=None, **_):
    return _dataset({"validation": read_winogrande(task_data)})


def read_lambada(task_data) -> list[dict]:
    return [{"text": r["text"]} for r in _jsonl(_need(_root(task_data) / "lambada" / "lambada_test.jsonl", "lambada"))]


def lambada_openai(task_data=None, **_):
    return _dataset({"test": read_lambada(task_data)})


# HellaSwag. The local file (klosax/hellaswag_text_data, the one llama.cpp reads) holds, per item,
# P(activity_label) + ": " + P(ctx), the gold index and P(ending) x 4, where P drops the
# [header]/[step]/[substeps] tags, turns " [title]" into ". " and collapses double spaces.
# lm-eval's process_docs (applied by the yaml, unchanged) builds
#   preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
# and preprocess(ending), which removes every [...] and the same tags, so applying it again to
# the P-text gives lm-eval's text back. ctx_b is not stored, so it is recovered here: ActivityNet
# items end in a sentence fragment (ctx_b, e.g. "... on a roof. he"), WikiHow items have an empty
# ctx_b and end in a full sentence. The fragment after the last sentence end is taken as ctx_b
# when the context does not itself end a sentence. What P lost for good: an ending that began
# with a tag (lm-eval strips before removing tags, so it keeps a leading space there).
_SENT_END = re.compile(r"[.!?][\"')\]]*$")
_SENT_BOUNDARY = re.compile(r"[.!?][\"')\]]* ")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) from the stored "ctx_a ctx_b" text (see above)."""
    if not ctx or _SENT_END.search(ctx):
        return ctx, ""
    last = None
    for last in _SENT_BOUNDARY.finditer(ctx):
        pass
    if last is None:  # one fragment and no sentence before it: leave it as it is
        return ctx, ""
    return ctx[: last.end() - 1], ctx[last.end():]


def read_hellaswag(task_data) -> list[dict]:
    path = _need(_root(task_data) / "hellaswag" / "hellaswag_val_full.txt.bz2", "hellaswag")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"hellaswag: {path} has {len(lines)} lines, not 6 per item")
    out = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or not label.isdigit():
            raise DataError(f"hellaswag: item {i // 6} is not 'label: context' + gold index: {head[:60]!r}")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        out.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                    "endings": endings, "label": label})
    return out


def hellaswag(task_data=None, **_):
    return _dataset({"validation": read_hellaswag(task_data)})


# -------------------------------------------------------------------------------------------
# the embedded default's own tasks (held-out split of the default corpus; no file needed)

# Bump when the construction below changes (it is also the yamls' metadata version).
DEFAULT_TASKS_VERSION = 1
CONT_CONTEXT_WORDS = 24  # context of a continuation item
CONT_WORDS = 8  # the continuation to pick
CONT_CHOICES = 4  # the true one + 3 continuations of other passages
LAST_MIN_WORDS, LAST_MAX_WORDS = 24, 64  # passage length of a last-word item
_WORD = re.compile(r"[A-Za-z]{3,}")


def _eval_documents() -> list[list[str]]:
    """The held-out documents, each as its whitespace-separated words (whitespace collapsed:
    a choice never carries a newline or indent that would give it away)."""
    from pydoc_data.topics import topics

    from ttvq_bench.data.default_corpus import default_corpus_keys

    return [topics[k].split() for k in default_corpus_keys("eval")]


def continuation_items() -> list[dict]:
    """Pick the true 8-word continuation of a 24-word passage among 4: it and the continuations
    of 3 other passages (non-overlapping windows of each held-out document; fixed seed)."""
    width = CONT_CONTEXT_WORDS + CONT_WORDS
    passages = [(" ".join(w[i : i + CONT_CONTEXT_WORDS]), " ".join(w[i + CONT_CONTEXT_WORDS : i + width]))
                for w in _eval_documents() for i in range(0, len(w) - width + 1, width)]
    rng = random.Random(0)
    items = []
    for j, (context, true) in enumerate(passages):
        pool = [c for k, (_, c) in enumerate(passages) if k != j and c != true]
        choices = rng.sample(pool, CONT_CHOICES - 1)
        gold = rng.randrange(CONT_CHOICES)
        choices.insert(gold, true)
        items.append({"context": context, "choices": choices, "label": gold})
    return items


def lastword_items() -> list[dict]:
    """LAMBADA-style: a passage whose last word (alphabetic, 3+ letters) also occurs earlier in
    it; predict that word. Passages are consecutive and do not overlap."""
    items = []
    for words in _eval_documents():
        start = 0
        while start + LAST_MIN_WORDS < len(words):
            stop = min(start + LAST_MAX_WORDS, len(words) - 1)
            end = next((e for e in range(start + LAST_MIN_WORDS, stop + 1)
                        if _WORD.fullmatch(words[e]) and words[e] in words[start:e]), None)
            if end is None:
                start = stop + 1
                continue
            items.append({"text": " ".join(words[start : end + 1])})
            start = end + 1
    return items


def default_continuation(**_):
    return _dataset({"test": continuation_items()})


def default_lastword(**_):
    return _dataset({"test": lastword_items()})
