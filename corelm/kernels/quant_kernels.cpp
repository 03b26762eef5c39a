// corelm quantized CPU kernels: weight-only int4/int8 matmuls on the layouts corelm's quantized
// layers hold in memory, with activations quantized once per row (per block of 32 values: a scale d,
// 15-bit integers a, and d*sum(a)) and integer dot products:
//
//   y[n] = sum_b  s_w[n,b] * d_a[b] * sum_j q_w[n,b,j] * a[b,j]   (+ m_w[n,b] * d_a[b]*sum(a) for int4)
//
// This is llama.cpp's arithmetic (ggml_vec_dot_q4_1_q8_1, ggml_vec_dot_q8_0_q8_0) with wider
// activations: the weights are read once, 4.5-8.5 bits each, and multiplied without being
// dequantized to floats. Weights (no copies: the tensors of corelm.compress.quant's layers):
//   int4  q (N, K/2) uint8: per block of 32 columns, byte j holds q[j] (low nibble) and q[j+16]
//         (high) -- GGUF Q4_1's order; sz (N, K/G, 2) bf16: scale and zero of w = (q - 8)*scale + zero
//   int8  q (N, K) int8; s (N, K/G) bf16 (group-wise, G = 32 is GGUF Q8_0) or (N,) (per channel)
// The file is built once per instruction set by corelm/kernels/__init__.py: -mavx512vnni (VPDPBUSD),
// -mavx2 (VPMADDUBSW) or no flags (a scalar loop); the #if blocks below pick the path the flags allow.
//
// Two operators, registered with torch.library so torch.compile and the dispatcher see them:
//   corelm::qlinear(x (T, K) f32, q, s) -> (T, N) f32
//   corelm::llama_forward(...): T tokens through a llama model (RMSNorm, q/k/v, RoPE, cache write,
//     grouped-query attention, o, gate/up, SwiGLU, down, final norm, head) in one call: a decode
//     step (T = 1), a prefill, or a speculative verify pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>  // at::get_num_threads: the pool follows torch.set_num_threads
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define CORELM_PAUSE() _mm_pause()
#else
#define CORELM_PAUSE() std::this_thread::yield()
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // values per block, weights and activations alike

enum class Kind { Q4, Q8 };

inline float bf16(uint16_t h) {  // bf16 is the top half of an fp32
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Activation row -> blocks of 15-bit integers, stored as two int8 digits a = 128 * h + l (h in
// -127..127, l in 0..127): d = max|x| / 16256, a = round(x / d) (ties to even, as torch.round),
// s = d * sum(a). Two VPDPBUSD per block instead of llama.cpp's one int8 digit: measured on SmolLM2,
// 8-bit activations moved the argmax on 2.6% of held-out positions (mean KL 0.0037 nats); 15-bit
// ones leave only the weights' error. The Python reference corelm.kernels.reference_qlinear agrees.
constexpr float AMAX = 127.f * 128.f;

void quantize_row(const float* x, int64_t k, int8_t* qh, int8_t* ql, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float db = amax / AMAX;
    const float inv = db > 0.f ? 1.f / db : 0.f;
    int sum = 0;
    for (int64_t j = 0; j < QK; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * inv));
      const int h = v >= 0 ? v / 128 : -((-v + 127) / 128);  // floor(v / 128)
      qh[b * QK + j] = static_cast<int8_t>(h);
      ql[b * QK + j] = static_cast<int8_t>(v - 128 * h);
      sum += v;
    }
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
  }
}

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// sum over 4-byte groups of u8 * s8 into 8 int32 lanes
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 32 unsigned weights (u8) times one activation block: 128 * (w . h) + (w . l), 8 int32 lanes
inline __m256 block_u(__m256i w, const int8_t* qh, const int8_t* ql) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(w, load32(qh)), 7), dot_u8s8(w, load32(ql))));
}

// 32 signed weights (s8): h takes w's sign (|w| . sign(h, w)); l is unsigned and multiplies w directly
inline __m256 block_s(__m256i w, const int8_t* qh, const int8_t* ql) {
  const __m256i hi = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(load32(qh), w));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(hi, 7), dot_u8s8(load32(ql), w)));
}

inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> 32 values: low nibbles, then high
  const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r, 4), low), _mm_and_si128(r, low));
}
#endif

struct ActRow {  // one quantized activation row
  const int8_t *qh, *ql;
  const float *d, *s;
};


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

