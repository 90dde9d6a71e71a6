"""Shared vector-quantization machinery (k-means, the VQ layer, codebook scope, bit tables)."""
