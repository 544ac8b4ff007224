// The forward on tensor cores: a chunked walk, 16 tokens a step, for bfloat16 and float16
// inputs with K <= 32 and V <= 64 (multiples of 16) and no states — ViG's calls. The
// recurrent sweep (gla_sweep.cu) runs everything else.
//
// One block per (batch, head) and segment of the sequence (one segment up to 512 tokens, else
// 256-token ones entered with the states gla_state_scan gives); NW warps per direction, each
// owning V / NW columns of the state and the output; a bidirectional call runs the reverse
// direction's warps in the same block, walking the flipped segment. A warp keeps its state
// transposed, S^T [V/NW x K], as
// float32 mma accumulators, and per 16-token chunk (gates' in-chunk cumulative sums G_t,
// chunk total G_15; all per K column):
//
//   o_t  = scale * (q_t * e^{G_t}) . S  +  sum_{s <= t} A_ts v_s
//   A_ts = sum_k (q_t * e^{G_t})_k (k_s * e^{-G_s})_k                     (the decay ratio)
//   S'   = diag(e^{G_15}) (S + sum_s (k_s * e^{-G_s}) v_s^T)
//
// with every float32 operand split into two bfloat16 parts (three products: hi*hi + hi*lo +
// lo*hi, ~float32 accuracy; a loaded bfloat16 v is exact as it is, a float16 one is two
// bfloat16 parts; float16 gates are summed by a float16 product). The ratio needs |G| <= 32 in
// the chunk; a chunk with stronger gates (any finite gate down to -1e4 must work) takes the
// exact path instead: scores as float32 sums of q_t k_s e^{G_t - G_s} <= |q_t k_s|, and the
// state update with the decayed keys k_s e^{G_15 - G_s} <= |k_s|.
//
// Layouts are chosen so that no value goes through shared memory: loads put q, k, g, v
// straight into A-fragment order (K and V columns permuted so that each lane reads
// contiguous 8- or 16-byte pieces: lane c holds columns [4 KT c, 4 KT c + 4 KT)), the
// in-chunk cumulative gate sums are one product with a lower-triangular matrix of ones, the
// scores' C tiles are the A fragment of A.v, S^T's C tiles are the B fragments of q.S, and
// the transposes that remain (k and v over time) are movmatrix instructions.
//
// Bidirectional output: o_t = o_fwd,t + o_rev,t, each already scaled by scale / 2. The
// walks meet halfway: before the midpoint barrier each direction parks its float32 outputs
// in shared memory (the forward direction tokens [0, 16 M), the reverse one [T - 16 M, T),
// M = floor(T / 32)); after it, each adds the other's parked values and writes o. The < 32
// tokens in between, which both directions reach after the barrier, are summed into
// zeroed shared memory by atomic additions — of two terms onto zero, so in either order the
// same bits — and written at the end.
#include "gla_chunk_tiles.cuh"