// One output row: ``nb`` blocks of 32 weights; block b takes scale (and zero) entry b / bpg.
struct Row {
  const uint8_t* q;    // int4: 16 bytes per block; int8: 32 bytes per block
  const uint16_t* s;   // bf16: int4 (scale, zero) pairs, int8 scales
  int64_t bpg;         // blocks per scale group (G / 32; per channel: K / 32)
};

// Dot products of one weight row with NT activation rows at once: the row's nibbles and scales are
// unpacked once and used NT times. Every activation row goes through the same operations in the
// same order whatever NT is, so a row's result does not depend on how many rows came with it.
template <int NT>
void dot_q4(const Row& w, const ActRow* a, int64_t nb, float* out) {
  float tail[NT] = {};
#if defined(__AVX2__)
  __m256 acc[NT], accz[NT], accs[NT];
  for (int t = 0; t < NT; ++t) acc[t] = accz[t] = accs[t] = _mm256_setzero_ps();
  int64_t b = 0;
  if (w.bpg == 1) {  // a (scale, zero) per block: eight blocks' scales at a time, in vectors
    for (; b + 8 <= nb; b += 8) {
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.s + 2 * b));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));  // bf16 -> fp32: the top half
      const __m256 zero =
          _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
      alignas(32) float sd[NT][8];
      for (int t = 0; t < NT; ++t) {  // m * s_a = zero * s_a - 8 * scale * s_a: two sums
        const __m256 sa = _mm256_loadu_ps(a[t].s + b);
        accz[t] = _mm256_fmadd_ps(zero, sa, accz[t]);
        accs[t] = _mm256_fmadd_ps(scale, sa, accs[t]);
        _mm256_store_ps(sd[t], _mm256_mul_ps(scale, _mm256_loadu_ps(a[t].d + b)));
      }
      for (int i = 0; i < 8; ++i) {
        const int64_t j = b + i;
        const __m256i wq = nibbles(w.q + j * QK / 2);
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(block_u(wq, a[t].qh + j * QK, a[t].ql + j * QK), _mm256_broadcast_ss(&sd[t][i]),
                                   acc[t]);
      }
    }
  }
  for (; b < nb; ++b) {
    const uint16_t* sz = w.s + 2 * (b / w.bpg);
    const float scale = bf16(sz[0]), m = bf16(sz[1]) - 8.f * scale;  // w = q * scale + m
    const __m256i wq = nibbles(w.q + b * QK / 2);
    for (int t = 0; t < NT; ++t) {
      acc[t] = _mm256_fmadd_ps(block_u(wq, a[t].qh + b * QK, a[t].ql + b * QK), _mm256_set1_ps(scale * a[t].d[b]),
                               acc[t]);
      tail[t] += m * a[t].s[b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) + (hsum(accz[t]) - 8.f * hsum(accs[t])) + tail[t];
#else
  float acc[NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint16_t* sz = w.s + 2 * (b / w.bpg);
    const float scale = bf16(sz[0]), m = bf16(sz[1]) - 8.f * scale;
    const uint8_t* qs = w.q + b * QK / 2;
    for (int t = 0; t < NT; ++t) {
      const int8_t *h = a[t].qh + b * QK, *l = a[t].ql + b * QK;
      int sumi = 0;
      for (int64_t j = 0; j < QK / 2; ++j) {
        const int k = j + QK / 2;
        sumi += (qs[j] & 0x0F) * (128 * h[j] + l[j]) + (qs[j] >> 4) * (128 * h[k] + l[k]);
      }
      acc[t] += scale * a[t].d[b] * static_cast<float>(sumi);
      tail[t] += m * a[t].s[b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t] + tail[t];
#endif
}

template <int NT>
void dot_q8(const Row& w, const ActRow* a, int64_t nb, float* out) {
  const int8_t* q = reinterpret_cast<const int8_t*>(w.q);
#if defined(__AVX2__)
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  if (w.bpg == 1 || w.bpg == nb) {  // a scale per block (Q8_0) or one per row: eight scales at a time
    for (; b + 8 <= nb; b += 8) {
      const __m256 scale =
          w.bpg == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                           _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.s + b))), 16))
                     : _mm256_set1_ps(bf16(w.s[0]));
      alignas(32) float sd[NT][8];
      for (int t = 0; t < NT; ++t) _mm256_store_ps(sd[t], _mm256_mul_ps(scale, _mm256_loadu_ps(a[t].d + b)));
      for (int i = 0; i < 8; ++i) {
        const int64_t j = b + i;
        const __m256i wq = load32(q + j * QK);
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + j * QK, a[t].ql + j * QK), _mm256_broadcast_ss(&sd[t][i]),
                                   acc[t]);
      }
    }
  }
  for (; b < nb; ++b) {
    const float scale = bf16(w.s[b / w.bpg]);
    const __m256i wq = load32(q + b * QK);
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + b * QK, a[t].ql + b * QK), _mm256_set1_ps(scale * a[t].d[b]),
                               acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
