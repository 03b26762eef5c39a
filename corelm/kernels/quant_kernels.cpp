// corelm quantized CPU kernels: weight blocks in GGUF's Q4_1 / Q8_0 layout, activations quantized
// to int8 once per row (Q8_1: per block of 32 a scale d and d*sum(q)), integer dot products.
//
//   y[n] = sum_b  d_w[n,b] * d_a[b] * sum_j q_w[n,b,j] * q_a[b,j]   (+ m_w[n,b] * s_a[b] for Q4_1)
//
// This is llama.cpp's arithmetic (ggml_vec_dot_q4_1_q8_1, ggml_vec_dot_q8_0_q8_0): the weights are
// read once, 4.5-8.5 bits each, and multiplied without being dequantized to floats. The file is built
// once per instruction set by corelm/kernels/__init__.py: -mavx512vnni (VPDPBUSD), -mavx2 (VPMADDUBSW)
// or no flags (a scalar loop); the #if blocks below pick the path the compiler flags allow.
//
// Two operators, registered with torch.library so torch.compile and the dispatcher see them:
//   corelm::qlinear(x (T, K) f32, w (N, K/32*B) u8 blocks) -> (T, N) f32
//   corelm::llama_step(...): one decode step of a llama model (RMSNorm, fused q|k|v, RoPE, cache
//     write, grouped-query attention, o, fused gate|up, SwiGLU, down, final norm, head) for one token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // values per block, weights and activations alike

struct BlockQ4 {  // GGUF Q4_1: w = d * q + m, q in 0..15; byte j holds q[j] (low) and q[j+16] (high)
  uint16_t d, m;
  uint8_t qs[QK / 2];
};
struct BlockQ8 {  // GGUF Q8_0: w = d * q, q in -127..127
  uint16_t d;
  int8_t qs[QK];
};
static_assert(sizeof(BlockQ4) == 20, "Q4_1 block is 20 bytes");
static_assert(sizeof(BlockQ8) == 34, "Q8_0 block is 34 bytes");

enum class Kind { Q4, Q8 };

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// Activation row -> int8 blocks: d = max|x| / 127, q = round(x / d) (ties to even, as torch.round),
// s = d * sum(q). The Python reference corelm.kernels.reference_qlinear does the same.
void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float db = amax / 127.f;
    const float inv = db > 0.f ? 1.f / db : 0.f;
    int sum = 0;
    for (int64_t j = 0; j < QK; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * inv));
      q[b * QK + j] = static_cast<int8_t>(v);
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
#endif

float dot_q4(const BlockQ4* w, const int8_t* qa, const float* da, const float* sa, int64_t nb) {
  float summ = 0.f;
#if defined(__AVX2__)
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {  // two blocks per iteration: two independent accumulators
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[b].qs));
    const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[b + 1].qs));
    const __m256i w0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r0, 4), low), _mm_and_si128(r0, low));
    const __m256i w1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r1, 4), low), _mm_and_si128(r1, low));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + b * QK));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + (b + 1) * QK));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w0, a0)), _mm256_set1_ps(half_to_float(w[b].d) * da[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w1, a1)),
                           _mm256_set1_ps(half_to_float(w[b + 1].d) * da[b + 1]), acc1);
    summ += half_to_float(w[b].m) * sa[b] + half_to_float(w[b + 1].m) * sa[b + 1];
  }
  for (; b < nb; ++b) {
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[b].qs));
    const __m256i w0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r0, 4), low), _mm_and_si128(r0, low));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + b * QK));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w0, a0)), _mm256_set1_ps(half_to_float(w[b].d) * da[b]), acc0);
    summ += half_to_float(w[b].m) * sa[b];
  }
  return hsum(_mm256_add_ps(acc0, acc1)) + summ;
#else
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* a = qa + b * QK;
    int sumi = 0;
    for (int64_t j = 0; j < QK / 2; ++j) sumi += (w[b].qs[j] & 0x0F) * a[j] + (w[b].qs[j] >> 4) * a[j + QK / 2];
    acc += half_to_float(w[b].d) * da[b] * static_cast<float>(sumi);
    summ += half_to_float(w[b].m) * sa[b];
  }
  return acc + summ;
#endif
}

