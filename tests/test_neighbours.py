"""The matrix-product neighbour search against scikit-learn's brute NearestNeighbors (the reference)."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from dgmood.data.datasets import load_images
from dgmood.statistics.knn import to_uint8
from dgmood.statistics.neighbours import kneighbors


@pytest.fixture(scope="module")
def images(data_dir):
    x = load_images("fashion-mnist[:3000]", data_dir)
    return to_uint8(x[:2500]), x[2500:].reshape(500, -1)


def _reference(bank, queries, k):
    ref = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank)
    return ref.kneighbors(queries)


@pytest.mark.parametrize("chunk,bank_chunk", [(512, 16384), (37, 300)])
def test_distances_and_indices_match_sklearn_on_real_images(images, chunk, bank_chunk):
    bank, queries = images
    d, i = kneighbors(bank, queries, 5, chunk=chunk, bank_chunk=bank_chunk)
    ref_d, ref_i = _reference(bank.astype(np.float32) / 255.0, queries, 5)
    assert d.shape == i.shape == (500, 5)
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-4)
    assert (i == ref_i).mean() > 0.99  # ties between equally near training images may order differently
    assert np.all(np.diff(d, axis=1) >= 0)


def test_leave_one_out_skips_the_query_itself(images):
    bank, _ = images
    rows = bank[:200].astype(np.float32) / 255.0
    d, i = kneighbors(bank, rows, 3, exclude=np.arange(200), bank_chunk=700)
    ref_d, _ = _reference(bank.astype(np.float32) / 255.0, rows, 4)
    assert not np.any(i == np.arange(200)[:, None])
    np.testing.assert_allclose(d, ref_d[:, 1:], rtol=1e-4, atol=1e-4)


def test_float_banks_and_image_shaped_queries(images):
    bank, queries = images
    fbank = bank[:300].astype(np.float32) / 255.0
    d, _ = kneighbors(fbank, queries.reshape(500, 1, 28, 28), 1)
    np.testing.assert_allclose(d, _reference(fbank, queries, 1)[0], rtol=1e-4, atol=1e-4)


def test_bad_sizes_are_one_line_errors(images):
    bank, queries = images
    with pytest.raises(ValueError, match="values each"):
        kneighbors(bank, queries[:, :10], 1)
    with pytest.raises(ValueError, match="at least 6"):
        kneighbors(bank[:5], queries, 5, exclude=np.zeros(500, int))


def test_int8_search_between_8_bit_images_equals_the_fp32_search(images, monkeypatch):
    from dgmood.statistics import neighbours

    bank, queries = images
    off_grid = np.clip(queries + 0.3 / 255.0, 0, 1).astype(np.float32)  # not 8-bit: takes the fp32 search
    monkeypatch.setenv("DGMOOD_KERNELS", "knn=int8")
    levels = lambda b, q: neighbours._search_space(neighbours.prepare(b), q)[1].levels  # noqa: E731
    assert levels(bank, queries) and not levels(bank, off_grid) and not levels(bank.astype(np.float32) / 255, queries)
    d, i = kneighbors(bank, queries, 5, bank_chunk=700)
    np.testing.assert_allclose(kneighbors(bank, off_grid, 5, bank_chunk=700)[0],
                               _reference(bank.astype(np.float32) / 255.0, off_grid, 5)[0], rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("DGMOOD_KERNELS", "knn=fp32")
    assert not levels(bank, queries)
    d32, i32 = kneighbors(bank, queries, 5, bank_chunk=700)
    np.testing.assert_allclose(d, d32, rtol=1e-6)  # exact 8-bit distances against float64 ones from float32 u / 255
    assert (i == i32).mean() > 0.99  # ties between equally near training images may order differently


@pytest.mark.parametrize("exclude", [False, True])
def test_both_kernels_give_the_same_neighbours_on_8_bit_images(monkeypatch, exclude):
    from dgmood.statistics import neighbours

    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, (700, 784), dtype=np.uint8)
    queries = bank[:150].astype(np.float32) / 255.0 if exclude else rng.integers(0, 256, (150, 784)) / 255.0
    skip = np.arange(150) if exclude else None
    found = {}
    for kernel in ("int8", "fp32"):
        monkeypatch.setenv("DGMOOD_KERNELS", f"knn={kernel}")
        prepared = neighbours.prepare(bank)
        assert prepared.levels == (kernel == "int8")
        found[kernel] = kneighbors(prepared, queries, 4, exclude=skip, chunk=64, bank_chunk=300)
        np.testing.assert_array_equal(kneighbors(bank, queries, 4, exclude=skip, chunk=64, bank_chunk=300)[1],
                                      found[kernel][1])  # a prepared bank searches as the array does
    np.testing.assert_allclose(found["int8"][0], found["fp32"][0], rtol=1e-6)
    np.testing.assert_array_equal(found["int8"][1], found["fp32"][1])


def test_level_distances_are_exact_squared_level_distances():
    import torch

    from dgmood.statistics.neighbours import level_distances

    rng = np.random.default_rng(0)
    q, b = rng.integers(0, 256, (7, 784)), rng.integers(0, 256, (11, 784))
    shift = lambda u: torch.as_tensor(u - 128, dtype=torch.int8)  # noqa: E731
    out = level_distances(shift(q), shift(b), torch.as_tensor(((b - 128) ** 2).sum(1), dtype=torch.int32))
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), ((q[:, None, :] - b[None, :, :]) ** 2).sum(2))


def test_the_pixel_knn_searches_its_current_bank_made_ready_once(images):
    from dgmood.statistics.knn import PixelKNN

    bank, queries = images
    stat = PixelKNN(k=3).fit(None, bank[:1000].astype(np.float32) / 255.0)
    first = stat.compute(None, queries[:50])
    assert stat.search_bank() is stat.search_bank()  # made ready once, then reused chunk after chunk
    np.testing.assert_allclose(first, _reference(bank[:1000].astype(np.float32) / 255.0, queries[:50], 3)[0][:, -1],
                               rtol=1e-4, atol=1e-4)
    stat.bank_ = bank[1000:2000]  # a bank assigned since: searched, not the old one
    np.testing.assert_allclose(stat.compute(None, queries[:50]),
                               _reference(bank[1000:2000].astype(np.float32) / 255.0, queries[:50], 3)[0][:, -1],
                               rtol=1e-4, atol=1e-4)

