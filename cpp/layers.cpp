// Fused Llama-block layers and the LM cross-entropy (see layers.h). Each op is one or two passes
// over its rows instead of NumPy's five to ten temporaries; rows are independent, so the OpenMP
// loops split rows and no result depends on the thread count.
#include "layers.h"

#include <cmath>
#include <limits>
#include <vector>

#include "threads.h"
#ifdef SOFTPROMPT_SIMD
#include "simd.h"
#endif

namespace softprompt {
namespace {

// y[i] = exp(x[i]) for i < n (x and y may alias).
template <typename T>
void exp_row(int64_t n, const T* x, T* y) {
  int64_t i = 0;
#ifdef SOFTPROMPT_SIMD
  constexpr int L = simd::kLanes<T>;
  for (; i + L <= n; i += L) simd::store(y + i, simd::exp<T>(simd::load(x + i)));
#endif
  for (; i < n; ++i) y[i] = std::exp(x[i]);
}

// sigmoid(x) from e = exp(-|x|), exact in both tails.
template <typename T>
inline T sigmoid(T x, T e) {
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// One thread-private scratch row, reused across calls.
template <typename T>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

}  // namespace

template <typename T>
void rmsnorm_forward(int64_t N, int64_t C, const T* x, const T* w, T eps, T* y, T* rstd) {
  const int nt = threads_for(4.0 * N * C);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * C;
    T* yr = y + n * C;
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const T r = T(1) / std::sqrt(ss / T(C) + eps);
    rstd[n] = r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * r * w[c];
  }
}

template <typename T>
void rmsnorm_backward(int64_t N, int64_t C, const T* dy, const T* x, const T* rstd, const T* w,
                      const T* residual, T* dx) {
  // dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd
  const int nt = threads_for(8.0 * N * C);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T *dyr = dy + n * C, *xr = x + n * C;
    T* dxr = dx + n * C;
    const T r = rstd[n];
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += dyr[c] * w[c] * xr[c];
    const T m = dot * r * r / T(C);  // mean(g * xhat) * rstd, folded into one factor
    if (residual) {
      const T* res = residual + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dxr[c] = res[c] + r * (dyr[c] * w[c] - xr[c] * m);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dxr[c] = r * (dyr[c] * w[c] - xr[c] * m);
    }
  }
}

template <typename T>
void swiglu_forward(int64_t N, int64_t F, const T* gu, T* a) {
  const int nt = threads_for(20.0 * N * F);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T *g = gu + n * 2 * F, *u = g + F;
    T* ar = a + n * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) ar[f] = -std::abs(g[f]);
    exp_row(F, ar, ar);  // e = exp(-|g|) never overflows
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) ar[f] = g[f] * sigmoid(g[f], ar[f]) * u[f];
  }
}

template <typename T>
void swiglu_backward(int64_t N, int64_t F, const T* da, const T* gu, T* dgu) {
  // d silu(g)/dg = sig * (1 + g * (1 - sig))
  const int nt = threads_for(24.0 * N * F);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T *g = gu + n * 2 * F, *u = g + F, *d = da + n * F;
    T *dg = dgu + n * 2 * F, *du = dg + F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) dg[f] = -std::abs(g[f]);
    exp_row(F, dg, dg);
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const T sig = sigmoid(g[f], dg[f]);
      du[f] = d[f] * g[f] * sig;
      dg[f] = d[f] * u[f] * sig * (T(1) + g[f] * (T(1) - sig));
    }
  }
}

template <typename T>
void rope_split(int64_t N, int64_t H, int64_t Hkv, int64_t D, const T* qkv, const T* cos,
                const T* sin, T* q, T* k, T* v) {
  const int64_t half = D / 2, W = (H + 2 * Hkv) * D;
  const int nt = threads_for(4.0 * N * W);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = qkv + n * W, *c = cos + n * half, *s = sin + n * half;
    for (int64_t h = 0; h < H + Hkv; ++h) {
      const T* x = row + h * D;
      T* y = h < H ? q + (n * H + h) * D : k + (n * Hkv + h - H) * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        y[i] = x[i] * c[i] - x[i + half] * s[i];
        y[i + half] = x[i + half] * c[i] + x[i] * s[i];
      }
    }
    const T* xv = row + (H + Hkv) * D;
    T* yv = v + n * Hkv * D;
#pragma omp simd
    for (int64_t i = 0; i < Hkv * D; ++i) yv[i] = xv[i];
  }
}

template <typename T>
void rope_merge(int64_t N, int64_t H, int64_t Hkv, int64_t D, const T* dq, const T* dk,
                const T* dv, const T* cos, const T* sin, T* dqkv) {
  const int64_t half = D / 2, W = (H + 2 * Hkv) * D;
  const int nt = threads_for(4.0 * N * W);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* row = dqkv + n * W;
    const T *c = cos + n * half, *s = sin + n * half;
    for (int64_t h = 0; h < H + Hkv; ++h) {
      const T* y = h < H ? dq + (n * H + h) * D : dk + (n * Hkv + h - H) * D;
      T* x = row + h * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {  // the rotation by -angle
        x[i] = y[i] * c[i] + y[i + half] * s[i];
        x[i + half] = y[i + half] * c[i] - y[i] * s[i];
      }
    }
    const T* yv = dv + n * Hkv * D;
    T* xv = row + (H + Hkv) * D;
#pragma omp simd
    for (int64_t i = 0; i < Hkv * D; ++i) xv[i] = yv[i];
  }
}

template <typename T>
void softmax_cross_entropy(int64_t N, int64_t V, T* logits, const int64_t* labels, double scale,
                           double* loss) {
  const int nt = threads_for(10.0 * N * V);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* z = logits + n * V;
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < V; ++i) mx = z[i] > mx ? z[i] : mx;
    const T target = z[labels[n]];
    T* e = scratch<T>(V);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) e[i] = z[i] - mx;
    exp_row(V, e, e);
    // The sum in float64: 50k terms in float32 would lose ~1e-5 of the loss here.
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < V; ++i) sum += double(e[i]);
    loss[n] = std::log(sum) + double(mx) - double(target);
    const T f = T(scale / sum);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) z[i] = e[i] * f;
    z[labels[n]] -= T(scale);
  }
}

#define SOFTPROMPT_LAYERS(T)                                                                    \
  template void rmsnorm_forward<T>(int64_t, int64_t, const T*, const T*, T, T*, T*);            \
  template void rmsnorm_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*,   \
                                    const T*, T*);                                              \
  template void swiglu_forward<T>(int64_t, int64_t, const T*, T*);                              \
  template void swiglu_backward<T>(int64_t, int64_t, const T*, const T*, T*);                   \
  template void rope_split<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, \
                              T*, T*, T*);                                                      \
  template void rope_merge<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, \
                              const T*, const T*, T*);                                          \
  template void softmax_cross_entropy<T>(int64_t, int64_t, T*, const int64_t*, double, double*);
SOFTPROMPT_LAYERS(float)
SOFTPROMPT_LAYERS(double)
#undef SOFTPROMPT_LAYERS

}  // namespace softprompt
