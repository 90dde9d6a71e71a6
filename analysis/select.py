"""Filters on a records DataFrame (--model, --method, --where KEY=VALUE): a field that does not
exist, or a selection that leaves nothing, is one clear ValueError, never an empty table.

Different keys must all match; one key given several times matches any of its values
(`--where sweep=t_fp16 --where 'sweep=cmp_*'`); a text value may use shell wildcards (* ? [])."""
from __future__ import annotations

import fnmatch
import numbers

import numpy as np
import pandas as pd


def field(df: pd.DataFrame, key: str) -> str:
    """The column of a record field: as named (`sweep`, `protocol.c.seqlen`), or under `config.`
    (`method.group_size` -> `config.method.group_size`)."""
    for col in (key, f"config.{key}"):
        if col in df:
            return col
    raise ValueError(f"no such record field {key!r} (nor config.{key})")


def matches(values: pd.Series, want: str) -> pd.Series:
    """Which values equal `want` as written on a command line: `true`/`false` match booleans,
    `2` matches 2 and 2.0, anything else compares as text (shell wildcards allowed)."""
    def one(v) -> bool:
        if isinstance(v, (bool, np.bool_)):
            return want.lower() == str(bool(v)).lower()
        if isinstance(v, numbers.Number):
            try:
                return float(want) == float(v)
            except ValueError:
                return False
        return fnmatch.fnmatchcase(str(v), want)

    return values.map(one).astype(bool)


def select(df: pd.DataFrame, model: str | None = None, method: str | None = None,
           where: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    if not len(df):
        raise ValueError("no ok records (is --results the dir that holds runs.jsonl?)")
    steps = ([f"model={model}"] if model else []) + ([f"method={method}"] if method else []) + list(where)
    wanted: dict[str, list[str]] = {}  # key -> its values, in the order given
    for cond in steps:
        key, eq, val = cond.partition("=")
        if not eq or not key:
            raise ValueError(f"filter {cond!r}: write KEY=VALUE")
        wanted.setdefault(key, []).append(val)
    for key, vals in wanted.items():
        before, col = len(df), df[field(df, key)]
        df = df[np.logical_or.reduce([matches(col, v) for v in vals])]
        if not len(df):
            said = " or ".join(f"{key}={v}" for v in vals)
            raise ValueError(f"no records match {said} (of {before} left by the filters before it)")
    return df
