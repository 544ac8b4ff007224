// The two small steps that stitch chunks swept in parallel back into one sequence.
//
// gla_state_scan: from each chunk's local end state (its tokens swept from a zero state) and
// the product of its decays, the state entering every chunk, in place:
//     enter_n = decay_{n-1} ⊙ enter_{n-1} + local_{n-1}     (in the sweep's own time order)
// One thread per (sequence, direction, state element) walks the N chunks; loads are issued a
// batch ahead so the walk is not N round trips to memory.
//
// gla_gate_total_scan, then gla_gate_grad_fixup: backward_dk (and the tensor-core dk walk)
// sum gate gradients only within a chunk; the scan replaces each chunk's total by what the
// chunks swept before it (in that direction's reversed time) contribute, in the same order a
// single sequential sweep would have added them, and the fixup adds that to every token.
//
// Given `flags` (gla_chunk_backward.cu), the state scan runs only the flagged sequences.
#include "gla_common.cuh"

namespace gla {

constexpr int kScanBatch = 8;

__global__ void gla_state_scan(GLA_KERNEL_PARAMS) {
  GLA_COLLECT_PARAMS;
  const i64 kv = p.K * p.V;
  const i64 e = (i64)blockIdx.y * blockDim.x + threadIdx.x;
  if (e >= kv) return;
  const i64 bh = blockIdx.x / 2;
  const int group = blockIdx.x % 2;
  if (p.bidirectional == 0 && group == 1) return;
  if (p.flags && !flagged(p.flags, bh)) return;
  const bool adjoint = p.lambda_scan != 0;
  const bool ascending = adjoint ? group == 1 : group == 0;
  const int N = (int)p.n_chunks;
  const i64 k = e / p.V;

  float state = 0.0f;
  if (group == 0 && p.bidirectional == 0) {
    const u64 init = adjoint ? p.ds_final : p.s0;
    if (init) state = in_ptr<float>(init)[bh * kv + e];
  }
  float* enter = out_ptr<float>(p.enter) + (bh * 2 + group) * N * kv + e;
  const float* decay = in_ptr<float>(p.decay) + (bh * 2 + group) * N * p.K + k;

  for (int base = 0; base < N; base += kScanBatch) {
    float local[kScanBatch], factor[kScanBatch];
#pragma unroll
    for (int s = 0; s < kScanBatch; ++s) {
      const int step = base + s;
      const int n = ascending ? step : N - 1 - step;
      // the last chunk in sweep order has no local state (nothing comes after it)
      const bool has_local = step < N - 1;
      local[s] = has_local ? enter[n * kv] : 0.0f;
      factor[s] = has_local ? decay[n * p.K] : 0.0f;
    }
#pragma unroll
    for (int s = 0; s < kScanBatch; ++s) {
      const int step = base + s;
      if (step >= N) break;
      const int n = ascending ? step : N - 1 - step;
      enter[n * kv] = state;
      state = fmaf(factor[s], state, local[s]);
    }
  }
}

__global__ void gla_gate_total_scan(GLA_KERNEL_PARAMS) {
  GLA_COLLECT_PARAMS;
  const i64 k = (i64)blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= p.K) return;
  const i64 bh = blockIdx.x / 2;
  const int group = blockIdx.x % 2;
  if (p.bidirectional == 0 && group == 1) return;
  const int N = (int)p.n_chunks;
  float running = 0.0f;
  if (group == 0 && p.bidirectional == 0 && p.final_term != 0) running = in_ptr<float>(p.final_term)[bh * p.K + k];
  float* total = out_ptr<float>(p.dg_total) + (bh * 2 + group) * N * p.K + k;
  // the forward direction's adjoint runs backwards in time, the reverse direction's forwards
  for (int step = 0; step < N; ++step) {
    const int n = group == 0 ? N - 1 - step : step;
    const float own = total[n * p.K];
    total[n * p.K] = running;
    running += own;
  }
}

// grid: (B * H * 2, chunks); one block per sequence, direction and chunk, so that the index
// arithmetic per token is one 32-bit division (64-bit divisions per element cost ~60 µs at
// ViG-T's 1024 px)
template <class T>
__global__ void gla_gate_grad_fixup(GLA_KERNEL_PARAMS) {
  GLA_COLLECT_PARAMS;
  const i64 bh = blockIdx.x / 2;
  const int group = blockIdx.x % 2;
  if (p.bidirectional == 0 && group == 1) return;
  const int n = blockIdx.y;
  const i64 b = bh / p.H, h = bh % p.H;
  const i64 t0 = (i64)n * p.chunk_len;
  const int tokens = (int)(p.T - t0 < p.chunk_len ? p.T - t0 : p.chunk_len);
  const int K = (int)p.K;
  // what the chunks before this one contribute (gla_gate_total_scan)
  const float* offset = in_ptr<float>(p.dg_total) + ((bh * 2 + group) * p.n_chunks + n) * p.K;
  const i64 first = ((b * p.T + t0) * p.H + h) * p.K;  // token t0's element 0
  const i64 row = p.H * p.K;
  const float* local = in_ptr<float>(p.dg_ws) + group * p.B * p.T * row + first;
  T* out = out_ptr<T>(group == 0 ? p.dg : p.dg_rev) + first;
  for (int i = threadIdx.x; i < tokens * K; i += blockDim.x) {
    const int t = i / K, k = i - t * K;
    out[t * row + k] = from_float<T>(local[t * row + k] + offset[k]);
  }
}

}  // namespace gla
