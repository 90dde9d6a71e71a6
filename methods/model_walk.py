"""Everything that knows the shape of a transformers causal LM: where the decoder blocks are,
which linears a block has and in which true-sequential order, their full names, the norms,
capturing the calibration activations that enter the first block, and running one block.
The rest of the package walks models only through these functions.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# Llama/Mistral/Qwen2 names; linears of other architectures fall into one final group.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# What the model passes every block besides the hidden states (rotary embeddings, mask).
BLOCK_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def block_name(b: int) -> str:
    return f"model.layers.{b}"


def layer_name(b: int, name: str) -> str:
    """Full name of linear `name` (relative to its block) of block b."""
    return f"{block_name(b)}.{name}"


def block_of(full_name: str) -> str:
    """The block a full layer name belongs to: "model.layers.3.mlp.up_proj" -> "model.layers.3"."""
    parts = full_name.split(".")
    i = parts.index("layers")
    return ".".join(parts[: i + 2])


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def linear_groups(block: nn.Module, true_sequential: bool) -> list[list[str]]:
    names = list(linears(block))
    if not true_sequential:
        return [names]
    groups = [[n for n in g if n in names] for g in SEQUENTIAL_GROUPS]
    rest = [n for n in names if not any(n in g for g in groups)]
    return [g for g in groups + [rest] if g]


def modules_of(root: nn.Module, kind: type) -> dict[str, nn.Module]:
    """Every submodule of `root` that is a `kind`, by name relative to root."""
    return {n: m for n, m in root.named_modules() if isinstance(m, kind)}


def norm_params(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the RMSNorm/LayerNorm modules inside `module` (by class name: transformers
    names every normalisation class *Norm)."""
    return [p for m in module.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)]


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def module_device(module: nn.Module) -> torch.device:
    t = next(module.parameters(), None)
    t = next(module.buffers(), None) if t is None else t
    return torch.device("cpu") if t is None else t.device


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | None):
    """`module` on `device` for the duration (None: where it is), then back where it was."""
    home = module_device(module)
    if device is None or torch.device(device) == home:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def to_device(obj, device: torch.device):
    """Tensors (also inside tuples and dicts) on `device`; everything else as it is."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def unique_param_count(model: nn.Module) -> int:
    """Parameters of `model`, tied tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class BlockInputs:
    """Calibration activations entering a block, plus the kwargs the model passes every block,
    captured once per batch size."""

    def __init__(self, hidden: torch.Tensor, kwargs_by_bs: dict[int, dict], batch_size: int):
        self.hidden = hidden  # (n, seqlen, hidden) on CPU
        self.kwargs_by_bs = kwargs_by_bs
        self.batch_size = batch_size

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        return BlockInputs(hidden, self.kwargs_by_bs, self.batch_size)

    def batches(self):
        for i in range(0, len(self.hidden), self.batch_size):
            h = self.hidden[i : i + self.batch_size]
            yield i, h, self.kwargs_by_bs[len(h)]


def block_kwargs(kwargs_by_bs: dict[int, dict], n: int) -> dict:
    """The kwargs a block needs for a batch of n windows. They were captured per batch size
    seen; for another size, tensors whose leading dim is that batch size are cut or expanded
    along it (those with leading dim 1 broadcast)."""
    if n in kwargs_by_bs:
        return kwargs_by_bs[n]
    bs, kw = max(kwargs_by_bs.items())

    def fit(v):
        if torch.is_tensor(v) and v.dim() and v.shape[0] == bs and bs > 1:
            return v[:1].expand(n, *v.shape[1:]) if n > bs else v[:n]
        if isinstance(v, tuple):
            return tuple(fit(t) for t in v)
        return v

    return {k: fit(v) for k, v in kw.items()}


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device | None = None) -> BlockInputs:
    """The hidden states entering the first decoder block for windows `ids` (n, seqlen), kept in
    host memory; with `device`, the modules before the blocks (embeddings, rotary) run there."""
    layer0 = decoder_layers(model)[0]
    outer = [m for n, m in model.model.named_children() if n != "layers"]
    with contextlib.ExitStack() as stack:
        for m in outer:
            stack.enter_context(on_device(m, device))
        return _capture(model, layer0, ids, batch_size, device)


def _capture(model, layer0, ids, batch_size, device) -> BlockInputs:
    hidden, kw_by_bs = [], {}

    def hook(_mod, args, kwargs):
        hidden.append(args[0].detach().cpu() if args else kwargs["hidden_states"].detach().cpu())
        kw_by_bs.setdefault(hidden[-1].shape[0], {k: v for k, v in kwargs.items() if k in BLOCK_KWARGS})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(ids), batch_size):
            try:
                batch = ids[i : i + batch_size]
                model(input_ids=batch if device is None else batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(torch.cat(hidden), kw_by_bs, batch_size)


def block_output(y):
    """A decoder block returns its hidden states, or a tuple that starts with them."""
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """The block's outputs on `inputs`, computed where the block is, kept where the inputs are."""
    dev = module_device(block)
    out = torch.empty_like(inputs.hidden)
    for i, h, kw in inputs.batches():
        out[i : i + len(h)] = block_output(block(h.to(dev), **to_device(kw, dev))).to(out.device)
    return out
