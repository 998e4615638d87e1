// Streaming covariance kernel: C_upper += (X - shift)^T (X - shift) and the column sums of
// (X - shift), in one pass over the rows of X. See rmtkd_cuda.h for the contract.
//
// Algorithm
// - Output tiles are BT x BT (BT = 128, or 64 when d <= 64). The grid's x axis enumerates only
//   the upper-triangular tile pairs (ti <= tj), column by column: p = tj (tj + 1) / 2 + ti
//   (upper_pair inverts it), so consecutive blocks share the column block tj. Tiles below the
//   diagonal are never launched. The y axis is the row split (1 for covariance_update).
// - Block (p, s) owns output tile (ti, tj) for rows [s R, min(n, (s + 1) R)) (all rows when
//   unsplit) and loops over them BK rows at a time: global -> registers (16-byte vector loads
//   where aligned, scalar bounds-checked loads otherwise; masked-out rows are not read) ->
//   shift subtracted in fp32, out-of-range / masked elements set to exact 0 -> shared memory
//   (two stages; the next chunk's loads are in flight while the current one is multiplied).
//   Diagonal tiles (ti == tj) load one tile per step (A = B) and also form the column sums,
//   each thread summing its fixed columns, then a fixed-order reduction over threads.
// - Precision: fp32 rows: SIMT fmaf, 8x8 (4x4 for BT = 64) outputs per thread, exact fp32
//   (no TF32 anywhere). fp16/bf16 rows: the centred fp32 value is rounded to the input dtype
//   and multiplied with WMMA 16x16x16 (fp32 accumulation); the MMA accumulator is flushed
//   into a separate fp32 accumulator fragment every 512 rows (one MMA accumulator over 65536
//   rows gave 2-3e-4 relative error on Hopper; 512-row chunks keep it at the fp32 level).
//   Column sums add the same rounded values that enter the product.
// - Determinism: unsplit, each output element is formed by one thread in a fixed order and
//   added once to c. Split (covariance_update_split): partial tiles go to a caller workspace
//   and a second kernel adds them in split order 0..S-1. No atomics anywhere.
// - Indexing: rows and element offsets in int64 (n * ldx may exceed 2^31); columns < 2^31.
#include "rmtkd_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace rmtkd {
namespace {

constexpr int kThreads = 256;    // 8 warps per block
constexpr int kFlushRows = 512;  // rows per tensor-core accumulation chunk

// ---------------------------------------------------------------------------------------
// dtype helpers
template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// BEGIN upper_pair (host-tested: the tile enumeration)
// Inverse of p = j (j + 1) / 2 + i with 0 <= i <= j: the p-th upper-triangular tile pair.
__host__ __device__ inline void upper_pair(int64_t p, int64_t& i, int64_t& j) {
  int64_t jj = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) * 0.5);
  while (jj > 0 && jj * (jj + 1) / 2 > p) --jj;
  while ((jj + 1) * (jj + 2) / 2 <= p) ++jj;
  j = jj;
  i = p - jj * (jj + 1) / 2;
}
// END upper_pair

// ---------------------------------------------------------------------------------------
// A ROWS x COLS tile of a row-major matrix held in registers, VEC = 16 bytes per access.
// Thread t owns columns [(t % VPR) VEC, +VEC) of rows t / VPR + p RSTEP, p < PER: its
// columns are fixed, which the column sums rely on.
template <typename T, int ROWS, int COLS>
struct TileRegs {
  static constexpr int kRows = ROWS;
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static constexpr int VPR = COLS / VEC;
  static constexpr int RSTEP = kThreads / VPR;
  static constexpr int PER = (ROWS + RSTEP - 1) / RSTEP;
  static_assert(COLS % VEC == 0, "tile width must be a multiple of the vector width");
  static_assert(kThreads % VPR == 0, "a row of vectors must divide the block");
  static_assert(PER <= 32, "row-valid bits must fit a word");

