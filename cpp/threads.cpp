#include "threads.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>
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

// ---- Cores that other processes keep busy (Linux; elsewhere none are ever counted).
// Every kSampleSeconds, the first call that may adapt compares /proc/stat's busy time of the CPUs
// this process may run on (user + nice + system + irq + softirq; not steal, which no thread count
// can avoid) with this process's own CPU time (getrusage, all threads) over the interval: the
// difference, per second, is the cores other processes used, rounded to whole cores ("taken").
constexpr double kSampleSeconds = 0.2;
constexpr double kMaxInterval = 2.0;  // a longer gap (an idle process) starts a new baseline
// Calls of at least this many flops (~3 ms on one core) still use every thread: their dynamic work
// items take the share of time a loaded core leaves, which outweighs the waits at barriers.
constexpr double kShareWork = 3e8;
std::atomic<bool> g_adaptive{true};
std::atomic<int> g_taken{0};    // cores other processes took in the last interval
std::atomic<int> g_allowed{0};  // CPUs counted at the last sample (0: never sampled)
std::atomic<bool> g_sampling{false};  // one sampler at a time; the others go on without waiting

struct Baseline {
  double wall = -1, busy = 0, self = 0;
  uint64_t cpus = 0;  // a hash of the CPU set the busy time was summed over
};
Baseline g_base;  // guarded by g_sampling

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#ifdef __linux__
// Busy seconds since boot of the CPUs in `mask` (every CPU if mask is null), from /proc/stat's
// "cpuN" lines; the CPUs counted in *count and a hash of their set in *cpus. False if unreadable.
bool cpu_busy_seconds(const cpu_set_t* mask, double* busy, int* count, uint64_t* cpus) {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return false;
  char line[512];
  unsigned long long total = 0;
  *count = 0, *cpus = 0;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "cpu", 3) != 0) {
      if (*count) break;  // the cpuN lines are contiguous
      continue;
    }
    if (!std::isdigit(static_cast<unsigned char>(line[3]))) continue;  // the "cpu " total line
    long cpu;
    unsigned long long user, nice, system, idle, iowait, irq, softirq;
    if (std::sscanf(line + 3, "%ld %llu %llu %llu %llu %llu %llu %llu", &cpu, &user, &nice, &system, &idle,
                    &iowait, &irq, &softirq) != 8)
      continue;
    if (mask && (cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, mask))) continue;
    total += user + nice + system + irq + softirq;
    ++*count;
    *cpus = *cpus * 1000003u + uint64_t(cpu) + 1;
  }
  std::fclose(f);
  *busy = double(total) / double(sysconf(_SC_CLK_TCK));
  return *count > 0;
}

double self_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto s = [](const timeval& t) { return double(t.tv_sec) + 1e-6 * double(t.tv_usec); };
  return s(u.ru_utime) + s(u.ru_stime);
}

void sample_locked() {
  const double wall = wall_seconds();
  Baseline& base = g_base;
  if (base.wall >= 0 && wall - base.wall < kSampleSeconds) return;
  // The calling thread's mask: the process's, unless OpenMP (OMP_PROC_BIND) or the caller pinned
  // this thread to fewer CPUs than the team, when it says nothing of where the team runs: then
  // every CPU counts.
  cpu_set_t mask;
  CPU_ZERO(&mask);
  const bool own = sched_getaffinity(0, sizeof mask, &mask) == 0 && CPU_COUNT(&mask) >= num_threads();
  double busy;
  int count;
  uint64_t cpus;
  if (!cpu_busy_seconds(own ? &mask : nullptr, &busy, &count, &cpus)) {
    g_taken.store(0, std::memory_order_relaxed);
    g_allowed.store(0, std::memory_order_relaxed);
    base.wall = -1;
    return;
  }
  const double self = self_cpu_seconds();
  // A new baseline after a changed CPU set or a long gap (and after a fork: the handler below).
  const bool fresh = base.wall >= 0 && base.cpus == cpus && wall - base.wall <= kMaxInterval;
  if (fresh) {
    const double others = ((busy - base.busy) - (self - base.self)) / (wall - base.wall);
    g_taken.store(std::max(0, int(std::floor(others + 0.5))), std::memory_order_relaxed);
  }
  g_allowed.store(count, std::memory_order_relaxed);
  base = {wall, busy, self, cpus};
}

void sample() {
  bool expected = false;
  if (!g_sampling.compare_exchange_strong(expected, true, std::memory_order_acquire)) return;
  sample_locked();
  g_sampling.store(false, std::memory_order_release);
}
// In a forked child getrusage restarts from zero (a new baseline), and a flag set by a thread that
// was sampling at the fork would stay set for good.
const int g_atfork = pthread_atfork(nullptr, nullptr, [] {
  g_sampling.store(false);
  g_base = Baseline{};
});
#else
void sample() {}
#endif
}  // namespace

int num_threads() { return g_threads.load(std::memory_order_relaxed); }
void set_num_threads(int n) { g_threads.store(std::max(1, n), std::memory_order_relaxed); }
void set_adaptive_threads(bool on) { g_adaptive.store(on, std::memory_order_relaxed); }
bool adaptive_threads() { return g_adaptive.load(std::memory_order_relaxed); }

int free_cores() {
  const int allowed = g_allowed.load(std::memory_order_relaxed);
  return allowed ? std::max(1, allowed - g_taken.load(std::memory_order_relaxed)) : num_threads();
}

// The team for a call that may adapt: every thread while no core is taken (also more threads than
// CPUs, if that was asked for), else no more than the cores left.
int adapted(int n) {
  sample();
  return g_taken.load(std::memory_order_relaxed) ? std::min(n, free_cores()) : n;
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int threads_for(double work) {
  if (work < kSerialWork) return 1;
  const int n = num_threads();
  if (n == 1 || work >= kShareWork || !g_adaptive.load(std::memory_order_relaxed)) return n;
  return adapted(n);
}

}  // namespace softprompt
