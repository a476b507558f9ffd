// Prefix attention, the Eigen variant (see attention_simd.cpp for the fast one), FlashAttention-style: a query block meets the keys chunk by chunk
// (the prefix and the input keys are two ranges, never concatenated), the softmax is online across
// chunks, and only the log-sum-exp is kept for the backward, which recomputes the probabilities.
// Extra memory is O(threads * block * chunk), never a [T, P+S] matrix for the whole batch.
//
// Forward work item: (b, h, query block); every item writes its own rows, so results do not depend
// on the thread count. Backward work item: (b, kv head); it owns dk/dv of that head and dq of the
// query heads in its group, and writes the shared prefix's gradient into a per-row slot that is
// summed over the batch in a fixed order afterwards (bitwise identical for any thread count).
#include "prefix_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "prefix_grad.h"
#include "threads.h"

namespace softprompt {
namespace {

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <typename T>
using ConstRows = Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>;  // strided rows of D
template <typename T>
using Rows = Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>>;
template <typename T>
using Block = Eigen::Map<RowMat<T>>;  // a contiguous scratch matrix

constexpr int64_t kQueryBlock = 64;   // queries per work item
constexpr int64_t kKeyChunk = 1024;   // input keys per chunk; beyond it the softmax goes online

// The keys of chunk c: chunk 0 holds all P prefix keys and input keys [0, j1); later chunks
// hold input keys [j0, j1) only. Columns of a score block follow that order.
struct Chunk {
  int64_t np, j0, j1;
  int64_t cols() const { return np + j1 - j0; }
};

// Calls f(chunk) for the keys visible to some query of a block whose input keys end at in_end.
template <class F>
void for_each_chunk(int64_t P, int64_t in_end, F&& f) {
  const int64_t first = std::min(in_end, kKeyChunk);
  if (P + first > 0) f(Chunk{P, 0, first});
  for (int64_t j0 = first; j0 < in_end; j0 += kKeyChunk)
    f(Chunk{0, j0, std::min(in_end, j0 + kKeyChunk)});
}

// Pointers to one (batch row, kv head) of keys and values, prefix and input, and the masks.
template <typename T>
struct HeadView {
  const AttentionShape& s;
  int64_t b, hk;
  const T *k, *v, *pk, *pv;
  const uint8_t* keep;  // key_padding_mask row b, or nullptr

  HeadView(const AttentionShape& s_, int64_t b_, int64_t hk_, const T* k_all, const T* v_all,
           const T* pk_all, const T* pv_all, const uint8_t* mask)
      : s(s_), b(b_), hk(hk_) {
    const int64_t kv_row = s.Hkv * s.D;
    k = k_all + (b * s.S) * kv_row + hk * s.D;
    v = v_all + (b * s.S) * kv_row + hk * s.D;
    const int64_t poff = (s.prefix_per_row ? b * s.P * kv_row : 0) + hk * s.D;
    pk = s.P ? pk_all + poff : nullptr;
    pv = s.P ? pv_all + poff : nullptr;
    keep = mask ? mask + b * s.S : nullptr;
  }
  int64_t stride() const { return s.Hkv * s.D; }
  ConstRows<T> prefix_keys() const { return {pk, s.P, s.D, Eigen::OuterStride<>(stride())}; }
  ConstRows<T> prefix_values() const { return {pv, s.P, s.D, Eigen::OuterStride<>(stride())}; }
  ConstRows<T> keys(int64_t j0, int64_t j1) const {
    return {k + j0 * stride(), j1 - j0, s.D, Eigen::OuterStride<>(stride())};
  }
  ConstRows<T> values(int64_t j0, int64_t j1) const {
    return {v + j0 * stride(), j1 - j0, s.D, Eigen::OuterStride<>(stride())};
  }
  // Last input key visible to every query of the block starting at i0 is i0 + (S - T).
  int64_t input_end(int64_t i1) const {
    return s.causal ? std::clamp<int64_t>(i1 + s.S - s.T, 0, s.S) : s.S;
  }
};

// Sets the scores of hidden keys to `fill`: padded input keys, with causal input keys
// j > i + (S - T) for query i, and keys (prefix ones too) outside a sliding window.
// scores [n, c.cols()] for queries i0 .. i0+n-1.
template <typename T>
void fill_hidden(Block<T>& scores, const HeadView<T>& hv, const Chunk& c, int64_t i0, T fill) {
  const int64_t n = scores.rows();
  if (hv.keep) {
    for (int64_t j = c.j0; j < c.j1; ++j)
      if (!hv.keep[j]) scores.col(c.np + j - c.j0).setConstant(fill);
  }
  if (hv.s.causal) {
    const int64_t shift = hv.s.S - hv.s.T;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t first_hidden = std::max(c.j0, i0 + r + shift + 1);
      for (int64_t j = first_hidden; j < c.j1; ++j) scores(r, c.np + j - c.j0) = fill;
    }
  }
  if (hv.s.window) {  // keys at positions <= x - window for the query at x (AttentionShape)
    const int64_t P = hv.s.P, shift = hv.s.S - hv.s.T;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t lo = P + i0 + r + shift - hv.s.window + 1;  // the first position it sees
      for (int64_t p = 0; p < std::min(c.np, lo); ++p) scores(r, p) = fill;
      for (int64_t j = c.j0; j < std::min(c.j1, lo - P); ++j) scores(r, c.np + j - c.j0) = fill;
    }
  }
}