  alignas(16) T v[PER][VEC];
  uint32_t rowok;  // bit p: row p exists (and is kept by the mask)

  static __device__ __forceinline__ int col_of(int tid) { return (tid % VPR) * VEC; }
  static __device__ __forceinline__ int row_of(int tid, int p) { return tid / VPR + p * RSTEP; }

  // Tile rows [row0, row0 + ROWS), columns [col0, col0 + COLS) of g (nrows x ncols, leading
  // dim ld); missing elements are 0. vec_ok: g is 16-byte aligned and ld, col0 are multiples
  // of VEC, so a full in-range vector can be read with one 16-byte load.
  __device__ __forceinline__ void load(const T* __restrict__ g, int64_t ld, int64_t nrows,
                                       int64_t ncols, int64_t row0, int64_t col0,
                                       const uint8_t* __restrict__ mask, bool vec_ok, int tid) {
    const int64_t col = col0 + col_of(tid);
    const T zero = Num<T>::from_f(0.0f);
    rowok = 0u;
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int r = row_of(tid, p);
      const int64_t row = row0 + r;
      bool ok = (r < ROWS) && (row < nrows);
      if (ok && mask != nullptr) ok = mask[row] != 0;
      if (ok) rowok |= 1u << p;
      if (ok && vec_ok && col + VEC <= ncols) {
        *reinterpret_cast<uint4*>(v[p]) = *reinterpret_cast<const uint4*>(g + row * ld + col);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[p][e] = (ok && col + e < ncols) ? g[row * ld + col + e] : zero;
      }
    }
  }
};

template <typename T, int BT>
struct CovCfg {
  static constexpr bool kLowp = sizeof(T) == 2;
  static constexpr int BK = kLowp ? 32 : 16;                  // rows per step
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));  // one 16-byte vector
  static constexpr int LDS = BT + PAD;                         // smem leading dim (elements)
  static constexpr int STAGE = BK * LDS;                        // elements per operand stage
  using Loader = TileRegs<T, BK, BT>;
  static constexpr int kEpiLd = 20;                             // WMMA epilogue scratch ld
  static constexpr int kColsumFloats = kThreads * Loader::VEC;  // (threads per column) x BT
  static constexpr int kEpiFloats = kLowp ? (kThreads / 32) * 16 * kEpiLd : 0;
  static constexpr int kRedFloats = kColsumFloats > kEpiFloats ? kColsumFloats : kEpiFloats;
  static_assert(kFlushRows % BK == 0, "flush interval must be whole steps");
  static_assert(Loader::RSTEP * BT == kColsumFloats, "colsum scratch layout");
  static_assert(BK % Loader::RSTEP == 0, "loader must cover the step exactly");
  static constexpr size_t kSmemBytes =
      sizeof(T) * 4 * static_cast<size_t>(STAGE) + sizeof(float) * kRedFloats;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory must stay within 48 KiB");
};

struct CovArgs {
  const void* x;
  int64_t n, d, ldx;
  const float* shift;
  const uint8_t* mask;
  float* c;
  float* colsum;
  float* ws;             // split: partial tiles, [splits][d][d] (upper entries written)
  float* ws_colsum;      // split: partial column sums, [splits][d]
  int64_t rows_per_split;
  bool vec_ok;
};

// Shift the loaded values, zero the missing ones, round to T, store one stage to smem.
template <typename T, class L>
__device__ __forceinline__ void store_centred(const L& l, T* __restrict__ s, int lds, int64_t col0,
                                              int64_t d, const float (&sh)[L::VEC], bool sum,
                                              float (&csum)[L::VEC], int tid) {
  const int c = L::col_of(tid);
#pragma unroll
  for (int p = 0; p < L::PER; ++p) {
    const int r = L::row_of(tid, p);
    const bool rok = (l.rowok >> p) & 1u;
    alignas(16) T out[L::VEC];
#pragma unroll
    for (int e = 0; e < L::VEC; ++e) {
      const bool ok = rok && (col0 + c + e < d);
      const T tv = Num<T>::from_f(ok ? Num<T>::to_f(l.v[p][e]) - sh[e] : 0.0f);
      out[e] = tv;
      if (sum) csum[e] += Num<T>::to_f(tv);
    }
    if (r < L::kRows) *reinterpret_cast<uint4*>(s + r * lds + c) = *reinterpret_cast<const uint4*>(out);
  }
}

