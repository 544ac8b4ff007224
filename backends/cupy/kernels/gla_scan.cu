// The two small steps that stitch chunks swept in parallel back into one sequence.
//
// gla_state_scan: from each chunk's local end state (its tokens swept from a zero state) and
// the product of its decays, the state entering every chunk, in place:
//     enter_n = decay_{n-1} ⊙ enter_{n-1} + local_{n-1}     (in the sweep's own time order)
// One thread per (sequence, direction, state element) walks the N chunks; loads are issued a
// batch ahead so the walk is not N round trips to memory.
//
// gla_gate_grad_fixup: backward_dk (and the tensor-core dk walk) sum gate gradients only
// within a chunk and leave each chunk's total; the fixup adds to every token what the chunks
// swept before its own (in that direction's reversed time) contribute, summed in the order a
// single sequential sweep would have added them.
//
// Given `flags` (gla_chunk_backward.cu), the state scan runs only the flagged sequences.
#include "gla_common.cuh"

namespace gla {

constexpr int kScanBatch = 8;

__global__ void gla_state_scan(GLA_KERNEL_PARAMS) {
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

// four consecutive elements of an output row, stored at once
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T x[4];
};

constexpr int kFixupUnroll = 4;

// grid: (B * H * 2, chunks); one block per sequence, direction and chunk, so that the index
// arithmetic per token is 32-bit (64-bit divisions per element cost ~60 µs at ViG-T's
// 1024 px). The block first sums the chunk's offset — the totals of the chunks swept before
// it in that direction's reversed time, the final state's term first, in the order a single
// sequential sweep adds them — into shared memory (dynamic, K floats), then adds it to every
// token's in-chunk sum, four columns a thread where K allows. Loads are issued a batch ahead
// of their use (the compiler may not move a load above a store).
template <class T>
__global__ void gla_gate_grad_fixup(GLA_KERNEL_PARAMS) {
  const i64 bh = blockIdx.x / 2;
  const int group = blockIdx.x % 2;
  if (p.bidirectional == 0 && group == 1) return;
  const int n = blockIdx.y, N = (int)p.n_chunks, K = (int)p.K;
  // the forward direction's adjoint runs backwards in time (chunk N - 1 first), the reverse
  // direction's forwards; chunk n's offset sums the `before` chunks ahead of it in that order
  const int before = group == 0 ? N - 1 - n : n;
  float* offset = reinterpret_cast<float*>(dynamic_smem());
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    float running = 0.0f;
    if (group == 0 && p.bidirectional == 0 && p.final_term != 0) running = in_ptr<float>(p.final_term)[bh * K + k];
    const float* total = in_ptr<float>(p.dg_total) + (bh * 2 + group) * N * K + k;
    for (int base = 0; base < before; base += kScanBatch) {
      float own[kScanBatch];
#pragma unroll
      for (int s = 0; s < kScanBatch; ++s) {
        const int step = base + s, m = group == 0 ? N - 1 - step : step;
        own[s] = step < before ? total[i64(m) * K] : 0.0f;
      }
#pragma unroll
      for (int s = 0; s < kScanBatch; ++s)
        if (base + s < before) running += own[s];
    }
    offset[k] = running;
  }
  group_sync(0, (int)blockDim.x);  // __syncthreads

  const i64 b = bh / p.H, h = bh % p.H;
  const i64 t0 = (i64)n * p.chunk_len;
  const int tokens = (int)(p.T - t0 < p.chunk_len ? p.T - t0 : p.chunk_len);
  const i64 first = ((b * p.T + t0) * p.H + h) * p.K;  // token t0's element 0
  const i64 row = p.H * p.K;
  const float* local = in_ptr<float>(p.dg_ws) + group * p.B * p.T * row + first;
  T* out = out_ptr<T>(group == 0 ? p.dg : p.dg_rev) + first;
  if (K % 4 == 0) {  // rows start 16-byte aligned: four columns a thread
    const int K4 = K / 4, n4 = tokens * K4;
    for (int i0 = threadIdx.x; i0 < n4; i0 += kFixupUnroll * blockDim.x) {
      Float4 x[kFixupUnroll];
#pragma unroll
      for (int u = 0; u < kFixupUnroll; ++u) {
        const int i = i0 + u * blockDim.x, t = i / K4, k = 4 * (i - t * K4);
        if (i < n4) x[u] = *reinterpret_cast<const Float4*>(local + t * row + k);
      }
#pragma unroll
      for (int u = 0; u < kFixupUnroll; ++u) {
        const int i = i0 + u * blockDim.x, t = i / K4, k = 4 * (i - t * K4);
        if (i >= n4) break;
        const Quad<T> q = {{from_float<T>(x[u].x + offset[k]), from_float<T>(x[u].y + offset[k + 1]),
                            from_float<T>(x[u].z + offset[k + 2]), from_float<T>(x[u].w + offset[k + 3])}};
        *reinterpret_cast<Quad<T>*>(out + t * row + k) = q;
      }
    }
  } else {
    for (int i = threadIdx.x; i < tokens * K; i += blockDim.x) {
      const int t = i / K, k = i - t * K;
      out[t * row + k] = from_float<T>(local[t * row + k] + offset[k]);
    }
  }
}

}  // namespace gla
