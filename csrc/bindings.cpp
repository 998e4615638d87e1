// TORCH_LIBRARY registration of the rmtkd:: ops, their argument checks, and the
// device-independent implementations.
//
//   rmtkd::covariance_update  C_upper += Xs^T Xs, colsum += Xs.sum(0), Xs = x - shift (masked
//                             rows left out): CUDA only (cuda_ops.cpp, built with WITH_CUDA)
//   rmtkd::projected_linear   y = (x V) W^T + bias: CUDA only (cuda_ops.cpp)
//   rmtkd::krylov_top         the randomized spike solver (eigen.cpp): any device, registered
//                             as CompositeExplicitAutograd (CPU and CUDA alike)
//
// On CPU tensors the two CUDA ops run their checks (so a bad call gets the same message on
// every machine) and then say that they need a CUDA tensor. Fake (meta) implementations for
// torch.compile are registered from Python (rmtkd/ops/cuda_ext.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "rmtkd_ops.h"

namespace rmtkd {

namespace {

bool low_or_single(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

int64_t check_covariance_update(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                const std::optional<at::Tensor>& mask, const at::Tensor& c,
                                const at::Tensor& colsum) {
  TORCH_CHECK(x.dim() == 2, "rmtkd::covariance_update: expected x of shape (n, d), got ",
              x.sizes(), "; flatten the leading dimensions first (x.reshape(-1, d))");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(low_or_single(x.scalar_type()),
              "rmtkd::covariance_update: expected x float32, float16 or bfloat16, got ",
              x.scalar_type(), " (centre float64 rows in float64 and pass them as float32)");
  TORCH_CHECK(d >= 1, "rmtkd::covariance_update: x has no columns (d = 0)");
  TORCH_CHECK(n <= 1 || x.stride(1) == 1,
              "rmtkd::covariance_update: expected x with unit column stride (rows may be "
              "strided), got strides ", x.strides(), "; pass x.contiguous()");
  TORCH_CHECK(n <= 1 || x.stride(0) >= d,
              "rmtkd::covariance_update: expected x's row stride >= d = ", d, ", got strides ",
              x.strides(), "; pass x.contiguous()");
  TORCH_CHECK(c.scalar_type() == at::kFloat && colsum.scalar_type() == at::kFloat,
              "rmtkd::covariance_update: expected c and colsum float32 (the accumulator), "
              "got c ", c.scalar_type(), " and colsum ", colsum.scalar_type());
  TORCH_CHECK(c.dim() == 2 && c.size(0) == d && c.size(1) == d,
              "rmtkd::covariance_update: expected c of shape (", d, ", ", d,
              ") to match x's ", d, " columns, got ", c.sizes());
  TORCH_CHECK(colsum.dim() == 1 && colsum.size(0) == d,
              "rmtkd::covariance_update: expected colsum of shape (", d, "), got ",
              colsum.sizes());
  TORCH_CHECK(c.is_contiguous() && colsum.is_contiguous(),
              "rmtkd::covariance_update: c and colsum must be contiguous (they are updated in "
              "place, so a copy would lose the result)");
  TORCH_CHECK(c.device() == x.device() && colsum.device() == x.device(),
              "rmtkd::covariance_update: expected every tensor on x's device ", x.device(),
              ", got c on ", c.device(), " and colsum on ", colsum.device());
  if (shift.has_value()) {
    const at::Tensor& s = *shift;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == d,
                "rmtkd::covariance_update: expected shift float32 of shape (", d,
                "), got ", s.scalar_type(), " of shape ", s.sizes());
    TORCH_CHECK(s.is_contiguous() && s.device() == x.device(),
                "rmtkd::covariance_update: expected shift contiguous on ", x.device(),
                ", got it on ", s.device());
  }
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.scalar_type() == at::kBool || mk.scalar_type() == at::kByte,
                "rmtkd::covariance_update: expected mask bool or uint8 (1 = keep the row), "
                "got ", mk.scalar_type());
    TORCH_CHECK(mk.dim() == 1 && mk.size(0) == n,
                "rmtkd::covariance_update: expected mask of shape (", n,
                ") (one entry per row of x), got ", mk.sizes());
    TORCH_CHECK(mk.is_contiguous() && mk.device() == x.device(),
                "rmtkd::covariance_update: expected mask contiguous on ", x.device(),
                ", got it on ", mk.device());
  }
  return n <= 1 ? d : x.stride(0);
}

