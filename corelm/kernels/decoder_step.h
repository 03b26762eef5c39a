// The fused decoder step: T tokens through a whole llama-family model in one call (included once,
// by corelm_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <type_traits>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "qlinear.h"

#include <torch/custom_class.h>

#include <string>

namespace corelm {

void rms_norm(const float* x, const float* weight, int64_t d, float eps, float* out) {
  // fp32 sum of squares: the mean of squares of a residual stream can overflow half precision
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = x[i] * r * weight[i];
}

// Rotate-half RoPE (HF layout) on n heads of width hd: the first `rot` dims of each head rotate
// (rot < hd is partial rotary, as Phi and GPT-NeoX use), with the position's cos/sin rows (rot,).
void rope(float* v, int64_t n, int64_t hd, int64_t rot, const float* c, const float* s) {
  const int64_t half = rot / 2;
  for (int64_t h = 0; h < n; ++h) {
    float* x = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
  }
}

// Causal grouped-query attention for N query tokens, token t in cache row rows[t] at position
// pos[t]: out (N, H*hd) = softmax(q K^T * scale) V over that row's slots lo..pos[t], where lo is 0
// or, for a sliding-window layer, pos[t] - window + 1. Query head h reads kv head h / (H / KV).
// Caches are (B, KV, S, hd), float32, fp16 or bf16 (C: float, at::Half or at::BFloat16; read as fp32, every sum in
// fp32). Every (token, head) is computed by the same code whatever the threading and whatever else is
// in the call, so a token's result does not depend on its company.
// Row i of a cache as fp32: an fp16 row through F16C's 8-wide conversion where the build has it (c10's
// scalar conversion is ~2x slower than the whole attention at long contexts), others element by element.
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

template <typename C>
void attend(const float* q, const C* kc, const C* vc, int64_t N, const int64_t* rows, const int64_t* pos,
            int64_t H, int64_t KV, int64_t S, int64_t hd, int64_t window, float scale, float* out) {
  const int64_t group = H / KV;
  // query heads h0..h1-1 of token t, all reading kv head g: each cache row is converted once for all of
  // them, and every head goes through the same operations however many come with it
  auto heads = [&](int64_t t, int64_t g, int64_t h0, int64_t h1) {
    const int64_t p = pos[t], n = h1 - h0;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0, len = p - lo + 1;
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
        w[h * len + j] = acc * scale;
        mx[h] = std::max(mx[h], w[h * len + j]);
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
  };
  int64_t work = 0;
  for (int64_t t = 0; t < N; ++t) work += (pos[t] + 1) * hd * H;
  if (work < (1 << 16) || at::get_num_threads() == 1) {  // little work: a parallel region costs more than it saves
    for (int64_t tg = 0; tg < N * KV; ++tg) heads(tg / KV, tg % KV, 0, group);
  } else {  // one unit per query head: a token's few kv heads would leave a core idle
    Pool::parallel_for(N * H, 1, [&](int64_t b, int64_t e) {
      for (int64_t th = b; th < e; ++th) heads(th / H, th % H / group, th % group, th % group + 1);
    });
  }
}

// Write each token's keys and values (N, KV*hd) at slot (rows[t], pos[t]) of every kv head of a
// (B, KV, S, hd) cache; an fp16 or bf16 cache rounds them to nearest even.
template <typename C>
void store(const float* k, const float* v, int64_t N, const int64_t* rows, const int64_t* pos, int64_t KV, int64_t S,
           int64_t hd, C* kc, C* vc) {
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t slot = ((rows[t] * KV + g) * S + pos[t]) * hd, src = (t * KV + g) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        kc[slot + i] = static_cast<C>(k[src + i]);
        vc[slot + i] = static_cast<C>(v[src + i]);
      }
    }
  }
}

// One matrix of the step: quantized weights (the layer's own tensors, kept alive here) and an
// optional fp32 bias.
struct Linear {
  at::Tensor values, scales, bias;
  QMatrix m;
};

