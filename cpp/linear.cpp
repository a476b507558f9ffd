// Frozen linear layers as one GEMM each: C[M, N] = A[M, K] B[K, N] with B packed, 64 columns at a
// time, into a [min(K, 1024), 64] panel per thread (forward: B = W^T, backward: B = W), dequantized on the
// way when W is quantized. The micro-kernel and the tile loop are simd.h's; the panel stays in L2
// while every row of A passes over it.
#include "linear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"
#include "threads.h"

namespace softprompt {
namespace {

constexpr int64_t kPanel = 64;        // B columns per panel (a multiple of 32: whole quantized blocks)
constexpr int64_t kMaxDepth = 1024;   // rows of B per packed block: 256 KB stay in L2 while row tiles of
                                      // A (6 x 1024 floats, in L1) pass over it; a multiple of 256
                                      // (on 2 AMD EPYC cores the best of 512, 1024, 3072, or within
                                      // noise of it, on SmolLM2's and Llama-3.2-1B's GEMM shapes)
constexpr int64_t kEdgeRows = 256;    // rows per pass over a ragged last panel

// A packed panel holds 64 columns of B as kPanel / kSlice slices, each [kc, kSlice] contiguous: the
// micro-kernel's kSlice columns (2 AVX2 vectors, 4 AVX-512 ones), so it streams its B rows from
// consecutive addresses. Element (k, j) of the panel is at (j / kSlice) * kc * kSlice + k * kSlice
// + j % kSlice.
constexpr int64_t kSlice = simd::kTileVecs * simd::kLanes<float>;
static_assert(kPanel % kSlice == 0, "a panel is whole slices");

// The panel = rows [k0, k0 + kc) and columns [n0, n0 + width) of W^T, zero beyond width.
// scratch: 64 * kc floats.
void pack_transposed(const Weight& w, int64_t n0, int64_t width, int64_t k0, int64_t kc, float* dst,
                     std::vector<float>& scratch) {
  const float* src = reinterpret_cast<const float*>(w.data) + n0 * w.cols + k0;
  int64_t lds = w.cols;
  if (w.format != WeightFormat::f32) {
    scratch.resize(size_t(kPanel * kc));
    for (int64_t j = 0; j < width; ++j) dequantize_row(w, n0 + j, k0, kc, scratch.data() + j * kc);
    src = scratch.data(), lds = kc;
  }
  if (width < kPanel) std::fill(dst, dst + kPanel * kc, 0.0f);
  for (int64_t j0 = 0; j0 < width; j0 += kSlice)
    simd::transpose<float>(src + j0 * lds, lds, dst + j0 * kc, kSlice, std::min(kSlice, width - j0), kc, 1.0f);
}

// The panel = rows [k0, k0 + kc) and columns [n0, n0 + width) of W, zero beyond width. The walk
// reads a short piece of each row (rows are hundreds of bytes apart), which the hardware prefetcher
// left to miss: an LM head's panel (49,152 rows) waited on memory once per row. So each row's piece
// is prefetched kAhead rows early.
constexpr int64_t kAhead = 16;
void pack_rows(const Weight& w, int64_t n0, int64_t width, int64_t k0, int64_t kc, float* dst) {
  float row[kPanel];
  std::fill(row + width, row + kPanel, 0.0f);
  const int64_t row_bytes = w.row_bytes(), be = block_elems(w.format), bb = block_bytes(w.format);
  // bytes [first, first + span) of a row hold columns [n0, n0 + width) (k-quants: whole super-blocks)
  const int64_t first = n0 / be * bb, span = ((n0 + width + be - 1) / be - n0 / be) * bb;
  for (int64_t k = 0; k < kc; ++k) {
    if (k + kAhead < kc) {
      simd::prefetch(w.data + (k0 + k + kAhead) * row_bytes + first, span);
    }
    dequantize_row(w, k0 + k, n0, width, row);
    for (int64_t j0 = 0; j0 < kPanel; j0 += kSlice) std::memcpy(dst + j0 * kc + k * kSlice, row + j0, kSlice * sizeof(float));
  }
}

// c[rows, 64] (=, or += with accumulate) a[rows, kc] (row stride lda) panel: row tiles outer, the
// panel's slices inner, so a tile's rows of A stay in L1 while the panel (in L2) passes under them
// (columns outer would stream all of A from L3 once per slice).
void panel_product(int64_t rows, int64_t kc, const float* a, int64_t lda, const float* panel, float* c,
                   int64_t ldc, bool accumulate) {
  constexpr int64_t R = simd::kTileRows;
  constexpr int V = simd::kTileVecs;
  int64_t m = 0;
  for (; m + R <= rows; m += R)  // whole tiles straight to the micro-kernel (no dispatch per tile)
    for (int64_t j0 = 0; j0 < kPanel; j0 += kSlice) {
      if (accumulate) simd::tile<float, R, V, true>(kc, a + m * lda, lda, 1, panel + j0 * kc, kSlice, c + m * ldc + j0, ldc);
      else simd::tile<float, R, V, false>(kc, a + m * lda, lda, 1, panel + j0 * kc, kSlice, c + m * ldc + j0, ldc);
    }
  if (m < rows)
    for (int64_t j0 = 0; j0 < kPanel; j0 += kSlice)
      simd::matmul<float>(rows - m, V, kc, a + m * lda, lda, 1, panel + j0 * kc, kSlice, c + m * ldc + j0, ldc,
                          accumulate);
}

// C[M, N] = A[M, K] B[K, N] (+ bias [N]); pack(n0, width, k0, kc, dst, scratch) fills a [kc, 64]
// block of B's panel at columns n0. Every row of C is summed in the same k order whatever M and
// the thread count, so a row's result does not depend on which rows come with it.
template <typename Pack>
void gemm(int64_t M, int64_t K, int64_t N, const float* A, float* C, const float* bias, Pack pack) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: zeros (plus the bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * N + n] = bias ? bias[n] : 0.0f;
    return;
  }
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int nt = threads_for(2.0 * double(M) * double(N) * double(K));
  // Work items: whole panels (all M rows) while they divide evenly over the threads; the last
  // panels % nt panels are split into row chunks, one per thread, so that no thread waits
  // (SmolLM2's 576 = 9 panels: 8 whole, 1 split). A split panel is packed by every thread that
  // takes a chunk of it, so only the remainder is split, not every panel.
  const int64_t row_tiles = (M + simd::kTileRows - 1) / simd::kTileRows;
  const int64_t split = panels >= 8 * nt ? 0 : panels % nt;  // many panels: imbalance is small
  const int64_t whole = panels - split;
  const int64_t chunks = split ? std::min<int64_t>(nt, row_tiles) : 1;
  const int64_t chunk_rows = (row_tiles + chunks - 1) / chunks * simd::kTileRows;
  const int64_t items = whole + split * chunks;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    thread_local std::vector<float> panel, scratch, edge;  // bounded: <= 768 KB, 768 KB, 64 KB
    panel.resize(size_t(std::min(K, kMaxDepth) * kPanel));
    edge.resize(size_t(kEdgeRows * kPanel));
    int64_t packed_panel = -1, packed_depth = -1;
    // Items from a shared counter, not a fixed share per thread: a thread slowed by another
    // process on its core takes fewer (the result does not depend on who computes an item).
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const bool whole_item = item < whole;
      const int64_t p = whole_item ? item : whole + (item - whole) % split;
      const int64_t m0 = whole_item ? 0 : (item - whole) / split * chunk_rows;
      const int64_t rows = whole_item ? M : std::min(M, m0 + chunk_rows) - m0;
      if (rows <= 0) continue;
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      // A ragged last panel goes through a full-width side buffer, kEdgeRows rows at a time.
      const bool ragged = width < kPanel;
      for (int64_t r0 = 0; r0 < rows; r0 += ragged ? kEdgeRows : rows) {
        const int64_t nr = std::min(rows - r0, ragged ? kEdgeRows : rows);
        float* c = ragged ? edge.data() : C + (m0 + r0) * N + n0;
        const int64_t ldc = ragged ? kPanel : N;
        for (int64_t k0 = 0; k0 < K; k0 += kMaxDepth) {
          const int64_t kc = std::min(kMaxDepth, K - k0);
          if (packed_panel != p || packed_depth != k0) {
            pack(n0, width, k0, kc, panel.data(), scratch);
            packed_panel = p, packed_depth = k0;
          }
          panel_product(nr, kc, A + (m0 + r0) * K + k0, K, panel.data(), c, ldc, k0 > 0);
        }
        for (int64_t r = 0; r < nr; ++r) {
          float* out = C + (m0 + r0 + r) * N + n0;
          if (ragged) std::memcpy(out, c + r * kPanel, width * sizeof(float));
          if (bias)
            for (int64_t j = 0; j < width; ++j) out[j] += bias[n0 + j];
        }
      }
    }
  }
}

}  // namespace

