// Causal grouped-query attention over the fused step's KV caches (included once, by decoder_step.h).
//
// For N query tokens, token t in cache row rows[t] at position pos[t]:
//   out (N, H*hd) = softmax(q K^T * scale) V  over that row's slots lo..pos[t],
// where lo is 0 or, for a sliding-window layer, pos[t] - window + 1. softcap > 0 bounds each score s to
// softcap * tanh(s / softcap) before the softmax (Gemma 2). Query head h reads kv head h / (H / KV).
// Caches are (B, KV, S, hd), float32, fp16 or bf16 (C: float, at::Half or at::BFloat16; read as fp32,
// every sum in fp32).
//
// A token's slots are read in spans of kSpan (attend_span), each leaving partial sums that combine()
// merges in span order; a span of one kv head is the unit of work when a call has few tokens (decode).
// Every (token, head) is computed by the same operations in the same order whatever the threading,
// whatever else is in the call and however many heads share a pass, so a token's result does not
// depend on its company (batched decode rows equal lone requests bit for bit; a prefill chunk's
// tokens equal those of a longer or shorter chunk).
//
// The AVX-512 form converts and transposes each block of 16 keys once (K^T: hd rows of 16 keys) for every
// query row that reads it: a token's heads, and in a prefill a tile of up to 8 consecutive tokens, so each
// score is one FMA chain over the head dimension in its key's lane (a register tile of 8 query rows per
// K^T row loaded). Before, each query head summed 16 keys' partial dot products through a transposing
// tree and every token converted the same keys again: a 3000-token prefill spent 57% of its time there
// (2-core Intel Xeon). The softmax's exponentials go 16 at a time (Cephes' degree-5 polynomial and
// VSCALEFPS), and o = sum_j p_j v_j keeps the output in registers, 64 columns of up to 4 query heads that
// share each V load. The AVX2 build runs the same kernels 8 lanes wide; the generic build keeps the
// scalar-vector form at the end.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dot.h"
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

// The vector forms: Simd holds W fp32 lanes and the few operations the kernels below need.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CORELM_ATTENTION_SIMD 1

struct Simd {  // AVX-512: 16 lanes
  using R = __m512;
  static constexpr int64_t W = 16, kHeads = 4;  // heads per output pass: 4 x 4 accumulators of the 32 registers
  static constexpr int64_t kRows = 8;           // query rows per scores tile
  static void transpose(R* r) {                 // r[0..15]: 16 rows -> r[j] = column j
    __m512i t[16];
    for (int i = 0; i < 16; ++i) t[i] = _mm512_castps_si512(r[i]);
    transpose16(t);
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(t[i]);
  }
  static __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // b when either is NaN
  static R min(R a, R b) { return _mm512_min_ps(a, b); }  // b when either is NaN
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const float* p, int64_t n, float fill) { return _mm512_mask_loadu_ps(set1(fill), first(n), p); }
  // the first n (<= 16, or all) values of a cache row as fp32, the rest zero
  template <typename C>
  static R row(const C* p, int64_t n) {
    if constexpr (std::is_same_v<C, float>) {
      return _mm512_maskz_loadu_ps(first(n), p);
    } else if constexpr (std::is_same_v<C, at::Half>) {
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p)), 16));
    }
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static float hmax(R v) { return _mm512_reduce_max_ps(v); }
  static float hsum(R v) {  // a fixed tree
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
  }
  // e^x as Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-5 polynomial, times 2^n by VSCALEFPS
  // (which flushes to 0 below the fp32 range). NaN stays NaN: MAXPS returns its second operand on a NaN.
  static R exp(R x) {
    x = max(set1(-104.f), x);
    const R n = _mm512_roundscale_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(expm(x, n), n);
  }
  static R expm(R x, R n);
};

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CORELM_ATTENTION_SIMD 1

