// Prefix attention, the fast variant: hand-blocked SIMD micro-kernels (simd.h) in a "queries as
// lanes" layout. A block of up to 64 queries is transposed once, so that every score tile is
// [keys, 64 query lanes]: the softmax over keys becomes lane-wise max/exp/sum with no horizontal
// reductions, and the causal mask is a lane threshold per key. Keys are processed in L1-sized
// chunks with an online softmax. The prefix and the input keys stay two arrays; a work item packs
// its head's keys and values into contiguous rows [prefix | input] first (the inputs' rows are
// Hkv*D apart, which makes strided loads miss the L1 and the TLB). Only lse is kept for the
// backward.
//
// Work items: a (b, kv head) with the (query head, block) pairs of its group, or with few heads a
// share of them dealt round-robin (forward: enough items for the team; backward: backward_splits,
// each share with dk/dv rows of its own, summed in a fixed order). Each item moves its own query
// blocks between the arrays and tiles of its scratch. A query's output and gradients are the same
// bits whatever item computes them; a shared prefix's gradient goes to one slot per batch row,
// summed in batch order at the end (as in the Eigen variant, prefix_attention.cpp).
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "prefix_attention.h"
#include "simd.h"
#include "prefix_grad.h"
#include "threads.h"

namespace softprompt {
namespace {

using simd::kLanes;
using simd::Vec;

constexpr int64_t kBlock = 64;        // queries per block = lanes of a score tile row
constexpr int64_t kChunkForward = 128;  // input keys per chunk: a [128, 64] float tile is 32 KiB
constexpr int64_t kChunkBackward = 64;  // two tiles (p, ds) live at once
// Leading dimension of the [*, kBlock] tiles: kBlock plus one cache line. The micro-kernel reads a
// column of vectors down a tile (its B operand); rows exactly 256 bytes apart fall into 16 of the
// 64 sets of an 8-way 32 KiB L1, so at D = 256 a tile's 256 rows evicted each other. An odd number
// of lines apart, they spread over every set.
template <typename T>
constexpr int64_t kLd = kBlock + 64 / int64_t(sizeof(T));
// The same for rows of D values (packed keys and values, the dk/dv accumulators and the row-major
// query copies of the backward): D rounded up to whole 64-byte lines, one more if their count is even.
template <typename T>
int64_t padded_row(int64_t D) {
  constexpr int64_t line = 64 / int64_t(sizeof(T));
  const int64_t lines = (D + line - 1) / line;
  return (lines % 2 ? lines : lines + 1) * line;
}

template <typename T>
using Buffer = std::vector<T>;

// Keys and values of one (batch row, kv head): the prefix rows and the input rows, in place.
template <typename T>
struct Heads {
  const T *k, *v, *pk, *pv;
  const uint8_t* keep;  // key_padding_mask row, or nullptr
  int64_t stride;       // between consecutive keys: Hkv * D

