// The fused decoder step: T tokens through a whole decoder in one call (included once, by
// corelm_kernels.cpp). One block interpreter covers the llama family (Llama, Mistral, Qwen2/3, Phi-3),
// Gemma 1/2/3, OLMo 2 and the sparse MoEs (Mixtral, Qwen2/3-MoE): each block is described by which
// norms it has where, its activation, its attention scale, soft-cap, window and RoPE table, and its
// MLP (dense, or routed experts).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "attention.h"
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

// LayerNorm (Ba et al. 2016; GPT-2): (x - mean) / sqrt(var + eps) * weight + bias, mean and variance in fp32
// over the row (two passes: the variance of the centred values, not E[x^2] - mean^2, which cancels).
void layer_norm(const float* x, const float* weight, const float* bias, int64_t d, float eps, float* out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(d);
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - mean) * r * weight[i] + bias[i];
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

// Per-row LoRA adapters on one matrix (S-LoRA, arXiv:2311.03285; Punica's BGMV, arXiv:2310.18547): the
// stacks of corelm.finetune.multi_lora, shared (no copies: loading an adapter writes them in place) --
// a (slots, r, K) and b (slots, N, r), fp32 or bf16, alpha / r folded into b; used (slots,) uint8: which
// slots' adapters target this matrix (slot 0, no adapter, never does).
struct LoRA {
  at::Tensor a, b, used;
};

// One matrix of the step: quantized weights (the layer's own tensors, kept alive here), an optional fp32
// bias, and optional LoRA stacks.
struct Linear {
  at::Tensor values, scales, bias;
  QMatrix m;
  LoRA lora;
};

// The tokens of a call that use each adapter slot: (slot, token indices), slot > 0, each slot once.
using SlotGroups = std::vector<std::pair<int64_t, std::vector<int64_t>>>;

template <typename W>
inline const float* lora_row(const W* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<W, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// y (T, N) += B[s] A[s] x (alpha / r folded into B) for every token of a slot s that targets this matrix,
// x (T, K): per slot, h (P, r) = x A[s]^T, then y += h B[s]^T with B[s] transposed once into (r, N) rows
// (axpys along N instead of N dot products of length r), so A[s] and B[s] are read once for the slot's P
// tokens. A token's update is the same code whatever else is in the call; tokens of no slot are untouched.
template <typename W>
void lora_update(const LoRA& lora, const SlotGroups& groups, const float* x, int64_t K, int64_t N, float* y) {
  const int64_t r = lora.a.size(1);
  const uint8_t* used = lora.used.data_ptr<uint8_t>();
  const W* A = lora.a.data_ptr<W>();
  const W* B = lora.b.data_ptr<W>();
  std::vector<float> h, bt(r * N), delta(N), abuf(std::is_same_v<W, float> ? 0 : K);
  for (const auto& [slot, tokens] : groups) {
    if (!used[slot]) continue;
    const int64_t P = static_cast<int64_t>(tokens.size());
    h.assign(P * r, 0.f);
    for (int64_t j = 0; j < r; ++j) {
      const float* a = lora_row(A + (slot * r + j) * K, K, abuf.data());
      for (int64_t p = 0; p < P; ++p) {
        const float* xt = x + tokens[p] * K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < K; ++i) acc += xt[i] * a[i];
        h[p * r + j] = acc;
      }
    }
    const W* bs = B + slot * N * r;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < r; ++j) bt[j * N + n] = static_cast<float>(bs[n * r + j]);
    for (int64_t p = 0; p < P; ++p) {
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t j = 0; j < r; ++j) {
        const float hj = h[p * r + j];
        const float* b = &bt[j * N];
        float* dp = delta.data();
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) dp[n] += hj * b[n];
      }
      float* yt = y + tokens[p] * N;
      for (int64_t n = 0; n < N; ++n) yt[n] += delta[n];  // the whole update, then onto the output (as in PyTorch)
    }
  }
}

// A floating-point matrix (N, K), fp32 or bf16: what a quantized MoE keeps unquantized (routers,
// Qwen2-MoE's shared-expert gate; the stacked routed experts of a model that keeps them in floats, viewed
// as (E * rows, K)).
struct FMatrix {
  at::Tensor w;
  int64_t n = 0, k = 0;
  bool defined() const { return w.defined(); }
};

template <typename W>
float fdot(const W* w, const float* x, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(w[i]) * x[i];
  return acc;
}

// y[r] = W[row0 + r] . x for r < rows, each row's sum in fp32 and in one fixed order.
void fmatvec(const FMatrix& m, int64_t row0, int64_t rows, const float* x, float* y) {
  auto run = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      y[r] = m.w.scalar_type() == at::kBFloat16 ? fdot(m.w.data_ptr<at::BFloat16>() + (row0 + r) * m.k, x, m.k)
                                                : fdot(m.w.data_ptr<float>() + (row0 + r) * m.k, x, m.k);
    }
  };
  if (rows * m.k < (1 << 15)) {  // little work: a parallel region costs more than it saves
    run(0, rows);
  } else {
    Pool::parallel_for(rows, 16, run);
  }
}

