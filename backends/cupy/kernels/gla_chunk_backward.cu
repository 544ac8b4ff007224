// The backward on tensor cores: bfloat16 and float16 inputs with K <= 32 and V <= 64
// (multiples of 16), no states — ViG's training calls. Each launch is a chunked walk of 16
// tokens a step with both directions of a bidirectional call in one block (the forward's
// layouts and midpoint hand-over, gla_chunk_forward.cu), one block per (batch, head) and
// segment:
//
//   gla_chunk_backward_dq   walks each direction's own order with the state S [K x V]:
//                           dq, and q * dq per direction (float32, for the gate gradients)
//   gla_chunk_backward_dkv  walks each direction's reversed order with the adjoint
//                           dS [K x V], launched twice: dv; then dk and the gate
//                           gradients dg (dg_rev)
//   gla_chunk_backward_adjoint  the same walk once for dv, dk and dg together (K = 32):
//                           causal calls and short bidirectional ones (the plan)
//
// Per direction, in its walk order, with the in-chunk cumulative gate sums G_t, the chunk
// total G_15, s = scale (halved for a bidirectional call), qh = s q e^{G}, kh = k e^{-G}
// (the decay ratio, |G| <= 32), B_ts = dout_t . v_s and A_ts = qh_t . kh_s (s <= t):
//
//   dq_t = s e^{G_t} (S dout_t + sum_s B_ts kh_s)          S' = e^{G_15} (S + kh^T v)
//   dk_s = e^{-G_s} (sum_t B_ts qh_t + (D dS) v_s)          D = diag(e^{G_15})
//   dv_s = sum_t A_ts dout_t + (D dS)^T kh_s                dS' = D dS + qh^T dout
//   dg_u = sum_{t >= u} (q_t dq_t - k_t dk_t)               (Yang et al. 2023)
//
// where S enters the chunk from the earlier ones and dS from the later ones (dS' leaves the
// chunk towards the earlier ones). Sequences over 512 tokens run as the forward's 256-token
// segments: S enters each from the forward's segment states (gla_chunk_forward without
// outputs, gla_state_scan), dS from the adjoint walk's own segment-local adjoints (LOCAL: no
// outputs) and gla_state_scan's adjoint recurrence; the dk walk then leaves the gate
// gradients' in-segment sums in dg_ws and each segment's total in dg_total, and
// gla_gate_grad_fixup adds the later segments' part.
//
// dq, B and the state terms take the forward's fragment layouts: float32 operands are split in
// two bfloat16 parts; loaded bfloat16 dout and v are exact operands as they are, float16 ones
// two bfloat16 parts each (exactly: 11 significant bits in 8 + 8), one product more wherever
// they meet a split operand (B = dout . v^T is one float16 product of the loaded words). The
// gate gradients' in-chunk suffix sums are a product with an upper triangle of ones (each
// term then carries ~2^-17 of relative error, as the triton backend's), plus a float32 carry
// from the later chunks.
//
// Chunks whose in-chunk sums leave the ratio's range (any gate down to -1e4 must work) have
// no exact path here: the dq kernel records, per (batch, head), whether its walks met one
// (`flags`, [B*H][4] int32, one slot per warp), the dkv kernels skip those sequences, and the
// recurrent sweeps (gla_sweep.cu, which read the same flags) redo them exactly — with their
// own segmented path where there are segments.
#include "gla_chunk_tiles.cuh"

namespace gla {

template <int KW, int VW>
struct BackwardInputs {
  u32 q[2][KW], k[2][KW], g[2][KW], v[2][VW], dout[2][VW];
};

// the A-fragment words of a [16 x 16] tile held as two C tiles (column octets 0-7, 8-15),
// split into bfloat16 parts; the tile is lower triangular, so word a2 (rows 0-7, columns
// 8-15) is zero
__device__ __forceinline__ void split_lower_tile(const float (&x)[2][4], u32 (&hi)[4], u32 (&lo)[4]) {
  split_bf16x2(x[0][0], x[0][1], hi[0], lo[0]);
  split_bf16x2(x[0][2], x[0][3], hi[1], lo[1]);
  hi[2] = lo[2] = 0u;
  split_bf16x2(x[1][2], x[1][3], hi[3], lo[3]);
}

// the transpose's A fragment from a tile's A-fragment words: {T(a0), T(a2), T(a1), T(a3)}
__device__ __forceinline__ void transpose_tile(const u32 (&a)[4], u32 (&t)[4]) {
  t[0] = transpose8x8(a[0]), t[1] = transpose8x8(a[2]), t[2] = transpose8x8(a[1]), t[3] = transpose8x8(a[3]);
}

// the transpose's A fragment (split) of a lower-triangular [16 x 16] tile held as C tiles
__device__ __forceinline__ void transposed_lower_tile(const float (&x)[2][4], u32 (&t_hi)[4], u32 (&t_lo)[4]) {
  u32 hi[4], lo[4];
  split_lower_tile(x, hi, lo);
  transpose_tile(hi, t_hi);
  transpose_tile(lo, t_lo);
}

// d += a * b with both operands split in two bfloat16 parts: lo*hi + hi*lo + hi*hi (the
// lo*lo term is below float32 rounding), always in this order
__device__ __forceinline__ void mma_split(float (&d)[4], const u32 (&a_hi)[4], const u32 (&a_lo)[4], u32 b_hi0,
                                          u32 b_hi1, u32 b_lo0, u32 b_lo1) {
  mma_bf16(d, a_lo, b_hi0, b_hi1);
  mma_bf16(d, a_hi, b_lo0, b_lo1);
  mma_bf16(d, a_hi, b_hi0, b_hi1);
}

// A loaded 16-bit word as bfloat16 operand words: a bfloat16 word is exact as it is (lo
// unused); a float16 word is two bfloat16 parts, exactly
template <class E>
__device__ __forceinline__ void loaded_parts(u32 word, u32& hi, u32& lo) {
  if constexpr (Half16<E>::kIsF16) {
    split_bf16x2(Half16<E>::low(word), Half16<E>::high(word), hi, lo);
  } else {
    hi = word, lo = 0u;
  }
}

// d += a * b, a loaded (parts a_hi, a_lo: loaded_parts) and b split in two parts: a*b_lo (+
// a_lo*b_hi for float16) + a*b_hi, always in this order
template <class E>
__device__ __forceinline__ void mma_loaded_a(float (&d)[4], const u32 (&a_hi)[4], const u32 (&a_lo)[4], u32 b_hi0,
                                             u32 b_hi1, u32 b_lo0, u32 b_lo1) {
  mma_bf16(d, a_hi, b_lo0, b_lo1);
  if constexpr (Half16<E>::kIsF16) mma_bf16(d, a_lo, b_hi0, b_hi1);
  mma_bf16(d, a_hi, b_hi0, b_hi1);
}

// d += a * b, a split in two parts and b loaded (parts b_hi, b_lo): for float16 mma_split; for
// bfloat16 (b exact) its terms without b_lo, a_lo*b + a_hi*b
template <class E>
__device__ __forceinline__ void mma_loaded_b(float (&d)[4], const u32 (&a_hi)[4], const u32 (&a_lo)[4], u32 b_hi0,
                                             u32 b_hi1, u32 b_lo0, u32 b_lo1) {
  if constexpr (Half16<E>::kIsF16) {
    mma_split(d, a_hi, a_lo, b_hi0, b_hi1, b_lo0, b_lo1);
  } else {
    mma_bf16(d, a_lo, b_hi0, b_hi1);
    mma_bf16(d, a_hi, b_hi0, b_hi1);
  }
}

// d += a * b, a loaded (parts a_hi, a_lo) and b the transpose of a C tile's elements {x0, x1 |
// x2, x3} (rows r, r + 8) split in two bfloat16 parts: the movmatrix transposes of its split
// words, the lo part first
template <class E>
__device__ __forceinline__ void mma_transposed_split(float (&d)[4], const u32 (&a_hi)[4], const u32 (&a_lo)[4],
                                                     float x0, float x1, float x2, float x3) {
  u32 hi0, lo0, hi1, lo1;
  split_bf16x2(x0, x1, hi0, lo0);
  split_bf16x2(x2, x3, hi1, lo1);
  const u32 b_hi0 = transpose8x8(hi0), b_hi1 = transpose8x8(hi1);
  mma_loaded_a<E>(d, a_hi, a_lo, b_hi0, b_hi1, transpose8x8(lo0), transpose8x8(lo1));
}

// one K octet's gate terms (C tile x, rows t) become their suffix sums over the chunk (the
// upper triangle of bfloat16 ones times them) plus `carry`, the later chunks' sum; carry then
// takes this chunk's whole sum (row 0, lanes 0-3)
__device__ __forceinline__ void suffix_sums(float (&x)[4], const u32 (&upper)[4], float (&carry)[2], int c) {
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_transposed_split<bf16>(s, upper, upper, x[0], x[1], x[2], x[3]);  // (bfloat16: no low part read)
  x[0] = s[0] + carry[0], x[1] = s[1] + carry[1], x[2] = s[2] + carry[0], x[3] = s[3] + carry[1];
  carry[0] = shfl_idx(x[0], c), carry[1] = shfl_idx(x[1], c);
}

// the four A-fragment words of 16-wide tile a of loaded rows
template <int T, int W>
__device__ __forceinline__ void fragment(const u32 (&rows)[2][W], int a, u32 (&words)[4]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) words[w] = fragment_word<T>(rows, a, w);
}

