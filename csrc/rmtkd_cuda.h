// Plain C++ interface of rmtkd's CUDA kernels (csrc/*.cu). No torch headers: the .cu files
// compile with nvcc alone, and the torch binding (csrc/bindings.cpp) calls these functions.
// Every function is asynchronous on `stream`, checks its arguments, and returns the launch
// status (cudaSuccess, cudaErrorInvalidValue for bad sizes/pointers, or the launch error).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace rmtkd {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// c (fp32, d x d row-major, leading dim d): ONLY the upper triangle (i <= j) is updated:
//   c[i][j] += sum over rows r with (mask == nullptr || mask[r] != 0) of (x[r][i] - shift[i]) * (x[r][j] - shift[j])
// colsum (fp32, [d]): colsum[j] += sum over the same rows of (x[r][j] - shift[j]).
// x: n x d, element (r, j) at x[r * ldx + j], dtype dt; shift: fp32 [d] or nullptr (= 0); mask: uint8 [n] or nullptr.
// Lower-triangle elements of c are never read or written. n == 0 is a no-op. Accumulation in fp32.
//
// Details (csrc/covariance.cu): fp32 rows take an exact fp32 FMA path (never TF32). fp16/bf16
// rows are centred in fp32, rounded back to dt (round to nearest) and multiplied on the tensor
// cores with fp32 accumulation; colsum sums those same rounded centred values. Masked-out rows
// are not read and contribute exact zeros. colsum may be nullptr (then it is not formed).
// Deterministic: each output tile is owned by one thread block that loops over all n rows in
// order, so repeated calls give the same bits. Requires ldx >= d, d < 2^31.
cudaError_t covariance_update(const void* x, DType dt, int64_t n, int64_t d, int64_t ldx,
                              const float* shift, const uint8_t* mask, float* c, float* colsum,
                              cudaStream_t stream);

// Row-split variant of covariance_update, same result contract, for shapes whose grid of
// upper tiles is too small to fill the GPU (small d, large n). The rows are cut into
// `splits` ranges (each a multiple of 512 rows); the block of (tile, split) writes its fp32
// partial tile into `workspace` and a second kernel adds the partials into c / colsum in the
// fixed split order 0, 1, 2, ...: deterministic (same bits on every run), but not bitwise
// equal to covariance_update (different summation order). splits <= 1 is covariance_update.
// workspace: device fp32, at least covariance_split_workspace_floats(d, splits) elements,
// fully overwritten where used (no initialisation needed), caller-owned.
cudaError_t covariance_update_split(const void* x, DType dt, int64_t n, int64_t d, int64_t ldx,
                                    const float* shift, const uint8_t* mask, float* c,
                                    float* colsum, int splits, float* workspace,
                                    int64_t workspace_floats, cudaStream_t stream);
// fp32 elements of workspace that covariance_update_split needs: splits * (d * d + d), or 0
// for splits <= 1.
int64_t covariance_split_workspace_floats(int64_t d, int splits);
// A suggested split count (>= 1) for n x d rows on a GPU with `sm_count` multiprocessors and
// at most `max_workspace_bytes` of workspace: enough blocks for ~2 per SM, each split at
// least 1024 rows, at most 64 splits.
int covariance_choose_splits(int64_t n, int64_t d, DType dt, int sm_count,
                             int64_t max_workspace_bytes);

// y[m][o] = sum_r (sum_i x[m][i] * V[i][r]) * W[o][r] + bias[o]; x: m x in, V: in x k, W: out x k, y: m x out,
// all contiguous row-major in dtype dt; bias dtype dt or nullptr. fp32 accumulation; the intermediate t = x V
// (m x k, k <= 256) stays on chip (shared memory / registers), rounded to dt before the second product exactly
// as torch's two-GEMM reference (x @ V) @ W.T does. Returns cudaErrorInvalidValue for k > 256 or bad sizes.
//
// Details (csrc/projected_linear.cu): fp32 takes exact fp32 FMA (never TF32), fp16/bf16 the
// tensor cores; y = round_dt(fp32 acc + float(bias)). k == 0 or in == 0 gives y = bias (or 0).
// Each element of y is written by exactly one thread block (deterministic, no atomics).
// Returns cudaErrorInvalidConfiguration if the device's per-block shared memory is too small
// (needs up to ~92 KiB for fp32 at k > 128; every sm_80+ data-centre GPU has enough).
cudaError_t projected_linear_forward(const void* x, const void* V, const void* W, const void* bias, void* y,
                                     DType dt, int64_t m, int64_t in, int64_t out, int64_t k, cudaStream_t stream);
constexpr int64_t kProjectedLinearMaxRank = 256;

}  // namespace rmtkd
