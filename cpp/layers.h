// Fused kernels for the frozen Llama block's cheap layers (RMSNorm, RoPE, SwiGLU) and the LM
// cross-entropy, each forward beside its backward. Their NumPy twins are in
// python/softprompt/models/layers.py and heads.py. Row-parallel over OpenMP; every row is computed
// the same way whatever the thread count, so results are bitwise identical across thread counts.
#pragma once
#include <cstdint>

namespace softprompt {

// x [N, C], w [C] -> y [N, C] = x * rstd * w, rstd [N] = 1 / sqrt(mean(x^2) + eps)
template <typename T>
void rmsnorm_forward(int64_t N, int64_t C, const T* x, const T* w, T eps, T* y, T* rstd);
// dy, x [N, C], rstd [N], w [C], residual [N, C] or null -> dx [N, C] (= residual + d rmsnorm)
template <typename T>
void rmsnorm_backward(int64_t N, int64_t C, const T* dy, const T* x, const T* rstd, const T* w,
                      const T* residual, T* dx);

// gu [N, 2F] = [gate | up] -> a [N, F] = silu(gate) * up
template <typename T>
void swiglu_forward(int64_t N, int64_t F, const T* gu, T* a);
// da [N, F], gu [N, 2F] -> dgu [N, 2F] = [d gate | d up]
template <typename T>
void swiglu_backward(int64_t N, int64_t F, const T* da, const T* gu, T* dgu);

// qkv [N, (H + 2 Hkv) D] (one fused projection: q heads, k heads, v heads), cos/sin [N, D/2]
// -> q [N, H, D], k [N, Hkv, D] rotated (pairs i, i + D/2), v [N, Hkv, D] copied.
template <typename T>
void rope_split(int64_t N, int64_t H, int64_t Hkv, int64_t D, const T* qkv, const T* cos,
                const T* sin, T* q, T* k, T* v);
// The backward: dq, dk, dv -> dqkv [N, (H + 2 Hkv) D], rotated back by the negative angle.
template <typename T>
void rope_merge(int64_t N, int64_t H, int64_t Hkv, int64_t D, const T* dq, const T* dk,
                const T* dv, const T* cos, const T* sin, T* dqkv);

// Cross-entropy over rows of logits [N, V] with labels [N]: writes each row's loss (float64) to
// loss [N] and overwrites logits with scale * (softmax - onehot(label)), the gradient of
// scale * sum(loss). Labels must be in [0, V) (checked by the caller).
template <typename T>
void softmax_cross_entropy(int64_t N, int64_t V, T* logits, const int64_t* labels, double scale,
                           double* loss);

}  // namespace softprompt
