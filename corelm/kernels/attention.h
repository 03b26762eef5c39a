// Causal grouped-query attention over the fused step's KV caches (included once, by decoder_step.h).
//
// For N query tokens, token t in cache row rows[t] at position pos[t]:
//   out (N, H*hd) = softmax(q K^T * scale) V  over that row's slots lo..pos[t],
// where lo is 0 or, for a sliding-window layer, pos[t] - window + 1. softcap > 0 bounds each score s to
// softcap * tanh(s / softcap) before the softmax (Gemma 2). Query head h reads kv head h / (H / KV).
// Caches are (B, KV, S, hd), float32, fp16 or bf16 (C: float, at::Half or at::BFloat16; read as fp32,
// every sum in fp32).
//
// Every (token, head) is computed by the same operations in the same order whatever the threading,
// whatever else is in the call and however many heads share a pass, so a token's result does not
// depend on its company (batched decode rows equal lone requests bit for bit; a prefill chunk's
// tokens equal those of a longer or shorter chunk).
//
// The AVX-512 form, as in the flash-attention kernels' CPU ports: scores 16 keys at a time, each key's
// 16 partial sums of q.k held in one vector and the 16 vectors reduced together by one transposing
// tree (15 adds for 16 keys instead of 4 shuffle-add levels per key); the softmax's exponentials 16 at a
// time (a degree-5 polynomial and VSCALEFPS, within 2 ulp of expf); and o = sum_j p_j v_j with the output
// held in registers, 64 columns of up to 4 query heads that share each V load. Before it, one query head
// at a time with a horizontal sum and a libm expf per score spent 56% of a 512-token Q4_K_M prefill of
// SmolLM2-135M in attention (2-core Zen 4). Other builds keep the scalar-vector form below.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"

namespace corelm {

// Row i of a cache as fp32: an fp16 row through F16C's 8-wide conversion where the build has it (c10's
// scalar conversion otherwise); an fp32 cache is read in place.
template <typename C>
inline const float* cache_row(const C* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<C, float>) {
    return src;
  } else {
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<C, at::Half>) {
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// The slots token t attends to: [lo, lo + len).
inline void attended(int64_t p, int64_t window, int64_t* lo, int64_t* len) {
  *lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
  *len = p - *lo + 1;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

// 16 values of a cache row as fp32 (the first `n` of them; the rest zero).
template <typename C>
inline __m512 load16(const C* p, int64_t n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  if constexpr (std::is_same_v<C, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<C, at::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

// exp(x) for 16 lanes, x <= 0 after the max is subtracted (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
// e^r by a degree-5 polynomial, times 2^n by VSCALEFPS, which flushes to 0 below the fp32 range). NaN stays
// NaN: the clamp's MAXPS returns its second operand when either is NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// a[k] (16 vectors of 16 partial sums, one per key k) -> one vector whose lane k is key k's total. Every
// key's lanes are summed by the same tree: lane l + lane l+8, then + l+4, + l+2, + l+1.
inline __m512 sum16x16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // (a lo 256 | b lo 256) + (a hi | b hi): keys 2i, 2i+1, 8 lanes each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lanes 0, 2 + 1, 3: keys 4i..4i+3, 4 lanes each
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // within 128-bit lanes, elements 0, 1 + 2, 3: 2 lanes per key
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44), _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
  // elements 0 + 1 and 2 + 3: 128-bit lane j holds keys j, 4 + j, 8 + j, 12 + j; put key k at lane k
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

inline float sum16(__m512 v) {  // a fixed tree, as _mm512_reduce_add_ps
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// Scores of n query heads (q: n rows of hd, consecutive) against len keys K (len rows of hd): w (n, ldw).
template <typename C>
void scores16(const float* q, int64_t n, const C* K, int64_t len, int64_t hd, float scale, float* kbuf, float* w,
              int64_t ldw) {
  const int64_t chunks = (hd + 15) / 16;
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, len - j0);
    // this block's keys as fp32 (16 x chunks vectors), zero past the last key: each is read by n heads
    for (int64_t k = 0; k < 16; ++k)
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(kbuf + (k * chunks + c) * 16,
                         k < nk ? load16(K + (j0 + k) * hd + c * 16, hd - c * 16) : _mm512_setzero_ps());
    for (int64_t h = 0; h < n; ++h) {
      const float* qh = q + h * hd;
      __m512 acc[16];
      for (int64_t k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 qc = load16(qh + c * 16, hd - c * 16);
        for (int64_t k = 0; k < 16; ++k) acc[k] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kbuf + (k * chunks + c) * 16), acc[k]);
      }
      const __m512 s = _mm512_mul_ps(sum16x16(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(w + h * ldw + j0, nk >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nk) - 1), s);
    }
  }
}

// Softmax of one head's len scores in place; returns 1 / (sum of exponentials).
inline float softmax16(float* w, int64_t len) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(w + j));
  const __mmask16 tail = __mmask16((1u << (len - j)) - 1);
  mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, w + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= len; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(w + j), m));
    _mm512_storeu_ps(w + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, w + j), m));
  _mm512_mask_storeu_ps(w + j, tail, e);
  sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  return 1.f / sum16(sum);
}

