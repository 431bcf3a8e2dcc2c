// flagjax's CPU kernels, called from JAX as XLA FFI custom calls (flagjax/native.py loads this
// library and registers each handler below for the "cpu" platform).
//
// FlagjaxCountSketch{F32,F64}: the count sketch of flagjax/sketch.py in one pass over the stack.
// Inputs x (..., p, m), signs (..., nb, k) (+-1, the hashed sign of every column of the nb = ceil(m / k)
// blocks), shifts (..., nb) int32 (each block's hashed rotation). Outputs S (..., p, k) and n2 (..., p):
//
//   S[i, b] = sum_t sum_{j: (j + shift_t) mod k = b} signs[t, j] x[i, t k + j],   n2[i] = sum_j x[i, j]^2.
//
// Each row's signed blocks are added, in block order, into a doubled (2k) accumulator at their shifts
// and the two halves are added at the end: the same additions in the same order as the XLA scan in
// flagjax/sketch.py (_fold_scan), so S is bit-identical to it; n2 is summed in another order.
// Rows are cut into groups of kRows; the calling thread and tasks scheduled on XLA's intra-op thread
// pool take groups from one atomic counter, and the caller waits only for groups already being worked
// on (never for a task that has not started), so a pool whose threads are all busy cannot deadlock.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 4;    // rows per work item: their accumulators (kRows x 2k) stay in cache
constexpr int64_t kLanes = 16;  // independent partial sums of the squared norms (vectorised)

template <typename T>
void FoldGroup(const T* __restrict x, const T* __restrict signs, const int32_t* __restrict shifts,
               T* __restrict S, T* __restrict n2, T* __restrict acc, int64_t rows, int64_t m, int64_t k) {
  const int64_t nb = (m + k - 1) / k;
  std::fill(acc, acc + rows * 2 * k, T(0));
  T norm[kRows] = {};
  for (int64_t t = 0; t < nb; ++t) {
    const int64_t w = std::min(k, m - t * k);
    const T* __restrict s = signs + t * k;
    for (int64_t i = 0; i < rows; ++i) {
      const T* __restrict xr = x + i * m + t * k;
      T* __restrict a = acc + i * 2 * k + shifts[t];
      T lanes[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= w; j += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const T v = xr[j + l] * s[j + l];
          a[j + l] += v;
          lanes[l] += v * v;
        }
      }
      T q = 0;
      for (; j < w; ++j) {
        const T v = xr[j] * s[j];
        a[j] += v;
        q += v * v;
      }
      for (int64_t l = 0; l < kLanes; ++l) q += lanes[l];
      norm[i] += q;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = acc + i * 2 * k;
    for (int64_t b = 0; b < k; ++b) S[i * k + b] = a[b] + a[k + b];
    n2[i] = norm[i];
  }
}

// Work shared by the caller and the pool tasks; owned jointly, so a task that starts after the call
// returned finds no work left and touches nothing else.
struct Shared {
  std::atomic<int64_t> next{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
  std::function<void(int64_t, void*)> work;
  size_t scratch = 0;
};

void Drain(const std::shared_ptr<Shared>& sh) {
  std::unique_ptr<unsigned char[]> scratch;
  int64_t finished = 0;
  for (int64_t item; (item = sh->next.fetch_add(1)) < sh->total;) {
    if (!scratch) scratch.reset(new unsigned char[sh->scratch]);
    sh->work(item, scratch.get());
    ++finished;
  }
  if (finished) {
    std::lock_guard<std::mutex> lock(sh->mu);
    sh->done += finished;
    if (sh->done == sh->total) sh->cv.notify_all();
  }
}

template <ffi::DataType DT>
ffi::Error CountSketch(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> signs, ffi::Buffer<ffi::S32> shifts,
                       ffi::ResultBuffer<DT> S, ffi::ResultBuffer<DT> n2) {
  using T = ffi::NativeType<DT>;
  const auto xd = x.dimensions();
  const auto sd = S->dimensions();
  if (xd.size() < 2 || sd.size() != xd.size())
    return ffi::Error::InvalidArgument("x must be (..., p, m), S (..., p, k)");
  const int64_t p = xd[xd.size() - 2], m = xd[xd.size() - 1], k = sd[sd.size() - 1];
  const int64_t nb = (m + k - 1) / k;
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < xd.size(); ++i) batch *= xd[i];
  const int64_t n_signs = signs.element_count(), n_shifts = shifts.element_count();
  if (n_signs != batch * nb * k || n_shifts != batch * nb)
    return ffi::Error::InvalidArgument("signs must be (..., ceil(m / k), k) and shifts (..., ceil(m / k))");
  if (batch == 0 || p == 0) return ffi::Error::Success();
  const int64_t groups = (p + kRows - 1) / kRows;
  auto sh = std::make_shared<Shared>();
  sh->total = batch * groups;
  sh->scratch = sizeof(T) * kRows * 2 * k;
  const T* xp = x.typed_data();
  const T* sp = signs.typed_data();
  const int32_t* hp = shifts.typed_data();
  T* Sp = S->typed_data();
  T* np = n2->typed_data();
  sh->work = [=](int64_t item, void* scratch) {
    const int64_t b = item / groups, r0 = (item % groups) * kRows;
    const int64_t rows = std::min(kRows, p - r0);
    FoldGroup<T>(xp + (b * p + r0) * m, sp + b * nb * k, hp + b * nb, Sp + (b * p + r0) * k, np + b * p + r0,
                 static_cast<T*>(scratch), rows, m, k);
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 0), sh->total - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(std::function<void()>([sh] { Drain(sh); }));
  Drain(sh);
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done == sh->total; });
  return ffi::Error::Success();
}

}  // namespace