// tile a's four A-fragment words of loaded rows as bfloat16 parts (loaded_parts)
template <class E, int T, int W>
__device__ __forceinline__ void loaded_fragment(const u32 (&rows)[2][W], int a, u32 (&hi)[4], u32 (&lo)[4]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) loaded_parts<E>(fragment_word<T>(rows, a, w), hi[w], lo[w]);
}

// the same words' movmatrix transposes (the tile over time: B operand words, or reordered A)
template <class E, int T, int W>
__device__ __forceinline__ void loaded_fragment_transposed(const u32 (&rows)[2][W], int a, u32 (&hi)[4],
                                                           u32 (&lo)[4]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    u32 h, l;
    loaded_parts<E>(fragment_word<T>(rows, a, w), h, l);
    hi[w] = transpose8x8(h), lo[w] = Half16<E>::kIsF16 ? transpose8x8(l) : 0u;
  }
}

// keep s <= t: C tiles of a [16 t x 16 s] tile, rows r and r + 8, columns 2c + e (+ 8)
__device__ __forceinline__ void mask_causal(float (&x)[2][4], int r, int c) {
  if (2 * c > r) x[0][0] = 0.0f;
  if (2 * c + 1 > r) x[0][1] = 0.0f;
  x[1][0] = x[1][1] = 0.0f;
  if (2 * c > r) x[1][2] = 0.0f;
  if (2 * c + 1 > r) x[1][3] = 0.0f;
}

// B = dout . v^T over one chunk (exact products of the loaded 16-bit values, float32 sums)
template <class E, int VT, int VW>
__device__ __forceinline__ void dout_v_scores(const u32 (&dout)[2][VW], const u32 (&v)[2][VW], float (&x)[2][4]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) x[half][0] = x[half][1] = x[half][2] = x[half][3] = 0.0f;
#pragma unroll
  for (int a = 0; a < VT; ++a) {
    u32 d[4];
    fragment<VT>(dout, a, d);
#pragma unroll
    for (int half = 0; half < 2; ++half)  // B = v^T over (column, token s)
      Half16<E>::mma(x[half], d, fragment_word<VT>(v, a, half), fragment_word<VT>(v, a, half + 2));
  }
}

// The dq walk. KT: K tiles of 16 per warp (NW warps per direction split K); VT: V tiles of
// 16 (every warp holds all of V). Each warp keeps S [its K columns x V] as C tiles (rows K,
// columns V): they are the B fragments of dout . S^T as they stand.
// Grid: (B * H); block: NW warps per direction.
template <class E, int KT, int VT, int NW, bool BIDIR, int MIN_BLOCKS>
__global__ void __launch_bounds__(32 * NW * (BIDIR ? 2 : 1), MIN_BLOCKS)
gla_chunk_backward_dq(GLA_KERNEL_PARAMS) {
  constexpr int KW = 2 * KT, VW = 2 * VT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int dir = warp / NW, wk = warp % NW;
  const i64 b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int segment = blockIdx.y, n_segments = gridDim.y;
  const i64 t0 = i64(segment) * p.chunk_len;
  const i64 T = p.T - t0 < p.chunk_len ? p.T - t0 : p.chunk_len;  // this block's tokens [t0, t0 + T)
  const i64 row_k = p.H * p.K, row_v = p.H * p.V;
  const i64 k_col = wk * 16 * KT + 4 * KT * c;  // this lane's first K column (load order)
  const i64 k_off = (b * p.T + t0) * row_k + h * p.K + k_col;
  const i64 v_off = (b * p.T + t0) * row_v + h * p.V + 4 * VT * c;
  const E* q = in_ptr<E>(p.q) + k_off;
  const E* k = in_ptr<E>(p.k) + k_off;
  const E* g = in_ptr<E>(dir == 0 ? p.g : p.g_rev) + k_off;
  const E* v = in_ptr<E>(p.v) + v_off;
  const E* dout = in_ptr<E>(p.dout) + v_off;
  E* dq = out_ptr<E>(p.dq) + k_off;
  float* q_dq = out_ptr<float>(p.a_ws) + dir * p.B * p.T * row_k + k_off;
  const float scale = p.scale;
  const int n_chunks = int((T + 15) / 16);

  float* park = reinterpret_cast<float*>(dynamic_smem());  // [T][K] float32 (bidirectional)
  const i64 K = p.K;
  const Midpoint mid = Midpoint::ascending(T);
  if (BIDIR) {
    for (i64 i = threadIdx.x; i < (mid.met_end - mid.met_begin) * K; i += blockDim.x) park[mid.met_begin * K + i] = 0.0f;
  }

  const u32 one = Half16<E>::kOne;
  const u32 tri_low = ((2 * c <= r) ? one : 0u) | ((2 * c + 1 <= r) ? one << 16 : 0u);
  const u32 tri[4] = {tri_low, one | (one << 16), 0u, tri_low};

  float S[KT][2 * VT][4];  // [K tile][V octet][C tile]: rows K (r, r + 8), columns V
#pragma unroll
  for (int j = 0; j < KT; ++j)
#pragma unroll
    for (int o = 0; o < 2 * VT; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[j][o][e] = 0.0f;
  if (n_segments > 1) {  // the state entering the segment (the forward's segment states)
    const float* entering = in_ptr<float>(p.enter) + ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K * p.V;
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int o = 0; o < 2 * VT; ++o)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k_at = wk * 16 * KT + permuted_column(KT, j, r + 8 * (e >> 1));
          S[j][o][e] = entering[i64(k_at) * p.V + permuted_column(VT, o >> 1, 8 * (o & 1) + 2 * c + (e & 1))];
        }
  }
  bool strong = false;  // a chunk left the ratio's range: the sweeps redo this sequence

  auto load = [&](int chunk, BackwardInputs<KW, VW>& in) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const i64 t = 16 * i64(chunk) + r + 8 * half;
      const bool valid = t < T;
      const i64 row = dir == 0 ? t : T - 1 - t;
      load_row<KW>(q + row * row_k, valid, in.q[half]);
      load_row<KW>(k + row * row_k, valid, in.k[half]);
      load_row<KW>(g + row * row_k, valid, in.g[half]);
      load_row<VW>(v + row * row_v, valid, in.v[half]);
      load_row<VW>(dout + row * row_v, valid, in.dout[half]);
    }
  };

  BackwardInputs<KW, VW> next;
  load(0, next);
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    BackwardInputs<KW, VW> in = next;
    if (chunk + 1 < n_chunks) load(chunk + 1, next);
    if (BIDIR && chunk == mid.steps_before) block_sync();  // the other direction has parked

    float G[KT][8], col_total[KT][2][2], row_total[KT][2];
    bool ratio_ok = true;
