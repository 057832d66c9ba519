// trmath: stress of the thread pool (cpp/src/threadpool.cpp), run by .ci/run under
// ThreadSanitizer. Every item of a job runs exactly once: short jobs of 1..37 items back to back
// (workers spinning), after pauses (workers asleep, so jobs end before they wake up and must
// find them closed), from several calling threads at once (one runs in the pool, the others
// serially), and after a resize.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <thread>
#include <vector>
namespace trmath { int num_threads(); void set_num_threads(int); void parallel_for(int64_t, const std::function<void(int64_t)>&); }
int main() {
  trmath::set_num_threads(3);
  long bad = 0;
  for (int rep = 0; rep < 20000; ++rep) {
    int64_t n = 1 + rep % 37;
    std::vector<int> hit(n, 0);
    trmath::parallel_for(n, [&](int64_t i) { hit[i] += 1; });
    for (int64_t i = 0; i < n; ++i) bad += hit[i] != 1;
    if (rep % 1000 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));  // workers sleep
  }
  // Concurrent callers: one runs in the pool, the others serially.
  std::vector<std::thread> ts;
  std::atomic<long> bad2{0};
  for (int k = 0; k < 3; ++k) ts.emplace_back([&] {
    for (int rep = 0; rep < 3000; ++rep) {
      std::vector<int> hit(64, 0);
      trmath::parallel_for(64, [&](int64_t i) { hit[i] += 1; });
      for (int v : hit) bad2 += v != 1;
    }
  });
  for (auto& t : ts) t.join();
  trmath::set_num_threads(2);
  std::vector<int> hit(1000, 0);
  trmath::parallel_for(1000, [&](int64_t i) { hit[i] += 1; });
  for (int v : hit) bad += v != 1;
  std::printf("bad %ld bad2 %ld\n", bad, bad2.load());
  return (bad || bad2) ? 1 : 0;
}
