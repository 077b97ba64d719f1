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
//
// chunk_steps below is the prefill form: naive_chunk_gated_delta_rule's WY/UT math, 64 tokens at a
// time, one (sequence, value head) per work item with its chunks in order and its state in place.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// ---- the chunked prefill ----------------------------------------------------------------------------
//
// Per chunk of BT = 64 tokens (a shorter last chunk is padded with q = k = v = 0, g = 0, beta = 0,
// which leaves the state unchanged, as in naive.py), with G the cumulative sum of g from the chunk's
// start and Γ_ij = exp(G_i - G_j) for j <= i:
//     L     = strictly_lower(diag(beta) (K K^T ⊙ Γ))
//     V_new = (I + L)^-1 (beta ⊙ (V - e^G ⊙ K S))         (naive.py's u - w S, one solve instead of two)
//     O     = e^G ⊙ (Q S) + causal(Q K^T ⊙ Γ) V_new
//     S    <- e^{G_last} S + (K ⊙ e^{G_last - G})^T V_new
// The products are blocked matmuls on buffers that stay in L1/L2 (fused multiply-adds, sums in
// another order than torch's), so this agrees with naive.py to the tolerance of its fp32 sums.
// Γ is e^{G_i} e^{-G_j} (2 BT exps) where G stays above kProductFloor over the chunk, so that both
// factors are normal floats; past it (a state decayed by more than e^-60 inside one chunk), one exp
// per pair as naive.py computes it.

namespace {

constexpr int64_t kChunk = 64;
constexpr float kProductFloor = -60.f;

// C[M x N] = (accumulate ? C : 0) + A[M x Kd] B[Kd x N], all row-major with leading dimensions.
// With lower, A is lower triangular (A[i][k] = 0 for k > i) and those terms are skipped.
void gemm(int64_t M, int64_t N, int64_t Kd, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate, bool lower = false) {
  int64_t i = 0;
#if defined(__AVX512F__)
  // 4 rows x 64 columns of C in 16 registers: per k, four loads of B and sixteen multiply-adds
  for (; i + 4 <= M; i += 4) {
    const int64_t k_end = lower ? std::min(Kd, i + 4) : Kd;
    int64_t j = 0;
    for (; j + 64 <= N; j += 64) {
      __m512 c[4][4];
      for (int r = 0; r < 4; ++r)
        for (int u = 0; u < 4; ++u)
          c[r][u] = accumulate ? _mm512_loadu_ps(C + (i + r) * ldc + j + 16 * u) : _mm512_setzero_ps();
      for (int64_t k = 0; k < k_end; ++k) {
        const float* b = B + k * ldb + j;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
                     b3 = _mm512_loadu_ps(b + 48);
        for (int r = 0; r < 4; ++r) {
          const __m512 a = _mm512_set1_ps(A[(i + r) * lda + k]);
          c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
          c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
          c[r][2] = _mm512_fmadd_ps(a, b2, c[r][2]);
          c[r][3] = _mm512_fmadd_ps(a, b3, c[r][3]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int u = 0; u < 4; ++u) _mm512_storeu_ps(C + (i + r) * ldc + j + 16 * u, c[r][u]);
    }
    for (int r = 0; r < 4 && j < N; ++r) {  // columns past the last block of 64
      float* c = C + (i + r) * ldc;
      for (int64_t jj = j; jj < N; ++jj) c[jj] = accumulate ? c[jj] : 0.f;
      for (int64_t k = 0; k < k_end; ++k) {
        const float a = A[(i + r) * lda + k];
        const float* b = B + k * ldb;
        for (int64_t jj = j; jj < N; ++jj) c[jj] = std::fma(a, b[jj], c[jj]);
      }
    }
  }
#endif
  for (; i < M; ++i) {
    const int64_t k_end = lower ? std::min(Kd, i + 1) : Kd;
    float* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.f);
    for (int64_t k = 0; k < k_end; ++k) {
      const float a = A[i * lda + k];
      const float* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] = std::fma(a, b[j], c[j]);
    }
  }
}

// X = (I - Lneg)^-1 X in place for X [BT x N], Lneg strictly lower [BT x BT] (the solve's negated L):
// forward substitution, four rows at a time: the rows above a block enter through one gemm, the
// block's own triangle row by row.
void forward_substitute(const float* Lneg, float* X, int64_t N) {
  for (int64_t i = 0; i < kChunk; i += 4) {
    if (i > 0) gemm(4, N, i, Lneg + i * kChunk, kChunk, X, N, X + i * N, N, /*accumulate=*/true);
    for (int64_t r = 1; r < 4; ++r) {
      float* x = X + (i + r) * N;
      for (int64_t s = 0; s < r; ++s) {
        const float l = Lneg[(i + r) * kChunk + i + s];
        const float* y = X + (i + s) * N;
        for (int64_t j = 0; j < N; ++j) x[j] = std::fma(l, y[j], x[j]);
      }
    }
  }
}

}  // namespace

