"""Data: IDX reader and its errors, the Debian data set, TFDS via mock data, shards, samplers, LV maps."""

import gzip

import numpy as np
import pytest

from flagjax import data
from tests.helpers import write_idx_set


def test_idx_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    data.write_idx(tmp_path / "a-idx3-ubyte.gz", imgs)
    data.write_idx(tmp_path / "b-idx1-ubyte", labels)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a-idx3-ubyte.gz"), imgs)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b-idx1-ubyte"), labels)
    f = rng.normal(size=(3, 2)).astype(np.float32)
    data.write_idx(tmp_path / "c", f)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "c"), f)


def test_idx_errors_name_the_file(tmp_path):
    imgs = np.zeros((4, 3, 3), np.uint8)
    data.write_idx(tmp_path / "ok", imgs)
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-5])
    with pytest.raises(data.DataError, match="trunc.*truncated"):
        data.read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(data.DataError, match="magic.*not an IDX file"):
        data.read_idx(tmp_path / "magic")
    (tmp_path / "code").write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(data.DataError, match="unknown IDX type code"):
        data.read_idx(tmp_path / "code")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(data.DataError, match="bad.gz"):
        data.read_idx(tmp_path / "bad.gz")


def test_load_from_data_dir_and_env(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "set")
    ds = data.load_dataset("fashion_mnist", tmp_path / "set")
    assert ds.train_x.shape == (30, 28, 28, 1) and ds.train_x.dtype == np.float32
    assert ds.train_x.max() <= 1 and ds.test_y.shape == (10,)
    monkeypatch.setenv("FLAGJAX_DATA_DIR", str(tmp_path / "set"))
    assert data.load_dataset("mnist").train_x.shape == (30, 28, 28, 1)
    write_idx_set(tmp_path / "bad", mismatch=True)
    with pytest.raises(data.DataError, match="30 images but 31 labels"):
        data.load_dataset("fashion_mnist", tmp_path / "bad")


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    monkeypatch.delenv("FLAGJAX_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion_mnist")


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.exists(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian():
    ds = data.load_dataset("fashion_mnist")
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train_y).tolist() == [6000] * 10


def test_tfds_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("tfds:mnist")
    assert ds.name == "tfds:mnist"
    assert ds.train_x.shape == (12, 28, 28, 1) and ds.train_x.dtype == np.float32
    assert ds.train_y.shape == (12,) and ds.num_classes <= 10


def test_iid_shards_partition():
    labels = np.repeat(np.arange(10), 50)
    shards = data.shard_indices(labels, 7, seed=0)
    allidx = np.concatenate(shards)
    assert sorted(allidx.tolist()) == list(range(500))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_shard_statistics(alpha):
    labels = np.repeat(np.arange(10), 600)
    shards = data.shard_indices(labels, 15, scheme="dirichlet", alpha=alpha, seed=3)
    allidx = np.concatenate(shards)
    assert sorted(allidx.tolist()) == list(range(6000))
    assert all(len(s) > 0 for s in shards)
    # per-worker label distributions: Dirichlet(alpha) has E[sum_c q_c^2] = (alpha + 1) / (10 alpha + 1)
    conc = np.mean([np.sum((np.bincount(labels[s], minlength=10) / len(s)) ** 2) for s in shards])
    expected = (alpha + 1) / (10 * alpha + 1)
    assert abs(conc - expected) < 0.35 * expected + 0.02, (conc, expected)


def test_gamma_shards_partition_and_follow_byzfl():
    """gamma = 0: worker k holds the k-th contiguous part of the label-sorted examples (ByzFL's
    extreme_niid); gamma = 1: an iid split; in between, a fraction gamma of each shard is iid."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 100))
    for gamma in (0.0, 0.33, 1.0):
        shards = data.shard_indices(labels, 10, scheme="gamma", gamma=gamma, seed=1)
        assert sorted(np.concatenate(shards).tolist()) == list(range(1000))
        assert max(map(len, shards)) - min(map(len, shards)) <= 2
    extreme = data.shard_indices(labels, 10, scheme="gamma", gamma=0.0, seed=1)
    by_label = np.lexsort((np.arange(1000), labels))
    for k, s in enumerate(extreme):
        np.testing.assert_array_equal(s, np.sort(by_label[100 * k : 100 * (k + 1)]))
        assert set(labels[s].tolist()) == {k}
    # gamma = 0.33: 33 iid examples per worker, the other 67 a contiguous run of the label-sorted rest
    # (about one label each: a run may straddle two labels, as the rest's label counts are random)
    mixed = data.shard_indices(labels, 10, scheme="gamma", gamma=0.33, seed=1)
    own = [np.mean(labels[s] == np.bincount(labels[s]).argmax()) for s in mixed]
    assert 0.62 <= np.mean(own) <= 0.67 + 0.33 * 0.3 and min(own) >= 0.5, own
    iid = data.shard_indices(labels, 10, scheme="gamma", gamma=1.0, seed=1)
    assert max(np.bincount(labels[s], minlength=10).max() for s in iid) < 30
    with pytest.raises(ValueError, match="gamma must be in"):
        data.shard_indices(labels, 10, scheme="gamma", gamma=1.5)
    with pytest.raises(ValueError, match="scheme must be one of"):
        data.shard_indices(labels, 10, scheme="extreme")


def test_sampler_deterministic_and_epochs():
    shards = [np.arange(0, 10), np.arange(10, 17)]
    s = data.WorkerSampler(shards, 4, seed=5)
    a = np.stack([s.indices(t) for t in range(6)])
    b = np.stack([data.WorkerSampler(shards, 4, seed=5).indices(t) for t in range(6)])
    np.testing.assert_array_equal(a, b)
    w0 = a[:, 0].ravel()[:20]  # two epochs of worker 0: each a permutation of its shard
    assert sorted(w0[:10].tolist()) == list(range(10)) and sorted(w0[10:].tolist()) == list(range(10))
    assert set(a[:, 1].ravel()) <= set(range(10, 17))
    c = data.WorkerSampler(shards, 4, seed=6).indices(0)
    assert not np.array_equal(a[0], c)


def test_lotka_volterra_maps():
    assert data.LV_LEVELS == (0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01)
    ident = np.arange(28 * 28)
    disp = []
    for t in data.LV_LEVELS:
        m = data.lotka_volterra_map(28, 28, t)
        assert m.shape == (784,) and m.min() >= 0 and m.max() <= 784
        src = m[m < 784]
        moved = np.hypot(src // 28 - ident[m < 784] // 28, src % 28 - ident[m < 784] % 28)
        disp.append(moved.mean())
    assert disp[0] < 0.5 and disp[-1] > 2  # documented: ~0.15 px mean at t = 0.001, ~2.3 px at 0.010
    assert all(b >= a - 1e-9 for a, b in zip(disp, disp[1:], strict=False))
    np.testing.assert_array_equal(data.lotka_volterra_map(28, 28, 0.0), ident)