#else
  float acc[NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const float scale = bf16(w.s[b / w.bpg]);
    const int8_t* qb = q + b * QK;
    for (int t = 0; t < NT; ++t) {
      const int8_t *h = a[t].qh + b * QK, *l = a[t].ql + b * QK;
      int sumi = 0;
      for (int64_t j = 0; j < QK; ++j) sumi += static_cast<int>(qb[j]) * (128 * h[j] + l[j]);
      acc[t] += scale * a[t].d[b] * static_cast<float>(sumi);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
#endif
}

// One weight row against activation rows t0..t0+NT-1.
template <int NT>
void dot_rows(Kind kind, const Row& w, const ActRow* a, int64_t nb, float* out) {
  if (kind == Kind::Q4) {
    dot_q4<NT>(w, a, nb, out);
  } else {
    dot_q8<NT>(w, a, nb, out);
  }
}

// A quantized weight matrix (see the file comment for the layouts).
struct QMatrix {
  const uint8_t* q = nullptr;
  const uint16_t* s = nullptr;
  int64_t n = 0, k = 0, row_q = 0, row_s = 0, bpg = 1;
  Kind kind = Kind::Q8;
  Row row(int64_t i) const { return {q + i * row_q, s + i * row_s, bpg}; }
};

QMatrix as_matrix(const at::Tensor& q, const at::Tensor& s, int64_t k) {
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu() && q.is_contiguous() && s.is_contiguous(),
              "quantized weights must be contiguous CPU tensors");
  TORCH_CHECK(k % QK == 0, "input width ", k, " is not a multiple of 32");
  TORCH_CHECK(s.scalar_type() == at::kBFloat16, "weight scales must be bf16");
  QMatrix m;
  m.n = q.size(0);
  m.k = k;
  m.q = static_cast<const uint8_t*>(q.data_ptr());
  m.s = reinterpret_cast<const uint16_t*>(s.data_ptr());
  int64_t groups;
  if (q.scalar_type() == at::kByte) {  // int4: (N, K/2) nibbles, (N, K/G, 2) scale and zero
    TORCH_CHECK(q.dim() == 2 && q.size(1) * 2 == k && s.dim() == 3 && s.size(0) == m.n && s.size(2) == 2,
                "int4 weight must be (N, K/2) uint8 with (N, K/G, 2) scales and zeros");
    m.kind = Kind::Q4;
    m.row_q = k / 2;
    groups = s.size(1);
    m.row_s = 2 * groups;
  } else {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == k && s.size(0) == m.n && s.dim() <= 2,
                "int8 weight must be (N, K) int8 with (N, K/G) or (N,) scales");
    m.kind = Kind::Q8;
    m.row_q = k;
    groups = s.dim() == 2 ? s.size(1) : 1;
    m.row_s = groups;
  }
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % QK == 0,
              "scale groups must be whole multiples of 32 columns");
  m.bpg = k / groups / QK;
  return m;
}

// Activations of T rows, quantized once and shared by every output row.
struct QActs {
  std::vector<int8_t> qh, ql;
  std::vector<float> d, s;
  int64_t t = 0, k = 0;
  void set(const float* x, int64_t rows, int64_t width) {
    t = rows;
    k = width;
    qh.resize(rows * width);
    ql.resize(rows * width);
    d.resize(rows * width / QK);
    s.resize(rows * width / QK);
    for (int64_t r = 0; r < rows; ++r)
      quantize_row(x + r * width, width, qh.data() + r * width, ql.data() + r * width, d.data() + r * width / QK,
                   s.data() + r * width / QK);
  }
  ActRow row(int64_t r) const {
    return {qh.data() + r * k, ql.data() + r * k, d.data() + r * k / QK, s.data() + r * k / QK};
  }
};

