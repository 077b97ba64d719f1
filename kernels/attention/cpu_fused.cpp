// Paged attention, the KV cache write and the q/k norm with RoPE on the CPU, one op each (fp32 or bf16).
//
// paged_attention: naive.py's arithmetic per query: scores q.k in fp32 times the scale over the keys
// the query may see (positions 0..p of its sequence, read through the block table), softmax in fp32
// (the maximum subtracted, exp, divided by the sum), the probability-weighted sum of the values in
// fp32, rounded to q's dtype, then times sigmoid(gate) rounded to that dtype, rounded again
// (transformers' order). The dot products' sums run in another order than torch's matmul and exp is
// ../cpu_simd.h's, so results agree with naive.py to fp32 rounding. One work item is a query and a KV
// head, all the query heads that share it reading each key and value row once.
//
// reshape_and_cache: token t's key and value rows copied to slot slot_mapping[t], negative slots
// (padding) skipped; the same bytes as naive.py's indexed assignment.
//
// qk_norm_rope: naive.py's zero-centred RMSNorm of every q and k head in fp32, rounded to the
// activation dtype, then NeoX RoPE on the first rotary_dim dims in that dtype (each product and the
// sum rounded, as transformers' torch ops round them). The sum of squares runs in ../cpu_simd.h's
// order and cos and sin are the C library's (torch's vectorised ones may differ by an ulp), so results
// agree with naive.py to the tolerance of an fp32 sum over D and a few roundings to the dtype.
//
// Why: the torch forms are ~50 ops (attention), ~20 (the cache write) and ~25 (norm and RoPE) per
// attention layer per step, most of a decode step's attention time at this model size, and naive.py's
// prefill attention materialises [Hq, Lq, Lk] scores per sequence.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../cpu_simd.h"

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef NEXTSERVE_SIMD
  if constexpr (simd::takes<T>) {
    __m512 acc = _mm512_setzero_ps();
    for (; i + simd::kWidth <= D; i += simd::kWidth) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), simd::load(k + i), acc);
    sum = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; i < D; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}

// out[i] += p * v[i]
template <typename T>
inline void axpy(float p, const T* v, float* out, int64_t D) {
  int64_t i = 0;
#ifdef NEXTSERVE_SIMD
  if constexpr (simd::takes<T>) {
    const __m512 pv = _mm512_set1_ps(p);
    for (; i + simd::kWidth <= D; i += simd::kWidth)
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pv, simd::load(v + i), _mm512_loadu_ps(out + i)));
  }
#endif
  for (; i < D; ++i) out[i] += p * static_cast<float>(v[i]);
}

// exp(x - max) in place over n scores; returns their sum
inline float exp_shifted(float* x, int64_t n, float max) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef NEXTSERVE_SIMD
  const __m512 m = _mm512_set1_ps(max);
  __m512 acc = _mm512_setzero_ps();
  for (; i + simd::kWidth <= n; i += simd::kWidth) {
    const __m512 e = simd::exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  return sum;
}

template <typename T>
void attend(const T* q, const T* gate, const T* k_cache, const T* v_cache, const int64_t* tables, int64_t max_blocks,
            const int64_t* query_seq, const int64_t* query_pos, int64_t Tq, int64_t Hq, int64_t Hkv, int64_t D,
            int64_t block_size, int64_t max_keys, float scale, T* out) {
  const int64_t group = Hq / Hkv;
  at::parallel_for(0, Tq * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(group * D), scores(group * max_keys), acc(group * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / Hkv, h = item % Hkv, n = query_seq[t], keys = query_pos[t] + 1;
      const int64_t* table = tables + n * max_blocks;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < D; ++i) queries[g * D + i] = static_cast<float>(q[(t * Hq + h * group + g) * D + i]);
      for (int64_t j = 0; j < keys; ++j) {
        const int64_t slot = table[j / block_size] * block_size + j % block_size;
        const T* key = k_cache + (slot * Hkv + h) * D;
        for (int64_t g = 0; g < group; ++g) scores[g * max_keys + j] = dot(queries.data() + g * D, key, D) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * max_keys;
        const float max = *std::max_element(s, s + keys);
        const float sum = exp_shifted(s, keys, max);
        for (int64_t j = 0; j < keys; ++j) s[j] /= sum;
      }
      for (int64_t j = 0; j < keys; ++j) {
        const int64_t slot = table[j / block_size] * block_size + j % block_size;
        const T* value = v_cache + (slot * Hkv + h) * D;
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * max_keys + j], value, acc.data() + g * D, D);
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t row = (t * Hq + h * group + g) * D;
        for (int64_t i = 0; i < D; ++i) {
          const T o = static_cast<T>(acc[g * D + i]);
          if (gate == nullptr) {
            out[row + i] = o;
          } else {
            const float x = static_cast<float>(gate[row + i]);
            const T sigmoid = static_cast<T>(1.f / (1.f + std::exp(-x)));
            out[row + i] = static_cast<T>(static_cast<float>(o) * static_cast<float>(sigmoid));
          }
        }
      }
    }
  });
}

