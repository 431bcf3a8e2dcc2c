"""The count sketch (flagjax.sketch) and the rules that take ``sketch=k`` (issue #18).

The sketch is a linear map R^d -> R^k; its matrix P (d, k) is read off by sketching the identity, so
every test compares against dense float64 arithmetic with P: one +-1 per column, columns of one
block never share a bucket, sketch(G) = G P, slices add up. Statistics over seeds check the count
sketch's unbiasedness and variance bound. With d <= k there is a single block, no collision, and a
sketched rule must give the exact rule's output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax
from flagjax import aggregators, sketch, train
from tests.helpers import DS, small_config

SKETCHABLE = tuple(n for n in aggregators.names() if aggregators.get(n).sketchable)


def _matrix(d, k, seed, x64=True):
    """The sketch's (d, k) matrix P: row j is the sketch of the unit vector e_j."""
    dtype = jnp.float64 if x64 else jnp.float32
    return np.asarray(sketch.sketch_rows(jnp.eye(d, dtype=dtype), k, seed=seed))


def test_one_signed_bucket_per_column_and_no_collision_within_a_block(x64):
    d, k = 300, 64
    P = _matrix(d, k, seed=11)
    assert set(np.unique(P)) <= {-1.0, 0.0, 1.0}
    assert np.all(np.count_nonzero(P, axis=1) == 1)
    bucket = np.argmax(np.abs(P), axis=1)
    for start in range(0, d, k):  # the k consecutive columns of a block fill k distinct buckets
        blk = bucket[start : start + k]
        assert len(set(blk.tolist())) == len(blk)
    # another seed is another map; the same seed the same map
    assert not np.array_equal(P, _matrix(d, k, seed=12))
    np.testing.assert_array_equal(P, _matrix(d, k, seed=11))


