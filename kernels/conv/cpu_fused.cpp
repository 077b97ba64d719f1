// The causal depthwise conv1d of a prefill on the CPU in one op: sequences packed along T, conv
// states read from and written back to a pool by slot.
//
// naive.py's sum per token and channel, y[t, c] = act(sum_j w[c, j] * x_seq[p - (W - 1) + j, c]),
// positions before the sequence start reading the state (its W - 1 last inputs, oldest first): the
// same fp32 products added in the same tap order, starting from tap 0's product, then silu in fp32
// and a rounding to the activation dtype. The new state is the last W - 1 inputs of [state, sequence],
// copied exactly. Only silu's exp may differ from torch's in the last bit (../cpu_simd.h's, sixteen
// channels at a time where the CPU has AVX-512).
//
// Why: the torch form gathers every tap's rows and runs W multiply-adds over [T, C] in fp32, ~20 ops
// and W passes over a 2048-token chunk's inputs; this is one pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../cpu_simd.h"

namespace {

template <typename T>
void conv_rows(const T* x, const float* taps, T* pool, const int64_t* slot, const int64_t* offsets, int64_t N,
               int64_t C, int64_t W, bool silu, T* y) {
  const int64_t total = offsets[N];
  std::vector<int64_t> seq_of(total);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t = offsets[n]; t < offsets[n + 1]; ++t) seq_of[t] = n;
  }
  at::parallel_for(0, total, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = seq_of[t], p = t - offsets[n];
      const T* state = pool + slot[n] * C * (W - 1);  // [C, W - 1], oldest first
      for (int64_t j = 0; j < W; ++j) {
        const int64_t q = p - (W - 1) + j;  // the source position of tap j; < 0: a state column
        const float* w = taps + j * C;
        if (q >= 0) {
          const T* row = x + (offsets[n] + q) * C;
          for (int64_t c = 0; c < C; ++c) {
            const float product = w[c] * static_cast<float>(row[c]);
            acc[c] = j == 0 ? product : acc[c] + product;
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const float product = w[c] * static_cast<float>(state[c * (W - 1) + (W - 1) + q]);
            acc[c] = j == 0 ? product : acc[c] + product;
          }
        }
      }
      T* out = y + t * C;
      int64_t c = 0;
#ifdef NEXTSERVE_SIMD
      if constexpr (simd::takes<T>) for (; c + simd::kWidth <= C; c += simd::kWidth) {
        const __m512 v = _mm512_loadu_ps(acc.data() + c);
        simd::store(out + c, silu ? simd::silu(v) : v);
      }
#endif
      for (; c < C; ++c) {
        const float v = silu ? acc[c] / (1.f + std::exp(-acc[c])) : acc[c];
        out[c] = static_cast<T>(v);
      }
    }
  });
  // the new states, after every output has read the old ones: the last W - 1 of [state, sequence]
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> window((W - 1) * C);  // [W - 1, C]
    for (int64_t n = begin; n < end; ++n) {
      T* state = pool + slot[n] * C * (W - 1);
      const int64_t L = offsets[n + 1] - offsets[n];
      for (int64_t k = 0; k < W - 1; ++k) {
        const int64_t q = L - (W - 1) + k;
        for (int64_t c = 0; c < C; ++c) {
          window[k * C + c] = q >= 0 ? x[(offsets[n] + q) * C + c] : state[c * (W - 1) + (W - 1) + q];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t k = 0; k < W - 1; ++k) state[c * (W - 1) + k] = window[k * C + c];
      }
    }
  });
}

}  // namespace

// x [T, C] (fp32 or bf16); weight [C, W]; pool [S, C, W - 1] in x's dtype, contiguous, updated in
// place at slots [N] (int64, distinct); offsets [N + 1] int64 (cu_seqlens). Returns y [T, C].
torch::Tensor causal_conv1d(torch::Tensor x, torch::Tensor weight, torch::Tensor pool, torch::Tensor slots,
                            torch::Tensor offsets, bool silu) {
  TORCH_CHECK(pool.is_contiguous() && pool.scalar_type() == x.scalar_type(),
              "causal_conv1d (cpu_fused): a contiguous pool in x's dtype");
  x = x.contiguous();
  slots = slots.contiguous();
  offsets = offsets.contiguous();
  const int64_t C = x.size(1), W = weight.size(1), N = slots.size(0), S = pool.size(0);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && slots.scalar_type() == at::kLong,
              "causal_conv1d (cpu_fused): int64 slots and offsets");
  TORCH_CHECK(offsets.size(0) == N + 1 && offsets.data_ptr<int64_t>()[N] == x.size(0),
              "causal_conv1d (cpu_fused): offsets [N + 1] must end at T");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(0 <= slot[n] && slot[n] < S, "causal_conv1d (cpu_fused): slot ", slot[n], " outside the pool of ", S);
  auto taps = weight.to(at::kFloat).t().contiguous();  // [W, C]: tap j's weights side by side
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "causal_conv1d", [&] {
    conv_rows<scalar_t>(x.data_ptr<scalar_t>(), taps.data_ptr<float>(), pool.data_ptr<scalar_t>(), slot,
                        offsets.data_ptr<int64_t>(), N, C, W, silu, y.data_ptr<scalar_t>());
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_conv1d", &causal_conv1d, "prefill causal depthwise conv1d, states by slot in place");
}
