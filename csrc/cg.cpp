// Native conjugate-gradient loop over ATen tensors: one source for CPU and CUDA tensors.
//
// Follows cg_reference (prefprune/ops/reference.py) step for step, so that float64 iterates
// agree to rounding. The problem's columns are stored as rows of (m, k) blocks: each column
// is contiguous, which is what the per-column fused updates and reductions want.
#include "cg.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace prefprune {
namespace {

// One column of one iteration, exactly the reference's order of decisions:
//   pq = pᵀq; pq <= 0 → stop (non-positive curvature); α = rz / pq; x += αp; r -= αq;
//   rel = ||r|| / ||b||; rel <= tol → stop (converged); z = M⁻¹r; β = rᵀz / rz; p = z + βp.
// With `split` (a preconditioner operator) the column stops after the convergence test: z comes from
// the operator, and direction_column finishes the iteration.
// Dot products accumulate in double: float32 columns then lose nothing to long sums.
template <typename scalar_t>
void step_column(scalar_t* x, scalar_t* r, scalar_t* p, const scalar_t* q, const scalar_t* inv, int64_t k,
                 scalar_t& rz, scalar_t& rel, scalar_t safe_b, int64_t& status, int64_t& iterations,
                 scalar_t& curvature, scalar_t tol, bool split) {
  double pq_acc = 0.0;
  for (int64_t i = 0; i < k; ++i) pq_acc += static_cast<double>(p[i]) * static_cast<double>(q[i]);
  const scalar_t pq = static_cast<scalar_t>(pq_acc);
  if (pq <= scalar_t(0)) {
    status = kNonpositiveCurvature;
    curvature = pq;
    iterations += 1;
    return;
  }
  const scalar_t alpha = rz / pq;
  double rr = 0.0, rz_acc = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    x[i] += alpha * p[i];
    const scalar_t ri = r[i] - alpha * q[i];
    r[i] = ri;
    const scalar_t zi = inv ? inv[i] * ri : ri;
    rr += static_cast<double>(ri) * static_cast<double>(ri);
    rz_acc += static_cast<double>(ri) * static_cast<double>(zi);
  }
  iterations += 1;
  rel = static_cast<scalar_t>(std::sqrt(rr)) / safe_b;
  if (rel <= tol) {
    status = kConverged;
    return;
  }
  if (split) return;
  const scalar_t rz_new = static_cast<scalar_t>(rz_acc);
  const scalar_t beta = rz_new / rz;
  rz = rz_new;
  for (int64_t i = 0; i < k; ++i) {
    const scalar_t zi = inv ? inv[i] * r[i] : r[i];
    p[i] = zi + beta * p[i];
  }
}

// The rest of a split iteration for a running column, z = M r given: β = rᵀz / rz; p = z + βp.
template <typename scalar_t>
void direction_column(const scalar_t* r, const scalar_t* z, scalar_t* p, int64_t k, scalar_t& rz) {
  double rz_acc = 0.0;
  for (int64_t i = 0; i < k; ++i) rz_acc += static_cast<double>(r[i]) * static_cast<double>(z[i]);
  const scalar_t rz_new = static_cast<scalar_t>(rz_acc);
  const scalar_t beta = rz_new / rz;
  rz = rz_new;
  for (int64_t i = 0; i < k; ++i) p[i] = z[i] + beta * p[i];
}

// Threads pay off only with ~32k elements per task; below that one thread is faster.
int64_t column_grain(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

// Fused CPU update: one pass structure per column, columns in parallel when there is enough work.
// `split`: stop each running column before its new direction (cg_direction_cpu follows).
void cg_step_cpu(CGState& s, double tol, const at::Tensor& hist_row, bool split) {
  const int64_t m = s.x.size(0), k = s.x.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "cg_step_cpu", [&] {
    scalar_t* x = s.x.data_ptr<scalar_t>();
    scalar_t* r = s.r.data_ptr<scalar_t>();
    scalar_t* p = s.p.data_ptr<scalar_t>();
    const scalar_t* q = s.q.data_ptr<scalar_t>();
    const scalar_t* inv = s.inv_diag.defined() ? s.inv_diag.data_ptr<scalar_t>() : nullptr;
    scalar_t* rz = s.rz.data_ptr<scalar_t>();
    scalar_t* rel = s.rel.data_ptr<scalar_t>();
    const scalar_t* safe_b = s.safe_b.data_ptr<scalar_t>();
    scalar_t* curvature = s.curvature.data_ptr<scalar_t>();
    int64_t* status = s.status.data_ptr<int64_t>();
    int64_t* iterations = s.iterations.data_ptr<int64_t>();
    scalar_t* hist = hist_row.defined() ? hist_row.data_ptr<scalar_t>() : nullptr;
    // The reference compares rel <= tol in the solve dtype; do the same.
    const scalar_t tol_s = static_cast<scalar_t>(tol);
    at::parallel_for(0, m, column_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        if (status[j] == kRunning) {
          step_column<scalar_t>(x + j * k, r + j * k, p + j * k, q + j * k, inv, k, rz[j], rel[j], safe_b[j],
                                status[j], iterations[j], curvature[j], tol_s, split);
        }
        if (hist) hist[j] = rel[j];
      }
    });
  });
}