#define FLAGJAX_COUNT_SKETCH(name, DT)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, CountSketch<DT>,                    \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::Buffer<DT>>()               \
                                    .Arg<ffi::Buffer<DT>>()               \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Ret<ffi::Buffer<DT>>()               \
                                    .Ret<ffi::Buffer<DT>>());

FLAGJAX_COUNT_SKETCH(FlagjaxCountSketchF32, ffi::F32)
FLAGJAX_COUNT_SKETCH(FlagjaxCountSketchF64, ffi::F64)

// ------------------------------------------------------------------------------------------------------
// FlagjaxFlagSolve{F32,F64}: the flag-median IRLS of flagjax/solver.py (solve_gram, method "subspace",
// lam = 0) in one call, single-threaded: the p x p loop is latency-bound in XLA:CPU (about forty small ops
// per IRLS step, each with a fixed cost of about a microsecond). The same steps as the XLA loop: the
// start's Cholesky-QR pass, `start_iters` subspace iterations from the start block with the flag mean's
// weights, then `max_iters` IRLS steps of `inner_iters` iterations each, every iteration but a solve's
// last orthonormalised by the shifted first pass alone and the last by CholeskyQR2; a step whose relative
// objective decrease is below tol freezes the state (the remaining steps are skipped). A Cholesky pass
// applies its factor as the explicit inverse of the r x r factor and a product (the Pallas kernel's form,
// flagjax/solver_kernel.py) where XLA calls LAPACK's triangular solve: the same arithmetic up to rounding.
// The basis is held with its r columns padded to a multiple of 8 (dead zero columns, as in the Pallas
// kernel), and for r <= 64 the padded width is a compile-time constant, so every inner loop is a
// fixed-length loop over a few vectors held in registers.
//
// Inputs K (..., p, p), valid (..., p) (1 / 0 in K's dtype), C0 (..., p, r) the start block
// (solver.warm_start_block), prm (..., 2) = (eps, tol). Attributes max_iters, inner_iters, start_iters,
// shift. Outputs C (..., p, r) and KC = K C (before the final canonicalisation, which solver.py does),
// ratios (..., p), weights (..., p), trace (..., max_iters + 1), stat (..., 4) = (objective, steps,
// converged, the last CholeskyQR2 pass succeeded).

