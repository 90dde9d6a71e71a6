"""Weighted k-means: deterministic from a seed, labels always nearest, weights honoured (per
vector and per entry), chunking invisible, degenerate inputs handled."""
import pytest
import torch

from ttvq_methods.vq import kmeans as km
from ttvq_methods.vq.kmeans import kmeans, nearest

# Small tensors: one thread avoids spin-waiting against other processes on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n=3000, d=4, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 4
    return centers[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)


def brute_nearest(x, C, w=None):
    if w is None or w.dim() == 1:
        return torch.cdist(x.double(), C.double()).argmin(1)
    return ((x[:, None, :] - C[None]) ** 2 * w[:, None, :]).sum(-1).argmin(1)


@pytest.mark.parametrize("init", ["kmeanspp", "random"])
def test_same_seed_same_result(init):
    x, w = blobs(1000), torch.rand(1000, generator=torch.Generator().manual_seed(3))
    a = kmeans(x, 16, w, init=init, seed=7)
    b = kmeans(x, 16, w, init=init, seed=7)
    c = kmeans(x, 16, w, init=init, seed=8)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.centroids, c.centroids)


def test_labels_are_nearest_and_centroids_are_weighted_means():
    x = blobs(800, 3, 6)
    w = torch.rand(800, generator=torch.Generator().manual_seed(1)) + 0.1
    r = kmeans(x, 8, w, iters=500, tol=0.0, seed=0)
    assert torch.equal(r.labels, brute_nearest(x, r.centroids))
    for k in range(8):  # converged Lloyd: each centroid is the weighted mean of its members
        sel = r.labels == k
        if sel.any():
            mean = (w[sel, None] * x[sel]).sum(0) / w[sel].sum()
            assert torch.allclose(r.centroids[k], mean, atol=1e-4)
    assert r.inertia == pytest.approx(float((w * ((x - r.centroids[r.labels]) ** 2).sum(1)).sum()), rel=1e-4)


def test_vector_weights_pull_the_centroid():
    x = torch.tensor([[0.0], [1.0]])
    r = kmeans(x.repeat(3, 1)[:3], 1, torch.tensor([1.0, 3.0, 0.0]), seed=0)  # points 0, 1, 0 (last weightless)
    assert r.centroids[0, 0].item() == pytest.approx(0.75)


def test_per_entry_weights_mask_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    w = torch.ones(500, 4)
    w[::2, 3] = 0  # every other vector's last entry is padding...
    x[::2, 3] = 1000.0  # ...holding garbage that must not matter
    r = kmeans(x, 5, w, iters=300, tol=0.0, seed=1)
    assert r.centroids.abs().max() < 10
    assert torch.equal(r.labels, brute_nearest(x, r.centroids, w))
    assert torch.equal(nearest(x, r.centroids, w), r.labels)


def test_chunking_is_invisible(monkeypatch):
    x, w = blobs(600, 4, 10), torch.rand(600, 4, generator=torch.Generator().manual_seed(2))
    full = kmeans(x, 32, w, iters=15, seed=3)
    monkeypatch.setattr(km, "CHUNK_ELEMS", 32 * 37)  # 37 rows per chunk, not a divisor of 600
    chunked = kmeans(x, 32, w, iters=15, seed=3)
    assert torch.allclose(full.centroids, chunked.centroids, atol=1e-5)
    assert (full.labels != chunked.labels).float().mean() < 1e-3


def test_fewer_distinct_vectors_than_centroids_is_lossless():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0]])
    r = kmeans(x, 8, seed=0)
    assert r.centroids.shape == (8, 2) and r.inertia == 0
    assert torch.equal(r.centroids[r.labels], x)


def test_duplicates_and_empty_clusters():
    # 40 distinct points, most of the mass on one: clusters empty out and must be re-seeded.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(2000, 2), torch.randn(40, 2, generator=g) * 5])
    r = kmeans(x, 24, init="random", seed=0)
    assert torch.isfinite(r.centroids).all()
    assert r.labels.unique().numel() == 24  # every centroid in use
    assert torch.equal(r.labels, brute_nearest(x, r.centroids))


def test_bad_arguments():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError):
        kmeans(x, 2, init="nope")
    with pytest.raises(ValueError):
        kmeans(x, 2, torch.ones(9))
    with pytest.raises(ValueError):
        kmeans(x, 2, -torch.ones(10))