struct Simd {  // AVX2: 8 lanes
  using R = __m256;
  static constexpr int64_t W = 8, kHeads = 3;  // heads per output pass: 3 x 4 accumulators of the 16 registers
  static constexpr int64_t kRows = 8;  // query rows per scores tile: 8 accumulators of the 16 registers
  static void transpose(R* r) { transpose8(r); }  // r[0..7]: 8 rows -> r[j] = column j
  static __m256i first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }  // b when either is NaN
  static R min(R a, R b) { return _mm256_min_ps(a, b); }  // b when either is NaN
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const float* p, int64_t n, float fill) {
    const __m256i m = first(n);
    return _mm256_blendv_ps(set1(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  template <typename C>
  static R row(const C* p, int64_t n) {
    if constexpr (std::is_same_v<C, float>) {
      return _mm256_maskload_ps(p, first(n));
    } else {
      __m128i h;
      if (n >= 8) {
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      } else {  // a row's last few values: no 16-bit masked load before AVX-512
        alignas(16) uint16_t buf[8] = {};
        std::memcpy(buf, p, n * sizeof(uint16_t));
        h = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
      }
      if constexpr (std::is_same_v<C, at::Half>) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, R v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }
  static float hmax(R v) {
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_max_ss(b, _mm_movehdup_ps(b)));
  }
  static float hsum(R v) {  // a fixed tree
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
  }
  // e^x as the AVX-512 form, 2^n built in the exponent field: x is clamped at -87 so that n >= -126 (an
  // e^-87 weight is 1e-38 of the row's largest, where the AVX-512 form gives 0)
  static R exp(R x) {
    x = max(set1(-87.f), x);
    const R n = _mm256_round_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return mul(expm(x, n), _mm256_castsi256_ps(e));
  }
  static R expm(R x, R n);
};

#endif

#if defined(CORELM_ATTENTION_SIMD)

// e^r for r = x - n ln2 (Cody-Waite: ln2 in two parts), by Cephes' degree-5 polynomial
inline Simd::R Simd::expm(R x, R n) {
  R r = fma(n, set1(-0.693359375f), x);
  r = fma(n, set1(2.12194440e-4f), r);
  R p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  return add(fma(mul(p, r), r, r), set1(1.f));
}

// Query rows q[0..nr) times kt (hd rows of W: block of W keys, transposed): w[i][0..W) (row stride ldw),
// scaled. Each score is one FMA chain over d = 0 .. hd-1 in its key's lane, whatever rows come with it.
template <int M>
inline void score_rows(const float* const* q, const float* kt, int64_t hd, float scale, float* w, int64_t ldw,
                       int64_t nk) {
  typename Simd::R acc[M];
  for (int i = 0; i < M; ++i) acc[i] = Simd::zero();
  for (int64_t d = 0; d < hd; ++d) {
    const typename Simd::R kd = Simd::load(kt + d * Simd::W);
    for (int i = 0; i < M; ++i) acc[i] = Simd::fma(Simd::set1(q[i][d]), kd, acc[i]);
  }
  for (int i = 0; i < M; ++i) Simd::store(w + i * ldw, Simd::mul(acc[i], Simd::set1(scale)), nk);
}

// Scores of nr query rows (q[i]: hd values) against len keys K (len rows of hd): w (nr, ldw). Each block of
// W keys is converted to fp32 and transposed once (kt: hd rows of W) for all the rows, so a tile of
// tokens shares it; ahead: bytes of K past the block being read to prefetch (prefetch_ahead(); 0: none).
template <typename C>
void scores(const float* const* q, int64_t nr, const C* K, int64_t len, int64_t hd, float scale, float* kt, float* w,
            int64_t ldw, int64_t ahead) {
  constexpr int64_t W = Simd::W, kRows = Simd::kRows;
  const int64_t chunks = (hd + W - 1) / W;
  for (int64_t j0 = 0; j0 < len; j0 += W) {
    const int64_t nk = std::min<int64_t>(W, len - j0);
    if (ahead) prefetch_bytes(reinterpret_cast<const char*>(K + j0 * hd) + ahead, W * hd * sizeof(C));
    for (int64_t c = 0; c < chunks; ++c) {  // zeros past the last key
      typename Simd::R r[W];
      for (int64_t k = 0; k < W; ++k) r[k] = k < nk ? Simd::row(K + (j0 + k) * hd + c * W, hd - c * W) : Simd::zero();
      Simd::transpose(r);
      for (int64_t i = 0; i < W && c * W + i < hd; ++i) Simd::store(kt + (c * W + i) * W, r[i]);
    }
    for (int64_t r0 = 0; r0 < nr; r0 += kRows) {
      float* wr = w + r0 * ldw + j0;
      switch (std::min(kRows, nr - r0)) {
        case 8: score_rows<8>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        case 7: score_rows<7>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        case 6: score_rows<6>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        case 5: score_rows<5>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        case 4: score_rows<4>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        case 3: score_rows<3>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        case 2: score_rows<2>(q + r0, kt, hd, scale, wr, ldw, nk); break;
        default: score_rows<1>(q + r0, kt, hd, scale, wr, ldw, nk); break;
      }
    }
  }
}

// Softmax numerators of one head's len scores in place, e_j = exp(w_j - m) with m their max (stored in
// *max); returns the sum of the e_j.
inline float softmax_part(float* w, int64_t len, float* max) {
  constexpr int64_t W = Simd::W;
  typename Simd::R mx = Simd::set1(-INFINITY), sum = Simd::zero();
  int64_t j = 0;
  for (; j + W <= len; j += W) mx = Simd::max(mx, Simd::load(w + j));
  if (j < len) mx = Simd::max(mx, Simd::load(w + j, len - j, -INFINITY));
  *max = Simd::hmax(mx);
  const typename Simd::R m = Simd::set1(*max);
  for (j = 0; j + W <= len; j += W) {
    const typename Simd::R e = Simd::exp(Simd::sub(Simd::load(w + j), m));
    Simd::store(w + j, e);
    sum = Simd::add(sum, e);
  }
  if (j < len) {  // the absent lanes' exp(-inf) is 0
    const typename Simd::R e = Simd::exp(Simd::sub(Simd::load(w + j, len - j, -INFINITY), m));
    Simd::store(w + j, e, len - j);
    sum = Simd::add(sum, e);
  }
  return Simd::hsum(sum);
}

// out rows of n <= kHeads heads (o: n rows of hd at stride ldo) = sum_j w_h[j] * inv_h * V[j], 4W columns at
// a time in registers; each head's sum runs over j in order, whatever n is. ahead: as for scores (the
// first 4W columns' pass prefetches whole rows).
template <typename C>
void weighted_values(const float* w, int64_t ldw, const float* inv, int64_t n, const C* V, int64_t len, int64_t hd,
                     float* o, int64_t ldo, int64_t ahead) {
  constexpr int64_t W = Simd::W, kHeads = Simd::kHeads;
  for (int64_t c0 = 0; c0 < hd; c0 += 4 * W) {
    const int64_t chunks = std::min<int64_t>(4, (hd - c0 + W - 1) / W);
    typename Simd::R acc[kHeads][4];
    for (int64_t h = 0; h < kHeads; ++h)
      for (int64_t c = 0; c < 4; ++c) acc[h][c] = Simd::zero();
    const int64_t pf = c0 == 0 ? ahead : 0;
    for (int64_t j = 0; j < len; ++j) {
      if (pf) prefetch_bytes(reinterpret_cast<const char*>(V + j * hd) + pf, hd * sizeof(C));
      typename Simd::R v[4];
      for (int64_t c = 0; c < chunks; ++c) v[c] = Simd::row(V + j * hd + c0 + c * W, hd - c0 - c * W);
      for (int64_t h = 0; h < n; ++h) {
        const typename Simd::R p = Simd::set1(w[h * ldw + j]);
        for (int64_t c = 0; c < chunks; ++c) acc[h][c] = Simd::fma(p, v[c], acc[h][c]);
      }
    }
    for (int64_t h = 0; h < n; ++h)
      for (int64_t c = 0; c < chunks; ++c)
        Simd::store(o + h * ldo + c0 + c * W, Simd::mul(acc[h][c], Simd::set1(inv[h])), hd - c0 - c * W);
  }
}

// A token's attended slots are read in spans of kSpan (from its first slot): one span of one kv head is a
// unit of work, so a decode step's few tokens still give both cores work (at 2000 positions SmolLM2 has 3
// kv heads x 8 spans), and each K and V row is read once for all the query heads that share it. A span
// leaves partial sums that combine() merges in span order; a token computes the same spans and merges
// them the same way however the units were spread over threads.
constexpr int64_t kSpan = 256;

inline int64_t spans_of(int64_t len) { return (len + kSpan - 1) / kSpan; }

// Where one token's partials for one span go: o (n, hd), m and l (n each).
struct SpanOut {
  float *o, *m, *l;
};

// Tokens t0 .. t0+nt-1 (one cache row and one first slot lo: a tile) x the n = H / KV query heads that read kv
// head g, over span s of their slots. Per token that reaches the span and per head h: m[h] = the span's
// largest score, l[h] = sum_j e_j with e_j = exp(score_j - m[h]), and the unnormalized o (n, hd) = sum_j
// e_j V_j, into outs[i]. The tile's tokens share each converted, transposed block of K; everything else
// is per token, so a token's partials do not depend on the tile it came in.
template <typename C>
void attend_span(const float* q, const C* kc, const C* vc, const int64_t* rows, const int64_t* pos, int64_t t0,
                 int64_t nt, int64_t g, int64_t s, int64_t H, int64_t KV, int64_t S, int64_t hd, int64_t window,
                 float scale, float softcap, int64_t ahead, const SpanOut* outs) {
  constexpr int64_t W = Simd::W, kHeads = Simd::kHeads;
  const int64_t n = H / KV;
  int64_t lo, len, most = 0;
  thread_local std::vector<int64_t> keys;  // the keys of the span each token reads (0: none)
  keys.resize(nt);
  for (int64_t i = 0; i < nt; ++i) {
    attended(pos[t0 + i], window, &lo, &len);
    keys[i] = std::max<int64_t>(0, std::min(kSpan, len - s * kSpan));
    most = std::max(most, keys[i]);
  }
  const int64_t j0 = lo + s * kSpan, ldw = (most + W - 1) / W * W;
  thread_local std::vector<float> w, kt;
  thread_local std::vector<const float*> qr;
  w.resize(nt * n * ldw);
  kt.resize(((hd + W - 1) / W) * W * W);
  qr.clear();
  for (int64_t i = 0; i < nt; ++i)
    if (keys[i] > 0)
      for (int64_t h = 0; h < n; ++h) qr.push_back(q + ((t0 + i) * H + g * n + h) * hd);
  const C* K = kc + ((rows[t0] * KV + g) * S + j0) * hd;
  const C* V = vc + ((rows[t0] * KV + g) * S + j0) * hd;
  scores(qr.data(), static_cast<int64_t>(qr.size()), K, most, hd, scale, kt.data(), w.data(), ldw, ahead);
  float ones[kHeads];
  for (int64_t i = 0, r = 0; i < nt; ++i) {
    if (keys[i] == 0) continue;
    const int64_t nk = keys[i];
    const SpanOut& out = outs[i];
    for (int64_t hb = 0; hb < n; hb += kHeads) {
      const int64_t nh = std::min<int64_t>(kHeads, n - hb);
      for (int64_t h = 0; h < nh; ++h) {
        float* wh = w.data() + (r + hb + h) * ldw;
        if (softcap > 0.f)
          for (int64_t j = 0; j < nk; ++j) wh[j] = softcap * std::tanh(wh[j] / softcap);
        out.l[hb + h] = softmax_part(wh, nk, &out.m[hb + h]);
        ones[h] = 1.f;
      }
      weighted_values(w.data() + (r + hb) * ldw, ldw, ones, nh, V, nk, hd, out.o + hb * hd, hd, ahead);
    }
    r += n;
  }
}

// out (n, hd) = the n heads' attention from their spans' partials (span i: o + i * n * hd, m + i * n,
// l + i * n): exp(m_i - M) weighs span i (M: the largest m_i), in span order; one span is o * (1 / l).
inline void combine(const float* o, const float* m, const float* l, int64_t spans, int64_t n, int64_t hd, float* out) {
  constexpr int64_t W = Simd::W;
  for (int64_t h = 0; h < n; ++h) {
    float mx = m[h];
    for (int64_t i = 1; i < spans; ++i) mx = std::max(mx, m[i * n + h]);
    thread_local std::vector<float> f;
    f.resize(spans);
    float total = 0.f;
    for (int64_t i = 0; i < spans; ++i) {
      f[i] = spans == 1 ? 1.f : std::exp(m[i * n + h] - mx);
      total += f[i] * l[i * n + h];
    }
    const typename Simd::R inv = Simd::set1(1.f / total);
    for (int64_t c = 0; c < hd; c += W) {
      const int64_t cols = std::min<int64_t>(W, hd - c);
      typename Simd::R acc = Simd::load(o + h * hd + c, cols, 0.f);
      if (spans > 1) {
        acc = Simd::mul(acc, Simd::set1(f[0]));
        for (int64_t i = 1; i < spans; ++i)
          acc = Simd::fma(Simd::set1(f[i]), Simd::load(o + (i * n + h) * hd + c, cols, 0.f), acc);
      }
      Simd::store(out + h * hd + c, Simd::mul(acc, inv), cols);
    }
  }
}

// Up to this many consecutive tokens of one cache row (a prefill's) share each block of K.
constexpr int64_t kTile = 8;

// A tile's tokens' heads that read kv head g, every span in turn, each token's merged into out.
template <typename C>
void attend_tile(const float* q, const C* kc, const C* vc, const int64_t* rows, const int64_t* pos, int64_t t0,
                 int64_t nt, int64_t g, int64_t H, int64_t KV, int64_t S, int64_t hd, int64_t window, float scale,
                 float softcap, int64_t ahead, float* out) {
  const int64_t n = H / KV;
  int64_t most = 0;
  thread_local std::vector<int64_t> spans;
  spans.resize(nt);
  for (int64_t i = 0; i < nt; ++i) {
    int64_t lo, len;
    attended(pos[t0 + i], window, &lo, &len);
    spans[i] = spans_of(len);
    most = std::max(most, spans[i]);
  }
  const int64_t per = most * n * (hd + 2);  // a token's partials: o (most, n, hd), m (most, n), l (most, n)
  thread_local std::vector<float> part;
  thread_local std::vector<SpanOut> outs;
  part.resize(nt * per);
  outs.resize(nt);
  for (int64_t s = 0; s < most; ++s) {
    for (int64_t i = 0; i < nt; ++i) {
      float* base = part.data() + i * per;
      outs[i] = {base + s * n * hd, base + most * n * hd + s * n, base + most * n * (hd + 1) + s * n};
    }
    attend_span(q, kc, vc, rows, pos, t0, nt, g, s, H, KV, S, hd, window, scale, softcap, ahead, outs.data());
  }
  for (int64_t i = 0; i < nt; ++i) {
    const float* base = part.data() + i * per;
    combine(base, base + most * n * hd, base + most * n * (hd + 1), spans[i], n, hd, out + ((t0 + i) * H + g * n) * hd);
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
  const int64_t group = H / KV, ahead = prefetch_ahead();
  int64_t work = 0;
  for (int64_t t = 0; t < N; ++t) work += (pos[t] + 1) * hd * H;
  const int64_t threads = at::get_num_threads();
#if defined(CORELM_ATTENTION_SIMD)
  // tiles: runs of up to kTile consecutive tokens with one cache row and one first slot
  std::vector<int64_t> lo(N), tiles{0};
  for (int64_t t = 0, len; t < N; ++t) attended(pos[t], window, &lo[t], &len);
  for (int64_t t = 1; t <= N; ++t) {
    const int64_t t0 = tiles.back();
    if (t == N || t - t0 == kTile || rows[t] != rows[t0] || lo[t] != lo[t0]) tiles.push_back(t);
  }
  const int64_t nt = static_cast<int64_t>(tiles.size()) - 1;
  auto unit = [&](int64_t u) {  // tile u / KV, kv head u % KV
    const int64_t i = u / KV;
    attend_tile(q, kc, vc, rows, pos, tiles[i], tiles[i + 1] - tiles[i], u % KV, H, KV, S, hd, window, scale, softcap,
                ahead, out);
  };
  if (work < (1 << 16) || threads == 1) {  // little work: a parallel region costs more than it saves
    for (int64_t u = 0; u < nt * KV; ++u) unit(u);
    return;
  }
  if (nt * KV >= 4 * threads) {  // a unit per (tile, kv head), its spans in turn
    Pool::parallel_for(nt * KV, 1, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) unit(u);
    });
    return;
  }
  // a few tokens (decode steps, short verify passes): a unit per span of one token, the partials merged after
  std::vector<int64_t> first(N * KV + 1, 0);  // (token, kv head) tg's spans are units first[tg] .. first[tg + 1]
  for (int64_t tg = 0; tg < N * KV; ++tg) {
    int64_t lo, len;
    attended(pos[tg / KV], window, &lo, &len);
    first[tg + 1] = first[tg] + spans_of(len);
  }
  std::vector<float> part(first.back() * group * (hd + 2));
  float *o = part.data(), *m = o + first.back() * group * hd, *l = m + first.back() * group;
  Pool::parallel_for(first.back(), 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t tg = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
      const SpanOut one{o + u * group * hd, m + u * group, l + u * group};
      attend_span(q, kc, vc, rows, pos, tg / KV, 1, tg % KV, u - first[tg], H, KV, S, hd, window, scale, softcap,
                  ahead, &one);
    }
  });
  for (int64_t tg = 0; tg < N * KV; ++tg)
    combine(o + first[tg] * group * hd, m + first[tg] * group, l + first[tg] * group, first[tg + 1] - first[tg], group,
            hd, out + ((tg / KV) * H + (tg % KV) * group) * hd);
#else
  auto unit = [&](int64_t t, int64_t g, int64_t h0, int64_t h1) {
    attend_heads(q, kc, vc, rows, pos, t, g, h0, h1, H, KV, S, hd, window, scale, softcap, out);
  };
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
  (void)ahead;
#endif
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
