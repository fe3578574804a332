// ctest: the CPU kernel (and the shared per-element math in combine_math.h) against a plain double-
// precision loop written here, on odd sizes, with and without rescale / orthogonalization / fold.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/combine_cpu.h"

namespace {

// f for one sample, computed directly from STG_SPEC section 2 in double precision.
std::vector<double> naive_sample(const float* c, const float* u, const float* p0, const float* p1, int64_t n,
                                 const stg_ext::CombineScalars& s) {
  std::vector<double> f(n), ds(n), dt(n);
  double dot_ts = 0, dot_ss = 0;
  for (int64_t i = 0; i < n; ++i) {
    ds[i] = double(c[i]) - p0[i];
    dt[i] = s.two_perturbed ? double(c[i]) - p1[i] : 0.0;
    dot_ts += dt[i] * ds[i];
    dot_ss += ds[i] * ds[i];
  }
  const double alpha = s.orthogonalize && dot_ss != 0 ? dot_ts / dot_ss : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double base = s.has_uncond ? u[i] + double(s.cfg_scale) * (double(c[i]) - u[i]) : c[i];
    f[i] = base + s.stg0 * ds[i] + s.stg1 * (dt[i] - alpha * ds[i]);
  }
  if (s.rescale > 0) {
    double mc = 0, mf = 0, vc = 0, vf = 0;
    for (int64_t i = 0; i < n; ++i) mc += c[i], mf += f[i];
    mc /= n, mf /= n;
    for (int64_t i = 0; i < n; ++i) vc += (c[i] - mc) * (c[i] - mc), vf += (f[i] - mf) * (f[i] - mf);
    const double k = vf > 0 ? std::sqrt(vc / vf) : 1.0;
    for (auto& x : f) x *= s.rescale * k + (1 - s.rescale);
  }
  if (s.fold)
    for (int64_t i = 0; i < n; ++i) f[i] = u[i] + (f[i] - u[i]) / s.cfg_scale;
  return f;
}

int run_case(int64_t batch, int64_t n, stg_ext::CombineScalars s, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  const int64_t total = batch * n;
  std::vector<float> c(total), u(total), p0(total), p1(total), out(total);
  for (int64_t i = 0; i < total; ++i) c[i] = normal(gen), u[i] = normal(gen), p0[i] = c[i] + 0.3f * normal(gen),
                                      p1[i] = c[i] + 0.3f * normal(gen);
  stg_ext::cpu::combine_kernel<float>(c.data(), s.has_uncond ? u.data() : nullptr, nullptr, p0.data(),
                                      s.two_perturbed ? p1.data() : nullptr, out.data(), batch, n, s);
  double worst = 0, peak = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const auto want = naive_sample(&c[b * n], &u[b * n], &p0[b * n], &p1[b * n], n, s);
    for (int64_t i = 0; i < n; ++i) {
      worst = std::fmax(worst, std::fabs(want[i] - out[b * n + i]));
      peak = std::fmax(peak, std::fabs(want[i]));
    }
  }
  const bool ok = worst <= 2e-5 * std::fmax(1.0, peak);
  std::printf("%s batch=%lld n=%lld rescale=%.2f two=%d ortho=%d fold=%d max_abs_diff=%.3g\n", ok ? "ok  " : "FAIL",
              (long long)batch, (long long)n, s.rescale, s.two_perturbed, s.orthogonalize, s.fold, worst);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  int failures = 0;
  unsigned seed = 1;
  for (int64_t n : {1, 7, 3 * 17 * 23, 70001}) {
    for (int variant = 0; variant < 5; ++variant) {
      stg_ext::CombineScalars s{};
      s.cfg_scale = 4.5f, s.stg0 = 1.0f, s.stg1 = 0.0f, s.rescale = 0.0f;
      s.has_uncond = variant != 1, s.two_perturbed = variant >= 3, s.orthogonalize = variant == 4;
      s.fold = variant == 2;
      if (variant >= 2) s.rescale = 0.7f;
      if (s.two_perturbed) s.stg1 = 0.5f;
      failures += run_case(2, n, s, seed++);
    }
  }
  std::printf("chunk loops: %s\n%d failed\n", stg_ext::cpu::active_isa(), failures);
  return failures == 0 ? 0 : 1;
}