// out rows of n <= 4 heads (o: n rows of hd at stride ldo) = sum_j w_h[j] * inv_h * V[j], 64 columns at a
// time in registers; each head's sum runs over j in order, whatever n is.
template <typename C>
void weighted_values16(const float* w, int64_t ldw, const float* inv, int64_t n, const C* V, int64_t len, int64_t hd,
                       float* o, int64_t ldo) {
  for (int64_t c0 = 0; c0 < hd; c0 += 64) {
    const int64_t chunks = std::min<int64_t>(4, (hd - c0 + 15) / 16);
    __m512 acc[4][4];
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      __m512 v[4];
      for (int64_t c = 0; c < chunks; ++c) v[c] = load16(V + j * hd + c0 + c * 16, hd - c0 - c * 16);
      for (int64_t h = 0; h < n; ++h) {
        const __m512 p = _mm512_set1_ps(w[h * ldw + j]);
        for (int64_t c = 0; c < chunks; ++c) acc[h][c] = _mm512_fmadd_ps(p, v[c], acc[h][c]);
      }
    }
    for (int64_t h = 0; h < n; ++h) {
      const __m512 s = _mm512_set1_ps(inv[h]);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t left = hd - c0 - c * 16;
        _mm512_mask_storeu_ps(o + h * ldo + c0 + c * 16, left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1),
                              _mm512_mul_ps(acc[h][c], s));
      }
    }
  }
}

// Query heads h0..h1-1 of token t, which read kv head g.
template <typename C>
void attend_heads(const float* q, const C* kc, const C* vc, const int64_t* rows, const int64_t* pos, int64_t t,
                  int64_t g, int64_t h0, int64_t h1, int64_t H, int64_t KV, int64_t S, int64_t hd, int64_t window,
                  float scale, float softcap, float* out) {
  int64_t lo, len;
  attended(pos[t], window, &lo, &len);
  const int64_t n = h1 - h0, group = H / KV, ldw = (len + 15) / 16 * 16;
  thread_local std::vector<float> w, kbuf;
  w.resize(n * ldw);
  kbuf.resize(16 * ((hd + 15) / 16) * 16);
  const C* K = kc + ((rows[t] * KV + g) * S + lo) * hd;
  const C* V = vc + ((rows[t] * KV + g) * S + lo) * hd;
  const int64_t first = t * H + g * group + h0;  // the first of the n heads' rows in q and out
  scores16(q + first * hd, n, K, len, hd, scale, kbuf.data(), w.data(), ldw);
  float inv[4];
  for (int64_t h4 = 0; h4 < n; h4 += 4) {
    const int64_t m = std::min<int64_t>(4, n - h4);
    for (int64_t h = 0; h < m; ++h) {
      float* wh = w.data() + (h4 + h) * ldw;
      if (softcap > 0.f)
        for (int64_t j = 0; j < len; ++j) wh[j] = softcap * std::tanh(wh[j] / softcap);
      inv[h] = softmax16(wh, len);
    }
    weighted_values16(w.data() + h4 * ldw, ldw, inv, m, V, len, hd, out + (first + h4) * hd, hd);
  }
}

#else  // the scalar-vector form