// What one block holds. Optional parts are what the llama-derived families add: biases (q/k/v in
// Qwen2; any projection may have one), per-head RMSNorm of queries and keys before RoPE (Qwen3), a sliding window (Mistral).
struct Layer {
  at::Tensor input_norm, post_attention_norm, q_norm, k_norm;
  Linear q, k, v, o, gate, up, down;
  int64_t window = 0;  // 0: attend to every earlier position
};

// A llama-family decoder described to the C++ step by name, once, at load:
//   DecoderStep({"cos", "sin", "norm", "lm_head.values", "lm_head.scales"}, n_head, n_kv_head, eps)
//   .add_layer({"input_layernorm", "post_attention_layernorm", "<proj>.values", "<proj>.scales",
//               optional "<proj>.bias", "q_norm", "k_norm"}, window)   for proj in q/k/v/o/gate/up/down
// forward() then takes only what changes per call: the tokens' embeddings, their cache rows and
// positions, the caches, and which tokens' logits to return. A decode step of B requests is one call
// with N = B tokens; a prefill or a speculative verify pass is N tokens of one row.
class DecoderStep : public torch::CustomClassHolder {
 public:
  DecoderStep(c10::Dict<std::string, at::Tensor> tensors, int64_t n_head, int64_t n_kv_head, double eps)
      : n_head_(n_head), n_kv_head_(n_kv_head), eps_(static_cast<float>(eps)) {
    cos_ = get(tensors, "cos", "");
    sin_ = get(tensors, "sin", "");
    norm_ = get(tensors, "norm", "");
    TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0, "n_head must be a multiple of n_kv_head");
    TORCH_CHECK(cos_.dim() == 2 && sin_.sizes() == cos_.sizes(), "cos and sin must be (S, rotary_dim) tables");
    d_ = norm_.size(0);
    head_ = linear(tensors, "lm_head", "", d_);
  }

  void add_layer(c10::Dict<std::string, at::Tensor> t, int64_t window) {
    const std::string where = "layer " + std::to_string(layers_.size()) + ": ";
    Layer l;
    l.input_norm = get(t, "input_layernorm", where);
    l.post_attention_norm = get(t, "post_attention_layernorm", where);
    l.q = linear(t, "q_proj", where, d_);
    hd_ = l.q.m.n / n_head_;
    TORCH_CHECK(hd_ * n_head_ == l.q.m.n && cos_.size(1) <= hd_ && cos_.size(1) % 2 == 0,
                where, "q_proj rows are not n_head heads of at least rotary_dim");
    l.k = linear(t, "k_proj", where, d_);
    l.v = linear(t, "v_proj", where, d_);
    l.o = linear(t, "o_proj", where, n_head_ * hd_);
    l.gate = linear(t, "gate_proj", where, d_);
    l.up = linear(t, "up_proj", where, d_);
    l.down = linear(t, "down_proj", where, l.gate.m.n);
    TORCH_CHECK(l.k.m.n == n_kv_head_ * hd_ && l.v.m.n == l.k.m.n && l.o.m.n == d_ && l.up.m.n == l.gate.m.n &&
                    l.down.m.n == d_,
                where, "unexpected matrix shapes");
    if (t.contains("q_norm")) {
      l.q_norm = get(t, "q_norm", where);
      l.k_norm = get(t, "k_norm", where);
      TORCH_CHECK(l.q_norm.numel() == hd_ && l.k_norm.numel() == hd_, where, "q_norm/k_norm must have head_dim entries");
    }
    l.window = window;
    layers_.push_back(std::move(l));
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (N, d) f32 embeddings; rows, pos (N,) int64; caches (L, B, KV, S, hd) f32 or bf16, written at
  // (row, pos) of each token; out (M,) int64 token indices whose logits (M, V) are returned.
  // Below gemm_rows() tokens every token goes through the same per-row code as a single-token step,
  // so its logits do not depend on the other tokens of the call (batch rows, a verify pass).
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& rows_in, const at::Tensor& pos_in,
                     const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out_in) {
    const int64_t L = n_layers(), N = x_in.size(0), d = d_, H = n_head_, KV = n_kv_head_, hd = hd_;
    TORCH_CHECK(L > 0, "the step has no layers");
    TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(1) == d && N > 0,
                "x must be the (N, d_model) float32 embeddings");
    const at::ScalarType cache_type = k_cache.scalar_type();
    TORCH_CHECK((cache_type == at::kFloat || cache_type == at::kHalf || cache_type == at::kBFloat16) &&
                    v_cache.scalar_type() == cache_type &&
                    k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 5 &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == L && k_cache.size(2) == KV &&
                    k_cache.size(4) == hd,
                "caches must be contiguous (n_layer, B, n_kv_head, S, head_dim) float32, float16 or bfloat16");
    const at::Tensor x0 = x_in.contiguous(), rows_t = rows_in.to(at::kLong).contiguous(),
                     pos_t = pos_in.to(at::kLong).contiguous(), out_t = out_in.to(at::kLong).contiguous();
    TORCH_CHECK(rows_t.numel() == N && pos_t.numel() == N, "rows and pos need one entry per token");
    const int64_t B = k_cache.size(1), S = k_cache.size(3), rot = cos_.size(1);
    const int64_t* rows = rows_t.data_ptr<int64_t>();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    for (int64_t t = 0; t < N; ++t) {
      TORCH_CHECK(rows[t] >= 0 && rows[t] < B, "token ", t, " names cache row ", rows[t], " of ", B);
      TORCH_CHECK(pos[t] >= 0 && pos[t] < S && pos[t] < cos_.size(0), "position ", pos[t], " is outside the cache (",
                  S, " slots) or the RoPE table");
    }
    const int64_t M = out_t.numel();
    const int64_t* out = out_t.data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i) TORCH_CHECK(out[i] >= 0 && out[i] < N, "logit index ", out[i], " out of range");
    const int64_t nq = H * hd, nkv = KV * hd, layer_stride = B * KV * S * hd;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    const float* cosp = cos_.data_ptr<float>();
    const float* sinp = sin_.data_ptr<float>();

    std::vector<float> x(x0.data_ptr<float>(), x0.data_ptr<float>() + N * d), h(N * d), att(N * nq), tmp(N * d);
    std::vector<float> qv(N * nq), kv(N * nkv), vv(N * nkv), gate, up;
    QActs acts;
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers_[li];
      const int64_t dff = l.gate.m.n;
      gate.resize(N * dff);
      up.resize(N * dff);

      for (int64_t t = 0; t < N; ++t) rms_norm(&x[t * d], l.input_norm.data_ptr<float>(), d, eps_, &h[t * d]);
      matmul(h.data(), N, d, {l.q.m, l.k.m, l.v.m}, {qv.data(), kv.data(), vv.data()}, acts);
      add_bias(l.q, qv.data(), N);
      add_bias(l.k, kv.data(), N);
      add_bias(l.v, vv.data(), N);
      for (int64_t t = 0; t < N; ++t) {
        float* qt = &qv[t * nq];
        float* kt = &kv[t * nkv];
        if (l.q_norm.defined()) {  // per head, before RoPE
          for (int64_t i = 0; i < H; ++i) rms_norm(qt + i * hd, l.q_norm.data_ptr<float>(), hd, eps_, qt + i * hd);
          for (int64_t i = 0; i < KV; ++i) rms_norm(kt + i * hd, l.k_norm.data_ptr<float>(), hd, eps_, kt + i * hd);
        }
        rope(qt, H, hd, rot, cosp + pos[t] * rot, sinp + pos[t] * rot);
        rope(kt, KV, hd, rot, cosp + pos[t] * rot, sinp + pos[t] * rot);
      }
      if (cache_type == at::kHalf) {
        at::Half* kc = k_cache.data_ptr<at::Half>() + li * layer_stride;
        at::Half* vc = v_cache.data_ptr<at::Half>() + li * layer_stride;
        store(kv.data(), vv.data(), N, rows, pos, KV, S, hd, kc, vc);
        attend(qv.data(), kc, vc, N, rows, pos, H, KV, S, hd, l.window, scale, att.data());
      } else if (cache_type == at::kBFloat16) {
        at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>() + li * layer_stride;
        at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>() + li * layer_stride;
        store(kv.data(), vv.data(), N, rows, pos, KV, S, hd, kc, vc);
        attend(qv.data(), kc, vc, N, rows, pos, H, KV, S, hd, l.window, scale, att.data());
      } else {
        float* kc = k_cache.data_ptr<float>() + li * layer_stride;
        float* vc = v_cache.data_ptr<float>() + li * layer_stride;
        store(kv.data(), vv.data(), N, rows, pos, KV, S, hd, kc, vc);
        attend(qv.data(), kc, vc, N, rows, pos, H, KV, S, hd, l.window, scale, att.data());
      }
      matmul(att.data(), N, nq, {l.o.m}, {tmp.data()}, acts);
      add_bias(l.o, tmp.data(), N);
      for (int64_t i = 0; i < N * d; ++i) x[i] += tmp[i];

      for (int64_t t = 0; t < N; ++t) rms_norm(&x[t * d], l.post_attention_norm.data_ptr<float>(), d, eps_, &h[t * d]);
      matmul(h.data(), N, d, {l.gate.m, l.up.m}, {gate.data(), up.data()}, acts);
      add_bias(l.gate, gate.data(), N);
      add_bias(l.up, up.data(), N);
      for (int64_t i = 0; i < N * dff; ++i) {
        const float g = gate[i];
        gate[i] = g / (1.f + std::exp(-g)) * up[i];  // SwiGLU: silu(gate) * up
      }
      matmul(gate.data(), N, dff, {l.down.m}, {tmp.data()}, acts);
      add_bias(l.down, tmp.data(), N);
      for (int64_t i = 0; i < N * d; ++i) x[i] += tmp[i];
    }
    for (int64_t i = 0; i < M; ++i) rms_norm(&x[out[i] * d], norm_.data_ptr<float>(), d, eps_, &h[i * d]);
    at::Tensor logits = at::empty({M, head_.m.n}, x0.options());
    if (M > 0) matmul(h.data(), M, d, {head_.m}, {logits.data_ptr<float>()}, acts);
    return logits;
  }

 private:
  static at::Tensor get(const c10::Dict<std::string, at::Tensor>& t, const std::string& name, const std::string& where) {
    TORCH_CHECK(t.contains(name), where, "missing tensor '", name, "'");
    at::Tensor v = t.at(name);
    TORCH_CHECK(v.device().is_cpu(), where, "'", name, "' must be on the CPU");
    if (v.is_floating_point() && v.scalar_type() != at::kBFloat16) v = v.to(at::kFloat).contiguous();
    return v;
  }

  static Linear linear(const c10::Dict<std::string, at::Tensor>& t, const std::string& name, const std::string& where,
                       int64_t k) {
    Linear lin;
    lin.values = get(t, name + ".values", where);
    lin.scales = get(t, name + ".scales", where);
    lin.m = repacked(as_matrix(lin.values, lin.scales, k));  // rows interleaved for decode (repack.h)
    if (t.contains(name + ".bias")) {
      lin.bias = get(t, name + ".bias", where);
      TORCH_CHECK(lin.bias.numel() == lin.m.n, where, "'", name, ".bias' has ", lin.bias.numel(), " entries for ",
                  lin.m.n, " outputs");
    }
    return lin;
  }

  static void add_bias(const Linear& lin, float* y, int64_t N) {
    if (!lin.bias.defined()) return;
    const float* b = lin.bias.data_ptr<float>();
    for (int64_t t = 0; t < N; ++t)
      for (int64_t i = 0; i < lin.m.n; ++i) y[t * lin.m.n + i] += b[i];
  }

  int64_t n_head_, n_kv_head_, d_ = 0, hd_ = 0;
  float eps_;
  at::Tensor cos_, sin_, norm_;
  Linear head_;
  std::vector<Layer> layers_;
};

}  // namespace corelm
