// The routed experts of a few tokens in one pass over their weights (bf16, CPU).
//
// naive.py's numerics, product by product: each (token, expert) slot's gate and up products are
// fp32 dot products rounded to bf16, SwiGLU is silu(gate) rounded to bf16 times up rounded to bf16,
// the down product is an fp32 dot product rounded to bf16, and the weighted sum over a token's k
// slots accumulates in fp32 in slot order. Only the order of the additions inside each dot product
// differs from oneDNN's (16 partial sums, fused multiply-adds on AVX-512 and AVX2, then a fixed
// tree), so results agree to the tolerance of a bf16 product over the reduction length; a slot's
// result does not depend on which other slots share its expert or its block.
//
// Why: at decode sizes the torch forms either copy each slot's expert weights before multiplying
// (the gathered form: three passes over the bytes), run ~5 ops per active expert (the loop), or
// multiply every expert (dense). Here each active expert's weight rows are read once, straight from
// the [E, 2I, H] and [E, H, I] tensors, and reused across all slots routed to that expert while the
// row is in L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../cpu_dots.h"

namespace {

using namespace bf16_dots;  // bf16, kBlock, row_dots

inline float round_bf16(float v) { return static_cast<float>(bf16(v)); }

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

}  // namespace

// hidden [T, H] bf16; expert_ids [T, k] int64 (-1: an expert another shard holds); expert_weights
// [T, k] fp32; w13 [E, 2I, H] bf16 (gate rows, then up rows); w2 [E, H, I] bf16. Returns [T, H] fp32.
torch::Tensor expert_ffn(torch::Tensor hidden, torch::Tensor expert_ids, torch::Tensor expert_weights,
                         torch::Tensor w13, torch::Tensor w2) {
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && w13.scalar_type() == at::kBFloat16 &&
                  w2.scalar_type() == at::kBFloat16, "expert_ffn (cpu_fused): bf16 hidden and weights");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && expert_weights.scalar_type() == at::kFloat,
              "expert_ffn (cpu_fused): int64 ids and fp32 weights");
  hidden = hidden.contiguous();
  expert_ids = expert_ids.contiguous();
  expert_weights = expert_weights.contiguous();
  w13 = w13.contiguous();
  w2 = w2.contiguous();
  const int64_t T = hidden.size(0), H = hidden.size(1), k = expert_ids.size(1);
  const int64_t E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I && w13.size(2) == H,
              "expert_ffn (cpu_fused): w13 [E, 2I, H] and w2 [E, H, I] disagree with hidden [T, H]");

  // The local slots grouped by expert (counting sort; slot order kept inside each expert).
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t s = 0; s < T * k; ++s) {
    TORCH_CHECK(ids[s] < E, "expert_ffn (cpu_fused): expert id ", ids[s], " out of range for E_local=", E);
    if (ids[s] >= 0) ++start[ids[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t S = start[E];
  std::vector<int64_t> slot_of(S), row_of_slot(T * k, -1), fill(start.begin(), start.end() - 1);
  for (int64_t s = 0; s < T * k; ++s) {
    if (ids[s] >= 0) {
      row_of_slot[s] = fill[ids[s]]++;
      slot_of[row_of_slot[s]] = s;
    }
  }
  std::vector<int64_t> active;  // experts with slots, so the parallel loops skip idle ones
  for (int64_t e = 0; e < E; ++e) if (start[e + 1] > start[e]) active.push_back(e);
  const int64_t A = static_cast<int64_t>(active.size());

  auto out = torch::zeros({T, H}, hidden.options().dtype(at::kFloat));
  if (S == 0) return out;
  auto x = hidden.to(at::kFloat);  // each token's row once in fp32: the dot products' right side
  const float* xp = x.data_ptr<float>();
  const bf16* w13p = w13.data_ptr<bf16>();
  const bf16* w2p = w2.data_ptr<bf16>();
  std::vector<float> act(S * I), down(S * H);  // per grouped slot: SwiGLU output, down product (bf16 values)

  // gate/up: one work item per (active expert, intermediate row); the two weight rows stay in L1
  // across the expert's slots.
  at::parallel_for(0, A * I, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = active[item / I], i = item % I;
      const bf16* gate_row = w13p + (e * 2 * I + i) * H;
      const bf16* up_row = w13p + (e * 2 * I + I + i) * H;
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kBlock) {
        const int count = static_cast<int>(std::min<int64_t>(kBlock, start[e + 1] - r0));
        const float* xs[kBlock];
        float gate[kBlock], up[kBlock];
        for (int v = 0; v < count; ++v) xs[v] = xp + (slot_of[r0 + v] / k) * H;
        row_dots(gate_row, xs, count, H, gate);
        row_dots(up_row, xs, count, H, up);
        for (int v = 0; v < count; ++v) {
          act[(r0 + v) * I + i] = round_bf16(round_bf16(silu(round_bf16(gate[v]))) * round_bf16(up[v]));
        }
      }
    }
  });
  // down: one work item per (active expert, hidden row).
  at::parallel_for(0, A * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = active[item / H], h = item % H;
      const bf16* row = w2p + (e * H + h) * I;
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kBlock) {
        const int count = static_cast<int>(std::min<int64_t>(kBlock, start[e + 1] - r0));
        const float* xs[kBlock];
        float d[kBlock];
        for (int v = 0; v < count; ++v) xs[v] = &act[(r0 + v) * I];
        row_dots(row, xs, count, I, d);
        for (int v = 0; v < count; ++v) down[(r0 + v) * H + h] = round_bf16(d[v]);
      }
    }
  });
  // the weighted sum over each token's slots, in slot order, fp32
  const float* wp = expert_weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = row_of_slot[t * k + j];
        if (r < 0) continue;  // another shard's expert: naive.py's zero row adds nothing
        const float weight = wp[t * k + j];
        for (int64_t h = 0; h < H; ++h) op[t * H + h] += weight * down[r * H + h];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("expert_ffn", &expert_ffn, "routed experts of a few tokens, one pass over their bf16 weights");
}
