// The gated delta rule for a few tokens per sequence on the CPU, gating included, states updated in
// place: a decode step (one token) or a speculative verification (the pending token and its drafts,
// keeping the state after every token).
//
// naive.py's recurrence for each token, per sequence n and value head h (key head h / (Hv / Hk)):
//     g = -exp(A_log) * softplus(a + dt_bias);  beta = sigmoid(b)
//     q, k = l2norm(q) * scale, l2norm(k)                         (eps 1e-6 inside the rsqrt)
//     S <- exp(g) S;   delta = beta (v - S^T k);   S <- S + k delta^T;   o = S^T q
// in fp32, S [K, V] read from and written back to pool[slot[n], h]. Each (sequence, head) is one
// work item running its T tokens in order: per token the state is decayed and multiplied by k in
// one pass, then updated and multiplied by q in a second while it is still in L1. The products and roundings are naive.py's
// (separate multiplies and adds, no fused multiply-add); only the order of the sums over K differs
// from the matmuls the torch path runs (here sequential in k, vectorised across V).
//
// Why: the torch form of a decode step is ~40 ops per layer (gating, norms, casts, four small matmuls,
// in-place updates), most of a DeltaNet layer's decode time at this model size.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold 20

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// x * rsqrt(sum(x^2) + eps) * scale, into out
inline void l2norm(const float* x, int64_t n, float scale, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sum + 1e-6f);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * scale;
}

}  // namespace

// q, k [N, T, Hk, K]; v [N, T, Hv, V]; a, b [N, T, Hv] (any float dtype: read as fp32); A_log, dt_bias
// [Hv]; pool [S, Hv, K, V] fp32, updated in place at slots [N] (int64, distinct). Returns o [N, T, Hv, V]
// fp32 and, with keep_all_states, the state after every token [N, T, Hv, K, V] (else an empty tensor).
std::vector<torch::Tensor> recurrent_steps(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                                           torch::Tensor b, torch::Tensor A_log, torch::Tensor dt_bias,
                                           torch::Tensor pool, torch::Tensor slots, double scale, bool use_qk_l2norm,
                                           bool keep_all_states) {
  TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous(), "recurrent_steps: a contiguous fp32 pool");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "recurrent_steps: int64 slots");
  auto qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous(), vf = v.to(at::kFloat).contiguous();
  auto af = a.to(at::kFloat).contiguous(), bf = b.to(at::kFloat).contiguous();
  auto A = A_log.to(at::kFloat).contiguous(), dt = dt_bias.to(at::kFloat).contiguous();
  slots = slots.contiguous();
  const int64_t N = qf.size(0), T = qf.size(1), Hk = qf.size(2), K = qf.size(3), Hv = vf.size(2), V = vf.size(3);
  const int64_t S = pool.size(0);
  TORCH_CHECK(pool.size(1) == Hv && pool.size(2) == K && pool.size(3) == V && Hv % Hk == 0,
              "recurrent_steps: pool [S, Hv, K, V] disagrees with q, k [N, T, Hk, K] and v [N, T, Hv, V]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(0 <= slot[n] && slot[n] < S, "recurrent_steps: slot ", slot[n], " outside the pool of ", S);
  }
  auto o = torch::empty({N, T, Hv, V}, qf.options());
  auto all_states = keep_all_states ? torch::empty({N, T, Hv, K, V}, qf.options()) : torch::empty({0}, qf.options());
  const float *qp = qf.data_ptr<float>(), *kp = kf.data_ptr<float>(), *vp = vf.data_ptr<float>();
  const float *ap = af.data_ptr<float>(), *bp = bf.data_ptr<float>(), *Ap = A.data_ptr<float>(), *dp = dt.data_ptr<float>();
  float* pp = pool.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* sp = keep_all_states ? all_states.data_ptr<float>() : nullptr;
  const int64_t group = Hv / Hk;
  const float qscale = static_cast<float>(scale);

  at::parallel_for(0, N * Hv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffers(2 * K + 2 * V);
    float *qn = buffers.data(), *kn = qn + K, *kS = kn + K, *acc = kS + V;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / Hv, h = item % Hv, hk = h / group;
      float* state = pp + (slot[n] * Hv + h) * K * V;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t token = n * T + t;
        const float* q_row = qp + (token * Hk + hk) * K;
        const float* k_row = kp + (token * Hk + hk) * K;
        if (use_qk_l2norm) {
          l2norm(q_row, K, qscale, qn);
          l2norm(k_row, K, 1.f, kn);
        } else {
          for (int64_t i = 0; i < K; ++i) { qn[i] = q_row[i] * qscale; kn[i] = k_row[i]; }
        }
        const float g = -std::exp(Ap[h]) * softplus(ap[token * Hv + h] + dp[h]);
        const float decay = std::exp(g), beta = sigmoid(bp[token * Hv + h]);
        const float* v_row = vp + (token * Hv + h) * V;
        // pass 1: decay the state and take S^T k
        for (int64_t j = 0; j < V; ++j) kS[j] = 0.f;
        for (int64_t i = 0; i < K; ++i) {
          float* row = state + i * V;
          for (int64_t j = 0; j < V; ++j) {
            row[j] *= decay;
            kS[j] += kn[i] * row[j];
          }
        }
        for (int64_t j = 0; j < V; ++j) kS[j] = beta * (v_row[j] - kS[j]);  // delta
        // pass 2: the rank-one update and S^T q
        for (int64_t j = 0; j < V; ++j) acc[j] = 0.f;
        for (int64_t i = 0; i < K; ++i) {
          float* row = state + i * V;
          for (int64_t j = 0; j < V; ++j) {
            row[j] += kn[i] * kS[j];
            acc[j] += qn[i] * row[j];
          }
        }
        float* out = op + (token * Hv + h) * V;
        for (int64_t j = 0; j < V; ++j) out[j] = acc[j];
        if (sp != nullptr) std::memcpy(sp + (token * Hv + h) * K * V, state, sizeof(float) * K * V);
      }
    }
  });
  return {o, all_states};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("recurrent_steps", &recurrent_steps, "the gated delta rule for a few tokens per sequence, states in place by slot");
}
