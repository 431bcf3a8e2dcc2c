"""Every robust rule against a slow NumPy reference (loops, float64), plus invariances and breakdown."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax
from flagjax import aggregators
from flagjax.aggregators.coordinatewise import batcher_network, sorted_rows

# ------------------------------------------------------------------------------ NumPy references


def ref_median(g, f):
    return np.median(g, axis=0)


def ref_trimmed_mean(g, f):
    s = np.sort(g, axis=0)
    return s[f : len(g) - f].mean(0)


def _closest(g, center, k):
    out = np.empty(g.shape[1])
    for j in range(g.shape[1]):
        col = g[:, j]
        out[j] = col[np.argsort(np.abs(col - center[j]), kind="stable")[:k]].mean()
    return out


def ref_meamed(g, f):
    return _closest(g, np.median(g, 0), len(g) - f)


def ref_phocas(g, f):
    return _closest(g, ref_trimmed_mean(g, f), len(g) - f)


def _sqd(g):
    return np.array([[np.sum((a - b) ** 2) for b in g] for a in g])


def _krum_scores(g, f, k=None):
    p = len(g)
    D = _sqd(g)
    k = p - f - 2 if k is None else k
    return np.array([np.sort(np.delete(D[i], i))[:k].sum() for i in range(p)])


def ref_krum(g, f):
    return g[np.argmin(_krum_scores(g, f))]


def ref_multi_krum(g, f):
    return g[np.argsort(_krum_scores(g, f), kind="stable")[: len(g) - f]].mean(0)


def ref_bulyan(g, f):
    p = len(g)
    theta, beta = p - 2 * f, p - 4 * f
    remaining = list(range(p))
    chosen = []
    for _ in range(theta):
        sub = g[remaining]
        k = max(1, len(remaining) - f - 2)
        i = remaining[int(np.argmin(_krum_scores(sub, f, k)))]
        chosen.append(i)
        remaining.remove(i)
    sel = g[chosen]
    return _closest(sel, np.median(sel, 0), beta)


def ref_geomed(g, f):
    z = g.mean(0)
    for _ in range(2000):
        w = 1 / np.maximum(np.linalg.norm(g - z, axis=1), 1e-12)
        z_new = (w[:, None] * g).sum(0) / w.sum()
        if np.linalg.norm(z_new - z) < 1e-13 * np.linalg.norm(z_new):
            return z_new
        z = z_new
    return z


def ref_centered_clipping(g, f, tau=100.0, iters=1):
    v = np.zeros(g.shape[1])
    for _ in range(iters):
        diff = g - v
        n = np.linalg.norm(diff, axis=1)
        v = v + (diff * np.minimum(1, tau / n)[:, None]).mean(0)
    return v


def ref_mda(g, f):
    p = len(g)
    D = np.sqrt(_sqd(g))
    best, best_d = None, np.inf
    for s in itertools.combinations(range(p), p - f):
        dm = max(D[i, j] for i in s for j in s)
        if dm < best_d:
            best, best_d = s, dm
    return g[list(best)].mean(0)


def ref_monna(g, f):
    D = _sqd(g)
    return g[np.argsort(D[0], kind="stable")[: len(g) - f]].mean(0)


def ref_smea(g, f):
    p = len(g)
    best, best_v = None, np.inf
    for s in itertools.combinations(range(p), p - f):
        sub = g[list(s)]
        c = sub - sub.mean(0)
        v = np.linalg.eigvalsh(c @ c.T)[-1]
        if v < best_v:
            best, best_v = s, v
    return g[list(best)].mean(0)


def ref_normalized_mean(g, f):
    p = len(g)
    x = g / np.linalg.norm(g, axis=1, keepdims=True)
    return x.sum(0) / aggregators.default_rank(p)


REFS = {
    "median": ref_median,
    "trimmed_mean": ref_trimmed_mean,
    "meamed": ref_meamed,
    "phocas": ref_phocas,
    "krum": ref_krum,
    "multi_krum": ref_multi_krum,
    "bulyan": ref_bulyan,
    "geomed": ref_geomed,
    "centered_clipping": ref_centered_clipping,
    "mda": ref_mda,
    "monna": ref_monna,
    "smea": ref_smea,
    "normalized_mean": ref_normalized_mean,
}

SHAPES = [(7, 1, 5), (11, 2, 40), (12, 2, 17), (15, 3, 64)]


def _data(p, d, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=d)[None] + rng.normal(size=(p, d))
    g[-1] *= 7  # one far row so selections are not ties
    return g


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("p,f,d", SHAPES)
def test_rule_matches_reference(x64, name, p, f, d):
    rule = aggregators.get(name)
    if f > rule.max_f(p):
        pytest.skip(f"{name} needs {rule.requirement}")
    g = _data(p, d, seed=p * 31 + d)
    kw = {"tol": 1e-14, "max_iters": 5000, "nu": 1e-12} if name == "geomed" else {}
    out = flagjax.aggregate(name, jnp.asarray(g), f=f, **kw)
    chex.assert_shape(out, (d,))
    chex.assert_type(out, jnp.float64)
    np.testing.assert_allclose(np.asarray(out), REFS[name](g, f), rtol=1e-7, atol=1e-8)


def test_bulyan_reference_runs_on_its_minimum_size(x64):
    g = _data(11, 9, seed=0)  # p = 4f + 3 with f = 2
    np.testing.assert_allclose(flagjax.aggregate("bulyan", g, f=2), ref_bulyan(g, 2), rtol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 15, 16, 17, 33, 60])
def test_sorting_network_sorts(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 50)).astype(np.float32)
    x[:, :5] = np.round(x[:, :5])  # ties
    np.testing.assert_array_equal(np.stack(sorted_rows(jnp.asarray(x))), np.sort(x, axis=0))
    assert all(a < b for a, b in batcher_network(n))


SYMMETRIC = [n for n in aggregators.names() if n not in ("monna", "dnc", "signguard", "krum")]


@pytest.mark.parametrize("name", SYMMETRIC)
def test_permutation_invariance(x64, name):
    rng = np.random.default_rng(1)
    g = _data(11, 30, seed=3)
    perm = rng.permutation(11)
    a = flagjax.aggregate(name, jnp.asarray(g), f=2)
    b = flagjax.aggregate(name, jnp.asarray(g[perm]), f=2)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


TRANSLATION = ["median", "trimmed_mean", "meamed", "phocas", "krum", "multi_krum", "bulyan", "geomed", "mda"]


@pytest.mark.parametrize("name", TRANSLATION)
def test_translation_and_scale_equivariance(x64, name):
    g = _data(11, 30, seed=4)
    t = np.random.default_rng(0).normal(size=30) * 5
    base = np.asarray(flagjax.aggregate(name, jnp.asarray(g), f=2, **({"tol": 1e-13} if name == "geomed" else {})))
    kw = {"tol": 1e-13} if name == "geomed" else {}
    moved = np.asarray(flagjax.aggregate(name, jnp.asarray(g + t), f=2, **kw))
    scaled = np.asarray(flagjax.aggregate(name, jnp.asarray(3.5 * g), f=2, **kw))
    np.testing.assert_allclose(moved, base + t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scaled, 3.5 * base, rtol=1e-6, atol=1e-6)


def _breakdown_stack(p, f, d=50, seed=0):
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=d)[None] + 0.3 * rng.normal(size=(p - f, d))
    byz = np.full((f, d), 1e6)
    return honest, np.concatenate([honest, byz])


@pytest.mark.parametrize("name", [n for n in aggregators.names() if n != "mean"])
def test_bounded_under_huge_byzantine_rows(name):
    """f rows equal to a huge vector (1e6 per coordinate, ~1e5x the honest scale): every rule but the
    mean stays within the honest rows' bounding radius of their mean, R = max_i ||h_i - mean||
    (for the scale-free rules flag / normalized_mean: cosine to the honest mean >= 0.9)."""
    p, f = 15, 3
    honest, g = _breakdown_stack(p, f)
    hm = honest.mean(0)
    R = np.max(np.linalg.norm(honest - hm, axis=1))
    out = np.asarray(flagjax.aggregate(name, jnp.asarray(g, jnp.float32), f=f, key=jax.random.key(0)))
    assert np.all(np.isfinite(out))
    if name in ("flag", "normalized_mean"):
        cos = out @ hm / (np.linalg.norm(out) * np.linalg.norm(hm))
        if name == "normalized_mean":  # each Byzantine row adds a unit vector along 1: bounded, not aligned
            assert cos > 0.5, cos
        else:
            assert cos > 0.9, cos
    elif name == "centered_clipping":
        # one step from zero with tau = 100 moves at most tau * f / p towards the attackers
        assert np.linalg.norm(out - ref_centered_clipping(g, f)) < 1e-2 * np.linalg.norm(out)
        assert np.linalg.norm(out - hm) <= R + 100 * f / p
    else:
        assert np.linalg.norm(out - hm) <= R, (name, np.linalg.norm(out - hm), R)
    mean = np.asarray(flagjax.aggregate("mean", jnp.asarray(g), f=f))
    assert np.linalg.norm(mean - hm) > 1e4


def test_combinatorial_rules_refuse_huge_sizes():
    g = jnp.ones((40, 3))
    for name in ("mda", "smea"):
        with pytest.raises(ValueError, match="max_subsets"):
            flagjax.aggregate(name, g, f=15)


@pytest.mark.parametrize(
    "name,p,f,match",
    [("bulyan", 10, 2, "p >= 4f \\+ 3"), ("krum", 6, 2, "p >= 2f \\+ 3"), ("median", 6, 3, "p > 2f")],
)
def test_requirements_are_checked(name, p, f, match):
    with pytest.raises(ValueError, match=match):
        flagjax.aggregate(name, jnp.ones((p, 3)), f=f)


def test_pre_aggregators_compose(x64):
    g = _data(11, 20, seed=5)
    a = flagjax.aggregate("krum", jnp.asarray(g), f=2, pre=("nnm",))
    b = flagjax.aggregate("nnm+krum", jnp.asarray(g), f=2)
    np.testing.assert_allclose(a, b)
    # NNM reference: each row -> mean of its p - f nearest rows
    D = _sqd(g)
    mixed = np.stack([g[np.argsort(D[i], kind="stable")[:9]].mean(0) for i in range(11)])
    np.testing.assert_allclose(a, ref_krum(mixed, 2), rtol=1e-9)
    c = flagjax.aggregate("flag", jnp.asarray(g), f=2, pre=("nnm",), max_iters=3)
    d = flagjax.aggregate("flag", jnp.asarray(mixed), f=2, max_iters=3)
    np.testing.assert_allclose(c, d, rtol=1e-7, atol=1e-10)
    e = flagjax.aggregate("median", jnp.asarray(g), f=2, pre=(("clip", {"c": 1.0}),))
    clipped = g * np.minimum(1, 1.0 / np.linalg.norm(g, axis=1))[:, None]
    np.testing.assert_allclose(e, np.median(clipped, 0), rtol=1e-9)
    with pytest.raises(KeyError, match="unknown pre-aggregator"):
        flagjax.aggregate("krum", g, f=2, pre=("nope",))


def test_bucketing_and_arc(x64):
    g = _data(10, 6, seed=6)
    out = aggregators.pre.bucketing(jnp.asarray(g), key=jax.random.key(3), s=3)
    chex.assert_shape(out, (4, 6))
    # every row lands in exactly one bucket: the bucket means, weighted by sizes, give the total
    np.testing.assert_allclose(np.asarray(out[:3]).sum(0) * 3 + np.asarray(out[3]), g.sum(0), rtol=1e-9)
    arc = np.asarray(aggregators.pre.arc(jnp.asarray(g), f=2))
    n = np.linalg.norm(g, axis=1)
    k = int(2 * 2 / 10 * 8)
    thr = np.sort(n)[10 - k - 1]
    np.testing.assert_allclose(arc, g * np.minimum(1, thr / n)[:, None], rtol=1e-9)


def test_nonfinite_rows_do_not_break_robust_rules():
    honest, _ = _breakdown_stack(15, 3)
    g = np.concatenate([honest, np.full((1, 50), np.nan), np.full((1, 50), np.inf), np.full((1, 50), -np.inf)])
    for name in aggregators.names():
        if name == "mean":
            continue
        out = np.asarray(flagjax.aggregate(name, jnp.asarray(g, jnp.float32), f=3, key=jax.random.key(0)))
        assert np.all(np.isfinite(out)), name


def test_jit_and_vmap_over_hyperparameters():
    g = jnp.asarray(_data(11, 20, seed=7), jnp.float32)
    taus = jnp.array([0.1, 1.0, 10.0])
    fn = lambda tau: flagjax.aggregate("centered_clipping", g, f=2, tau=tau, iters=3)
    batched = jax.jit(jax.vmap(fn))(taus)
    for i in range(3):
        np.testing.assert_allclose(batched[i], fn(taus[i]), rtol=1e-5, atol=1e-5)
    nus = jnp.array([1e-6, 1e-2])
    fn = lambda nu: flagjax.aggregate("geomed", g, f=2, nu=nu)
    batched = jax.jit(jax.vmap(fn))(nus)
    for i in range(2):
        np.testing.assert_allclose(batched[i], fn(nus[i]), rtol=1e-4, atol=1e-5)


def ref_caf(g, f):
    """CAF with exact eigenvectors (ByzFL's loop, without its one-step power iteration)."""
    n = len(g)
    c = np.ones(n)
    best, mu_best = np.inf, None
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * g).sum(0) / c.sum()
        z = g - mu
        M = np.einsum("p,pi,pj->ij", c, z, z) / c.sum()
        ev, V = np.linalg.eigh(M)
        if ev[-1] < best:
            best, mu_best = ev[-1], mu
        tau = (z @ V[:, -1]) ** 2
        c = c * (1 - tau / tau.max())
    return mu_best