// Second half of a split CPU iteration: the new direction of every running column from z = M r (s.z).
void cg_direction_cpu(CGState& s) {
  const int64_t m = s.x.size(0), k = s.x.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "cg_direction_cpu", [&] {
    const scalar_t* r = s.r.data_ptr<scalar_t>();
    const scalar_t* z = s.z.data_ptr<scalar_t>();
    scalar_t* p = s.p.data_ptr<scalar_t>();
    scalar_t* rz = s.rz.data_ptr<scalar_t>();
    const int64_t* status = s.status.data_ptr<int64_t>();
    at::parallel_for(0, m, column_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        if (status[j] == kRunning) direction_column<scalar_t>(r + j * k, z + j * k, p + j * k, k, rz[j]);
      }
    });
  });
}

// The same update as a chain of ATen ops (the reference's, transposed): runs on any device. First half:
// curvature test, x, r and the convergence test.
void cg_update_aten(CGState& s, double tol, const at::Tensor& hist_row) {
  at::Tensor active = s.status.eq(kRunning);
  at::Tensor pq = (s.p * s.q).sum(1);
  at::Tensor bad = active.logical_and(pq <= 0);
  s.status.masked_fill_(bad, kNonpositiveCurvature);
  s.curvature.copy_(at::where(bad, pq, s.curvature));
  s.iterations.add_(bad);
  active = active.logical_and(bad.logical_not());
  at::Tensor one = at::ones_like(pq);
  at::Tensor alpha = at::where(active, s.rz / at::where(active, pq, one), at::zeros_like(pq)).unsqueeze(1);
  s.x.add_(alpha * s.p);
  s.r.sub_(alpha * s.q);
  s.iterations.add_(active);
  at::Tensor norm = at::linalg_vector_norm(s.r, 2, at::IntArrayRef{1}, false, std::nullopt);
  s.rel.copy_(at::where(active, norm / s.safe_b, s.rel));
  at::Tensor done = active.logical_and(s.rel <= tol);
  s.status.masked_fill_(done, kConverged);
  if (hist_row.defined()) hist_row.copy_(s.rel);
}

// Second half: β = rᵀz / rz and p = z + βp for the columns still running, z = M⁻¹r given.
void cg_direction_aten(CGState& s, const at::Tensor& z) {
  at::Tensor active = s.status.eq(kRunning);
  at::Tensor rz_new = (s.r * z).sum(1);
  at::Tensor beta = at::where(active, rz_new / at::where(active, s.rz, at::ones_like(s.rz)), at::zeros_like(rz_new));
  s.p.copy_(at::where(active.unsqueeze(1), z + beta.unsqueeze(1) * s.p, s.p));
  s.rz.copy_(at::where(active, rz_new, s.rz));
}

void cg_step_aten(CGState& s, double tol, const at::Tensor& hist_row) {
  cg_update_aten(s, tol, hist_row);
  cg_direction_aten(s, s.inv_diag.defined() ? s.r * s.inv_diag : s.r);
}

bool any_active(const CGState& s) {
  if (s.status.is_cpu()) {
    const int64_t* st = s.status.data_ptr<int64_t>();
    return std::any_of(st, st + s.status.numel(), [](int64_t v) { return v == kRunning; });
  }
  return s.status.eq(kRunning).any().item<bool>();
}

}  // namespace

