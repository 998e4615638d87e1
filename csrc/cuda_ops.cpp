// CUDA implementations of rmtkd::covariance_update and rmtkd::projected_linear: argument
// checks (bindings.cpp), then the plain-CUDA launchers of rmtkd_cuda.h on the current stream
// of the tensors' device (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports; the
// c10 header needs no cuBLAS/cuSPARSE headers). Compiled only when WITH_CUDA is defined
// (rmtkd/ops/cuda_ext.py defines it where torch has CUDA), so the CPU build of the extension
// skips this file's body.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "rmtkd_cuda.h"
#include "rmtkd_ops.h"

namespace rmtkd {

namespace {

// Most workspace the row-split covariance path may take (partial tiles, fp32).
constexpr int64_t kSplitWorkspaceBytes = int64_t{256} << 20;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "rmtkd: no CUDA kernel for dtype ", t);
  }
  return DType::F32;  // not reached
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "rmtkd::", op, ": CUDA error ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

void covariance_update_cuda(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                            const std::optional<at::Tensor>& mask, const at::Tensor& c,
                            const at::Tensor& colsum) {
  const int64_t ldx = check_covariance_update(x, shift, mask, c, colsum);
  TORCH_CHECK(x.is_cuda(), "rmtkd::covariance_update: expected CUDA tensors, got x on ",
              x.device());
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(d < (int64_t{1} << 31), "rmtkd::covariance_update: d = ", d,
              " is too wide for the kernel (d < 2^31)");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const float* shift_ptr = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  const uint8_t* mask_ptr =
      mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr;
  const DType dt = to_dtype(x.scalar_type());
  // Shapes whose upper tiles cannot fill the GPU (small d, many rows) split the rows; the
  // partial tiles go to a workspace from torch's caching allocator (on this stream).
  int sm_count = 0;
  check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount,
                                      x.device().index()),
               "covariance_update");
  const int splits = covariance_choose_splits(n, d, dt, sm_count, kSplitWorkspaceBytes);
  if (splits > 1) {
    const int64_t floats = covariance_split_workspace_floats(d, splits);
    at::Tensor ws = at::empty({floats}, c.options());
    check_launch(covariance_update_split(x.data_ptr(), dt, n, d, ldx, shift_ptr, mask_ptr,
                                         c.data_ptr<float>(), colsum.data_ptr<float>(),
                                         splits, ws.data_ptr<float>(), floats, stream),
                 "covariance_update");
    return;
  }
  check_launch(covariance_update(x.data_ptr(), dt, n, d, ldx, shift_ptr, mask_ptr,
                                 c.data_ptr<float>(), colsum.data_ptr<float>(), stream),
               "covariance_update");
}

at::Tensor projected_linear_cuda(const at::Tensor& x, const at::Tensor& V, const at::Tensor& W,
                                 const std::optional<at::Tensor>& bias) {
  const auto [m, in, out, k] = check_projected_linear(x, V, W, bias);
  TORCH_CHECK(x.is_cuda(), "rmtkd::projected_linear: expected CUDA tensors, got x on ",
              x.device());
  TORCH_CHECK(k <= kProjectedLinearMaxRank, "rmtkd::projected_linear: rank k = ", k,
              " exceeds the fused kernel's maximum ", kProjectedLinearMaxRank,
              "; use two matmuls (backend='torch') for larger ranks");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  if (m == 0 || out == 0) return at::empty(shape, x.options());
  if (k == 0 || in == 0) {  // x V is zero: y is the bias (or zero)
    at::Tensor y = at::zeros(shape, x.options());
    return bias.has_value() ? y.add_(*bias) : y;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const at::Tensor x2 = x.reshape({m, in}).contiguous();
  const at::Tensor Vc = V.contiguous(), Wc = W.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, out}, x.options());
  check_launch(projected_linear_forward(x2.data_ptr(), Vc.data_ptr(), Wc.data_ptr(),
                                        bc.defined() ? bc.data_ptr() : nullptr, y.data_ptr(),
                                        to_dtype(x.scalar_type()), m, in, out, k, stream),
               "projected_linear");
  return y.view(shape);
}

}  // namespace

}  // namespace rmtkd

TORCH_LIBRARY_IMPL(rmtkd, CUDA, m) {
  m.impl("covariance_update", &rmtkd::covariance_update_cuda);
  m.impl("projected_linear", &rmtkd::projected_linear_cuda);
}

#endif  // WITH_CUDA