#pragma unroll
    for (int j = 0; j < KT; ++j)
      ratio_ok = chunk_gate_sums<E>(tri, fragment_word<KT>(in.g, j, 0), fragment_word<KT>(in.g, j, 1),
                                    fragment_word<KT>(in.g, j, 2), fragment_word<KT>(in.g, j, 3), r, c,
                                    G[j], col_total[j], row_total[j]) && ratio_ok;
    strong = warp_any(!ratio_ok) || strong;

    // kh = k e^{-G}, split; its transposed words are the B operand of B.kh (column octet
    // 2j + half: khT[2 half], khT[2 half + 1]) and, reordered, the A operand of kh^T v
    u32 khT_hi[KT][4], khT_lo[KT][4];
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      float kf[8];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const u32 word = fragment_word<KT>(in.k, j, w);
        kf[2 * w] = Half16<E>::low(word) * exp2_approx(-G[j][2 * w] * kLog2e);
        kf[2 * w + 1] = Half16<E>::high(word) * exp2_approx(-G[j][2 * w + 1] * kLog2e);
      }
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        u32 hi, lo;
        split_bf16x2(kf[2 * w], kf[2 * w + 1], hi, lo);
        khT_hi[j][w] = transpose8x8(hi), khT_lo[j][w] = transpose8x8(lo);
      }
    }

    float bs[2][4];
    dout_v_scores<E, VT, VW>(in.dout, in.v, bs);
    mask_causal(bs, r, c);
    u32 b_hi[4], b_lo[4];
    split_lower_tile(bs, b_hi, b_lo);

    // dq (before e^{G} and the scale): B.kh + dout.S^T, C tiles [K octet][rows t]
    u32 d_hi[VT][4], d_lo[VT][4];  // dout's A fragments (d_lo: float16's low parts)
#pragma unroll
    for (int a = 0; a < VT; ++a) loaded_fragment<E, VT>(in.dout, a, d_hi[a], d_lo[a]);
    float acc[KT][2][4];
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float (&x)[4] = acc[j][half];
        x[0] = x[1] = x[2] = x[3] = 0.0f;
        mma_split(x, b_hi, b_lo, khT_hi[j][2 * half], khT_hi[j][2 * half + 1], khT_lo[j][2 * half],
                  khT_lo[j][2 * half + 1]);
#pragma unroll
        for (int a = 0; a < VT; ++a) {
          // B = S^T over (V column, K column): S's C tiles of V octets 2a, 2a + 1, rows of `half`
          u32 s_hi[2], s_lo[2];
          split_bf16x2(S[j][2 * a][2 * half], S[j][2 * a][2 * half + 1], s_hi[0], s_lo[0]);
          split_bf16x2(S[j][2 * a + 1][2 * half], S[j][2 * a + 1][2 * half + 1], s_hi[1], s_lo[1]);
          mma_loaded_a<E>(x, d_hi[a], d_lo[a], s_hi[0], s_hi[1], s_lo[0], s_lo[1]);
        }
      }

    // the state: S' = diag(e^{G_15}) (S + kh^T v), v's transposed words as the B operand
#pragma unroll
    for (int a = 0; a < VT; ++a) {
      u32 vt[4], vt_lo[4];
      loaded_fragment_transposed<E, VT>(in.v, a, vt, vt_lo);
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        const u32 A_hi[4] = {khT_hi[j][0], khT_hi[j][2], khT_hi[j][1], khT_hi[j][3]};
        const u32 A_lo[4] = {khT_lo[j][0], khT_lo[j][2], khT_lo[j][1], khT_lo[j][3]};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mma_loaded_b<E>(S[j][2 * a + half], A_hi, A_lo, vt[2 * half], vt[2 * half + 1], vt_lo[2 * half],
                          vt_lo[2 * half + 1]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      const float d0 = exp2_approx(row_total[j][0] * kLog2e), d1 = exp2_approx(row_total[j][1] * kLog2e);
#pragma unroll
      for (int o = 0; o < 2 * VT; ++o) S[j][o][0] *= d0, S[j][o][1] *= d0, S[j][o][2] *= d1, S[j][o][3] *= d1;
    }

    // write dq (handed over at the midpoint) and q * dq; this lane's 4 KT columns of rows
    // r and r + 8 are contiguous (the load order)
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const i64 t = 16 * i64(chunk) + r + 8 * rh;
      if (t >= T) continue;
      const i64 row = dir == 0 ? t : T - 1 - t;
      Float4 x[KT], qx[KT];
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        float y[4], z[4];
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int ge = 4 * half + 2 * rh + e;  // the A-fragment element of (row half rh, column 8 half + 2c + e)
            y[2 * half + e] = acc[j][half][2 * rh + e] * scale * exp2_approx(G[j][ge] * kLog2e);
            const u32 qw = fragment_word<KT>(in.q, j, ge >> 1);
            z[2 * half + e] = (e ? Half16<E>::high(qw) : Half16<E>::low(qw)) * y[2 * half + e];
          }
        x[j] = Float4{y[0], y[1], y[2], y[3]}, qx[j] = Float4{z[0], z[1], z[2], z[3]};
      }
#pragma unroll
      for (int j = 0; j < KT; ++j) reinterpret_cast<Float4*>(q_dq + row * row_k)[j] = qx[j];
      if (BIDIR && !hand_over<KT>(mid, chunk, row, park + row * K + k_col, x)) continue;
      store_outputs<E, KT>(dq + row * row_k, x);
    }
  }
  if (lane == 0) {
    // one segment: every slot written; several: the flags arrive zeroed and only flagging
    // blocks write (the segments of a sequence share its slots)
    int* flags = out_ptr<int>(p.flags) + i64(blockIdx.x) * kFlagSlots;
    if (n_segments == 1) {
      flags[warp] = strong ? 1 : 0;
      if (warp == 0)
        for (int i = blockDim.x / 32; i < kFlagSlots; ++i) flags[i] = 0;
    } else if (strong) {
      flags[warp] = 1;
    }
  }
  if (BIDIR) {
    block_sync();  // both directions' additions to the rows met after the barrier are in
    for (i64 i = threadIdx.x; i < (mid.met_end - mid.met_begin) * K; i += blockDim.x) {
      const i64 row = mid.met_begin + i / K, col = i % K;
      out_ptr<E>(p.dq)[(b * p.T + t0 + row) * row_k + h * K + col] = from_float<E>(park[row * K + col]);
    }
  }
}

