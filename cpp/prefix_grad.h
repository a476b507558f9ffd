// Where the attention backward writes the prefix's gradient. A per-row prefix [B, P, Hkv, D] gets
// its own rows; a shared prefix [P, Hkv, D] gets one slot per batch row, summed over the batch in
// batch order at the end: the result does not depend on which thread handled which row.
#pragma once
#include <cstdint>
#include <vector>

#include "prefix_attention.h"

namespace softprompt {

template <typename T>
class PrefixGradient {
 public:
  PrefixGradient(const AttentionShape& s, T* dprefix_k, T* dprefix_v)
      : s_(s), out_k_(dprefix_k), out_v_(dprefix_v), k_(dprefix_k), v_(dprefix_v) {
    const int64_t n = s.P * s.Hkv * s.D;
    if (!s.prefix_per_row && s.P > 0 && s.B > 1) {
      slots_.resize(2 * s.B * n);
      k_ = slots_.data();
      v_ = slots_.data() + s.B * n;
    }
  }

  // First element of (b, kv head)'s rows [P, D] (row stride Hkv * D) in the key / value gradient.
  T* key(int64_t b, int64_t hk) const { return s_.P ? k_ + offset(b, hk) : nullptr; }
  T* value(int64_t b, int64_t hk) const { return s_.P ? v_ + offset(b, hk) : nullptr; }

  // Sums the slots into the outputs. Call inside the parallel region, after the work items
  // (an `omp for` with its barrier).
  void reduce() {
    if (slots_.empty()) return;
    const int64_t n = s_.P * s_.Hkv * s_.D, stride = s_.B * n;
#pragma omp for schedule(static)
    for (int64_t e = 0; e < 2 * n; ++e) {
      const T* src = slots_.data() + (e < n ? e : stride + e - n);
      T acc = src[0];
      for (int64_t b = 1; b < s_.B; ++b) acc += src[b * n];
      (e < n ? out_k_[e] : out_v_[e - n]) = acc;
    }
  }

 private:
  int64_t offset(int64_t b, int64_t hk) const {
    const bool per_row = s_.prefix_per_row || !slots_.empty();
    return (per_row ? b * s_.P * s_.Hkv * s_.D : 0) + hk * s_.D;
  }

  const AttentionShape& s_;
  T *out_k_, *out_v_, *k_, *v_;
  std::vector<T> slots_;
};

}  // namespace softprompt
