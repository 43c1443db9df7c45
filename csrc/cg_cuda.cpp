// ATen side of the fused CUDA CG update (CUDA builds only, WITH_CUDA): device guard, current
// stream, raw pointers, launch check. The kernels themselves are plain CUDA in cg_kernels.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cg.h"
#include "cg_kernels.h"

namespace prefprune {

void cg_step_cuda(CGState& s, double tol, const at::Tensor& hist_row) {
  const int64_t m = s.x.size(0), k = s.x.size(1);
  TORCH_CHECK(s.x.is_cuda() && s.x.is_contiguous() && s.p.is_contiguous() && s.q.is_contiguous(),
              "cg_step_cuda: internal state must be contiguous CUDA tensors, got x on ", s.x.device());
  TORCH_CHECK(!hist_row.defined() || hist_row.is_contiguous(), "cg_step_cuda: history row must be contiguous");
  const c10::cuda::CUDAGuard guard(s.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "cg_step_cuda", [&] {
    cuda::CGStepPtrs<scalar_t> a{
        s.x.data_ptr<scalar_t>(),
        s.r.data_ptr<scalar_t>(),
        s.p.data_ptr<scalar_t>(),
        s.q.data_ptr<scalar_t>(),
        s.inv_diag.defined() ? s.inv_diag.data_ptr<scalar_t>() : nullptr,
        s.rz.data_ptr<scalar_t>(),
        s.rel.data_ptr<scalar_t>(),
        s.safe_b.data_ptr<scalar_t>(),
        s.curvature.data_ptr<scalar_t>(),
        s.status.data_ptr<int64_t>(),
        s.iterations.data_ptr<int64_t>(),
        hist_row.defined() ? hist_row.data_ptr<scalar_t>() : nullptr,
    };
    const cudaError_t err = cuda::launch_cg_step(a, m, k, static_cast<scalar_t>(tol), stream);
    TORCH_CHECK(err == cudaSuccess, "cg_step_cuda: kernel launch failed (m=", m, ", k=", k, ", ",
                s.x.scalar_type(), "): ", cudaGetErrorString(err));
  });
}

}  // namespace prefprune
