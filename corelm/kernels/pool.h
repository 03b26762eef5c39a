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
//
// That leaves one stall: a worker descheduled in the middle of a chunk it took. With a neighbour on one
// of 2 cores, three runnable threads share two cores and it happens every few regions (measured on the
// Zen 4, embedded model, int4 step: 1 thread decoded 110 tok/s beside a busy loop, 2 threads 67). So the
// caller watches its waits: one longer than two of its own chunks (and than 200 us) is a stall. A
// second stall within 64 jobs of the first means a neighbour (it stalls every few regions), and the pool
// then leaves one worker more out of its jobs for a while (an idle worker falls asleep and leaves its
// core to the neighbour; on 2 cores the caller works alone). The window starts at 50 ms and doubles, up
// to 1 s, while stalls come back as soon as every worker is back; a second of jobs without one resets it.
// A lone stall is a passing preemption: on the 2-core Intel Xeon (a KVM guest) a float model's decode,
// whose memory-bound chunks take milliseconds, met 2-5 of them per 64 tokens, about one per 2000 jobs,
// and reacting to each held 2-thread fp32 decode at 24-31 tok/s against 42-46 without.
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
    if (!busy.owns_lock() || pool.active() == 0) {  // another Python thread is in a kernel (no nesting), or solo
      fn(0, n);
      return;
    }
    pool.run(n, chunk, fn);
  }

  // The workers that take part in jobs now (all of them but during a stall's window; 0 at one thread).
  static int64_t active_workers() {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    if (threads == 1) return 0;
    Pool& pool = instance(threads - 1);
    std::lock_guard<std::mutex> busy(pool.run_mutex_);
    return pool.active();
  }

 private:
  using Clock = std::chrono::steady_clock;

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

  explicit Pool(int64_t workers) : workers_(workers), pid_(getpid()), active_(workers) {
    for (int64_t i = 0; i < workers; ++i) std::thread([this, i] { work(i); }).detach();
  }

  // The workers that take part in jobs now (see the comment above the class); the caller's lock is held.
  int64_t active() {
    if (active_.load(std::memory_order_relaxed) < workers_ && Clock::now() >= reduced_until_)
      active_.store(workers_, std::memory_order_relaxed);  // the window is over: every worker again
    return active_.load(std::memory_order_relaxed);
  }

  void retire() {
    stop_.store(true);
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    wake_.notify_all();
  }

  // Take chunks of the current job until none is left; returns how many it took.
  int64_t take() {
    int64_t took = 0;
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while (next_of(t) < n_of(t)) {
      if (ticket_.compare_exchange_weak(t, t + static_cast<uint64_t>(chunk_of(t)), std::memory_order_acq_rel)) {
        const int64_t begin = next_of(t), end = std::min(begin + chunk_of(t), n_of(t));
        (*fn_)(begin, end);  // the job cannot end (and fn_ change) before this chunk is counted
        done_.fetch_add(end - begin, std::memory_order_acq_rel);
        ++took;
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
    ++jobs_;
    const auto start = Clock::now();
    const int64_t mine = take();
    if (done_.load(std::memory_order_acquire) < n) wait(n, mine, Clock::now() - start);
  }

  // Wait for the chunks the workers took. A worker's last chunk started before the caller's last one
  // ended, so a wait longer than two of the caller's chunks (and than 200 us) is a stall; with no chunk
  // of its own the caller has nothing to compare with.
  void wait(int64_t n, int64_t chunks, Clock::duration spent) {
    const auto limit = std::max<Clock::duration>(2 * spent / std::max<int64_t>(1, chunks), std::chrono::microseconds(200));
    const auto from = Clock::now();
    bool stalled = false;
    for (int64_t spins = 1; done_.load(std::memory_order_acquire) < n; ++spins) {
      CORELM_PAUSE();
      if (!stalled && chunks > 0 && (spins & 1023) == 0 && Clock::now() - from > limit) stalled = true;
      if (stalled) std::this_thread::yield();  // the late worker may be queued on this core
    }
    const bool again = stalled && jobs_ - last_stall_ <= kRecent;  // a lone stall is let pass
    if (stalled) last_stall_ = jobs_;
    if (again) {
      const auto now = Clock::now();
      // a stall soon after the last window: the neighbour is still there, stay away longer
      window_ = now - reduced_until_ < std::chrono::seconds(1) ? std::min(2 * window_, kMaxWindow) : kWindow;
      reduced_until_ = now + window_;
      active_.store(std::max<int64_t>(0, active_.load() - 1));
    }
  }

  void work(int64_t index) {
    auto idle_since = Clock::now();
    int64_t spins = 0;
    while (!stop_.load(std::memory_order_relaxed)) {
      if (index < active_.load(std::memory_order_relaxed) && take() > 0) {
        idle_since = Clock::now();
        continue;
      }
      // Spin ~1 ms between jobs (a decode step's regions are microseconds apart), then sleep. The spin
      // yields: a worker sharing its core with the caller (three runnable threads on two cores) would
      // otherwise take half of the caller's time, with no stall for the rule above to see (beside a busy
      // loop pinned to one core: 86 tok/s with PAUSE spins, 107 yielding, 106 at 1 thread).
      std::this_thread::yield();
      if ((++spins & 255) == 0 && Clock::now() - idle_since > std::chrono::milliseconds(1)) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [this, index] {
          const uint64_t t = ticket_.load();
          return stop_.load() || (next_of(t) < n_of(t) && index < active_.load());
        });
        sleepers_.fetch_sub(1);
        idle_since = Clock::now();
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
  std::atomic<int64_t> active_;  // workers index < active_ take chunks
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  uint64_t generation_ = 0;
  static constexpr Clock::duration kWindow = std::chrono::milliseconds(50), kMaxWindow = std::chrono::seconds(1);
  Clock::duration window_ = kWindow;
  Clock::time_point reduced_until_{};  // the caller's (under run_mutex_)
  static constexpr int64_t kRecent = 64;
  int64_t jobs_ = 0, last_stall_ = -2 * kRecent;  // the caller's (under run_mutex_)
};

// The stall rule, as tests/test_kernels.py checks it (at 2 threads or more): jobs of two chunks, a chunk run
// by a worker sleeping sleep_us (on the caller, caller_us: its share, which a worker's wake-up must not
// exceed on a loaded machine for a short chunk to be no stall), until workers have taken two (two stalls
// within 64 jobs, when sleep_us is long). Returns {workers active right after, chunks the workers ran in
// the 20 jobs that follow, milliseconds until every worker is back (-1: not in 2 s)}; {-1, -1, -1} when
// workers took fewer than two chunks in 1000 jobs.
inline std::vector<int64_t> pool_probe(int64_t sleep_us, int64_t caller_us) {
  const auto caller = std::this_thread::get_id();
  std::atomic<int64_t> by_workers{0};
  const auto job = [&](bool sleep) {
    Pool::parallel_for(2, 1, [&](int64_t, int64_t) {
      if (std::this_thread::get_id() == caller) {  // long enough for a worker to take the other chunk
        std::this_thread::sleep_for(std::chrono::microseconds(caller_us));
        return;
      }
      by_workers.fetch_add(1);
      if (sleep) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    });
  };
  for (int i = 0; i < 1000 && by_workers.load() < 2; ++i) job(true);
  if (by_workers.load() < 2) return {-1, -1, -1};
  const int64_t after = Pool::active_workers(), all = std::max<int64_t>(1, at::get_num_threads()) - 1;
  by_workers.store(0);
  for (int i = 0; i < 20; ++i) job(false);
  const int64_t during = by_workers.load();
  const auto from = std::chrono::steady_clock::now();
  int64_t back = -1;
  while (std::chrono::steady_clock::now() - from < std::chrono::seconds(2)) {
    if (Pool::active_workers() == all) {
      back = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - from).count();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return {after, during, back};
}

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
