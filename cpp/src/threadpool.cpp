// trmath: a small persistent thread pool (no OpenMP, so it never clashes with torch's).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "view.hpp"

namespace trmath {
namespace {

int default_threads() {
  if (const char* e = std::getenv("TRMATH_NUM_THREADS")) {
    int n = std::atoi(e);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

// Workers and the caller spin briefly (kSpin) before they block on a condition variable: a job
// is one pass over the rows, a call runs one to four of them back to back, and waking a sleeping
// thread costs tens of microseconds in a virtual machine -- as much as the work of a row of
// 32768 logits. The caller never waits for a worker that is not already working on the job: a
// worker joins a job only while it is open (registering in the job's state word), the caller
// closes it once every item has been claimed and then waits for the registered workers alone.
// A worker asleep when a short job starts wakes up after it has ended and finds it closed.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Spin until pred() holds or kSpin has passed; true if it holds.
template <class Pred>
bool spin_until(Pred pred) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() - t0 > kSpin) return pred();
  }
}

// The job's state word: generation (high 32 bits), open flag (bit 31), registered workers (low
// bits). Only registered workers touch the job's closure and counters.
constexpr uint64_t kOpen = uint64_t(1) << 31;
constexpr uint64_t kActiveMask = kOpen - 1;
inline uint32_t gen_of(uint64_t s) { return uint32_t(s >> 32); }

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop_all(); }

  int size() const { return nthreads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    stop_all();
    nthreads_ = std::max(1, n);
    stop_.store(false);
    for (int i = 0; i + 1 < nthreads_; ++i) workers_.emplace_back([this] { loop(); });
  }

  void run(int64_t n, const std::function<void(int64_t)>& f) {
    if (n <= 0) return;
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (!run_lock.owns_lock() || nthreads_ == 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    // No worker is registered here (the last job waited for its own), so the fields are free.
    job_ = &f;
    njobs_ = n;
    next_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      const uint32_t g = gen_of(state_.load(std::memory_order_relaxed)) + 1;
      state_.store((uint64_t(g) << 32) | kOpen, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    // Every item is claimed: close the job, then wait for the workers that joined it.
    uint64_t s = state_.fetch_and(~kOpen, std::memory_order_acq_rel) & ~kOpen;
    if ((s & kActiveMask) != 0 &&
        !spin_until([this] { return (state_.load(std::memory_order_acquire) & kActiveMask) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [this] { return (state_.load(std::memory_order_acquire) & kActiveMask) == 0; });
    }
    job_ = nullptr;
  }

 private:
  // Guided self-scheduling: each claim takes a run of consecutive items, a 1/(2 threads) share
  // of what is left (so one item at the end): few claims on the shared counter and few cache
  // lines of outputs shared between threads when the items are small (rows of a hundred
  // logits), the same balance as item-by-item claims at the end of a job.
  void work() {
    const std::function<void(int64_t)>& f = *job_;
    const int64_t n = njobs_, div = 2 * int64_t(nthreads_);
    int64_t i = next_.load(std::memory_order_relaxed);
    for (;;) {
      if (i >= n) break;
      const int64_t k = std::max<int64_t>(1, (n - i) / div);
      if (!next_.compare_exchange_weak(i, i + k, std::memory_order_relaxed)) continue;
      for (int64_t j = i; j < i + k; ++j) f(j);
      i = next_.load(std::memory_order_relaxed);
    }
  }
  void loop() {
    uint32_t seen = 0;
    for (;;) {
      auto ready = [&] { return stop_.load() || gen_of(state_.load(std::memory_order_acquire)) != seen; };
      if (!spin_until(ready)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, ready);
      }
      if (stop_.load()) return;
      // Join the job if it is still open (one registration per generation).
      uint64_t s = state_.load(std::memory_order_acquire);
      seen = gen_of(s);
      bool joined = false;
      while (gen_of(s) == seen && (s & kOpen)) {
        if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
          joined = true;
          break;
        }
      }
      if (!joined) continue;
      work();
      const uint64_t before = state_.fetch_sub(1, std::memory_order_acq_rel);
      if ((before & kActiveMask) == 1 && !(before & kOpen)) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller may be blocked on done_cv_
        done_cv_.notify_all();
      }
    }
  }
  void stop_all() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t njobs_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<bool> stop_{false};
};

Pool& pool() {
  static Pool* p = new Pool(default_threads());  // leaked on purpose: no join at exit
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n); }
void parallel_for(int64_t n, const std::function<void(int64_t)>& f) { pool().run(n, f); }

}  // namespace trmath
