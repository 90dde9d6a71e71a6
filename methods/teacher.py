"""The full-precision teacher of the methods that train after quantizing.

Built by the block loop before any block changes, from what the method asks for
(`Method.teacher_request()`):
  * `model`: a frozen full-precision copy, for end-to-end distillation (KL to its logits);
  * `hidden(b)`: the FP model's hidden states of the calibration windows entering block b
    (b = n_blocks: after the last block), computed once, all blocks;
  * `synthetic`: extra windows sampled from the FP model itself (seeded; data-free
    distillation as in LLM-QAT), with their FP activations and the student's, each advanced
    block by block as the loop moves on.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ttvq_bench.errors import ConfigError
from ttvq_methods.base import TeacherRequest
from ttvq_methods.model_walk import BlockInputs, capture_inputs, decoder_layers, run_block


@torch.no_grad()
def sample_windows(model: nn.Module, n: int, seqlen: int, bos_id: int, *, temperature: float = 1.0,
                   seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """n windows of seqlen tokens sampled from `model` after BOS, with a KV cache and a seeded
    generator: distillation data that never runs out and needs no text."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        tok = torch.full((b, 1), bos_id, dtype=torch.long, device=dev)
        seq = [tok]
        res = model(input_ids=tok, use_cache=True)
        for _ in range(seqlen - 1):
            p = torch.softmax(res.logits[:, -1].float() / temperature, -1).cpu()
            tok = torch.multinomial(p, 1, generator=g).to(dev)
            seq.append(tok)
            if len(seq) < seqlen:
                res = model(input_ids=tok, past_key_values=res.past_key_values, use_cache=True)
        out.append(torch.cat(seq, 1).cpu())
    model.train(was)
    return torch.cat(out)


class _Walk:
    """Activations of some windows, advanced block by block through a list of blocks."""

    def __init__(self, inputs: BlockInputs):
        self.inputs, self.block = inputs, 0

    def at(self, b: int, layers: nn.ModuleList) -> torch.Tensor:
        if b < self.block:
            raise RuntimeError(f"activations are already past block {b}")
        while self.block < b:
            self.inputs = self.inputs.with_hidden(run_block(layers[self.block], self.inputs))
            self.block += 1
        return self.inputs.hidden


class SyntheticWindows:
    def __init__(self, ids: torch.Tensor, inputs: BlockInputs, fp_layers: nn.ModuleList):
        self.ids = ids
        self.kwargs_by_bs = inputs.kwargs_by_bs
        self._fp_layers = fp_layers
        self._fp, self._student = _Walk(inputs), _Walk(inputs)

    def fp_hidden(self, b: int) -> torch.Tensor:
        """The FP model's hidden states entering block b."""
        return self._fp.at(b, self._fp_layers)

    def student_hidden(self, b: int, layers: nn.ModuleList) -> torch.Tensor:
        """The hidden states entering block b through the student's (quantized) blocks."""
        return self._student.at(b, layers)

    def inputs(self, hidden: torch.Tensor) -> BlockInputs:
        """Activations of these windows as block inputs (their kwargs and batch size)."""
        return self._fp.inputs.with_hidden(hidden)


class Teacher:
    def __init__(self, model: nn.Module, inputs: BlockInputs, request: TeacherRequest,
                 device: torch.device | None = None):
        self.request = request
        self.device = device  # where the block loop runs; the end-to-end stages run there too
        self._hidden: list[torch.Tensor] | None = None
        if request.trajectory:
            hs = [inputs.hidden]
            for block in decoder_layers(model):
                hs.append(run_block(block, inputs.with_hidden(hs[-1])))
            self._hidden = hs
        self.model: nn.Module | None = None
        if request.model or request.synthetic_windows:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.synthetic: SyntheticWindows | None = None
        if request.synthetic_windows:
            bos = getattr(model.config, "bos_token_id", None)
            if bos is None:
                raise ConfigError("synthetic windows need a model with a BOS token")
            ids = sample_windows(model, request.synthetic_windows, inputs.hidden.shape[1], bos,
                                 temperature=request.synthetic_temperature, seed=request.seed)
            self.synthetic = SyntheticWindows(ids, capture_inputs(model, ids, inputs.batch_size),
                                              decoder_layers(self.model))

    def hidden(self, b: int) -> torch.Tensor:
        if self._hidden is None:
            raise RuntimeError("the teacher was built without the FP trajectory (TeacherRequest.trajectory)")
        return self._hidden[b]

    def weight(self, name: str) -> torch.Tensor | None:
        """The FP weight of linear `name` (full name), when the FP copy is kept."""
        if self.model is None:
            return None
        try:
            return self.model.get_submodule(name).weight.detach().float()
        except AttributeError:
            return None