void linear_forward(int64_t M, const float* x, const Weight& w, const float* bias, float* y) {
  gemm(M, w.cols, w.rows, x, y, bias,
       [&](int64_t n0, int64_t width, int64_t k0, int64_t kc, float* dst, std::vector<float>& s) {
         pack_transposed(w, n0, width, k0, kc, dst, s);
       });
}

// y[r * ldy] = x[r] . wn (+ *bias) for R rows of x at once, each row with its own accumulator summed in
// the same order, with the same explicit FMAs, as alone (so a row's result does not depend on which
// rows come with it). One accumulator per dot product is a chain of dependent FMAs (4-cycle latency
// for 8 MACs); R of them side by side fill the FMA pipes instead: at batch 8 decoding waited on that
// chain (53% of a SmolLM2 decode step was linear_forward_few).
template <int R>
void few_dots(int64_t K, const float* x, const float* wn, const float* bias, float* y, int64_t ldy) {
  constexpr int L = simd::kLanes<float>;
  simd::Vec<float> acc[R];
  for (int r = 0; r < R; ++r) acc[r] = simd::Vec<float>{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    const simd::Vec<float> wv = simd::load(wn + k);
    for (int r = 0; r < R; ++r) acc[r] = simd::fmadd(simd::load(x + r * K + k), wv, acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float sum = 0.0f;
    for (int i = 0; i < L; ++i) sum += acc[r][i];
    for (int64_t j = k; j < K; ++j) sum = std::fma(x[r * K + j], wn[j], sum);
    y[r * ldy] = bias ? sum + *bias : sum;
  }
}

void linear_forward_few(int64_t M, const float* x, const Weight& w, const float* bias, float* y) {
  const int64_t N = w.rows, K = w.cols;
  constexpr int kMaxRows = 8;  // accumulators side by side (of 16 AVX2 registers)
  const int nt = threads_for(double(N) * double(K));  // the cost is reading W, once
#pragma omp parallel num_threads(nt)
  {
    thread_local std::vector<float> row;
    row.resize(size_t(K));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* wn = row.data();
      if (w.format == WeightFormat::f32) wn = reinterpret_cast<const float*>(w.data) + n * K;
      else dequantize_row(w, n, 0, K, row.data());
      const float* b = bias ? bias + n : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N + n;
        switch (std::min<int64_t>(kMaxRows, M - m0)) {
          case 1: few_dots<1>(K, xm, wn, b, ym, N); break;
          case 2: few_dots<2>(K, xm, wn, b, ym, N); break;
          case 3: few_dots<3>(K, xm, wn, b, ym, N); break;
          case 4: few_dots<4>(K, xm, wn, b, ym, N); break;
          case 5: few_dots<5>(K, xm, wn, b, ym, N); break;
          case 6: few_dots<6>(K, xm, wn, b, ym, N); break;
          case 7: few_dots<7>(K, xm, wn, b, ym, N); break;
          default: few_dots<8>(K, xm, wn, b, ym, N); break;
        }
      }
    }
  }
}

void linear_backward(int64_t M, const float* dy, const Weight& w, float* dx) {
  gemm(M, w.rows, w.cols, dy, dx, nullptr,
       [&](int64_t n0, int64_t width, int64_t k0, int64_t kc, float* dst, std::vector<float>&) {
         pack_rows(w, n0, width, k0, kc, dst);
       });
}

}  // namespace softprompt