namespace gla {

// One chunk's inputs as loaded: [row half (token r, r + 8)][words]
template <int KT, int VT>
struct ChunkInputs {
  u32 q[2][2 * KT], k[2][2 * KT], g[2][2 * KT], v[2][2 * VT];
};

// E: bf16 or f16 inputs and output; KT, VT: K and V tiles of 16 (V per warp); NW: warps per direction, splitting V; BIDIR;
// PREFETCH: load the next chunk while computing this one (registers for latency);
// MIN_BLOCKS: blocks per SM the register allocation must allow (launch bounds);
// OUTPUT: o (from the entering states in `enter` when there are several segments), or else
// each segment's local end state and total decay, into `enter` and `decay` (gla_scan.cu's
// input: [B*H, 2, N, K, V] and [B*H, 2, N, K], segments in time order, the state swept from
// zero in the direction's own order).
// Grid: (B * H, N segments of chunk_len tokens); a block walks one segment, both directions.
template <class E, int KT, int VT, int NW, bool BIDIR, bool PREFETCH, int MIN_BLOCKS, bool OUTPUT>
__global__ void __launch_bounds__(32 * NW * (BIDIR ? 2 : 1), MIN_BLOCKS)
gla_chunk_forward(GLA_KERNEL_PARAMS) {
  constexpr int KW = 2 * KT, VW = 2 * VT;  // words per row and lane
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int dir = warp / NW, wv = warp % NW;
  const i64 b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int segment = blockIdx.y, n_segments = gridDim.y;
  const i64 t0 = i64(segment) * p.chunk_len;
  // this block's tokens [t0, t0 + T): the walks below see the segment as their sequence
  const i64 T = p.T - t0 < p.chunk_len ? p.T - t0 : p.chunk_len;
  const i64 row_k = p.H * p.K, row_v = p.H * p.V;  // elements from one token to the next
  const i64 k_off = (b * p.T + t0) * row_k + h * p.K + 4 * KT * c;
  const i64 v_off = (b * p.T + t0) * row_v + h * p.V + wv * 16 * VT + 4 * VT * c;
  const E* q = in_ptr<E>(p.q) + k_off;
  const E* k = in_ptr<E>(p.k) + k_off;
  const E* g = in_ptr<E>(dir == 0 ? p.g : p.g_rev) + k_off;
  const E* v = in_ptr<E>(p.v) + v_off;
  E* o = out_ptr<E>(p.o) + v_off;
  const float scale = p.scale;
  const int n_chunks = int((T + 15) / 16);

  // the parked outputs of a bidirectional call: [T][V] float32
  float* park = reinterpret_cast<float*>(dynamic_smem());
  const i64 V = p.V;
  const i64 first_met = BIDIR ? 16 * (T / 32) : T;  // [first_met, last_met): met after the barrier
  const i64 last_met = BIDIR ? T - first_met : T;
  const int steps_before_barrier = int(T / 32);
  if (BIDIR && OUTPUT) {
    for (i64 i = threadIdx.x; i < (last_met - first_met) * V; i += blockDim.x) park[first_met * V + i] = 0.0f;
  }

  // the lower triangle of ones (t >= s) as an A fragment, for the in-chunk cumulative sums
  const u32 one = Half16<E>::kOne;
  const u32 tri_low = ((2 * c <= r) ? one : 0u) | ((2 * c + 1 <= r) ? one << 16 : 0u);
  const u32 tri[4] = {tri_low, one | (one << 16), 0u, tri_low};

  float state[VT][2 * KT][4];  // S^T: [V tile][K column octet][C tile]
#pragma unroll
  for (int a = 0; a < VT; ++a)
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) state[a][n][e] = 0.0f;
  // S^T's C-tile element (a, n, e) is S[k][v] of the state in memory ([K][V] row major) with
  // k and v undoing the load order's column permutation (lane c's K columns [4 KT c, 4 KT c + 4 KT))
  const i64 kv = p.K * p.V;
  auto state_offset = [&](int a, int n, int e) -> i64 {
    const int j = n >> 1, octet = n & 1;
    const int k_col = 4 * KT * c + 4 * j + 2 * octet + (e & 1);
    const int l = r + 8 * (e >> 1);  // the V column within tile a, in fragment order
    const int v_col = wv * 16 * VT + 4 * VT * ((l & 7) >> 1) + 4 * a + 2 * (l >> 3) + (l & 1);
    return i64(k_col) * p.V + v_col;
  };
  const i64 state_base = ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * kv;
  // the scan reads no local state of a direction's last segment (its end is the sequence's)
  if (!OUTPUT && segment == (dir == 0 ? n_segments - 1 : 0)) return;
  if (OUTPUT && n_segments > 1) {
    const float* entering = in_ptr<float>(p.enter) + state_base;
#pragma unroll
    for (int a = 0; a < VT; ++a)
#pragma unroll
      for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) state[a][n][e] = entering[state_offset(a, n, e)];
  }
  float log_decay[2 * KT][2] = {};  // the segment's sum of gates, this lane's K columns

  auto load = [&](int chunk, ChunkInputs<KT, VT>& in) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const i64 t = 16 * i64(chunk) + r + 8 * half;
      const bool valid = t < T;
      const i64 row = dir == 0 ? t : T - 1 - t;
      if (OUTPUT) load_row<KW>(q + row * row_k, valid, in.q[half]);
      load_row<KW>(k + row * row_k, valid, in.k[half]);
      load_row<KW>(g + row * row_k, valid, in.g[half]);
      load_row<VW>(v + row * row_v, valid, in.v[half]);
    }
  };

  ChunkInputs<KT, VT> next;
  if (PREFETCH) load(0, next);
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    ChunkInputs<KT, VT> in;
    if (PREFETCH) {
      in = next;
      if (chunk + 1 < n_chunks) load(chunk + 1, next);
    } else {
      load(chunk, in);
    }
    if (BIDIR && OUTPUT && chunk == steps_before_barrier) block_sync();  // the other direction has parked

    // in-chunk cumulative gate sums G (A-fragment order) and the chunk totals of this lane's
    // columns (row 15 lives in lanes 28-31)
    float G[KT][8], total[2 * KT][2];
    bool ratio_ok = true;
