"""Fault points for the fault-injection tests (tests/test_faults.py).

With TTVQ_FAULT=<point> in the environment, the process kills itself with SIGKILL the moment
it reaches that point, as the OOM killer or a preempted node would; TTVQ_FAULT_ARGV=<text>
narrows it to processes whose command line contains <text> (one point of a sweep), and
TTVQ_FAULT_RANK=<r> to rank r of a torchrun job (one process of a group dies). Unset, a fault
point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import sys


def fault_point(name: str) -> None:
    if os.environ.get("TTVQ_FAULT") != name:
        return
    only = os.environ.get("TTVQ_FAULT_ARGV")
    if only and only not in " ".join(sys.argv):
        return
    rank = os.environ.get("TTVQ_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    os.kill(os.getpid(), signal.SIGKILL)
