// Thread count shared by every kernel: one setting, read at each parallel region.
#pragma once
#include <cstdint>

namespace softprompt {

// Number of threads the kernels use at most; starts at OpenMP's default (which honours
// OMP_NUM_THREADS).
int num_threads();
void set_num_threads(int n);  // n >= 1
bool has_openmp();

// Whether the kernels run on fewer threads while other processes keep cores busy (default on):
// a thread that shares its core with another process gets a fraction of a time slice, and every
// barrier waits for it. Results do not depend on the thread count.
void set_adaptive_threads(bool on);
bool adaptive_threads();
// The CPUs this process may use minus the cores other processes kept busy over the last sample
// (at least 1; num_threads() before the first sample, off Linux, or where /proc/stat is unreadable).
int free_cores();

// Threads to use for `work` units of roughly one flop each: small problems run serially, since
// waking a team costs more than it gives below this size; otherwise num_threads(), or, with
// adaptive threads, no more than free_cores() for calls under ~0.3 GFLOP while other processes
// take cores.
int threads_for(double work);

}  // namespace softprompt
