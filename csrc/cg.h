// Native conjugate gradient for many right-hand sides (prefprune._C), shared declarations.
//
// The loop (cg.cpp) is written once against ATen tensors; the per-iteration vector update has
// three implementations: a fused CPU loop, a fused CUDA kernel (cg_kernels.cu, CUDA builds
// only) and a composite of ATen ops that runs on any device. All follow cg_reference in
// prefprune/ops/reference.py step for step.
//
// Preconditioning is either Jacobi (a (k,) diagonal, applied inside the fused updates) or an
// operator z = M r on the whole block (e.g. a Gauss–Newton inverse): then each iteration is
// split in two around the operator call (update x, r and the stopping tests; z = M r; new
// direction p), since the direction needs z before it can be formed.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <tuple>

#include "cg_status.h"

namespace prefprune {

// (x, status, iterations, residual, curvature, history-or-None), the fields of CGResult.
using CGOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>>;

// Maps P to A P. Both are (m, k) row-major blocks whose row j is column j of the problem (so
// that every column is contiguous); `out` is preallocated and must be fully written.
using ApplyFn = std::function<void(const at::Tensor& P, at::Tensor& out)>;

// Per-column solver state; vectors are (m, k), scalars per column are (m,).
struct CGState {
  at::Tensor x, r, p, q;
  at::Tensor z;         // (m, k) M r, only with a preconditioner operator
  at::Tensor inv_diag;  // (k,) 1 / diag(A), undefined without a Jacobi preconditioner
  at::Tensor rz;        // rᵀz of the current residual, B's dtype
  at::Tensor rel;       // ||r|| / ||b||, B's dtype
  at::Tensor safe_b;    // ||b||, 1 where b = 0
  at::Tensor curvature; // pᵀAp that stopped a column, NaN otherwise
  at::Tensor status;    // int64, kRunning while the column is active
  at::Tensor iterations;  // int64, A-products used per column
  at::Tensor work;        // CUDA fused update only: partial sums and step sizes (cg_cuda.cpp)
  at::Tensor arrivals;    // CUDA fused update only: per-column block counters, int32, zero between launches
};

// How often the loop asks whether any column is still running: every iteration on CPU (free), every
// kCudaCheckEvery iterations on CUDA (each check is a device-to-host sync). 0: never (run max_iter
// iterations; finished columns are skipped by the update), which a CUDA graph capture needs.
constexpr int64_t kCudaCheckEvery = 4;

// Generic loop; `fused` = false forces the composite-ATen update on every device (tests use it
// to check that path on CPU).
// check_every < 0 picks the default above.
// `precond` (empty: none) maps a residual block R to M R in the layout of ApplyFn, M symmetric positive
// definite; it excludes `diag`. Non-positive curvature is still tested on pᵀAp with the unpreconditioned A.
CGOutput cg_solve(const ApplyFn& apply, const at::Tensor& B, const std::optional<at::Tensor>& diag, double tol,
                  int64_t max_iter, bool record_history, bool fused, int64_t check_every = -1,
                  const ApplyFn& precond = ApplyFn());

// A = Gᵀ diag(w) G / n + λI applied natively (two GEMMs per iteration).
CGOutput cg_factored(const at::Tensor& G, const at::Tensor& w, double damping, const at::Tensor& B,
                     const std::optional<at::Tensor>& diag, double tol, int64_t max_iter, bool record_history,
                     bool fused, int64_t check_every = -1);

// Validation shared by both operators (TORCH_CHECK with the actual values).
void check_solve_args(const char* op, const at::Tensor& B, const std::optional<at::Tensor>& diag, double tol,
                      int64_t max_iter);

#ifdef WITH_CUDA
// One fused launch per iteration on the current CUDA stream (cg_cuda.cpp).
void cg_step_cuda(CGState& s, double tol, const at::Tensor& hist_row);
#endif

}  // namespace prefprune
