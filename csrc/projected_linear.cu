// Fused projected low-rank linear forward: y = round((round(x V)) W^T + bias), t = x V on chip.
// See rmtkd_cuda.h for the contract.
//
// Algorithm
// - Grid (ceil(m / 64), G). Block (bm, g) owns rows [64 bm, 64 bm + 64) of x and y and the
//   output-column tiles [g TPG, (g + 1) TPG) (64 columns each) of y: every element of y is
//   written by exactly one block (no atomics, deterministic). G > 1 only when there are too
//   few row blocks to fill the GPU; each of the G blocks of a row block then recomputes t.
// - Phase 1: t (64 x KP, KP = k rounded up to 32/64/128/256) = x_tile V, looping over `in`
//   in chunks (x chunk 64 x BK and V chunk BK x KP staged through shared memory, the next
//   chunk's global loads in flight while the current one is multiplied), fp32 accumulators
//   in registers. Then t is rounded to the input dtype and written to shared memory (ts).
// - Phase 2: per output tile, y_tile (64 x 64) = ts W_tile^T over k in chunks of RK, W staged
//   through shared memory the same way; epilogue adds float(bias) in fp32, rounds to the dtype
//   and stores with bounds checks. Chunks past k are skipped; missing elements load as 0.
// - Precision: fp32: SIMT fmaf (exact fp32, never TF32). fp16/bf16: WMMA 16x16x16 with fp32
//   accumulation, t rounded to the dtype between the products exactly like (x @ V) @ W.T.
// - Shared memory: dynamic, up to ~92 KiB (fp32, KP = 256), checked against the device's
//   opt-in limit before launch. Offsets into x / y in int64.
#include "rmtkd_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace rmtkd {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int BM = 64;         // rows of x per block
constexpr int BN = 64;         // columns of y per output tile

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

// A ROWS x COLS tile of a row-major matrix in registers, 16 bytes per access: thread t holds
// columns [(t % VPR) VEC, +VEC) of rows t / VPR + p RSTEP (p < PER, rows < ROWS only).
template <typename T, int ROWS, int COLS>
struct TileRegs {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static constexpr int VPR = COLS / VEC;
  static constexpr int RSTEP = kThreads / VPR;
  static constexpr int PER = (ROWS + RSTEP - 1) / RSTEP;
  static_assert(COLS % VEC == 0, "tile width must be a multiple of the vector width");
  static_assert(kThreads % VPR == 0, "a row of vectors must divide the block");

  alignas(16) T v[PER][VEC];

  static __device__ __forceinline__ int col_of(int tid) { return (tid % VPR) * VEC; }
  static __device__ __forceinline__ int row_of(int tid, int p) { return tid / VPR + p * RSTEP; }

  // Rows [row0, row0 + ROWS) and columns [col0, col0 + COLS) of g (nrows x ncols, leading dim
  // ld); missing elements are 0. vec_ok: g 16-byte aligned, ld and col0 multiples of VEC.
  __device__ __forceinline__ void load(const T* __restrict__ g, int64_t ld, int64_t nrows, int64_t ncols,
                                       int64_t row0, int64_t col0, bool vec_ok, int tid) {
    const int64_t col = col0 + col_of(tid);
    const T zero = Num<T>::from_f(0.0f);
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int r = row_of(tid, p);
      const int64_t row = row0 + r;
      const bool ok = (r < ROWS) && (row < nrows);
      if (ok && vec_ok && col + VEC <= ncols) {
        *reinterpret_cast<uint4*>(v[p]) = *reinterpret_cast<const uint4*>(g + row * ld + col);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[p][e] = (ok && col + e < ncols) ? g[row * ld + col + e] : zero;
      }
    }
  }
  // Row-major store: s[r * lds + c] (lds * sizeof(T) a multiple of 16).
  __device__ __forceinline__ void store(T* __restrict__ s, int lds, int tid) const {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int r = row_of(tid, p);
      if (r < ROWS) *reinterpret_cast<uint4*>(s + r * lds + col_of(tid)) = *reinterpret_cast<const uint4*>(v[p]);
    }
  }
  // Transposed store: s[c * lds + r].
  __device__ __forceinline__ void store_t(T* __restrict__ s, int lds, int tid) const {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int r = row_of(tid, p);
      if (r < ROWS) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[(col_of(tid) + e) * lds + r] = v[p][e];
      }
    }
  }
};

constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

