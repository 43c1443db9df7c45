// The factored CG solve as a dispatcher op, torch.ops.prefprune.cg_factored, so that it composes with
// torch.compile (a Meta kernel gives fake tensors their output shapes without running the solve) and
// with CUDA graphs (check_every = 0: no host synchronisation inside the op).
//
// The history of relative residuals has a data-dependent length, so this op does not return it; solves
// that record it go through the pybind function prefprune._C.cg_factored.
#include <torch/library.h>

#include <cmath>

#include "cg.h"

namespace prefprune {
namespace {

using OpOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

OpOutput cg_factored_op(const at::Tensor& G, const at::Tensor& w, double damping, const at::Tensor& B,
                        const std::optional<at::Tensor>& diag, double tol, int64_t max_iter, bool fused,
                        int64_t check_every) {
  auto out = cg_factored(G, w, damping, B, diag, tol, max_iter, false, fused, check_every);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out)};
}

// Shapes and dtypes only: x (k, m) like B, status and iterations (m,) int64, residual and curvature (m,).
OpOutput cg_factored_meta(const at::Tensor& G, const at::Tensor& w, double damping, const at::Tensor& B,
                          const std::optional<at::Tensor>& diag, double tol, int64_t max_iter, bool fused,
                          int64_t check_every) {
  (void)w;
  (void)damping;
  (void)diag;
  (void)fused;
  (void)check_every;
  TORCH_CHECK(B.dim() == 2, "cg_factored: B must be 2-D (k, m), got shape ", B.sizes());
  TORCH_CHECK(G.dim() == 2 && G.size(1) == B.size(0), "cg_factored: G ", G.sizes(), " does not match B ",
              B.sizes());
  TORCH_CHECK(std::isfinite(tol) && tol >= 0 && max_iter >= 0, "cg_factored: bad tol ", tol, " or max_iter ",
              max_iter);
  const int64_t k = B.size(0), m = B.size(1);
  const auto opts = B.options();
  return {at::empty({k, m}, opts), at::empty({m}, opts.dtype(at::kLong)), at::empty({m}, opts.dtype(at::kLong)),
          at::empty({m}, opts), at::empty({m}, opts)};
}

}  // namespace

TORCH_LIBRARY(prefprune, m) {
  m.def(
      "cg_factored(Tensor G, Tensor w, float damping, Tensor B, Tensor? diag, float tol, int max_iter, "
      "bool fused=True, int check_every=-1) -> (Tensor x, Tensor status, Tensor iterations, Tensor residual, "
      "Tensor curvature)");
}

TORCH_LIBRARY_IMPL(prefprune, CPU, m) { m.impl("cg_factored", &cg_factored_op); }

TORCH_LIBRARY_IMPL(prefprune, CUDA, m) { m.impl("cg_factored", &cg_factored_op); }

TORCH_LIBRARY_IMPL(prefprune, Meta, m) { m.impl("cg_factored", &cg_factored_meta); }

}  // namespace prefprune