// scores [n, cols] = qs [n, D] . [prefix keys | input keys j0..j1]^T
template <typename T>
void chunk_scores(Block<T>& scores, const Block<T>& qs, const HeadView<T>& hv, const Chunk& c) {
  if (c.np) scores.leftCols(c.np).noalias() = qs * hv.prefix_keys().transpose();
  if (c.j1 > c.j0)
    scores.rightCols(c.j1 - c.j0).noalias() = qs * hv.keys(c.j0, c.j1).transpose();
}

// Per-thread scratch, sized for one query block against the widest chunk. Eigen vectors start
// 64-byte aligned, so vectorized reductions peel the same way on every thread: the results do
// not depend on which thread ran an item.
template <typename T>
struct Scratch {
  Vec<T> qs, scores, dscores, acc, tanh;  // tanh: the backward's tanh(s / softcap)
  Vec<T> m, l, alpha, aux;
  explicit Scratch(const AttentionShape& s) {
    const int64_t width = s.P + std::min(s.S, kKeyChunk);
    qs.resize(kQueryBlock * s.D);
    acc.resize(kQueryBlock * s.D);
    scores.resize(kQueryBlock * width);
    dscores.resize(kQueryBlock * width);
    if (s.softcap) tanh.resize(kQueryBlock * width);
    m.resize(kQueryBlock), l.resize(kQueryBlock), alpha.resize(kQueryBlock), aux.resize(kQueryBlock);
  }
};

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

// Rows r of p whose stat[r] is NaN become all NaN.
template <typename T, typename Stat>
void nan_rows(Block<T>& p, const Stat& stat) {
  for (int64_t r = 0; r < p.rows(); ++r)
    if (std::isnan(stat[r])) p.row(r).setConstant(kNaN<T>);
}