namespace {

// Vectors of T (GCC/Clang vector extensions; unaligned loads and stores) of 32 or 64 bytes: the basis is
// held with its rank padded to a multiple of 8, and a row of N entries is cut into 64-byte vectors (one
// AVX-512 register, two AVX ones) when N allows it, else 32-byte ones.
// (typedefs: GCC drops vector attributes on a dependent alias template)
typedef float VecF32x8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float VecF32x16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef double VecF64x4 __attribute__((vector_size(32), aligned(8), may_alias));
typedef double VecF64x8 __attribute__((vector_size(64), aligned(8), may_alias));
// (one specialisation each, a repetition kept on purpose: through std::conditional_t GCC ignores the
// typedefs' attributes, the alignment of 4 / 8 among them, and the kernels crashed in the tests)
template <typename T, int B>
struct VecOf;
template <>
struct VecOf<float, 32> {
  using type = VecF32x8;
};
template <>
struct VecOf<float, 64> {
  using type = VecF32x16;
};
template <>
struct VecOf<double, 32> {
  using type = VecF64x4;
};
template <>
struct VecOf<double, 64> {
  using type = VecF64x8;
};
constexpr int64_t kPad = 8;  // the rank is padded to a multiple of this
template <typename T, int64_t N>
constexpr int kVecBytes = (N > 0 && N % (64 / sizeof(T)) == 0) || (N == 0 && kPad % (64 / sizeof(T)) == 0) ? 64 : 32;
template <typename T, int64_t N>
using Vec = typename VecOf<T, kVecBytes<T, N>>::type;
template <typename T, int64_t N>
constexpr int64_t kVecLanes = kVecBytes<T, N> / sizeof(T);

// o[0:n] = init[0:n] (or 0) + sum_{a < m} coef[a * cs] * rows[a * rs + 0:n], n a multiple of kPad; with
// N = n known at compile time the accumulators stay in registers (two sets, even and odd a, so that
// consecutive multiply-adds do not wait on each other)
template <typename T, int64_t N>
inline void Combo(int64_t n_rt, int64_t m, const T* __restrict coef, int64_t cs, const T* __restrict rows, int64_t rs,
                  const T* __restrict init, T* __restrict o) {
  using V = Vec<T, N>;
  constexpr int64_t W = kVecLanes<T, N>;
  if constexpr (N > 0) {
    V acc[N / W], acc2[N / W];
    for (int64_t v = 0; v < N / W; ++v) {
      acc[v] = init ? *reinterpret_cast<const V*>(init + v * W) : V{};
      acc2[v] = V{};
    }
    int64_t a = 0;
    for (; a + 1 < m; a += 2) {
      const T c = coef[a * cs], c2 = coef[(a + 1) * cs];
      const T* __restrict row = rows + a * rs;
      const T* __restrict row2 = row + rs;
      for (int64_t v = 0; v < N / W; ++v) {
        acc[v] += c * *reinterpret_cast<const V*>(row + v * W);
        acc2[v] += c2 * *reinterpret_cast<const V*>(row2 + v * W);
      }
    }
    if (a < m) {
      const T c = coef[a * cs];
      for (int64_t v = 0; v < N / W; ++v) acc[v] += c * *reinterpret_cast<const V*>(rows + a * rs + v * W);
    }
    for (int64_t v = 0; v < N / W; ++v) *reinterpret_cast<V*>(o + v * W) = acc[v] + acc2[v];
  } else {
    for (int64_t b = 0; b < n_rt; ++b) o[b] = init ? init[b] : T(0);
    for (int64_t a = 0; a < m; ++a) {
      const T c = coef[a * cs];
      const T* __restrict row = rows + a * rs;
      for (int64_t v = 0; v < n_rt; v += W) *reinterpret_cast<V*>(o + v) += c * *reinterpret_cast<const V*>(row + v);
    }
  }
}

// o[0:n] = sum_{a < n} coef[a] * Z[a, 0:n] for an upper-triangular Z (n, n): the vector of columns
// [v W, v W + W) takes rows a < (v + 1) W only; registers as in Combo when N = n is a compile-time constant
template <typename T, int64_t N>
inline void ComboUpper(int64_t n_rt, const T* __restrict coef, const T* __restrict Z, T* __restrict o) {
  if constexpr (N > 0) {
    using V = Vec<T, N>;
    constexpr int64_t W = kVecLanes<T, N>;
    V acc[N / W];
    for (int64_t v = 0; v < N / W; ++v) acc[v] = V{};
#pragma GCC unroll 8
    for (int64_t ab = 0; ab < N / W; ++ab)
      for (int64_t a = ab * W; a < (ab + 1) * W; ++a) {
        const T c = coef[a];
        const T* __restrict row = Z + a * N;
#pragma GCC unroll 8
        for (int64_t v = ab; v < N / W; ++v) acc[v] += c * *reinterpret_cast<const V*>(row + v * W);
      }
    for (int64_t v = 0; v < N / W; ++v) *reinterpret_cast<V*>(o + v * W) = acc[v];
  } else {
    Combo<T, 0>(n_rt, n_rt, coef, 1, Z, n_rt, nullptr, o);
  }
}

template <typename T, int64_t RC>  // RC: the padded rank as a compile-time constant, or 0 (runtime)
struct Solver {
  const int64_t p, R;
  const T* K;
  const T* valid;
  const T shift, tiny;
  std::vector<T> G, U, X, tmp, save_c, save_kc, s, s_neg, mask;
  std::vector<char> live;

