"""Index updates from a straight-through latent, as a training loop's step hook: every
`period` optimizer steps each VQ layer re-chooses its codes from its latent
(`VQLinear.update_indices`, at most `fraction` of the vectors per update, as PV-tuning's
max_code_change_per_step). TTVQ's latent-guided index updates use it in both stages."""
from __future__ import annotations

from typing import Iterable

from ttvq_methods.vq.layer import VQLinear


class IndexUpdates:
    def __init__(self, layers: Iterable[VQLinear], period: int, fraction: float = 1.0, *,
                 reset_latent: bool = False, active: bool = True):
        """reset_latent: put the latent back on Ŵ after every update (no memory across periods)."""
        self.layers, self.period, self.fraction, self.reset = list(layers), period, fraction, reset_latent
        self.before = [q.int_codes()["codes0"].clone() for q in self.layers]
        self.updates, self.rates = 0, []
        self.hook = self.on_step if active else None  # what the training loop calls, or None

    def on_step(self, step: int) -> None:
        if step % self.period:
            return
        n = changed = 0
        for q in self.layers:
            r = q.update_indices(self.fraction)
            n, changed = n + r["n"], changed + r["changed"]
            if self.reset:
                q.reset_latent()
        self.updates += 1
        self.rates.append(changed / max(n, 1))

    def summary(self) -> dict:
        """Updates made, the share of vectors whose (first) code differs from the start, and
        the mean share changed per update."""
        moved = sum(int((q.int_codes()["codes0"] != c).sum()) for q, c in zip(self.layers, self.before))
        n_vec = sum(c.numel() for c in self.before)
        return {"index_updates": self.updates, "final_index_change": moved / max(n_vec, 1),
                "mean_change_rate": sum(self.rates) / len(self.rates) if self.rates else 0.0,
                "change_rates": list(self.rates)}  # per update: a training curve