  Heads(const AttentionShape& s, int64_t b, int64_t hk, const T* k_all, const T* v_all,
        const T* pk_all, const T* pv_all, const uint8_t* mask)
      : stride(s.Hkv * s.D) {
    k = k_all + b * s.S * stride + hk * s.D;
    v = v_all + b * s.S * stride + hk * s.D;
    const int64_t poff = (s.prefix_per_row ? b * s.P * stride : 0) + hk * s.D;
    pk = s.P ? pk_all + poff : nullptr;
    pv = s.P ? pv_all + poff : nullptr;
    keep = mask ? mask + b * s.S : nullptr;
  }
};

// A chunk: prefix rows [0, np) (chunk 0 only) then input keys [j0, j1). In the packed layout
// [prefix (P rows) | input (S rows)] it is the row range [r0, r1).
struct Chunk {
  int64_t np, j0, j1, P;
  int64_t rows() const { return np + j1 - j0; }
  int64_t r0() const { return np ? 0 : P + j0; }
};

template <class F>
void for_each_chunk(int64_t P, int64_t in_end, int64_t size, F&& f) {
  const int64_t first = std::min(in_end, size);
  if (P + first > 0) f(Chunk{P, 0, first, P});
  for (int64_t j0 = first; j0 < in_end; j0 += size) f(Chunk{0, j0, std::min(in_end, j0 + size), P});
}

// Input keys visible to some query of the block ending before i1.
inline int64_t input_end(const AttentionShape& s, int64_t i1) {
  return s.causal ? std::clamp<int64_t>(i1 + s.S - s.T, 0, s.S) : s.S;
}

// The query lanes [first, last) (of the block at i0) that see row r of the chunk; first >= last
// if none does. Prefix rows are seen by all lanes; input key j is hidden by padding, and with
// causal from lanes i < j - (S - T) - i0. A sliding window hides a key at position y (prefix row
// p: p; input key j: P + j) from lanes i >= y + window - P - (S - T) - i0 (AttentionShape).
struct Lanes {
  int64_t first, last;
  bool none() const { return first >= last; }
};

template <typename T>
inline Lanes visible_lanes(const AttentionShape& s, const Heads<T>& hd, const Chunk& c, int64_t r,
                           int64_t i0) {
  const int64_t j = c.j0 + r - c.np, pos = r < c.np ? r : s.P + j;
  Lanes l{0, kBlock};
  if (r >= c.np) {
    if (hd.keep && !hd.keep[j]) return Lanes{kBlock, kBlock};
    if (s.causal) l.first = std::clamp<int64_t>(j - (s.S - s.T) - i0, 0, kBlock);
  }
  if (s.window) l.last = std::clamp<int64_t>(pos + s.window - s.P - (s.S - s.T) - i0, 0, kBlock);
  return l;
}

// Lanes of vector v outside [first, last)?  -> mask that is true where hidden. mixed(l, v): some
// lane of vector v is hidden (the mask is needed).
template <typename T>
inline simd::Mask<T> hidden_lanes(const Lanes& l, int64_t v) {
  const Vec<T> lane = simd::iota<T>() + T(v * kLanes<T>);
  return (lane < T(l.first)) | (lane >= T(l.last));
}
template <typename T>
inline bool mixed(const Lanes& l, int64_t v) {
  return l.first > v * kLanes<T> || l.last < (v + 1) * kLanes<T>;
}

// The rows of a chunk that some lane of each lane group sees, a group being the micro-kernel's
// width (simd::kTileVecs vectors): rows outside [begin, end) are hidden from every lane of the group,
// so the products skip them there (with causal masking the diagonal block's upper triangle, with a
// window the lower one). A hidden key never counts; skipping its exact zeros changes no sum.
struct RowRange {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

template <typename T>
int group_rows(const Lanes* vl, int64_t rows, int64_t nv, RowRange* out) {
  constexpr int64_t L = kLanes<T>, G = simd::kTileVecs;
  const int groups = int((nv + G - 1) / G);
  for (int g = 0; g < groups; ++g) {
    const int64_t a = g * G * L, z = std::min<int64_t>((g + 1) * G * L, kBlock);
    int64_t lo = rows, hi = rows;
    for (int64_t r = 0; r < rows; ++r)
      if (!vl[r].none() && vl[r].first < z && vl[r].last > a) {
        if (lo == rows) lo = r;
        hi = r + 1;
      }
    out[g] = RowRange{lo, lo == rows ? rows : hi};
  }
  return groups;
}

// Rows of the [B, T, H, D] and [B, S, Hkv, D] arrays are H*D or Hkv*D values apart, often exactly
// 4 KiB (H*D = 1024): every row is on a page of its own, where the hardware prefetchers (which stay
// within a page) do not follow, so each row's load missed the caches. The loops that read such rows
// (packing keys and values, moving query blocks into tiles) request them ahead with these.
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  simd::prefetch(row, D * int64_t(sizeof(T)));
}
template <typename T>
inline void prefetch_rows(const T* first, int64_t stride, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) prefetch_row(first + i * stride, D);
}
constexpr int64_t kPackAhead = 8;  // rows: a few hundred cycles of copying ahead of their use

// The keys and values of one (b, kv head) as contiguous rows [prefix | input]: kp, vp [P+S, Dl]
// with Dl = padded_row(D) (the padding is never read; the inputs' rows are Hkv*D apart). A work
// item packs the rows it reads into its own scratch, where they stay in L2 for all of its query
// blocks; a pass that packed every head into one array first sent them through memory (10% of the
// forward at T = 71, D = 96). Rows are packed on demand: `packed` is how many are, and causal
// blocks need only the rows up to their last visible key.
template <typename T>
struct PackedHead {
  T *kp, *vp;
  int64_t packed = 0;
  void need(const AttentionShape& s, const Heads<T>& hd, int64_t rows) {
    const int64_t D = s.D, Dl = padded_row<T>(D);
    auto row = [&](const T* pre_base, const T* in_base, int64_t r) {
      return r < s.P ? pre_base + r * hd.stride : in_base + (r - s.P) * hd.stride;
    };
    for (int64_t r = packed; r < rows; ++r) {
      if (r + kPackAhead < rows) {
        prefetch_row(row(hd.pk, hd.k, r + kPackAhead), D);
        prefetch_row(row(hd.pv, hd.v, r + kPackAhead), D);
      }
      const T *kr = row(hd.pk, hd.k, r), *vr = row(hd.pv, hd.v, r);
      T *kd = kp + r * Dl, *vd = vp + r * Dl;
      for (int64_t d = 0; d < D; ++d) kd[d] = kr[d];  // short rows: a loop beats memmove calls
      for (int64_t d = 0; d < D; ++d) vd[d] = vr[d];
    }
    packed = std::max(packed, rows);
  }
};

// The query-side arrays ([B, T, H, D]: q, out, ...) as tiles: per (b, h, block) the block's rows
// transposed, [D, kBlock] (row stride kLd), lanes past the block zero. The T queries split into
// blocks of about equal size, in whole micro-kernel widths (16 lanes with AVX2) and at most kBlock:
// T = 136 runs as 48 + 48 + 40 rather than 64 + 64 + 8, whose last block streamed every key for 8
// queries (and summed dk, dv over 8 lanes). A work item moves its own block between the array and
// a tile of its scratch (L1/L2): a grid of every tile, converted in passes of its own, went through
// memory twice more (at T = 71, D = 96 its transposes took 14% of the forward).
template <typename E>
struct TileGrid {
  int64_t T, H, D, bs, nblocks;  // bs: queries per block (the last one may have fewer)
  explicit TileGrid(const AttentionShape& s) : T(s.T), H(s.H), D(s.D) {
    const int64_t width = simd::kTileVecs * kLanes<E>, even = (s.T + kBlock - 1) / kBlock;
    bs = std::min(kBlock, ((s.T + even - 1) / even + width - 1) / width * width);
    nblocks = (s.T + bs - 1) / bs;
  }
  int64_t start(int64_t blk) const { return blk * bs; }
  int64_t count(int64_t blk) const { return std::min(bs, T - blk * bs); }
  // The block's first row in a [B, T, H, D] array.
  int64_t row(int64_t b, int64_t h, int64_t blk) const { return ((b * T + start(blk)) * H + h) * D; }