  Solver(int64_t p_, int64_t R_, const T* K_, const T* valid_, T shift_)
      : p(p_), R(RC ? RC : R_), K(K_), valid(valid_), shift(shift_), tiny(std::numeric_limits<T>::min()),
        G(R * R), U(R * R), X(R * R), tmp(p_ * R), save_c(p_ * R), save_kc(p_ * R), s(R), s_neg(R), mask(R), live(R) {}

  // out (p, R) = K (p, p) @ V (p, R)
  void MulK(const T* __restrict V, T* __restrict out) const {
    const int64_t n = RC ? RC : R;
    for (int64_t i = 0; i < p; ++i) Combo<T, RC>(n, p, K + i * p, 1, V, n, nullptr, out + i * n);
  }

  // M (p, R) <- M Z with Z (R, R) upper triangular
  void MulRight(T* __restrict M, const T* __restrict Z) {
    const int64_t n = RC ? RC : R;
    for (int64_t i = 0; i < p; ++i) ComboUpper<T, RC>(n, M + i * n, Z, tmp.data() + i * n);
    std::copy(tmp.begin(), tmp.end(), M);
  }

  // One Cholesky-QR pass in the K metric (solver._cholesky_pass): (C, KC) <- (C, KC) diag(s) L^-T on the
  // live columns, zero elsewhere (C left as it was when !need_c), with L L^T the equilibrated, shifted
  // C^T K C. Returns whether the factor exists (false: C and KC are NaN, as jnp.linalg.cholesky's NaN
  // factor makes them).
  bool Pass(T* __restrict C, T* __restrict KC, T sh, T drop, bool use_drop, bool need_c = true) {
    const int64_t n = RC ? RC : R;
    T* __restrict g = G.data();
    for (int64_t a = 0; a < n; ++a) Combo<T, RC>(n, p, C + a, n, KC, n, nullptr, g + a * n);  // G = C^T KC
    for (int64_t a = 0; a < n; ++a) {
      const T d = g[a * n + a];
      live[a] = d > tiny * 16;
      s[a] = live[a] ? T(1) / std::sqrt(d) : T(0);
    }
    // A = sym(G * s s^T) on live pairs + diag(live ? shift : 1), factored in place as A = U^T U (U = L^T,
    // right-looking: row j of U, then the trailing rows minus its outer product)
    // (s is 0 on dead columns, so G s s^T is 0 on their pairs; only the upper triangle is factored)
    T* __restrict u = U.data();
    T* __restrict gs = X.data();
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = 0; b < n; ++b) gs[a * n + b] = g[a * n + b] * s[a] * s[b];
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = a + 1; b < n; ++b) u[a * n + b] = (gs[a * n + b] + gs[b * n + a]) / 2;
      u[a * n + a] = gs[a * n + a] + (live[a] ? sh : T(1));
    }
    for (int64_t j = 0; j < n; ++j) {
      const T d = u[j * n + j];
      if (!(d > 0)) {
        const T nan = std::numeric_limits<T>::quiet_NaN();
        std::fill(C, C + p * n, nan);
        std::fill(KC, KC + p * n, nan);
        return false;
      }
      // whole rows as vectors: the entries left of the diagonal are scratch, never read
      using V = Vec<T, RC>;
      constexpr int64_t W = kVecLanes<T, RC>;
      const T ujj = std::sqrt(d), inv = T(1) / ujj;
      V* uj = reinterpret_cast<V*>(u + j * n);
      for (int64_t v = 0; v < n / W; ++v) uj[v] *= inv;
      u[j * n + j] = ujj;
      for (int64_t i = j + 1; i < n; ++i) {
        const T uji = u[j * n + i];
        V* ui = reinterpret_cast<V*>(u + i * n);
        for (int64_t v = 0; v < n / W; ++v) ui[v] -= uji * uj[v];
      }
    }
    if (use_drop)
      for (int64_t a = 0; a < n; ++a) live[a] = live[a] && u[a * n + a] * u[a * n + a] > drop;
    // X = U^-1 (upper), rows from the last: X_k = (e_k - sum_{q > k} U_kq X_q) / U_kk
    T* __restrict x = X.data();
    for (int64_t k = n - 1; k >= 0; --k) {
      T* __restrict xk = x + k * n;
      for (int64_t b = 0; b < n; ++b) tmp[b] = b == k ? T(1) : T(0);
      for (int64_t q = k + 1; q < n; ++q) s_neg[q] = -u[k * n + q];
      Combo<T, RC>(n, n - k - 1, s_neg.data() + k + 1, 1, x + (k + 1) * n, n, tmp.data(), xk);
      const T inv = T(1) / u[k * n + k];
      for (int64_t b = 0; b < n; ++b) xk[b] *= inv;
    }
    // Z = diag(s) X on the live columns (in X's storage)
    for (int64_t b = 0; b < n; ++b) mask[b] = live[b] ? T(1) : T(0);
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = 0; b < n; ++b) x[a * n + b] *= s[a] * mask[b];
    if (need_c) MulRight(C, x);
    MulRight(KC, x);
    return true;
  }

  // One subspace iteration C <- orth_K(W K C), W = diag(a) (solver._subspace_step); exact: CholeskyQR2,
  // keeping the first pass's result when the second factor fails. Returns the second pass's success
  // (false for an inexact step).
  bool Step(const T* a, T* C, T* KC, bool exact) {
    const int64_t n = RC ? RC : R;
    for (int64_t i = 0; i < p; ++i)
      for (int64_t c = 0; c < n; ++c) C[i * n + c] = a[i] * KC[i * n + c];
    MulK(C, KC);
    // an inexact step's C is not read again (the next step starts from a KC), so only KC is updated
    Pass(C, KC, shift, 0, false, exact);
    if (!exact) return false;
    std::copy(C, C + p * n, save_c.begin());
    std::copy(KC, KC + p * n, save_kc.begin());
    const bool ok = Pass(C, KC, 4 * std::numeric_limits<T>::epsilon(), T(0.01), true);
    if (!ok) {
      std::copy(save_c.begin(), save_c.end(), C);
      std::copy(save_kc.begin(), save_kc.end(), KC);
    }
    return ok;
  }

  bool Solve(const T* a, T* C, T* KC, int64_t iters) {
    for (int64_t it = 0; it + 1 < iters; ++it) Step(a, C, KC, false);
    return Step(a, C, KC, true);
  }

  // objective, ratios and the next weights from KC (solver._evaluate, lam = 0)
  T Evaluate(const T* KC, T eps, T* ratios, T* next_a) const {
    const int64_t n = RC ? RC : R;
    T obj = 0;
    for (int64_t i = 0; i < p; ++i) {
      T n2 = 0;
      for (int64_t c = 0; c < n; ++c) n2 += KC[i * n + c] * KC[i * n + c];
      const bool v = valid[i] > T(0.5);
      const T ratio = v ? std::min(std::max(n2, T(0)), T(1)) : T(0);
      const T sv = v ? 1 - ratio : T(0);
      ratios[i] = ratio;
      obj += std::sqrt(sv);
      next_a[i] = v ? T(1) / std::sqrt(sv + eps) : T(0);
    }
    return obj;
  }
};