std::tuple<int64_t, int64_t, int64_t, int64_t> check_projected_linear(
    const at::Tensor& x, const at::Tensor& V, const at::Tensor& W,
    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(V.dim() == 2, "rmtkd::projected_linear: expected V of shape (d_in, k), got ",
              V.sizes());
  TORCH_CHECK(W.dim() == 2, "rmtkd::projected_linear: expected W of shape (d_out, k), got ",
              W.sizes());
  const int64_t in = V.size(0), k = V.size(1), out = W.size(0);
  TORCH_CHECK(W.size(1) == k, "rmtkd::projected_linear: expected W with ", k,
              " columns (the rank of V, ", V.sizes(), "), got W of shape ", W.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "rmtkd::projected_linear: expected x of shape "
              "(..., ", in, ") to match V ", V.sizes(), ", got ", x.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out,
                "rmtkd::projected_linear: expected bias of shape (", out, "), got ",
                bias->sizes());
  TORCH_CHECK(low_or_single(x.scalar_type()),
              "rmtkd::projected_linear: expected x float32, float16 or bfloat16, got ",
              x.scalar_type());
  const bool same_dtype = V.scalar_type() == x.scalar_type() &&
                          W.scalar_type() == x.scalar_type() &&
                          (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  TORCH_CHECK(same_dtype, "rmtkd::projected_linear: expected x, V, W and bias of one dtype, "
              "got x ", x.scalar_type(), ", V ", V.scalar_type(), ", W ", W.scalar_type(),
              bias.has_value() ? ", bias " : "",
              bias.has_value() ? c10::toString(bias->scalar_type()) : "");
  const bool same_device = V.device() == x.device() && W.device() == x.device() &&
                           (!bias.has_value() || bias->device() == x.device());
  TORCH_CHECK(same_device, "rmtkd::projected_linear: expected x, V, W and bias on one device, "
              "got x on ", x.device(), ", V on ", V.device(), ", W on ", W.device());
  const int64_t m = in > 0 ? x.numel() / in : 0;
  return {m, in, out, k};
}

namespace {

void covariance_update_cpu(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& mask, const at::Tensor& c,
                           const at::Tensor& colsum) {
  check_covariance_update(x, shift, mask, c, colsum);
  TORCH_CHECK(false, "rmtkd::covariance_update runs on CUDA tensors only (got ", x.device(),
              "); on the CPU use CovarianceAccumulator(backend='torch')");
}

at::Tensor projected_linear_cpu(const at::Tensor& x, const at::Tensor& V, const at::Tensor& W,
                                const std::optional<at::Tensor>& bias) {
  check_projected_linear(x, V, W, bias);
  TORCH_CHECK(false, "rmtkd::projected_linear runs on CUDA tensors only (got ", x.device(),
              "); on the CPU use rmtkd.ops.projected_linear.projected_linear(backend='torch')");
  return at::Tensor();  // not reached
}

// rmtkd::_fit_noise_moments: the solver's threshold step alone, for tests against Python's
// fit_noise (top: fp64 CPU values, descending).
std::tuple<double, int64_t> fit_noise_moments_op(const at::Tensor& top, double trace,
                                                 int64_t d, int64_t n, double unit) {
  TORCH_CHECK(top.dim() == 1 && top.scalar_type() == at::kDouble && top.is_cpu(),
              "rmtkd::_fit_noise_moments: expected top as a 1-D float64 CPU tensor, got ",
              top.scalar_type(), " of shape ", top.sizes(), " on ", top.device());
  TORCH_CHECK(d >= 1 && n >= 1, "rmtkd::_fit_noise_moments: expected d, n >= 1, got ", d,
              ", ", n);
  const at::Tensor t = top.contiguous();
  const double* p = t.data_ptr<double>();
  std::vector<double> v(p, p + t.numel());
  for (double& x : v) x = std::max(x, 0.0);
  const auto [sigma2, k] = fit_noise_moments(v, trace, d, n, unit);
  return {sigma2, k};
}

}  // namespace

}  // namespace rmtkd

TORCH_LIBRARY(rmtkd, m) {
  m.def("covariance_update(Tensor x, Tensor? shift, Tensor? mask, Tensor(a!) c, "
        "Tensor(b!) colsum) -> ()");
  m.def("projected_linear(Tensor x, Tensor V, Tensor W, Tensor? bias) -> Tensor");
  // unit: threshold / sigma^2 (from the margin, d_alive and n); trace: tr C over the alive
  // features; tau: unused by the 'moments' estimator. max_basis < 0: the solver's default.
  // Returns values (fp64, host, all m Ritz values, descending), vectors (d, k) on c's device
  // and info (fp64, host) = [threshold, sigma2, k, converged, basis size m, matvecs].
  m.def("krylov_top(Tensor c, float unit, float trace, int d_alive, int n, float tau=0.5, "
        "int block=16, float tol=1e-4, int max_basis=-1, int seed=0) -> "
        "(Tensor values, Tensor vectors, Tensor info)");
  // (sigma2, k) of the 'moments' estimator's fixed point; the threshold is sigma2 * unit.
  m.def("_fit_noise_moments(Tensor top, float trace, int d, int n, float unit) -> (float, int)");
}

TORCH_LIBRARY_IMPL(rmtkd, CPU, m) {
  m.impl("covariance_update", &rmtkd::covariance_update_cpu);
  m.impl("projected_linear", &rmtkd::projected_linear_cpu);
}

TORCH_LIBRARY_IMPL(rmtkd, CompositeExplicitAutograd, m) {
  m.impl("krylov_top", &rmtkd::krylov_top);
  m.impl("_fit_noise_moments", &rmtkd::fit_noise_moments_op);
}
