// The two RMSNorms on the CPU in one pass per row (fp32 or bf16 activations).
//
// naive.py's arithmetic per row of H: the residual added in the activation dtype (rounded to it),
// then in fp32 x * rsqrt(mean(x^2) + eps) times the weight ((1 + w) for the zero-centred layer norms),
// rounded back; the gated form rounds the normalised row to the activation dtype before its plain
// weight multiplies it, then multiplies by silu(z) in fp32 and rounds. Only the order of the sum of
// squares differs from torch's (16 partial sums, then a fixed tree), so results agree to the tolerance
// of an fp32 sum over H, rounded once to the activation dtype.
//
// Why: F.rms_norm and the casts around it are ~5 dispatched ops and several passes over the row; at a
// decode step's few rows the dispatch is the cost, at a prefill's thousands the passes are. The rows
// run sixteen elements at a time where the CPU has AVX-512 (../cpu_simd.h: the same roundings; the
// sum of squares' 16 partial sums are the vector's lanes), the rest one at a time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../cpu_simd.h"

namespace {

template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T>
void rms_rows(const T* x, const T* residual, const float* weight, T* y, T* sum, int64_t rows, int64_t H, float eps,
              bool zero_centered) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(H);
    for (int64_t r = begin; r < end; ++r) {
      int64_t i = 0;
#ifdef NEXTSERVE_SIMD
      if constexpr (simd::takes<T>) for (; i + simd::kWidth <= H; i += simd::kWidth) {
        __m512 v = simd::load(x + r * H + i);
        if (residual != nullptr) {
          v = _mm512_add_ps(v, simd::load(residual + r * H + i));
          simd::store(sum + r * H + i, v);
          v = simd::round_to<T>(v);
        }
        _mm512_storeu_ps(row.data() + i, v);
      }
#endif
      for (; i < H; ++i) {
        if (residual != nullptr) {
          const T added = static_cast<T>(load(x + r * H, i) + load(residual + r * H, i));  // in x's dtype
          sum[r * H + i] = added;
          row[i] = static_cast<float>(added);
        } else {
          row[i] = load(x + r * H, i);
        }
      }
      const float inv = 1.f / std::sqrt(row_ops::sum_of_squares(row.data(), H) / static_cast<float>(H) + eps);
      i = 0;
#ifdef NEXTSERVE_SIMD
      const __m512 inv_v = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.f);
      if constexpr (simd::takes<T>) for (; i + simd::kWidth <= H; i += simd::kWidth) {
        const __m512 w = zero_centered ? _mm512_add_ps(one, _mm512_loadu_ps(weight + i)) : _mm512_loadu_ps(weight + i);
        simd::store(y + r * H + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row.data() + i), inv_v), w));
      }
#endif
      for (; i < H; ++i) {
        const float w = zero_centered ? 1.f + weight[i] : weight[i];
        y[r * H + i] = static_cast<T>(row[i] * inv * w);
      }
    }
  });
}

template <typename T>
void gated_rows(const T* x, const T* z, const T* weight, T* y, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(H);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < H; ++i) row[i] = load(x + r * H, i);
      const float inv = 1.f / std::sqrt(row_ops::sum_of_squares(row.data(), H) / static_cast<float>(H) + eps);
      int64_t i = 0;
#ifdef NEXTSERVE_SIMD
      const __m512 inv_v = _mm512_set1_ps(inv);
      if constexpr (simd::takes<T>) for (; i + simd::kWidth <= H; i += simd::kWidth) {
        const __m512 normed = simd::round_to<T>(_mm512_mul_ps(_mm512_loadu_ps(row.data() + i), inv_v));
        const __m512 weighted = simd::round_to<T>(_mm512_mul_ps(simd::load(weight + i), normed));
        simd::store(y + r * H + i, _mm512_mul_ps(weighted, simd::silu(simd::load(z + r * H + i))));
      }
#endif
      for (; i < H; ++i) {
        const T normed = static_cast<T>(row[i] * inv);                      // rounded before the weight
        const T weighted = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
        const float gate = load(z + r * H, i);
        const float silu = gate / (1.f + std::exp(-gate));
        y[r * H + i] = static_cast<T>(static_cast<float>(weighted) * silu);
      }
    }
  });
}

}  // namespace

// x [rows, H] (fp32 or bf16, contiguous), residual the same or undefined, weight [H] (any float
// dtype). Returns [y] or [y, x + residual], in x's dtype.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps, bool zero_centered) {
  x = x.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / H;
  auto w = weight.to(at::kFloat).contiguous();
  auto y = torch::empty_like(x);
  torch::Tensor r, sum;
  if (residual.has_value()) {
    r = residual->to(x.scalar_type()).contiguous();
    sum = torch::empty_like(x);
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), r.defined() ? r.data_ptr<scalar_t>() : nullptr, w.data_ptr<float>(),
                       y.data_ptr<scalar_t>(), sum.defined() ? sum.data_ptr<scalar_t>() : nullptr, rows, H,
                       static_cast<float>(eps), zero_centered);
  });
  if (sum.defined()) return {y, sum};
  return {y};
}

// x, z [rows, H] (fp32 or bf16, the same dtype), weight [H]. Returns [rows, H] in x's dtype.
torch::Tensor gated_rms_norm(torch::Tensor x, torch::Tensor z, torch::Tensor weight, double eps) {
  x = x.contiguous();
  z = z.to(x.scalar_type()).contiguous();
  auto w = weight.to(x.scalar_type()).contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / H;
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_rms_norm", [&] {
    gated_rows<scalar_t>(x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                         y.data_ptr<scalar_t>(), rows, H, static_cast<float>(eps));
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm (optionally after a residual add) in one pass per row");
  m.def("gated_rms_norm", &gated_rms_norm, "the DeltaNet output norm, gated by silu(z), in one pass per row");
}