template <typename T, int KP>
struct PlCfg {
  static constexpr bool kLowp = sizeof(T) == 2;
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));  // one 16-byte vector
  static constexpr int BK = kLowp ? 32 : 16;   // chunk of `in` (phase 1)
  static constexpr int RK = kLowp ? 32 : 16;   // chunk of k (phase 2)
  static_assert(KP % RK == 0 && KP >= 32, "rank padding");
  static constexpr int LDX = BK + PAD;         // xs: BM x BK, row-major
  static constexpr int LDV = KP + PAD;         // vs: BK x KP, row-major
  static constexpr int LDT = KP + PAD;         // ts: BM x KP, row-major
  // ws: lowp BN x RK row-major (WMMA col_major B); fp32 RK x BN (transposed, SIMT reads)
  static constexpr int LDW = kLowp ? RK + PAD : BN + PAD;
  static constexpr int WS_ELEMS = kLowp ? BN * LDW : RK * LDW;
  static constexpr int kEpiLd = 20;            // per-warp fp32 scratch (WMMA), 16 x 20
  static constexpr size_t TS_OFF = 0;
  static constexpr size_t XS_OFF = TS_OFF + round_up(BM * LDT * static_cast<int>(sizeof(T)), 128);
  static constexpr size_t VS_OFF = XS_OFF + round_up(BM * LDX * static_cast<int>(sizeof(T)), 128);
  static constexpr size_t WS_OFF = VS_OFF + round_up(BK * LDV * static_cast<int>(sizeof(T)), 128);
  static constexpr size_t SCR_OFF = WS_OFF + round_up(WS_ELEMS * static_cast<int>(sizeof(T)), 128);
  static constexpr size_t kSmemBytes = SCR_OFF + (kLowp ? (kThreads / 32) * 16 * kEpiLd * sizeof(float) : 0);
  // fits the 99 KiB opt-in limit of sm_86/sm_89 as well as sm_80 (163 KiB) and sm_90 (227 KiB)
  static_assert(kSmemBytes <= 99 * 1024, "shared memory per block");
  using XL = TileRegs<T, BM, BK>;
  using VL = TileRegs<T, BK, KP>;
  using WL = TileRegs<T, BN, RK>;
};

struct PlArgs {
  const void* x;
  const void* V;
  const void* W;
  const void* bias;
  void* y;
  int64_t m, in, out, k;
  int tiles_per_group;
  bool vec_x, vec_v, vec_w;
};

template <typename T, int KP>
__global__ void __launch_bounds__(kThreads) pl_kernel(const PlArgs a) {
  using Cfg = PlCfg<T, KP>;
  constexpr int BK = Cfg::BK, RK = Cfg::RK;
  constexpr int LDX = Cfg::LDX, LDV = Cfg::LDV, LDT = Cfg::LDT, LDW = Cfg::LDW;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ts = reinterpret_cast<T*>(smem_raw + Cfg::TS_OFF);
  T* xs = reinterpret_cast<T*>(smem_raw + Cfg::XS_OFF);
  T* vs = reinterpret_cast<T*>(smem_raw + Cfg::VS_OFF);
  T* ws = reinterpret_cast<T*>(smem_raw + Cfg::WS_OFF);

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ V = static_cast<const T*>(a.V);
  const T* __restrict__ W = static_cast<const T*>(a.W);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  T* __restrict__ y = static_cast<T*>(a.y);

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n_tiles = (a.out + BN - 1) / BN;
  const int64_t tile_lo = static_cast<int64_t>(blockIdx.y) * a.tiles_per_group;
  const int64_t tile_hi = tile_lo + a.tiles_per_group < n_tiles ? tile_lo + a.tiles_per_group : n_tiles;
  const int64_t n_in = (a.in + BK - 1) / BK;            // phase-1 chunks
  const int n_rk = static_cast<int>((a.k + RK - 1) / RK);  // phase-2 chunks (<= KP / RK)

  typename Cfg::XL xl;
  typename Cfg::VL vl;
  typename Cfg::WL wl;

  // ----------------------------------------------------------------- phase 1: ts = x V
  if (n_in > 0) {
    xl.load(x, a.in, a.m, a.in, m0, 0, a.vec_x, tid);
    vl.load(V, a.k, a.in, a.k, 0, 0, a.vec_v, tid);
  }
  if constexpr (!Cfg::kLowp) {
    constexpr int TN = KP / 16, HT = TN / 2, HB = KP / 2;
    const int ty = tid / 16, tx = tid % 16;
    float acc[4][TN];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < TN; ++v) acc[u][v] = 0.0f;
    for (int64_t ch = 0; ch < n_in; ++ch) {
      __syncthreads();  // previous chunk fully read
      xl.store(xs, LDX, tid);
      vl.store(vs, LDV, tid);
      __syncthreads();
      if (ch + 1 < n_in) {
        const int64_t i0 = (ch + 1) * BK;
        xl.load(x, a.in, a.m, a.in, m0, i0, a.vec_x, tid);
        vl.load(V, a.k, a.in, a.k, i0, 0, a.vec_v, tid);
      }
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float av[4], bv[TN];
#pragma unroll
        for (int u = 0; u < 4; ++u) av[u] = xs[(ty * 4 + u) * LDX + kk];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int q = 0; q < HT; ++q) bv[h * HT + q] = vs[kk * LDV + h * HB + tx * HT + q];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < TN; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < TN; ++v) ts[(ty * 4 + u) * LDT + (v / HT) * HB + tx * HT + (v % HT)] = acc[u][v];
  } else {
    namespace wmma = nvcuda::wmma;
    float* scr = reinterpret_cast<float*>(smem_raw + Cfg::SCR_OFF) + (tid / 32) * 16 * Cfg::kEpiLd;
    const int warp = tid / 32, lane = tid % 32;
    const int wm = warp / 2, wn = warp % 2;  // warps 4 (rows) x 2 (rank)
    constexpr int WTN = KP / 2, FN = WTN / 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FN];
