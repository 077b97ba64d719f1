// Dot products of bf16 weight rows with fp32 vectors, shared by the CPU ops that multiply bf16
// weights (kernels/moe/cpu_fused.cpp's experts, kernels/linear/cpu_fused.cpp's projections).
//
// One order of additions everywhere: 16 independent partial sums (one AVX-512 register, two AVX2
// registers, or a plain array), then a fixed halving tree; the vector forms fuse each multiply-add,
// the portable loop rounds the product first. A dot product's value does not depend on how many
// other vectors are dotted with the same weight row at once: a row's result is the same whatever
// else is in its batch.
#pragma once

#include <c10/util/BFloat16.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace bf16_dots {

using bf16 = c10::BFloat16;

// Vectors dotted together against one weight row: the row is loaded once per block of them.
constexpr int kBlock = 4;

// bf16 -> fp32 is the 16 bits moved to the top: written on the raw bits so the compiler vectorizes it
inline float widen(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The portable dot product: 16 independent partial sums, then a fixed tree.
inline float dot(const bf16* w, const float* x, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(w);
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += widen(bits[i + l]) * x[i + l];
  }
  for (; i < n; ++i) acc[i % 16] += widen(bits[i]) * x[i];
  for (int width = 8; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

#if defined(__AVX512F__)
// 16 bf16 weights as 16 fp32 lanes
inline __m512 load_bf16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// V dot products of one weight row (n a multiple of 16) on AVX-512: one fp32 accumulator register per
// vector, each weight chunk loaded and widened once for all V. A vector's sum does not depend on V.
template <int V>
inline void dots_vector(const bf16* w, const float* const* xs, int64_t n, float* out) {
  __m512 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 wv = load_bf16(w + i);
    for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[v] + i), acc[v]);
  }
  for (int v = 0; v < V; ++v) out[v] = _mm512_reduce_add_ps(acc[v]);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// 8 bf16 weights as 8 fp32 lanes
inline __m256 load_bf16_avx2(const bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// The AVX-512 form's 16 partial sums on a CPU with 8-wide vectors (AVX2, e.g. AMD Zen 2 and 3): lanes
// 0-7 and 8-15 in two registers per vector, each lane's sum in the same order, then the same halving
// tree (the two halves added first). Without it gcc leaves the portable loop scalar.
template <int V>
inline void dots_vector(const bf16* w, const float* const* xs, int64_t n, float* out) {
  __m256 lo[V], hi[V];
  for (int v = 0; v < V; ++v) lo[v] = hi[v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m256 w_lo = load_bf16_avx2(w + i), w_hi = load_bf16_avx2(w + i + 8);
    for (int v = 0; v < V; ++v) {
      lo[v] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xs[v] + i), lo[v]);
      hi[v] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xs[v] + i + 8), hi[v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    alignas(32) float acc[8];
    _mm256_store_ps(acc, _mm256_add_ps(lo[v], hi[v]));
    for (int width = 4; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    }
    out[v] = acc[0];
  }
}
#endif

// out[v] = w . xs[v] for v < count (count <= kBlock), w a bf16 row of n.
inline void row_dots(const bf16* w, const float* const* xs, int count, int64_t n, float* out) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (n % 16 == 0) {
    switch (count) {
      case 4: dots_vector<4>(w, xs, n, out); return;
      case 3: dots_vector<3>(w, xs, n, out); return;
      case 2: dots_vector<2>(w, xs, n, out); return;
      default: dots_vector<1>(w, xs, n, out); return;
    }
  }
#endif
  for (int v = 0; v < count; ++v) out[v] = dot(w, xs[v], n);
}

}  // namespace bf16_dots