// The adjoint walk, launched twice: DV computes dv = A^T dout + kh (D dS), NW warps per
// direction splitting V; otherwise dk = e^{-G} (B^T qh + (D dS) v) and the direction's gate
// gradients, NW warps per direction splitting K (the gate gradients are per K column). KT, VT:
// the K and V tiles of 16 a warp holds. Each warp keeps its part of the adjoint transposed,
// dS^T [V x K], as C tiles (rows V, columns K; the forward's S^T layout); for (D dS) v the
// B fragments are movmatrix transposes of its split words.
// Grid: (B * H); block: NW warps per direction.
template <class E, bool DV, int KT, int VT, int NW, bool BIDIR, int MIN_BLOCKS, bool LOCAL>
__global__ void __launch_bounds__(32 * NW * (BIDIR ? 2 : 1), MIN_BLOCKS)
gla_chunk_backward_dkv(GLA_KERNEL_PARAMS) {
  constexpr int KW = 2 * KT, VW = 2 * VT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int dir = warp / NW, part = warp % NW;
  const i64 b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  if (flagged(p.flags, blockIdx.x)) return;  // the sweeps redo this sequence
  const int segment = blockIdx.y, n_segments = gridDim.y;
  // the scan reads no local adjoint of a direction's last segment in its walk order
  if (LOCAL && segment == (dir == 0 ? 0 : n_segments - 1)) return;
  const i64 t0 = i64(segment) * p.chunk_len;
  const i64 T = p.T - t0 < p.chunk_len ? p.T - t0 : p.chunk_len;  // this block's tokens [t0, t0 + T)
  const i64 row_k = p.H * p.K, row_v = p.H * p.V;
  const i64 k_base = DV ? 0 : part * 16 * KT, v_base = DV ? part * 16 * VT : 0;  // this warp's columns
  const i64 k_col = k_base + 4 * KT * c, v_col = v_base + 4 * VT * c;  // this lane's first ones
  const i64 k_off = (b * p.T + t0) * row_k + h * p.K + k_col;
  const i64 v_off = (b * p.T + t0) * row_v + h * p.V + v_col;
  const E* q = in_ptr<E>(p.q) + k_off;
  const E* k = in_ptr<E>(p.k) + k_off;
  const E* g = in_ptr<E>(dir == 0 ? p.g : p.g_rev) + k_off;
  const E* v = in_ptr<E>(p.v) + v_off;
  const E* dout = in_ptr<E>(p.dout) + v_off;
  const float* q_dq = in_ptr<float>(p.a_ws) + dir * p.B * p.T * row_k + k_off;
  // several segments: the gate gradients' sums within the segment, for gla_gate_grad_fixup
  float* dg_local = out_ptr<float>(p.dg_ws) + dir * p.B * p.T * row_k + k_off;
  const i64 state_base = ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K * p.V;
  // dS^T's C-tile element (a, n, e) in a [K][V] row-major state
  auto state_offset = [&](int a, int n, int e) -> i64 {
    const i64 k_at = k_base + permuted_column(KT, n >> 1, 8 * (n & 1) + 2 * c + (e & 1));
    return k_at * p.V + v_base + permuted_column(VT, a, r + 8 * (e >> 1));
  };
  E* dg = out_ptr<E>(dir == 0 ? p.dg : p.dg_rev) + k_off;
  const float scale = p.scale;
  const int n_chunks = int((T + 15) / 16);

  // parked outputs of a bidirectional call: [T][V] (dv) or [T][K] (dk) float32
  float* park = reinterpret_cast<float*>(dynamic_smem());
  const i64 K = p.K, V = p.V, KV = DV ? p.V : p.K;
  const Midpoint mid = Midpoint::descending(T);
  constexpr bool HANDOVER = BIDIR && !LOCAL;  // outputs of both directions meet at the midpoint
  if (HANDOVER) {
    for (i64 i = threadIdx.x; i < (mid.met_end - mid.met_begin) * KV; i += blockDim.x) park[mid.met_begin * KV + i] = 0.0f;
  }

  const u32 one = Half16<E>::kOne;
  const u32 tri_low = ((2 * c <= r) ? one : 0u) | ((2 * c + 1 <= r) ? one << 16 : 0u);
  const u32 tri[4] = {tri_low, one | (one << 16), 0u, tri_low};
  // the upper triangle (t >= u) for the suffix sums
  const u32 one_bf16 = Half16<bf16>::kOne;  // the suffix sums' partner is split float32
  const u32 tri_up = ((2 * c >= r) ? one_bf16 : 0u) | ((2 * c + 1 >= r) ? one_bf16 << 16 : 0u);
  const u32 upper[4] = {tri_up, 0u, one_bf16 | (one_bf16 << 16), tri_up};

  float dS[VT][2 * KT][4];  // dS^T: [V tile][K octet][C tile]
#pragma unroll
  for (int a = 0; a < VT; ++a)
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dS[a][n][e] = 0.0f;
  if (!LOCAL && n_segments > 1) {  // the adjoint entering the segment from the later ones
    const float* entering = in_ptr<float>(p.enter) + state_base;
#pragma unroll
    for (int a = 0; a < VT; ++a)
#pragma unroll
      for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dS[a][n][e] = entering[state_offset(a, n, e)];
  }
  float log_decay[2 * KT][2] = {};  // the segment's sum of gates (LOCAL)
  float carry[2 * KT][2] = {};  // the gate gradient summed over the later chunks (dk warps)

  auto load = [&](int chunk, BackwardInputs<KW, VW>& in) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const i64 t = 16 * i64(chunk) + r + 8 * half;
      const bool valid = t < T;
      const i64 row = dir == 0 ? t : T - 1 - t;
      load_row<KW>(q + row * row_k, valid, in.q[half]);
      if (!LOCAL) load_row<KW>(k + row * row_k, valid, in.k[half]);
      load_row<KW>(g + row * row_k, valid, in.g[half]);
      if (!DV && !LOCAL) load_row<VW>(v + row * row_v, valid, in.v[half]);
      load_row<VW>(dout + row * row_v, valid, in.dout[half]);
    }
  };

  BackwardInputs<KW, VW> next = {};  // (the dv warps never load v, the local walk neither k)
  load(n_chunks - 1, next);
  for (int step = 0; step < n_chunks; ++step) {
    const int chunk = n_chunks - 1 - step;
    BackwardInputs<KW, VW> in = next;
    if (chunk > 0) load(chunk - 1, next);
    if (HANDOVER && step == mid.steps_before) block_sync();  // the other direction has parked

    float G[KT][8], col_total[KT][2][2], row_total[KT][2];
#pragma unroll
    for (int j = 0; j < KT; ++j)
      chunk_gate_sums<E>(tri, fragment_word<KT>(in.g, j, 0), fragment_word<KT>(in.g, j, 1),
                         fragment_word<KT>(in.g, j, 2), fragment_word<KT>(in.g, j, 3), r, c,
                         G[j], col_total[j], row_total[j]);

    // qh = s q e^{G}, split (A-fragment order), and its transposed words (B operand over
    // (token, K column): column octet 2j + half is qhT[j][2 half], qhT[j][2 half + 1])
    u32 qh_hi[KT][4], qh_lo[KT][4], qhT_hi[KT][4], qhT_lo[KT][4];
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const u32 word = fragment_word<KT>(in.q, j, w);
        split_bf16x2(Half16<E>::low(word) * scale * exp2_approx(G[j][2 * w] * kLog2e),
                     Half16<E>::high(word) * scale * exp2_approx(G[j][2 * w + 1] * kLog2e), qh_hi[j][w], qh_lo[j][w]);
        qhT_hi[j][w] = transpose8x8(qh_hi[j][w]), qhT_lo[j][w] = transpose8x8(qh_lo[j][w]);
      }
    // dout's transposed words: B operand over (token, V column) and, reordered, A of dout^T
    u32 dT[VT][4], dT_lo[VT][4];  // (dT_lo: float16's low parts)
