"""Distillation loops shared by the methods that train after quantizing: "train these
parameters of this block (or this model) to match these targets". Method-agnostic: the caller
says which parameters train at which learning rate and may pass an `on_step` hook (TTVQ
re-chooses its indices there); this module knows nothing about quantized layers.

Block-wise (`distill_block`): the student is one decoder block; its inputs are the block
loop's calibration activations (from the already-quantized blocks before it, or the
full-precision model's, as the caller chooses) and the targets are the teacher's outputs on
whatever the caller picked (the block loop gives the full-precision block's outputs on the
same inputs). Loss: the mean squared error of the block outputs. Memory: one block plus its
activations; no gradient ever leaves the block.

End-to-end (`distill_model`): the student is the whole model, on `device` for the stage; the
loss is the KL divergence KL(teacher ‖ student) of the next-token distributions at every
position of the calibration windows. The teacher's log-probabilities are computed once, before
training, block by block on the device (`teacher_logprobs`: the FP teacher and the student are
never on the device together, and the teacher never whole), and kept in host memory: the full
distribution in fp16 when it fits in `max_cache_mb`, otherwise its top `topk` log-probs per
position (for Llama-2-7B, 128 x 2048 windows: 268 GB full, 0.27 GB at k = 128), with the KL
taken over those k tokens plus one bucket for the rest of the vocabulary (the exact KL of the
two distributions coarsened to k + 1 outcomes: a lower bound of the full KL, equal to it when
the teacher's tail is empty).

Both loops: the calibration windows are split once into training and held-out windows
(`val_fraction`, the last windows after a seeded shuffle), Adam on the given parameter groups
(each group may carry its own lr), a cosine decay of every lr to `min_lr_ratio` of its start,
shuffled minibatches each epoch, optional gradient-norm clipping, and the held-out loss
measured before training and after every epoch (the training loss too, unless
`epoch_train_loss` is off); `keep_best` restores the state with the lowest held-out loss (the
state before training included), so a stage never leaves the student worse on held-out data
than it found it. The returned dict reports the losses before
and after (train and held-out), the number of steps and the wall time.

Data-parallel: inside an initialised torch.distributed process group of W > 1 processes
(torchrun, or a test's gloo group), every process runs the same loop on the same state and
each minibatch is split across them (process r takes windows r, r+W, ...); each weights its
loss by its share of the minibatch and the gradients are summed (all_reduce), which is the
single-process minibatch gradient up to the order of the sums. Every process then takes the
same Adam step, so the state stays identical everywhere (hooks such as TTVQ's index updates
see the same parameters). Held-out losses are computed by every process in full.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ttvq_bench.distributed import group
from ttvq_methods.model_walk import (block_kwargs, block_output, capture_inputs, decoder_layers, module_device,
                                    on_device, run_block, to_device)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    val_fraction: float = 0.1  # held-out windows (0: none; keep_best then uses the training loss)
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of each group's lr (1: constant)
    grad_clip: float = 0.0  # max gradient norm (0: off)
    keep_best: bool = True
    # The training loss over every training window after each epoch (history and W&B curves);
    # off: only the held-out loss is measured per epoch (what keep-best needs) and the epoch's
    # mean step loss stands for the training loss in the history; the final training loss is
    # still measured once. On when there is no held-out split (keep-best then needs it).
    epoch_train_loss: bool = True
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    autocast: str | None = None  # bf16 | off; None: the job's setting (`set_autocast`)


_AUTOCAST = "off"  # the job's `autocast`, resolved (ttvq_bench/device.resolve_autocast)


def set_autocast(mode: str) -> None:
    global _AUTOCAST
    _AUTOCAST = mode


def _amp(mode: str | None, device: torch.device):
    """The training forward passes' autocast context: bf16 needs no loss scaling; parameters,
    Adam state and the losses (mse, log-softmax: autocast keeps them fp32) stay fp32."""
    if (mode or _AUTOCAST) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- data helpers ---------------------------------------------------------------------------------
def split_windows(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of n windows into (train, held-out) index tensors; at least one training
    window; held-out may be empty."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    return perm[: n - n_val].sort().values, perm[n - n_val:].sort().values


def _param_list(param_groups: list[dict]) -> list[nn.Parameter]:
    seen, out = set(), []
    for g in param_groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _dedupe_groups(param_groups: list[dict]) -> list[dict]:
    """Drop empty groups and parameters already in an earlier group (a shared codebook listed
    by several layers is one parameter)."""
    seen, out = set(), []
    for g in param_groups:
        ps = []
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                ps.append(p)
        if ps and g.get("lr", 1.0) > 0:
            out.append({**g, "params": ps})
    return out


class _Snapshot:
    """Copies of tensors (parameters and buffers) to restore the best state."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.saved = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for t, s in zip(self.tensors, self.saved):
            t.copy_(s)


