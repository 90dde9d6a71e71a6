"""`hydra/launcher=local`: a sweep's points run in parallel on this machine, each in a process of
its own (`python -m ttvq_bench <its overrides>`), `n_jobs` at a time (joblib's thread pool
waits on them). A point that dies (the OOM killer, kill -9) costs only itself: the others
finish, the dead one gets a `failed` record, and the sweep exits non-zero with its summary.
Each process gets its share of the cores (OMP_NUM_THREADS) unless `threads` is set.

With `gpus` (a list of device ids, or "auto" for every GPU torch sees) a node's GPUs are shared
out: at most one job per GPU at a time, each process seeing only its own
(CUDA_VISIBLE_DEVICES), so `device=auto` inside the job is that GPU; n_jobs is then at most
the number of GPUs. The record names the GPU it ran on (record["device"]["visible_gpus"]).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger("ttvq")
FAIL_ENV = "TTVQ_FAILURE_DIR"


class LocalLauncher(Launcher):
    def __init__(self, n_jobs: int = 2, gpus=None, **_ignored) -> None:
        self.gpus = _gpu_ids(gpus)
        self.n_jobs = max(1, int(n_jobs)) if not self.gpus else min(max(1, int(n_jobs)), len(self.gpus))
        self.free_gpus: queue.Queue = queue.Queue()
        for g in self.gpus:
            self.free_gpus.put(g)
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from joblib import Parallel, delayed

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [self._prepare(initial_job_idx + i, list(o), sweep_dir) for i, o in enumerate(job_overrides)]
        log.info("launching %d jobs, %d at a time, each in its own process%s", len(jobs), self.n_jobs,
                 f" on GPUs {','.join(self.gpus)} (one job per GPU)" if self.gpus else "")
        return Parallel(n_jobs=self.n_jobs, backend="threading")(delayed(self._run)(*j) for j in jobs)

    def _prepare(self, idx: int, overrides: list[str], sweep_dir: Path):
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)  # the sweep subdir interpolates hydra.job.num
        out = sweep_dir / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        return idx, overrides, out, cfg

    def _run(self, idx: int, overrides: list[str], out: Path, cfg) -> JobReturn:
        extra = [f"hydra.run.dir={out}", f"hydra.job.name={cfg.hydra.job.name}"]
        if not any(o.startswith("sweep=") for o in overrides):
            extra.append(f"sweep={Path(str(cfg.hydra.sweep.dir)).name}")
        env = dict(os.environ)
        if cfg.get("threads") is None:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.n_jobs)))
        gpu = self.free_gpus.get() if self.gpus else None  # blocks until a GPU is free
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("\t#%d : %s%s", idx, " ".join(filter_overrides(overrides)), f"  (GPU {gpu})" if gpu is not None else "")
        try:
            rc = subprocess.run([sys.executable, "-m", "ttvq_bench", *overrides, *extra], env=env).returncode
        finally:
            if gpu is not None:
                self.free_gpus.put(gpu)
        if rc != 0:
            self._failed(idx, overrides, rc, cfg)
        return JobReturn(overrides=overrides, working_dir=str(out), task_name=cfg.hydra.job.name,
                         status=JobStatus.COMPLETED, _return_value=rc)

    def _failed(self, idx: int, overrides: list[str], rc: int, cfg) -> None:
        if os.environ.get(FAIL_ENV):
            Path(os.environ[FAIL_ENV], f"job{idx}").write_text(str(rc))
        if rc >= 0:
            return  # the job itself said why and wrote its failed record
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        msg = f"killed by {sig}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
        print(f"error: job {idx} ({' '.join(filter_overrides(overrides))}): {msg}", file=sys.stderr)
        from ttvq_bench.record.results import append_run

        append_run(str(OmegaConf.select(cfg, "results_dir")), {
            "run_id": None, "status": "failed", "error": msg, "overrides": list(overrides),
            "sweep": next((o.split("=", 1)[1] for o in overrides if o.startswith("sweep=")),
                          Path(str(cfg.hydra.sweep.dir)).name),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _gpu_ids(gpus) -> list[str]:
    """`gpus`: None (no assignment), "auto" (every GPU torch sees), or a list of ids."""
    if gpus is None:
        return []
    if str(gpus) == "auto":
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    ids = [str(g) for g in ([gpus] if isinstance(gpus, (int, str)) else gpus)]  # a list or Hydra's ListConfig
    if not ids:
        raise ValueError("hydra.launcher.gpus is an empty list: give device ids, \"auto\" or null")
    return ids
