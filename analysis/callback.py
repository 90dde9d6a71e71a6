"""The Hydra callback that prints a sweep's summary table when the sweep ends (conf/config.yaml,
`hydra.callbacks.sweep_summary`): after every `python -m ttvq_bench -m ...`, whichever launcher
ran the points. Kept apart from `summary` so that a single job, which Hydra also hands its
callbacks, imports nothing more (pandas is imported only at the end of a sweep)."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("ttvq")


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        """The records of this sweep (`sweep=`, else the sweep dir's name, as the jobs record
        it) in `results_dir`, and its points skipped for an existing record (their result.json).
        Never raises: a summary must not cost the sweep its exit status."""
        try:
            from ttvq_analysis.summary import sweep_summary

            sweep_dir = Path(str(config.hydra.sweep.dir))
            sweep, results = config.get("sweep") or sweep_dir.name, str(config.results_dir)
            table = sweep_summary(results, sweep, sweep_dir).rstrip()
            print(f"\nsweep {sweep} (records in {results}):\n{table}", flush=True)
        except Exception as e:
            log.warning("no sweep summary: %s: %s", type(e).__name__, e)