# -- the shared loop -------------------------------------------------------------------------------
def _train(module: nn.Module, param_groups: list[dict], n_train: int, step_loss: Callable[[torch.Tensor], torch.Tensor],
           eval_loss: Callable[[], tuple[float, float]], tc: TrainConfig, state: Callable[[], list[torch.Tensor]],
           on_step: Callable[[int], None] | None, on_epoch: Callable[[int], None] | None, desc: str) -> dict:
    groups = _dedupe_groups(param_groups)
    params = _param_list(groups)
    t0 = time.time()
    train0, val0 = eval_loss()
    res = {"train_before": train0, "val_before": val0, "steps": 0, "epochs": 0,
           "n_params": sum(p.numel() for p in params), "history": []}
    if not params or tc.epochs <= 0:
        res.update(train_after=train0, val_after=val0, best_epoch=0, seconds=round(time.time() - t0, 3))
        return res
    # Only the given parameters train: every other parameter of the module is frozen meanwhile.
    trained = {id(p) for p in params}
    others = [p for p in module.parameters() if id(p) not in trained]
    flags = [p.requires_grad for p in params] + [p.requires_grad for p in others]
    for p in params:
        p.requires_grad_(True)
    for p in others:
        p.requires_grad_(False)
    opt = torch.optim.Adam(groups, betas=tc.betas)
    for g in opt.param_groups:
        g["lr0"] = g["lr"]
    steps_per_epoch = math.ceil(n_train / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    use_val = not math.isnan(val0)
    full_train = tc.epoch_train_loss or not use_val

    def crit(tr, va):
        return va if use_val else tr

    def amp_loss(sel):
        with _amp(tc.autocast, params[0].device):
            return step_loss(sel)

    best = crit(train0, val0)
    snap = _Snapshot(state()) if tc.keep_best else None
    best_epoch = 0
    g = torch.Generator().manual_seed(tc.seed)
    step = 0
    try:
        with torch.enable_grad():
            for epoch in range(1, tc.epochs + 1):
                order = torch.randperm(n_train, generator=g)
                tot, cnt = 0.0, 0
                for s in range(0, n_train, tc.batch_size):
                    frac = step / max(total, 1)
                    mult = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
                    for pg in opt.param_groups:
                        pg["lr"] = pg["lr0"] * mult
                    sel = order[s : s + tc.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = _backward(amp_loss, sel, params)
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    opt.step()
                    step += 1
                    tot += float(loss.detach())
                    cnt += 1
                    if on_step is not None:
                        on_step(step)
                if on_epoch is not None:
                    on_epoch(epoch)
                tr, va = eval_loss(full_train)
                if not full_train:
                    tr = tot / max(cnt, 1)
                res["history"].append({"epoch": epoch, "step_loss": tot / max(cnt, 1), "train": tr, "val": va})
                log.info("%s epoch %d: train %.5g  val %.5g", desc, epoch, tr, va)
                if crit(tr, va) < best:
                    best, best_epoch = crit(tr, va), epoch
                    if snap is not None:
                        snap = _Snapshot(state())
    finally:
        for p, f in zip(params + others, flags):
            p.requires_grad_(f)
            p.grad = None
    if snap is not None and best_epoch != tc.epochs:
        snap.restore()
    last_full = best_epoch == tc.epochs and full_train
    tr, va = (res["history"][-1]["train"], res["history"][-1]["val"]) if last_full else eval_loss()
    res.update(train_after=tr, val_after=va, steps=step, epochs=tc.epochs, best_epoch=best_epoch,
               seconds=round(time.time() - t0, 3))
    return res


def _backward(step_loss: Callable[[torch.Tensor], torch.Tensor], sel: torch.Tensor,
              params: list[nn.Parameter]) -> torch.Tensor:
    """Gradients of the mean loss over the minibatch `sel` in every parameter's .grad (one
    process, or this process's share summed over the group); returns the minibatch loss."""
    rank, world = group()
    if world == 1:
        loss = step_loss(sel)
        loss.backward()
        return loss
    import torch.distributed as dist

    mine = sel[rank::world]
    share = mine.numel() / sel.numel()
    loss = step_loss(mine) * share if mine.numel() else sum(p.sum() * 0 for p in params)
    loss.backward()
    # A parameter no process's share reached keeps no gradient (Adam skips it, as it would in
    # one process); the others are summed, every process reducing every one in the same order.
    reached = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)  # NCCL: on the GPU
    dist.all_reduce(reached)
    for p, n in zip(params, reached.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total


def _default_state(module: nn.Module, params: list[nn.Parameter]) -> Callable[[], list[torch.Tensor]]:
    """What keep_best snapshots: the trained parameters and the module's integer buffers (the
    discrete state a hook may change, e.g. VQ indices)."""

    def state():
        ints = [b for b in module.buffers() if not b.is_floating_point()]
        return _param_list([{"params": params}]) + ints

    return state


def _run(block: nn.Module, h: torch.Tensor, kwargs_by_bs: dict) -> torch.Tensor:
    """The block on a batch of host activations, where the block is."""
    dev = module_device(block)
    return block_output(block(h.to(dev), **to_device(block_kwargs(kwargs_by_bs, len(h)), dev)))


# -- block-wise -------------------------------------------------------------------------------------
@torch.no_grad()
def block_mse(block: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, kwargs_by_bs: dict,
              idx: torch.Tensor | None = None, batch_size: int = 8) -> float:
    """Mean squared error of block(hidden[idx]) against targets[idx] (NaN when idx is empty)."""
    idx = torch.arange(len(hidden)) if idx is None else idx
    if idx.numel() == 0:
        return float("nan")
    tot, n = 0.0, 0
    for s in range(0, idx.numel(), batch_size):
        b = idx[s : s + batch_size]
        y = _run(block, hidden[b], kwargs_by_bs)
        tot += float(((y.float() - targets[b].to(y.device).float()) ** 2).sum())
        n += y.numel()
    return tot / n


def distill_block(block: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, kwargs_by_bs: dict,
                  param_groups: list[dict], tc: TrainConfig, *, on_step: Callable[[int], None] | None = None,
                  on_epoch: Callable[[int], None] | None = None, state: Callable[[], list[torch.Tensor]] | None = None,
                  desc: str = "block") -> dict:
    """Train `param_groups` ([{"params": [...], "lr": ...}, ...]) of `block` so that
    block(hidden) matches `targets` (MSE). Returns losses before/after (train and held-out),
    steps, seconds (see the module docstring)."""
    tr_idx, va_idx = split_windows(len(hidden), tc.val_fraction, tc.seed)
    was_training = block.training
    block.train()

    def step_loss(sel):
        b = tr_idx[sel]
        y = _run(block, hidden[b], kwargs_by_bs)
        return F.mse_loss(y.float(), targets[b].to(y.device).float())

    def eval_loss(train: bool = True):
        block.eval()
        try:
            return (block_mse(block, hidden, targets, kwargs_by_bs, tr_idx, tc.batch_size) if train else float("nan"),
                    block_mse(block, hidden, targets, kwargs_by_bs, va_idx, tc.batch_size))
        finally:
            block.train()

    params = _param_list(param_groups)
    try:
        res = _train(block, param_groups, len(tr_idx), step_loss, eval_loss, tc, state or _default_state(block, params),
                     on_step, on_epoch, desc)
    finally:
        block.train(was_training)
    res.update(n_train=int(tr_idx.numel()), n_val=int(va_idx.numel()))
    return res


# -- end-to-end -------------------------------------------------------------------------------------
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


TOPK = 128  # teacher log-probs kept per position when the full distribution does not fit


def teacher_targets_args(topk: int) -> dict:
    """distill_model's arguments for a method's `*_teacher_topk` knob (0: automatic)."""
    return {} if topk == 0 else {"max_cache_mb": 0.0, "topk": topk}


@dataclass
class TeacherTargets:
    """The teacher's next-token log-probs of some windows, in host memory: the full
    distribution (`indices` None) or its top-k per position (`indices`: their token ids)."""

    logprobs: torch.Tensor  # (n, seqlen, vocab) or (n, seqlen, k)
    indices: torch.Tensor | None = None  # (n, seqlen, k) int32

    def __getitem__(self, b) -> "TeacherTargets":
        return TeacherTargets(self.logprobs[b], None if self.indices is None else self.indices[b])

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.logprobs.to(device), None if self.indices is None else self.indices.to(device))

    @property
    def mb(self) -> float:
        return sum(t.numel() * t.element_size() for t in (self.logprobs, self.indices) if t is not None) / 2**20


@torch.no_grad()
def teacher_logprobs(teacher: nn.Module, ids: torch.Tensor, batch_size: int = 8, dtype: torch.dtype = torch.float16,
                     *, device: torch.device | None = None, topk: int = 0) -> TeacherTargets:
    """log softmax of the teacher's logits on every window, computed block by block with each
    block on `device` (None: where the teacher is) and the activations in host memory: the full
    distribution in `dtype`, or with `topk` > 0 the top-k log-probs (fp32) and their token ids."""
    was = teacher.training
    teacher.eval()
    try:
        inputs = capture_inputs(teacher, ids, batch_size, device)
        h = inputs.hidden
        for block in decoder_layers(teacher):
            with on_device(block, device) as blk:
                h = run_block(blk, inputs.with_hidden(h))
        vals, idx = [], []
        with on_device(teacher.model.norm, device) as norm, on_device(teacher.get_output_embeddings(), device) as head:
            dev = module_device(head)
            for i in range(0, len(h), batch_size):
                lp = F.log_softmax(head(norm(h[i : i + batch_size].to(dev))).float(), -1)
                if topk:
                    v, ix = lp.topk(min(topk, lp.shape[-1]), -1)
                    vals.append(v.cpu())
                    idx.append(ix.int().cpu())
                else:
                    vals.append(lp.to(dtype).cpu())
    finally:
        teacher.train(was)
    return TeacherTargets(torch.cat(vals), torch.cat(idx) if topk else None)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends."""
    x = x.clamp_max(-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_loss(student_logits: torch.Tensor, target: "torch.Tensor | TeacherTargets") -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student). Full teacher log-probs (a tensor, or
    TeacherTargets without indices) are renormalised (they may be stored in fp16); top-k ones
    give the KL over the k tokens plus the bucket of the rest of the vocabulary."""
    if isinstance(target, TeacherTargets) and target.indices is None:
        target = target.logprobs
    s = F.log_softmax(student_logits.float(), -1)
    if not isinstance(target, TeacherTargets):
        t = F.log_softmax(target.float(), -1)
        return (t.exp() * (t - s)).sum(-1).mean()
    t = target.logprobs.float()
    s_k = s.gather(-1, target.indices.long())
    p_rest = (-torch.expm1(torch.logsumexp(t, -1))).clamp_min(0)  # the teacher's mass outside its top-k
    s_rest = _log1mexp(torch.logsumexp(s_k, -1)).clamp_min(-80.0)
    kl = (t.exp() * (t - s_k)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * s_rest
    return kl.mean()


def distill_model(student: nn.Module, ids: torch.Tensor, param_groups: list[dict], tc: TrainConfig, *,
                  teacher: nn.Module | None = None, teacher_lp: TeacherTargets | None = None,
                  device: torch.device | None = None, max_cache_mb: float = 2048, topk: int = TOPK,
                  on_step: Callable[[int], None] | None = None, on_epoch: Callable[[int], None] | None = None,
                  state: Callable[[], list[torch.Tensor]] | None = None, desc: str = "e2e") -> dict:
    """Train `param_groups` of `student` to match the teacher's next-token distributions
    (KL) on the calibration windows `ids` (n, seqlen), the student on `device` for the stage
    (None: where it is). Give the teacher module or its precomputed log-probs."""
    tr_idx, va_idx = split_windows(len(ids), tc.val_fraction, tc.seed)
    if teacher_lp is None:
        if teacher is None:
            raise ValueError("distill_model needs a teacher module or teacher log-probs")
        full_mb = ids.numel() * _vocab(teacher, ids) * 2 / 2**20
        teacher_lp = teacher_logprobs(teacher, ids, tc.batch_size, device=device,
                                      topk=0 if full_mb <= max_cache_mb else topk)
    with on_device(student, device):
        dev = module_device(student)

        def step_loss(sel):
            b = tr_idx[sel]
            return kl_loss(_logits(student, ids[b].to(dev)), teacher_lp[b].to(dev))

        @torch.no_grad()
        def mean_kl(idx):
            if idx.numel() == 0:
                return float("nan")
            tot = 0.0
            for s in range(0, idx.numel(), tc.batch_size):
                b = idx[s : s + tc.batch_size]
                tot += float(kl_loss(_logits(student, ids[b].to(dev)), teacher_lp[b].to(dev))) * len(b)
            return tot / idx.numel()

        def eval_loss(train: bool = True):
            student.eval()
            try:
                return mean_kl(tr_idx) if train else float("nan"), mean_kl(va_idx)
            finally:
                student.train()

        params = _param_list(param_groups)
        was_training = student.training
        student.train()
        try:
            res = _train(student, param_groups, len(tr_idx), step_loss, eval_loss, tc,
                         state or _default_state(student, params), on_step, on_epoch, desc)
        finally:
            student.train(was_training)
    res.update(n_train=int(tr_idx.numel()), n_val=int(va_idx.numel()),
               teacher_targets="full" if teacher_lp.indices is None else f"top{teacher_lp.logprobs.shape[-1]}",
               teacher_targets_mb=round(teacher_lp.mb, 1))
    return res


def _vocab(model: nn.Module, ids: torch.Tensor) -> int:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if v:
        return int(v)
    with torch.no_grad():
        return int(_logits(model, ids[:1]).shape[-1])


def trainable_fraction(params: list[nn.Parameter], total: int) -> dict:
    """How many parameters train (unique tensors), against `total` (the caller's reference
    count, e.g. the full-precision model's parameters)."""
    n = sum(p.numel() for p in _param_list([{"params": params}]))
    return {"trainable": n, "total": int(total), "fraction": n / max(int(total), 1)}