// Several matrices reading the same input (q|k|v, gate|up) as one: outs[i] gets (T, N_i). The output
// rows of all of them are split across the intra-op threads, each weight row read once.
void qmatmul(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs) {
  int64_t total = 0;
  for (const auto& m : ms) total += m.n;
  const int64_t nb = a.k / QK, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, (total + 4 * threads - 1) / (4 * threads));  // 4 per thread
  Pool::parallel_for(total, chunk, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    int64_t base = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= base + ms[i].n) base += ms[i++].n;
      const QMatrix& m = ms[i];
      const Row w = m.row(r - base);
      for (int64_t t0 = 0; t0 < a.t; t0 += 4) {  // up to four activation rows per pass over the weights
        ActRow act[4];
        float y[4];
        const int64_t nt = std::min<int64_t>(4, a.t - t0);
        for (int64_t t = 0; t < nt; ++t) act[t] = a.row(t0 + t);
        switch (nt) {
          case 1: dot_rows<1>(m.kind, w, act, nb, y); break;
          case 2: dot_rows<2>(m.kind, w, act, nb, y); break;
          case 3: dot_rows<3>(m.kind, w, act, nb, y); break;
          default: dot_rows<4>(m.kind, w, act, nb, y); break;
        }
        for (int64_t t = 0; t < nt; ++t) outs[i][(t0 + t) * m.n + r - base] = y[t];
      }
    }
  });
}

// Weight row r of m as fp32 (K,): q * scale (+ m for int4).
void dequantize_row(const QMatrix& m, int64_t r, float* out) {
  const Row w = m.row(r);
  for (int64_t b = 0; b < m.k / QK; ++b) {
    float* o = out + b * QK;
    if (m.kind == Kind::Q4) {
      const uint16_t* sz = w.s + 2 * (b / w.bpg);
      const float scale = bf16(sz[0]), shift = bf16(sz[1]) - 8.f * scale;
      const uint8_t* qs = w.q + b * QK / 2;
      for (int64_t j = 0; j < QK / 2; ++j) {
        o[j] = static_cast<float>(qs[j] & 0x0F) * scale + shift;
        o[j + QK / 2] = static_cast<float>(qs[j] >> 4) * scale + shift;
      }
    } else {
      const float scale = bf16(w.s[b / w.bpg]);
      const int8_t* qb = reinterpret_cast<const int8_t*>(w.q) + b * QK;
      for (int64_t j = 0; j < QK; ++j) o[j] = static_cast<float>(qb[j]) * scale;
    }
  }
}

// From this many tokens on, a matmul dequantizes panels of the weights to fp32 and calls ATen's GEMM
// (a long prompt's prefill, perplexity windows). Measured on SmolLM2 with 2 threads, prefill on
// the integer kernels ran at 560/543/511/451/299 tok/s for 32/128/256/512/1000 tokens, through
// the GEMM at 231/376/439/454/356: the GEMM wins from ~512 tokens. Fewer tokens (decode steps,
// speculative verify passes) stay on the integer kernels, whose rows equal one-token calls bit
// for bit.
int64_t gemm_rows() {  // CORELM_GEMM_ROWS overrides the default threshold (read once)
  static const int64_t rows = [] {
    const char* v = std::getenv("CORELM_GEMM_ROWS");
    return v != nullptr ? std::max<int64_t>(1, std::atoll(v)) : int64_t(512);
  }();
  return rows;
}
constexpr int64_t kPanelRows = 1024;

// y_i (T, N_i) = x (T, K) @ W_i^T for every matrix in ms.
void matmul(const float* x, int64_t T, int64_t K, const std::vector<QMatrix>& ms, const std::vector<float*>& outs,
            QActs& acts) {
  if (T < gemm_rows()) {
    acts.set(x, T, K);
    qmatmul(acts, ms, outs);
    return;
  }
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {T, K}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor panel = at::empty({kPanelRows, K}, xt.options());
  for (size_t i = 0; i < ms.size(); ++i) {
    const QMatrix& m = ms[i];
    for (int64_t n0 = 0; n0 < m.n; n0 += kPanelRows) {
      const int64_t rows = std::min(kPanelRows, m.n - n0);
      float* p = panel.data_ptr<float>();
      Pool::parallel_for(rows, 64, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) dequantize_row(m, n0 + r, p + r * K);
      });
      const at::Tensor y = at::mm(xt, panel.narrow(0, 0, rows).t());  // (T, rows)
      const float* yp = y.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, yp + t * rows, rows * sizeof(float));
    }
  }
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  const QMatrix m = as_matrix(q, s, xc.size(1));
  QActs acts;
  at::Tensor y = at::empty({xc.size(0), m.n}, xc.options());
  matmul(xc.data_ptr<float>(), xc.size(0), xc.size(1), {m}, {y.data_ptr<float>()}, acts);
  return y;
}