  // tile [D, kLd] = factor * the block's rows of a, transposed; the lanes up to the next whole
  // vector after the block are zero (the micro-kernels read whole vectors).
  void load(const E* a, int64_t b, int64_t h, int64_t blk, E factor, E* tile) const {
    const int64_t n = count(blk), end = std::min(kBlock, (n + kLanes<E> - 1) / kLanes<E> * kLanes<E>);
    if (end > n)
      for (int64_t d = 0; d < D; ++d) std::fill(tile + d * kLd<E> + n, tile + d * kLd<E> + end, E(0));
    simd::transpose(a + row(b, h, blk), H * D, tile, kLd<E>, n, D, factor);
  }
  // Requests the block's rows of a ahead of a load (prefetch_row).
  void prefetch(const E* a, int64_t b, int64_t h, int64_t blk) const {
    prefetch_rows(a + row(b, h, blk), H * D, count(blk), D);
  }
  // The block's rows of a = tile, the inverse of load.
  void store(const E* tile, int64_t b, int64_t h, int64_t blk, E* a) const {
    simd::transpose(tile, kLd<E>, a + row(b, h, blk), H * D, D, count(blk), E(1));
  }
};

// out[i] = sum_d a[i, d] b[i, d] for the n rows of a and b (rows `stride` apart, D values each): the
// backward's delta = rowsum(dout * out) of a block's queries, computed where the block is loaded
// (no pass or buffer of its own).
template <typename T>
void row_dots(const T* a, const T* b, int64_t stride, int64_t n, int64_t D, T* out) {
  constexpr int L = kLanes<T>;
  for (int64_t i = 0; i < n; ++i) {
    const T *x = a + i * stride, *y = b + i * stride;
    Vec<T> acc{};
    int64_t d = 0;
    for (; d + L <= D; d += L) acc += simd::load(x + d) * simd::load(y + d);
    T sum = 0;
    for (int j = 0; j < L; ++j) sum += acc[j];
    for (; d < D; ++d) sum += x[d] * y[d];
    out[i] = sum;
  }
}

template <typename T>
struct ForwardScratch {
  Buffer<T> kp, vp, tile, ot, scores;  // kp, vp: PackedHead; tile: a block's queries, then its output
  std::vector<Lanes> lanes;  // visible_lanes of each row of the chunk
  explicit ForwardScratch(const AttentionShape& s)
      : kp((s.P + s.S) * padded_row<T>(s.D)), vp(kp.size()), tile(s.D * kLd<T>), ot(s.D * kLd<T>),
        scores((s.P + kChunkForward) * kLd<T>), lanes(s.P + kChunkForward) {}
};

// One forward work item: queries [i0, i0+n) of head h. kp, vp: this head's packed keys and
// values [P+S, Dl]. tile [D, kBlock]: in, the scaled queries (so scores come out scaled); out, the
// attention output. Writes lse.
template <typename T>
void forward_block(const AttentionShape& s, ForwardScratch<T>& w, const Heads<T>& hd,
                   const T* kp, const T* vp, int64_t b, int64_t h, int64_t i0, int64_t n,
                   T* tile, T* lse) {
  constexpr int L = kLanes<T>, NVmax = kBlock / L, G = simd::kTileVecs;
  const int64_t nv = (n + L - 1) / L;
  const Vec<T> ninf = simd::broadcast(-std::numeric_limits<T>::infinity());
  const T* qt = tile;
  T* ot = w.ot.data();
  Vec<T> m[NVmax], l[NVmax];
  for (int v = 0; v < NVmax; ++v) m[v] = ninf, l[v] = Vec<T>{};
  bool first = true;
  for_each_chunk(s.P, input_end(s, i0 + n), kChunkForward, [&](const Chunk& c) {
    const int64_t rows = c.rows();
    const int64_t Dl = padded_row<T>(s.D);
    const T *kc = kp + c.r0() * Dl, *vc = vp + c.r0() * Dl;
    T* sc = w.scores.data();
    Lanes* vl = w.lanes.data();
    for (int64_t r = 0; r < rows; ++r) vl[r] = visible_lanes(s, hd, c, r, i0);
    // scores [rows, kBlock] = keys [rows, D] . qt [D, kBlock], per lane group over its rows (the
    // other rows' entries stay stale: every lane there is hidden, and the passes below mask it)
    RowRange rr[NVmax];
    const int groups = group_rows<T>(vl, rows, nv, rr);
    for (int g = 0; g < groups; ++g) {
      const int64_t w0 = g * G, r0 = rr[g].begin;
      if (rr[g].size())
        simd::matmul<T>(rr[g].size(), std::min<int64_t>(G, nv - w0), s.D, kc + r0 * Dl, Dl, 1, qt + w0 * L,
                        kLd<T>, sc + r0 * kLd<T> + w0 * L, kLd<T>, false);
    }
    if (s.softcap) {  // scores = c tanh(scores / c), in place
      const T c = T(s.softcap), inv = T(1 / s.softcap);
      for (int64_t r = 0; r < rows; ++r)
        if (!vl[r].none())
          for (int v = 0; v < nv; ++v)
            simd::store(sc + r * kLd<T> + v * L, c * simd::tanh<T>(inv * simd::load(sc + r * kLd<T> + v * L)));
    }
    // Online softmax, lane-wise: the chunk's max, the rescale factor, then p = exp(score - max).
    Vec<T> mx[NVmax], msafe[NVmax], alpha[NVmax], sum[NVmax];
    for (int v = 0; v < nv; ++v) mx[v] = m[v], sum[v] = Vec<T>{};
    for (int64_t r = 0; r < rows; ++r) {
      if (vl[r].none()) continue;
      for (int v = 0; v < nv; ++v) {
        Vec<T> x = simd::load(sc + r * kLd<T> + v * L);
        if (mixed<T>(vl[r], v)) x = hidden_lanes<T>(vl[r], v) ? ninf : x;
        mx[v] = simd::vmax<T>(mx[v], x);
      }
    }
    for (int v = 0; v < nv; ++v) {
      msafe[v] = mx[v] == ninf ? Vec<T>{} : mx[v];  // a lane that sees nothing stays all zero
      alpha[v] = m[v] == ninf ? Vec<T>{} : simd::exp<T>(m[v] - msafe[v]);
    }
    // With every lane's max finite (no NaN or +inf score seen) the shifted scores are finite or -inf,
    // and exp_shifted skips exp's checks for the rest.
    bool finite = true;
    for (int v = 0; v < nv; ++v)
      for (int i = 0; i < L; ++i) finite &= msafe[v][i] - msafe[v][i] == T(0);
    auto exp_pass = [&](auto expf) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int v = 0; v < nv; ++v) {
          Vec<T> p{};
          if (!vl[r].none()) {
            p = expf(simd::load(sc + r * kLd<T> + v * L) - msafe[v]);
            if (mixed<T>(vl[r], v)) p = hidden_lanes<T>(vl[r], v) ? Vec<T>{} : p;  // exact zeros
          }
          simd::store(sc + r * kLd<T> + v * L, p);
          sum[v] += p;
        }
      }
    };
    if (finite)
      exp_pass([](Vec<T> x) { return simd::exp_shifted<T>(x); });
    else
      exp_pass([](Vec<T> x) { return simd::exp<T>(x); });
    for (int v = 0; v < nv; ++v) {
      m[v] = mx[v];
      l[v] = alpha[v] * l[v] + sum[v];
    }
    if (!first)
      for (int64_t d = 0; d < s.D; ++d)
        for (int v = 0; v < nv; ++v)
          simd::store(ot + d * kLd<T> + v * L, alpha[v] * simd::load(ot + d * kLd<T> + v * L));
    // ot [D, kBlock] (+)= values^T [D, rows] . p [rows, kBlock], each lane group over its rows
    for (int g = 0; g < groups; ++g) {
      const int64_t w0 = g * G, r0 = rr[g].begin;
      if (rr[g].size() || first)  // (none and first: the group's ot = 0)
        simd::matmul<T>(s.D, std::min<int64_t>(G, nv - w0), rr[g].size(), vc + r0 * Dl, 1, Dl,
                        sc + r0 * kLd<T> + w0 * L, kLd<T>, ot + w0 * L, kLd<T>, !first);
    }
    first = false;
  });
  // out = ot / l; a query that sees no key (l = 0) gets zeros and lse = -inf, never NaN.
  Vec<T> inv[NVmax];
  for (int v = 0; v < nv; ++v) {
    const auto none = l[v] == Vec<T>{};
    inv[v] = T(1) / (none ? simd::broadcast(T(1)) : l[v]);
    inv[v] = none ? Vec<T>{} : inv[v];
  }
  for (int64_t d = 0; d < s.D; ++d)
    for (int v = 0; v < nv; ++v)
      simd::store(tile + d * kLd<T> + v * L, first ? Vec<T>{} : inv[v] * simd::load(ot + d * kLd<T> + v * L));
  // (first: no chunk ran, ot was never written)
  T ml[kBlock], ll[kBlock];
  for (int v = 0; v < nv; ++v) simd::store(ml + v * L, m[v]), simd::store(ll + v * L, l[v]);
  T* lse_row = lse + (b * s.H + h) * s.T + i0;
  for (int64_t i = 0; i < n; ++i)
    lse_row[i] = first || ll[i] == T(0) ? -std::numeric_limits<T>::infinity() : ml[i] + std::log(ll[i]);
}

