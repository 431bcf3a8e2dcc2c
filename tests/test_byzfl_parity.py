"""Parity with ByzFL (NumPy backend) on the same inputs, for every rule both libraries ship.

These must run in CI (the test extra installs byzfl and a CPU torch), so there is no skip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax
from flagjax.peers import byzfl_module

agg = byzfl_module("aggregators")
pre = byzfl_module("aggregators.preaggregators")


def _stack(p, d, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=d)[None] + spread * rng.normal(size=(p, d))
    g[-2:] += 6.0  # two clear outliers: combinatorial/spectral selections are unambiguous
    return g


def _spiked(p, f, d, seed):
    """Honest rows spread along one direction (+ tiny noise) and f far outliers. ByzFL's CAF/SMEA
    estimate each top eigenvalue with one power iteration from a random vector (its estimate is
    about lambda * |<v0, u1>|, a random fraction of the truth), so only inputs whose contaminated
    subsets have ~1e4x larger spectra make both libraries choose the same workers."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    g = rng.normal(size=d)[None] + 0.3 * rng.normal(size=(p, 1)) * u + 1e-3 * rng.normal(size=(p, d))
    g[-f:] += 50.0 * rng.normal(size=(f, d))
    return g


CASES = [(11, 2, 30), (15, 3, 200)]

# (flagjax rule, flagjax hparams, byzfl constructor): ByzFL conventions made explicit
RULES = {
    "median": ({}, lambda f: agg.Median()),
    "trimmed_mean": ({}, lambda f: agg.TrMean(f=f)),
    "meamed": ({}, lambda f: agg.Meamed(f=f)),
    "krum": ({"neighbours_from": "byzfl"}, lambda f: agg.Krum(f=f)),
    "multi_krum": ({"neighbours_from": "byzfl"}, lambda f: agg.MultiKrum(f=f)),
    "geomed": (
        {"init": "zero", "nu": 0.1, "max_iters": 3, "tol": 0.0},
        lambda f: agg.GeometricMedian(nu=0.1, T=3),
    ),
    "centered_clipping": ({"tau": 5.0, "iters": 3}, lambda f: agg.CenteredClipping(L=3, tau=5.0)),
    "mda": ({}, lambda f: agg.MDA(f=f)),
    "monna": ({}, lambda f: agg.MoNNA(f=f)),
    "caf": ({}, lambda f: agg.CAF(f=f)),
    "smea": ({}, lambda f: agg.SMEA(f=f)),
}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("p,f,d", CASES)
def test_rule_parity(x64, name, p, f, d):
    hp, make = RULES[name]
    hp = dict(hp)
    if hp.pop("neighbours_from", None):
        hp["neighbours"] = p - f - 1  # ByzFL's Krum sums n - f - 1 distances (Blanchard: n - f - 2)
    g = _spiked(p, f, d, seed=p + d) if name in ("caf", "smea") else _stack(p, d, seed=p + d)
    np.random.seed(0)  # noqa: NPY002  (ByzFL CAF/SMEA draw a random power-iteration start)
    ref = make(f)(g.copy())
    ours = flagjax.aggregate(name, jnp.asarray(g), f=f, **hp)
    # CAF: ByzFL runs one power iteration per step (approximate eigenvectors), so its down-weighting
    # differs slightly; the outliers are filtered either way.
    tol = 1e-3 if name == "caf" else 1e-7
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=tol, atol=tol)


