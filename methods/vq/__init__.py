"""Shared vector-quantization machinery (k-means, the VQ layer, codebook scope, bit tables).

  kmeans.py      weighted k-means (kmeans++/random init, seeded, chunked) and `nearest`
  layer.py       VQLinear (kind "vq"): codebooks, packed indices, residual/outlier parts, norms
  codebook.py    codebook scope (layer / block / model), vectorising weights, shared fitting
  bits_table.py  bits -> (vector length, codebook size, residual size), per method and scope
  finetune.py    block-wise tuning of centroids and norms, codes fixed
"""
