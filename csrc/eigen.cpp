// The randomized spike solver's loop in C++ (ATen calls only: runs on CPU and CUDA tensors).
//
// A port of rmtkd/ops/eigen.py `block_krylov_top` with the detection threshold of the
// 'moments' noise estimator (rmtkd/spectral/estimators.py `fit_noise` / `_moments`,
// rmtkd/spectral/bbp.py `spike_strength`) computed here too, so that one call runs the whole
// solve with no Python in the loop. The block Krylov basis K = [Q0, C Q0, C^2 Q0, ...] grows
// on c's device (CGS2 + QR per block); Rayleigh-Ritz solves the small projected problem on
// the host in fp64. The only device -> host copies are one per Rayleigh-Ritz step (the
// projected matrix, the newest block's R factor and, the first time, ||C||_F in one buffer).
// On the CPU, replacing vanished directions is a branch; on other devices the replacement is
// computed every time and selected with `where`, so the loop never waits for the device.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <mutex>

#include "rmtkd_ops.h"

namespace rmtkd {

namespace {

// rmtkd.spectral.estimators._moments: first moment of the bulk with the BBP correction.
double moments_sigma2(const std::vector<double>& top, int64_t k, double trace, int64_t d,
                      int64_t n, int64_t iters = 50) {
  double spike_sum = 0.0;
  for (int64_t i = 0; i < k; ++i) spike_sum += top[i];
  const double bulk_sum = std::max(trace - spike_sum, 0.0);
  const int64_t m = d - k;
  if (m <= 0 || bulk_sum <= 0.0) return DBL_MIN;  // np.finfo(float).tiny
  double s2 = bulk_sum / static_cast<double>(m);
  const double gamma = static_cast<double>(d) / static_cast<double>(n);
  const double edge = (1.0 + std::sqrt(gamma)) * (1.0 + std::sqrt(gamma));
  for (int64_t it = 0; it < iters; ++it) {
    // sum over the recoverable spikes of 1 + s2 / theta, theta = spike_strength(lam, gamma, s2)
    double acc = 0.0;
    const double lam_plus = s2 * edge;
    for (int64_t i = 0; i < k; ++i) {
      const double lam = top[i];
      if (!(lam > lam_plus)) continue;  // at or below the MP edge: no spike (NaN in Python)
      const double c = lam - s2 * (1.0 + gamma);
      const double theta =
          0.5 * (c + std::sqrt(std::max(c * c - 4.0 * gamma * s2 * s2, 0.0)));
      if (std::isfinite(theta) && theta > 0.0) acc += 1.0 + s2 / theta;
    }
    const double denom = static_cast<double>(m) - gamma * acc;
    const double next = denom > 0.5 * static_cast<double>(m) ? bulk_sum / denom
                                                              : bulk_sum / static_cast<double>(m);
    if (std::abs(next - s2) <= 1e-12 * s2) {
      s2 = next;
      break;
    }
    s2 = next;
  }
  return s2;
}

int64_t count_above(const std::vector<double>& v, double thr) {
  return static_cast<int64_t>(
      std::count_if(v.begin(), v.end(), [thr](double x) { return x > thr; }));
}

// A generator for c's device seeded like torch.Generator(device).manual_seed(seed), so that
// the starting block (and every fresh direction) equals the Python solver's.
at::Generator seeded_generator(const at::Device& device, int64_t seed) {
  at::Generator def = at::globalContext().defaultGenerator(device);  // shares the state
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(def.mutex());
    gen = def.clone();
  }
  gen.set_current_seed(static_cast<uint64_t>(seed));
  return gen;
}

// rmtkd.ops.eigen._orthonormalise: (I - q q^T) f = Z R by CGS2 against q then QR; columns of
// f that vanish are replaced by fresh random directions orthogonal to the basis.
std::pair<at::Tensor, at::Tensor> orthonormalise(at::Tensor f, const at::Tensor& q,
                                                 at::Generator& gen, const at::Tensor& h) {
  if (q.defined() && q.size(1) > 0) {
    f = f - q.mm(h.defined() ? h : q.t().mm(f));
    f = f - q.mm(q.t().mm(f));
  }
  auto [z, r] = at::linalg_qr(f);
  const double tiny = f.scalar_type() == at::kFloat ? static_cast<double>(FLT_MIN) : DBL_MIN;
  at::Tensor diag = r.diagonal().abs();
  at::Tensor bad = diag <= diag.max().clamp_min(tiny) * 1e-5;
  if (!f.is_cpu() || bad.any().item<bool>()) {
    at::Tensor fresh = at::randn(f.sizes(), gen, f.options());
    at::Tensor basis = q.defined() ? at::cat({q, z}, 1) : z;
    for (int i = 0; i < 2; ++i) fresh = fresh - basis.mm(basis.t().mm(fresh));
    fresh = std::get<0>(at::linalg_qr(fresh));
    z = at::where(bad, fresh, z);
  }
  return {z, r};
}

}  // namespace

