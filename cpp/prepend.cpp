// The prompt prepend is pure data movement: row copies forward, copies plus a batch sum backward.
#include "prepend.h"

#include <cstring>

#include "threads.h"

namespace softprompt {

template <typename Scalar>
void prepend_forward(int64_t B, int64_t P, int64_t T, int64_t D, const Scalar* prompt, bool per_row,
                     const Scalar* x, Scalar* y) {
  const int64_t pn = P * D, xn = T * D;
  const int nt = threads_for(double(B) * (pn + xn));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    Scalar* yb = y + b * (pn + xn);
    if (pn) std::memcpy(yb, prompt + (per_row ? b * pn : 0), sizeof(Scalar) * pn);
    std::memcpy(yb + pn, x + b * xn, sizeof(Scalar) * xn);
  }
}

template <typename Scalar>
void prepend_backward(int64_t B, int64_t P, int64_t T, int64_t D, const Scalar* dy, bool shared,
                      Scalar* dprompt, Scalar* dx) {
  const int64_t pn = P * D, xn = T * D, yn = pn + xn;
  const int nt = threads_for(double(B) * yn);
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(dx + b * xn, dy + b * yn + pn, sizeof(Scalar) * xn);
      if (!shared && pn) std::memcpy(dprompt + b * pn, dy + b * yn, sizeof(Scalar) * pn);
    }
    if (shared) {
      // dprompt[e] = sum_b dy[b, e], batch order fixed for every element.
      constexpr int64_t kTile = 1024;
#pragma omp for schedule(static)
      for (int64_t e0 = 0; e0 < pn; e0 += kTile) {
        const int64_t e1 = e0 + kTile < pn ? e0 + kTile : pn;
        Scalar* out = dprompt + e0;
        std::memcpy(out, dy + e0, sizeof(Scalar) * (e1 - e0));
        for (int64_t b = 1; b < B; ++b) {
          const Scalar* src = dy + b * yn + e0;
          for (int64_t e = 0; e < e1 - e0; ++e) out[e] += src[e];
        }
      }
    }
  }
}

template void prepend_forward<float>(int64_t, int64_t, int64_t, int64_t, const float*, bool,
                                     const float*, float*);
template void prepend_forward<double>(int64_t, int64_t, int64_t, int64_t, const double*, bool,
                                      const double*, double*);
template void prepend_backward<float>(int64_t, int64_t, int64_t, int64_t, const float*, bool,
                                      float*, float*);
template void prepend_backward<double>(int64_t, int64_t, int64_t, int64_t, const double*, bool,
                                       double*, double*);

}  // namespace softprompt
