"""flagjax's compiled CPU kernels (flagjax/csrc/cpu_kernels.cc), called as XLA FFI custom calls.

``pip install`` (and ``make venv``) compiles them with the machine's C++17 compiler into the extension
``flagjax._cpu_kernels`` (setup.py); this module loads that library and registers its handlers for
the "cpu" platform. Without a compiler the build is skipped, :func:`available` is False, and every
caller keeps its pure-XLA path (the same algorithms, equal up to float rounding; see docs/guide.md,
"Native CPU kernels").

Why a kernel: XLA:CPU runs a loop of small ops as one library call or fused loop per op, each with a
fixed cost of about a microsecond. FA's p x p IRLS (about forty ops per step;
benchmarks/results/aggregation_solver.md) and the count sketch's block-by-block fold (thousands of
ops per pass; benchmarks/results/sketch.md) are bound by that cost, not by arithmetic or memory.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["available", "unavailable_reason", "count_sketch", "flag_solve", "SOLVE_MAX_P"]

_DIR = os.path.dirname(os.path.abspath(__file__))
_TARGETS = {np.dtype(np.float32): "flagjax_count_sketch_f32", np.dtype(np.float64): "flagjax_count_sketch_f64"}
_SOLVE_TARGETS = {np.dtype(np.float32): "flagjax_flag_solve_f32", np.dtype(np.float64): "flagjax_flag_solve_f64"}
_SYMBOLS = {
    "flagjax_count_sketch_f32": "FlagjaxCountSketchF32",
    "flagjax_count_sketch_f64": "FlagjaxCountSketchF64",
    "flagjax_flag_solve_f32": "FlagjaxFlagSolveF32",
    "flagjax_flag_solve_f64": "FlagjaxFlagSolveF64",
}


def _load() -> tuple[bool, str]:
    paths = [os.path.join(_DIR, "_cpu_kernels" + s) for s in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return False, (
            "flagjax._cpu_kernels was not built (no C++17 compiler when flagjax was installed?); reinstall "
            "with one (`pip install -e .`) to get the CPU kernels"
        )
    try:
        lib = ctypes.cdll.LoadLibrary(path)
        for target, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:  # a library built for another jaxlib or machine
        return False, f"flagjax._cpu_kernels at {path} could not be loaded: {e}"
    return True, ""


_AVAILABLE, _REASON = _load()


def available() -> bool:
    """Whether the compiled CPU kernels were built and registered (static: a Python bool)."""
    return _AVAILABLE


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    return _REASON


def count_sketch(x: jax.Array, signs: jax.Array, shifts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The count sketch's fold on CPU, one pass over the stack (:mod:`flagjax.sketch`, method "native").

    S[i, b] = sum_t sum_{j: (j + shifts[t]) mod k = b} signs[t, j] x[i, t k + j] (block t = columns
    t k .. t k + k - 1, the last one possibly partial) and n2[i] = sum_j x[i, j]^2. S is bit-identical to
    the XLA scan's fold (the same additions in the same order); n2 is summed in another order.
    ``jax.vmap`` batches it (the kernel loops over leading dimensions); it has no derivative rule of its
    own (flagjax/sketch.py adds one).

    Args:
      x: (p, m) float32 or float64, the rows' columns.
      signs: (nb, k) same dtype, +-1, nb = ceil(m / k).
      shifts: (nb,) int32 in [0, k), each block's rotation.

    Returns:
      (S, n2): (p, k) and (p,), x's dtype. ``RuntimeError`` if the kernels are not available.
    """
    if not _AVAILABLE:
        raise RuntimeError(_REASON)
    dtype = np.dtype(x.dtype)
    if dtype not in _TARGETS:
        raise ValueError(f"x must be float32 or float64; got {dtype}")
    if x.ndim != 2 or signs.ndim != 2 or shifts.ndim != 1:
        raise ValueError(f"x must be (p, m), signs (nb, k), shifts (nb,); got {x.shape}, {signs.shape}, {shifts.shape}")
    p, m = x.shape
    nb, k = signs.shape
    if nb != -(-m // k) or shifts.shape != (nb,) or signs.dtype != dtype or shifts.dtype != np.int32:
        raise ValueError(
            f"signs must be (ceil(m / k), k) of x's dtype and shifts (ceil(m / k),) int32; got x {x.shape}, "
            f"signs {signs.shape} {signs.dtype}, shifts {shifts.shape} {shifts.dtype}"
        )
    out = (jax.ShapeDtypeStruct((p, k), dtype), jax.ShapeDtypeStruct((p,), dtype))
    return jax.ffi.ffi_call(_TARGETS[dtype], out, vmap_method="broadcast_all")(x, signs, shifts)


SOLVE_MAX_P = 64  #: largest p for which the default solver uses :func:`flag_solve` on CPU (docs/guide.md)


def flag_solve(
    K: jax.Array,
    valid: jax.Array,
    C0: jax.Array,
    eps,
    tol,
    *,
    max_iters: int,
    inner_iters: int,
    start_iters: int,
    shift: float,
) -> tuple[jax.Array, ...]:
    """FA's p x p IRLS (:func:`flagjax.solver.solve_gram`, subspace method, lam = 0) in one CPU call.

    The same steps as the XLA loop (flag-mean start from ``C0``, ``max_iters`` IRLS steps of
    ``inner_iters`` subspace iterations, Cholesky-QR orthonormalisations in the K metric, the state frozen
    once the relative objective decrease is below ``tol``), single-threaded, with the remaining steps
    skipped after convergence. The same numbers up to rounding: each Cholesky factor is applied as its
    explicit inverse (as in flagjax/solver_kernel.py) where XLA calls a triangular solve.
    ``jax.vmap`` batches it; it has no derivative rule (differentiate ``method="subspace_xla"``).

    Args:
      K: (p, p) float32/float64 unit Gram matrix. valid: (p,) bool. C0: (p, r) start block
        (:func:`flagjax.solver.warm_start_block`). eps, tol: scalars (traced).
      max_iters, inner_iters, start_iters: static iteration counts, as ``solve_gram``'s.
      shift: static relative diagonal shift of the first Cholesky-QR pass.

    Returns:
      (C, KC, ratios, weights, objective, trace, num_steps, converged, exact_ok): C (p, r) before the
      canonicalisation (``solver.py`` applies it) and KC = K C; trace (max_iters + 1,); num_steps int32;
      converged and exact_ok (the last CholeskyQR2 pass succeeded) bool.
    """
    if not _AVAILABLE:
        raise RuntimeError(_REASON)
    dtype = np.dtype(K.dtype)
    if dtype not in _SOLVE_TARGETS:
        raise ValueError(f"K must be float32 or float64; got {dtype}")
    p, r = C0.shape
    if K.shape != (p, p) or valid.shape != (p,):
        raise ValueError(
            f"K must be (p, p) and valid (p,) for C0 of shape (p, r) = {C0.shape}; got {K.shape}, {valid.shape}"
        )
    prm = jnp.stack([jnp.asarray(eps, dtype), jnp.asarray(tol, dtype)])
    out = (
        jax.ShapeDtypeStruct((p, r), dtype),
        jax.ShapeDtypeStruct((p, r), dtype),
        jax.ShapeDtypeStruct((p,), dtype),
        jax.ShapeDtypeStruct((p,), dtype),
        jax.ShapeDtypeStruct((max_iters + 1,), dtype),
        jax.ShapeDtypeStruct((4,), dtype),
    )
    call = jax.ffi.ffi_call(_SOLVE_TARGETS[dtype], out, vmap_method="broadcast_all")
    C, KC, ratios, weights, trace, stat = call(
        K,
        valid.astype(dtype),
        C0.astype(dtype),
        prm,
        max_iters=np.int64(max_iters),
        inner_iters=np.int64(inner_iters),
        start_iters=np.int64(start_iters),
        shift=np.float64(shift),
    )
    return C, KC, ratios, weights, stat[0], trace, stat[1].astype(jnp.int32), stat[2] > 0.5, stat[3] > 0.5
