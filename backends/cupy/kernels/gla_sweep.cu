// One kernel template for every recurrent sweep of gated linear attention.
//
// Forward and backward both reduce to the same pattern: a [K x V] matrix M that, token
// after token, is decayed along K and receives a rank-1 update, and an output that reduces
// M along one axis:
//
//     M <- diag(d_t) M + x_t y_tᵀ          out_t = M z_t   (a reduction over the inner axis)
//
//   role             M                     time order      own axis   inner   x    y        z
//   forward_output   S (state)             direction's     V          K       k    v        q
//   backward_dv      Λ = dL/dS (adjoint)   reversed        V          K       q    s·dout   k
//   backward_dq      S                     direction's     K          V       v    k        dout
//   backward_dk      Λ                     reversed        K          V       dout s·q     v
//
// (S_t = e_t S_{t-1} + k_t v_tᵀ, o_t = s S_tᵀ q_t; Λ_t = e_{t+1} Λ_{t+1} + s q_t dout_tᵀ,
// dq_t = s S_t dout_t, dk_t = Λ_t v_t, dv_t = Λ_tᵀ k_t, with e_t = exp(g_t).)
//
// Each thread owns OPT indices of the "own" axis and IPT of the "inner" axis, keeps its
// slice of M in registers, and multiplies it by exp(g) every step: products of decays never
// overflow and never lose precision the way differences of cumulative log-gates do, so any
// gate in [-1e4, 0] is exact to float32 rounding. The SPLIT threads sharing an own index sum
// their partial outputs with warp shuffles; no atomics anywhere, so results are bitwise
// reproducible and independent of the rest of the batch.
//
// Bidirectional calls run both directions in one block: thread group 0 sweeps the forward
// recurrence, group 1 the reverse one, over the same tokens in opposite orders. Whichever
// group reaches a token first parks its partial output in shared memory; the other one adds
// its own and writes the sum (one block-wide barrier at the half-way point orders them).
//
// Long sequences are cut into chunks swept by separate blocks. The chunk_state /
// chunk_adjoint roles first sweep every chunk from a zero state to get its contribution
// to the state leaving it and the product of its decays; gla_scan.cu chains those into the
// state entering every chunk; the output roles then sweep each chunk from its entering state.
//
// Gate gradients use dL/dg_r = sum_{t >= r} (q_t ⊙ dq_t - k_t ⊙ dk_t) (+ sum_v dS_T ⊙ S_T
// with a final-state gradient), per direction (Yang et al. 2023, "Gated Linear Attention
// Transformers with Hardware-Efficient Training"): backward_dq stores q ⊙ dq per direction,
// backward_dk accumulates the sum in its own (reversed) time order as it produces dk.
#include "gla_common.cuh"

namespace gla {

enum Role : int {
  kForwardOutput = 0,
  kChunkState = 1,    // chunk-local end states of S (no output)
  kBackwardDv = 2,
  kChunkAdjoint = 3,  // chunk-local end states of Λ (no output)
  kBackwardDq = 4,
  kBackwardDk = 5,
};

template <int ROLE>
struct RoleTraits {
  static constexpr bool OWN_IS_V = ROLE <= kChunkAdjoint;
  static constexpr bool ADJOINT = ROLE == kBackwardDv || ROLE == kChunkAdjoint || ROLE == kBackwardDk;
  static constexpr bool LOCAL = ROLE == kChunkState || ROLE == kChunkAdjoint;
  // the decay runs along K: the inner axis when V is owned, the own axis when K is
  static constexpr bool DECAY_INNER = OWN_IS_V;
  static constexpr bool HAS_Z = !LOCAL;
  // staged per token: inner vectors x, [z], [decay]; own values y, [decay], [e1], [e2]
  static constexpr int N_INNER = 1 + (HAS_Z ? 1 : 0) + (DECAY_INNER ? 1 : 0);
  static constexpr int N_OWN = ROLE == kBackwardDq ? 3 : ROLE == kBackwardDk ? 4 : 1;
};

// How one direction group of a block is laid out: OWN_TILE own indices, OPT per thread;
// SPLIT threads share an own index and split the inner axis, IPT inner indices each; CT
// tokens are staged in shared memory at a time.
template <int OWN_TILE_, int OPT_, int SPLIT_, int IPT_, int CT_>
struct Tile {
  static constexpr int OWN_TILE = OWN_TILE_;
  static constexpr int OPT = OPT_;
  static constexpr int SPLIT = SPLIT_;
  static constexpr int IPT = IPT_;
  static constexpr int CT = CT_;
  static constexpr int SLOTS = OWN_TILE / OPT;
  static constexpr int THREADS = SLOTS * SPLIT;
  static constexpr int INNER_PAD = SPLIT * IPT;
  static constexpr int IN_PER_THREAD = CT * INNER_PAD / THREADS;
  static constexpr int OWN_PER_THREAD = CT * OWN_TILE / THREADS;
  // after the output reduction each lane holds OUT_PER_LANE outputs, shared by LANES_PER_OUT lanes
  static constexpr int OUT_PER_LANE = OPT >= SPLIT ? OPT / SPLIT : 1;
  static constexpr int LANES_PER_OUT = OPT >= SPLIT ? 1 : SPLIT / OPT;