void check_solve_args(const char* op, const at::Tensor& B, const std::optional<at::Tensor>& diag, double tol,
                      int64_t max_iter) {
  TORCH_CHECK(B.dim() == 2, op, ": B must be 2-D (k, m), got shape ", B.sizes());
  TORCH_CHECK(B.scalar_type() == at::kFloat || B.scalar_type() == at::kDouble, op,
              ": B must be float32 or float64, got ", B.scalar_type());
  TORCH_CHECK(std::isfinite(tol) && tol >= 0, op, ": tol must be finite and >= 0, got ", tol);
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be >= 0, got ", max_iter);
  if (diag) {
    const at::Tensor& d = *diag;
    TORCH_CHECK(d.dim() == 1 && d.size(0) == B.size(0), op, ": diag must have shape [", B.size(0),
                "] to match B ", B.sizes(), ", got ", d.sizes());
    TORCH_CHECK(d.scalar_type() == B.scalar_type(), op, ": diag dtype ", d.scalar_type(),
                " differs from B dtype ", B.scalar_type());
    TORCH_CHECK(d.device() == B.device(), op, ": diag is on ", d.device(), " but B is on ", B.device());
  }
}

CGOutput cg_solve(const ApplyFn& apply, const at::Tensor& B, const std::optional<at::Tensor>& diag, double tol,
                  int64_t max_iter, bool record_history, bool fused, int64_t check_every, const ApplyFn& precond) {
  check_solve_args("cg_solve", B, diag, tol, max_iter);
  const bool has_precond = static_cast<bool>(precond);
  TORCH_CHECK(!(diag && has_precond), "cg_solve: give one preconditioner, a Jacobi diagonal or an operator, not ",
              "both (diag of shape ", diag ? diag->sizes() : at::IntArrayRef{}, " and precond)");
  c10::DeviceGuard guard(B.device());
  c10::NoGradGuard no_grad;
  const int64_t k = B.size(0), m = B.size(1);
  const auto opts = B.options();
  const auto iopts = opts.dtype(at::kLong);

  CGState s;
  // A fresh buffer, never a view: B may be a view of exactly this layout and must stay intact.
  s.r = at::empty({m, k}, opts);
  s.r.copy_(B.t());
  s.x = at::zeros({m, k}, opts);
  s.q = at::empty({m, k}, opts);
  at::Tensor bnorm = at::linalg_vector_norm(s.r, 2, at::IntArrayRef{1}, false, std::nullopt);
  at::Tensor active = bnorm > 0;
  s.safe_b = at::where(active, bnorm, at::ones_like(bnorm));
  if (diag) s.inv_diag = at::reciprocal(*diag).contiguous();
  at::Tensor z;
  if (has_precond) {
    s.z = at::empty({m, k}, opts);
    precond(s.r, s.z);
    z = s.z;
  } else {
    z = s.inv_diag.defined() ? s.r * s.inv_diag : s.r;
  }
  s.p = z.clone(at::MemoryFormat::Contiguous);
  s.rz = (s.r * z).sum(1);
  s.status = at::full({m}, kConverged, iopts).masked_fill_(active, kRunning);
  s.iterations = at::zeros({m}, iopts);
  s.curvature = at::full({m}, std::numeric_limits<double>::quiet_NaN(), opts);
  s.rel = at::where(active, bnorm / s.safe_b, at::zeros_like(bnorm));

  at::Tensor hist;
  int64_t rows = 1;
  if (record_history) {
    hist = at::empty({std::min<int64_t>(max_iter, 63) + 1, m}, opts);
    hist.select(0, 0).copy_(s.rel);
  }

  const bool cpu_fused = fused && B.is_cpu();
#ifdef WITH_CUDA
  // With a preconditioner operator the CUDA update runs as ATen ops around it: each iteration already
  // pays two operator calls (an HVP pass and the preconditioner's GEMMs), next to which the ~25 small
  // update launches are noise, and a split fused kernel could not be run here without a GPU.
  const bool cuda_fused = fused && B.is_cuda() && !has_precond;
#endif
  const int64_t every = check_every >= 0 ? check_every : (B.is_cuda() ? kCudaCheckEvery : 1);
  for (int64_t it = 0; it < max_iter; ++it) {
    if (every > 0 && it % every == 0 && !any_active(s)) break;
    apply(s.p, s.q);
    at::Tensor hist_row;
    if (record_history) {
      if (rows >= hist.size(0)) hist = at::cat({hist, at::empty_like(hist)}, 0);
      hist_row = hist.select(0, rows);
    }
    if (has_precond) {
      // Like the reference, M is applied to the whole block (stopped columns too): the operator sees
      // the same (k, m) shape, and so the same per-column shifts, on every call.
      if (cpu_fused) {
        cg_step_cpu(s, tol, hist_row, /*split=*/true);
      } else {
        cg_update_aten(s, tol, hist_row);
      }
      precond(s.r, s.z);
      if (cpu_fused) {
        cg_direction_cpu(s);
      } else {
        cg_direction_aten(s, s.z);
      }
    } else if (cpu_fused) {
      cg_step_cpu(s, tol, hist_row, /*split=*/false);
#ifdef WITH_CUDA
    } else if (cuda_fused) {
      cg_step_cuda(s, tol, hist_row);
#endif
    } else {
      cg_step_aten(s, tol, hist_row);
    }
    ++rows;
  }
  s.status.masked_fill_(s.status.eq(kRunning), kMaxIter);
  std::optional<at::Tensor> history;
  if (record_history) {
    // Iterations run after every column had stopped (checks only every few iterations) add rows the
    // reference does not have: it records one row per loop iteration, i.e. 1 + the most iterations any
    // column used (a column that runs at all runs from the first iteration on).
    const int64_t used = m > 0 ? s.iterations.max().item<int64_t>() : 0;
    history = hist.narrow(0, 0, std::min<int64_t>(rows, used + 1)).clone();
  }
  return {s.x.t().contiguous(), s.status, s.iterations, s.rel, s.curvature, history};
}