template <typename T>
struct BackwardScratch {
  int64_t Dp;  // D rounded up to whole vectors: the columns the dk/dv products compute
  int64_t Dl;  // padded_row(D) >= Dp: the row stride of qs, dos, dk, dv
  // kp, vp: PackedHead; qt, dot: the pair's q, dout tiles
  Buffer<T> kp, vp, qt, dot, dqt, qs, dos, p, ds, lse, delta, dk, dv;
  std::vector<Lanes> lanes;  // visible_lanes of each row of the chunk
  explicit BackwardScratch(const AttentionShape& s)
      : Dp((s.D + kLanes<T> - 1) / kLanes<T> * kLanes<T>), Dl(padded_row<T>(s.D)),
        kp((s.P + s.S) * Dl), vp(kp.size()), qt(s.D * kLd<T>),
        dot(s.D * kLd<T>), dqt(s.D * kLd<T>),
        qs(kBlock * Dl), dos(kBlock * Dl), p((s.P + kChunkBackward) * kLd<T>),
        ds((s.P + kChunkBackward) * kLd<T>), lse(kBlock), delta(kBlock), dk((s.P + s.S) * Dl),
        dv((s.P + s.S) * Dl), lanes(s.P + kChunkBackward) {}
};

// One query block's share of the backward for head h. kp, vp: this head's packed keys and
// values [P+S, Dl]. qtile [D, kBlock]: in, the scaled queries; out, dq (transposed). dotile: dout,
// transposed. delta_row: rowsum(dout * out) of the block's queries. Accumulates into w.dk, w.dv,
// rows [prefix (P) | input (S)] x Dp.
//   p = exp(scores - lse);  dv += p^T do;  dp = do v^T;  ds = p * (dp - delta);
//   (soft-capping: scores = c tanh(s / c), and ds *= 1 - tanh^2);  dq = scale * ds k;
//   dk += ds^T (scale q)
template <typename T>
void backward_block(const AttentionShape& s, BackwardScratch<T>& w, const Heads<T>& hd,
                    const T* kp, const T* vp, int64_t b, int64_t h, int64_t i0, int64_t n,
                    T* qtile, const T* dotile, const T* delta_row, const T* lse) {
  constexpr int L = kLanes<T>, NVmax = kBlock / L, G = simd::kTileVecs;
  constexpr int64_t R = simd::kTileRows;
  const int64_t nv = (n + L - 1) / L, Dl = w.Dl, wd = w.Dp / L;
  // Row-major copies [kBlock, Dl] (zero padding) for the products that sum over the lanes.
  std::fill(w.qs.begin(), w.qs.end(), T(0));
  std::fill(w.dos.begin(), w.dos.end(), T(0));
  simd::transpose(qtile, kLd<T>, w.qs.data(), Dl, s.D, n, T(1));
  simd::transpose(dotile, kLd<T>, w.dos.data(), Dl, s.D, n, T(1));
  std::fill(w.dqt.begin(), w.dqt.end(), T(0));
  const T* lse_row = lse + (b * s.H + h) * s.T + i0;
  for (int64_t i = 0; i < kBlock; ++i) {
    w.delta[i] = i < n ? delta_row[i] : T(0);
    // A query that sees no key (lse = -inf) has every row masked below; 0 keeps exp finite. A
    // NaN lse (a NaN its forward saw) stays, so that its gradients are NaN too.
    w.lse[i] = i < n && lse_row[i] != -std::numeric_limits<T>::infinity() ? lse_row[i] : T(0);
  }
  for_each_chunk(s.P, input_end(s, i0 + n), kChunkBackward, [&](const Chunk& c) {
    T *p = w.p.data(), *ds = w.ds.data();
    const int64_t rows = c.rows(), r0 = c.r0();
    const T *kc = kp + r0 * Dl, *vc = vp + r0 * Dl;
    Lanes* vls = w.lanes.data();
    for (int64_t r = 0; r < rows; ++r) vls[r] = visible_lanes(s, hd, c, r, i0);
    RowRange rr[NVmax];
    const int groups = group_rows<T>(vls, rows, nv, rr);
    // scores = keys . qt;  dp = values . do^T   (both [rows, kBlock]; per lane group over its rows,
    // the rest stays stale and is masked below)
    for (int g = 0; g < groups; ++g) {
      const int64_t w0 = g * G, W = std::min<int64_t>(G, nv - w0), g0 = rr[g].begin, gn = rr[g].size();
      if (!gn) continue;
      simd::matmul<T>(gn, W, s.D, kc + g0 * Dl, Dl, 1, qtile + w0 * L, kLd<T>, p + g0 * kLd<T> + w0 * L,
                      kLd<T>, false);
      simd::matmul<T>(gn, W, s.D, vc + g0 * Dl, Dl, 1, dotile + w0 * L, kLd<T>, ds + g0 * kLd<T> + w0 * L,
                      kLd<T>, false);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Lanes vl = vls[r];
      for (int64_t v = 0; v < nv; ++v) {
        T *pr = p + r * kLd<T> + v * L, *dr = ds + r * kLd<T> + v * L;
        Vec<T> pvec{}, dsvec{};
        if (!vl.none()) {
          Vec<T> score = simd::load(pr), th{};
          if (s.softcap) {
            th = simd::tanh<T>(T(1 / s.softcap) * score);
            score = T(s.softcap) * th;
          }
          pvec = simd::exp<T>(score - simd::load(w.lse.data() + v * L));
          dsvec = pvec * (simd::load(dr) - simd::load(w.delta.data() + v * L));
          if (s.softcap) dsvec *= T(1) - th * th;  // d capped / d s
          if (mixed<T>(vl, v)) {  // exact zeros where hidden (the entries there may be stale)
            const auto hidden = hidden_lanes<T>(vl, v);
            pvec = hidden ? Vec<T>{} : pvec;
            dsvec = hidden ? Vec<T>{} : dsvec;
          }
        }
        simd::store(pr, pvec), simd::store(dr, dsvec);
      }
    }
    // dv_rows += p . do;  dk_rows += ds . (scale q)   ([rows, Dp] of [rows, Dl]), each tile of rows
    // summing over the lanes that see some row of it (p and ds are exact zeros on the others)
    for (int64_t t0 = 0; t0 < rows; t0 += R) {
      const int64_t tr = std::min(R, rows - t0);
      int64_t lo = n, hi = 0;
      for (int64_t r = t0; r < t0 + tr; ++r)
        if (!vls[r].none()) lo = std::min(lo, vls[r].first), hi = std::max(hi, std::min(vls[r].last, n));
      if (hi <= lo) continue;
      simd::matmul<T>(tr, wd, hi - lo, p + t0 * kLd<T> + lo, kLd<T>, 1, w.dos.data() + lo * Dl, Dl,
                      w.dv.data() + (r0 + t0) * Dl, Dl, true);
      simd::matmul<T>(tr, wd, hi - lo, ds + t0 * kLd<T> + lo, kLd<T>, 1, w.qs.data() + lo * Dl, Dl,
                      w.dk.data() + (r0 + t0) * Dl, Dl, true);
    }
    // dq^T [D, kBlock] += keys^T [D, rows] . ds [rows, kBlock], each lane group over its rows
    for (int g = 0; g < groups; ++g) {
      const int64_t w0 = g * G, g0 = rr[g].begin;
      if (rr[g].size())
        simd::matmul<T>(s.D, std::min<int64_t>(G, nv - w0), rr[g].size(), kc + g0 * Dl, 1, Dl,
                        ds + g0 * kLd<T> + w0 * L, kLd<T>, w.dqt.data() + w0 * L, kLd<T>, true);
    }
  });
  // The block is done with its queries: its tile now takes dq^T = scale * ds k.
  for (int64_t e = 0; e < s.D * kLd<T>; ++e) qtile[e] = T(s.scale) * w.dqt[e];
}

}  // namespace