// Round a float to T's precision and back: what a torch op in T stores and the next one reads.
template <typename T>
inline float rounded(float x) { return static_cast<float>(static_cast<T>(x)); }

// One token's heads, normed then rotated. The norm is naive.py's in fp32 (x * 1 / sqrt(mean(x^2) + eps)
// * (1 + w)), rounded to T; the rotation runs in T as transformers' does: cos and sin rounded to T,
// each product rounded, their sum rounded (rotate_half(x) * sin is (-x2, x1) * sin: negation is exact).
template <typename T>
void norm_rope_rows(const T* q, int64_t q_token, int64_t q_head, const T* k, int64_t k_token, int64_t k_head,
                    const float* q_weight, const float* k_weight, const int64_t* positions, const float* inv_freq, T* out, int64_t T_, int64_t Hq,
                    int64_t Hkv, int64_t D, int64_t half, float eps) {
  const int64_t H = Hq + Hkv;
  at::parallel_for(0, T_, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), cos(half), sin(half);
    for (int64_t t = begin; t < end; ++t) {
      const float position = static_cast<float>(positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = position * inv_freq[i];  // positions.float() * inv_freq, one fp32 product
        cos[i] = rounded<T>(std::cos(angle));
        sin[i] = rounded<T>(std::sin(angle));
      }
      for (int64_t h = 0; h < H; ++h) {
        const bool is_q = h < Hq;
        const T* x = is_q ? q + t * q_token + h * q_head : k + t * k_token + (h - Hq) * k_head;
        const float* w = is_q ? q_weight : k_weight;
        T* y = out + (t * H + h) * D;
        for (int64_t i = 0; i < D; ++i) row[i] = static_cast<float>(x[i]);
        const float inv = 1.f / std::sqrt(row_ops::sum_of_squares(row.data(), D) / static_cast<float>(D) + eps);
        for (int64_t i = 0; i < D; ++i) row[i] = rounded<T>(row[i] * inv * (1.f + w[i]));
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = row[i], x2 = row[i + half];
          row[i] = rounded<T>(x1 * cos[i]) + rounded<T>(-x2 * sin[i]);
          row[i + half] = rounded<T>(x2 * cos[i]) + rounded<T>(x1 * sin[i]);
        }
        for (int64_t i = 0; i < D; ++i) y[i] = static_cast<T>(row[i]);
      }
    }
  });
}

}  // namespace

// q [Tq, Hq, D]; gate the same or undefined; k_cache, v_cache [num_blocks, block_size, Hkv, D] in q's
// dtype, contiguous; block_tables [N, max_blocks]; cu_seqlens_q [N + 1]; seq_lens_k [N] (int64 each).
// Sequence n's queries are its last cu_seqlens_q[n + 1] - cu_seqlens_q[n] positions of seq_lens_k[n].
// Returns o [Tq, Hq, D] in q's dtype.
torch::Tensor paged_attention(torch::Tensor q, c10::optional<torch::Tensor> gate, torch::Tensor k_cache,
                              torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor cu_seqlens_q,
                              torch::Tensor seq_lens_k, double scale) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              "paged_attention (cpu_fused): contiguous caches in q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && cu_seqlens_q.scalar_type() == at::kLong &&
                  seq_lens_k.scalar_type() == at::kLong,
              "paged_attention (cpu_fused): int64 block tables and lengths");
  q = q.contiguous();
  torch::Tensor g = gate.has_value() ? gate->to(q.scalar_type()).contiguous() : torch::Tensor();
  block_tables = block_tables.contiguous();
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t N = seq_lens_k.size(0), max_blocks = block_tables.size(1);
  const int64_t *cu = cu_seqlens_q.data_ptr<int64_t>(), *lengths = seq_lens_k.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  TORCH_CHECK(cu[0] == 0 && cu[N] == Tq, "paged_attention (cpu_fused): cu_seqlens_q must run from 0 to Tq = ", Tq);
  // each query's sequence and position, every block a sequence reads checked once, outside the workers
  std::vector<int64_t> query_seq(Tq), query_pos(Tq);
  int64_t max_keys = 1;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t Lq = cu[n + 1] - cu[n], Lk = lengths[n];
    TORCH_CHECK(0 <= Lq && Lq <= Lk && Lk <= max_blocks * block_size, "paged_attention: sequence ", n, " has ", Lq,
                " queries and ", Lk, " keys; its block table row holds at most ", max_blocks, " x ", block_size);
    for (int64_t b = 0; Lq > 0 && b * block_size < Lk; ++b) {
      const int64_t block = tables[n * max_blocks + b];
      TORCH_CHECK(0 <= block && block < num_blocks, "paged_attention: sequence ", n, " names block ", block,
                  " outside the cache's [0, ", num_blocks, ")");
    }
    for (int64_t t = cu[n]; t < cu[n + 1]; ++t) {
      query_seq[t] = n;
      query_pos[t] = Lk - (cu[n + 1] - t);
    }
    max_keys = std::max(max_keys, Lk);
  }
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_attention", [&] {
    attend<scalar_t>(q.data_ptr<scalar_t>(), g.defined() ? g.data_ptr<scalar_t>() : nullptr,
                     k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), tables, max_blocks, query_seq.data(),
                     query_pos.data(), Tq, Hq, Hkv, D, block_size, max_keys, static_cast<float>(scale),
                     out.data_ptr<scalar_t>());
  });
  return out;
}