// Adds (split: stores) one finished output value, upper triangle and in-range only.
template <bool SPLIT>
__device__ __forceinline__ void emit(const CovArgs& a, int64_t i, int64_t j, float v) {
  if (i < a.d && j < a.d && i <= j) {
    if (SPLIT) {
      a.ws[static_cast<int64_t>(blockIdx.y) * a.d * a.d + i * a.d + j] = v;
    } else {
      a.c[i * a.d + j] += v;
    }
  }
}

template <typename T, int BT, bool SPLIT>
__global__ void __launch_bounds__(kThreads) cov_kernel(const CovArgs a) {
  using Cfg = CovCfg<T, BT>;
  using L = typename Cfg::Loader;
  constexpr int BK = Cfg::BK;
  constexpr int LDS = Cfg::LDS;
  constexpr int VEC = L::VEC;

  __shared__ __align__(128) T smem[4 * Cfg::STAGE];  // [stage 0: A, B][stage 1: A, B]
  __shared__ __align__(128) float red[Cfg::kRedFloats];

  const int tid = threadIdx.x;
  int64_t ti, tj;
  upper_pair(static_cast<int64_t>(blockIdx.x), ti, tj);
  const bool diag = ti == tj;
  const int64_t col_i = ti * BT, col_j = tj * BT;
  const int64_t row_lo = SPLIT ? static_cast<int64_t>(blockIdx.y) * a.rows_per_split : 0;
  const int64_t row_hi = SPLIT ? (a.n < row_lo + a.rows_per_split ? a.n : row_lo + a.rows_per_split) : a.n;
  const int64_t nsteps = row_hi > row_lo ? (row_hi - row_lo + BK - 1) / BK : 0;
  const T* __restrict__ x = static_cast<const T*>(a.x);

  float sh_a[VEC], sh_b[VEC], csum[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int64_t ca = col_i + L::col_of(tid) + e, cb = col_j + L::col_of(tid) + e;
    sh_a[e] = (a.shift != nullptr && ca < a.d) ? a.shift[ca] : 0.0f;
    sh_b[e] = (a.shift != nullptr && cb < a.d) ? a.shift[cb] : 0.0f;
    csum[e] = 0.0f;
  }

  L la, lb;
  // prologue: step 0 -> stage 0
  if (nsteps > 0) {
    lb.load(x, a.ldx, row_hi, a.d, row_lo, col_j, a.mask, a.vec_ok, tid);
    if (!diag) la.load(x, a.ldx, row_hi, a.d, row_lo, col_i, a.mask, a.vec_ok, tid);
    store_centred<T>(lb, smem + Cfg::STAGE, LDS, col_j, a.d, sh_b, diag, csum, tid);
    if (!diag) store_centred<T>(la, smem, LDS, col_i, a.d, sh_a, false, csum, tid);
  }
  __syncthreads();

  if constexpr (!Cfg::kLowp) {
    // ---- fp32: SIMT FMA, TM x TM outputs per thread in two halves per axis
    constexpr int TM = BT / 16, HT = TM / 2, HB = BT / 2;
    const int ty = tid / 16, tx = tid % 16;
    float acc[TM][TM];
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int v = 0; v < TM; ++v) acc[u][v] = 0.0f;

    for (int64_t step = 0; step < nsteps; ++step) {
      const int buf = static_cast<int>(step & 1);
      const bool more = step + 1 < nsteps;
      if (more) {  // next chunk's loads in flight during the products
        const int64_t r0 = row_lo + (step + 1) * BK;
        lb.load(x, a.ldx, row_hi, a.d, r0, col_j, a.mask, a.vec_ok, tid);
        if (!diag) la.load(x, a.ldx, row_hi, a.d, r0, col_i, a.mask, a.vec_ok, tid);
      }
      const T* Bs = smem + (2 * buf + 1) * Cfg::STAGE;
      const T* As = diag ? Bs : smem + (2 * buf) * Cfg::STAGE;
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float av[TM], bv[TM];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int q = 0; q < HT; ++q) {
            av[h * HT + q] = As[kk * LDS + h * HB + ty * HT + q];
            bv[h * HT + q] = Bs[kk * LDS + h * HB + tx * HT + q];
          }
#pragma unroll
        for (int u = 0; u < TM; ++u)
#pragma unroll
          for (int v = 0; v < TM; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
      }
      if (more) {  // the other stage was last read before the previous barrier
        T* nb = smem + (2 * (buf ^ 1)) * Cfg::STAGE;
        store_centred<T>(lb, nb + Cfg::STAGE, LDS, col_j, a.d, sh_b, diag, csum, tid);
        if (!diag) store_centred<T>(la, nb, LDS, col_i, a.d, sh_a, false, csum, tid);
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int v = 0; v < TM; ++v) {
        const int64_t i = col_i + (u / HT) * HB + ty * HT + (u % HT);
        const int64_t j = col_j + (v / HT) * HB + tx * HT + (v % HT);
        emit<SPLIT>(a, i, j, acc[u][v]);
      }
  } else {
    // ---- fp16/bf16: WMMA 16x16x16, fp32 accumulators; warps 2 (i) x 4 (j)
    namespace wmma = nvcuda::wmma;
    constexpr int WTM = BT / 2, WTN = BT / 4, FM = WTM / 16, FN = WTN / 16;
    const int warp = tid / 32, lane = tid % 32;
    const int wm = warp / 4, wn = warp % 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> part[FM][FN], tot[FM][FN];
#pragma unroll
    for (int f = 0; f < FM; ++f)
#pragma unroll
      for (int g = 0; g < FN; ++g) {
        wmma::fill_fragment(part[f][g], 0.0f);
        wmma::fill_fragment(tot[f][g], 0.0f);
      }
    int since_flush = 0;
    for (int64_t step = 0; step < nsteps; ++step) {
      const int buf = static_cast<int>(step & 1);
      const bool more = step + 1 < nsteps;
      if (more) {
        const int64_t r0 = row_lo + (step + 1) * BK;
        lb.load(x, a.ldx, row_hi, a.d, r0, col_j, a.mask, a.vec_ok, tid);
        if (!diag) la.load(x, a.ldx, row_hi, a.d, r0, col_i, a.mask, a.vec_ok, tid);
      }
      const T* Bs = smem + (2 * buf + 1) * Cfg::STAGE;
      const T* As = diag ? Bs : smem + (2 * buf) * Cfg::STAGE;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        // A^T (i x rows): element (i, r) at As[r * LDS + i] -> col_major; B (rows x j) row_major
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[FN];
#pragma unroll
        for (int f = 0; f < FM; ++f) wmma::load_matrix_sync(fa[f], As + kk * LDS + wm * WTM + f * 16, LDS);
#pragma unroll
        for (int g = 0; g < FN; ++g) wmma::load_matrix_sync(fb[g], Bs + kk * LDS + wn * WTN + g * 16, LDS);
#pragma unroll
        for (int f = 0; f < FM; ++f)
#pragma unroll
          for (int g = 0; g < FN; ++g) wmma::mma_sync(part[f][g], fa[f], fb[g], part[f][g]);
      }
      if (++since_flush == kFlushRows / BK) {  // fp32 adds of the 512-row chunk
        since_flush = 0;
#pragma unroll
        for (int f = 0; f < FM; ++f)
#pragma unroll
          for (int g = 0; g < FN; ++g) {
#pragma unroll
            for (int e = 0; e < part[f][g].num_elements; ++e) tot[f][g].x[e] += part[f][g].x[e];
            wmma::fill_fragment(part[f][g], 0.0f);
          }
      }
      if (more) {
        T* nb = smem + (2 * (buf ^ 1)) * Cfg::STAGE;
        store_centred<T>(lb, nb + Cfg::STAGE, LDS, col_j, a.d, sh_b, diag, csum, tid);
        if (!diag) store_centred<T>(la, nb, LDS, col_i, a.d, sh_a, false, csum, tid);
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < FM; ++f)
#pragma unroll
      for (int g = 0; g < FN; ++g)
#pragma unroll
        for (int e = 0; e < part[f][g].num_elements; ++e) tot[f][g].x[e] += part[f][g].x[e];

    // epilogue through a per-warp 16 x 16 fp32 scratch (the fragment layout is opaque)
    float* scr = red + warp * 16 * Cfg::kEpiLd;
#pragma unroll
    for (int f = 0; f < FM; ++f)
#pragma unroll
      for (int g = 0; g < FN; ++g) {
        wmma::store_matrix_sync(scr, tot[f][g], Cfg::kEpiLd, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int e = q * 32 + lane, r = e / 16, cc = e % 16;
          emit<SPLIT>(a, col_i + wm * WTM + f * 16 + r, col_j + wn * WTN + g * 16 + cc, scr[r * Cfg::kEpiLd + cc]);
        }
        __syncwarp();
      }
    __syncthreads();  // red is reused for the column sums below
  }

  // column sums (diagonal tiles only; diag is uniform over the block): thread t holds the
  // sums of its VEC columns over its rows; reduce over the RSTEP threads per column in order.
  if (diag && (a.colsum != nullptr || SPLIT)) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[(tid / L::VPR) * BT + L::col_of(tid) + e] = csum[e];
    __syncthreads();
    if (tid < BT) {
      float s = 0.0f;
      for (int r = 0; r < L::RSTEP; ++r) s += red[r * BT + tid];
      const int64_t col = col_j + tid;
      if (col < a.d) {
        if (SPLIT) {
          a.ws_colsum[static_cast<int64_t>(blockIdx.y) * a.d + col] = s;
        } else {
          a.colsum[col] += s;
        }
      }
    }
  }
}

