"""Shared vector-quantization machinery (k-means, the VQ layer, codebook scope, bit tables).

  kmeans.py      weighted k-means (kmeans++/random init, seeded, chunked) and `nearest`
  layer.py       VQLinear (kind "vq"): codebooks, packed indices, residual/outlier parts, norms
  codebook.py    codebook scope (layer / block / model), vectorising weights, shared fitting
  budget.py      bits (a bpw budget) -> scope, vector length, codebook sizes, on the model's shapes
  finetune.py    block-wise tuning of centroids and norms, codes fixed
"""
