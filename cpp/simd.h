// Portable SIMD for the attention kernels: GCC/Clang vector extensions sized to the target ISA
// (AVX-512: 64-byte vectors and 32 registers; AVX/AVX2: 32 bytes and 16 registers; else 16 bytes),
// a vectorized exp, and one register-blocked micro-kernel that every matrix product here uses.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace softprompt::simd {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kTileVecs = 4;  // accumulators: 6 rows x 4 vectors = 24 of 32 registers
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kTileVecs = 2;  // 6 x 2 = 12 of 16 registers
#else
constexpr int kVecBytes = 16;
constexpr int kTileVecs = 2;
#endif
constexpr int kTileRows = 6;

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef float unaligned __attribute__((vector_size(kVecBytes), aligned(4)));
  typedef int32_t mask __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef double unaligned __attribute__((vector_size(kVecBytes), aligned(8)));
  typedef int64_t mask __attribute__((vector_size(kVecBytes)));
};

template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
using Mask = typename VecOf<T>::mask;
template <typename T>
constexpr int kLanes = kVecBytes / int(sizeof(T));

template <typename T>
inline Vec<T> load(const T* p) {
  return *reinterpret_cast<const typename VecOf<T>::unaligned*>(p);
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  *reinterpret_cast<typename VecOf<T>::unaligned*>(p) = v;
}
// a - 0 is exact for every a (also -0 and NaN), so this compiles to one broadcast.
template <typename T>
inline Vec<T> broadcast(T a) {
  return a - Vec<T>{};
}

// Requests the bytes [p, p + bytes) into the caches ahead of their use: a prefetch per 64-byte
// line, and one for the last byte (a range that starts mid-line ends on one more line). For rows
// far apart, where the hardware prefetchers (which stay within a 4 KiB page) do not follow.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
  if (bytes > 0) __builtin_prefetch(c + bytes - 1);
}

// a * b + c rounded once wherever the target has FMA, explicitly: -ffp-contract=fast allows the
// compiler to fuse a*b+c but does not make it, and GCC fused it in some loop shapes and not in
// others (linear_forward_few: a lone accumulator came out as vmulps + vaddps, two side by side as
// vfmadd), so a row's result would depend on how many rows came with it.
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;  // no FMA instruction: never fused
#endif
}
// max that keeps a NaN from either side (a plain a > b ? a : b drops one from a, and a running
// max would forget it at the next finite value): a NaN score must reach its row's output.
template <typename T>
inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return (a > b) | (a != a) ? a : b;
}
// Lane index 0, 1, 2, ... as a vector of T.
template <typename T>
inline Vec<T> iota() {
  Vec<T> v;
  for (int i = 0; i < kLanes<T>; ++i) v[i] = T(i);
  return v;
}

// Cephes' exp polynomial for float: e^x for x in [-87, 88] (x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial in r, 2^n added to the exponent bits); relative error below 1e-7. Outside that range
// (and for NaN, -inf) the bits are garbage: exp and exp_shifted select what those inputs give.
inline Vec<float> exp_core(Vec<float> x) {
  const Vec<float> t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln2) via 1.5 * 2^23
  const Vec<float> n = t - 12582912.0f;
  const Mask<float> ni = (Mask<float>)t - 0x4B400000;  // bits of 1.5 * 2^23
  Vec<float> r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Vec<float> p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return (Vec<float>)((Mask<float>)p + (ni << 23));
}
// exp: exp_core, with x below -87 giving ~1e-38 (callers that need an exact 0, for masked keys,
// select it); -inf gives 0 and NaN gives NaN. For double: the libm exp per lane, as double only
// serves gradient checks, where accuracy matters and speed does not.
template <typename T>
inline Vec<T> exp(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    // The bit arithmetic would turn NaN into a number, and -inf into ~1e-38 instead of the exact 0
    // that keeps 0 * inf = NaN in a product (as in any softmax's gradient).
    const Mask<float> nan = x != x, zero = x == -std::numeric_limits<float>::infinity();
    const Vec<float> e = exp_core(vmax<float>(x, broadcast(-87.0f)));
    return nan ? x : (zero ? Vec<float>{} : e);
  } else {
    for (int i = 0; i < kLanes<T>; ++i) x[i] = std::exp(x[i]);
    return x;
  }
}
// exp for a softmax's shifted scores x = s - max(s) when that max is finite: x is finite or -inf,
// never NaN (a NaN gives an unspecified value). The same bits as exp for every such x, with fewer
// operations: a plain max for the clamp (no NaN to keep) and no NaN select. In the forward's
// softmax at D = 48 exp was half of the non-product time.
template <typename T>
inline Vec<T> exp_shifted(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec<float> e = exp_core(x > -87.0f ? x : broadcast(-87.0f));
    return x == -std::numeric_limits<float>::infinity() ? Vec<float>{} : e;
  } else {
    return exp<T>(x);
  }
}
// tanh for float: Eigen's generic_fast_tanh_float (a 13/6 rational on [-7.9, 7.9], clamped
// outside, x itself below 4e-4), a few ulp from the true tanh; NaN gives NaN, +-inf gives +-1.
// For double: the libm tanh per lane (gradient checks only, as for exp).
template <typename T>
inline Vec<T> tanh(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    const Mask<float> tiny = (x < 4e-4f) & (x > -4e-4f);
    const Vec<float> c = broadcast(7.90531110763549805f);
    const Vec<float> y = x > c ? c : (x < -c ? -c : x);  // NaN stays NaN (both compares false)
    const Vec<float> y2 = y * y;
    Vec<float> p = y2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
    p = p * y2 + -8.60467152213735e-11f;
    p = p * y2 + 5.12229709037114e-08f;
    p = p * y2 + 1.48572235717979e-05f;
    p = p * y2 + 6.37261928875436e-04f;
    p = p * y2 + 4.89352455891786e-03f;
    Vec<float> q = y2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
    q = q * y2 + 2.26843463243900e-03f;
    q = q * y2 + 4.89352518554385e-03f;
    return tiny ? x : y * p / q;
  } else {
    for (int i = 0; i < kLanes<T>; ++i) x[i] = std::tanh(x[i]);
    return x;
  }
}