@pytest.mark.parametrize("p,f,d", CASES)
def test_preaggregator_parity(x64, p, f, d):
    g = _stack(p, d, seed=7 * p + d)
    np.testing.assert_allclose(flagjax.aggregators.pre.nnm(jnp.asarray(g), f=f), pre.NNM(f=f)(g.copy()), rtol=1e-9)
    np.testing.assert_allclose(flagjax.aggregators.pre.arc(jnp.asarray(g), f=f), pre.ARC(f=f)(g.copy()), rtol=1e-9)
    np.testing.assert_allclose(
        flagjax.aggregators.pre.clip(jnp.asarray(g), c=2.0), pre.Clipping(c=2.0)(g.copy()), rtol=1e-9
    )
    # bucketing is random in both; compare the multiset of bucket sums' total and the shapes
    ours = np.asarray(flagjax.aggregators.pre.bucketing(jnp.asarray(g), key=jax.random.key(0), s=2))
    theirs = pre.Bucketing(s=2)(g.copy())
    assert ours.shape == theirs.shape
    sizes = np.array([2] * (p // 2) + ([p % 2] if p % 2 else []))
    np.testing.assert_allclose((ours * sizes[:, None]).sum(0), (theirs * sizes[:, None]).sum(0), rtol=1e-9)


def test_composition_parity(x64):
    g = _stack(15, 100, seed=1)
    ours = flagjax.aggregate("nnm+trimmed_mean", jnp.asarray(g), f=3)
    ref = agg.TrMean(f=3)(pre.NNM(f=3)(g.copy()))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-9)


def test_attack_parity(x64):
    """The attacks the head-to-head with ByzFL's training loop uses (experiments/peer_byzfl.py), with ByzFL's
    conventions spelt in flagjax's hyperparameters: SignFlipping = signflip, InnerProductManipulation(tau) =
    ipm(eps=tau), ALittleIsEnough(tau) = alie(z=-tau, ddof=1) (ByzFL adds tau sample deviations)."""
    atk = byzfl_module("attacks")
    honest = _stack(10, 50, seed=3)[:10]
    f = 3

    def ours(name, **hp):
        rows = np.asarray(flagjax.attacks.attack(name, jnp.asarray(honest), f=f, key=jax.random.key(0), **hp))
        assert rows.shape == (f, honest.shape[1]) and np.all(rows == rows[:1])
        return rows[0]

    np.testing.assert_allclose(ours("signflip"), atk.SignFlipping()(honest.copy()), rtol=1e-12)
    np.testing.assert_allclose(ours("ipm", eps=0.5), atk.InnerProductManipulation(tau=0.5)(honest.copy()), rtol=1e-12)
    theirs = atk.ALittleIsEnough(tau=1.5)(honest.copy())
    np.testing.assert_allclose(ours("alie", z=-1.5, ddof=1), theirs, rtol=1e-10)
    # flagjax's default direction and deviation: mu - z sigma with the population sigma
    m, sd0 = honest.mean(0), honest.std(0)
    np.testing.assert_allclose(ours("alie", z=1.5), m - 1.5 * sd0, rtol=1e-10)
    assert np.abs(ours("alie", z=1.5) - theirs).max() > 1.0  # the two conventions are not the same attack
    with pytest.raises(ValueError, match="ddof must be an int in"):
        ours("alie", z=1.5, ddof=10)


def test_optimal_alie_searches_byzfl_direction(x64):
    """ByzFL's Optimal_ALittleIsEnough sends mu + tau sigma (sample sigma) with tau >= 0 from its line search;
    flagjax's optimal_alie(direction=1, ddof=1) searches the same family: given ByzFL's tau as its one factor
    it sends ByzFL's rows, and its own grid does at least as much damage to the defence as ByzFL's search
    up to the grid's spacing (the damage is |rule(stack) - honest mean|)."""
    atk, agg = byzfl_module("attacks"), byzfl_module("aggregators")
    honest = _stack(10, 50, seed=4)[:10]
    f = 3
    theirs = atk.Optimal_ALittleIsEnough(agg=agg.TrMean(f=f), pre_agg_list=[], f=f)(honest.copy())
    m, sd1 = honest.mean(0), honest.std(0, ddof=1)
    tau = float(np.median((theirs - m) / sd1))
    np.testing.assert_allclose(theirs, m + tau * sd1, rtol=1e-9, atol=1e-12)
    assert tau >= 0

    def ours(**hp):
        rows = flagjax.attacks.attack(
            "optimal_alie", jnp.asarray(honest), f=f, key=jax.random.key(0), rule="trimmed_mean", **hp
        )
        return np.asarray(rows)

    np.testing.assert_allclose(ours(direction=1, ddof=1, factors=(tau,))[0], theirs, rtol=1e-9, atol=1e-12)

    def damage(row):
        stack = jnp.asarray(np.concatenate([honest, np.repeat(row[None], f, 0)]))
        return float(np.linalg.norm(np.asarray(flagjax.aggregate("trimmed_mean", stack, f=f)) - m))

    assert damage(ours(direction=1, ddof=1)[0]) >= 0.95 * damage(theirs)
    # the default searches mu - t sigma (population sigma): another family
    default = ours()[0]
    t0 = np.median((m - default) / honest.std(0))
    np.testing.assert_allclose(default, m - t0 * honest.std(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="direction must be -1"):
        ours(direction=0)