std::pair<double, int64_t> fit_noise_moments(const std::vector<double>& top, double trace,
                                             int64_t d, int64_t n, double unit,
                                             int64_t max_iter) {
  const int64_t k_max =
      std::min({static_cast<int64_t>(top.size()), d - 1, n - 1});
  int64_t k = 0;
  std::vector<int64_t> seen;
  double sigma2 = 0.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    sigma2 = moments_sigma2(top, k, trace, d, n);
    const int64_t new_k = std::min(count_above(top, sigma2 * unit), k_max);
    if (new_k == k || std::find(seen.begin(), seen.end(), new_k) != seen.end()) {
      k = new_k;  // stable, or a 2-cycle: keep the latest
      break;
    }
    seen.push_back(k);
    k = new_k;
  }
  return {sigma2, k};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> krylov_top(
    const at::Tensor& c_in, double unit, double trace, int64_t d_alive, int64_t n, double tau,
    int64_t block, double tol, int64_t max_basis, int64_t seed) {
  (void)tau;  // the 'moments' estimator has no starting quantile (kept for the signature)
  TORCH_CHECK(c_in.dim() == 2 && c_in.size(0) == c_in.size(1),
              "rmtkd::krylov_top: expected c to be a square (d, d) matrix, got shape ",
              c_in.sizes());
  TORCH_CHECK(c_in.scalar_type() == at::kFloat || c_in.scalar_type() == at::kDouble,
              "rmtkd::krylov_top: expected c to be float32 or float64, got ",
              c_in.scalar_type());
  TORCH_CHECK(c_in.size(0) >= 1, "rmtkd::krylov_top: c is empty (d = 0)");
  TORCH_CHECK(std::isfinite(unit) && unit > 0.0,
              "rmtkd::krylov_top: expected unit (threshold / sigma^2) > 0, got ", unit);
  TORCH_CHECK(std::isfinite(trace) && trace >= 0.0,
              "rmtkd::krylov_top: expected a finite trace >= 0, got ", trace);
  TORCH_CHECK(d_alive >= 1, "rmtkd::krylov_top: expected d_alive >= 1, got ", d_alive);
  TORCH_CHECK(n >= 1, "rmtkd::krylov_top: expected n (samples) >= 1, got ", n);
  TORCH_CHECK(block >= 1, "rmtkd::krylov_top: expected block >= 1, got ", block);
  TORCH_CHECK(tol > 0.0, "rmtkd::krylov_top: expected tol > 0, got ", tol);

  const at::Tensor c = c_in.contiguous();
  const int64_t d = c.size(0);
  const auto opts = c.options();
  const auto host64 = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  at::Generator gen = seeded_generator(c.device(), seed);
  const int64_t mb = std::min(d, max_basis >= 0 ? max_basis : std::max(8 * block, d / 2));
  const int64_t b = std::min(block, d);
  const double eps = c.scalar_type() == at::kFloat ? static_cast<double>(FLT_EPSILON)
                                                   : DBL_EPSILON;
  // ||C||_F stays on the device until the first Rayleigh-Ritz step's copy.
  const at::Tensor fro = at::linalg_matrix_norm(c, "fro").to(at::kDouble).reshape({1});
  double res_floor = -1.0;  // 30 eps ||C||_F, the rounding floor of a residual

  at::Tensor zl =
      orthonormalise(at::randn({d, b}, gen, opts), at::Tensor(), gen, at::Tensor()).first;
  at::Tensor q = zl;
  at::Tensor t = at::zeros({0, 0}, opts.dtype(at::kDouble));
  int64_t matvecs = 0, last_rr = 0;

  auto finish = [&](const at::Tensor& vals, const at::Tensor& y, int64_t k, double thr,
                    double sigma2, int64_t m, bool converged) {
    at::Tensor vectors = q.mm(y.narrow(1, 0, k).to(opts));
    at::Tensor info = at::tensor({thr, sigma2, static_cast<double>(k),
                                  converged ? 1.0 : 0.0, static_cast<double>(m),
                                  static_cast<double>(matvecs)},
                                 host64);
    return std::make_tuple(vals, vectors, info);
  };

  while (true) {
    const int64_t m = q.size(1);
    const int64_t bz = zl.size(1);
    at::Tensor wl = c.mm(zl);  // C times the newest block
    matvecs += bz;
    at::Tensor h = q.t().mm(wl);  // its Rayleigh-quotient columns
    t = at::cat({at::cat({t, h.narrow(0, 0, m - bz).t().to(at::kDouble)}, 0),
                 h.to(at::kDouble)},
                1);
    auto [znext, r] = orthonormalise(wl, q, gen, h);
    if (last_rr == 0 || m - last_rr >= std::max(b, m / 8) || m + b > mb) {
      last_rr = m;
      // One device -> host copy: the projected matrix, R of the newest block (residuals
      // come free from the Krylov relation) and, the first time, ||C||_F.
      std::vector<at::Tensor> parts = {t.reshape({-1}), r.to(at::kDouble).reshape({-1})};
      if (res_floor < 0.0) parts.push_back(fro);
      const at::Tensor host = at::cat(parts).to(at::kCPU);
      const at::Tensor th = host.narrow(0, 0, m * m).view({m, m});
      const at::Tensor rh = host.narrow(0, m * m, bz * bz).view({bz, bz});
      if (res_floor < 0.0) res_floor = 30.0 * eps * host[m * m + bz * bz].item<double>();

      auto [theta, yy] = at::linalg_eigh((th + th.t()) * 0.5);
      const at::Tensor vals = theta.flip({0}).contiguous();
      const at::Tensor y = yy.flip({1});
      const double* pv = vals.data_ptr<double>();
      std::vector<double> top(pv, pv + m);
      for (double& v : top) v = std::max(v, 0.0);
      const auto [sigma2, k_fit] = fit_noise_moments(top, trace, d_alive, n, unit);
      (void)k_fit;
      const double thr = sigma2 * unit;
      const int64_t k = count_above(std::vector<double>(pv, pv + m), thr);
      if (k < m) {
        const at::Tensor res_t = at::linalg_vector_norm(
            rh.mm(y.narrow(0, m - bz, bz).narrow(1, 0, k + 1)), 2, at::IntArrayRef{0});
        const double* res = res_t.contiguous().data_ptr<double>();
        bool all_ok = true;
        for (int64_t i = 0; i < k && all_ok; ++i)
          all_ok = res[i] <= std::max(tol * std::abs(pv[i]), res_floor);
        // The first value below the threshold must be known to be below it: converged, or
        // nearly (to sqrt(tol)) with its residual interval below the threshold.
        const bool ok_k = res[k] <= std::max(tol * std::abs(pv[k]), res_floor);
        const bool below = ok_k || (res[k] <= std::sqrt(tol) * std::abs(pv[k]) &&
                                    pv[k] + res[k] < thr);
        if (all_ok && below) return finish(vals, y, k, thr, sigma2, m, true);
      }
      if (m + b > mb) return finish(vals, y, k, thr, sigma2, m, false);
    }
    q = at::cat({q, znext}, 1);
    zl = znext;
  }
}

}  // namespace rmtkd