  static_assert(OWN_TILE % OPT == 0, "OPT must divide OWN_TILE");
  static_assert(THREADS % 32 == 0, "a direction group must be whole warps");
  static_assert(SPLIT == 1 || SPLIT == 2 || SPLIT == 4 || SPLIT == 8, "SPLIT lanes must sit in one warp");
  static_assert((OPT & (OPT - 1)) == 0, "OPT must be a power of two");
  static_assert(IPT % 4 == 0, "inner slices are read as float4");
  static_assert(CT * INNER_PAD % THREADS == 0 && CT * OWN_TILE % THREADS == 0, "staging must divide evenly");
};

__device__ __forceinline__ i64 imin(i64 a, i64 b) { return a < b ? a : b; }

// Sum `acc` over the SPLIT lanes of an own index. Recursive halving: each round a lane keeps
// half of its values and sends the other half, so OPT outputs cost about OPT shuffles in all;
// lane `s` ends with outputs OUT_PER_LANE * (s / LANES_PER_OUT) + u, u < OUT_PER_LANE.
template <class TILE>
__device__ __forceinline__ void reduce_over_split(float (&acc)[TILE::OPT], int lane_split) {
  int count = TILE::OPT;
#pragma unroll
  for (int mask = TILE::SPLIT / 2; mask >= TILE::LANES_PER_OUT && mask >= 1; mask /= 2) {
    const int half = count / 2;
    const bool upper = (lane_split & mask) != 0;
#pragma unroll
    for (int u = 0; u < TILE::OPT / 2; ++u) {
      if (u < half) {
        const float send = upper ? acc[u] : acc[u + half];
        const float keep = upper ? acc[u + half] : acc[u];
        acc[u] = keep + shfl_xor(send, mask);
      }
    }
    count = half;
  }
#pragma unroll
  for (int mask = TILE::LANES_PER_OUT / 2; mask >= 1; mask /= 2) acc[0] += shfl_xor(acc[0], mask);
}

template <class TILE, int ROLE>
struct SweepSmem {
  using R = RoleTraits<ROLE>;
  static constexpr int GROUP_FLOATS =
      R::N_INNER * TILE::CT * TILE::INNER_PAD + R::N_OWN * TILE::CT * TILE::OWN_TILE;
};

template <class T, class TILE, int ROLE>
__global__ void __launch_bounds__(2 * TILE::THREADS) gla_sweep(GLA_KERNEL_PARAMS) {
  using R = RoleTraits<ROLE>;
  constexpr int OWN_TILE = TILE::OWN_TILE, OPT = TILE::OPT, SPLIT = TILE::SPLIT, IPT = TILE::IPT;
  constexpr int CT = TILE::CT, THREADS = TILE::THREADS, INNER_PAD = TILE::INNER_PAD;
  constexpr int IN_PT = TILE::IN_PER_THREAD, OWN_PT = TILE::OWN_PER_THREAD;
  constexpr int GROUP_FLOATS = SweepSmem<TILE, ROLE>::GROUP_FLOATS;
  constexpr int DECAY_PT = (INNER_PAD + THREADS - 1) / THREADS;  // chunk decay products per thread

  const bool bidir = p.bidirectional != 0;
  const bool midpoint = bidir && !R::LOCAL;
  const int groups = bidir ? 2 : 1;
  const int group = threadIdx.x / THREADS;  // 0: forward recurrence, 1: reverse recurrence
  const int tid = threadIdx.x % THREADS;
  const int lane_split = tid % SPLIT;
  const int slot = tid / SPLIT;
  const i64 bh = blockIdx.x;
  const i64 b = bh / p.H, h = bh % p.H;
  const int own0 = blockIdx.y * OWN_TILE;
  const int n = blockIdx.z;
  const int N = (int)p.n_chunks;
  const i64 t0 = (i64)n * p.chunk_len;
  const i64 t1 = imin(p.T, t0 + p.chunk_len);
  const int L = (int)(t1 - t0);
  const int d_own = (int)(R::OWN_IS_V ? p.V : p.K);
  const int d_inner = (int)(R::OWN_IS_V ? p.K : p.V);
  const bool ascending = R::ADJOINT ? group == 1 : group == 0;

  // only the sequences the tensor-core backward left (gla_chunk_backward.cu)
  if (p.flags && !flagged(p.flags, bh)) return;
  const unsigned smem_needed =
      4u * (unsigned)(groups * GROUP_FLOATS + (midpoint ? (int)p.chunk_len * OWN_TILE : 0));
  if ((int)blockDim.x != groups * THREADS || dynamic_smem_bytes() < smem_needed) fail_launch();
  // a chunk-local sweep of the last chunk (in sweep order) would feed no later chunk
  if (R::LOCAL && (ascending ? n == N - 1 : n == 0)) return;

  float* smem = reinterpret_cast<float*>(dynamic_smem());
  float* xs = smem + group * GROUP_FLOATS;  // [CT][INNER_PAD]
  float* zs = xs + CT * INNER_PAD;          // only when HAS_Z
  float* ds = xs + (R::HAS_Z ? 2 : 1) * CT * INNER_PAD;  // only when DECAY_INNER
  float* ys = xs + R::N_INNER * CT * INNER_PAD;          // [CT][OWN_TILE]
  float* dos = ys + CT * OWN_TILE;                       // own-axis decay (backward_dq/dk)
  float* e1s = ys + 2 * CT * OWN_TILE;                   // q (dq) or k (dk)
  float* e2s = ys + 3 * CT * OWN_TILE;                   // q ⊙ dq of this direction (dk)
  float* parked = smem + groups * GROUP_FLOATS;          // [chunk_len][OWN_TILE] (midpoint)

  // what this role streams
  const u64 gate_address = group == 0 ? p.g : p.g_rev;
  const T* gate = in_ptr<T>(gate_address);
  const T* x_src = in_ptr<T>(ROLE == kForwardOutput || ROLE == kChunkState ? p.k
                             : ROLE == kBackwardDv || ROLE == kChunkAdjoint ? p.q
                             : ROLE == kBackwardDq ? p.v : p.dout);
  const T* z_src = in_ptr<T>(ROLE == kForwardOutput ? p.q : ROLE == kBackwardDv ? p.k
                             : ROLE == kBackwardDq ? p.dout : p.v);
  const T* y_src = in_ptr<T>(ROLE == kForwardOutput || ROLE == kChunkState ? p.v
                             : ROLE == kBackwardDv || ROLE == kChunkAdjoint ? p.dout
                             : ROLE == kBackwardDq ? p.k : p.q);
  const T* e1_src = in_ptr<T>(ROLE == kBackwardDq ? p.q : p.k);
  const i64 btkh = p.B * p.T * p.H * p.K;  // one direction's slice of a_ws / dg_ws
  const float* e2_src = in_ptr<float>(p.a_ws) + group * btkh;
  const float y_scale = R::ADJOINT ? p.scale : 1.0f;  // Λ carries the scale from its source
  const float out_scale = R::ADJOINT ? 1.0f : p.scale;

  auto token_at = [&](int step) -> i64 { return ascending ? t0 + step : t1 - 1 - step; };
  // the decay applied at a token: its own gate for S; for Λ the gate of the token swept
  // just before it (Λ_t = e_{t+1} Λ_{t+1} + ...), 1 past the ends of the sequence
  auto decay_token = [&](i64 t) -> i64 { return R::ADJOINT ? (ascending ? t - 1 : t + 1) : t; };
  auto row = [&](i64 t) -> i64 { return (b * p.T + t) * p.H + h; };

  // ---- staging: global -> registers (prefetch) -> shared memory (as float, decays as exp) ----
  T raw_x[IN_PT], raw_z[IN_PT], raw_d[IN_PT];
  T raw_y[OWN_PT], raw_do[OWN_PT], raw_e1[OWN_PT];
  float raw_e2[OWN_PT];

  auto prefetch = [&](int sub) {
#pragma unroll
    for (int u = 0; u < IN_PT; ++u) {
      const int e = tid + u * THREADS;
      const int j = e / INNER_PAD, i = e % INNER_PAD;
      const int step = sub * CT + j;
      const bool ok = step < L && i < d_inner;
      const i64 t = token_at(step);
      const i64 off = row(t) * d_inner + i;
      raw_x[u] = ok ? x_src[off] : T{};
      if (R::HAS_Z) raw_z[u] = ok ? z_src[off] : T{};
      if (R::DECAY_INNER) {
        const i64 td = decay_token(t);
        raw_d[u] = ok && td >= 0 && td < p.T ? gate[row(td) * p.K + i] : T{};
      }
    }
#pragma unroll
    for (int u = 0; u < OWN_PT; ++u) {
      const int e = tid + u * THREADS;
      const int j = e / OWN_TILE, c = own0 + e % OWN_TILE;
      const int step = sub * CT + j;
      const bool ok = step < L && c < d_own;
      const i64 t = token_at(step);
      const i64 off = row(t) * d_own + c;
      raw_y[u] = ok ? y_src[off] : T{};
      if (!R::DECAY_INNER) {
        const i64 td = decay_token(t);
        raw_do[u] = ok && td >= 0 && td < p.T ? gate[row(td) * p.K + c] : T{};
      }
      if (R::N_OWN >= 3) raw_e1[u] = ok ? e1_src[off] : T{};
      if (R::N_OWN >= 4) raw_e2[u] = ok ? e2_src[off] : 0.0f;
    }
  };

  auto stage = [&]() {
#pragma unroll
    for (int u = 0; u < IN_PT; ++u) {
      const int e = tid + u * THREADS;
      xs[e] = to_float(raw_x[u]);
      if (R::HAS_Z) zs[e] = to_float(raw_z[u]);
      if (R::DECAY_INNER) ds[e] = expf(to_float(raw_d[u]));
    }
#pragma unroll
    for (int u = 0; u < OWN_PT; ++u) {
      const int e = tid + u * THREADS;
      ys[e] = to_float(raw_y[u]) * y_scale;
      if (!R::DECAY_INNER) dos[e] = expf(to_float(raw_do[u]));
      if (R::N_OWN >= 3) e1s[e] = to_float(raw_e1[u]);
      if (R::N_OWN >= 4) e2s[e] = raw_e2[u];
    }
  };

  // ---- the state slice, from the state entering this chunk ----
  float M[OPT][IPT];
  {
    const float* init = nullptr;
    if (!R::LOCAL && N > 1) {
      init = in_ptr<float>(p.enter) + ((bh * 2 + group) * N + n) * p.K * p.V;
    } else if (!R::LOCAL && group == 0 && !bidir) {
      const u64 address = R::ADJOINT ? p.ds_final : p.s0;
      if (address) init = in_ptr<float>(address) + bh * p.K * p.V;
    }
#pragma unroll
    for (int r = 0; r < OPT; ++r) {
#pragma unroll
      for (int q4 = 0; q4 < IPT / 4; ++q4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = (q4 * SPLIT + lane_split) * 4 + u;
          const int c = own0 + slot * OPT + r;
          const bool ok = init != nullptr && i < d_inner && c < d_own;
          M[r][q4 * 4 + u] = ok ? init[R::OWN_IS_V ? (i64)i * p.V + c : (i64)c * p.V + i] : 0.0f;
        }
      }
    }
  }

