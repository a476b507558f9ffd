// Frozen linear layers: y = x W^T and its input gradient dx = dy W, float32, with W stored either as
// float32 or in a GGUF block-quantized format (kept compressed; blocks are dequantized into the
// GEMM's packed panels, the copy every GEMM makes of its B operand anyway). NumPy twins:
// python/softprompt/models/quant.py (dequantize) and layers.py (linear, linear_backward).
#pragma once
#include <cstdint>

namespace softprompt {

// Weight formats the GEMM reads without expanding W in memory (GGUF/ggml's; llama.cpp's ggml-common.h
// has the C structs). Blocks run along a row (the input dimension):
//   32-weight blocks, fp16 d (and m) first:
//     q4_0  {d, qs[16]}            w[j] = d * ((qs[j] & 15) - 8), w[j + 16] = d * ((qs[j] >> 4) - 8)
//     q4_1  {d, m, qs[16]}         w[j] = d * (qs[j] & 15) + m,   w[j + 16] = d * (qs[j] >> 4) + m
//     q5_0  {d, qh[4], qs[16]}     5-bit q = nibble | bit j of qh << 4; w = d * (q - 16)
//     q5_1  {d, m, qh[4], qs[16]}  w = d * q + m
//     q8_0  {d, int8 qs[32]}       w[j] = d * qs[j]
//     iq4_nl {d, qs[16]}           w = d * kvalues[nibble] (a fixed 16-value table)
//   256-weight super-blocks of 16 or 32-weight sub-blocks, each with its own scale:
//     q2_k  {scales[16], qs[64], d, dmin}       w = (d * (sc & 15)) * q2 - dmin * (sc >> 4)
//     q3_k  {hmask[32], qs[64], scales[12], d}  w = (d * (s6 - 32)) * (q2 - 4 * !hbit)
//     q4_k  {d, dmin, scales[12], qs[128]}      w = (d * s6) * q4 - dmin * m6
//     q5_k  {d, dmin, scales[12], qh[32], qs[128]}  w = (d * s6) * q5 - dmin * m6
//     q6_k  {ql[128], qh[64], int8 scales[16], d}  w = (d * sc) * (q6 - 32)
//   16-bit: f16 (IEEE half) and bf16 (the upper half of a float32), one weight per 2 bytes.
// Each product and sum is rounded to float32 as gguf's NumPy dequantizer does (no FMA: quant.cpp is
// compiled with -ffp-contract=off), so the values are bitwise the ones `gguf.quants.dequantize` gives.
enum class WeightFormat : int {
  f32 = 0, q4_1 = 1, q8_0 = 2, q4_0 = 3, q5_0 = 4, q5_1 = 5, iq4_nl = 6,
  q2_k = 7, q3_k = 8, q4_k = 9, q5_k = 10, q6_k = 11, f16 = 12, bf16 = 13,
};
constexpr int kNumFormats = 14;
constexpr int kQuantBlock = 32;  // the GEMM asks quantized rows in multiples of this many weights
int64_t block_elems(WeightFormat f);  // weights per block: 1 (f32, f16, bf16), 32, or 256 (k-quants)
int64_t block_bytes(WeightFormat f);  // bytes per block

// W [rows, cols] (out, in), row-major; a row is cols / block_elems blocks.
struct Weight {
  WeightFormat format;
  const uint8_t* data;
  int64_t rows, cols;
  int64_t row_bytes() const { return cols / block_elems(format) * block_bytes(format); }
};

// out[0 : count] = row `r` of W, columns [c0, c0 + count); c0 and count multiples of 32 for the
// block formats (any for f32, f16, bf16).
void dequantize_row(const Weight& w, int64_t r, int64_t c0, int64_t count, float* out);

// x [M, cols] -> y [M, rows] = x W^T (+ bias [rows] when not null)
void linear_forward(int64_t M, const float* x, const Weight& w, const float* bias, float* y);
// The same y for a few rows (decoding one token per sequence): one dot product per (row, output),
// W read once, no packed panels. Its sums run in another order than linear_forward's, so its
// results differ from it in the last bits; only generation uses it.
void linear_forward_few(int64_t M, const float* x, const Weight& w, const float* bias, float* y);
// dy [M, rows] -> dx [M, cols] = dy W
void linear_backward(int64_t M, const float* dy, const Weight& w, float* dx);

}  // namespace softprompt
