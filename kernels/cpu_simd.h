// Vector helpers shared by the CPU ops (kernels/*/cpu_fused.cpp): sixteen floats at a time on
// AVX-512, loads and stores of fp32 and bf16, exp and silu; and a sum of squares in a fixed order.
//
// Why: gcc does not vectorise c10::BFloat16's conversions nor std::exp (glibc offers vector exp only
// under -ffast-math, which the ops do not use), so a scalar loop over a prefill's million activations
// spends most of its time converting and in exp, one element at a time.
//
// The bf16 store rounds to nearest even exactly as c10::BFloat16(float) does (NaN becomes 0x7fc0), so
// a vector loop and its scalar tail give the same bits. exp is a degree-7 polynomial after a
// reduction by ln 2 (within ~2 ulp of the exact value, like torch's own vectorised exp), so silu may
// differ from torch's in the last bit.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define NEXTSERVE_SIMD 1
#include <immintrin.h>

namespace simd {

constexpr int64_t kWidth = 16;

// the element types the loads and stores take (ops dispatched over double keep their scalar loops)
template <typename T>
constexpr bool takes = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

inline void store(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// v rounded to T's precision and back (a no-op for fp32): what storing then loading would give
template <typename T>
inline __m512 round_to(__m512 v) {
  if constexpr (sizeof(T) == 4) {
    return v;
  } else {
    alignas(64) T rounded[kWidth];
    store(rounded, v);
    return load(rounded);
  }
}

inline __m512 exp(__m512 x) {
  // max/min with the constant first return x itself when x is NaN, so NaN propagates
  x = _mm512_min_ps(_mm512_set1_ps(88.72f), _mm512_max_ps(_mm512_set1_ps(-103.97f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2 in two parts, |r| <= ln 2 / 2
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // p * 2^n, to zero or the largest float at the ends
}

// x * sigmoid(x) as x / (1 + exp(-x)), torch's form
inline __m512 silu(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

}  // namespace simd
#endif

namespace row_ops {

// The sum of squares of n floats in 16 independent partial sums (a vector's lanes on AVX-512), then a
// fixed tree: the same order with or without the vector unit, so an op's result does not depend on it.
inline float sum_of_squares(const float* x, int64_t n) {
  alignas(64) float acc[16] = {0.f};
  int64_t i = 0;
#ifdef NEXTSERVE_SIMD
  __m512 lanes = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lanes = _mm512_add_ps(lanes, _mm512_mul_ps(v, v));
  }
  _mm512_store_ps(acc, lanes);
#endif
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += x[i + l] * x[i + l];
  }
  for (; i < n; ++i) acc[i % 16] += x[i] * x[i];
  for (int width = 8; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

}  // namespace row_ops