#pragma unroll
    for (int j = 0; j < KT; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        // B = g over (time, column): the transposes of the words of column octet `half`
        Half16<E>::mma(acc, tri, transpose8x8(fragment_word<KT>(in.g, j, 2 * half)),
                 transpose8x8(fragment_word<KT>(in.g, j, 2 * half + 1)));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          G[j][4 * half + e] = acc[e];
          ratio_ok = ratio_ok && acc[e] >= -kRatioMaxLogDecay && acc[e] <= kRatioMaxLogDecay;
        }
        total[2 * j + half][0] = shfl_idx(acc[2], 28 + c);
        total[2 * j + half][1] = shfl_idx(acc[3], 28 + c);
      }
    }
    const bool exact = warp_any(!ratio_ok);
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n) log_decay[n][0] += total[n][0], log_decay[n][1] += total[n][1];

    float qf[KT][8], kf[KT][8];
    unpack<E, KT>(in.k, kf);
    float kx[KT][8];  // the state update's keys (kh or kd)
    u32 qh_hi[KT][4], qh_lo[KT][4];  // q * scale * e^G, split
    if constexpr (OUTPUT) {
      unpack<E, KT>(in.q, qf);
      float qh[KT][8];
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) qh[j][e] = qf[j][e] * scale * exp2_approx(G[j][e] * kLog2e);
      split<KT>(qh, qh_hi, qh_lo);
    }

    float scores[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};  // [s octet][C tile]
    u32 kx_hi[KT][4], kx_lo[KT][4];
    if (!exact) {
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) kx[j][e] = kf[j][e] * exp2_approx(-G[j][e] * kLog2e);
      split<KT>(kx, kx_hi, kx_lo);
      // B = kh^T over (column, token s): for s in octet 0 the words a0, a2; octet 1: a1, a3
#pragma unroll
      for (int j = 0; j < KT && OUTPUT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mma_bf16(scores[half], qh_lo[j], kx_hi[j][half], kx_hi[j][half + 2]);
          mma_bf16(scores[half], qh_hi[j], kx_lo[j][half], kx_lo[j][half + 2]);
          mma_bf16(scores[half], qh_hi[j], kx_hi[j][half], kx_hi[j][half + 2]);
        }
    } else {
      // exact: scores as float32 sums over this lane's columns, token s's values fetched from
      // the lane holding its row (lane 4 (s % 8) + c), then summed over the four lanes c. One
      // pair of tokens (s8, s8 + 8) at a time in a loop that is not unrolled, keeping two sums
      // live: the fully unrolled form's 32 sums cost the common path ~16 % (NOTES.md run 21l)
      if constexpr (OUTPUT) {
#pragma unroll 1
        for (int s8 = 0; s8 < 8; ++s8) {
#pragma unroll
          for (int sh = 0; sh < 2; ++sh) {  // token s = s8 + 8 sh: the elements of row half sh
            float part[2] = {0.0f, 0.0f};  // this lane's rows t = r, r + 8
#pragma unroll
            for (int j = 0; j < KT; ++j)
#pragma unroll
              for (int e = 0; e < 8; ++e) {
                if (((e >> 1) & 1) != sh) continue;
                const float ks = shfl_idx(kf[j][e], 4 * s8 + c), gs = shfl_idx(G[j][e], 4 * s8 + c);
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                  const int mine = (e & ~2) | (2 * t);  // the same column in this lane's row half t
                  if (s8 + 8 * sh <= r + 8 * t)  // pairs past the diagonal are masked below (and could overflow)
                    part[t] += qf[j][mine] * scale * ks * exp2_approx((G[j][mine] - gs) * kLog2e);
                }
              }
#pragma unroll
            for (int t = 0; t < 2; ++t) {
              part[t] += shfl_xor(part[t], 1);
              part[t] += shfl_xor(part[t], 2);
            }
            // this lane's C-tile entries: tile 0 (s = 2c, 2c + 1) rows r and r + 8, tile 1
            // (s = 2c + 8, 2c + 9) row r + 8 (its row r is past the diagonal)
            const int s_tok = s8 + 8 * sh;
            if (sh == 0) {
              if (s_tok == 2 * c) scores[0][0] = part[0], scores[0][2] = part[1];
              if (s_tok == 2 * c + 1) scores[0][1] = part[0], scores[0][3] = part[1];
            } else {
              if (s_tok == 2 * c + 8) scores[1][2] = part[1];
              if (s_tok == 2 * c + 9) scores[1][3] = part[1];
            }
          }
        }
      }  // OUTPUT
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float to_end = total[2 * j + (e >> 2)][e & 1] - G[j][e];  // <= 0 for gates <= 0
          kx[j][e] = kf[j][e] * exp2_approx(to_end * kLog2e);
        }
      split<KT>(kx, kx_hi, kx_lo);
    }
    // v over time: per V tile the transposed words; as the B operand of A.v (columns octet 0:
    // vt[0], vt[1]; octet 1: vt[2], vt[3]) and as the A operand of v^T.k (vt[0], vt[2], vt[1], vt[3]).
    // A float16 v is two bfloat16 parts (exactly: 11 significant bits in 8 + 8), vt and vt_lo.
    constexpr bool kSplitV = Half16<E>::kIsF16;
    u32 vt[VT][4], vt_lo[VT][4];