  // running gate-gradient sums (backward_dk), in this group's time order
  float dg_acc[TILE::OUT_PER_LANE];
#pragma unroll
  for (int u = 0; u < TILE::OUT_PER_LANE; ++u) {
    const int c = own0 + slot * OPT + u + TILE::OUT_PER_LANE * (lane_split / TILE::LANES_PER_OUT);
    const bool has_final =
        ROLE == kBackwardDk && p.final_term != 0 && group == 0 && !bidir && N == 1 && c < d_own;
    dg_acc[u] = has_final ? in_ptr<float>(p.final_term)[bh * p.K + c] : 0.0f;
  }
  float decay_product[DECAY_PT];  // chunk roles: product of this chunk's decays, inner index tid + u*THREADS
#pragma unroll
  for (int u = 0; u < DECAY_PT; ++u) decay_product[u] = 1.0f;

  T* out = out_ptr<T>(ROLE == kForwardOutput ? p.o : ROLE == kBackwardDv ? p.dv
                      : ROLE == kBackwardDq ? p.dq : p.dk);
  const int phase1 = ascending ? (L + 1) / 2 : L / 2;  // tokens this group parks before the other adds
  const int n_sub = (L + CT - 1) / CT;
  bool met = false;
  int step = 0;

  prefetch(0);
  for (int sub = 0; sub < n_sub; ++sub) {
    if (sub > 0) group_sync(1 + group, THREADS);  // everyone is done reading the last tokens
    stage();
    group_sync(1 + group, THREADS);
    if (sub + 1 < n_sub) prefetch(sub + 1);  // in flight while the staged tokens are swept
    const int count = (int)imin(CT, L - sub * CT);

    for (int j = 0; j < count; ++j, ++step) {
      if (midpoint && step == phase1) {
        group_sync(0, 2 * THREADS);  // the other group has parked all its first-half outputs
        met = true;
      }
      const float* xr = xs + j * INNER_PAD;
      const float* zr = zs + j * INNER_PAD;
      const float* dr = ds + j * INNER_PAD;
      const int own_off = j * OWN_TILE + slot * OPT;
      float y[OPT], d_own_axis[OPT];
#pragma unroll
      for (int r = 0; r < OPT; ++r) {
        y[r] = ys[own_off + r];
        d_own_axis[r] = R::DECAY_INNER ? 1.0f : dos[own_off + r];
      }
      float acc_even[OPT], acc_odd[OPT];
#pragma unroll
      for (int r = 0; r < OPT; ++r) acc_even[r] = acc_odd[r] = 0.0f;

#pragma unroll
      for (int q4 = 0; q4 < IPT / 4; ++q4) {
        const int off = (q4 * SPLIT + lane_split) * 4;  // interleaved: conflict-free broadcasts
        const Float4 x4 = *reinterpret_cast<const Float4*>(xr + off);
        Float4 z4 = {0.f, 0.f, 0.f, 0.f}, d4 = {1.f, 1.f, 1.f, 1.f};
        if (R::HAS_Z) z4 = *reinterpret_cast<const Float4*>(zr + off);
        if (R::DECAY_INNER) d4 = *reinterpret_cast<const Float4*>(dr + off);
        const float xv[4] = {x4.x, x4.y, x4.z, x4.w};
        const float zv[4] = {z4.x, z4.y, z4.z, z4.w};
        const float dv[4] = {d4.x, d4.y, d4.z, d4.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int r = 0; r < OPT; ++r) {
            float& m = M[r][q4 * 4 + u];
            m = fmaf(R::DECAY_INNER ? dv[u] : d_own_axis[r], m, xv[u] * y[r]);
            if (R::HAS_Z) {
              if (u % 2 == 0) acc_even[r] = fmaf(zv[u], m, acc_even[r]);
              else acc_odd[r] = fmaf(zv[u], m, acc_odd[r]);
            }
          }
        }
      }
      if constexpr (!R::LOCAL) {
        float acc[OPT];
#pragma unroll
        for (int r = 0; r < OPT; ++r) acc[r] = acc_even[r] + acc_odd[r];
        reduce_over_split<TILE>(acc, lane_split);

        const i64 t = token_at(step);
        const bool writer = lane_split % TILE::LANES_PER_OUT == 0;
#pragma unroll
        for (int u = 0; u < TILE::OUT_PER_LANE; ++u) {
          const int c_local = slot * OPT + u + TILE::OUT_PER_LANE * (lane_split / TILE::LANES_PER_OUT);
          const int c = own0 + c_local;
          if (!writer || c >= d_own) continue;
          const float value = acc[u] * out_scale;  // this direction's contribution
          const i64 off = row(t) * d_own + c;
          if (ROLE == kBackwardDq) {
            out_ptr<float>(p.a_ws)[group * btkh + off] = e1s[j * OWN_TILE + c_local] * value;
          }
          if (ROLE == kBackwardDk) {
            dg_acc[u] += e2s[j * OWN_TILE + c_local] - e1s[j * OWN_TILE + c_local] * value;
            if (N > 1) out_ptr<float>(p.dg_ws)[group * btkh + off] = dg_acc[u];
            else out_ptr<T>(group == 0 ? p.dg : p.dg_rev)[off] = from_float<T>(dg_acc[u]);
          }
          if (midpoint) {
            float* cell = parked + (t - t0) * OWN_TILE + c_local;
            if (step < phase1) *cell = value;
            else out[off] = from_float<T>(*cell + value);
          } else {
            out[off] = from_float<T>(value);
          }
        }
      }
    }

