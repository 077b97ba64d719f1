// The data movement around the grouped form's two batched matmuls (cpu.py's grouped_expert_ffn), CPU.
//
// The grouped form sorts a prefill's token slots by expert into one zero-padded [E, width, H] batch,
// runs the gate/up and down products as two bmm calls (oneDNN: AMX or AVX-512 where the CPU has
// them), and sums each token's k expert outputs. The bmm calls are a fifth of its time in torch ops;
// the rest is the sort, gathers, SwiGLU and the weighted sum as a dozen ops over tensors of
// millions of elements. These three ops do that part in one pass each:
//
// - gather_by_expert: a counting sort of the slots by expert (stable: slot order within an expert,
//   as torch.argsort(stable=True) gives), each slot's hidden row copied to its place; rows past an
//   expert's count are zeros. Slots of other shards (id -1) get no place.
// - swiglu: silu(gate) rounded to the activation dtype, times up, rounded: naive.py's two roundings
//   (silu's exp from ../cpu_simd.h, within ~2 ulp of torch's).
// - combine: per token, the fp32 sum over its slots in slot order of weight * expert output, the
//   slots without a place skipped (naive.py's exact zeros), rounded once to the output dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../cpu_simd.h"

namespace {

template <typename T>
void swiglu_rows(const T* gate_up, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T *gate = gate_up + r * 2 * I, *up = gate + I;
      T* y = out + r * I;
      int64_t i = 0;
#ifdef NEXTSERVE_SIMD
      if constexpr (simd::takes<T>) for (; i + simd::kWidth <= I; i += simd::kWidth) {
        const __m512 activated = simd::round_to<T>(simd::silu(simd::load(gate + i)));
        simd::store(y + i, _mm512_mul_ps(activated, simd::load(up + i)));
      }
#endif
      for (; i < I; ++i) {
        const float g = static_cast<float>(gate[i]);
        const T activated = static_cast<T>(g / (1.f + std::exp(-g)));
        y[i] = static_cast<T>(static_cast<float>(activated) * static_cast<float>(up[i]));
      }
    }
  });
}

template <typename T, typename Out>
void combine_rows(const T* per_place, const int64_t* place, const float* weight, Out* out, int64_t tokens,
                  int64_t k, int64_t H) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = place[t * k + j];
        if (p < 0) continue;  // another shard's slot: naive.py adds an exact zero for it
        const T* row = per_place + p * H;
        const float w = weight[t * k + j];
        int64_t i = 0;
#ifdef NEXTSERVE_SIMD
        if constexpr (simd::takes<T>) {
          const __m512 wv = _mm512_set1_ps(w);
          for (; i + simd::kWidth <= H; i += simd::kWidth) {
            const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(acc.data() + i), _mm512_mul_ps(wv, simd::load(row + i)));
            _mm512_storeu_ps(acc.data() + i, sum);
          }
        }
#endif
        for (; i < H; ++i) acc[i] += w * static_cast<float>(row[i]);
      }
      Out* y = out + t * H;
      int64_t i = 0;
#ifdef NEXTSERVE_SIMD
      if constexpr (simd::takes<Out>) for (; i + simd::kWidth <= H; i += simd::kWidth) simd::store(y + i, _mm512_loadu_ps(acc.data() + i));
#endif
      for (; i < H; ++i) y[i] = static_cast<Out>(acc[i]);
    }
  });
}

}  // namespace

// hidden [T, H]; expert_ids [T, k] int64 (-1: another shard's slot); E local experts; width >= the
// busiest expert's slot count. Returns rows [E, width, H] in hidden's dtype and place [T, k] int64:
// the row of rows.view(E * width, H) each slot's product lands in, -1 for other shards' slots.
std::vector<torch::Tensor> gather_by_expert(torch::Tensor hidden, torch::Tensor expert_ids, int64_t E, int64_t width) {
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong, "gather_by_expert: int64 expert ids");
  hidden = hidden.contiguous();
  expert_ids = expert_ids.contiguous();
  const int64_t T = expert_ids.size(0), k = expert_ids.size(1), H = hidden.size(1);
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  auto place = torch::empty({T, k}, expert_ids.options());
  int64_t* where = place.data_ptr<int64_t>();
  std::vector<int64_t> filled(E, 0), token_of(E * width, -1);
  for (int64_t s = 0; s < T * k; ++s) {
    const int64_t e = ids[s];
    TORCH_CHECK(e < E, "gather_by_expert: expert id ", e, " outside the shard's ", E, " experts");
    if (e < 0) {
      where[s] = -1;
      continue;
    }
    TORCH_CHECK(filled[e] < width, "gather_by_expert: expert ", e, " has more than width = ", width, " slots");
    where[s] = e * width + filled[e];
    token_of[where[s]] = s / k;
    ++filled[e];
  }
  auto rows = torch::empty({E, width, H}, hidden.options());
  const int64_t row_bytes = H * hidden.element_size();
  const char* source = static_cast<const char*>(hidden.data_ptr());
  char* target = static_cast<char*>(rows.data_ptr());
  at::parallel_for(0, E * width, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (token_of[r] >= 0) {
        std::memcpy(target + r * row_bytes, source + token_of[r] * row_bytes, row_bytes);
      } else {
        std::memset(target + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return {rows, place};
}

// gate_up [..., 2I] (gate first): returns silu(gate) * up [..., I] in gate_up's dtype.
torch::Tensor swiglu(torch::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  const int64_t two_I = gate_up.size(-1), rows = gate_up.numel() / two_I;
  TORCH_CHECK(two_I % 2 == 0, "swiglu: the last dim holds gate and up, so it must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = two_I / 2;
  auto out = torch::empty(sizes, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "swiglu", [&] {
    swiglu_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, two_I / 2);
  });
  return out;
}

// per_place [P, H] (the experts' outputs by place); place [T, k] int64 from gather_by_expert; weight
// [T, k] fp32. Returns [T, H] in out_dtype (fp32 or per_place's dtype).
torch::Tensor combine(torch::Tensor per_place, torch::Tensor place, torch::Tensor weight, at::ScalarType out_dtype) {
  TORCH_CHECK(place.scalar_type() == at::kLong && weight.scalar_type() == at::kFloat,
              "combine: int64 places and fp32 weights");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == per_place.scalar_type(),
              "combine: the output is fp32 or the experts' dtype");
  per_place = per_place.contiguous();
  place = place.contiguous();
  weight = weight.contiguous();
  const int64_t T = place.size(0), k = place.size(1), H = per_place.size(-1);
  auto out = torch::empty({T, H}, per_place.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, per_place.scalar_type(), "combine", [&] {
    if (out_dtype == at::kFloat) {
      combine_rows<scalar_t, float>(per_place.data_ptr<scalar_t>(), place.data_ptr<int64_t>(),
                                    weight.data_ptr<float>(), out.data_ptr<float>(), T, k, H);
    } else {
      combine_rows<scalar_t, scalar_t>(per_place.data_ptr<scalar_t>(), place.data_ptr<int64_t>(),
                                       weight.data_ptr<float>(), out.data_ptr<scalar_t>(), T, k, H);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_by_expert", &gather_by_expert, "token slots sorted by expert into a zero-padded batch");
  m.def("swiglu", &swiglu, "silu(gate) * up with naive.py's roundings");
  m.def("combine", &combine, "each token's weighted sum over its expert outputs, in slot order, fp32");
}