#pragma unroll
    for (int a = 0; a < VT; ++a) loaded_fragment_transposed<E, VT>(in.dout, a, dT[a], dT_lo[a]);

    // D dS: the adjoint from the later chunks, decayed across this one (per K column)
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n) {
      const float d0 = exp2_approx(col_total[n >> 1][n & 1][0] * kLog2e);
      const float d1 = exp2_approx(col_total[n >> 1][n & 1][1] * kLog2e);
#pragma unroll
      for (int a = 0; a < VT; ++a) dS[a][n][0] *= d0, dS[a][n][1] *= d1, dS[a][n][2] *= d0, dS[a][n][3] *= d1;
      log_decay[n][0] += col_total[n >> 1][n & 1][0], log_decay[n][1] += col_total[n >> 1][n & 1][1];
    }

    const int rows_valid = int(T - 16 * i64(chunk));  // rows of this chunk inside the sequence
    if constexpr (LOCAL) {
      // only the adjoint: its update below
    } else if constexpr (DV) {
      // kh = k e^{-G}, split (A-fragment order)
      u32 kh_hi[KT][4], kh_lo[KT][4];
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const u32 word = fragment_word<KT>(in.k, j, w);
          split_bf16x2(Half16<E>::low(word) * exp2_approx(-G[j][2 * w] * kLog2e),
                       Half16<E>::high(word) * exp2_approx(-G[j][2 * w + 1] * kLog2e), kh_hi[j][w], kh_lo[j][w]);
        }
      // A = qh kh^T (scores, [t][s]); B = kh^T over (column, token s): octet 0 words a0, a2
      float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mma_split(sc[half], qh_hi[j], qh_lo[j], kh_hi[j][half], kh_hi[j][half + 2], kh_lo[j][half],
                    kh_lo[j][half + 2]);
        }
      mask_causal(sc, r, c);
      u32 at_hi[4], at_lo[4];
      transposed_lower_tile(sc, at_hi, at_lo);
      // dv = A^T dout + kh (D dS): C tiles [V octet][rows s]
      float dv[VT][2][4];
#pragma unroll
      for (int a = 0; a < VT; ++a)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float (&x)[4] = dv[a][half];
          x[0] = x[1] = x[2] = x[3] = 0.0f;
          mma_loaded_b<E>(x, at_hi, at_lo, dT[a][2 * half], dT[a][2 * half + 1], dT_lo[a][2 * half],
                          dT_lo[a][2 * half + 1]);
#pragma unroll
          for (int j = 0; j < KT; ++j) {
            // B = dS over (K column, V column): dS^T's C tiles of K octets 2j, 2j + 1, rows of `half`
            u32 s_hi[2], s_lo[2];
            split_bf16x2(dS[a][2 * j][2 * half], dS[a][2 * j][2 * half + 1], s_hi[0], s_lo[0]);
            split_bf16x2(dS[a][2 * j + 1][2 * half], dS[a][2 * j + 1][2 * half + 1], s_hi[1], s_lo[1]);
            mma_split(x, kh_hi[j], kh_lo[j], s_hi[0], s_hi[1], s_lo[0], s_lo[1]);
          }
        }
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        if (r + 8 * rh >= rows_valid) continue;
        const i64 t = 16 * i64(chunk) + r + 8 * rh;
        const i64 row = dir == 0 ? t : T - 1 - t;
        Float4 x[VT];
#pragma unroll
        for (int a = 0; a < VT; ++a)
          x[a] = Float4{dv[a][0][2 * rh], dv[a][0][2 * rh + 1], dv[a][1][2 * rh], dv[a][1][2 * rh + 1]};
        if (HANDOVER && !hand_over<VT>(mid, step, row, park + row * KV + v_col, x)) continue;
        store_outputs<E, VT>(out_ptr<E>(p.dv) + v_off + row * row_v, x);
      }
    } else {
      // B = dout v^T (scores, [t][s]), its transpose's A fragment
      float bs[2][4];
      dout_v_scores<E, VT, VW>(in.dout, in.v, bs);
      mask_causal(bs, r, c);
      u32 bt_hi[4], bt_lo[4];
      transposed_lower_tile(bs, bt_hi, bt_lo);
      // dk before e^{-G}: B^T qh + (D dS) v, C tiles [K octet][rows s]
      float dk[KT][2][4];
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float (&x)[4] = dk[j][half];
          x[0] = x[1] = x[2] = x[3] = 0.0f;
          mma_split(x, bt_hi, bt_lo, qhT_hi[j][2 * half], qhT_hi[j][2 * half + 1], qhT_lo[j][2 * half],
                    qhT_lo[j][2 * half + 1]);
          const int n = 2 * j + half;
#pragma unroll
          for (int a = 0; a < VT; ++a) {
            u32 va[4], va_lo[4];
            loaded_fragment<E, VT>(in.v, a, va, va_lo);
            // B = dS^T over (V column, K column): the transposes of dS^T's split words
            mma_transposed_split<E>(x, va, va_lo, dS[a][n][0], dS[a][n][1], dS[a][n][2], dS[a][n][3]);
          }
        }
      // dk = e^{-G} (...); the gate terms q dq - k dk of this direction
      float dG[KT][2][4];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const i64 t = 16 * i64(chunk) + r + 8 * rh;
        const bool valid = r + 8 * rh < rows_valid;
        const i64 row = dir == 0 ? t : T - 1 - t;
        Float4 qdq[KT];
        load_floats<KT>(q_dq + row * row_k, valid, qdq);
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          const float qx[4] = {qdq[j].x, qdq[j].y, qdq[j].z, qdq[j].w};
#pragma unroll
          for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int ge = 4 * half + 2 * rh + e;
              float& x = dk[j][half][2 * rh + e];
              x *= exp2_approx(-G[j][ge] * kLog2e);
              const u32 kw = fragment_word<KT>(in.k, j, ge >> 1);
              dG[j][half][2 * rh + e] = qx[2 * half + e] - (e ? Half16<E>::high(kw) : Half16<E>::low(kw)) * x;
            }
        }
      }
      // suffix sums over the chunk (upper triangle times dG: B = dG over (token, K column),
      // the transposes of its split row words) plus the carry from the later chunks
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) suffix_sums(dG[j][half], upper, carry[2 * j + half], c);
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        if (r + 8 * rh >= rows_valid) continue;
        const i64 t = 16 * i64(chunk) + r + 8 * rh;
        const i64 row = dir == 0 ? t : T - 1 - t;
        Float4 gx[KT], x[KT];
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          gx[j] = Float4{dG[j][0][2 * rh], dG[j][0][2 * rh + 1], dG[j][1][2 * rh], dG[j][1][2 * rh + 1]};
          x[j] = Float4{dk[j][0][2 * rh], dk[j][0][2 * rh + 1], dk[j][1][2 * rh], dk[j][1][2 * rh + 1]};
        }
        if (n_segments > 1) {
#pragma unroll
          for (int j = 0; j < KT; ++j) reinterpret_cast<Float4*>(dg_local + row * row_k)[j] = gx[j];
        } else {
          store_outputs<E, KT>(dg + row * row_k, gx);
        }
        if (HANDOVER && !hand_over<KT>(mid, step, row, park + row * KV + k_col, x)) continue;
        store_outputs<E, KT>(out_ptr<E>(p.dk) + k_off + row * row_k, x);
      }
    }

    // dS' = D dS + qh^T dout: A = dout^T (rows V), B = qh over (token, K column)
#pragma unroll
    for (int a = 0; a < VT; ++a) {
      const u32 dA[4] = {dT[a][0], dT[a][2], dT[a][1], dT[a][3]};
      const u32 dA_lo[4] = {dT_lo[a][0], dT_lo[a][2], dT_lo[a][1], dT_lo[a][3]};
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          mma_loaded_a<E>(dS[a][2 * j + half], dA, dA_lo, qhT_hi[j][2 * half], qhT_hi[j][2 * half + 1],
                          qhT_lo[j][2 * half], qhT_lo[j][2 * half + 1]);
    }
  }
  // this lane's K column of octet n, element e (every row holds the same column sums)
  auto k_column = [&](int n, int e) -> i64 { return k_base + permuted_column(KT, n >> 1, 8 * (n & 1) + 2 * c + e); };
  if (LOCAL) {  // the segment's local adjoint and its total decay, for gla_state_scan
    float* local = out_ptr<float>(p.enter) + state_base;
#pragma unroll
    for (int a = 0; a < VT; ++a)
#pragma unroll
      for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) local[state_offset(a, n, e)] = dS[a][n][e];
    if (r == 0) {
      float* decay = out_ptr<float>(p.decay) + ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K;
#pragma unroll
      for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) decay[k_column(n, e)] = exp2_approx(log_decay[n][e] * kLog2e);
    }
    return;
  }
  if (!DV && n_segments > 1 && r == 0) {  // the segment's whole gate-gradient sum, for the fixup
    float* total = out_ptr<float>(p.dg_total) + ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K;
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) total[k_column(n, e)] = carry[n][e];
  }
  if (HANDOVER) {
    block_sync();  // both directions' additions to the rows met after the barrier are in
    for (i64 i = threadIdx.x; i < (mid.met_end - mid.met_begin) * KV; i += blockDim.x) {
      const i64 row = mid.met_begin + i / KV, col = i % KV;
      const E x = from_float<E>(park[row * KV + col]);
      if (DV) out_ptr<E>(p.dv)[(b * p.T + t0 + row) * row_v + h * V + col] = x;
      else out_ptr<E>(p.dk)[(b * p.T + t0 + row) * row_k + h * K + col] = x;
    }
  }
}

