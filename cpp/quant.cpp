// Dequantization of GGUF blocks. Compiled with -ffp-contract=off (CMakeLists.txt): d * q + m must
// round twice, like gguf's NumPy dequantizer, not once as an FMA, for the values to be bitwise equal.
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
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

// llama.cpp's kvalues_iq4nl (ggml-common.h), the values IQ4_NL's nibbles index.
constexpr int8_t kIq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Q4_K / Q5_K: the 6-bit scale and min of 32-weight sub-block j (0..7) from the 12 packed bytes.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63, mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
    mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}

// Weights [32 j, 32 j + 32) of one 256-weight super-block of a k-quant -> out[0:32], in gguf's
// element order (quants.py's reshapes, spelled out per weight).
void dequantize_k_chunk(WeightFormat f, const uint8_t* b, int j, float* out) {
  switch (f) {
    case WeightFormat::q2_k: {  // scales[16] qs[64] d dmin
      const float d = half_to_float(b + 80), dmin = half_to_float(b + 82);
      const uint8_t* qs = b + 16 + (j / 4) * 32;
      const int shift = 2 * (j % 4);
      for (int h = 0; h < 2; ++h) {
        const uint8_t sc = b[2 * j + h];
        const float dl = d * float(sc & 15), ml = dmin * float(sc >> 4);
        for (int i = 0; i < 16; ++i) out[16 * h + i] = dl * float((qs[16 * h + i] >> shift) & 3) - ml;
      }
      return;
    }
    case WeightFormat::q3_k: {  // hmask[32] qs[64] scales[12] d
      const float d = half_to_float(b + 108);
      const uint8_t* hmask = b;
      const uint8_t* qs = b + 32 + (j / 4) * 32;
      const uint8_t* sc = b + 96;
      const int shift = 2 * (j % 4);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * j + h;
        const int low = s < 8 ? sc[s] & 15 : sc[s - 8] >> 4;
        const int high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
        const float dl = d * float(int8_t(uint8_t(low | high << 4)) - 32);
        for (int i = 0; i < 16; ++i) {
          const int l = 16 * h + i;
          const int q = ((qs[l] >> shift) & 3) - (((hmask[l] >> j) & 1) ? 0 : 4);
          out[l] = dl * float(q);
        }
      }
      return;
    }
    case WeightFormat::q4_k:
    case WeightFormat::q5_k: {  // d dmin scales[12] (qh[32]) qs[128]
      const bool five = f == WeightFormat::q5_k;
      int sc, mn;
      k_scale_min(b + 4, j, sc, mn);
      const float dl = half_to_float(b) * float(sc), ml = half_to_float(b + 2) * float(mn);
      const uint8_t* qs = b + (five ? 48 : 16) + (j / 2) * 32;
      const int shift = 4 * (j % 2);
      for (int i = 0; i < 32; ++i) {
        int q = (qs[i] >> shift) & 15;
        if (five) q |= ((b[16 + i] >> j) & 1) << 4;
        out[i] = dl * float(q) - ml;
      }
      return;
    }
    case WeightFormat::q6_k: {  // ql[128] qh[64] int8 scales[16] d
      const float d = half_to_float(b + 208);
      const int half = j / 4, quarter = j % 4;
      const uint8_t* ql = b + half * 64 + (quarter % 2) * 32;
      const uint8_t* qh = b + 128 + half * 32;
      const int lshift = 4 * (quarter / 2), hshift = 2 * quarter;
      for (int h = 0; h < 2; ++h) {
        const float dl = d * float(int8_t(b[192 + 2 * j + h]));
        for (int i = 0; i < 16; ++i) {
          const int l = 16 * h + i;
          const int q = ((ql[l] >> lshift) & 15) | (((qh[l] >> hshift) & 3) << 4);
          out[l] = dl * float(q - 32);
        }
      }
      return;
    }
    default: return;
  }
}