    if (R::LOCAL && blockIdx.y == 0) {
#pragma unroll
      for (int u = 0; u < DECAY_PT; ++u) {
        const int i = tid + u * THREADS;
        if (i < INNER_PAD) {
          for (int j = 0; j < count; ++j) decay_product[u] *= ds[j * INNER_PAD + i];
        }
      }
    }
  }
  if (midpoint && !met) group_sync(0, 2 * THREADS);

  // ---- what leaves the sweep ----
  if (R::LOCAL) {
    float* local = out_ptr<float>(p.enter) + ((bh * 2 + group) * N + n) * p.K * p.V;
#pragma unroll
    for (int r = 0; r < OPT; ++r) {
#pragma unroll
      for (int q4 = 0; q4 < IPT / 4; ++q4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = (q4 * SPLIT + lane_split) * 4 + u;
          const int c = own0 + slot * OPT + r;
          if (i < d_inner && c < d_own) local[(i64)i * p.V + c] = M[r][q4 * 4 + u];
        }
      }
    }
    if (blockIdx.y == 0) {
#pragma unroll
      for (int u = 0; u < DECAY_PT; ++u) {
        const int i = tid + u * THREADS;
        if (i < d_inner) out_ptr<float>(p.decay)[((bh * 2 + group) * N + n) * p.K + i] = decay_product[u];
      }
    }
  }

  if (ROLE == kForwardOutput && !bidir && p.s_final != 0 && n == N - 1) {
    float* state = out_ptr<float>(p.s_final) + bh * p.K * p.V;
#pragma unroll
    for (int r = 0; r < OPT; ++r) {
#pragma unroll
      for (int q4 = 0; q4 < IPT / 4; ++q4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = (q4 * SPLIT + lane_split) * 4 + u;
          const int c = own0 + slot * OPT + r;
          if (i < d_inner && c < d_own) state[(i64)i * p.V + c] = M[r][q4 * 4 + u];
        }
      }
    }
  }

  // sum_v dS_T ⊙ S_T per k: the final-state term of every gate gradient
  if (ROLE == kBackwardDq && !bidir && p.ds_final != 0 && p.final_term != 0 && n == N - 1) {
    const float* ds_final = in_ptr<float>(p.ds_final) + bh * p.K * p.V;
    float acc[OPT];
#pragma unroll
    for (int r = 0; r < OPT; ++r) {
      acc[r] = 0.0f;
      const int c = own0 + slot * OPT + r;
#pragma unroll
      for (int q4 = 0; q4 < IPT / 4; ++q4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = (q4 * SPLIT + lane_split) * 4 + u;
          if (i < d_inner && c < d_own) acc[r] = fmaf(ds_final[(i64)c * p.V + i], M[r][q4 * 4 + u], acc[r]);
        }
      }
    }
    reduce_over_split<TILE>(acc, lane_split);