// k, v [T, Hkv, D] (cast to the caches' dtype); caches [num_blocks, block_size, Hkv, D] contiguous,
// written in place; slot_mapping [T] int64, negative for padding.
void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "reshape_and_cache (cpu_fused): contiguous caches");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "reshape_and_cache (cpu_fused): int64 slots");
  k = k.to(k_cache.scalar_type()).contiguous();
  v = v.to(v_cache.scalar_type()).contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t T = k.size(0), slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = k.numel() / std::max<int64_t>(T, 1) * k.element_size();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] < slots, "reshape_and_cache: slot ", slot[t], " is outside the cache's ", k_cache.size(0),
                " x ", k_cache.size(1), " slots");
  }
  const char *ks = static_cast<const char*>(k.data_ptr()), *vs = static_cast<const char*>(v.data_ptr());
  char *kc = static_cast<char*>(k_cache.data_ptr()), *vc = static_cast<char*>(v_cache.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0) continue;
    std::memcpy(kc + slot[t] * row_bytes, ks + t * row_bytes, row_bytes);
    std::memcpy(vc + slot[t] * row_bytes, vs + t * row_bytes, row_bytes);
  }
}

// q [T, Hq, D] and k [T, Hkv, D] in one dtype (any strides over tokens and heads, each head's D values
// contiguous); q_weight, k_weight [D] (zero-centred: the scale is 1 + w); positions [T] int64; inv_freq
// [rotary_dim / 2] fp32. Returns [T, Hq + Hkv, D] in q's dtype: q's heads normed and rotated, then k's.
torch::Tensor qk_norm_rope(torch::Tensor q, torch::Tensor k, torch::Tensor q_weight, torch::Tensor k_weight,
                           torch::Tensor positions, torch::Tensor inv_freq, double eps) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.scalar_type() == k.scalar_type(),
              "qk_norm_rope (cpu_fused): q [T, Hq, D] and k [T, Hkv, D] in one dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && inv_freq.scalar_type() == at::kFloat,
              "qk_norm_rope (cpu_fused): int64 positions and fp32 inverse frequencies");
  if (q.stride(2) != 1) q = q.contiguous();
  if (k.stride(2) != 1) k = k.contiguous();
  positions = positions.contiguous();
  inv_freq = inv_freq.contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), H = Hq + Hkv;
  const int64_t half = inv_freq.numel(), rotary_dim = 2 * half;
  TORCH_CHECK(0 < rotary_dim && rotary_dim <= D, "qk_norm_rope (cpu_fused): rotary_dim ", rotary_dim,
              " must be in (0, D = ", D, "]");
  q_weight = q_weight.to(at::kFloat).contiguous();
  k_weight = k_weight.to(at::kFloat).contiguous();
  auto out = torch::empty({T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* freq = inv_freq.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "qk_norm_rope", [&] {
    norm_rope_rows<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), k.data_ptr<scalar_t>(), k.stride(0),
                             k.stride(1), q_weight.data_ptr<float>(), k_weight.data_ptr<float>(), pos, freq, out.data_ptr<scalar_t>(), T, Hq, Hkv, D, half,
                             static_cast<float>(eps));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "causal attention over paged KV caches, gated, one op");
  m.def("reshape_and_cache", &reshape_and_cache, "new keys and values into their cache slots");
  m.def("qk_norm_rope", &qk_norm_rope, "q and k heads RMS-normed and partially rotated, one op");
}
