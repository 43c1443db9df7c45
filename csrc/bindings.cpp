// pybind11 entry point of prefprune._C: the native CG solver and build information.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "cg.h"
#include "cg_launch.h"

namespace py = pybind11;

namespace {

using prefprune::CGOutput;

// A Python callable on (k, m) blocks as an ApplyFn on the loop's (m, k) state. It is called with the GIL
// taken back and the caller's grad mode (the loop itself runs under NoGradGuard), and its result is checked
// against B. `fn` must outlive the returned function (it is held by reference: copying a py::object would
// touch its reference count without the GIL).
prefprune::ApplyFn python_operator(const py::function& fn, const char* role, const at::Tensor& B,
                                   bool grad_enabled) {
  const int64_t k = B.size(0), m = B.size(1);
  const auto dtype = B.scalar_type();
  const auto device = B.device();
  return [&fn, role, k, m, dtype, device, grad_enabled](const at::Tensor& P, at::Tensor& out) {
    py::gil_scoped_acquire gil;
    at::Tensor Q;
    {
      c10::AutoGradMode mode(grad_enabled);
      const at::Tensor block = P.t().contiguous();
      py::object res = fn(block);
      TORCH_CHECK(THPVariable_Check(res.ptr()), "cg_callable: the ", role, " must return a Tensor, got ",
                  std::string(py::str(py::type::handle_of(res).attr("__name__"))));
      Q = THPVariable_Unpack(res.ptr()).detach();
    }
    TORCH_CHECK(Q.dim() == 2 && Q.size(0) == k && Q.size(1) == m, "cg_callable: the ", role,
                " returned shape ", Q.sizes(), " for a [", k, ", ", m, "] block; expected [", k, ", ", m, "]");
    TORCH_CHECK(Q.scalar_type() == dtype, "cg_callable: the ", role, " returned dtype ", Q.scalar_type(),
                "; expected ", dtype);
    TORCH_CHECK(Q.device() == device, "cg_callable: the ", role, " returned a tensor on ", Q.device(),
                "; expected ", device);
    out.copy_(Q.t());
  };
}

// Runs the C++ loop without the GIL and takes it back only around each call of `fn` (and of `precond`),
// so other Python threads run while the vector updates do.
CGOutput cg_callable(const py::function& fn, const at::Tensor& B, const std::optional<at::Tensor>& diag, double tol,
                     int64_t max_iter, bool record_history, bool fused, int64_t check_every,
                     const std::optional<py::function>& precond) {
  prefprune::check_solve_args("cg_callable", B, diag, tol, max_iter);
  TORCH_CHECK(!(diag && precond), "cg_callable: give one preconditioner, diag (a Jacobi diagonal, here of shape ",
              diag ? diag->sizes() : at::IntArrayRef{}, ") or precond (an operator), not both");
  const bool grad_enabled = c10::GradMode::is_enabled();
  const prefprune::ApplyFn apply = python_operator(fn, "operator", B, grad_enabled);
  const prefprune::ApplyFn apply_m =
      precond ? python_operator(*precond, "preconditioner", B, grad_enabled) : prefprune::ApplyFn();
  CGOutput result;
  {
    py::gil_scoped_release nogil;
    result = prefprune::cg_solve(apply, B, diag, tol, max_iter, record_history, fused, check_every, apply_m);
  }
  return result;
}

std::string build_info() {
#ifdef WITH_CUDA
  return "prefprune._C: CPU + CUDA (fused CG kernels)";
#else
  return "prefprune._C: CPU only";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefprune native ops: a conjugate-gradient solver for many right-hand sides.";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("build_info", &build_info, "Describe how this extension was built (CPU only, or CPU + CUDA).");
  m.def("cg_factored", &prefprune::cg_factored, py::call_guard<py::gil_scoped_release>(),
        R"doc(Solve (Gᵀ diag(w) G / n + λI) X = B by conjugate gradient, every column on its own.

Args:
    G: (n, k) factor; w: (n,) row weights; damping: λ.
    B: (k, m) right-hand sides (float32 or float64; any strides).
    diag: (k,) diagonal of A for the Jacobi preconditioner, or None.
    tol: a column stops when ||r|| <= tol ||b||; max_iter: A-products per column at most.
    record_history: also return the (iters + 1, m) relative residuals.
    fused: use the fused CPU/CUDA update (False: composite ATen ops, for testing).
    check_every: test for running columns every this many iterations (-1: every iteration on CPU, every
        4 on CUDA, where each test is a host sync; 0: never, run max_iter iterations, as a CUDA graph needs).

Returns:
    (x (k, m), status (m,) int64, iterations (m,) int64, residual (m,), curvature (m,), history or None),
    the fields of prefprune.ops.reference.CGResult. Same algorithm as cg_reference.)doc",
        py::arg("G"), py::arg("w"), py::arg("damping"), py::arg("B"), py::arg("diag"), py::arg("tol"),
        py::arg("max_iter"), py::arg("record_history"), py::kw_only(), py::arg("fused") = true,
        py::arg("check_every") = -1);
  m.def("cg_callable", &cg_callable,
        R"doc(Solve A X = B by conjugate gradient with A given as a Python callable on (k, m) blocks.

The loop runs in C++ without the GIL; `fn` (and `precond`) is called with the GIL held and the
caller's grad mode (so it may compute autograd Hessian-vector products). It must return a (k, m)
tensor of B's dtype and device. Other arguments and the result as for cg_factored, and:

    precond: None, or a callable mapping a (k, m) residual block R to M R, M symmetric positive
        definite (column j may use its own M_j, e.g. (H_GN + λ_j I)⁻¹). It is called once before the
        first iteration and once after every iteration, on the whole block (stopped columns too).
        Excludes diag. Non-positive curvature is still tested on pᵀAp with the unpreconditioned A.
        Same algorithm as cg_reference(..., precond=...).)doc",
        py::arg("fn"), py::arg("B"), py::arg("diag"), py::arg("tol"), py::arg("max_iter"),
        py::arg("record_history"), py::kw_only(), py::arg("fused") = true, py::arg("check_every") = -1,
        py::arg("precond") = py::none());
  m.def(
      "cg_launch_config",
      [](int64_t m_cols, int64_t k, int64_t sm_count) {
        const prefprune::CGLaunch c = prefprune::cg_launch_config(m_cols, k, sm_count);
        return py::make_tuple(c.threads, c.blocks_per_column, c.grid_y);
      },
      R"doc(Grid of the fused CUDA CG update for m columns of length k on a GPU with sm_count SMs:
(threads per block, blocks per column, grid y). The same arithmetic the CUDA launcher uses (cg_launch.h),
compiled into every build so that it can be checked without a GPU.)doc",
      py::arg("m"), py::arg("k"), py::arg("sm_count"));
  m.attr("CG_CUDA_CHECK_EVERY") = prefprune::kCudaCheckEvery;
}