float dot_q8(const BlockQ8* w, const int8_t* qa, const float* da, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b + 1].qs));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + b * QK));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + (b + 1) * QK));
    // u8 * s8 instructions: |w| times a with w's sign moved onto a
    const __m256i p0 = dot_u8s8(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(a0, w0));
    const __m256i p1 = dot_u8s8(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(a1, w1));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(half_to_float(w[b].d) * da[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(half_to_float(w[b + 1].d) * da[b + 1]), acc1);
  }
  for (; b < nb; ++b) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + b * QK));
    const __m256i p0 = dot_u8s8(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(a0, w0));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(half_to_float(w[b].d) * da[b]), acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* a = qa + b * QK;
    int sumi = 0;
    for (int64_t j = 0; j < QK; ++j) sumi += static_cast<int>(w[b].qs[j]) * a[j];
    acc += half_to_float(w[b].d) * da[b] * static_cast<float>(sumi);
  }
  return acc;
#endif
}

// A weight matrix as blocks: (N, K/32 * 20) bytes for Q4_1, (N, K/32 * 34) for Q8_0.
struct QMatrix {
  const uint8_t* data;
  int64_t n, k, row_bytes;
  Kind kind;
};

QMatrix as_matrix(const at::Tensor& w, int64_t k) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "quantized weight must be a contiguous CPU uint8 tensor (N, K/32 * block bytes)");
  TORCH_CHECK(k % QK == 0, "input width ", k, " is not a multiple of 32");
  const int64_t nb = k / QK, row = w.size(1);
  Kind kind;
  if (row == nb * static_cast<int64_t>(sizeof(BlockQ4))) {
    kind = Kind::Q4;
  } else if (row == nb * static_cast<int64_t>(sizeof(BlockQ8))) {
    kind = Kind::Q8;
  } else {
    TORCH_CHECK(false, "weight rows of ", row, " bytes are neither Q4_1 nor Q8_0 blocks for width ", k);
  }
  return {w.data_ptr<uint8_t>(), w.size(0), k, row, kind};
}

// Activations of T rows, quantized once and shared by every output row.
struct QActs {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t t = 0, k = 0;
  void set(const float* x, int64_t rows, int64_t width) {
    t = rows;
    k = width;
    q.resize(rows * width);
    d.resize(rows * width / QK);
    s.resize(rows * width / QK);
    for (int64_t r = 0; r < rows; ++r)
      quantize_row(x + r * width, width, q.data() + r * width, d.data() + r * width / QK, s.data() + r * width / QK);
  }
};

// y (T, N) = x (T, K) @ W^T; output rows split across intra-op threads, each weight row read once.
void qmatmul(const QActs& a, const QMatrix& w, float* y) {
  const int64_t nb = w.k / QK, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(16, (w.n + threads - 1) / threads);
  at::parallel_for(0, w.n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = w.data + n * w.row_bytes;
      for (int64_t t = 0; t < a.t; ++t) {
        const int8_t* qa = a.q.data() + t * w.k;
        const float* da = a.d.data() + t * nb;
        float v;
        if (w.kind == Kind::Q4) {
          v = dot_q4(reinterpret_cast<const BlockQ4*>(row), qa, da, a.s.data() + t * nb, nb);
        } else {
          v = dot_q8(reinterpret_cast<const BlockQ8*>(row), qa, da, nb);
        }
        y[t * w.n + n] = v;
      }
    }
  });
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  const QMatrix m = as_matrix(w, xc.size(1));
  QActs acts;
  acts.set(xc.data_ptr<float>(), xc.size(0), xc.size(1));
  at::Tensor y = at::empty({xc.size(0), m.n}, xc.options());
  qmatmul(acts, m, y.data_ptr<float>());
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

// out (H, hd) = softmax(q K^T / sqrt(hd)) V over cache slots 0..pos, query head h reading kv head
// h / (H / KV). Caches are (KV, S, hd) float32.
void attend(const float* q, const float* kc, const float* vc, int64_t H, int64_t KV, int64_t S, int64_t hd,
            int64_t pos, float* out) {
  const int64_t group = H / KV, len = pos + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  auto one_head = [&](int64_t h) {
    std::vector<float> p(len);
    const float* qh = q + h * hd;
    const float* K = kc + (h / group) * S * hd;
    const float* V = vc + (h / group) * S * hd;
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < hd; ++i) acc += qh[i] * K[t * hd + i];
      p[t] = acc * scale;
      mx = std::max(mx, p[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      p[t] = std::exp(p[t] - mx);  // max subtracted: exp never overflows
      sum += p[t];
    }
    float* o = out + h * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t t = 0; t < len; ++t) {
      const float w = p[t] / sum;
      for (int64_t i = 0; i < hd; ++i) o[i] += w * V[t * hd + i];
    }
  };
  if (len * hd * H < (1 << 16)) {  // short contexts: a parallel region costs more than the work
    for (int64_t h = 0; h < H; ++h) one_head(h);
  } else {
    at::parallel_for(0, H, 1, [&](int64_t b, int64_t e) {
      for (int64_t h = b; h < e; ++h) one_head(h);
    });
  }
}