// tile `j` (runtime, uniform across the warp) of a per-tile register array, without local
// memory: every tile is visited and the matching one kept
template <int N, int M, class T>
__device__ __forceinline__ void select_tile(const T (&x)[N][M], int j, T (&out)[M]) {
#pragma unroll
  for (int i = 0; i < M; ++i) out[i] = x[0][i];
#pragma unroll
  for (int t = 1; t < N; ++t)
#pragma unroll
    for (int i = 0; i < M; ++i) out[i] = j == t ? x[t][i] : out[i];
}

// the same for C-tile pairs, [tile][octet][element]
template <int N>
__device__ __forceinline__ void select_tile(const float (&x)[N][2][4], int j, float (&out)[2][4]) {
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      out[half][e] = x[0][half][e];
#pragma unroll
      for (int t = 1; t < N; ++t) out[half][e] = j == t ? x[t][half][e] : out[half][e];
    }
}

// The fused adjoint walk: dv, dk and the gate gradients in one pass over each direction's
// reversed order, computing the adjoint once. NW = KT = 2 warps per direction split V as the
// dv walk does (each keeps dS^T for its V columns and every K column) and compute dv as it
// does. dk's two products (B^T qh, with B = dout . v^T, and (D dS) v) sum over V, so each
// warp forms its V half's share for every K column and the two swap the halves they do not
// own through shared memory every step (double-buffered, one barrier a step); warp `part`
// then finishes dk and the gate gradients of K tile `part` as the dk walk does. Shared
// memory: the parked dv [T][V] float32 (bidirectional), the swap buffers, then (SHARED_STATE)
// each warp's part of the adjoint. A bidirectional block's dk does not go through shared
// memory (it would cost a third block an SM at ViG's 196 tokens): each direction stores its
// float32 rows in its own slot of `park` and the block writes slot 0 + slot 1 once both
// walks are done, so no step waits on a global load (reading the other direction's row
// mid-walk instead cost ~4 % at vigT_224). dk and dg sum the V halves in another order than
// the dk walk, so their bits differ from the two walks'; every launch of this walk (PREFETCH,
// SHARED_STATE, MIN_BLOCKS) gives the same bits.
// Grid: (B * H, segments); block: NW warps per direction.
template <class E, int KT, int VT, int NW, bool BIDIR, bool PREFETCH, bool SHARED_STATE, int MIN_BLOCKS>
__global__ void __launch_bounds__(32 * NW * (BIDIR ? 2 : 1), MIN_BLOCKS)
gla_chunk_backward_adjoint(GLA_KERNEL_PARAMS) {
  static_assert(NW == 2 && KT == NW, "one K tile of dk per warp of a direction");
  constexpr int KW = 2 * KT, VW = 2 * VT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int dir = warp / NW, part = warp % NW;
  const i64 b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  if (flagged(p.flags, blockIdx.x)) return;  // the sweeps redo this sequence
  const int segment = blockIdx.y, n_segments = gridDim.y;
  const i64 t0 = i64(segment) * p.chunk_len;
  const i64 T = p.T - t0 < p.chunk_len ? p.T - t0 : p.chunk_len;  // this block's tokens [t0, t0 + T)
  const i64 row_k = p.H * p.K, row_v = p.H * p.V;
  const i64 v_base = part * 16 * VT;  // this warp's V columns
  const i64 k_col = 4 * KT * c, v_col = v_base + 4 * VT * c;  // this lane's first ones (load order)
  const i64 own_col = k_col + 4 * part;  // this lane's 4 columns of K tile `part` (dk, dg)
  const i64 k_off = (b * p.T + t0) * row_k + h * p.K + k_col;
  const i64 v_off = (b * p.T + t0) * row_v + h * p.V + v_col;
  const i64 own_off = k_off + 4 * part;
  const E* q = in_ptr<E>(p.q) + k_off;
  const E* k = in_ptr<E>(p.k) + k_off;
  const E* g = in_ptr<E>(dir == 0 ? p.g : p.g_rev) + k_off;
  const E* v = in_ptr<E>(p.v) + v_off;
  const E* dout = in_ptr<E>(p.dout) + v_off;
  const float* q_dq = in_ptr<float>(p.a_ws) + dir * p.B * p.T * row_k + own_off;
  // several segments: the gate gradients' sums within the segment, for gla_gate_grad_fixup
  float* dg_local = out_ptr<float>(p.dg_ws) + dir * p.B * p.T * row_k + own_off;
  E* dg = out_ptr<E>(dir == 0 ? p.dg : p.dg_rev) + own_off;
  const i64 state_base = ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K * p.V;
  // dS^T's C-tile element (a, n, e) in a [K][V] row-major state
  auto state_offset = [&](int a, int n, int e) -> i64 {
    const i64 k_at = permuted_column(KT, n >> 1, 8 * (n & 1) + 2 * c + (e & 1));
    return k_at * p.V + v_base + permuted_column(VT, a, r + 8 * (e >> 1));
  };
  const float scale = p.scale;
  const int n_chunks = int((T + 15) / 16);
  const i64 K = p.K, V = p.V;

  float* park_v = reinterpret_cast<float*>(dynamic_smem());  // [T][V] (bidirectional)
  Float4* swap = reinterpret_cast<Float4*>(park_v + (BIDIR ? p.chunk_len * V : 0));  // [dir][part][parity][2][32]
  // [2 directions][chunk_len][K]: this block's dk hand-over slots
  float* park_k = out_ptr<float>(p.park) + (i64(blockIdx.x) * n_segments + segment) * 2 * p.chunk_len * K;
  const Midpoint mid = Midpoint::descending(T);
  if (BIDIR) {
    for (i64 i = threadIdx.x; i < (mid.met_end - mid.met_begin) * V; i += blockDim.x) park_v[mid.met_begin * V + i] = 0.0f;
  }

  const u32 one = Half16<E>::kOne;
  const u32 tri_low = ((2 * c <= r) ? one : 0u) | ((2 * c + 1 <= r) ? one << 16 : 0u);
  const u32 tri[4] = {tri_low, one | (one << 16), 0u, tri_low};
  const u32 one_bf16 = Half16<bf16>::kOne;  // the suffix sums' partner is split float32
  const u32 tri_up = ((2 * c >= r) ? one_bf16 : 0u) | ((2 * c + 1 >= r) ? one_bf16 << 16 : 0u);
  const u32 upper[4] = {tri_up, 0u, one_bf16 | (one_bf16 << 16), tri_up};

  // dS^T: [V tile][K octet][C tile] in registers, or (SHARED_STATE) in shared memory between
  // its uses — this warp's [V tile][K octet] quads of 32 lanes, after the swap buffers — and
  // decayed where it is read: ~40 registers fewer, for three four-warp blocks an SM unspilled.
  // The same float operations in the same order either way, so the same bits.
  float dS[VT][2 * KT][4];
  Float4* dS_shared = swap + (BIDIR ? 2 : 1) * NW * 2 * 2 * 32 + warp * (VT * 2 * KT * 32) + lane;
  float decay[2 * KT][2] = {};  // this chunk's D per K column (SHARED_STATE)
#pragma unroll
  for (int a = 0; a < VT; ++a)
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n) {
      float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (n_segments > 1) {  // the adjoint entering the segment from the later ones
        const float* entering = in_ptr<float>(p.enter) + state_base;
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = entering[state_offset(a, n, e)];
      }
      if constexpr (SHARED_STATE) {
        dS_shared[(a * 2 * KT + n) * 32] = Float4{x[0], x[1], x[2], x[3]};
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) dS[a][n][e] = x[e];
      }
    }
  // D dS's C-tile elements (a, n)
  auto adjoint = [&](int a, int n) -> Float4 {
    if constexpr (SHARED_STATE) {
      const Float4 x = dS_shared[(a * 2 * KT + n) * 32];
      return Float4{x.x * decay[n][0], x.y * decay[n][1], x.z * decay[n][0], x.w * decay[n][1]};
    } else {
      return Float4{dS[a][n][0], dS[a][n][1], dS[a][n][2], dS[a][n][3]};  // decayed in place
    }
  };
  float carry[2][2] = {};  // the gate gradient of K tile `part` summed over the later chunks

  auto load = [&](int chunk, BackwardInputs<KW, VW>& in) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const i64 t = 16 * i64(chunk) + r + 8 * half;
      const bool valid = t < T;
      const i64 row = dir == 0 ? t : T - 1 - t;
      load_row<KW>(q + row * row_k, valid, in.q[half]);
      load_row<KW>(k + row * row_k, valid, in.k[half]);
      load_row<KW>(g + row * row_k, valid, in.g[half]);
      load_row<VW>(v + row * row_v, valid, in.v[half]);
      load_row<VW>(dout + row * row_v, valid, in.dout[half]);
    }
  };

  BackwardInputs<KW, VW> next;  // PREFETCH: the next chunk's loads in flight during this one
  if (PREFETCH) load(n_chunks - 1, next);
  for (int step = 0; step < n_chunks; ++step) {
    const int chunk = n_chunks - 1 - step;
    BackwardInputs<KW, VW> in;
    if (PREFETCH) {
      in = next;
      if (chunk > 0) load(chunk - 1, next);
    } else {
      load(chunk, in);
    }
    if (BIDIR && step == mid.steps_before) block_sync();  // the other direction has parked

    float G[KT][8], col_total[KT][2][2], row_total[KT][2];
#pragma unroll
    for (int j = 0; j < KT; ++j)
      chunk_gate_sums<E>(tri, fragment_word<KT>(in.g, j, 0), fragment_word<KT>(in.g, j, 1),
                         fragment_word<KT>(in.g, j, 2), fragment_word<KT>(in.g, j, 3), r, c,
                         G[j], col_total[j], row_total[j]);

    // qh = s q e^{G} and kh = k e^{-G}, split (A-fragment order); qh's transposed words (B
    // operand over (token, K column): octet 2j + half is qhT[j][2 half], qhT[j][2 half + 1])
    u32 qh_hi[KT][4], qh_lo[KT][4], qhT_hi[KT][4], qhT_lo[KT][4], kh_hi[KT][4], kh_lo[KT][4];
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const u32 qw = fragment_word<KT>(in.q, j, w), kw = fragment_word<KT>(in.k, j, w);
        const float e0 = exp2_approx(G[j][2 * w] * kLog2e), e1 = exp2_approx(G[j][2 * w + 1] * kLog2e);
        split_bf16x2(Half16<E>::low(qw) * scale * e0, Half16<E>::high(qw) * scale * e1, qh_hi[j][w], qh_lo[j][w]);
        qhT_hi[j][w] = transpose8x8(qh_hi[j][w]), qhT_lo[j][w] = transpose8x8(qh_lo[j][w]);
        split_bf16x2(Half16<E>::low(kw) * exp2_approx(-G[j][2 * w] * kLog2e),
                     Half16<E>::high(kw) * exp2_approx(-G[j][2 * w + 1] * kLog2e), kh_hi[j][w], kh_lo[j][w]);
      }
    // the gate sums and k's words of K tile `part`, for dk and the gate gradients
    float Gp[8];
    u32 kp[4];
    select_tile<KT, 8>(G, part, Gp);
    {
      u32 kw[KT][4];
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int w = 0; w < 4; ++w) kw[j][w] = fragment_word<KT>(in.k, j, w);
      select_tile<KT, 4>(kw, part, kp);
    }
    // dout's transposed words: B operand over (token, V column) and, reordered, A of dout^T
    u32 dT[VT][4], dT_lo[VT][4];  // (dT_lo: float16's low parts)