CGOutput cg_factored(const at::Tensor& G, const at::Tensor& w, double damping, const at::Tensor& B,
                     const std::optional<at::Tensor>& diag, double tol, int64_t max_iter, bool record_history,
                     bool fused, int64_t check_every) {
  check_solve_args("cg_factored", B, diag, tol, max_iter);
  TORCH_CHECK(G.dim() == 2, "cg_factored: G must be 2-D (n, k), got shape ", G.sizes());
  TORCH_CHECK(G.size(1) == B.size(0), "cg_factored: G ", G.sizes(), " has ", G.size(1),
              " columns but B ", B.sizes(), " has ", B.size(0), " rows");
  TORCH_CHECK(G.size(0) > 0, "cg_factored: G must have at least one row, got shape ", G.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == G.size(0), "cg_factored: w must have shape [", G.size(0),
              "] to match G ", G.sizes(), ", got ", w.sizes());
  TORCH_CHECK(G.scalar_type() == B.scalar_type() && w.scalar_type() == B.scalar_type(),
              "cg_factored: G, w and B must share one dtype, got G ", G.scalar_type(), ", w ", w.scalar_type(),
              ", B ", B.scalar_type());
  TORCH_CHECK(G.device() == B.device() && w.device() == B.device(), "cg_factored: G, w and B must be on one device, got G on ",
              G.device(), ", w on ", w.device(), ", B on ", B.device());
  TORCH_CHECK(std::isfinite(damping), "cg_factored: damping must be finite, got ", damping);

  c10::DeviceGuard guard(B.device());
  c10::NoGradGuard no_grad;
  const int64_t n = G.size(0), k = B.size(0), m = B.size(1);
  // GEMMs need one unit stride; otherwise every product would copy G again.
  const at::Tensor Gc = (G.stride(0) == 1 || G.stride(1) == 1) ? G : G.contiguous();
  const at::Tensor Gt = Gc.t();
  const at::Tensor w_n = (w / static_cast<double>(n)).contiguous().unsqueeze(1);
  // The products run in the reference's orientation, on row-major (k, m) blocks: G X, then
  // λX + Gᵀ(diag(w/n) G X). On CPU this was as fast or faster than products on the (m, k)
  // state directly (MKL favours tall outputs); the two transposing copies cost O(k m), nothing
  // next to the O(n k m) products, and for m = 1 both layouts are the same memory (no copy).
  at::Tensor Y = at::empty({n, m}, B.options());
  at::Tensor Xs, Qs;
  if (m > 1) {
    Xs = at::empty({k, m}, B.options());
    Qs = at::empty({k, m}, B.options());
  }
  ApplyFn apply = [&](const at::Tensor& P, at::Tensor& out) {
    const at::Tensor X = m > 1 ? Xs.copy_(P.t()) : P.view({k, m});
    at::Tensor Q = m > 1 ? Qs : out.view({k, m});
    at::mm_out(Y, Gc, X);
    Y.mul_(w_n);
    at::addmm_out(Q, X, Gt, Y, damping, 1.0);
    if (m > 1) out.copy_(Q.t());
  };
  return cg_solve(apply, B, diag, tol, max_iter, record_history, fused, check_every);
}

}  // namespace prefprune