// One 32-weight block of the legacy formats (not q4_1 / q8_0's SIMD path) -> out[0:32].
void dequantize_block32(WeightFormat f, const uint8_t* b, float* out) {
  const float d = half_to_float(b);
  switch (f) {
    case WeightFormat::q4_0:
      for (int i = 0; i < 16; ++i) out[i] = d * float((b[2 + i] & 15) - 8), out[i + 16] = d * float((b[2 + i] >> 4) - 8);
      return;
    case WeightFormat::iq4_nl:
      for (int i = 0; i < 16; ++i) out[i] = d * float(kIq4nl[b[2 + i] & 15]), out[i + 16] = d * float(kIq4nl[b[2 + i] >> 4]);
      return;
    case WeightFormat::q5_0:
    case WeightFormat::q5_1: {
      const bool one = f == WeightFormat::q5_1;
      const float m = one ? half_to_float(b + 2) : 0.0f;
      uint32_t qh;
      std::memcpy(&qh, b + (one ? 4 : 2), 4);
      const uint8_t* qs = b + (one ? 8 : 6);
      for (int i = 0; i < 32; ++i) {
        const int q = ((i < 16 ? qs[i] & 15 : qs[i - 16] >> 4)) | int((qh >> i) & 1) << 4;
        out[i] = one ? d * float(q) + m : d * float(q - 16);
      }
      return;
    }
    case WeightFormat::q4_1: {
      const float m = half_to_float(b + 2);
      for (int i = 0; i < 16; ++i) out[i] = float(b[4 + i] & 15) * d + m;
      for (int i = 0; i < 16; ++i) out[i + 16] = float(b[4 + i] >> 4) * d + m;
      return;
    }
    case WeightFormat::q8_0:
      for (int i = 0; i < 32; ++i) out[i] = float(int8_t(b[2 + i])) * d;
      return;
    default: return;
  }
}

}  // namespace

int64_t block_elems(WeightFormat f) {
  switch (f) {
    case WeightFormat::f32:
    case WeightFormat::f16:
    case WeightFormat::bf16: return 1;
    case WeightFormat::q2_k:
    case WeightFormat::q3_k:
    case WeightFormat::q4_k:
    case WeightFormat::q5_k:
    case WeightFormat::q6_k: return 256;
    default: return 32;
  }
}

int64_t block_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::f32: return 4;
    case WeightFormat::f16:
    case WeightFormat::bf16: return 2;
    case WeightFormat::q4_0: return 18;
    case WeightFormat::q4_1: return 20;
    case WeightFormat::q5_0: return 22;
    case WeightFormat::q5_1: return 24;
    case WeightFormat::q8_0: return 34;
    case WeightFormat::iq4_nl: return 18;
    case WeightFormat::q2_k: return 84;
    case WeightFormat::q3_k: return 110;
    case WeightFormat::q4_k: return 144;
    case WeightFormat::q5_k: return 176;
    case WeightFormat::q6_k: return 210;
  }
  return 0;
}

void dequantize_row(const Weight& w, int64_t r, int64_t c0, int64_t count, float* out) {
  const uint8_t* row = w.data + r * w.row_bytes();
  switch (w.format) {
    case WeightFormat::f32:
      std::memcpy(out, reinterpret_cast<const float*>(row) + c0, count * sizeof(float));
      return;
    case WeightFormat::f16:
      for (int64_t j = 0; j < count; ++j) out[j] = half_to_float(row + 2 * (c0 + j));
      return;
    case WeightFormat::bf16:
      for (int64_t j = 0; j < count; ++j) {
        uint16_t h;
        std::memcpy(&h, row + 2 * (c0 + j), 2);
        const uint32_t bits = uint32_t(h) << 16;
        std::memcpy(out + j, &bits, 4);
      }
      return;
    default: break;
  }
  const int64_t be = block_elems(w.format), bb = block_bytes(w.format);
  if (be == 256) {  // k-quants: 32-weight chunks of 256-weight super-blocks
    for (int64_t c = c0; c < c0 + count; c += kQuantBlock, out += kQuantBlock)
      dequantize_k_chunk(w.format, row + c / 256 * bb, int(c % 256 / 32), out);
    return;
  }
  const uint8_t* blk = row + c0 / kQuantBlock * bb;
  for (int64_t j = 0; j < count; j += kQuantBlock, blk += bb, out += kQuantBlock) {
#if defined(__AVX512F__)  // q4_1 / q8_0: widen 16 bytes to 16 int32 lanes, convert, scale (GCC
                          // scalarizes a __builtin_convertvector from bytes to floats, so intrinsics)
    if (w.format == WeightFormat::q4_1 || w.format == WeightFormat::q8_0) {
      const float d = half_to_float(blk);
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
      continue;
    }
#elif defined(__AVX2__)  // the same with 8 lanes: bytes 0-7 and 8-15 apart
    if (w.format == WeightFormat::q4_1 || w.format == WeightFormat::q8_0) {
      const __m256 vd = _mm256_set1_ps(half_to_float(blk));
      if (w.format == WeightFormat::q4_1) {
        const __m256 vm = _mm256_set1_ps(half_to_float(blk + 2));
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
        const __m256i nib = _mm256_set1_epi32(15);
        for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h + 7: weights 8h + i (low nibbles), 16 + 8h + i (high)
          const __m256i b = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(q, 8) : q);
          _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nib)), vd), vm));
          _mm256_storeu_ps(out + 16 + 8 * h, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), vd), vm));
        }
      } else {
        for (int h = 0; h < 4; ++h) {
          const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * h));
          _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vd));
        }
      }
      continue;
    }
#endif
    dequantize_block32(w.format, blk, out);
  }
}

}  // namespace softprompt
