"""lm-eval task definitions shipped with the harness (yaml) and the datasets they read
(`loaders`): the standard zero-shot sets from local files, and the embedded default's own tasks.
`ttvq_bench.evaluate.zeroshot` points lm-eval's TaskManager at this folder."""