// One work item of the forward: queries [i0, i0+n) of head h in batch row b.
template <typename T>
void forward_block(const AttentionShape& s, Scratch<T>& w, const HeadView<T>& hv, int64_t h,
                   int64_t i0, int64_t n, const T* q, T* out, T* lse) {
  const T ninf = T(kNegInf);
  const int64_t row = s.H * s.D;
  ConstRows<T> qrows(q + ((hv.b * s.T + i0) * s.H + h) * s.D, n, s.D, Eigen::OuterStride<>(row));
  Block<T> qs(w.qs.data(), n, s.D), acc(w.acc.data(), n, s.D);
  qs.noalias() = T(s.scale) * qrows;  // prescaled queries: scores come out scaled
  auto m = w.m.head(n), l = w.l.head(n), alpha = w.alpha.head(n), msafe = w.aux.head(n);
  m.setConstant(ninf);
  bool first = true;
  for_each_chunk(s.P, hv.input_end(i0 + n), [&](const Chunk& c) {
    Block<T> p(w.scores.data(), n, c.cols());
    chunk_scores(p, qs, hv, c);
    if (s.softcap) p.array() = T(s.softcap) * (p.array() * T(1 / s.softcap)).tanh();
    fill_hidden(p, hv, c, i0, ninf);
    // Online softmax: rescale what came before by exp(m_old - m_new). A NaN score (hidden ones
    // are -inf by now) makes its row's max NaN, and the whole row NaN, as any softmax would.
    bool any_nan = false;
    for (int64_t r = 0; r < n; ++r) {
      const T cmax = p.row(r).template maxCoeff<Eigen::PropagateNaN>();
      const T m_new = std::isnan(m[r]) || std::isnan(cmax) ? kNaN<T> : std::max(m[r], cmax);
      msafe[r] = m_new == ninf ? T(0) : m_new;  // a row hidden so far stays all zero
      alpha[r] = m[r] == ninf ? T(0) : std::exp(m[r] - m_new);
      m[r] = m_new;
      any_nan |= std::isnan(m_new);
    }
    p.array().colwise() -= msafe.array();
    p.array() = (p.array() == ninf).select(T(0), p.array().exp());  // exp(-inf) = 0 exactly
    if (any_nan) nan_rows(p, msafe);  // Eigen's vectorized exp need not keep a NaN
    fill_hidden(p, hv, c, i0, T(0));  // exact zeros, not exp(-inf) ~ 1e-39
    const int64_t nin = c.j1 - c.j0;
    if (first) {
      l = p.rowwise().sum();
      if (c.np) acc.noalias() = p.leftCols(c.np) * hv.prefix_values();
      if (c.np && nin) acc.noalias() += p.rightCols(nin) * hv.values(c.j0, c.j1);
      if (!c.np) acc.noalias() = p.rightCols(nin) * hv.values(c.j0, c.j1);
      first = false;
    } else {
      l = alpha.cwiseProduct(l) + p.rowwise().sum();
      acc.array().colwise() *= alpha.array();
      acc.noalias() += p * hv.values(c.j0, c.j1);
    }
  });
  Rows<T> o(out + ((hv.b * s.T + i0) * s.H + h) * s.D, n, s.D, Eigen::OuterStride<>(row));
  T* lse_row = lse + (hv.b * s.H + h) * s.T + i0;
  for (int64_t r = 0; r < n; ++r) {
    if (first || l[r] == T(0)) {  // no visible key: zeros, never NaN
      o.row(r).setZero();
      lse_row[r] = ninf;
    } else {
      o.row(r) = acc.row(r) / l[r];
      lse_row[r] = m[r] + std::log(l[r]);
    }
  }
}

