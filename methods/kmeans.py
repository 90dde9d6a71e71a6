"""Plain VQ: a Hessian-weighted k-means codebook and every vector to its nearest codeword, with
no error feedback (GPTVQ's and VPTQ's ablation baseline, and TTVQ's `init=kmeans`). It is VPTQ
with `second_order` off (docs/methods/kmeans.md)."""
from __future__ import annotations

from dataclasses import dataclass

from ttvq_methods.registry import METHODS
from ttvq_methods.vptq import VPTQ, VPTQConfig


@dataclass
class KMeansVQConfig(VPTQConfig):
    name: str = "kmeans"
    second_order: bool = False


@METHODS.register("kmeans")
class KMeansVQ(VPTQ):
    Config = KMeansVQConfig