#pragma unroll
    for (int f = 0; f < FN; ++f) wmma::fill_fragment(acc[f], 0.0f);
    for (int64_t ch = 0; ch < n_in; ++ch) {
      __syncthreads();
      xl.store(xs, LDX, tid);
      vl.store(vs, LDV, tid);
      __syncthreads();
      if (ch + 1 < n_in) {
        const int64_t i0 = (ch + 1) * BK;
        xl.load(x, a.in, a.m, a.in, m0, i0, a.vec_x, tid);
        vl.load(V, a.k, a.in, a.k, i0, 0, a.vec_v, tid);
      }
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, xs + (wm * 16) * LDX + kk, LDX);
#pragma unroll
        for (int f = 0; f < FN; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, vs + kk * LDV + wn * WTN + f * 16, LDV);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
    }
    // t -> dtype -> ts, through the warp's fp32 scratch (fragment layouts are opaque)
#pragma unroll
    for (int f = 0; f < FN; ++f) {
      wmma::store_matrix_sync(scr, acc[f], Cfg::kEpiLd, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int e = q * 32 + lane, r = e / 16, cc = e % 16;
        ts[(wm * 16 + r) * LDT + wn * WTN + f * 16 + cc] = Num<T>::from_f(scr[r * Cfg::kEpiLd + cc]);
      }
      __syncwarp();
    }
  }
  __syncthreads();  // ts complete

  // ----------------------------------------------------------------- phase 2: y = ts W^T + b
  for (int64_t tile = tile_lo; tile < tile_hi; ++tile) {
    const int64_t o0 = tile * BN;
    if (n_rk > 0) wl.load(W, a.k, a.out, a.k, o0, 0, a.vec_w, tid);
    if constexpr (!Cfg::kLowp) {
      const int ty = tid / 16, tx = tid % 16;
      float acc[4][4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = 0.0f;
      for (int ch = 0; ch < n_rk; ++ch) {
        __syncthreads();
        wl.store_t(ws, LDW, tid);  // ws[r][o]
        __syncthreads();
        if (ch + 1 < n_rk) wl.load(W, a.k, a.out, a.k, o0, static_cast<int64_t>(ch + 1) * RK, a.vec_w, tid);
#pragma unroll
        for (int rr = 0; rr < RK; ++rr) {
          float av[4], bv[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) av[u] = ts[(ty * 4 + u) * LDT + ch * RK + rr];
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int q = 0; q < 2; ++q) bv[h * 2 + q] = ws[rr * LDW + h * (BN / 2) + tx * 2 + q];
#pragma unroll
          for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
        }
      }
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int64_t col = o0 + (v / 2) * (BN / 2) + tx * 2 + (v % 2);
        if (col >= a.out) continue;
        const float b = bias != nullptr ? Num<T>::to_f(bias[col]) : 0.0f;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t row = m0 + ty * 4 + u;
          if (row < a.m) y[row * a.out + col] = Num<T>::from_f(acc[u][v] + b);
        }
      }
    } else {
      namespace wmma = nvcuda::wmma;
      float* scr = reinterpret_cast<float*>(smem_raw + Cfg::SCR_OFF) + (tid / 32) * 16 * Cfg::kEpiLd;
      const int warp = tid / 32, lane = tid % 32;
      const int wm = warp / 2, wn = warp % 2;  // warps 4 (rows) x 2 (columns of y)
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
      wmma::fill_fragment(acc[0], 0.0f);
      wmma::fill_fragment(acc[1], 0.0f);
      for (int ch = 0; ch < n_rk; ++ch) {
        __syncthreads();
        wl.store(ws, LDW, tid);  // ws[o][r]
        __syncthreads();
        if (ch + 1 < n_rk) wl.load(W, a.k, a.out, a.k, o0, static_cast<int64_t>(ch + 1) * RK, a.vec_w, tid);
#pragma unroll
        for (int kk = 0; kk < RK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, ts + (wm * 16) * LDT + ch * RK + kk, LDT);
#pragma unroll
          for (int f = 0; f < 2; ++f) {
            // B (rank x columns of y): element (r, o) at ws[o * LDW + r] -> col_major
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, ws + (wn * 32 + f * 16) * LDW + kk, LDW);
            wmma::mma_sync(acc[f], fa, fb, acc[f]);
          }
        }
      }
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::store_matrix_sync(scr, acc[f], Cfg::kEpiLd, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int e = q * 32 + lane, r = e / 16, cc = e % 16;
          const int64_t row = m0 + wm * 16 + r;
          const int64_t col = o0 + wn * 32 + f * 16 + cc;
          if (row < a.m && col < a.out) {
            const float b = bias != nullptr ? Num<T>::to_f(bias[col]) : 0.0f;
            y[row * a.out + col] = Num<T>::from_f(scr[r * Cfg::kEpiLd + cc] + b);
          }
        }
        __syncwarp();
      }
    }
  }
}