def test_sketch_is_the_linear_map_and_methods_agree(x64):
    d, k = 1000, 64
    rng = np.random.default_rng(0)
    G = rng.normal(size=(6, d))
    P = _matrix(d, k, seed=5)
    for method in sketch.SKETCH_METHODS:
        S, n2 = sketch.sketch_and_norms(jnp.asarray(G), k, seed=5, method=method)
        np.testing.assert_allclose(np.asarray(S), G @ P, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(n2), np.sum(G * G, axis=1), rtol=1e-12)
    # an odd number of rows (the CPU path groups rows by a divisor of p) and float32
    S32 = sketch.sketch_rows(jnp.asarray(G[:5], jnp.float32), k, seed=5)
    np.testing.assert_allclose(np.asarray(S32), G[:5] @ P, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cuts", [(0, 128, 1000), (0, 300, 301, 777, 1000)])
def test_partial_sketches_of_slices_add_up(x64, cuts):
    """Static, block-aligned and mid-block offsets, and traced offsets under jit (the sharded layout)."""
    d, k = 1000, 64
    G = jnp.asarray(np.random.default_rng(1).normal(size=(4, d)))
    whole = sketch.sketch_and_norms(G, k, seed=9)
    traced = jax.jit(lambda x, o: sketch.sketch_and_norms(x, k, seed=9, offset=o))
    for fn in (lambda x, o: sketch.sketch_and_norms(x, k, seed=9, offset=o), traced):
        parts = [fn(G[:, a:b], a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for i in range(2):
            total = sum(np.asarray(p[i]) for p in parts)
            np.testing.assert_allclose(total, np.asarray(whole[i]), rtol=1e-12, atol=1e-12)


def test_inner_products_are_unbiased_within_the_count_sketch_variance(x64):
    d, k, seeds = 2000, 32, 400
    rng = np.random.default_rng(2)
    a = rng.normal(size=d)
    b = 0.6 * a + rng.normal(size=d)
    G = jnp.asarray(np.stack([a, b]))
    S = jax.vmap(lambda s: sketch.sketch_rows(G, k, seed=s))(jnp.arange(seeds, dtype=jnp.uint32))
    est = np.einsum("sk,sk->s", np.asarray(S[:, 0]), np.asarray(S[:, 1]))
    true = a @ b
    bound = (a @ a * (b @ b) + true**2) / k
    assert abs(est.mean() - true) < 4 * np.sqrt(bound / seeds)
    assert est.var() < 1.3 * bound


def test_sketched_gram_is_psd_with_exact_diagonal_and_drops_nonfinite_rows(x64):
    rng = np.random.default_rng(3)
    G = rng.normal(size=(8, 5000))
    G[2] = 0.0
    G[5, 7] = np.nan
    raw = np.asarray(sketch.sketched_gram(jnp.asarray(G), 256, seed=1))
    np.testing.assert_allclose(raw, raw.T)
    assert np.isnan(raw[5, 5])  # the NaN row keeps a non-finite diagonal (rules mark it invalid)
    ok = [i for i in range(8) if i != 5]
    sub = raw[np.ix_(ok, ok)]
    np.testing.assert_allclose(np.diag(sub), np.sum(G[ok] ** 2, axis=1), rtol=1e-12)
    assert np.linalg.eigvalsh(sub).min() > -1e-9 * np.abs(sub).max()
    assert np.all(raw[2, ok] == 0) and np.all(np.delete(raw[5], 5) == 0)
    # cosines: within a few 1/sqrt(k) of the exact ones
    K = G[ok] @ G[ok].T
    n = np.sqrt(np.diag(K))
    live = n > 0
    nl = n[live]
    err = sub[np.ix_(live, live)] / np.outer(nl, nl) - K[np.ix_(live, live)] / np.outer(nl, nl)
    assert np.abs(err).max() < 5 / np.sqrt(256)


def _stack(p=17, d=200, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=d)[None] + 0.8 * rng.normal(size=(p, d))
    G[-3:] = -4 * G[-3:]  # three reversed, scaled rows
    return jnp.asarray(G.astype(np.float32))


@pytest.mark.parametrize("rule", SKETCHABLE)
def test_a_sketch_wider_than_d_gives_the_exact_rule(rule):
    """d <= k: one block, no collision, so sketched cosines are exact and the rule's output too."""
    G = _stack(p=9 if rule in ("mda", "smea") else 17)
    f = 2
    key = jax.random.key(3)
    exact = np.asarray(flagjax.aggregate(rule, G, f=f, key=key))
    sk = np.asarray(flagjax.aggregate(rule, G, f=f, key=key, sketch=256))
    np.testing.assert_allclose(sk, exact, rtol=2e-4, atol=2e-4 * np.abs(exact).max())


def test_nnm_takes_a_sketch_too():
    G = _stack()
    exact = flagjax.aggregate("multi_krum", G, f=2, pre=("nnm",))
    sk = flagjax.aggregate("multi_krum", G, f=2, pre=(("nnm", {"sketch": 256}),))
    np.testing.assert_allclose(np.asarray(sk), np.asarray(exact), rtol=1e-4, atol=1e-5)


def test_sketched_flag_tracks_exact_flag_and_survives_nonfinite_rows():
    """d = 20000 >> k: the output cosine to the exact FA output is high; NaN rows stay out."""
    rng = np.random.default_rng(4)
    p, d = 40, 20_000
    G = rng.normal(size=d)[None] + 0.8 * rng.normal(size=(p, d))
    G[0, 3] = np.nan
    G[1] = np.inf
    G = jnp.asarray(G.astype(np.float32))
    exact = flagjax.aggregate("flag", G, f=4)
    agg, info = aggregators.flag_with_info(G, key=jax.random.key(0), sketch=1024)
    assert np.all(np.isfinite(np.asarray(agg)))
    assert not bool(info.valid[0]) and not bool(info.valid[1])
    cos = float(agg @ exact / (jnp.linalg.norm(agg) * jnp.linalg.norm(exact)))
    assert cos > 0.99


def test_seed_comes_from_the_key_unless_given():
    G = _stack(d=5000)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    run = lambda key, **kw: np.asarray(flagjax.aggregate("flag", G, f=2, key=key, sketch=64, **kw))  # noqa: E731
    np.testing.assert_array_equal(run(k1), run(k1))
    assert not np.array_equal(run(k1), run(k2))
    np.testing.assert_array_equal(run(k1, sketch_seed=7), run(k2, sketch_seed=7))


def test_jit_and_vmap_over_stacks_and_seeds_equal_one_at_a_time():
    stacks = jnp.stack([_stack(d=3000, seed=s) for s in range(3)])
    keys = jax.random.split(jax.random.key(0), 3)
    for rule in ("flag", "multi_krum"):
        fn = lambda g, k, rule=rule: flagjax.aggregate(rule, g, f=2, key=k, sketch=128)  # noqa: E731
        batched = np.asarray(jax.jit(jax.vmap(fn))(stacks, keys))
        for i in range(3):
            np.testing.assert_allclose(batched[i], np.asarray(fn(stacks[i], keys[i])), rtol=2e-4, atol=2e-5)


def test_bad_sketch_arguments_are_refused_by_name():
    G = _stack()
    with pytest.raises(ValueError, match="rule 'median' does not work from the Gram matrix"):
        flagjax.aggregate("median", G, f=2, sketch=64)
    with pytest.raises(ValueError, match="pre-aggregator 'clip'.*sketchable: .*nnm"):
        flagjax.aggregate("mean", G, f=2, pre=(("clip", {"sketch": 64}),))
    for bad in (-1, 1.5, True, jnp.int32(4)):
        with pytest.raises(ValueError, match="sketch must be a Python int >= 0"):
            flagjax.aggregate("flag", G, f=2, sketch=bad)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        aggregators.flag_with_info(G, sketch=64)
    with pytest.raises(ValueError, match="sketch_seed must be in"):
        flagjax.aggregate("krum", G, f=2, sketch=64, sketch_seed=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        sketch.sketch_rows(G, 64, seed=0, method="fft")


def test_config_refuses_a_batch_of_sketch_widths_and_unsketchable_rules(tmp_path):
    with pytest.raises(train.ConfigError, match="rule_hparams.sketch.*several values"):
        small_config(tmp_path, rule="flag", rule_hparams={"sketch": train.Values((64, 128))}).validate()
    with pytest.raises(train.ConfigError, match="rule 'trimmed_mean' does not work from the Gram matrix"):
        small_config(tmp_path, rule="trimmed_mean", rule_hparams={"sketch": 64}).validate()


def test_sketched_flag_trains_the_same_on_any_layout_and_device_count(tmp_path):
    """The sharded layout psums partial sketches and norms: the same numbers as the server layout."""

    def run(layout, n):
        cfg = small_config(
            tmp_path / f"{layout}{n}",
            rule="flag",
            rule_hparams={"sketch": 512},
            attack="random",
            steps=3,
            eval_every=0,
            layout=layout,
            num_devices=n,
        )
        return train.run(cfg, dataset=DS)

    ref = run("server", 1)
    for layout, n in (("server", 4), ("sharded", 4)):
        got = run(layout, n)
        assert got.layout == layout
        np.testing.assert_allclose([h["loss"] for h in got.history], [h["loss"] for h in ref.history], rtol=1e-4)


def test_adjoint_is_the_transpose(x64):
    d, k = 700, 64
    P = _matrix(d, k, seed=4)
    z = np.random.default_rng(5).normal(size=k)
    np.testing.assert_allclose(np.asarray(sketch.sketch_adjoint(jnp.asarray(z), d, k, seed=4)), P @ z, rtol=1e-12)


def test_sketch_null_fools_a_known_seed_and_not_a_fresh_one():
    """Its rows have the honest mean's sketch and norm and point away from it; Krum and FA sketching
    with that seed pick them, with a seed drawn from the key they do not."""
    rng = np.random.default_rng(6)
    d, k, f = 20_000, 256, 3
    honest = jnp.asarray((rng.normal(size=d)[None] + 0.7 * rng.normal(size=(12, d))).astype(np.float32))
    m = honest.mean(axis=0)
    byz = flagjax.attacks.attack("sketch_null", honest, f=f, key=jax.random.key(0), k=k, seed=7)
    np.testing.assert_allclose(
        np.asarray(sketch.sketch_rows(byz, k, seed=7)),
        np.tile(sketch.sketch_rows(m[None], k, seed=7), (f, 1)),
        atol=1e-3,
    )
    np.testing.assert_allclose(float(jnp.linalg.norm(byz[0])), float(jnp.linalg.norm(m)), rtol=1e-5)
    cos = lambda a: float(a @ m / (jnp.linalg.norm(a) * jnp.linalg.norm(m)))  # noqa: E731
    assert cos(byz[0]) < -0.9
    G = jnp.concatenate([honest, byz])
    for rule in ("krum", "flag"):
        known = flagjax.aggregate(rule, G, f=f, key=jax.random.key(1), sketch=k, sketch_seed=7)
        fresh = flagjax.aggregate(rule, G, f=f, key=jax.random.key(1), sketch=k)
        assert cos(known) < -0.8, rule
        assert cos(fresh) > 0.8, rule


@pytest.mark.parametrize("rule", SKETCHABLE)
def test_sketched_rules_take_nonfinite_and_huge_rows_as_input(rule):
    """A NaN row, an Inf row and a row near the float maximum are Byzantine input, not a crash."""
    G = np.array(_stack(p=9 if rule in ("mda", "smea") else 17, d=3000))
    G[0, 5] = np.nan
    G[1] = np.inf
    G[2] = 1e37
    out = flagjax.aggregate(rule, jnp.asarray(G), f=3, key=jax.random.key(0), sketch=256)
    assert np.all(np.isfinite(np.asarray(out))), rule


def test_native_kernels_are_built():
    """`pip install` / `make venv` compiles flagjax/csrc (setup.py); without a C++17 compiler the CPU
    falls back to the XLA scan, and this test says so."""
    from flagjax import native

    assert native.available(), native.unavailable_reason()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(("p", "d", "k"), [(7, 1000, 64), (9, 50, 64), (16, 4096, 256), (1, 130, 64)])
def test_native_fold_is_the_scan_bit_for_bit(x64, dtype, p, d, k):
    """Partial last blocks, a single short block, p not a multiple of the kernel's row group."""
    G = jnp.asarray(np.random.default_rng(p + d).normal(size=(p, d)), dtype)
    for seed in (0, 2**32 - 1):
        S_n, n2_n = sketch.sketch_and_norms(G, k, seed=seed, method="native")
        S_s, n2_s = sketch.sketch_and_norms(G, k, seed=seed, method="scan")
        assert S_n.dtype == dtype and S_n.shape == (p, k)
        np.testing.assert_array_equal(np.asarray(S_n), np.asarray(S_s))
        tol = 1e-5 if dtype == jnp.float32 else 1e-13
        np.testing.assert_allclose(np.asarray(n2_n), np.asarray(n2_s), rtol=tol)


def test_native_fold_batches_and_differentiates_like_the_scan(x64):
    """vmap over stacks and seeds (the kernel loops over the batch), jit, and derivatives: forward and
    reverse mode go through the XLA fold of the tangent (the sketch is linear, the norms quadratic)."""
    d, k = 700, 64
    G = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5, d)))
    seeds = jnp.arange(3, dtype=jnp.uint32)
    fn = lambda m: jax.jit(jax.vmap(lambda g, s: sketch.sketch_and_norms(g, k, seed=s, method=m)))  # noqa: E731
    for a, b in zip(fn("native")(G, seeds), fn("scan")(G, seeds), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
    one = [sketch.sketch_and_norms(G[i], k, seed=i, method="native")[0] for i in range(3)]
    np.testing.assert_array_equal(np.asarray(fn("native")(G, seeds)[0]), np.stack([np.asarray(o) for o in one]))

    def loss(g, m):
        S, n2 = sketch.sketch_and_norms(g, k, seed=4, method=m)
        return jnp.sum(jnp.sin(S)) + jnp.sum(jnp.sqrt(n2))

    x = G[0]
    np.testing.assert_allclose(jax.grad(loss)(x, "native"), jax.grad(loss)(x, "scan"), rtol=1e-12)
    v = jnp.ones_like(x)
    jvp = lambda m: jax.jvp(lambda g: loss(g, m), (x,), (v,))[1]  # noqa: E731
    np.testing.assert_allclose(jvp("native"), jvp("scan"), rtol=1e-12)
