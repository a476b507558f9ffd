// Dequantization of GGUF blocks. Compiled with -ffp-contract=off (CMakeLists.txt): d * q + m must
// round twice, like gguf's NumPy dequantizer, not once as an FMA, for the values to be bitwise equal.
#include <cstring>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "linear.h"

namespace softprompt {
namespace {

// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN).
float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do { m <<= 1; ++e; } while (!(m & 0x400u));
      bits = sign | uint32_t(112 - e) << 23 | (m & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

}  // namespace

int64_t block_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::q4_1: return 20;
    case WeightFormat::q8_0: return 34;
    default: return kQuantBlock * 4;
  }
}

void dequantize_row(const Weight& w, int64_t r, int64_t c0, int64_t count, float* out) {
  if (w.format == WeightFormat::f32) {
    std::memcpy(out, reinterpret_cast<const float*>(w.data) + r * w.cols + c0, count * sizeof(float));
    return;
  }
  const int64_t bb = block_bytes(w.format);
  const uint8_t* blk = w.data + r * w.row_bytes() + c0 / kQuantBlock * bb;
  for (int64_t j = 0; j < count; j += kQuantBlock, blk += bb, out += kQuantBlock) {
    const float d = half_to_float(blk);
#if defined(__AVX512F__)  // widen 16 bytes to 16 int32 lanes, convert, scale (GCC scalarizes a
                          // __builtin_convertvector from bytes to floats, so intrinsics here)
    __m512 lo, hi;
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (w.format == WeightFormat::q4_1 ? 4 : 2)));
    if (w.format == WeightFormat::q4_1) {
      const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(half_to_float(blk + 2));
      const __m512i b = _mm512_cvtepu8_epi32(q);
      lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), vd), vm);
      hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), vd), vm);
    } else {
      const __m512 vd = _mm512_set1_ps(d);
      const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
      lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), vd);
      hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), vd);
    }
    _mm512_storeu_ps(out, lo);
    _mm512_storeu_ps(out + 16, hi);
#else
    if (w.format == WeightFormat::q4_1) {
      const float m = half_to_float(blk + 2);
      const uint8_t* q = blk + 4;
      for (int i = 0; i < 16; ++i) out[i] = float(q[i] & 15) * d + m;
      for (int i = 0; i < 16; ++i) out[i + 16] = float(q[i] >> 4) * d + m;
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
      for (int i = 0; i < kQuantBlock; ++i) out[i] = float(q[i]) * d;
    }
#endif
  }
}

}  // namespace softprompt
