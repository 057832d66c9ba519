// trmath: a small persistent thread pool (no OpenMP, so it never clashes with torch's).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
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
// 32768 logits. A job waits for every worker to check in (it owns the job's closure), so a
// worker asleep when it starts would add its wake-up to every short call.
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
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      njobs_ = n;
      next_.store(0);
      active_.store(int(workers_.size()));
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    if (!spin_until([this] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [this] { return active_.load(std::memory_order_acquire) == 0; });
    }
    job_ = nullptr;
  }

 private:
  void work() {
    const std::function<void(int64_t)>& f = *job_;
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= njobs_) break;
      f(i);
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto ready = [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(ready)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, ready);
      }
      if (stop_.load()) return;
      {
        // The job's fields were written under mu_ before the generation moved.
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load();
      }
      work();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);
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
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
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
