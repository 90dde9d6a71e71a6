"""TTVQ: trainable vector quantization. Every decoder-block linear starts from a registered VQ
method (`init`); the indices I, a continuous latent weight W and the codebook C are then all
updated, I re-chosen from the trained latent (latent-guided index updates); only C, I and the
scales are kept. Two stages: block-wise distillation, then parameter-efficient fine-tuning
(end-to-end KL). docs/methods/ttvq.md walks through it and gives every choice the paper leaves
open, with the measurements.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
from torch import nn

from ttvq_bench.choices import Choice
from ttvq_bench.errors import ConfigError
from ttvq_methods.base import BlockContext, Method, TeacherRequest, VQMethod, check_ranges, make_config
from ttvq_methods.distill import TrainConfig, distill_block, distill_model, teacher_targets_args, trainable_fraction
from ttvq_methods.model_walk import decoder_layers, layer_name, modules_of, norm_params, run_block, unique_param_count
from ttvq_methods.registry import METHODS
from ttvq_methods.vq.index_updates import IndexUpdates
from ttvq_methods.vq.layer import VQLinear, stored_mode, train_mode

log = logging.getLogger(__name__)


# Closed choices (what each one does: docs/methods/ttvq.md).
class IndexUpdate(Choice):  # gradient: the latent is put back on Ŵ after every update (no memory)
    latent, frozen, gradient = "latent", "frozen", "gradient"


class CodebookMode(Choice):
    trainable, frozen = "trainable", "frozen"


class LatentInit(Choice):  # compensated: the weight the init actually rounded (VQMethod.rounded_weight)
    fp, compensated, quantized = "fp", "compensated", "quantized"


class BlockInput(Choice):  # quantized: outputs of the quantized blocks before; fp: the FP model's
    quantized, fp = "quantized", "fp"


class BlockTarget(Choice):  # model: the FP model's hidden state after the block; block: FP block(student inputs)
    model, block = "model", "block"


class PeftLatentStart(Choice):  # block: the block stage's trained latents; quantized: Ŵ (PV's delta_decay 0)
    block, quantized = "block", "quantized"


class PeftParam(Choice):
    codebook, scale, norm = "codebook", "scale", "norm"


# TTVQ's shape for a VPTQ-family init: one codebook for the whole model, fp16 per-column scales.
_VQ_INIT = {"codebook_scope": "model", "norm": "line", "norm_bias": False, "vector_len": 0, "codebook_size": 0}


@dataclass
class TTVQConfig:
    name: str = "ttvq"
    index_update: IndexUpdate = IndexUpdate.latent
    codebook: CodebookMode = CodebookMode.trainable
    init: str = "vptq"  # any registered VQ method (kmeans, vptq)
    # The init method's own config fields, per init (its dataclass checks them).
    init_args: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {"vptq": dict(_VQ_INIT),
                                                                          "kmeans": dict(_VQ_INIT),
                                                                          "aqlm": {}})  # AQLM's own defaults
    update_period: int = 10  # optimizer steps between index updates
    update_fraction: float = 1.0  # at most this fraction of vectors change per update
    latent_init: LatentInit = LatentInit.fp
    # -- stage 1: block-wise distillation (MSE of block outputs) --------------------------------
    blockwise: bool = True
    block_inputs: BlockInput = BlockInput.quantized
    block_targets: BlockTarget = BlockTarget.model
    block_epochs: int = 10
    block_batch_size: int = 8
    block_norms: bool = True  # the block's RMSNorm weights train too
    lr_latent: float = 2e-3
    lr_codebook: float = 1e-3  # block/layer-scope codebooks (a model-wide one trains in PEFT)
    lr_scale: float = 1e-3
    lr_norm: float = 1e-3
    # -- stage 2: PEFT (end-to-end KL to the FP model), indices fixed ----------------------------
    peft: bool = True
    peft_epochs: int = 10
    peft_batch_size: int = 8
    peft_params: List[PeftParam] = field(default_factory=lambda: [PeftParam.codebook, PeftParam.scale, PeftParam.norm])
    peft_lr_codebook: float = 3e-3
    peft_lr_scale: float = 3e-3
    peft_lr_norm: float = 3e-3
    lora_rank: int = 0  # > 0: LoRA adapters trained in PEFT (stored fp16, counted)
    peft_lr_lora: float = 1e-4
    peft_latent: bool = False  # beyond the paper, not parameter-efficient: latents + indices train end to end
    peft_lr_latent: float = 1e-3
    peft_latent_start: PeftLatentStart = PeftLatentStart.block
    # peft_latent's index updates (0: as in stage 1). PV-tuning's rule is period 1, fraction 0.01:
    # every step, only the vectors that gain most (docs/methods/aqlm.md).
    peft_update_period: int = 0
    peft_update_fraction: float = 0.0
    peft_teacher_topk: int = 0  # 0: the teacher's full distribution when it fits in 2 GB, else its top 128; k: top k
    # -- both stages -------------------------------------------------------------------------------
    synthetic_windows: int = 0  # extra windows sampled from the FP model (data-free KD)
    synthetic_temperature: float = 1.0
    val_fraction: float = 0.1  # held-out calibration windows (keep-best, reported losses)
    min_lr_ratio: float = 0.1  # cosine decay floor
    grad_clip: float = 0.0
    seed: int = 0


@METHODS.register("ttvq")
class TTVQ(Method):
    Config = TTVQConfig

    def __init__(self, cfg: TTVQConfig, bits: int):
        super().__init__(cfg, bits)
        check_ranges(cfg, "ttvq", update_period=">= 1", update_fraction="in (0, 1]", val_fraction="in [0, 1)",
                     peft_update_period=">= 0", peft_teacher_topk=">= 0", peft_update_fraction="in [0, 1)",
                     synthetic_temperature="> 0", block_epochs=">= 0", peft_epochs=">= 0", lora_rank=">= 0",
                     synthetic_windows=">= 0", block_batch_size=">= 1", peft_batch_size=">= 1")
        cls = METHODS.get(cfg.init)
        if not issubclass(cls, VQMethod):
            vq = [n for n, c in METHODS.items() if issubclass(c, VQMethod)]
            raise ConfigError(f"ttvq: method.init={cfg.init!r} is not a VQ method; VQ methods: {', '.join(vq)}")
        icfg = make_config(cls.Config, cfg.init_args.get(cfg.init), f"ttvq: method.init_args.{cfg.init}")
        self.init: VQMethod = cls(icfg, bits)
        self.needs_hessian = self.init.needs_hessian
        self._latents: dict[str, torch.Tensor] = {}  # latent_init=compensated, until the block trains
        self._trained_latents: dict[str, torch.Tensor] = {}  # after the block stage (peft_latent)
        self._n_params = 0
        self._report: dict = {"init": cfg.init, "blocks": {}, "peft": None}

    @property
    def true_sequential(self) -> bool:
        return self.init.true_sequential

    def modules(self) -> tuple[str, ...]:
        return super().modules() + self.init.modules()

    @property
    def needs_block_targets(self) -> bool:
        c = self.cfg
        return c.blockwise and c.block_inputs == "quantized" and c.block_targets == "block"

    def teacher_request(self) -> TeacherRequest:
        c = self.cfg
        return TeacherRequest(model=c.peft, trajectory=c.blockwise and (c.block_inputs == "fp" or c.block_targets == "model"),
                              synthetic_windows=c.synthetic_windows, synthetic_temperature=c.synthetic_temperature,
                              seed=c.seed)

    def prepare(self, model: nn.Module, inputs, teacher) -> None:
        t0 = time.time()
        self._n_params = unique_param_count(model)
        self.init.prepare(model, inputs, teacher)  # resolves the VQ shape from the bits budget
        self._report.update(shape=self.init.shape(), prepare_s=round(time.time() - t0, 3))
        if teacher.synthetic is not None:
            self._report["synthetic"] = {"windows": int(teacher.synthetic.ids.shape[0]),
                                         "temperature": self.cfg.synthetic_temperature}

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module:
        q = self.init.quantize_layer(name, layer, H)
        if self.cfg.latent_init == "compensated" and self.cfg.index_update != "frozen":
            self._latents[name] = self.init.rounded_weight(name, layer.weight.data, H, q)
        return q

    def _train_config(self, epochs: int, batch_size: int) -> TrainConfig:
        c = self.cfg
        return TrainConfig(epochs=epochs, batch_size=batch_size, val_fraction=c.val_fraction,
                           min_lr_ratio=c.min_lr_ratio, grad_clip=c.grad_clip, keep_best=True, seed=c.seed)

    def _index_updates(self, layers: dict[str, VQLinear], active: bool, period: int = 0,
                       fraction: float = 0.0) -> IndexUpdates:
        c = self.cfg
        return IndexUpdates(layers.values(), period or c.update_period, fraction or c.update_fraction,
                            reset_latent=c.index_update == "gradient", active=active)

    # -- stage 1 -----------------------------------------------------------------------------------
    def finetune_block(self, ctx: BlockContext) -> None:
        cfg, b, teacher = self.cfg, ctx.index, ctx.teacher
        if not cfg.blockwise:
            return
        layers = modules_of(ctx.block, VQLinear)
        latents = {}
        if cfg.index_update != "frozen":
            latents = {n: self._latents.pop(layer_name(b, n)) if cfg.latent_init == "compensated" else ctx.fp_weights[n]
                       for n in layers}
        train_mode(layers, latents)
        if cfg.index_update == "gradient" or cfg.latent_init == "quantized":
            for q in layers.values():
                q.reset_latent()
        idx = self._index_updates(layers, active=cfg.index_update != "frozen")
        from_fp = cfg.block_inputs == "fp"
        hidden = teacher.hidden(b) if from_fp else ctx.inputs.hidden
        # The FP block on FP inputs is the FP model's own trajectory.
        tgt = teacher.hidden(b + 1) if (cfg.block_targets == "model" or from_fp) else ctx.targets
        kwargs = ctx.inputs.kwargs_by_bs
        if teacher.synthetic is not None:
            syn = teacher.synthetic
            fp_in, fp_out = syn.fp_hidden(b), syn.fp_hidden(b + 1)
            q_in = syn.student_hidden(b, decoder_layers(ctx.model))
            syn_t = fp_out if (cfg.block_targets == "model" or from_fp) else \
                run_block(decoder_layers(teacher.model)[b], syn.inputs(q_in))
            hidden, tgt = torch.cat([hidden, fp_in if from_fp else q_in]), torch.cat([tgt, syn_t])
            kwargs = {**syn.kwargs_by_bs, **kwargs}
        res = distill_block(ctx.block, hidden, tgt, kwargs, self._block_groups(ctx.block, layers),
                            self._train_config(cfg.block_epochs, cfg.block_batch_size), on_step=idx.hook,
                            desc=f"ttvq block {b}")
        if cfg.peft and cfg.peft_latent:
            self._trained_latents.update({layer_name(b, n): q.latent_weight() for n, q in layers.items()
                                          if q.latent is not None})
        stored_mode(layers.values())
        errs = [q.rel_err(ctx.fp_weights[n]) for n, q in layers.items()]
        self._report["blocks"][b] = rep = {
            **_losses(res, "mse"), "n_trained": res["n_params"], **idx.summary(), "inputs": cfg.block_inputs,
            "targets": cfg.block_targets, "rel_err_mean": sum(errs) / len(errs) if errs else None}
        log.info("ttvq block %d: mse %.4g -> %.4g (val %.4g -> %.4g), %.1f%% of indices changed, %.1fs", b,
                 res["train_before"], res["train_after"], res["val_before"], res["val_after"],
                 100 * rep["final_index_change"], res["seconds"])

    def _block_groups(self, block: nn.Module, layers: dict[str, VQLinear]) -> list[dict]:
        cfg = self.cfg
        latent, codebook, scale = [], [], []
        for q in layers.values():
            # A codebook shared by the whole model serves finished blocks too: frozen here.
            r = q.params_by_role(frozen_scopes=("model",))
            latent += r["latent"]
            scale += r["scale"] + r["outliers"] + r["bias"]
            codebook += r["codebook"] if cfg.codebook == "trainable" else []
        return [{"params": latent, "lr": cfg.lr_latent}, {"params": codebook, "lr": cfg.lr_codebook},
                {"params": scale, "lr": cfg.lr_scale}] + \
               ([{"params": norm_params(block), "lr": cfg.lr_norm}] if cfg.block_norms else [])

    # -- stage 2 -----------------------------------------------------------------------------------
    def finalize(self, model: nn.Module, calib_ids: torch.Tensor, teacher) -> None:
        self.init.finalize(model, calib_ids, teacher)  # re-ties shared codebooks of resumed blocks
        if self.cfg.peft and teacher is not None and teacher.model is not None:
            self._peft(model, calib_ids, teacher)
        if teacher is not None and teacher.model is not None:
            errs = {n: q.rel_err(teacher.weight(n)) for n, q in modules_of(model, VQLinear).items()}
            self._report.update(final_rel_err_mean=sum(errs.values()) / max(len(errs), 1), final_rel_err=errs)
        self._latents, self._trained_latents = {}, {}

    def _peft(self, model: nn.Module, calib_ids: torch.Tensor, teacher) -> None:
        cfg = self.cfg
        layers = modules_of(model, VQLinear)
        latent = cfg.peft_latent and cfg.index_update != "frozen"
        latents = {}
        if latent:
            latents = {n: self._trained_latents.get(n, self._latents.get(n, teacher.weight(n))) for n in layers}
            if any(w is None for w in latents.values()):
                raise ConfigError("ttvq: peft_latent needs every layer's latent (not kept across a resume)")
        train_mode(layers, latents, lora_rank=cfg.lora_rank, seed=cfg.seed)
        if latent and (cfg.index_update == "gradient" or cfg.peft_latent_start == "quantized"):
            for q in layers.values():
                q.reset_latent()
        idx = self._index_updates(layers, active=latent, period=cfg.peft_update_period, fraction=cfg.peft_update_fraction)
        sel = set(cfg.peft_params)
        roles = {k: [] for k in ("codebook", "scale", "lora", "latent")}
        for q in layers.values():
            r = q.params_by_role()
            for k in roles:
                roles[k] += r[k]
        pgs = [{"params": roles["codebook"] if "codebook" in sel and cfg.codebook == "trainable" else [], "lr": cfg.peft_lr_codebook},
               {"params": roles["scale"] if "scale" in sel else [], "lr": cfg.peft_lr_scale},
               {"params": norm_params(model) if "norm" in sel else [], "lr": cfg.peft_lr_norm},
               {"params": roles["lora"], "lr": cfg.peft_lr_lora},  # empty unless lora_rank > 0
               {"params": roles["latent"], "lr": cfg.peft_lr_latent}]  # empty unless peft_latent
        frac = trainable_fraction([p for g in pgs for p in g["params"]], self._n_params)
        ids = calib_ids if teacher.synthetic is None else torch.cat([calib_ids, teacher.synthetic.ids.to(calib_ids.device)])
        res = distill_model(model, ids, pgs, self._train_config(cfg.peft_epochs, cfg.peft_batch_size),
                            teacher=teacher.model, device=teacher.device, desc="ttvq peft", on_step=idx.hook,
                            **teacher_targets_args(cfg.peft_teacher_topk))
        stored_mode(layers.values())
        self._report["peft"] = {
            **_losses(res, "kl"), "trainable_params": frac["trainable"], "total_params": frac["total"],
            "trainable_fraction": frac["fraction"], "params": sorted(sel), "lora_rank": cfg.lora_rank,
            "n_train_windows": res["n_train"], "n_val_windows": res["n_val"], "latent": latent, **idx.summary(),
            "teacher_targets": res["teacher_targets"], "teacher_targets_mb": res["teacher_targets_mb"]}
        log.info("ttvq peft: KL %.4g -> %.4g (val %.4g -> %.4g), %d trainable params (%.3f%%), %.1fs",
                 res["train_before"], res["train_after"], res["val_before"], res["val_after"],
                 frac["trainable"], 100 * frac["fraction"], res["seconds"])

    def report(self) -> dict:
        return self._report


def _losses(res: dict, loss: str) -> dict:
    """The stage's losses before and after, and per epoch (training curves for W&B)."""
    return {f"{loss}_before": res["train_before"], f"{loss}_after": res["train_after"],
            f"val_{loss}_before": res["val_before"], f"val_{loss}_after": res["val_after"],
            **{k: res[k] for k in ("best_epoch", "steps", "seconds", "history")}}
