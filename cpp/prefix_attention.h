// Batched attention over [learned prefix keys | input keys], forward and backward.
// Raw pointers and sizes only; validation happens at the Python boundary (ops.py, bindings.cpp).
#pragma once
#include <cstdint>

namespace softprompt {

struct AttentionShape {
  int64_t B, T, S, H, Hkv, D, P;  // batch, queries, input keys, heads, kv heads, head dim, prefix
  bool prefix_per_row;            // prefix is [B, P, Hkv, D] (else shared [P, Hkv, D])
  bool causal;                    // query i sees input key j iff j <= i + (S - T); prefix always
  double scale;                   // scores are scale * q . k
  // Sliding window (0: none). Positions: prefix key p at p, input key j at P + j, query i at
  // P + i + (S - T); a query at x sees a key at y iff x - y < window (with causal: W keys, itself
  // included), the prefix too: transformers' sliding window with PEFT's virtual tokens cached first.
  int64_t window;
  // Attention-logit soft-capping (0: none): a score s = scale * q . k becomes softcap *
  // tanh(s / softcap) before the softmax (Gemma 2's attn_logit_softcapping); the backward
  // multiplies ds by 1 - tanh^2.
  double softcap;
};

// q [B,T,H,D]; k, v [B,S,Hkv,D]; prefix_k, prefix_v [P,Hkv,D] or [B,P,Hkv,D];
// key_padding_mask [B,S] (1 = real key) or nullptr.
// Writes out [B,T,H,D] and lse [B,H,T] (log-sum-exp of the scaled, visible scores; -inf and a
// zero output for a query that sees no key).
template <typename T>
void prefix_attention_forward(const AttentionShape& s, const T* q, const T* k, const T* v,
                              const T* prefix_k, const T* prefix_v,
                              const uint8_t* key_padding_mask, T* out, T* lse);

// dout, out [B,T,H,D]; lse [B,H,T]; the rest as in the forward.
// Writes dq [B,T,H,D]; dk, dv [B,S,Hkv,D]; dprefix_k, dprefix_v shaped like the prefix
// (a shared prefix's gradient is summed over the batch, in batch order).
template <typename T>
void prefix_attention_backward(const AttentionShape& s, const T* dout, const T* q, const T* k,
                               const T* v, const T* prefix_k, const T* prefix_v,
                               const uint8_t* key_padding_mask, const T* out, const T* lse,
                               T* dq, T* dk, T* dv, T* dprefix_k, T* dprefix_v);

// Two implementations of the same math: "simd" (attention_simd.cpp: hand-blocked micro-kernels,
// the default where the compiler has GCC/Clang vector extensions) and "eigen"
// (prefix_attention.cpp: Eigen GEMMs on row blocks; portable, and the simpler one to read).
enum class AttentionKernel { simd, eigen };
bool has_simd_kernel();
void set_attention_kernel(AttentionKernel kernel);  // simd falls back to eigen where not built
AttentionKernel attention_kernel();

#define SOFTPROMPT_DECLARE_VARIANT(suffix)                                                      \
  template <typename T>                                                                         \
  void prefix_attention_forward_##suffix(const AttentionShape& s, const T* q, const T* k,      \
                                         const T* v, const T* prefix_k, const T* prefix_v,      \
                                         const uint8_t* key_padding_mask, T* out, T* lse);      \
  template <typename T>                                                                         \
  void prefix_attention_backward_##suffix(                                                     \
      const AttentionShape& s, const T* dout, const T* q, const T* k, const T* v,               \
      const T* prefix_k, const T* prefix_v, const uint8_t* key_padding_mask, const T* out,      \
      const T* lse, T* dq, T* dk, T* dv, T* dprefix_k, T* dprefix_v);
SOFTPROMPT_DECLARE_VARIANT(simd)
SOFTPROMPT_DECLARE_VARIANT(eigen)
#undef SOFTPROMPT_DECLARE_VARIANT

}  // namespace softprompt