template <typename T, int KP>
cudaError_t launch_pl(PlArgs a, cudaStream_t stream) {
  using Cfg = PlCfg<T, KP>;
  constexpr size_t smem = Cfg::kSmemBytes;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int optin = 0, sms = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(pl_kernel<T, KP>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t m_tiles = (a.m + BM - 1) / BM;
  const int64_t n_tiles = (a.out + BN - 1) / BN;
  if (m_tiles > INT_MAX) return cudaErrorInvalidValue;
  // Enough blocks for ~2 per SM; extra column groups recompute t, so only when rows are few.
  int64_t groups = (2 * static_cast<int64_t>(sms > 0 ? sms : 1) + m_tiles - 1) / m_tiles;
  if (groups > n_tiles) groups = n_tiles;
  if (groups > 65535) groups = 65535;
  if (groups < 1) groups = 1;
  const int64_t tpg = (n_tiles + groups - 1) / groups;
  groups = (n_tiles + tpg - 1) / tpg;  // no empty groups
  if (tpg > INT_MAX) return cudaErrorInvalidValue;
  a.tiles_per_group = static_cast<int>(tpg);
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(groups));
  pl_kernel<T, KP><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pl_rank(const PlArgs& a, cudaStream_t stream) {
  if (a.k <= 32) return launch_pl<T, 32>(a, stream);
  if (a.k <= 64) return launch_pl<T, 64>(a, stream);
  if (a.k <= 128) return launch_pl<T, 128>(a, stream);
  return launch_pl<T, 256>(a, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t projected_linear_forward(const void* x, const void* V, const void* W, const void* bias, void* y,
                                     DType dt, int64_t m, int64_t in, int64_t out, int64_t k,
                                     cudaStream_t stream) {
  if (m < 0 || in < 0 || out < 0 || k < 0 || k > kProjectedLinearMaxRank) return cudaErrorInvalidValue;
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16) return cudaErrorInvalidValue;
  if (m == 0 || out == 0) return cudaSuccess;
  if (y == nullptr || (in > 0 && x == nullptr) || (in > 0 && k > 0 && V == nullptr) || (k > 0 && W == nullptr))
    return cudaErrorInvalidValue;
  // Offsets are int64; keep every element count representable with room to spare.
  const int64_t lim = INT64_MAX / 4;
  if (m > lim / (in > 0 ? in : 1) || m > lim / out || in > lim / (k > 0 ? k : 1) || out > lim / (k > 0 ? k : 1))
    return cudaErrorInvalidValue;
  const int64_t vec = dt == DType::F32 ? 4 : 8;  // elements per 16 bytes
  PlArgs a{};
  a.x = x;
  a.V = V;
  a.W = W;
  a.bias = bias;
  a.y = y;
  a.m = m;
  a.in = in;
  a.out = out;
  a.k = k;
  a.vec_x = aligned16(x) && in % vec == 0;
  a.vec_v = aligned16(V) && k % vec == 0;
  a.vec_w = aligned16(W) && k % vec == 0;
  switch (dt) {
    case DType::F32: return launch_pl_rank<float>(a, stream);
    case DType::F16: return launch_pl_rank<__half>(a, stream);
    default: return launch_pl_rank<__nv_bfloat16>(a, stream);
  }
}

}  // namespace rmtkd
