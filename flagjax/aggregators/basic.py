"""The mean, the normalised-mean ablation and the Flag Aggregator rule."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flagjax import sketch as sketching
from flagjax import solver
from flagjax.aggregators.distance import combine
from flagjax.aggregators.registry import Rule, register

FLAG_OUTPUTS = ("code", "paper")

# --------------------------------------------------------------------------------------------- mean


def mean(stack: jax.Array, *, f: int = 0, key=None) -> jax.Array:
    """Arithmetic mean (1/p) sum_i g_i of a (p, d) stack -> (d,). Not robust: one row moves it anywhere.

    Written as ``ones @ stack`` / p: XLA:CPU runs that ~50x faster than ``stack.mean(0)``.
    """
    del f, key
    p = stack.shape[0]
    w = jnp.full((p,), 1.0 / p, stack.dtype)
    return jnp.dot(w, stack, precision=lax.Precision.HIGHEST)


register(Rule("mean", mean, sanitize=False, coordinatewise=True))


# --------------------------------------------------------------------------------------------- flag


class FlagInfo(NamedTuple):
    """Diagnostics of the ``flag`` rule (see :class:`flagjax.solver.FlagSolution`).

    Attributes:
      ratios: (p,) reconstruction ratios ||Y^T x_i||^2 of the workers (0 for dropped rows).
      weights: (p,) final IRLS weights (1 at the flag mean, 0 for dropped rows).
      coefficients: (p,) c with aggregate = sum_i c_i g_i over the valid rows.
      objective: () final objective A(Y).
      num_steps: () IRLS steps taken.
      status: () :class:`flagjax.solver.FlagStatus` code.
      valid: (p,) bool, rows that were finite and non-zero.
      basis: (p, r) coefficients C of the subspace basis Y = X C in the unit rows x_i (columns past
        the points' rank are zero): what a warm start carries to the next round (:class:`FlagState`).
    """

    ratios: jax.Array
    weights: jax.Array
    coefficients: jax.Array
    objective: jax.Array
    num_steps: jax.Array
    status: jax.Array
    valid: jax.Array
    basis: jax.Array


class FlagState(NamedTuple):
    """State of FA with ``warm_start > 0``: ``basis`` (p, r), the previous round's subspace basis as
    coefficients of that round's unit rows (:attr:`FlagInfo.basis`; zeros before the first round)."""

    basis: jax.Array


def default_rank(p: int) -> int:
    """The paper's subspace dimension r = ceil((p + 1) / 2)."""
    return min(p, math.ceil((p + 1) / 2))


def flag_with_info(
    stack: jax.Array,
    *,
    f: int = 0,
    key=None,
    r: int | None = None,
    lam=0.0,
    max_iters: int = 10,
    tol=1e-5,
    eps=1e-6,
    output: str = "code",
    method: str = "subspace",
    inner_iters: int = solver.INNER_ITERS,
    start_iters: int = solver.START_ITERS,
    sketch: int = 0,
    sketch_seed=None,
    warm_start: int = 0,
    start: jax.Array | None = None,
) -> tuple[jax.Array, FlagInfo]:
    """Flag Aggregator with diagnostics: (p, d) stack -> ((d,) aggregate, :class:`FlagInfo`).

    Solves the flag median Y (d x r) of the workers' unit directions by IRLS in Gram space
    (:func:`flagjax.solver.flag_median`; paper eq. 5, Algorithm 1), then projects:

    * ``output="code"`` (default): (1/r) * Y Y^T X 1, the sum of the projected *unit* gradients
      divided by r, which is what the authors' released code returns and what produced the paper's
      experiments. Every worker contributes at most 1/r in norm, so a Byzantine row of huge norm
      cannot dominate; the result is scale-free (about unit size), so learning rates tuned for the
      mean do not transfer (see the ``normalized_mean`` ablation).
    * ``output="paper"``: (1/p_valid) * Y Y^T G 1 on the *raw* gradients, as Algorithm 1 writes it.
      It keeps the gradients' scale, but a huge-norm row whose direction is not orthogonal to Y
      passes its projection through (the demo shows this), so it is not the default.

    Non-finite and zero rows are dropped (weight 0) and flagged in ``status``/``valid``.

    Args:
      stack: (p, d) float array.
      f: declared Byzantine count (FA does not use it; r is the knob).
      key: PRNG key; only a sketch uses it (FA is otherwise deterministic).
      r: static subspace rank, default ceil((p + 1) / 2).
      lam: pairwise regulariser weight (traced).
      max_iters: static maximum IRLS steps; 0 gives the flag mean (the released code's behaviour).
      tol: relative objective decrease that stops IRLS (traced).
      eps: IRLS smoothing (traced).
      output: "code" or "paper", see above (static).
      method, inner_iters, start_iters: static solver options (:func:`flagjax.solver.solve_gram`):
        "subspace" (default: no eigendecomposition; when lam is a Python 0 and p <= 64, one Pallas
        kernel on NVIDIA GPUs and one compiled kernel on CPU), "subspace_xla", "pallas", "native", or
        "eigh" (the exact reference).
      sketch: static int; 0 (default) solves from the exact Gram matrix, k > 0 from the sketched one
        (:func:`flagjax.sketch.sketched_gram`: exact norms, cosines from a k-column count sketch, one
        pass over the stack instead of the O(p^2 d) product; the output is still an exact combination
        of the rows). Worth it at many workers (docs/guide.md, "Many workers: a sketched Gram").
      sketch_seed: the sketch's seed (an int gives the same projection every round, which an attacker
        who knows it can exploit: the ``sketch_null`` attack); default None draws it from ``key``.
      warm_start: static int; 0 (default) starts every call from the flag mean (``start_iters``
        subspace iterations from a fixed Gaussian block). k > 0 starts from ``start`` instead and runs
        k iterations there (:func:`flagjax.solver.warm_start_block`): the registered rule then keeps the
        previous round's basis in its state (:class:`FlagState`), so a training run pays k iterations
        for its start instead of ``start_iters``. Without ``start`` (or with a zero one: the first
        round) the start is the Gaussian block with k iterations. Not in the sharded layout. A warm
        start follows another path than the cold one (docs/guide.md, "A warm start").
      start: (p, r) coefficients to start from (:attr:`FlagInfo.basis` of the previous round); only
        with ``warm_start > 0``.
    """
    del f
    p = stack.shape[0]
    if r is None:
        r = default_rank(p)
    if output not in FLAG_OUTPUTS:
        raise ValueError(f"output must be one of {FLAG_OUTPUTS}; got {output!r}")
    solver._check_points(stack, r)
    solver._check_iters(max_iters)
    warm_start = check_warm_start(warm_start)
    if start is not None and not warm_start:
        raise ValueError("start (a previous round's basis) is only used with warm_start > 0; got warm_start=0")
    opts = solver.solver_options(method, inner_iters, warm_start or start_iters, lam)
    sketch = sketching.check_sketch(sketch)
    seed = sketching.resolve_seed(sketch_seed, key) if sketch else jnp.uint32(0)
    # one compiled program per (shape, dtype, r, max_iters, output, solver options): eager callers
    # (notebooks, tests, flagjax.aggregate) otherwise compile every small op of the IRLS loop anew
    return _flag_with_info_jit(
        jnp.asarray(stack),
        lam,
        tol,
        eps,
        seed,
        start,
        r=r,
        max_iters=max_iters,
        output=output,
        opts=opts,
        sketch=sketch,
    )


def check_warm_start(warm_start) -> int:
    """The checked ``warm_start``: a Python int >= 0 (static: it sets the state's structure and the
    start's trip count). ``ValueError`` naming it otherwise."""
    if isinstance(warm_start, bool) or not isinstance(warm_start, int) or warm_start < 0:
        raise ValueError(
            f"warm_start must be a Python int >= 0 (0 = start every round from the flag mean, k > 0 = k "
            f"subspace iterations from the previous round's basis); got {warm_start!r}"
        )
    return warm_start


def sketched_gram_info(stack: jax.Array, k: int, *, seed) -> solver.GramInfo:
    """:class:`flagjax.solver.GramInfo` of a (p, d) stack from its sketched Gram matrix
    (:func:`flagjax.sketch.sketched_gram`): non-finite rows are invalid and masked out of the
    combination, as :func:`flagjax.solver.prepare_gram` does for the exact one."""
    work = stack.astype(jnp.promote_types(stack.dtype, jnp.float32))
    raw = sketching.sketched_gram(work, k, seed=seed)
    ok = jnp.isfinite(jnp.diagonal(raw))
    raw = jnp.where(ok[:, None] & ok[None, :], raw, 0)
    return solver.gram_info_from_raw(raw, ok=ok, safe=~jnp.all(ok))


@functools.partial(jax.jit, static_argnames=("r", "max_iters", "output", "opts", "sketch"))
def _flag_with_info_jit(
    stack, lam, tol, eps, seed, start, *, r: int, max_iters: int, output: str, opts: tuple, sketch: int
):
    info = sketched_gram_info(stack, sketch, seed=seed) if sketch else solver.prepare_gram(stack)
    q, fi = _coefficients(info, r, lam, max_iters, tol, eps, output, opts, start)
    agg = solver.combine_rows(stack, q, info)
    out_dtype = stack.dtype if jnp.issubdtype(stack.dtype, jnp.floating) else info.K.dtype
    return agg.astype(out_dtype), fi


def flag_coefficients(
    info: solver.GramInfo,
    *,
    r: int,
    lam=0.0,
    max_iters: int = 10,
    tol=1e-5,
    eps=1e-6,
    output: str = "code",
    method: str = "subspace",
    inner_iters: int = solver.INNER_ITERS,
    start_iters: int = solver.START_ITERS,
) -> tuple[jax.Array, FlagInfo]:
    """FA in Gram space: (q, :class:`FlagInfo`) with aggregate = sum_i q_i x_i (unit directions).

    Shared by :func:`flag_with_info` and the sharded training layout (which builds ``info`` from a
    psum of partial Gram matrices and applies q to its slice of the rows). Options as
    :func:`flag_with_info`.
    """
    opts = solver.solver_options(method, inner_iters, start_iters, lam)
    return _coefficients(info, r, lam, max_iters, tol, eps, output, opts)


def _coefficients(info, r, lam, max_iters, tol, eps, output, opts, start=None):
    C, ratios, weights, obj, _, steps, converged = solver.solve_gram(
        info.K, info.valid, lam, eps, tol, r=r, max_iters=max_iters, start=start, **dict(opts)
    )
    K = info.K
    dtype = K.dtype
    if output == "code":
        q = C @ (C.T @ (K @ info.valid.astype(dtype))) / r
    else:
        n_valid = jnp.maximum(jnp.sum(info.valid), 1).astype(dtype)
        q = C @ (C.T @ (K @ info.norms)) / n_valid
    coefficients = jnp.where(info.valid, q / jnp.where(info.valid, info.norms, 1), 0)
    status = solver.status_code(info.valid, converged)
    return q, FlagInfo(ratios, weights, coefficients, obj, steps, status, info.valid, C)


def flag(stack: jax.Array, **kwargs) -> jax.Array:
    """Flag Aggregator: the aggregate of :func:`flag_with_info` without diagnostics."""
    return flag_with_info(stack, **kwargs)[0]


def flag_gram(raw: jax.Array, ok: jax.Array, *, f: int = 0, key=None, r: int | None = None, **hparams):
    """FA's Gram-space form (:class:`flagjax.aggregators.Rule` ``gram``): raw (p, p) Gram matrix of
    the rows (non-finite rows zeroed; ``ok`` (p,) marks the finite ones) -> ((p,) c, info) with
    aggregate = sum_i c_i g_i. Same hyperparameters as :func:`flag_with_info`."""
    del f, key
    if check_warm_start(hparams.pop("warm_start", 0)):
        raise ValueError("flag's Gram-space form keeps no state: warm_start > 0 runs in the server layout only")
    info = solver.gram_info_from_raw(raw, ok=ok)
    r = r or default_rank(raw.shape[0])
    q, fi = flag_coefficients(info, r=r, **hparams)
    c = jnp.where(info.valid, q / info.work_norms, 0)
    return c, {"ratios": fi.ratios, "status": fi.status}


def _flag_init(example, *, warm_start: int = 0, r: int | None = None, **hparams):
    """:class:`FlagState` of zeros (p, r) for ``warm_start > 0`` (``example``: the (p, d) stack the
    rule will see); ``()`` (stateless) otherwise."""
    del hparams
    if not check_warm_start(warm_start):
        return ()
    p = example.shape[0]
    return FlagState(jnp.zeros((p, r or default_rank(p)), solver._work_dtype(example.dtype)))


def _flag_update(stack, state, *, f: int = 0, key=None, **hparams):
    """One round of FA; with a :class:`FlagState` it starts from the state's basis and returns this
    round's. Info: the workers' reconstruction ratios and the solver status."""
    warm = isinstance(state, FlagState)
    agg, fi = flag_with_info(stack, f=f, key=key, start=state.basis if warm else None, **hparams)
    if warm:
        state = FlagState(fi.basis.astype(state.basis.dtype))
    return agg, state, {"ratios": fi.ratios, "status": fi.status}


register(
    Rule(
        "flag",
        flag,
        sanitize=False,
        gram=flag_gram,
        sketchable=True,
        init=_flag_init,
        update=_flag_update,
        static_hparams=("r", "max_iters", "output", "method", "inner_iters", "start_iters", "warm_start"),
    )
)


# ---------------------------------------------------------------------------------- normalized_mean


def normalized_mean(stack: jax.Array, *, f: int = 0, key=None, output: str = "code", r: int | None = None) -> jax.Array:
    """Mean of unit-normalised gradients: FA's normalisation without its subspace (an ablation of FA),
    and, up to its output scale, Fed-NGA with equal weights (Zuo et al., NeurIPS 2025, arXiv 2408.09539):
    a published rule.

    With x_i = g_i / ||g_i|| over the non-zero rows (non-finite rows are zeroed by the registry):

    * ``output="code"`` (default, like FA's): (1/r) * sum_i x_i with r = ceil((p + 1) / 2), the same
      scale as FA's code output, so the two differ only by FA's projection onto its subspace;
    * ``output="paper"``: (1/p_valid) * sum_i x_i * median_i ||g_i||, rescaled to the median of the p
      input norms (what the rule can see; the honest norms are unknown to it).

    Args:
      stack: (p, d) float array. f, key: unused. r: static divisor for the code output.
    """
    del f, key
    if output not in FLAG_OUTPUTS:
        raise ValueError(f"output must be one of {FLAG_OUTPUTS}; got {output!r}")
    norms = jnp.sqrt(jnp.einsum("pd,pd->p", stack, stack, precision=lax.Precision.HIGHEST))
    finite = jnp.isfinite(norms)
    w = normalized_mean_weights(jnp.where(finite, norms, 0), output=output, r=r)
    return combine(w, stack, finite)


def normalized_mean_weights(norms: jax.Array, *, output: str = "code", r: int | None = None) -> jax.Array:
    """(p,) weights w with normalized_mean = sum_i w_i g_i, from the row norms (0 = dropped row).

    Shared by :func:`normalized_mean` and the sharded training layout (which psums partial norms)."""
    p = norms.shape[0]
    r = default_rank(p) if r is None else r
    valid = norms > 0
    inv = jnp.where(valid, 1 / jnp.where(valid, norms, 1), 0)
    if output == "code":
        return inv / r
    return inv * jnp.median(norms) / jnp.maximum(jnp.sum(valid), 1)


def normalized_mean_gram(raw: jax.Array, ok: jax.Array, *, f: int = 0, key=None, output="code", r=None):
    """normalized_mean's Gram-space form: weights from the norms sqrt(diag(raw)) (rows not ``ok``
    get weight 0). See :func:`normalized_mean`."""
    del f, key
    norms = jnp.where(ok, jnp.sqrt(jnp.maximum(jnp.diagonal(raw), 0)), 0)
    return normalized_mean_weights(norms, output=output, r=r), {}


register(
    Rule("normalized_mean", normalized_mean, sanitize=False, gram=normalized_mean_gram, static_hparams=("output", "r"))
)