// Forward items per thread of the team, for it to share out the work (schedule(dynamic)).
constexpr int64_t kTeamItems = 4;

template <typename T>
void prefix_attention_forward_simd(const AttentionShape& s, const T* q, const T* k, const T* v,
                                   const T* prefix_k, const T* prefix_v,
                                   const uint8_t* key_padding_mask, T* out, T* lse) {
  const TileGrid<T> grid(s);
  const int64_t group = s.H / s.Hkv, heads = s.B * s.Hkv, pairs = group * grid.nblocks;
  const int nt = threads_for(4.0 * s.B * s.H * s.T * (s.P + s.S) * s.D);
  // Items: (b, kv head, split), the head's (query head, block) pairs dealt round-robin to its splits
  // (causal blocks grow in cost along T). Splits only where the heads alone are too few for the
  // team to share out (each packs the head's keys again); an output is the same bits whatever
  // item computes it.
  const int64_t splits = std::clamp<int64_t>((kTeamItems * nt + heads - 1) / heads, 1, std::max<int64_t>(1, pairs / 2));
  const int64_t items = heads * splits;
#pragma omp parallel num_threads(nt)
  {
    ForwardScratch<T> w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t bh = item / splits, split = item % splits, b = bh / s.Hkv, hk = bh % s.Hkv;
      const Heads<T> hd(s, b, hk, k, v, prefix_k, prefix_v, key_padding_mask);
      PackedHead<T> kv{w.kp.data(), w.vp.data()};
      for (int64_t pair = split; pair < pairs; pair += splits) {
        const int64_t h = hk * group + pair / grid.nblocks, blk = pair % grid.nblocks;
        const int64_t i0 = grid.start(blk), n = grid.count(blk);
        kv.need(s, hd, s.P + input_end(s, i0 + n));
        grid.load(q, b, h, blk, T(s.scale), w.tile.data());  // scaled: scores come out scaled
        if (pair + splits < pairs) {  // the next block's queries, while this one computes
          const int64_t next = pair + splits;
          grid.prefetch(q, b, hk * group + next / grid.nblocks, next % grid.nblocks);
        }
        forward_block(s, w, hd, kv.kp, kv.vp, b, h, i0, n, w.tile.data(), lse);
        grid.store(w.tile.data(), b, h, blk, out);
      }
    }
  }
}

