// A bf16 projection of a few rows (a decode step, a speculative verification) in one pass over the
// weight (CPU without native bf16).
//
// naive.py's contract: bf16 values multiplied exactly (each widened to fp32), summed in fp32, each
// output rounded once to bf16. Only the order of the additions inside a dot product differs from
// torch's (kernels/cpu_dots.h: 16 partial sums then a fixed tree), so results agree to the tolerance
// of a bf16 product over the input width, and a row's output does not depend on the other rows of
// its call: a verification's rows give the bits one-row decode steps would.
//
// Why: on a CPU without AVX512-BF16 torch's bf16 matmul has no fast kernel, and MKL's fp32 GEMM on a
// widened copy repacks the weight per call, so a few rows cost 2-3x one row (bench/kernels_linear.py).
// Decode is bound by reading the weight: here each weight row is read once, in bf16 (half an fp32
// copy's bytes), and dotted with every input row while it is in L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../cpu_dots.h"

namespace {

using namespace bf16_dots;  // bf16, kBlock, row_dots

// A thread's share of the weight is at least this many bytes: below it, waking a second thread
// costs more than the rows it would read.
constexpr int64_t kMinBytesPerThread = 64 * 1024;

}  // namespace

// x [R, K] bf16, weight [N, K] bf16 (contiguous) -> [R, N] bf16.
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "few_rows_linear (cpu_fused): bf16 rows and weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "few_rows_linear (cpu_fused): x [R, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "few_rows_linear (cpu_fused): a contiguous weight");
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = torch::empty({R, N}, x.options());
  if (R == 0 || N == 0) return out;
  const auto x32 = x.to(at::kFloat).contiguous();  // exact: the dot products' right side
  const float* xp = x32.data_ptr<float>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(1, K * 2));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    const float* xs[kBlock];
    float dots[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const bf16* row = wp + n * K;
      for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
        const int count = static_cast<int>(std::min<int64_t>(kBlock, R - r0));
        for (int v = 0; v < count; ++v) xs[v] = xp + (r0 + v) * K;
        row_dots(row, xs, count, K, dots);
        for (int v = 0; v < count; ++v) op[(r0 + v) * N + n] = bf16(dots[v]);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear", &few_rows_linear, "a bf16 projection of a few rows, one pass over the weight");
}
