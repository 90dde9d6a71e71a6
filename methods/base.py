"""The Method contract: everything the block loop and the run may call on a method, declared
here with its default. The run never branches on a method's name and never probes a method
for optional attributes.

A method is a config dataclass (`Config`, typed: closed choices are enums, so Hydra rejects a
bad value while composing) plus a subclass of `Method`, registered by name:

    @METHODS.register("rtn")
    class RTN(Method):
        Config = RTNConfig
        def quantize_layer(self, name, layer, H): ...

The way through one quantization (methods/blockwise.py):
    m = Cls(cfg, bits)                        # resolves its shape from bits; rejects what it cannot do
    teacher = Teacher(model, ..., m.teacher_request())      # before anything changes
    m.prepare(model, inputs, teacher)          # e.g. codebooks shared by many layers
    for each decoder block b:
        for each true-sequential group of its linears (Hessians first if m.needs_hessian):
            layer = m.quantize_layer(full_name, linear, H)  # None: keep the linear
        m.finetune_block(BlockContext(...))    # block-wise training, if the method trains
    m.finalize(model, calib_ids, teacher)      # end-to-end stages
    m.report()                                 # extras for the record
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from ttvq_bench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ttvq_methods.model_walk import BlockInputs
    from ttvq_methods.teacher import Teacher
    from ttvq_methods.vq.layer import VQLinear


@dataclass
class TeacherRequest:
    """What a method needs from the full-precision model (methods/teacher.py)."""

    model: bool = False  # a full-precision copy, kept for end-to-end distillation
    trajectory: bool = False  # the FP hidden states of the calibration windows at every block boundary
    synthetic_windows: int = 0  # extra windows sampled from the FP model itself
    synthetic_temperature: float = 1.0
    seed: int = 0


@dataclass
class BlockContext:
    """What `finetune_block` gets, after the block's linears were quantized."""

    index: int  # block index
    name: str  # "model.layers.<index>"
    block: nn.Module
    model: nn.Module  # the model being quantized (blocks before `index` are finished)
    inputs: "BlockInputs"  # calibration activations entering the block (from the quantized prefix)
    targets: torch.Tensor | None  # the FP block's outputs on `inputs`, when `needs_block_targets`
    fp_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name (in the block) -> FP weight
    teacher: "Teacher | None" = None


class Method:
    name: ClassVar[str] = ""  # set by METHODS.register
    Config: ClassVar[type]
    needs_calibration: ClassVar[bool] = True  # False: no block loop at all (fp16)
    needs_hessian: ClassVar[bool] = False  # layer input Hessians passed to quantize_layer
    supported_bits: ClassVar[tuple[int, ...]] = ()  # empty: any bits in 1..16
    # A method whose result does not depend on `bits` (fp16) names the width it really has;
    # the run records that, so a sweep over bits runs it once (same run_id) instead of N times.
    fixed_bits: ClassVar[int | None] = None
    # quantize_layer's result depends only on the linear's weight, its Hessian and state fixed
    # in `prepare`, so the linears of one group may be quantized on different processes
    # (torchrun) and sent to all; `layer_state_attrs` names the per-layer dicts (keyed by full
    # name) quantize_layer fills, sent along with the layer.
    parallel_layers: ClassVar[bool] = False
    layer_state_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, bits: int):
        if self.supported_bits and bits not in self.supported_bits:
            raise ConfigError(f"method {self.name!r} cannot do bits={bits}; it supports {list(self.supported_bits)}")
        self.cfg = cfg
        self.bits = bits

    # -- what the block loop asks for -----------------------------------------------------------
    @property
    def true_sequential(self) -> bool:
        """Hessians of later linears of a block (o, gate/up, down) are collected after the
        earlier ones are quantized."""
        return True

    @property
    def needs_block_targets(self) -> bool:
        """The FP block's outputs on the block's inputs, computed before it is quantized."""
        return False

    def teacher_request(self) -> TeacherRequest | None:
        return None

    def modules(self) -> tuple[str, ...]:
        """The modules whose code decides this method's result; with what they import, they
        scope the code version in its cache keys and run_ids (record/versions.py)."""
        return (type(self).__module__,)

    # -- hooks, in the order they run -----------------------------------------------------------
    def prepare(self, model: nn.Module, inputs: "BlockInputs", teacher: "Teacher | None") -> None:
        """Before the first block changes (and before a resume loads finished blocks). It must
        not modify `inputs`."""

    def quantize_layer(self, name: str, layer: nn.Linear, H: torch.Tensor | None) -> nn.Module | None:
        """The quantized replacement of `layer` (full name `name`; H its input Hessian when
        `needs_hessian`), or None to keep it."""
        raise NotImplementedError

    def adopt_layer(self, name: str, q: nn.Module, state: dict) -> None:
        """Take in a layer another process quantized (`parallel_layers`): its per-layer state."""
        for attr, value in state.items():
            getattr(self, attr)[name] = value

    def finetune_block(self, ctx: BlockContext) -> None:
        """Block-wise training after the block's linears are quantized."""

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor, teacher: "Teacher | None") -> None:
        """After every block: end-to-end stages, re-tying shared tensors of resumed blocks."""

    def report(self) -> dict:
        """Extras for the record (record["quantize"]["method_report"])."""
        return {}


class VQMethod(Method):
    """A method whose layers are VQLinear. TTVQ starts from any registered VQMethod."""

    def shape(self) -> dict:
        """The VQ shape this method resolved from `bits` (recorded)."""
        return {}

    def rounded_weight(self, name: str, W: torch.Tensor, H: torch.Tensor | None, q: "VQLinear") -> torch.Tensor:
        """The weight whose nearest codewords are q's codes. Nearest-codeword methods round W
        itself; a method with error feedback rounds an updated weight."""
        return W.detach().float()


def make_config(config_cls: type, overrides: dict | None, where: str) -> Any:
    """An instance of the dataclass `config_cls` with `overrides`, type-checked as Hydra would;
    a bad key or value is one ConfigError naming `where`."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(config_cls), overrides or {})
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{where}{'.' + key if key else ''}: {str(e).splitlines()[0]}") from None


_RANGES = {"-1 or >= 1": lambda v: v == -1 or v >= 1, ">= 0": lambda v: v >= 0, ">= 4": lambda v: v >= 4, ">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0,
           "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 100)": lambda v: 0 <= v < 100}


def check_ranges(cfg: Any, where: str, **rules: str) -> None:
    """Range checks that types cannot express: field=rule (a key of _RANGES); the first
    violation is one ConfigError naming the key."""
    for key, rule in rules.items():
        v = getattr(cfg, key)
        if not _RANGES[rule](v):
            raise ConfigError(f"{where}: method.{key}={v} must be {rule}")
