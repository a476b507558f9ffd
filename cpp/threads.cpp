#include "threads.h"

#include <algorithm>
#include <atomic>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace softprompt {
namespace {
int initial_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}
// A process-wide setting rather than omp_set_num_threads, which is per calling thread:
// a setting made on the main thread must also hold for kernels called from other threads.
std::atomic<int> g_threads{initial_threads()};
constexpr double kSerialWork = 2e5;  // below ~0.2 Mflop one thread beats waking the (spinning) team
}  // namespace

int num_threads() { return g_threads.load(std::memory_order_relaxed); }
void set_num_threads(int n) { g_threads.store(std::max(1, n), std::memory_order_relaxed); }

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int threads_for(double work) { return work < kSerialWork ? 1 : num_threads(); }

}  // namespace softprompt