void rms_norm(const float* x, const float* weight, int64_t d, float eps, float* out) {
  // fp32 sum of squares: the mean of squares of a residual stream can overflow half precision
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = x[i] * r * weight[i];
}

// Rotate-half RoPE (HF layout) on n heads of width hd, with the position's cos/sin rows (hd,).
void rope(float* v, int64_t n, int64_t hd, const float* c, const float* s) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n; ++h) {
    float* x = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
  }
}

// Causal grouped-query attention for T query rows at positions pos0..pos0+T-1: out (T, H*hd) =
// softmax(q K^T / sqrt(hd)) V over cache slots 0..pos, query head h reading kv head h / (H / KV).
// Caches are (KV, S, hd) float32. Every (row, head) is computed by the same code whatever the
// threading, so a row's result does not depend on how many rows came with it.
void attend(const float* q, const float* kc, const float* vc, int64_t T, int64_t H, int64_t KV, int64_t S,
            int64_t hd, int64_t pos0, float* out) {
  const int64_t group = H / KV;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  auto one = [&](int64_t th) {
    const int64_t t = th / H, h = th % H, len = pos0 + t + 1;
    std::vector<float> p(len);
    const float* qh = q + (t * H + h) * hd;
    const float* K = kc + (h / group) * S * hd;
    const float* V = vc + (h / group) * S * hd;
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < hd; ++i) acc += qh[i] * K[j * hd + i];
      p[j] = acc * scale;
      mx = std::max(mx, p[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < len; ++j) {
      p[j] = std::exp(p[j] - mx);  // max subtracted: exp never overflows
      sum += p[j];
    }
    float* o = out + (t * H + h) * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t j = 0; j < len; ++j) {
      const float w = p[j] / sum;
      for (int64_t i = 0; i < hd; ++i) o[i] += w * V[j * hd + i];
    }
  };
  if (T * (pos0 + T) * hd * H < (1 << 16)) {  // little work: a parallel region costs more than it saves
    for (int64_t th = 0; th < T * H; ++th) one(th);
  } else {
    Pool::parallel_for(T * H, 1, [&](int64_t b, int64_t e) {
      for (int64_t th = b; th < e; ++th) one(th);
    });
  }
}

