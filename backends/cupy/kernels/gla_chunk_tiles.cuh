// Pieces the tensor-core kernels (gla_chunk_forward.cu, gla_chunk_backward.cu) share: row
// loads and stores in the permuted column order, A-fragment words of loaded rows, the
// bfloat16 split of float32 values, the in-chunk cumulative gate sums, the bidirectional
// midpoint bookkeeping. See gla_chunk_forward.cu's header for the layouts.
#pragma once

#include "gla_common.cuh"
#include "gla_warp_matrix.cuh"

namespace gla {

// a chunk takes the decay ratio when every in-chunk cumulative gate sum lies in [-32, 32]:
// e^{±G} then stays within float32 (and bfloat16) range with room for |q|, |k| up to ~1e24
constexpr float kRatioMaxLogDecay = 32.0f;
constexpr float kLog2e = 1.4426950408889634f;

// `words` 32-bit words (2 bfloat16 each) of one row from `from` (16-byte aligned when
// words % 4 == 0, else 8-byte aligned), or zeros for a row past the sequence's end
template <int words, class E>
__device__ __forceinline__ void load_row(const E* from, bool valid, u32 (&w)[words]) {
  if (!valid) {
#pragma unroll
    for (int i = 0; i < words; ++i) w[i] = 0u;
    return;
  }
  if constexpr (words % 4 == 0) {
    const uint4* p = reinterpret_cast<const uint4*>(from);
#pragma unroll
    for (int i = 0; i < words / 4; ++i) {
      const uint4 x = p[i];
      w[4 * i] = x.x, w[4 * i + 1] = x.y, w[4 * i + 2] = x.z, w[4 * i + 3] = x.w;
    }
  } else {
    const uint2* p = reinterpret_cast<const uint2*>(from);
#pragma unroll
    for (int i = 0; i < words / 2; ++i) {
      const uint2 x = p[i];
      w[2 * i] = x.x, w[2 * i + 1] = x.y;
    }
  }
}

template <int words, class E>
__device__ __forceinline__ void store_row(E* to, const u32 (&w)[words]) {
  if constexpr (words % 4 == 0) {
    uint4* p = reinterpret_cast<uint4*>(to);
#pragma unroll
    for (int i = 0; i < words / 4; ++i) p[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  } else {
    uint2* p = reinterpret_cast<uint2*>(to);
#pragma unroll
    for (int i = 0; i < words / 2; ++i) p[i] = make_uint2(w[2 * i], w[2 * i + 1]);
  }
}

// A-fragment element e (0..7) of K tile j: word e / 2 of {a0, a1, a2, a3}, half e % 2; row
// half (e / 2) % 2, column pair e / 4. From loaded row words: a0 = row 0 word 2j, a1 = row 1
// word 2j, a2 = row 0 word 2j + 1, a3 = row 1 word 2j + 1.
template <int KT>
__device__ __forceinline__ u32 fragment_word(const u32 (&rows)[2][2 * KT], int j, int word) {
  return rows[word & 1][2 * j + (word >> 1)];
}

template <class E, int KT>
__device__ __forceinline__ void unpack(const u32 (&rows)[2][2 * KT], float (&x)[KT][8]) {
#pragma unroll
  for (int j = 0; j < KT; ++j)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const u32 word = fragment_word<KT>(rows, j, w);
      x[j][2 * w] = Half16<E>::low(word), x[j][2 * w + 1] = Half16<E>::high(word);
    }
}

template <int KT>
__device__ __forceinline__ void split(const float (&x)[KT][8], u32 (&hi)[KT][4], u32 (&lo)[KT][4]) {
#pragma unroll
  for (int j = 0; j < KT; ++j)
#pragma unroll
    for (int w = 0; w < 4; ++w) split_bf16x2(x[j][2 * w], x[j][2 * w + 1], hi[j][w], lo[j][w]);
}


// The memory column (within a group of `tiles` 16-wide tiles loaded by one warp) of logical
// column l (0-15) of tile j: lane c loads columns [4 tiles c, 4 tiles c + 4 tiles), and its
// A-fragment columns 2c, 2c + 1 of tile j are memory columns 4 tiles c + 4j + {0, 1}, its
// columns 2c + 8, 2c + 9 the next two
__device__ __forceinline__ int permuted_column(int tiles, int j, int l) {
  return 4 * tiles * ((l & 7) >> 1) + 4 * j + 2 * (l >> 3) + (l & 1);
}

// One lane's rows r and r + 8 of a float32 [16 x 4 KT] block (its columns of a C-tile set in
// the load order): `n` Float4 at `from`, or zeros past the sequence's end
template <int n>
__device__ __forceinline__ void load_floats(const float* from, bool valid, Float4 (&x)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) x[i] = valid ? reinterpret_cast<const Float4*>(from)[i] : Float4{0.0f, 0.0f, 0.0f, 0.0f};
}