// One quantized routed expert (corelm.quant.experts): its SwiGLU's three matrices.
struct Expert {
  Linear gate, up, down;
};

// The MLP's nonlinearity: down(act(gate) * up) in a gated MLP (SwiGLU: Llama, OLMo 2; GeGLU with tanh
// GELU: Gemma), down(act(up)) in a plain one (GPT-2: tanh GELU).
enum class Activation { SiLU = 0, GeluTanh = 1, Gelu = 2, ReLU = 3 };

inline float activate(Activation act, float g) {
  switch (act) {
    case Activation::SiLU: return g / (1.f + std::exp(-g));
    case Activation::GeluTanh: {  // GELU's tanh form (Hendrycks & Gimpel 2016)
      constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * g * (1.f + std::tanh(kC * (g + 0.044715f * g * g * g)));
    }
    case Activation::Gelu: return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
    default: return g > 0.f ? g : 0.f;
  }
}

// gate = act(gate) * up (up null: act(gate)) over n values of one token. SiLU and tanh GELU run on
// attention.h's vectors where the build has them: e^x by the Cephes polynomial, 16 or 8 lanes at a time
// (libm's expf, one value at a time, was 7% of a 512-token prefill, Zen 4 profile), with the row's last
// values through the same code under a mask, so a token's values never depend on the call's other tokens.
inline void activate_row(Activation act, float* gate, const float* up, int64_t n) {
#if defined(CORELM_ATTENTION_SIMD)
  if (act == Activation::SiLU || act == Activation::GeluTanh) {
    using R = Simd::R;
    const R one = Simd::set1(1.f);
    for (int64_t i = 0; i < n; i += Simd::W) {
      const int64_t m = std::min<int64_t>(Simd::W, n - i);
      const R g = Simd::load(gate + i, m, 0.f);
      R y;
      if (act == Activation::SiLU) {  // g / (1 + e^-g); e^x capped at e^88 (finite), NaN stays NaN
        y = Simd::div(g, Simd::add(one, Simd::exp(Simd::min(Simd::set1(88.f), Simd::sub(Simd::zero(), g)))));
      } else {  // 0.5 g (1 + tanh u), tanh u = 1 - 2 / (1 + e^2u)
        constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
        const R u = Simd::mul(Simd::set1(kC), Simd::fma(Simd::mul(Simd::set1(0.044715f), g), Simd::mul(g, g), g));
        const R e = Simd::exp(Simd::min(Simd::set1(88.f), Simd::add(u, u)));
        const R tanh = Simd::sub(one, Simd::div(Simd::set1(2.f), Simd::add(one, e)));
        y = Simd::mul(Simd::mul(Simd::set1(0.5f), g), Simd::add(one, tanh));
      }
      if (up != nullptr) y = Simd::mul(y, Simd::load(up + i, m, 0.f));
      Simd::store(gate + i, y, m);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) gate[i] = up != nullptr ? activate(act, gate[i]) * up[i] : activate(act, gate[i]);
}

// A norm of the block: RMSNorm (weight only) or LayerNorm (weight and bias); absent: the identity.
struct Norm {
  at::Tensor weight, bias;
  bool defined() const { return weight.defined(); }
};

// What one block holds. Every part but the attention's four projections and the MLP's up and down is
// optional, and the block computes
//   x = x + attn_out_norm(attn(attn_norm(x)))      x = x + mlp_out_norm(mlp(mlp_norm(x)))
// with an absent norm the identity: pre-norms only (Llama; LayerNorms with biases in GPT-2), norms after
// each sub-layer only (OLMo 2), both (Gemma 2/3's sandwich). The MLP is gated when it has a gate_proj,
// plain (GPT-2) when not. Also optional: biases (q/k/v in Qwen2; any projection may have one),
// RMSNorm of queries and keys before RoPE, per head (Qwen3, Gemma 3: head_dim weights) or over the
// whole projection (OLMo 2: n_head * head_dim weights), a sliding window (Mistral, Gemma's local
// layers), a RoPE table of the layer's own (Gemma 3's local layers rotate with another base).
struct Layer {
  Norm attn_norm, attn_out_norm, mlp_norm, mlp_out_norm;
  at::Tensor q_norm, k_norm, cos, sin;
  Linear q, k, v, o, gate, up, down;
  int64_t window = 0;  // 0: attend to every earlier position
  float attn_scale = 0.f;  // scores = q.k * attn_scale; 0: 1 / sqrt(head_dim)
  float attn_softcap = 0.f;  // 0: scores not capped
  Activation act = Activation::SiLU;
  // A sparse MoE MLP (Mixtral, Qwen2/3-MoE) when `router` is set: softmax(router x) picks top_k of the
  // experts, weighted by their probabilities (renormalised to sum 1 with norm_topk); the experts are
  // quantized (`experts`: expert e's gate, up and down) or float stacks (gate|up rows of expert e:
  // experts_gate_up rows e*2F..; down: experts_down rows e*d..). gate/up/down are then Qwen2-MoE's
  // shared expert (absent otherwise), scaled by sigmoid(shared_gate x).
  FMatrix router, experts_gate_up, experts_down, shared_gate;
  std::vector<Expert> experts;
  int64_t top_k = 0, moe_ff = 0;
  bool norm_topk = false;
};

// A decoder described to the C++ step by name, once, at load (norm weights as the step multiplies
// by them: Gemma's 1 + w is folded in by the caller):
//   DecoderStep({"cos", "sin", "norm", "lm_head.values", "lm_head.scales", optional "norm.bias", "cos_long",
//                "sin_long"}, n_head, n_kv_head, {"eps", optional "final_softcap", "rope_long_from"})
//   .add_layer({"<proj>.values", "<proj>.scales", optional "<proj>.bias"   for proj in q/k/v/o/gate/up/down,
//               optional "attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm" (each with an optional
//               "<norm>.bias": a LayerNorm), "q_norm", "k_norm",
//               "cos", "sin", and for a sparse MoE MLP "router", either "experts.gate_up" and "experts.down"
//               (float stacks) or "experts.<e>.<proj>.values"/".scales" for proj in gate/up/down_proj and
//               every expert e (quantized), and "shared_expert_gate" (the gate/up/down projections are
//               then the shared expert's, if any)},
//              {optional "window", "attn_scale", "attn_softcap", "act", "top_k", "norm_topk"})
// cos and sin of width 0: no RoPE (GPT-2's positions are added to the embeddings by the caller).
// The output logits become final_softcap * tanh(logits / final_softcap) when it is set (Gemma 2).
// With "rope_long_from" (LongRoPE, Phi-3), a row whose largest position in the call is at least
// rope_long_from rotates with the "cos_long"/"sin_long" table, as a forward of that row alone does.
// forward() then takes only what changes per call: the tokens' embeddings, their cache rows and
// positions, the caches, and which tokens' logits to return. With LoRA stacks registered by set_lora,
// forward_lora also takes each token's adapter slot. A decode step of B requests is one call
// with N = B tokens; a prefill or a speculative verify pass is N tokens of one row.
class DecoderStep : public torch::CustomClassHolder {
 public:
  DecoderStep(c10::Dict<std::string, at::Tensor> tensors, int64_t n_head, int64_t n_kv_head,
              c10::Dict<std::string, double> options)
      : n_head_(n_head), n_kv_head_(n_kv_head) {
    TORCH_CHECK(options.contains("eps"), "options need the RMSNorm 'eps'");
    eps_ = static_cast<float>(options.at("eps"));
    final_softcap_ = static_cast<float>(option(options, "final_softcap", 0.));
    long_from_ = static_cast<int64_t>(option(options, "rope_long_from", 0.));
    cos_ = get(tensors, "cos", "");
    sin_ = get(tensors, "sin", "");
    norm_ = optional(tensors, "norm", "", -1);
    TORCH_CHECK(norm_.defined(), "the step needs the final 'norm'");
    TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0, "n_head must be a multiple of n_kv_head");
    TORCH_CHECK(cos_.dim() == 2 && sin_.sizes() == cos_.sizes(), "cos and sin must be (S, rotary_dim) tables");
    if (long_from_ > 0) {
      cos_long_ = get(tensors, "cos_long", "");
      sin_long_ = get(tensors, "sin_long", "");
      TORCH_CHECK(cos_long_.dim() == 2 && sin_long_.sizes() == cos_long_.sizes() &&
                      cos_long_.size(1) == cos_.size(1),
                  "cos_long and sin_long must be (S, rotary_dim) tables like cos and sin");
    }
    d_ = norm_.weight.size(0);
    TORCH_CHECK(!norm_.bias.defined() || norm_.bias.numel() == d_, "'norm.bias' must have d_model entries");
    head_ = linear(tensors, "lm_head", "", d_);
  }

  void add_layer(c10::Dict<std::string, at::Tensor> t, c10::Dict<std::string, double> options) {
    const std::string where = "layer " + std::to_string(layers_.size()) + ": ";
    Layer l;
    l.attn_norm = optional(t, "attn_norm", where, d_);
    l.attn_out_norm = optional(t, "attn_out_norm", where, d_);
    l.mlp_norm = optional(t, "mlp_norm", where, d_);
    l.mlp_out_norm = optional(t, "mlp_out_norm", where, d_);
    l.q = linear(t, "q_proj", where, d_);
    hd_ = l.q.m.n / n_head_;
    if (t.contains("cos")) {  // the layer's own RoPE table
      l.cos = get(t, "cos", where);
      l.sin = get(t, "sin", where);
      TORCH_CHECK(l.cos.dim() == 2 && l.sin.sizes() == l.cos.sizes(), where, "cos and sin must be (S, rotary_dim)");
    }
    const int64_t rot = (l.cos.defined() ? l.cos : cos_).size(1);
    TORCH_CHECK(hd_ * n_head_ == l.q.m.n && rot <= hd_ && rot % 2 == 0,
                where, "q_proj rows are not n_head heads of at least rotary_dim");
    l.k = linear(t, "k_proj", where, d_);
    l.v = linear(t, "v_proj", where, d_);
    l.o = linear(t, "o_proj", where, n_head_ * hd_);
    if (t.contains("router")) add_moe(l, t, options, where);
    if (!l.router.defined() || t.contains("up_proj.values")) {  // the MLP, or a MoE's shared expert
      if (t.contains("gate_proj.values")) l.gate = linear(t, "gate_proj", where, d_);
      l.up = linear(t, "up_proj", where, d_);
      l.down = linear(t, "down_proj", where, l.up.m.n);
      TORCH_CHECK((!l.gate.values.defined() || l.up.m.n == l.gate.m.n) && l.down.m.n == d_, where,
                  "unexpected MLP shapes");
    }
    TORCH_CHECK(l.k.m.n == n_kv_head_ * hd_ && l.v.m.n == l.k.m.n && l.o.m.n == d_, where,
                "unexpected attention shapes");
    if (t.contains("q_norm")) {
      l.q_norm = get(t, "q_norm", where);
      l.k_norm = get(t, "k_norm", where);
      const bool per_head = l.q_norm.numel() == hd_ && l.k_norm.numel() == hd_;
      const bool whole = l.q_norm.numel() == n_head_ * hd_ && l.k_norm.numel() == n_kv_head_ * hd_;
      TORCH_CHECK(per_head || whole, where,
                  "q_norm/k_norm must have head_dim entries, or one per row of q_proj/k_proj");
    }
    l.window = static_cast<int64_t>(option(options, "window", 0.));
    l.attn_scale = static_cast<float>(option(options, "attn_scale", 0.));
    l.attn_softcap = static_cast<float>(option(options, "attn_softcap", 0.));
    const int64_t act = static_cast<int64_t>(option(options, "act", 0.));
    TORCH_CHECK(act >= 0 && act <= 3, where, "act must be 0 (SiLU), 1 (tanh GELU), 2 (GELU) or 3 (ReLU)");
    l.act = static_cast<Activation>(act);
    layers_.push_back(std::move(l));
  }

  // Per-row LoRA on projection `proj` (q_proj ... down_proj) of layer `layer`: the stacks a (slots, r, K),
  // b (slots, N, r), fp32 or bf16, and used (slots,) uint8, kept by reference -- writes into them (an
  // adapter loaded or cleared) apply from the next call. forward_lora's per-token slots index them.
  void set_lora(int64_t layer, const std::string& proj, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& used) {
    TORCH_CHECK(layer >= 0 && layer < n_layers(), "no layer ", layer);
    Layer& l = layers_[layer];
    Linear* lin = proj == "q_proj" ? &l.q : proj == "k_proj" ? &l.k : proj == "v_proj" ? &l.v : proj == "o_proj" ? &l.o
                : proj == "gate_proj" ? &l.gate : proj == "up_proj" ? &l.up : proj == "down_proj" ? &l.down : nullptr;
    TORCH_CHECK(lin != nullptr, "no projection '", proj, "'");
    const at::ScalarType type = a.scalar_type();
    TORCH_CHECK((type == at::kFloat || type == at::kBFloat16) && b.scalar_type() == type && a.device().is_cpu() &&
                    b.device().is_cpu() && a.is_contiguous() && b.is_contiguous() && a.dim() == 3 && b.dim() == 3,
                "LoRA stacks must be contiguous CPU (slots, r, K) and (slots, N, r), float32 or bfloat16");
    TORCH_CHECK(a.size(2) == lin->m.k && b.size(1) == lin->m.n && a.size(1) == b.size(2) && a.size(0) == b.size(0),
                "layer ", layer, " ", proj, ": LoRA stacks ", a.sizes(), " and ", b.sizes(), " do not fit a ",
                lin->m.n, " x ", lin->m.k, " matrix");
    TORCH_CHECK(used.scalar_type() == at::kByte && used.is_contiguous() && used.numel() == a.size(0),
                "used must be a contiguous uint8 (slots,) tensor");
    TORCH_CHECK(lora_slots_ == 0 || lora_slots_ == a.size(0), "every LoRA stack must have the same slots");
    lora_slots_ = a.size(0);
    lin->lora = LoRA{a, b, used};
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (N, d) f32 embeddings; rows, pos (N,) int64; caches (L, B, KV, S, hd) f32 or bf16, written at
  // (row, pos) of each token; out (M,) int64 token indices whose logits (M, V) are returned.
  // Below gemm_rows() tokens every token goes through the same per-row code as a single-token step,
  // so its logits do not depend on the other tokens of the call (batch rows, a verify pass).
  // slots_in (N,) int64 (forward_lora): the LoRA slot of each token (0: none); undefined or empty: no token has one.
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& rows_in, const at::Tensor& pos_in,
                     const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out_in,
                     const at::Tensor& slots_in = at::Tensor()) {
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
    const int64_t B = k_cache.size(1), S = k_cache.size(3);
    const int64_t* rows = rows_t.data_ptr<int64_t>();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    for (int64_t t = 0; t < N; ++t) {
      TORCH_CHECK(rows[t] >= 0 && rows[t] < B, "token ", t, " names cache row ", rows[t], " of ", B);
      TORCH_CHECK(pos[t] >= 0 && pos[t] < S, "position ", pos[t], " is outside the cache (", S, " slots)");
    }
    // the model's RoPE table of each token: LongRoPE's long one for a row reaching rope_long_from
    std::vector<const at::Tensor*> cos_of(N, &cos_), sin_of(N, &sin_);
    if (long_from_ > 0) {
      std::vector<int64_t> row_max(B, -1);
      for (int64_t t = 0; t < N; ++t) row_max[rows[t]] = std::max(row_max[rows[t]], pos[t]);
      for (int64_t t = 0; t < N; ++t) {
        if (row_max[rows[t]] + 1 > long_from_) cos_of[t] = &cos_long_, sin_of[t] = &sin_long_;
      }
    }
    for (int64_t t = 0; t < N; ++t) {
      TORCH_CHECK(pos[t] < cos_of[t]->size(0), "position ", pos[t], " is outside the RoPE table");
      for (const Layer& l : layers_)
        TORCH_CHECK(!l.cos.defined() || pos[t] < l.cos.size(0), "position ", pos[t],
                    " is outside a layer's RoPE table");
    }
    const int64_t M = out_t.numel();
    const int64_t* out = out_t.data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i) TORCH_CHECK(out[i] >= 0 && out[i] < N, "logit index ", out[i], " out of range");
    const SlotGroups groups = slot_groups(slots_in, N);
    const int64_t nq = H * hd, nkv = KV * hd, layer_stride = B * KV * S * hd;

    std::vector<float> x(x0.data_ptr<float>(), x0.data_ptr<float>() + N * d), h(N * d), att(N * nq), tmp(N * d);
    std::vector<float> qv(N * nq), kv(N * nkv), vv(N * nkv), gate, up;
    QActs acts;
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers_[li];
      const int64_t dff = l.up.m.n;  // 0: a MoE without a shared expert
      gate.resize(N * dff);
      up.resize(N * dff);
      const float scale = l.attn_scale > 0.f ? l.attn_scale : 1.f / std::sqrt(static_cast<float>(hd));

      const float* in = norm_rows(x.data(), l.attn_norm, N, h.data());
      matmul(in, N, d, {l.q.m, l.k.m, l.v.m}, {qv.data(), kv.data(), vv.data()}, acts);
      add_bias(l.q, qv.data(), N);
      add_bias(l.k, kv.data(), N);
      add_bias(l.v, vv.data(), N);
      add_lora(l.q, groups, in, qv.data());
      add_lora(l.k, groups, in, kv.data());
      add_lora(l.v, groups, in, vv.data());
      for (int64_t t = 0; t < N; ++t) {
        float* qt = &qv[t * nq];
        float* kt = &kv[t * nkv];
        if (l.q_norm.defined() && l.q_norm.numel() == hd) {  // per head, before RoPE
          for (int64_t i = 0; i < H; ++i) rms_norm(qt + i * hd, l.q_norm.data_ptr<float>(), hd, eps_, qt + i * hd);
          for (int64_t i = 0; i < KV; ++i) rms_norm(kt + i * hd, l.k_norm.data_ptr<float>(), hd, eps_, kt + i * hd);
        } else if (l.q_norm.defined()) {  // over the whole projection, before RoPE
          rms_norm(qt, l.q_norm.data_ptr<float>(), nq, eps_, qt);
          rms_norm(kt, l.k_norm.data_ptr<float>(), nkv, eps_, kt);
        }
        const at::Tensor& c = l.cos.defined() ? l.cos : *cos_of[t];
        const at::Tensor& sn = l.sin.defined() ? l.sin : *sin_of[t];
        const int64_t rot = c.size(1);
        const float* cp = c.data_ptr<float>() + pos[t] * rot;
        const float* sp = sn.data_ptr<float>() + pos[t] * rot;
        rope(qt, H, hd, rot, cp, sp);
        rope(kt, KV, hd, rot, cp, sp);
      }
      if (cache_type == at::kHalf) {
        at::Half* kc = k_cache.data_ptr<at::Half>() + li * layer_stride;
        at::Half* vc = v_cache.data_ptr<at::Half>() + li * layer_stride;
        store(kv.data(), vv.data(), N, rows, pos, KV, S, hd, kc, vc);
        attend(qv.data(), kc, vc, N, rows, pos, H, KV, S, hd, l.window, scale, l.attn_softcap, att.data());
      } else if (cache_type == at::kBFloat16) {
        at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>() + li * layer_stride;
        at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>() + li * layer_stride;
        store(kv.data(), vv.data(), N, rows, pos, KV, S, hd, kc, vc);
        attend(qv.data(), kc, vc, N, rows, pos, H, KV, S, hd, l.window, scale, l.attn_softcap, att.data());
      } else {
        float* kc = k_cache.data_ptr<float>() + li * layer_stride;
        float* vc = v_cache.data_ptr<float>() + li * layer_stride;
        store(kv.data(), vv.data(), N, rows, pos, KV, S, hd, kc, vc);
        attend(qv.data(), kc, vc, N, rows, pos, H, KV, S, hd, l.window, scale, l.attn_softcap, att.data());
      }
      matmul(att.data(), N, nq, {l.o.m}, {tmp.data()}, acts);
      add_bias(l.o, tmp.data(), N);
      add_lora(l.o, groups, att.data(), tmp.data());
      norm_rows(tmp.data(), l.attn_out_norm, N, tmp.data());
      for (int64_t i = 0; i < N * d; ++i) x[i] += tmp[i];

      in = norm_rows(x.data(), l.mlp_norm, N, h.data());
      if (dff == 0) {  // a MoE without a shared expert
        std::fill(tmp.begin(), tmp.end(), 0.f);
      } else {
        if (l.gate.values.defined()) {  // gated: act(gate) * up
          matmul(in, N, d, {l.gate.m, l.up.m}, {gate.data(), up.data()}, acts);
          add_bias(l.gate, gate.data(), N);
          add_bias(l.up, up.data(), N);
          add_lora(l.gate, groups, in, gate.data());
          add_lora(l.up, groups, in, up.data());
          for (int64_t t = 0; t < N; ++t) activate_row(l.act, gate.data() + t * dff, up.data() + t * dff, dff);
        } else {  // plain: act(up)
          matmul(in, N, d, {l.up.m}, {gate.data()}, acts);
          add_bias(l.up, gate.data(), N);
          add_lora(l.up, groups, in, gate.data());
          for (int64_t t = 0; t < N; ++t) activate_row(l.act, gate.data() + t * dff, nullptr, dff);
        }
        matmul(gate.data(), N, dff, {l.down.m}, {tmp.data()}, acts);
        add_bias(l.down, tmp.data(), N);
        add_lora(l.down, groups, gate.data(), tmp.data());
      }
      if (l.router.defined()) moe(l, in, N, tmp.data());
      norm_rows(tmp.data(), l.mlp_out_norm, N, tmp.data());
      for (int64_t i = 0; i < N * d; ++i) x[i] += tmp[i];
    }
    for (int64_t i = 0; i < M; ++i) norm_row(&x[out[i] * d], norm_, &h[i * d]);
    at::Tensor logits = at::empty({M, head_.m.n}, x0.options());
    if (M > 0) matmul(h.data(), M, d, {head_.m}, {logits.data_ptr<float>()}, acts);
    if (final_softcap_ > 0.f) {
      float* y = logits.data_ptr<float>();
      for (int64_t i = 0; i < M * head_.m.n; ++i) y[i] = final_softcap_ * std::tanh(y[i] / final_softcap_);
    }
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

  FMatrix fmatrix(const c10::Dict<std::string, at::Tensor>& t, const std::string& name, const std::string& where,
                  int64_t n, int64_t k) const {
    FMatrix m;
    m.w = get(t, name, where).contiguous();
    TORCH_CHECK(m.w.numel() == n * k, where, "'", name, "' must hold ", n, " x ", k, " weights");
    m.n = n;
    m.k = k;
    return m;
  }

  void add_moe(Layer& l, const c10::Dict<std::string, at::Tensor>& t, const c10::Dict<std::string, double>& options,
               const std::string& where) const {
    const at::Tensor& router = t.at("router");
    TORCH_CHECK(router.dim() == 2 && router.size(1) == d_, where, "router must be (n_experts, d_model)");
    const int64_t E = router.size(0);
    l.router = fmatrix(t, "router", where, E, d_);
    if (t.contains("experts.0.gate_proj.values")) {  // quantized, one matrix per expert and projection
      for (int64_t e = 0; e < E; ++e) {
        const std::string name = "experts." + std::to_string(e) + ".";
        Expert x;
        x.gate = linear(t, name + "gate_proj", where, d_);
        x.up = linear(t, name + "up_proj", where, d_);
        x.down = linear(t, name + "down_proj", where, x.gate.m.n);
        if (e == 0) l.moe_ff = x.gate.m.n;
        TORCH_CHECK(x.gate.m.n == l.moe_ff && x.up.m.n == l.moe_ff && x.down.m.n == d_ && !x.gate.bias.defined() &&
                        !x.up.bias.defined() && !x.down.bias.defined(),
                    where, "expert ", e, " is not a SwiGLU of width ", l.moe_ff, " without biases");
        l.experts.push_back(std::move(x));
      }
    } else {
      TORCH_CHECK(t.contains("experts.down") && t.at("experts.down").dim() == 3, where,
                  "'experts.down' must be (n_experts, d_model, F)");
      l.moe_ff = t.at("experts.down").size(2);
      l.experts_gate_up = fmatrix(t, "experts.gate_up", where, E * 2 * l.moe_ff, d_);
      l.experts_down = fmatrix(t, "experts.down", where, E * d_, l.moe_ff);
    }
    if (t.contains("shared_expert_gate")) l.shared_gate = fmatrix(t, "shared_expert_gate", where, 1, d_);
    l.top_k = static_cast<int64_t>(option(options, "top_k", 0.));
    l.norm_topk = option(options, "norm_topk", 0.) != 0.;
    TORCH_CHECK(l.top_k > 0 && l.top_k <= E, where, "top_k must be 1..n_experts");
  }

  // y (N, d) += each token's routed experts, sum_j w_j * down_e(silu(gate_e x) * up_e x); a shared
  // expert already in y is first scaled by sigmoid(shared_gate x). A token's experts and sums do not
  // depend on the other tokens of the call: routing is per token, a quantized expert runs its tokens
  // through the matmul whose rows equal one-token calls below gemm_rows() (as every projection does), and
  // each token adds its experts' outputs in its own top-k order.
  void moe(const Layer& l, const float* x, int64_t N, float* y) const {
    const int64_t E = l.router.n, F = l.moe_ff, d = d_, K = l.top_k;
    std::vector<int64_t> chosen(N * K);  // token t's experts, chosen[t*K + j], and their weights
    std::vector<float> weight(N * K);
    route(l, x, N, y, chosen.data(), weight.data());
    std::vector<float> out(N * K * d);  // expert outputs per (token, slot)
    if (l.experts.empty()) {  // float stacks: token by token
      std::vector<float> gu(2 * F);
      for (int64_t a = 0; a < N * K; ++a) {
        const int64_t e = chosen[a];
        fmatvec(l.experts_gate_up, e * 2 * F, 2 * F, x + a / K * d, gu.data());
        activate_row(Activation::SiLU, gu.data(), gu.data() + F, F);  // SwiGLU
        fmatvec(l.experts_down, e * d, d, gu.data(), &out[a * d]);
      }
    } else {  // quantized: each expert once, on the rows of the tokens that chose it
      std::vector<std::vector<int64_t>> of(E);  // (token, slot) assignments a = t*K + j per expert, in token order
      for (int64_t a = 0; a < N * K; ++a) of[chosen[a]].push_back(a);
      std::vector<float> xs, gate, up, down;
      QActs acts;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t T = static_cast<int64_t>(of[e].size());
        if (T == 0) continue;  // no token picked it: its weights are not read
        const Expert& ex = l.experts[e];
        xs.resize(T * d);
        gate.resize(T * F);
        up.resize(T * F);
        down.resize(T * d);
        for (int64_t i = 0; i < T; ++i) std::copy_n(x + of[e][i] / K * d, d, &xs[i * d]);
        matmul(xs.data(), T, d, {ex.gate.m, ex.up.m}, {gate.data(), up.data()}, acts);
        for (int64_t i = 0; i < T; ++i) activate_row(Activation::SiLU, &gate[i * F], &up[i * F], F);  // SwiGLU
        matmul(gate.data(), T, F, {ex.down.m}, {down.data()}, acts);
        for (int64_t i = 0; i < T; ++i) std::copy_n(&down[i * d], d, &out[of[e][i] * d]);
      }
    }
    for (int64_t a = 0; a < N * K; ++a) {  // each token's slots in its top-k order
      float* yt = y + a / K * d;
      const float w = weight[a];
      for (int64_t i = 0; i < d; ++i) yt[i] += w * out[a * d + i];
    }
  }

  // Each token's top_k experts (chosen, N * top_k) and weights from its router probabilities; a shared
  // expert's output in y (N, d) is scaled by sigmoid(shared_gate x) on the way.
  void route(const Layer& l, const float* x, int64_t N, float* y, int64_t* chosen, float* weight) const {
    const int64_t E = l.router.n, d = d_;
    std::vector<float> probs(E);
    std::vector<int64_t> order(E);
    for (int64_t t = 0; t < N; ++t) {
      const float* xt = x + t * d;
      float* yt = y + t * d;
      if (l.shared_gate.defined()) {
        float g = 0.f;
        fmatvec(l.shared_gate, 0, 1, xt, &g);
        const float s = 1.f / (1.f + std::exp(-g));
        for (int64_t i = 0; i < d; ++i) yt[i] *= s;
      }
      fmatvec(l.router, 0, E, xt, probs.data());  // fp32 softmax: the probabilities pick the experts
      const float mx = *std::max_element(probs.begin(), probs.end());
      float sum = 0.f;
      for (float& p : probs) sum += (p = std::exp(p - mx));
      for (float& p : probs) p /= sum;
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + l.top_k, order.end(), [&](int64_t a, int64_t b) {
        return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);  // ties: the lower index, as topk
      });
      float norm = 1.f;
      if (l.norm_topk) {
        norm = 0.f;
        for (int64_t j = 0; j < l.top_k; ++j) norm += probs[order[j]];
      }
      for (int64_t j = 0; j < l.top_k; ++j) {
        chosen[t * l.top_k + j] = order[j];
        weight[t * l.top_k + j] = probs[order[j]] / norm;
      }
    }
  }

  static double option(const c10::Dict<std::string, double>& o, const std::string& name, double fallback) {
    return o.contains(name) ? o.at(name) : fallback;
  }

  // Norm `name` (and "<name>.bias", which makes it a LayerNorm) if the block has it; d < 0: any width.
  static Norm optional(const c10::Dict<std::string, at::Tensor>& t, const std::string& name, const std::string& where,
                       int64_t d) {
    Norm n;
    if (!t.contains(name)) return n;
    n.weight = get(t, name, where);
    if (d < 0) d = n.weight.numel();
    TORCH_CHECK(n.weight.numel() == d, where, "'", name, "' must have d_model entries");
    if (t.contains(name + ".bias")) {
      n.bias = get(t, name + ".bias", where);
      TORCH_CHECK(n.bias.numel() == d, where, "'", name, ".bias' must have d_model entries");
    }
    return n;
  }

  void norm_row(const float* x, const Norm& n, float* out) const {
    if (n.bias.defined()) {
      layer_norm(x, n.weight.data_ptr<float>(), n.bias.data_ptr<float>(), d_, eps_, out);
    } else {
      rms_norm(x, n.weight.data_ptr<float>(), d_, eps_, out);
    }
  }

  // The N rows of x (N, d) through the norm into out, or x itself when the block has no such norm;
  // returns the rows a matmul reads. out may be x.
  const float* norm_rows(const float* x, const Norm& n, int64_t N, float* out) const {
    if (!n.defined()) return x;
    for (int64_t t = 0; t < N; ++t) norm_row(x + t * d_, n, out + t * d_);
    return out;
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

  // Tokens grouped by LoRA slot (slot 0 and an undefined or empty tensor: no update).
  SlotGroups slot_groups(const at::Tensor& slots_in, int64_t N) const {
    SlotGroups groups;
    if (!slots_in.defined() || slots_in.numel() == 0) return groups;
    const at::Tensor st = slots_in.to(at::kLong).contiguous();
    TORCH_CHECK(st.numel() == N, "slots needs one entry per token");
    const int64_t* slots = st.data_ptr<int64_t>();
    for (int64_t t = 0; t < N; ++t) {
      const int64_t s = slots[t];
      if (s == 0) continue;
      TORCH_CHECK(s > 0 && s < lora_slots_, "token ", t, " names LoRA slot ", s, " of ", lora_slots_);
      auto g = std::find_if(groups.begin(), groups.end(), [s](const auto& e) { return e.first == s; });
      if (g == groups.end()) {
        groups.push_back({s, {t}});
      } else {
        g->second.push_back(t);
      }
    }
    return groups;
  }

  static void add_lora(const Linear& lin, const SlotGroups& groups, const float* x, float* y) {
    if (groups.empty() || !lin.lora.a.defined()) return;
    if (lin.lora.a.scalar_type() == at::kBFloat16) {
      lora_update<at::BFloat16>(lin.lora, groups, x, lin.m.k, lin.m.n, y);
    } else {
      lora_update<float>(lin.lora, groups, x, lin.m.k, lin.m.n, y);
    }
  }

  int64_t n_head_, n_kv_head_, d_ = 0, hd_ = 0, long_from_ = 0, lora_slots_ = 0;
  float eps_ = 0.f, final_softcap_ = 0.f;
  at::Tensor cos_, sin_, cos_long_, sin_long_;
  Norm norm_;
  Linear head_;
  std::vector<Layer> layers_;
};

}  // namespace corelm
