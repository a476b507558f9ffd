// Frozen linear layers: y = x W^T and its input gradient dx = dy W, float32, with W stored either as
// float32 or in a GGUF block-quantized format (kept compressed; blocks are dequantized into the
// GEMM's packed panels, the copy every GEMM makes of its B operand anyway). NumPy twins:
// python/softprompt/models/quant.py (dequantize) and layers.py (linear, linear_backward).
#pragma once
#include <cstdint>

namespace softprompt {

// GGUF/ggml block formats, 32 weights per block along a row (the input dimension):
//   q4_1: {fp16 d, fp16 m, uint8 qs[16]} (20 bytes), w[j] = d * (qs[j] & 15) + m, w[j + 16] = d * (qs[j] >> 4) + m
//   q8_0: {fp16 d, int8 qs[32]} (34 bytes), w[j] = d * qs[j]
// Each product and sum is rounded to float32 as gguf's NumPy dequantizer does (no FMA), so the
// values are bitwise the ones `gguf.quants.dequantize` gives.
enum class WeightFormat : int { f32 = 0, q4_1 = 1, q8_0 = 2 };
constexpr int kQuantBlock = 32;
int64_t block_bytes(WeightFormat f);  // bytes per 32 weights (f32: 128)

// W [rows, cols] (out, in), row-major; a row of a quantized format is cols / 32 blocks.
struct Weight {
  WeightFormat format;
  const uint8_t* data;
  int64_t rows, cols;
  int64_t row_bytes() const {
    return format == WeightFormat::f32 ? cols * 4 : cols / kQuantBlock * block_bytes(format);
  }
};

// out[0 : count] = row `r` of W, columns [c0, c0 + count); c0 and count multiples of 32 unless f32.
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