@pytest.mark.parametrize("p,f,d", SHAPES)
def test_caf_matches_reference(x64, p, f, d):
    g = _data(p, d, seed=p + d)
    np.testing.assert_allclose(flagjax.aggregate("caf", jnp.asarray(g), f=f), ref_caf(g, f), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("iters", [1, 2, 3, 6])
def test_centered_clipping_paths_and_center(x64, iters):
    """d-space (iters <= 2) and Gram-space (iters > 2) paths against the reference, with a centre."""
    g = _data(11, 25, seed=iters)
    center = np.random.default_rng(0).normal(size=25)

    def ref(g, tau, iters, v):
        for _ in range(iters):
            diff = g - v
            v = v + (diff * np.minimum(1, tau / np.linalg.norm(diff, axis=1))[:, None]).mean(0)
        return v

    out = flagjax.aggregate("centered_clipping", jnp.asarray(g), f=2, tau=1.5, iters=iters, center=center)
    np.testing.assert_allclose(out, ref(g, 1.5, iters, center), rtol=1e-9, atol=1e-10)
    out0 = flagjax.aggregate("centered_clipping", jnp.asarray(g), f=2, tau=1.5, iters=iters)
    np.testing.assert_allclose(out0, ref(g, 1.5, iters, np.zeros(25)), rtol=1e-9, atol=1e-10)
