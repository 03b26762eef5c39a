// corelm's thread pool for the kernels' parallel loops (included once, by corelm_kernels.cpp).
#pragma once

#include <ATen/Parallel.h>  // at::get_num_threads: the pool follows torch.set_num_threads
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define CORELM_PAUSE() _mm_pause()
#else
#define CORELM_PAUSE() std::this_thread::yield()
#endif

namespace corelm {

// ---------------------------------------------------------------------------------------------------
// Parallel loops. OpenMP's parallel regions end in a barrier that waits for every thread: when
// another process holds one of a 2-core machine's cores, the descheduled thread holds up each of the
// ~120 regions of a decode step (measured: 1 token/s instead of 250). Here the work is handed out in
// chunks through one atomic ticket, and the caller waits only for chunks a worker has already taken:
// a worker that is not running takes none, and the caller does the rest itself.
// ---------------------------------------------------------------------------------------------------
class Pool {
 public:
  // Run fn(begin, end) over [0, n) in chunks of `chunk`, on the caller and the pool's workers.
  static void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    chunk = std::max<int64_t>(1, chunk);
    if (threads == 1 || n <= chunk || n + chunk >= kMaxN || chunk >= kMaxChunk) {
      fn(0, n);
      return;
    }
    Pool& pool = instance(threads - 1);
    std::unique_lock<std::mutex> busy(pool.run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another Python thread is in a kernel: no nesting, run here
      fn(0, n);
      return;
    }
    pool.run(n, chunk, fn);
  }

 private:
  // ticket = generation (12 bits) | chunk (16) | n (18) | next (18)
  static constexpr int64_t kMaxN = int64_t(1) << 18, kMaxChunk = int64_t(1) << 16;
  static int64_t next_of(uint64_t t) { return static_cast<int64_t>(t & (kMaxN - 1)); }
  static int64_t n_of(uint64_t t) { return static_cast<int64_t>((t >> 18) & (kMaxN - 1)); }
  static int64_t chunk_of(uint64_t t) { return static_cast<int64_t>((t >> 36) & (kMaxChunk - 1)); }

  static Pool& instance(int64_t workers) {
    static Pool* pool = nullptr;  // never destroyed: workers are detached and may outlive statics
    static std::mutex made;
    std::lock_guard<std::mutex> lock(made);
    if (pool == nullptr || pool->pid_ != getpid() || pool->workers_ != workers) {
      if (pool != nullptr && pool->pid_ == getpid()) pool->retire();
      pool = new Pool(workers);  // after fork() the child has no workers: a fresh pool
    }
    return *pool;
  }

  explicit Pool(int64_t workers) : workers_(workers), pid_(getpid()) {
    for (int64_t i = 0; i < workers; ++i) std::thread([this] { work(); }).detach();
  }

  void retire() {
    stop_.store(true);
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    wake_.notify_all();
  }

  // Take chunks of the current job until none is left; returns false when there was none to take.
  bool take() {
    bool took = false;
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while (next_of(t) < n_of(t)) {
      if (ticket_.compare_exchange_weak(t, t + static_cast<uint64_t>(chunk_of(t)), std::memory_order_acq_rel)) {
        const int64_t begin = next_of(t), end = std::min(begin + chunk_of(t), n_of(t));
        (*fn_)(begin, end);  // the job cannot end (and fn_ change) before this chunk is counted
        done_.fetch_add(end - begin, std::memory_order_acq_rel);
        took = true;
        t = ticket_.load(std::memory_order_acquire);
      }
    }
    return took;
  }

  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & 0xFFF;
    ticket_.store((static_cast<uint64_t>(generation_) << 52) | (static_cast<uint64_t>(chunk) << 36) |
                  (static_cast<uint64_t>(n) << 18));
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    take();
    while (done_.load(std::memory_order_acquire) < n) CORELM_PAUSE();  // only chunks already taken
  }

  void work() {
    using clock = std::chrono::steady_clock;
    auto idle_since = clock::now();
    int64_t spins = 0;
    while (!stop_.load(std::memory_order_relaxed)) {
      if (take()) {
        idle_since = clock::now();
        continue;
      }
      CORELM_PAUSE();
      // spin ~1 ms between jobs (a decode step's regions are microseconds apart), then sleep
      if ((++spins & 255) == 0 && clock::now() - idle_since > std::chrono::milliseconds(1)) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [this] {
          const uint64_t t = ticket_.load();
          return stop_.load() || next_of(t) < n_of(t);
        });
        sleepers_.fetch_sub(1);
        idle_since = clock::now();
      }
    }
  }

  const int64_t workers_;
  const pid_t pid_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  uint64_t generation_ = 0;
};

// Every output row of several matrices read together (q|k|v, gate|up; each M has .n rows), split across
// the pool in chunks of at least 16 rows, about 4 per thread: fn(i, r) for row r of matrix ms[i].
template <class M, class Fn>
void for_each_row(const std::vector<M>& ms, const Fn& fn) {
  int64_t total = 0;
  for (const auto& m : ms) total += m.n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, (total + 4 * threads - 1) / (4 * threads));
  Pool::parallel_for(total, chunk, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    int64_t base = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= base + ms[i].n) base += ms[i++].n;
      fn(i, r - base);
    }
  });
}

}  // namespace corelm
