// The soft-prompt prepend: y = [prompt | x] along the sequence, and its backward.
#pragma once
#include <cstdint>

namespace softprompt {

// prompt [P,D] (shared) or [B,P,D] (per_row); x [B,T,D]; writes y [B,P+T,D].
template <typename Scalar>
void prepend_forward(int64_t B, int64_t P, int64_t T, int64_t D, const Scalar* prompt, bool per_row,
                     const Scalar* x, Scalar* y);

// dy [B,P+T,D]; writes dprompt [P,D] (shared: summed over the batch, in batch order) or
// [B,P,D], and dx [B,T,D].
template <typename Scalar>
void prepend_backward(int64_t B, int64_t P, int64_t T, int64_t D, const Scalar* dy, bool shared,
                      Scalar* dprompt, Scalar* dx);

}  // namespace softprompt