struct Options {
  int64_t max_iters, inner_iters, start_iters;
  double shift;
};

template <typename T, int64_t RC>
void Run(const Options& o, int64_t p, int64_t r, int64_t R, const T* K, const T* valid, const T* C0, T eps, T tol,
         T* C_out, T* KC_out, T* ratios_out, T* weights_out, T* trace, T* stat) {
  Solver<T, RC> sv(p, R, K, valid, static_cast<T>(o.shift));
  R = sv.R;
  std::vector<T> C(p * R, T(0)), KC(p * R);
  for (int64_t i = 0; i < p; ++i) std::copy(C0 + i * r, C0 + (i + 1) * r, C.begin() + i * R);
  sv.MulK(C.data(), KC.data());
  sv.Pass(C.data(), KC.data(), sv.shift, 0, false);
  std::vector<T> weights(valid, valid + p), ratios(p), next_a(p);
  bool ok = sv.Solve(weights.data(), C.data(), KC.data(), o.start_iters);
  T obj = sv.Evaluate(KC.data(), eps, ratios.data(), next_a.data());
  std::fill(trace, trace + o.max_iters + 1, std::numeric_limits<T>::quiet_NaN());
  trace[0] = obj;
  int64_t steps = 0;
  bool converged = false;
  // each step's state replaces the last one's (the XLA loop's select keeps the new state on the step that
  // converges), and once converged no step runs, so the state is updated in place
  for (int64_t t = 0; t < o.max_iters && !converged; ++t) {
    weights = next_a;
    ok = sv.Solve(weights.data(), C.data(), KC.data(), o.inner_iters);
    const T next_obj = sv.Evaluate(KC.data(), eps, ratios.data(), next_a.data());
    converged = (obj - next_obj) / std::max(std::abs(obj), sv.tiny) < tol;
    obj = next_obj;
    trace[++steps] = obj;
  }
  for (int64_t i = 0; i < p; ++i) {
    std::copy(C.begin() + i * R, C.begin() + i * R + r, C_out + i * r);
    std::copy(KC.begin() + i * R, KC.begin() + i * R + r, KC_out + i * r);
  }
  std::copy(ratios.begin(), ratios.end(), ratios_out);
  std::copy(weights.begin(), weights.end(), weights_out);
  stat[0] = obj;
  stat[1] = static_cast<T>(steps);
  stat[2] = converged ? T(1) : T(0);
  stat[3] = ok ? T(1) : T(0);
}