template <typename C>
void attend_heads(const float* q, const C* kc, const C* vc, const int64_t* rows, const int64_t* pos, int64_t t,
                  int64_t g, int64_t h0, int64_t h1, int64_t H, int64_t KV, int64_t S, int64_t hd, int64_t window,
                  float scale, float softcap, float* out) {
  // each cache row is converted once for all n heads, and every head goes through the same operations
  // however many come with it
  int64_t lo, len;
  attended(pos[t], window, &lo, &len);
  const int64_t n = h1 - h0, group = H / KV;
  std::vector<float> w(n * len), mx(n, -INFINITY), sum(n, 0.f);
  const C* K = kc + ((rows[t] * KV + g) * S + lo) * hd;
  const C* V = vc + ((rows[t] * KV + g) * S + lo) * hd;
  std::vector<float> row(std::is_same_v<C, float> ? 0 : hd);
  for (int64_t j = 0; j < len; ++j) {
    const float* k = cache_row(K + j * hd, hd, row.data());
    for (int64_t h = 0; h < n; ++h) {
      const float* qh = q + (t * H + g * group + h0 + h) * hd;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < hd; ++i) acc += qh[i] * k[i];
      float wj = acc * scale;
      if (softcap > 0.f) wj = softcap * std::tanh(wj / softcap);
      w[h * len + j] = wj;
      mx[h] = std::max(mx[h], wj);
    }
  }
  for (int64_t h = 0; h < n; ++h) {
    for (int64_t j = 0; j < len; ++j) {
      w[h * len + j] = std::exp(w[h * len + j] - mx[h]);  // max subtracted: exp never overflows
      sum[h] += w[h * len + j];
    }
    float* o = out + (t * H + g * group + h0 + h) * hd;
    std::fill(o, o + hd, 0.f);
  }
  for (int64_t j = 0; j < len; ++j) {
    const float* v = cache_row(V + j * hd, hd, row.data());
    for (int64_t h = 0; h < n; ++h) {
      const float wj = w[h * len + j] / sum[h];
      float* o = out + (t * H + g * group + h0 + h) * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) o[i] += wj * v[i];
    }
  }
}

#endif

template <typename C>
void attend(const float* q, const C* kc, const C* vc, int64_t N, const int64_t* rows, const int64_t* pos, int64_t H,
            int64_t KV, int64_t S, int64_t hd, int64_t window, float scale, float softcap, float* out) {
  const int64_t group = H / KV;
  auto unit = [&](int64_t t, int64_t g, int64_t h0, int64_t h1) {
    attend_heads(q, kc, vc, rows, pos, t, g, h0, h1, H, KV, S, hd, window, scale, softcap, out);
  };
  int64_t work = 0;
  for (int64_t t = 0; t < N; ++t) work += (pos[t] + 1) * hd * H;
  const int64_t threads = at::get_num_threads();
  if (work < (1 << 16) || threads == 1) {  // little work: a parallel region costs more than it saves
    for (int64_t tg = 0; tg < N * KV; ++tg) unit(tg / KV, tg % KV, 0, group);
  } else if (N * KV >= 4 * threads) {  // a unit per (token, kv head): its query heads share the K and V loads
    Pool::parallel_for(N * KV, 1, [&](int64_t b, int64_t e) {
      for (int64_t tg = b; tg < e; ++tg) unit(tg / KV, tg % KV, 0, group);
    });
  } else {  // one unit per query head: a few tokens' kv heads would leave a core idle
    Pool::parallel_for(N * H, 1, [&](int64_t b, int64_t e) {
      for (int64_t th = b; th < e; ++th) unit(th / H, th % H / group, th % group, th % group + 1);
    });
  }
}

// The attention of one layer on its own (tests compare it with torch's): q (N, H*hd) fp32, caches
// (B, KV, S, hd) fp32/fp16/bf16, rows and pos (N,) int64.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rows,
                     const at::Tensor& pos, int64_t window, double scale, double softcap) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 2 && q.is_contiguous(), "q must be contiguous (N, H*hd) float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == k_cache.scalar_type() && v_cache.is_contiguous(),
              "caches must be contiguous (B, KV, S, hd) of one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && rows.numel() == q.size(0) &&
                  pos.numel() == q.size(0),
              "rows and pos must be (N,) int64");
  const int64_t N = q.size(0), B = k_cache.size(0), KV = k_cache.size(1), S = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(q.size(1) % (KV * hd) == 0, "q's width must be a multiple of n_kv_head * head_dim");
  const at::Tensor r = rows.contiguous(), p = pos.contiguous();
  for (int64_t t = 0; t < N; ++t)
    TORCH_CHECK(r.data_ptr<int64_t>()[t] >= 0 && r.data_ptr<int64_t>()[t] < B && p.data_ptr<int64_t>()[t] >= 0 &&
                    p.data_ptr<int64_t>()[t] < S,
                "rows and pos must index the cache");
  const int64_t H = q.size(1) / hd;
  at::Tensor out = at::empty_like(q);
  const auto run = [&](auto* kc, auto* vc) {
    attend(q.data_ptr<float>(), kc, vc, N, r.data_ptr<int64_t>(), p.data_ptr<int64_t>(), H, KV, S, hd, window,
           static_cast<float>(scale), static_cast<float>(softcap), out.data_ptr<float>());
  };
  if (k_cache.scalar_type() == at::kHalf) {
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  } else if (k_cache.scalar_type() == at::kBFloat16) {
    run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "caches must be float32, float16 or bfloat16");
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  }
  return out;
}

}  // namespace corelm
