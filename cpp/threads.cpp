#include "threads.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
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
// Every kSampleSeconds, the first kernel call after the interval compares /proc/stat's busy time
// of the CPUs this process may run on (user + nice + system + irq + softirq; not steal, which no
// thread count can avoid) with this process's own CPU time (getrusage, all threads) over the
// interval: the difference, per second, is the cores other processes used. A core counts as taken
// when they used more than half of one.
constexpr double kSampleSeconds = 0.2;
// Calls of at least this many flops (~3 ms on one core) still use every thread: their dynamic work
// items take the share of time a loaded core leaves, which outweighs the waits at barriers.
constexpr double kShareWork = 3e8;
std::atomic<bool> g_adaptive{true};
std::atomic<int> g_taken{0};  // cores other processes took in the last interval
std::atomic<int> g_allowed{0};  // CPUs in this process's affinity mask at the last sample
std::mutex g_sample_mutex;
double g_last_wall = -1, g_last_busy = 0, g_last_self = 0;

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#ifdef __linux__
// Busy seconds of the CPUs in `mask` since boot, from /proc/stat's "cpuN" lines; false if unreadable.
bool cpu_busy_seconds(const cpu_set_t& mask, double* busy) {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return false;
  char line[512];
  unsigned long long total = 0;
  bool any = false;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "cpu", 3) != 0) {
      if (any) break;  // the cpuN lines are contiguous
      continue;
    }
    int cpu;
    unsigned long long user, nice, system, idle, iowait, irq, softirq;
    if (std::sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu", &cpu, &user, &nice, &system, &idle, &iowait,
                    &irq, &softirq) != 8)
      continue;  // the aggregate "cpu " line
    any = true;
    if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &mask)) total += user + nice + system + irq + softirq;
  }
  std::fclose(f);
  if (!any) return false;
  *busy = double(total) / double(sysconf(_SC_CLK_TCK));
  return true;
}

double self_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto s = [](const timeval& t) { return double(t.tv_sec) + 1e-6 * double(t.tv_usec); };
  return s(u.ru_utime) + s(u.ru_stime);
}

void sample() {
  std::unique_lock<std::mutex> lock(g_sample_mutex, std::try_to_lock);
  if (!lock.owns_lock()) return;  // another thread is sampling
  const double wall = wall_seconds();
  if (g_last_wall >= 0 && wall - g_last_wall < kSampleSeconds) return;
  cpu_set_t mask;
  CPU_ZERO(&mask);
  double busy;
  if (sched_getaffinity(0, sizeof mask, &mask) != 0 || !cpu_busy_seconds(mask, &busy)) {
    g_taken.store(0, std::memory_order_relaxed);
    g_last_wall = wall;
    return;
  }
  const double self = self_cpu_seconds();
  if (g_last_wall >= 0) {
    const double others = ((busy - g_last_busy) - (self - g_last_self)) / (wall - g_last_wall);
    g_taken.store(std::max(0, int(std::floor(others + 0.5))), std::memory_order_relaxed);
  }
  g_allowed.store(CPU_COUNT(&mask), std::memory_order_relaxed);
  g_last_wall = wall, g_last_busy = busy, g_last_self = self;
}
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
  sample();
  return std::min(n, free_cores());
}

}  // namespace softprompt