// Split reduction: c[i][j] += sum_s ws[s][i][j] (i <= j), colsum[j] += sum_s ws_colsum[s][j],
// partials summed in split order.
__global__ void __launch_bounds__(kThreads) cov_reduce_kernel(const float* __restrict__ ws,
                                                              const float* __restrict__ ws_colsum,
                                                              int splits, int64_t d, float* __restrict__ c,
                                                              float* __restrict__ colsum) {
  const int64_t dd = d * d;
  const int64_t total = dd + d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx < dd) {
      const int64_t i = idx / d, j = idx - i * d;
      if (i > j) continue;
      float s = 0.0f;
      for (int k = 0; k < splits; ++k) s += ws[k * dd + idx];
      c[idx] += s;
    } else if (colsum != nullptr) {
      const int64_t j = idx - dd;
      float s = 0.0f;
      for (int k = 0; k < splits; ++k) s += ws_colsum[k * d + j];
      colsum[j] += s;
    }
  }
}

template <typename T, int BT>
cudaError_t launch_cov(const CovArgs& a, int splits, cudaStream_t stream) {
  const int64_t tiles = (a.d + BT - 1) / BT;
  const int64_t pairs = tiles * (tiles + 1) / 2;
  if (pairs > INT_MAX || splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(splits));
  if (splits > 1) {
    cov_kernel<T, BT, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    cov_kernel<T, BT, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cov_dtype(const CovArgs& a, int splits, cudaStream_t stream) {
  return a.d <= 64 ? launch_cov<T, 64>(a, splits, stream) : launch_cov<T, 128>(a, splits, stream);
}

int64_t rows_per_split(int64_t n, int splits) {
  const int64_t per = (n + splits - 1) / splits;
  return (per + kFlushRows - 1) / kFlushRows * kFlushRows;
}

}  // namespace

int64_t covariance_split_workspace_floats(int64_t d, int splits) {
  if (splits <= 1 || d <= 0) return 0;
  return static_cast<int64_t>(splits) * (d * d + d);
}

int covariance_choose_splits(int64_t n, int64_t d, DType dt, int sm_count, int64_t max_workspace_bytes) {
  (void)dt;
  if (n <= 0 || d <= 0 || sm_count <= 0) return 1;
  const int64_t bt = d <= 64 ? 64 : 128;
  const int64_t tiles = (d + bt - 1) / bt;
  const int64_t pairs = tiles * (tiles + 1) / 2;
  int64_t want = (2 * static_cast<int64_t>(sm_count) + pairs - 1) / pairs;
  const int64_t by_rows = n / 1024;
  if (want > by_rows) want = by_rows;
  if (want > 64) want = 64;
  const int64_t per_split_bytes = static_cast<int64_t>(sizeof(float)) * (d * d + d);
  if (per_split_bytes > 0 && want > max_workspace_bytes / per_split_bytes)
    want = max_workspace_bytes / per_split_bytes;
  return want > 1 ? static_cast<int>(want) : 1;
}

cudaError_t covariance_update_split(const void* x, DType dt, int64_t n, int64_t d, int64_t ldx,
                                    const float* shift, const uint8_t* mask, float* c,
                                    float* colsum, int splits, float* workspace,
                                    int64_t workspace_floats, cudaStream_t stream) {
  if (n < 0 || d < 0 || d > INT_MAX) return cudaErrorInvalidValue;
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16) return cudaErrorInvalidValue;
  if (n == 0 || d == 0) return cudaSuccess;
  if (x == nullptr || c == nullptr || ldx < d) return cudaErrorInvalidValue;
  if (splits > 1) {
    const int64_t rps = rows_per_split(n, splits);
    splits = static_cast<int>((n + rps - 1) / rps);  // no empty splits
  }
  CovArgs a{};
  a.x = x;
  a.n = n;
  a.d = d;
  a.ldx = ldx;
  a.shift = shift;
  a.mask = mask;
  a.c = c;
  a.colsum = colsum;
  a.rows_per_split = n;
  if (splits > 1) {
    if (workspace == nullptr || workspace_floats < covariance_split_workspace_floats(d, splits))
      return cudaErrorInvalidValue;
    a.rows_per_split = rows_per_split(n, splits);
    a.ws = workspace;
    a.ws_colsum = workspace + static_cast<int64_t>(splits) * d * d;
  } else {
    splits = 1;
  }
  const int64_t esize = dt == DType::F32 ? 4 : 2;
  a.vec_ok = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && ((ldx * esize) % 16 == 0);

  cudaError_t err;
  switch (dt) {
    case DType::F32: err = launch_cov_dtype<float>(a, splits, stream); break;
    case DType::F16: err = launch_cov_dtype<__half>(a, splits, stream); break;
    default: err = launch_cov_dtype<__nv_bfloat16>(a, splits, stream); break;
  }
  if (err != cudaSuccess || splits <= 1) return err;
  const int64_t total = d * d + d;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  cov_reduce_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a.ws, a.ws_colsum, splits, d, c, colsum);
  return cudaGetLastError();
}

cudaError_t covariance_update(const void* x, DType dt, int64_t n, int64_t d, int64_t ldx,
                              const float* shift, const uint8_t* mask, float* c, float* colsum,
                              cudaStream_t stream) {
  return covariance_update_split(x, dt, n, d, ldx, shift, mask, c, colsum, 1, nullptr, 0, stream);
}

}  // namespace rmtkd