// One query block's share of the backward for head h, accumulating into dk/dv (this kv head),
// the prefix gradient rows dpk/dpv [P, D], and writing dq.
//   p = exp(scores - lse);  dv += p^T do;  dp = do v^T;  ds = p * (dp - rowsum(do * o));
//   (soft-capping: scores = c tanh(s / c), and ds *= 1 - tanh^2);  dq = scale * ds k;
//   dk += ds^T (scale q)
template <typename T>
void backward_block(const AttentionShape& s, Scratch<T>& w, const HeadView<T>& hv, int64_t h,
                    int64_t i0, int64_t n, const T* dout, const T* q, const T* out, const T* lse,
                    T* dq, Rows<T>& dk, Rows<T>& dv, Rows<T>& dpk, Rows<T>& dpv) {
  const T ninf = T(kNegInf);
  const int64_t row = s.H * s.D;
  const int64_t off = ((hv.b * s.T + i0) * s.H + h) * s.D;
  ConstRows<T> qrows(q + off, n, s.D, Eigen::OuterStride<>(row));
  ConstRows<T> dorows(dout + off, n, s.D, Eigen::OuterStride<>(row));
  ConstRows<T> orows(out + off, n, s.D, Eigen::OuterStride<>(row));
  Block<T> qs(w.qs.data(), n, s.D), dqacc(w.acc.data(), n, s.D);
  qs.noalias() = T(s.scale) * qrows;
  dqacc.setZero();
  auto delta = w.l.head(n), lse_n = w.m.head(n);
  delta = dorows.cwiseProduct(orows).rowwise().sum();
  const T* lse_row = lse + (hv.b * s.H + h) * s.T + i0;
  bool any_hidden_row = false, any_nan = false;
  for (int64_t r = 0; r < n; ++r) {
    lse_n[r] = lse_row[r] == ninf ? T(0) : lse_row[r];  // a NaN lse stays: its gradients are NaN
    any_hidden_row |= lse_row[r] == ninf;
    any_nan |= std::isnan(lse_row[r]);
  }
  for_each_chunk(s.P, hv.input_end(i0 + n), [&](const Chunk& c) {
    Block<T> p(w.scores.data(), n, c.cols()), ds(w.dscores.data(), n, c.cols());
    chunk_scores(p, qs, hv, c);
    Block<T> th(s.softcap ? w.tanh.data() : nullptr, s.softcap ? n : 0, s.softcap ? c.cols() : 0);
    if (s.softcap) {
      th = (p.array() * T(1 / s.softcap)).tanh();
      p.array() = T(s.softcap) * th.array();
    }
    p.array().colwise() -= lse_n.array();
    p.array() = (p.array() == ninf).select(T(0), p.array().exp());  // exp(-inf) = 0 exactly
    if (any_nan) nan_rows(p, lse_n);
    fill_hidden(p, hv, c, i0, T(0));
    if (any_hidden_row)
      for (int64_t r = 0; r < n; ++r)
        if (lse_row[r] == ninf) p.row(r).setZero();
    const int64_t nin = c.j1 - c.j0;
    // ds = p * (do v^T - delta)
    if (c.np) ds.leftCols(c.np).noalias() = dorows * hv.prefix_values().transpose();
    if (nin) ds.rightCols(nin).noalias() = dorows * hv.values(c.j0, c.j1).transpose();
    ds.array().colwise() -= delta.array();
    ds.array() *= p.array();
    if (s.softcap) ds.array() *= T(1) - th.array().square();  // d capped / d s
    if (c.np) {
      dpv.noalias() += p.leftCols(c.np).transpose() * dorows;
      dpk.noalias() += ds.leftCols(c.np).transpose() * qs;
      dqacc.noalias() += ds.leftCols(c.np) * hv.prefix_keys();
    }
    if (nin) {
      dv.middleRows(c.j0, nin).noalias() += p.rightCols(nin).transpose() * dorows;
      dk.middleRows(c.j0, nin).noalias() += ds.rightCols(nin).transpose() * qs;
      dqacc.noalias() += ds.rightCols(nin) * hv.keys(c.j0, c.j1);
    }
  });
  Rows<T> dqrows(dq + off, n, s.D, Eigen::OuterStride<>(row));
  dqrows.noalias() = T(s.scale) * dqacc;
}

}  // namespace

template <typename T>
void prefix_attention_forward_eigen(const AttentionShape& s, const T* q, const T* k, const T* v,
                              const T* prefix_k, const T* prefix_v,
                              const uint8_t* key_padding_mask, T* out, T* lse) {
  const int64_t nblocks = (s.T + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = s.B * s.H * nblocks;
  const int64_t group = s.H / s.Hkv;
  const int nt = threads_for(4.0 * s.B * s.H * s.T * (s.P + s.S) * s.D);
#pragma omp parallel num_threads(nt)
  {
    Scratch<T> w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / (s.H * nblocks), h = item / nblocks % s.H, blk = item % nblocks;
      const HeadView<T> hv(s, b, h / group, k, v, prefix_k, prefix_v, key_padding_mask);
      const int64_t i0 = blk * kQueryBlock;
      forward_block(s, w, hv, h, i0, std::min(kQueryBlock, s.T - i0), q, out, lse);
    }
  }
}

template <typename T>
void prefix_attention_backward_eigen(const AttentionShape& s, const T* dout, const T* q, const T* k,
                               const T* v, const T* prefix_k, const T* prefix_v,
                               const uint8_t* key_padding_mask, const T* out, const T* lse,
                               T* dq, T* dk, T* dv, T* dprefix_k, T* dprefix_v) {
  const int64_t group = s.H / s.Hkv, kv_row = s.Hkv * s.D;
  const int64_t items = s.B * s.Hkv;
  PrefixGradient<T> dprefix(s, dprefix_k, dprefix_v);
  const int nt = threads_for(10.0 * s.B * s.H * s.T * (s.P + s.S) * s.D);
#pragma omp parallel num_threads(nt)
  {
    Scratch<T> w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / s.Hkv, hk = item % s.Hkv;
      const HeadView<T> hv(s, b, hk, k, v, prefix_k, prefix_v, key_padding_mask);
      const int64_t koff = b * s.S * kv_row + hk * s.D;
      Rows<T> dkh(dk + koff, s.S, s.D, Eigen::OuterStride<>(kv_row));
      Rows<T> dvh(dv + koff, s.S, s.D, Eigen::OuterStride<>(kv_row));
      Rows<T> dpk(dprefix.key(b, hk), s.P, s.D, Eigen::OuterStride<>(kv_row));
      Rows<T> dpv(dprefix.value(b, hk), s.P, s.D, Eigen::OuterStride<>(kv_row));
      dkh.setZero(), dvh.setZero(), dpk.setZero(), dpv.setZero();
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t i0 = 0; i0 < s.T; i0 += kQueryBlock)
          backward_block(s, w, hv, h, i0, std::min(kQueryBlock, s.T - i0), dout, q, out, lse, dq,
                         dkh, dvh, dpk, dpv);
    }
    dprefix.reduce();
  }
}