#pragma unroll
    for (int u = 0; u < TILE::OUT_PER_LANE; ++u) {
      const int c = own0 + slot * OPT + u + TILE::OUT_PER_LANE * (lane_split / TILE::LANES_PER_OUT);
      if (lane_split % TILE::LANES_PER_OUT == 0 && c < d_own) out_ptr<float>(p.final_term)[bh * p.K + c] = acc[u];
    }
  }

  if (ROLE == kBackwardDk) {
    // gradient of the initial state: dS_0 = e_0 ⊙ Λ_0 (the forward group ends at token 0)
    if (!bidir && p.ds0 != 0 && n == 0) {
      float* ds0 = out_ptr<float>(p.ds0) + bh * p.K * p.V;
#pragma unroll
      for (int r = 0; r < OPT; ++r) {
        const int c = own0 + slot * OPT + r;
        if (c >= d_own) continue;
        const float e0 = expf(to_float(gate[row(0) * p.K + c]));
#pragma unroll
        for (int q4 = 0; q4 < IPT / 4; ++q4) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = (q4 * SPLIT + lane_split) * 4 + u;
            if (i < d_inner) ds0[(i64)c * p.V + i] = e0 * M[r][q4 * 4 + u];
          }
        }
      }
    }
    if (N > 1) {
#pragma unroll
      for (int u = 0; u < TILE::OUT_PER_LANE; ++u) {
        const int c = own0 + slot * OPT + u + TILE::OUT_PER_LANE * (lane_split / TILE::LANES_PER_OUT);
        if (lane_split % TILE::LANES_PER_OUT == 0 && c < d_own) {
          out_ptr<float>(p.dg_total)[((bh * 2 + group) * N + n) * p.K + c] = dg_acc[u];
        }
      }
    }
  }
}

}  // namespace gla