#pragma unroll
    for (int a = 0; a < VT; ++a)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        u32 word = fragment_word<VT>(in.v, a, w);
        if constexpr (kSplitV) {
          u32 lo;
          split_bf16x2(Half16<E>::low(word), Half16<E>::high(word), word, lo);
          vt_lo[a][w] = transpose8x8(lo);
        }
        vt[a][w] = transpose8x8(word);
      }

    float out[2 * VT][4];
    if constexpr (OUTPUT) {
    // causal mask within the chunk (s <= t): the C tiles' rows are t = r, r + 8
    if (2 * c > r) scores[0][0] = 0.0f;
    if (2 * c + 1 > r) scores[0][1] = 0.0f;
    scores[1][0] = scores[1][1] = 0.0f;
    if (2 * c > r) scores[1][2] = 0.0f;
    if (2 * c + 1 > r) scores[1][3] = 0.0f;
    u32 a_hi[4], a_lo[4];
    split_bf16x2(scores[0][0], scores[0][1], a_hi[0], a_lo[0]);
    split_bf16x2(scores[0][2], scores[0][3], a_hi[1], a_lo[1]);
    a_hi[2] = a_lo[2] = 0u;
    split_bf16x2(scores[1][2], scores[1][3], a_hi[3], a_lo[3]);

    // o = A.v + qh.S (the state as it entered the chunk)
#pragma unroll
    for (int a = 0; a < VT; ++a)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float (&acc)[4] = out[2 * a + half];
        acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
        if constexpr (kSplitV) mma_bf16(acc, a_hi, vt_lo[a][2 * half], vt_lo[a][2 * half + 1]);
        mma_bf16(acc, a_lo, vt[a][2 * half], vt[a][2 * half + 1]);
        mma_bf16(acc, a_hi, vt[a][2 * half], vt[a][2 * half + 1]);
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          // B = S over (K column, V column): S^T's C tiles of column octets 2j, 2j + 1, rows of `half`
          u32 s_hi[2], s_lo[2];
          split_bf16x2(state[a][2 * j][2 * half], state[a][2 * j][2 * half + 1], s_hi[0], s_lo[0]);
          split_bf16x2(state[a][2 * j + 1][2 * half], state[a][2 * j + 1][2 * half + 1], s_hi[1], s_lo[1]);
          mma_bf16(acc, qh_lo[j], s_hi[0], s_hi[1]);
          mma_bf16(acc, qh_hi[j], s_lo[0], s_lo[1]);
          mma_bf16(acc, qh_hi[j], s_hi[0], s_hi[1]);
        }
      }
    }  // OUTPUT

    // the state: S' = diag(e^{G_15}) (S + kh^T v)  or, exact,  diag(e^{G_15}) S + kd^T v
    float decay[2 * KT][2];
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) decay[n][e] = exp2_approx(total[n][e] * kLog2e);
    auto decay_state = [&] {
#pragma unroll
      for (int a = 0; a < VT; ++a)
#pragma unroll
        for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) state[a][n][e] *= decay[n][e & 1];
    };
    if (exact) decay_state();
    {
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // B = kx over (token, K column) for column octet 2j + half: transposed words
          const u32 hi0 = transpose8x8(kx_hi[j][2 * half]), hi1 = transpose8x8(kx_hi[j][2 * half + 1]);
          const u32 lo0 = transpose8x8(kx_lo[j][2 * half]), lo1 = transpose8x8(kx_lo[j][2 * half + 1]);
#pragma unroll
          for (int a = 0; a < VT; ++a) {
            const u32 vA[4] = {vt[a][0], vt[a][2], vt[a][1], vt[a][3]};
            if constexpr (kSplitV) {
              const u32 vA_lo[4] = {vt_lo[a][0], vt_lo[a][2], vt_lo[a][1], vt_lo[a][3]};
              mma_bf16(state[a][2 * j + half], vA_lo, hi0, hi1);
            }
            mma_bf16(state[a][2 * j + half], vA, lo0, lo1);
            mma_bf16(state[a][2 * j + half], vA, hi0, hi1);
          }
        }
    }
    if (!exact) decay_state();

    // write: this lane's 4 VT columns of rows r and r + 8 are contiguous (the load order)
