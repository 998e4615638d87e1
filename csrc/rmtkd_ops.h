// Torch-side declarations shared by the binding files (bindings.cpp, cuda_ops.cpp, eigen.cpp).
// The CUDA kernels themselves are declared in rmtkd_cuda.h, which includes no torch header.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace rmtkd {

// ---- eigen.cpp: the randomized spike solver (block Krylov + Rayleigh-Ritz), any device ----

// Noise level of the 'moments' estimator and the spike count, alternated to a fixed point as
// rmtkd.spectral.estimators.fit_noise does. top: Ritz/eigen values, descending, clipped at 0;
// the detection threshold is sigma2 * unit. Returns (sigma2, k).
std::pair<double, int64_t> fit_noise_moments(const std::vector<double>& top, double trace,
                                             int64_t d, int64_t n, double unit,
                                             int64_t max_iter = 20);

// rmtkd::krylov_top: see the schema in bindings.cpp. Returns (values fp64 CPU [m],
// vectors [d, k] on c's device and dtype, info fp64 CPU [6] = threshold, sigma2, k,
// converged, basis size m, matvecs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> krylov_top(
    const at::Tensor& c, double unit, double trace, int64_t d_alive, int64_t n, double tau,
    int64_t block, double tol, int64_t max_basis, int64_t seed);

// ---- bindings.cpp: argument checks shared by every device's implementation ----

// Validates the covariance_update arguments (shapes, dtypes, devices, layout); returns ldx,
// the row stride of x in elements.
int64_t check_covariance_update(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                const std::optional<at::Tensor>& mask, const at::Tensor& c,
                                const at::Tensor& colsum);

// Validates the projected_linear arguments; returns (m, in, out, k) with m the product of x's
// leading dimensions.
std::tuple<int64_t, int64_t, int64_t, int64_t> check_projected_linear(
    const at::Tensor& x, const at::Tensor& V, const at::Tensor& W,
    const std::optional<at::Tensor>& bias);

}  // namespace rmtkd