#pragma unroll
    for (int a = 0; a < VT; ++a) loaded_fragment_transposed<E, VT>(in.dout, a, dT[a], dT_lo[a]);

    // D dS: the adjoint from the later chunks, decayed across this one (per K column)
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n) {
      const float d0 = exp2_approx(col_total[n >> 1][n & 1][0] * kLog2e);
      const float d1 = exp2_approx(col_total[n >> 1][n & 1][1] * kLog2e);
      if constexpr (SHARED_STATE) {
        decay[n][0] = d0, decay[n][1] = d1;
      } else {
#pragma unroll
        for (int a = 0; a < VT; ++a) dS[a][n][0] *= d0, dS[a][n][1] *= d1, dS[a][n][2] *= d0, dS[a][n][3] *= d1;
      }
    }
    const int rows_valid = int(T - 16 * i64(chunk));  // rows of this chunk inside the sequence

    // A = qh kh^T (scores) and its transpose's A fragment, for dv below (first: qh's A-order
    // words are dead after it)
    u32 at_hi[4], at_lo[4];
    {
      float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          mma_split(sc[half], qh_hi[j], qh_lo[j], kh_hi[j][half], kh_hi[j][half + 2], kh_lo[j][half],
                    kh_lo[j][half + 2]);
      mask_causal(sc, r, c);
      transposed_lower_tile(sc, at_hi, at_lo);
    }

    // dv = A^T dout + kh (D dS) over this warp's V columns, as the dv walk
    {
      float dv[VT][2][4];
#pragma unroll
      for (int a = 0; a < VT; ++a) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float (&x)[4] = dv[a][half];
          x[0] = x[1] = x[2] = x[3] = 0.0f;
          mma_loaded_b<E>(x, at_hi, at_lo, dT[a][2 * half], dT[a][2 * half + 1], dT_lo[a][2 * half],
                          dT_lo[a][2 * half + 1]);
        }
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          // B = dS over (K column, V column): dS^T's C tiles of K octets 2j, 2j + 1
          const Float4 s0 = adjoint(a, 2 * j), s1 = adjoint(a, 2 * j + 1);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            u32 s_hi[2], s_lo[2];
            split_bf16x2(half ? s0.z : s0.x, half ? s0.w : s0.y, s_hi[0], s_lo[0]);
            split_bf16x2(half ? s1.z : s1.x, half ? s1.w : s1.y, s_hi[1], s_lo[1]);
            mma_split(dv[a][half], kh_hi[j], kh_lo[j], s_hi[0], s_hi[1], s_lo[0], s_lo[1]);
          }
        }
      }
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        if (r + 8 * rh >= rows_valid) continue;
        const i64 t = 16 * i64(chunk) + r + 8 * rh;
        const i64 row = dir == 0 ? t : T - 1 - t;
        Float4 x[VT];