at::Tensor llama_step(const at::Tensor& x_in, int64_t pos, at::TensorList norm1, at::TensorList wqkv,
                      at::TensorList wo, at::TensorList norm2, at::TensorList w13, at::TensorList w2,
                      at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& norm, const at::Tensor& head, int64_t n_head,
                      int64_t n_kv_head, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 1, "x must be the (d,) float32 embedding");
  const int64_t L = static_cast<int64_t>(wqkv.size()), d = x_in.size(0);
  TORCH_CHECK(L > 0 && norm1.size() == L && wo.size() == L && norm2.size() == L && w13.size() == L &&
                  w2.size() == L && k_cache.size() == L && v_cache.size() == L,
              "one entry per layer in every list");
  const int64_t hd = k_cache[0].size(2), S = k_cache[0].size(1);
  TORCH_CHECK(pos >= 0 && pos < S, "position ", pos, " is outside the cache of ", S, " slots");
  const int64_t nq = n_head * hd, nkv = n_kv_head * hd;
  const float feps = static_cast<float>(eps);
  const float* c = cos.data_ptr<float>() + pos * hd;
  const float* s = sin.data_ptr<float>() + pos * hd;

  std::vector<float> x(x_in.data_ptr<float>(), x_in.data_ptr<float>() + d), h(d), att(nq), tmp(d);
  std::vector<float> qkv(nq + 2 * nkv), gu, act;
  QActs acts;
  for (int64_t l = 0; l < L; ++l) {
    const QMatrix mqkv = as_matrix(wqkv[l], d), mo = as_matrix(wo[l], nq), m13 = as_matrix(w13[l], d);
    const int64_t dff = m13.n / 2;
    const QMatrix m2 = as_matrix(w2[l], dff);
    TORCH_CHECK(mqkv.n == nq + 2 * nkv && mo.n == d && m2.n == d, "layer ", l, " has unexpected shapes");
    gu.resize(2 * dff);
    act.resize(dff);

    rms_norm(x.data(), norm1[l].data_ptr<float>(), d, feps, h.data());
    acts.set(h.data(), 1, d);
    qmatmul(acts, mqkv, qkv.data());
    float *q = qkv.data(), *k = q + nq, *v = k + nkv;
    rope(q, n_head, hd, c, s);
    rope(k, n_kv_head, hd, c, s);
    float* kc = k_cache[l].data_ptr<float>();
    float* vc = v_cache[l].data_ptr<float>();
    for (int64_t g = 0; g < n_kv_head; ++g) {  // write slot pos of every kv head
      std::memcpy(kc + (g * S + pos) * hd, k + g * hd, hd * sizeof(float));
      std::memcpy(vc + (g * S + pos) * hd, v + g * hd, hd * sizeof(float));
    }
    attend(q, kc, vc, n_head, n_kv_head, S, hd, pos, att.data());
    acts.set(att.data(), 1, nq);
    qmatmul(acts, mo, tmp.data());
    for (int64_t i = 0; i < d; ++i) x[i] += tmp[i];

    rms_norm(x.data(), norm2[l].data_ptr<float>(), d, feps, h.data());
    acts.set(h.data(), 1, d);
    qmatmul(acts, m13, gu.data());
    for (int64_t i = 0; i < dff; ++i) {
      const float g = gu[i];
      act[i] = g / (1.f + std::exp(-g)) * gu[dff + i];  // SwiGLU: silu(gate) * up
    }
    acts.set(act.data(), 1, dff);
    qmatmul(acts, m2, tmp.data());
    for (int64_t i = 0; i < d; ++i) x[i] += tmp[i];
  }
  rms_norm(x.data(), norm.data_ptr<float>(), d, feps, h.data());
  const QMatrix mh = as_matrix(head, d);
  acts.set(h.data(), 1, d);
  at::Tensor logits = at::empty({mh.n}, x_in.options());
  qmatmul(acts, mh, logits.data_ptr<float>());
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
  m.def("qlinear(Tensor x, Tensor w) -> Tensor");
  m.def(
      "llama_step(Tensor x, int pos, Tensor[] norm1, Tensor[] wqkv, Tensor[] wo, Tensor[] norm2, Tensor[] w13, "
      "Tensor[] w2, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor cos, Tensor sin, Tensor norm, "
      "Tensor head, int n_head, int n_kv_head, float eps) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(corelm, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("llama_step", &llama_step);
}