// The micro-kernel: C[r][0 : NV*L] (=, or += with ACC) sum_{k < K} a(r, k) * B[k][0 : NV*L]
// for r < R, where a(r, k) = a[r * ars + k * aks] is broadcast and B's rows are vectors.
// R x NV accumulators stay in registers for the whole k loop. Shapes: C [R, ldc], B [K, ldb].
template <typename T, int R, int NV, bool ACC>
inline void tile(int64_t K, const T* a, int64_t ars, int64_t aks, const T* B, int64_t ldb, T* C,
                 int64_t ldc) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load(C + r * ldc + v * L) : Vec<T>{};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec<T> ar = broadcast(a[r * ars + k * aks]);
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * L, acc[r][v]);
}

constexpr int capped(int nv) { return nv < kTileVecs ? nv : kTileVecs; }

// Dispatches nv (1 .. kTileVecs) to the compile-time tile width.
template <typename T, int R, bool ACC>
inline void tile_rows(int64_t K, int nv, const T* a, int64_t ars, int64_t aks, const T* B,
                      int64_t ldb, T* C, int64_t ldc) {
  switch (nv) {
    case 1: return tile<T, R, 1, ACC>(K, a, ars, aks, B, ldb, C, ldc);
    case 2: return tile<T, R, capped(2), ACC>(K, a, ars, aks, B, ldb, C, ldc);
    case 3: return tile<T, R, capped(3), ACC>(K, a, ars, aks, B, ldb, C, ldc);
    default: return tile<T, R, capped(4), ACC>(K, a, ars, aks, B, ldb, C, ldc);
  }
}

// C[M, W*L] (=, or += with accumulate) A[M, K] B[K, W*L], with A read as a(m, k) = a[m*ars + k*aks]
// (any layout), B and C row-major with leading dimensions ldb, ldc (in elements).
template <typename T>
void matmul(int64_t M, int64_t W, int64_t K, const T* a, int64_t ars, int64_t aks, const T* B,
            int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int L = kLanes<T>;
  for (int64_t w = 0; w < W; w += kTileVecs) {
    const int nv = int(W - w < kTileVecs ? W - w : kTileVecs);
    const T* Bw = B + w * L;
    T* Cw = C + w * L;
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows) {
      if (accumulate) tile_rows<T, kTileRows, true>(K, nv, a + m * ars, ars, aks, Bw, ldb, Cw + m * ldc, ldc);
      else tile_rows<T, kTileRows, false>(K, nv, a + m * ars, ars, aks, Bw, ldb, Cw + m * ldc, ldc);
    }
    const T* am = a + m * ars;
    T* Cm = Cw + m * ldc;
#define SOFTPROMPT_REST(R)                                                      \
  case R:                                                                       \
    if (accumulate) tile_rows<T, R, true>(K, nv, am, ars, aks, Bw, ldb, Cm, ldc); \
    else tile_rows<T, R, false>(K, nv, am, ars, aks, Bw, ldb, Cm, ldc);         \
    break;
    switch (M - m) {
      SOFTPROMPT_REST(1)
      SOFTPROMPT_REST(2)
      SOFTPROMPT_REST(3)
      SOFTPROMPT_REST(4)
      SOFTPROMPT_REST(5)
      default: break;
    }
#undef SOFTPROMPT_REST
  }
}

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 float block (the usual unpack / shuffle / shuffle_f32x4 ladder).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0x88);
      t[8 * h + i + 4] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

#if defined(__AVX__) && !defined(__AVX512F__)
// In-register transpose of an 8 x 8 float block (unpack / shuffle / permute2f128).
inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}
#endif

// dst[c * ldd + r] = factor * src[r * lds + c] for r < rows, c < cols.
template <typename T>
void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols,
               T factor) {
  int64_t r0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 f = _mm512_set1_ps(factor);
    for (; r0 + 16 <= rows; r0 += 16) {
      int64_t c0 = 0;
      for (; c0 + 16 <= cols; c0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (r0 + i) * lds + c0);
        transpose16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (c0 + i) * ldd + r0, _mm512_mul_ps(f, r[i]));
      }
      for (int64_t r = r0; r < r0 + 16; ++r)
        for (int64_t c = c0; c < cols; ++c) dst[c * ldd + r] = factor * src[r * lds + c];
    }
  }
#elif defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 f = _mm256_set1_ps(factor);
    for (; r0 + 8 <= rows; r0 += 8) {
      int64_t c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (r0 + i) * lds + c0);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c0 + i) * ldd + r0, _mm256_mul_ps(f, r[i]));
      }
      for (int64_t r = r0; r < r0 + 8; ++r)
        for (int64_t c = c0; c < cols; ++c) dst[c * ldd + r] = factor * src[r * lds + c];
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = factor * src[r * lds + c];
}

}  // namespace softprompt::simd