#define SOFTPROMPT_INSTANTIATE(T)                                                              \
  template void prefix_attention_forward_eigen<T>(const AttentionShape&, const T*, const T*,   \
                                                  const T*, const T*, const T*,                \
                                                  const uint8_t*, T*, T*);                     \
  template void prefix_attention_backward_eigen<T>(                                           \
      const AttentionShape&, const T*, const T*, const T*, const T*, const T*, const T*,       \
      const uint8_t*, const T*, const T*, T*, T*, T*, T*, T*);
SOFTPROMPT_INSTANTIATE(float)
SOFTPROMPT_INSTANTIATE(double)
#undef SOFTPROMPT_INSTANTIATE

// ------------------------------------------------------------------------- dispatch
namespace {
#ifdef SOFTPROMPT_SIMD
std::atomic<AttentionKernel> g_kernel{AttentionKernel::simd};
#else
std::atomic<AttentionKernel> g_kernel{AttentionKernel::eigen};
#endif
}  // namespace

bool has_simd_kernel() {
#ifdef SOFTPROMPT_SIMD
  return true;
#else
  return false;
#endif
}
void set_attention_kernel(AttentionKernel kernel) {
  g_kernel = has_simd_kernel() ? kernel : AttentionKernel::eigen;
}
AttentionKernel attention_kernel() { return g_kernel; }

template <typename T>
void prefix_attention_forward(const AttentionShape& s, const T* q, const T* k, const T* v,
                              const T* prefix_k, const T* prefix_v,
                              const uint8_t* key_padding_mask, T* out, T* lse) {
#ifdef SOFTPROMPT_SIMD
  if (g_kernel == AttentionKernel::simd)
    return prefix_attention_forward_simd(s, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse);
#endif
  prefix_attention_forward_eigen(s, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse);
}

template <typename T>
void prefix_attention_backward(const AttentionShape& s, const T* dout, const T* q, const T* k,
                               const T* v, const T* prefix_k, const T* prefix_v,
                               const uint8_t* key_padding_mask, const T* out, const T* lse,
                               T* dq, T* dk, T* dv, T* dprefix_k, T* dprefix_v) {
#ifdef SOFTPROMPT_SIMD
  if (g_kernel == AttentionKernel::simd)
    return prefix_attention_backward_simd(s, dout, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                          out, lse, dq, dk, dv, dprefix_k, dprefix_v);
#endif
  prefix_attention_backward_eigen(s, dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out,
                                  lse, dq, dk, dv, dprefix_k, dprefix_v);
}

template void prefix_attention_forward<float>(const AttentionShape&, const float*, const float*,
                                              const float*, const float*, const float*,
                                              const uint8_t*, float*, float*);
template void prefix_attention_forward<double>(const AttentionShape&, const double*,
                                               const double*, const double*, const double*,
                                               const double*, const uint8_t*, double*, double*);
template void prefix_attention_backward<float>(const AttentionShape&, const float*, const float*,
                                               const float*, const float*, const float*,
                                               const float*, const uint8_t*, const float*,
                                               const float*, float*, float*, float*, float*,
                                               float*);
template void prefix_attention_backward<double>(const AttentionShape&, const double*,
                                                const double*, const double*, const double*,
                                                const double*, const double*, const uint8_t*,
                                                const double*, const double*, double*, double*,
                                                double*, double*, double*);

}  // namespace softprompt