template <ffi::DataType DT>
ffi::Error FlagSolve(ffi::Buffer<DT> K, ffi::Buffer<DT> valid, ffi::Buffer<DT> C0, ffi::Buffer<DT> prm,
                     int64_t max_iters, int64_t inner_iters, int64_t start_iters, double shift,
                     ffi::ResultBuffer<DT> C_out, ffi::ResultBuffer<DT> KC_out, ffi::ResultBuffer<DT> ratios_out,
                     ffi::ResultBuffer<DT> weights_out, ffi::ResultBuffer<DT> trace_out,
                     ffi::ResultBuffer<DT> stat_out) {
  using T = ffi::NativeType<DT>;
  const auto kd = K.dimensions();
  const auto cd = C0.dimensions();
  if (kd.size() < 2 || cd.size() != kd.size())
    return ffi::Error::InvalidArgument("K must be (..., p, p), C0 (..., p, r)");
  const int64_t p = kd[kd.size() - 1], r = cd[cd.size() - 1];
  if (p == 0 || r == 0) return ffi::Error::Success();
  const int64_t batch = K.element_count() / (p * p);
  if (inner_iters < 1 || start_iters < 1 || max_iters < 0) return ffi::Error::InvalidArgument("bad iteration counts");
  const Options o{max_iters, inner_iters, start_iters, shift};
  const int64_t R = (r + kPad - 1) / kPad * kPad, tl = max_iters + 1;
  auto run = Run<T, 0>;  // the padded rank as a compile-time constant up to 64
  switch (R) {
    case 8: run = Run<T, 8>; break;
    case 16: run = Run<T, 16>; break;
    case 24: run = Run<T, 24>; break;
    case 32: run = Run<T, 32>; break;
    case 40: run = Run<T, 40>; break;
    case 48: run = Run<T, 48>; break;
    case 56: run = Run<T, 56>; break;
    case 64: run = Run<T, 64>; break;
    default: break;
  }
  for (int64_t b = 0; b < batch; ++b) {
    const T eps = prm.typed_data()[b * 2], tol = prm.typed_data()[b * 2 + 1];
    run(o, p, r, R, K.typed_data() + b * p * p, valid.typed_data() + b * p, C0.typed_data() + b * p * r, eps, tol,
        C_out->typed_data() + b * p * r, KC_out->typed_data() + b * p * r, ratios_out->typed_data() + b * p,
        weights_out->typed_data() + b * p, trace_out->typed_data() + b * tl, stat_out->typed_data() + b * 4);
  }
  return ffi::Error::Success();
}

}  // namespace

#define FLAGJAX_FLAG_SOLVE(name, DT)                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, FlagSolve<DT>,                     \
                                ffi::Ffi::Bind()                         \
                                    .Arg<ffi::Buffer<DT>>()              \
                                    .Arg<ffi::Buffer<DT>>()              \
                                    .Arg<ffi::Buffer<DT>>()              \
                                    .Arg<ffi::Buffer<DT>>()              \
                                    .Attr<int64_t>("max_iters")          \
                                    .Attr<int64_t>("inner_iters")        \
                                    .Attr<int64_t>("start_iters")        \
                                    .Attr<double>("shift")               \
                                    .Ret<ffi::Buffer<DT>>()              \
                                    .Ret<ffi::Buffer<DT>>()              \
                                    .Ret<ffi::Buffer<DT>>()              \
                                    .Ret<ffi::Buffer<DT>>()              \
                                    .Ret<ffi::Buffer<DT>>()              \
                                    .Ret<ffi::Buffer<DT>>());

FLAGJAX_FLAG_SOLVE(FlagjaxFlagSolveF32, ffi::F32)
FLAGJAX_FLAG_SOLVE(FlagjaxFlagSolveF64, ffi::F64)