// T tokens at positions pos0.. through every layer, writing their cache slots. The seven matrices of
// layer l are q[7l .. 7l+6] (q, k, v, o, gate, up, down) with scales s[...]; the head is the last
// entry. Returns logits (T, V), or (1, V) for the last token only when all_logits is false (prefill).
// Below gemm_rows() tokens each token's row goes through the same per-row code as a single-token
// step, so such a call (a speculative verify pass) gives exactly the logits of T one-token calls.
at::Tensor llama_forward(const at::Tensor& x_in, int64_t pos0, at::TensorList q, at::TensorList s,
                         at::TensorList norm1, at::TensorList norm2, at::TensorList k_cache, at::TensorList v_cache,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& norm, int64_t n_head,
                         int64_t n_kv_head, double eps, bool all_logits) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.is_contiguous(),
              "x must be the (T, d) float32 embeddings");
  const int64_t L = static_cast<int64_t>(norm1.size()), T = x_in.size(0), d = x_in.size(1);
  TORCH_CHECK(L > 0 && T > 0 && static_cast<int64_t>(q.size()) == 7 * L + 1 && s.size() == q.size() &&
                  static_cast<int64_t>(norm2.size()) == L && static_cast<int64_t>(k_cache.size()) == L &&
                  static_cast<int64_t>(v_cache.size()) == L,
              "expected 7 matrices per layer plus the head, and one norm and cache per layer");
  const int64_t hd = k_cache[0].size(2), S = k_cache[0].size(1);
  TORCH_CHECK(pos0 >= 0 && pos0 + T <= S, "positions ", pos0, "..", pos0 + T - 1, " are outside the cache of ", S,
              " slots");
  TORCH_CHECK(cos.size(0) >= pos0 + T && cos.size(1) == hd && sin.sizes() == cos.sizes(), "rope tables too short");
  const int64_t nq = n_head * hd, nkv = n_kv_head * hd;
  const float feps = static_cast<float>(eps);

  std::vector<float> x(x_in.data_ptr<float>(), x_in.data_ptr<float>() + T * d), h(T * d), att(T * nq), tmp(T * d);
  std::vector<float> qv(T * nq), kv(T * nkv), vv(T * nkv), gate, up;
  QActs acts;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t o = 7 * l;
    const QMatrix mq = as_matrix(q[o], s[o], d), mk = as_matrix(q[o + 1], s[o + 1], d),
                  mv = as_matrix(q[o + 2], s[o + 2], d), mo = as_matrix(q[o + 3], s[o + 3], nq),
                  mg = as_matrix(q[o + 4], s[o + 4], d), mu = as_matrix(q[o + 5], s[o + 5], d);
    const int64_t dff = mg.n;
    const QMatrix md = as_matrix(q[o + 6], s[o + 6], dff);
    TORCH_CHECK(mq.n == nq && mk.n == nkv && mv.n == nkv && mo.n == d && mu.n == dff && md.n == d,
                "layer ", l, " has unexpected shapes");
    gate.resize(T * dff);
    up.resize(T * dff);

    for (int64_t t = 0; t < T; ++t) rms_norm(&x[t * d], norm1[l].data_ptr<float>(), d, feps, &h[t * d]);
    matmul(h.data(), T, d, {mq, mk, mv}, {qv.data(), kv.data(), vv.data()}, acts);
    float* kc = k_cache[l].data_ptr<float>();
    float* vc = v_cache[l].data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = pos0 + t;
      rope(&qv[t * nq], n_head, hd, cos.data_ptr<float>() + pos * hd, sin.data_ptr<float>() + pos * hd);
      rope(&kv[t * nkv], n_kv_head, hd, cos.data_ptr<float>() + pos * hd, sin.data_ptr<float>() + pos * hd);
      for (int64_t g = 0; g < n_kv_head; ++g) {  // write slot pos of every kv head
        std::memcpy(kc + (g * S + pos) * hd, &kv[t * nkv + g * hd], hd * sizeof(float));
        std::memcpy(vc + (g * S + pos) * hd, &vv[t * nkv + g * hd], hd * sizeof(float));
      }
    }
    attend(qv.data(), kc, vc, T, n_head, n_kv_head, S, hd, pos0, att.data());
    matmul(att.data(), T, nq, {mo}, {tmp.data()}, acts);
    for (int64_t i = 0; i < T * d; ++i) x[i] += tmp[i];

    for (int64_t t = 0; t < T; ++t) rms_norm(&x[t * d], norm2[l].data_ptr<float>(), d, feps, &h[t * d]);
    matmul(h.data(), T, d, {mg, mu}, {gate.data(), up.data()}, acts);
    for (int64_t i = 0; i < T * dff; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.f + std::exp(-g)) * up[i];  // SwiGLU: silu(gate) * up
    }
    matmul(gate.data(), T, dff, {md}, {tmp.data()}, acts);
    for (int64_t i = 0; i < T * d; ++i) x[i] += tmp[i];
  }
  const int64_t first = all_logits ? 0 : T - 1, rows = T - first;
  for (int64_t t = first; t < T; ++t) rms_norm(&x[t * d], norm.data_ptr<float>(), d, feps, &h[(t - first) * d]);
  const QMatrix mh = as_matrix(q[7 * L], s[7 * L], d);
  at::Tensor logits = at::empty({rows, mh.n}, x_in.options());
  matmul(h.data(), rows, d, {mh}, {logits.data_ptr<float>()}, acts);
  return logits;
}

const char* isa_name() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

std::string isa() { return isa_name(); }

}  // namespace

TORCH_LIBRARY(corelm, m) {
  m.def("qlinear(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def(
      "llama_forward(Tensor x, int pos0, Tensor[] q, Tensor[] s, Tensor[] norm1, Tensor[] norm2, "
      "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor cos, Tensor sin, Tensor norm, int n_head, "
      "int n_kv_head, float eps, bool all_logits) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(corelm, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("llama_forward", &llama_forward);
}