#pragma unroll
    for (int half = 0; half < 2 && OUTPUT; ++half) {
      const i64 t = 16 * i64(chunk) + r + 8 * half;
      if (t >= T) continue;
      const i64 row = dir == 0 ? t : T - 1 - t;
      float x[4 * VT];
#pragma unroll
      for (int a = 0; a < VT; ++a)
#pragma unroll
        for (int oct = 0; oct < 2; ++oct)
#pragma unroll
          for (int e = 0; e < 2; ++e) x[4 * a + 2 * oct + e] = out[2 * a + oct][2 * half + e];
      if (BIDIR) {
        float* parked = park + row * V + wv * 16 * VT + 4 * VT * c;
        if (chunk < steps_before_barrier) {
#pragma unroll
          for (int i = 0; i < VT; ++i)
            reinterpret_cast<Float4*>(parked)[i] = Float4{x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]};
          continue;
        }
        if (row >= first_met && row < last_met) {
#pragma unroll
          for (int i = 0; i < 4 * VT; ++i) shared_add(parked + i, x[i]);
          continue;
        }
#pragma unroll
        for (int i = 0; i < VT; ++i) {
          const Float4 other = reinterpret_cast<const Float4*>(parked)[i];
          x[4 * i] += other.x, x[4 * i + 1] += other.y, x[4 * i + 2] += other.z, x[4 * i + 3] += other.w;
        }
      }
      u32 w[VW];
#pragma unroll
      for (int i = 0; i < VW; ++i) w[i] = Half16<E>::pack(x[2 * i], x[2 * i + 1]);
      store_row<VW>(o + row * row_v, w);
    }
  }
  if (BIDIR && OUTPUT) {
    // (the midpoint barrier ran inside the loop: T / 32 < ceil(T / 16) for every T >= 1)
    block_sync();  // both directions' additions to the tokens met after the barrier are in
    const i64 columns = 16 * VT * NW;  // == V
    for (i64 i = threadIdx.x; i < (last_met - first_met) * columns; i += blockDim.x) {
      const i64 row = first_met + i / columns, col = i % columns;
      const float x = park[row * V + col];
      out_ptr<E>(p.o)[(b * p.T + t0 + row) * row_v + h * p.V + col] = from_float<E>(x);
    }
  }
  if (!OUTPUT) {  // the segment's local end state and its total decay, for gla_state_scan
    float* local = out_ptr<float>(p.enter) + state_base;
#pragma unroll
    for (int a = 0; a < VT; ++a)
#pragma unroll
      for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) local[state_offset(a, n, e)] = state[a][n][e];
    if (wv == 0 && r == 0) {  // lanes 0-3 hold every K column once (the same totals in every row)
      float* decay = out_ptr<float>(p.decay) + ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K;
#pragma unroll
      for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) decay[4 * KT * c + 4 * (n >> 1) + 2 * (n & 1) + e] = exp2_approx(log_decay[n][e] * kLog2e);
    }
  }
}

}  // namespace gla