// q, k [T, Hk, K]; v [T, Hv, V]; g, beta [T, Hv] (fp32, gates already applied: naive.gdn_gating);
// cu_seqlens [N + 1] int64 (N sequences packed along T); pool [S, Hv, K, V] fp32, sequence n starting
// from and ending in pool[slots[n]] (int64, distinct). Returns o [T, Hv, V] fp32 and, with
// keep_chunk_states, the state after every full chunk of every sequence [sum_n L_n / 64, Hv, K, V] in
// order of sequence then position (else an empty tensor).
std::vector<torch::Tensor> chunk_steps(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g,
                                       torch::Tensor beta, torch::Tensor cu_seqlens, torch::Tensor pool,
                                       torch::Tensor slots, double scale, bool use_qk_l2norm, bool keep_chunk_states) {
  TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous(), "chunk_steps: a contiguous fp32 pool");
  TORCH_CHECK(slots.scalar_type() == at::kLong && cu_seqlens.scalar_type() == at::kLong,
              "chunk_steps: int64 slots and cu_seqlens");
  auto qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous(), vf = v.to(at::kFloat).contiguous();
  auto gf = g.to(at::kFloat).contiguous(), bf = beta.to(at::kFloat).contiguous();
  slots = slots.contiguous();
  cu_seqlens = cu_seqlens.contiguous();
  const int64_t T = qf.size(0), Hk = qf.size(1), K = qf.size(2), Hv = vf.size(1), V = vf.size(2);
  const int64_t N = slots.size(0), S = pool.size(0);
  TORCH_CHECK(cu_seqlens.size(0) == N + 1, "chunk_steps: cu_seqlens [N + 1] for N = ", N, " slots");
  TORCH_CHECK(pool.size(1) == Hv && pool.size(2) == K && pool.size(3) == V && Hv % Hk == 0,
              "chunk_steps: pool [S, Hv, K, V] disagrees with q, k [T, Hk, K] and v [T, Hv, V]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* offsets = cu_seqlens.data_ptr<int64_t>();
  std::vector<int64_t> first_full(N + 1, 0);  // index of sequence n's first full-chunk state
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(0 <= slot[n] && slot[n] < S, "chunk_steps: slot ", slot[n], " outside the pool of ", S);
    TORCH_CHECK(offsets[n] <= offsets[n + 1], "chunk_steps: cu_seqlens must not decrease");
    first_full[n + 1] = first_full[n] + (offsets[n + 1] - offsets[n]) / kChunk;
  }
  TORCH_CHECK(offsets[0] == 0 && offsets[N] == T, "chunk_steps: cu_seqlens must run from 0 to T = ", T);
  auto o = torch::empty({T, Hv, V}, qf.options());  // the sequences cover [0, T): every row is written
  auto chunk_states = torch::empty({keep_chunk_states ? first_full[N] : 0, Hv, K, V}, qf.options());
  const float *qp = qf.data_ptr<float>(), *kp = kf.data_ptr<float>(), *vp = vf.data_ptr<float>();
  const float *gp = gf.data_ptr<float>(), *bp = bf.data_ptr<float>();
  float* pp = pool.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* cp = keep_chunk_states ? chunk_states.data_ptr<float>() : nullptr;
  const int64_t group = Hv / Hk, BT = kChunk;
  const float qscale = static_cast<float>(scale);

  at::parallel_for(0, N * Hv, 1, [&](int64_t begin, int64_t end) {
    // per chunk: [q; k] rows [2BT x K], k transposed [K x BT], their products with k^T [2BT x BT] and
    // with S [2BT x V], V_new [BT x V], the solve's and the output's triangles [BT x BT]
    std::vector<float> buffer(2 * BT * K + K * BT + 2 * BT * BT + 2 * BT * V + BT * V + 2 * BT * BT + 4 * BT);
    float *qk_rows = buffer.data(), *k_cols = qk_rows + 2 * BT * K, *dots = k_cols + K * BT;
    float *with_state = dots + 2 * BT * BT, *v_new = with_state + 2 * BT * V, *l_neg = v_new + BT * V;
    float *causal = l_neg + BT * BT, *G = causal + BT * BT, *eG = G + BT, *inv_eG = eG + BT, *gb = inv_eG + BT;
    float *k_rows = qk_rows + BT * K;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / Hv, h = item % Hv, hk = h / group;
      float* state = pp + (slot[n] * Hv + h) * K * V;
      const int64_t start = offsets[n], length = offsets[n + 1] - start;
      for (int64_t c = 0; c * BT < length; ++c) {
        const int64_t t0 = start + c * BT, L = std::min(BT, length - c * BT);
        // the chunk's rows, normalised and scaled; padding rows are zeros
        std::fill(qk_rows, qk_rows + 2 * BT * K, 0.f);
        std::fill(v_new, v_new + BT * V, 0.f);
        float running = 0.f;
        for (int64_t t = 0; t < BT; ++t) {
          if (t < L) {
            const int64_t token = t0 + t;
            const float* q_row = qp + (token * Hk + hk) * K;
            const float* k_row = kp + (token * Hk + hk) * K;
            if (use_qk_l2norm) {
              l2norm(q_row, K, qscale, qk_rows + t * K);
              l2norm(k_row, K, 1.f, k_rows + t * K);
            } else {
              for (int64_t i = 0; i < K; ++i) { qk_rows[t * K + i] = q_row[i] * qscale; k_rows[t * K + i] = k_row[i]; }
            }
            running += gp[token * Hv + h];
            gb[t] = bp[token * Hv + h];
          } else {
            gb[t] = 0.f;
          }
          G[t] = running;
          eG[t] = std::exp(running);
        }
        const float G_last = G[BT - 1];
        const bool product = G_last >= kProductFloor;  // G never increases (g <= 0), so G_last is its least
        for (int64_t t = 0; t < BT; ++t) inv_eG[t] = product ? std::exp(-G[t]) : 0.f;
        for (int64_t t = 0; t < BT; ++t)
          for (int64_t i = 0; i < K; ++i) k_cols[i * BT + t] = k_rows[t * K + i];
        // [q; k] k^T and [q; k] S in one product each
        gemm(2 * BT, BT, K, qk_rows, K, k_cols, BT, dots, BT, false);
        gemm(2 * BT, V, K, qk_rows, K, state, V, with_state, V, false);
        const float *qk_dots = dots, *kk_dots = dots + BT * BT;
        for (int64_t i = 0; i < BT; ++i) {
          for (int64_t j = 0; j < BT; ++j) {
            float gamma = 0.f;
            if (j <= i) gamma = product ? eG[i] * inv_eG[j] : std::exp(G[i] - G[j]);
            causal[i * BT + j] = qk_dots[i * BT + j] * gamma;
            l_neg[i * BT + j] = j < i ? -(gb[i] * kk_dots[i * BT + j] * gamma) : 0.f;
          }
        }
        // V_new = (I + L)^-1 beta (V - e^G K S)
        const float* kS = with_state + BT * V;
        for (int64_t t = 0; t < L; ++t) {
          const float* v_row = vp + ((t0 + t) * Hv + h) * V;
          for (int64_t j = 0; j < V; ++j) v_new[t * V + j] = gb[t] * (v_row[j] - eG[t] * kS[t * V + j]);
        }
        forward_substitute(l_neg, v_new, V);
        // O = e^G Q S + causal V_new, written for the chunk's real rows
        float* qS = with_state;
        for (int64_t t = 0; t < BT; ++t)
          for (int64_t j = 0; j < V; ++j) qS[t * V + j] *= eG[t];
        gemm(BT, V, BT, causal, BT, v_new, V, qS, V, true, /*lower=*/true);
        for (int64_t t = 0; t < L; ++t) std::memcpy(op + ((t0 + t) * Hv + h) * V, qS + t * V, sizeof(float) * V);
        // S <- e^{G_last} S + (K e^{G_last - G})^T V_new
        for (int64_t t = 0; t < BT; ++t) {
          const float decay = std::exp(G_last - G[t]);
          for (int64_t i = 0; i < K; ++i) k_cols[i * BT + t] *= decay;
        }
        const float state_decay = std::exp(G_last);
        for (int64_t i = 0; i < K * V; ++i) state[i] *= state_decay;
        gemm(K, V, BT, k_cols, BT, v_new, V, state, V, true);
        if (cp != nullptr && L == BT) std::memcpy(cp + ((first_full[n] + c) * Hv + h) * K * V, state, sizeof(float) * K * V);
      }
    }
  });
  return {o, chunk_states};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("recurrent_steps", &recurrent_steps, "the gated delta rule for a few tokens per sequence, states in place by slot");
  m.def("chunk_steps", &chunk_steps, "the chunked gated delta rule for prefill, states in place by slot");
}