#pragma unroll
        for (int a = 0; a < VT; ++a)
          x[a] = Float4{dv[a][0][2 * rh], dv[a][0][2 * rh + 1], dv[a][1][2 * rh], dv[a][1][2 * rh + 1]};
        if (BIDIR && !hand_over<VT>(mid, step, row, park_v + row * V + v_col, x)) continue;
        store_outputs<E, VT>(out_ptr<E>(p.dv) + v_off + row * row_v, x);
      }
    }

    // dk before e^{-G}, this warp's V columns' share for every K column: B_h^T qh + (D dS_h) v_h
    float dk[KT][2][4];
    {
      float bs[2][4];
      dout_v_scores<E, VT, VW>(in.dout, in.v, bs);
      mask_causal(bs, r, c);
      u32 bt_hi[4], bt_lo[4];
      transposed_lower_tile(bs, bt_hi, bt_lo);
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float (&x)[4] = dk[j][half];
          x[0] = x[1] = x[2] = x[3] = 0.0f;
          mma_split(x, bt_hi, bt_lo, qhT_hi[j][2 * half], qhT_hi[j][2 * half + 1], qhT_lo[j][2 * half],
                    qhT_lo[j][2 * half + 1]);
          const int n = 2 * j + half;
#pragma unroll
          for (int a = 0; a < VT; ++a) {
            u32 va[4], va_lo[4];
            loaded_fragment<E, VT>(in.v, a, va, va_lo);
            const Float4 sq = adjoint(a, n);
            mma_transposed_split<E>(x, va, va_lo, sq.x, sq.y, sq.z, sq.w);
          }
        }
    }
    // swap: the other warp's K tile goes out, this warp's tile comes in (buffers alternate
    // by step, so one barrier a step orders a write after the other warp's last read)
    float own[2][4];
    {
      const int parity = step & 1;
      Float4* out = swap + ((dir * NW + part) * 2 + parity) * 2 * 32 + lane;
      const Float4* in_swap = swap + ((dir * NW + (1 - part)) * 2 + parity) * 2 * 32 + lane;
      float sent[2][4];
      select_tile<KT>(dk, 1 - part, sent);
      select_tile<KT>(dk, part, own);
      out[0] = Float4{sent[0][0], sent[0][1], sent[0][2], sent[0][3]};
      out[32] = Float4{sent[1][0], sent[1][1], sent[1][2], sent[1][3]};
      group_sync(1 + dir, 32 * NW);
      const Float4 o0 = in_swap[0], o1 = in_swap[32];
      own[0][0] += o0.x, own[0][1] += o0.y, own[0][2] += o0.z, own[0][3] += o0.w;
      own[1][0] += o1.x, own[1][1] += o1.y, own[1][2] += o1.z, own[1][3] += o1.w;
    }
    // dk = e^{-G} (...) and the gate terms q dq - k dk of K tile `part`
    {
      float dG[2][4];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const i64 t = 16 * i64(chunk) + r + 8 * rh;
        const bool valid = r + 8 * rh < rows_valid;
        const i64 row = dir == 0 ? t : T - 1 - t;
        Float4 qdq[1];
        load_floats<1>(q_dq + row * row_k, valid, qdq);
        const float qx[4] = {qdq[0].x, qdq[0].y, qdq[0].z, qdq[0].w};
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int ge = 4 * half + 2 * rh + e;
            float& x = own[half][2 * rh + e];
            x *= exp2_approx(-Gp[ge] * kLog2e);
            const u32 kw = kp[ge >> 1];
            dG[half][2 * rh + e] = qx[2 * half + e] - (e ? Half16<E>::high(kw) : Half16<E>::low(kw)) * x;
          }
      }
      // suffix sums over the chunk plus the carry from the later chunks (as the dk walk)
#pragma unroll
      for (int half = 0; half < 2; ++half) suffix_sums(dG[half], upper, carry[half], c);
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        if (r + 8 * rh >= rows_valid) continue;
        const i64 t = 16 * i64(chunk) + r + 8 * rh;
        const i64 row = dir == 0 ? t : T - 1 - t;
        Float4 gx[1] = {Float4{dG[0][2 * rh], dG[0][2 * rh + 1], dG[1][2 * rh], dG[1][2 * rh + 1]}};
        Float4 x[1] = {Float4{own[0][2 * rh], own[0][2 * rh + 1], own[1][2 * rh], own[1][2 * rh + 1]}};
        if (n_segments > 1) reinterpret_cast<Float4*>(dg_local + row * row_k)[0] = gx[0];
        else store_outputs<E, 1>(dg + row * row_k, gx);
        if (BIDIR) reinterpret_cast<Float4*>(park_k + (dir * p.chunk_len + row) * K + own_col)[0] = x[0];
        else store_outputs<E, 1>(out_ptr<E>(p.dk) + own_off + row * row_k, x);
      }
    }

    // dS' = D dS + qh^T dout: A = dout^T (rows V), B = qh over (token, K column)
#pragma unroll
    for (int a = 0; a < VT; ++a) {
      const u32 dA[4] = {dT[a][0], dT[a][2], dT[a][1], dT[a][3]};
      const u32 dA_lo[4] = {dT_lo[a][0], dT_lo[a][2], dT_lo[a][1], dT_lo[a][3]};
#pragma unroll
      for (int j = 0; j < KT; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int n = 2 * j + half;
          if constexpr (SHARED_STATE) {
            const Float4 sq = adjoint(a, n);
            float x[4] = {sq.x, sq.y, sq.z, sq.w};
            mma_loaded_a<E>(x, dA, dA_lo, qhT_hi[j][2 * half], qhT_hi[j][2 * half + 1], qhT_lo[j][2 * half],
                            qhT_lo[j][2 * half + 1]);
            dS_shared[(a * 2 * KT + n) * 32] = Float4{x[0], x[1], x[2], x[3]};
          } else {
            mma_loaded_a<E>(dS[a][n], dA, dA_lo, qhT_hi[j][2 * half], qhT_hi[j][2 * half + 1], qhT_lo[j][2 * half],
                            qhT_lo[j][2 * half + 1]);
          }
        }
    }
  }
  if (n_segments > 1 && r == 0) {  // the segment's whole gate-gradient sum, for the fixup
    float* total = out_ptr<float>(p.dg_total) + ((i64(blockIdx.x) * 2 + dir) * n_segments + segment) * p.K;
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int e = 0; e < 2; ++e) total[permuted_column(KT, part, 8 * half + 2 * c + e)] = carry[half][e];
  }
  if (BIDIR) {
    block_sync();  // both directions' additions to the rows met after the barrier are in
    const i64 met_rows = mid.met_end - mid.met_begin;
    for (i64 i = threadIdx.x; i < met_rows * V; i += blockDim.x) {
      const i64 row = mid.met_begin + i / V, col = i % V;
      out_ptr<E>(p.dv)[(b * p.T + t0 + row) * row_v + h * V + col] = from_float<E>(park_v[row * V + col]);
    }
    // dk: both directions' rows, slot 0 + slot 1, four columns a thread; the loads of kUnroll
    // rounds go out before their stores (the compiler may not move a load above a store)
    constexpr int kUnroll = 4;
    const Float4* slots = reinterpret_cast<const Float4*>(park_k);
    const int K4 = int(K / 4), n = int(T) * K4, other = int(p.chunk_len) * K4;
    for (int first = threadIdx.x; first < n; first += kUnroll * blockDim.x) {
      Float4 x[kUnroll], y[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = first + u * blockDim.x;
        if (i < n) x[u] = slots[i], y[u] = slots[other + i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = first + u * blockDim.x;
        if (i >= n) break;
        Float4 sum[1] = {Float4{x[u].x + y[u].x, x[u].y + y[u].y, x[u].z + y[u].z, x[u].w + y[u].w}};
        store_outputs<E, 1>(out_ptr<E>(p.dk) + (b * p.T + t0 + i / K4) * row_k + h * K + 4 * (i % K4), sum);
      }
    }
  }
}

}  // namespace gla
