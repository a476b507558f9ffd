// Thread count shared by every kernel: one setting, read at each parallel region.
#pragma once
#include <cstdint>

namespace softprompt {

// Number of threads the kernels use; starts at OpenMP's default (which honours OMP_NUM_THREADS).
int num_threads();
void set_num_threads(int n);  // n >= 1
bool has_openmp();

// Threads to use for `work` units of roughly one flop each: small problems run serially,
// since waking a team costs more than it gives below this size.
int threads_for(double work);

}  // namespace softprompt