// The in-chunk cumulative gate sums G_t = g_0 + ... + g_t of K tile j's 16 columns, as a
// product with the lower triangle of ones (A fragment `tri`): its C tiles (column octets
// 0-7, 8-15) are the A-fragment order of the gates themselves, G[4 half + e] = tile half's
// element e. `col_total[half][e]`: the chunk's total (row 15) of this lane's columns 2c + e
// of octet `half`; `row_total[half]`: the total of column r + 8 half (for a [K x *] C tile's
// rows). Returns whether every sum lies within the decay ratio's range.
template <class E>
__device__ __forceinline__ bool chunk_gate_sums(const u32 (&tri)[4], u32 w0, u32 w1, u32 w2, u32 w3, int r, int c,
                                                float (&G)[8], float (&col_total)[2][2], float (&row_total)[2]) {
  bool ok = true;
  const u32 words[4] = {w0, w1, w2, w3};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // B = g over (time, column): the transposes of the words of column octet `half`
    Half16<E>::mma(acc, tri, transpose8x8(words[2 * half]), transpose8x8(words[2 * half + 1]));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      G[4 * half + e] = acc[e];
      ok = ok && acc[e] >= -kRatioMaxLogDecay && acc[e] <= kRatioMaxLogDecay;
    }
    // row 15 lives in lanes 28-31 (elements 2, 3: columns 2c', 2c' + 1)
    col_total[half][0] = shfl_idx(acc[2], 28 + c);
    col_total[half][1] = shfl_idx(acc[3], 28 + c);
    const float even = shfl_idx(acc[2], 28 + (r >> 1)), odd = shfl_idx(acc[3], 28 + (r >> 1));
    row_total[half] = (r & 1) ? odd : even;
  }
  return ok;
}

// Where the two walks of a bidirectional block hand their outputs over: during its first
// `steps_before` chunk steps each direction parks its float32 outputs in shared memory, then
// every warp meets at a barrier; afterwards a row the other direction parked is summed and
// written, and rows in [met_begin, met_end) (both directions reach them after the barrier)
// are summed into zeroed shared memory by atomic additions (two terms onto zero: the same bits
// in either order) and written once both are in.
struct Midpoint {
  int steps_before;
  i64 met_begin, met_end;
  // walks that run forward over their chunks (chunk i at step i)
  __device__ static Midpoint ascending(i64 T) {
    const i64 first = 16 * (T / 32);
    return Midpoint{int(T / 32), first, T - first};
  }
  // walks that run backward over their chunks (chunk n - 1 - i at step i): in its first steps
  // the forward direction covers rows [P, T), the reverse one [0, T - P), P = 16 (n - steps)
  __device__ static Midpoint descending(i64 T) {
    const i64 n = (T + 15) / 16, steps = T / 32, P = 16 * (n - steps);
    return Midpoint{int(steps), T - P > 0 ? T - P : 0, P < T ? P : T};
  }
  __device__ bool met(i64 row) const { return row >= met_begin && row < met_end; }
};

// A bidirectional walk's row of `n` Float4 outputs (`x`, this lane's contiguous columns),
// handed over at the midpoint through `parked` (the row's place in shared memory); returns
// whether the caller writes the sum now (x then holds it)
template <int n>
__device__ __forceinline__ bool hand_over(const Midpoint& m, int step, i64 row, float* parked, Float4 (&x)[n]) {
  if (step < m.steps_before) {
#pragma unroll
    for (int i = 0; i < n; ++i) reinterpret_cast<Float4*>(parked)[i] = x[i];
    return false;
  }
  if (m.met(row)) {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      shared_add(parked + 4 * i, x[i].x), shared_add(parked + 4 * i + 1, x[i].y);
      shared_add(parked + 4 * i + 2, x[i].z), shared_add(parked + 4 * i + 3, x[i].w);
    }
    return false;
  }
#pragma unroll
  for (int i = 0; i < n; ++i) {
    const Float4 other = reinterpret_cast<const Float4*>(parked)[i];
    x[i].x += other.x, x[i].y += other.y, x[i].z += other.z, x[i].w += other.w;
  }
  return true;
}

// this lane's 4 n outputs of one row as packed 16-bit pairs, stored at `to`
template <class E, int n>
__device__ __forceinline__ void store_outputs(E* to, const Float4 (&x)[n]) {
  u32 w[2 * n];
#pragma unroll
  for (int i = 0; i < n; ++i) w[2 * i] = Half16<E>::pack(x[i].x, x[i].y), w[2 * i + 1] = Half16<E>::pack(x[i].z, x[i].w);
  store_row<2 * n>(to, w);
}

}  // namespace gla