// How many backward items share one (b, kv head): with few heads (B * Hkv small: batch 1, one
// kv head) the (b, kv head) items alone left threads idle, (1, 4, 1, 427, 128) ran on one of two
// cores. A head's (query head, block) pairs are then dealt round-robin to `splits` items (causal
// blocks grow in cost along T), each with its own dk/dv rows, summed in split order at the end.
// The count depends on one batch row's shape only, never on B or the thread count: a row's
// gradients are then the same bits whatever rows come with it (data-parallel ranks split a batch)
// and whatever the team. It aims at kRowItems items per batch row, each with at least kItemPairs
// pairs (an item's dk/dv rows cost a zeroing, a copy and a sum: one pair each made SmolLM2's
// (8, 9, 3, 64) backward 15% slower), within kRowPartialBytes of partial rows per batch row (a
// call's own buffer, freed when it returns: up to B MiB while it runs).
constexpr int64_t kRowItems = 16, kItemPairs = 4;
constexpr double kRowPartialBytes = 1 << 20;

template <typename T>
int64_t backward_splits(const AttentionShape& s, int64_t pairs) {
  const double per_item = 2.0 * double(s.P + s.S) * double(padded_row<T>(s.D)) * sizeof(T);
  const int64_t room = std::max<int64_t>(1, int64_t(kRowPartialBytes / (per_item * double(s.Hkv))));
  return std::max<int64_t>(1, std::min({pairs / kItemPairs, (kRowItems + s.Hkv - 1) / s.Hkv, room}));
}

