// ATen side of the fused CUDA CG update (CUDA builds only, WITH_CUDA): device guard, current stream,
// workspace, launch configuration from the device's SM count, raw pointers, launch check. The kernels
// themselves are plain CUDA in cg_kernels.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cg.h"
#include "cg_kernels.h"
#include "cg_launch.h"

namespace prefprune {

void cg_step_cuda(CGState& s, double tol, const at::Tensor& hist_row) {
  const int64_t m = s.x.size(0), k = s.x.size(1);
  TORCH_CHECK(s.x.is_cuda() && s.x.is_contiguous() && s.p.is_contiguous() && s.q.is_contiguous(),
              "cg_step_cuda: internal state must be contiguous CUDA tensors, got x on ", s.x.device());
  TORCH_CHECK(!hist_row.defined() || hist_row.is_contiguous(), "cg_step_cuda: history row must be contiguous");
  const c10::cuda::CUDAGuard guard(s.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.x.device().index()).stream();
  int sm_count = 0;
  const cudaError_t attr = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, s.x.device().index());
  TORCH_CHECK(attr == cudaSuccess, "cg_step_cuda: cannot read the SM count of ", s.x.device(), ": ",
              cudaGetErrorString(attr));
  const int64_t sms = sm_count;
  const CGLaunch launch = cg_launch_config(m, k, sms);
  const int64_t nb = launch.blocks_per_column;
  if (!s.work.defined() || s.work.numel() < m * (2 * nb + 2)) {
    // Once per solve (the configuration depends only on m, k and the device): partial sums, α, β.
    s.work = at::empty({m * (2 * nb + 2)}, s.x.options().dtype(at::kDouble));
    s.arrivals = at::zeros({m}, s.x.options().dtype(at::kInt));
  }
  double* work = s.work.data_ptr<double>();
  const cuda::CGWork w{work, work + m * 2 * nb, work + m * 2 * nb + m,
                       reinterpret_cast<unsigned int*>(s.arrivals.data_ptr<int32_t>())};
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
    const cudaError_t err = cuda::launch_cg_step(a, w, launch, m, k, static_cast<scalar_t>(tol), stream);
    TORCH_CHECK(err == cudaSuccess, "cg_step_cuda: kernel launch failed (m=", m, ", k=", k, ", grid ",
                launch.blocks_per_column, "x", launch.grid_y, "x", launch.threads, ", ", s.x.scalar_type(),
                "): ", cudaGetErrorString(err));
  });
}

}  // namespace prefprune