template <typename T>
void prefix_attention_backward_simd(const AttentionShape& s, const T* dout, const T* q,
                                    const T* k, const T* v, const T* prefix_k,
                                    const T* prefix_v, const uint8_t* key_padding_mask,
                                    const T* out, const T* lse, T* dq, T* dk, T* dv,
                                    T* dprefix_k, T* dprefix_v) {
  const int64_t group = s.H / s.Hkv, kv_row = s.Hkv * s.D, heads = s.B * s.Hkv;
  const int64_t Dl = padded_row<T>(s.D), rows = s.P + s.S, head_size = rows * Dl;
  const TileGrid<T> grid(s);
  const int64_t pairs = group * grid.nblocks, splits = backward_splits<T>(s, pairs);
  const int64_t items = heads * splits;
  // With splits > 1, each item's dk, dv rows [items, 2, P+S, Dl] (every item writes all of its own
  // before the sum reads them, so no zero-fill), in a buffer of this call only (not a thread's
  // reused buffer, which would keep its size for the life of the thread).
  std::unique_ptr<T[]> partial_rows(splits > 1 ? new T[size_t(items * 2 * head_size)] : nullptr);
  T* partial = partial_rows.get();
  PrefixGradient<T> dprefix(s, dprefix_k, dprefix_v);
  // Accumulator rows [prefix | input] x Dl of (b, kv head) -> the outputs' D columns.
  auto write_rows = [&](int64_t b, int64_t hk, int64_t r, const T* krow, const T* vrow) {
    const int64_t koff = b * s.S * kv_row + hk * s.D;
    const bool pre = r < s.P;
    T* kdst = pre ? dprefix.key(b, hk) + r * kv_row : dk + koff + (r - s.P) * kv_row;
    T* vdst = pre ? dprefix.value(b, hk) + r * kv_row : dv + koff + (r - s.P) * kv_row;
    std::copy_n(krow, s.D, kdst);
    std::copy_n(vrow, s.D, vdst);
  };
  const int nt = threads_for(10.0 * s.B * s.H * s.T * (s.P + s.S) * s.D);
#pragma omp parallel num_threads(nt)
  {
    BackwardScratch<T> w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t bh = item / splits, split = item % splits, b = bh / s.Hkv, hk = bh % s.Hkv;
      const Heads<T> hd(s, b, hk, k, v, prefix_k, prefix_v, key_padding_mask);
      std::fill(w.dk.begin(), w.dk.end(), T(0));
      std::fill(w.dv.begin(), w.dv.end(), T(0));
      PackedHead<T> kv{w.kp.data(), w.vp.data()};
      for (int64_t pair = split; pair < pairs; pair += splits) {
        const int64_t h = hk * group + pair / grid.nblocks, blk = pair % grid.nblocks;
        const int64_t i0 = grid.start(blk);
        kv.need(s, hd, s.P + input_end(s, i0 + grid.count(blk)));
        grid.load(q, b, h, blk, T(s.scale), w.qt.data());
        grid.load(dout, b, h, blk, T(1), w.dot.data());
        T delta[kBlock];
        row_dots(dout + grid.row(b, h, blk), out + grid.row(b, h, blk), s.H * s.D, grid.count(blk), s.D, delta);
        if (pair + splits < pairs) {  // the next block's rows, while this one computes
          const int64_t next = pair + splits, nh = hk * group + next / grid.nblocks, nblk = next % grid.nblocks;
          for (const T* a : {q, dout, out}) grid.prefetch(a, b, nh, nblk);
        }
        backward_block(s, w, hd, kv.kp, kv.vp, b, h, i0, grid.count(blk), w.qt.data(), w.dot.data(), delta, lse);
        grid.store(w.qt.data(), b, h, blk, dq);  // (each query's dq belongs to one pair)
      }
      if (splits == 1) {
        for (int64_t r = 0; r < rows; ++r) write_rows(b, hk, r, w.dk.data() + r * Dl, w.dv.data() + r * Dl);
      } else {
        std::copy_n(w.dk.data(), head_size, partial + 2 * item * head_size);
        std::copy_n(w.dv.data(), head_size, partial + (2 * item + 1) * head_size);
      }
    }
    if (splits > 1) {  // (the loop's barrier: every partial is written)
#pragma omp for schedule(static)
      for (int64_t br = 0; br < heads * rows; ++br) {
        const int64_t bh = br / rows, r = br % rows;
        T* sum = partial + 2 * bh * splits * head_size + r * Dl;  // split 0's row: dk, then dv
        for (int64_t sp = 1; sp < splits; ++sp) {
          const T* add = sum + 2 * sp * head_size;
          for (int64_t e = 0; e < s.D; ++e) sum[e] += add[e], sum[head_size + e] += add[head_size + e];
        }
        write_rows(bh / s.Hkv, bh % s.Hkv, r, sum, sum + head_size);
      }
    }
    dprefix.reduce();
  }
}

#define SOFTPROMPT_INSTANTIATE(T)                                                              \
  template void prefix_attention_forward_simd<T>(const AttentionShape&, const T*, const T*,    \
                                                 const T*, const T*, const T*, const uint8_t*, \
                                                 T*, T*);                                      \
  template void prefix_attention_backward_simd<T>(                                            \
      const AttentionShape&, const T*, const T*, const T*, const T*, const T*, const T*,       \
      const uint8_t*, const T*, const T*, T*, T*, T*, T*, T*);
SOFTPROMPT_INSTANTIATE(float)
SOFTPROMPT_INSTANTIATE(double)
#undef SOFTPROMPT_INSTANTIATE

}  // namespace softprompt
