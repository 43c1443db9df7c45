// Launchers of the fused CG update kernels (cg_kernels.cu). Plain CUDA: no ATen here, so that the
// .cu compiles with a bare `nvcc -c` (see `make nvcc-check`); cg_cuda.cpp owns the ATen side.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prefprune {
namespace cuda {

// Raw pointers of one solve's state. Vectors are (m, k) row-major with row j = column j of the
// problem; per-column values are (m,). inv_diag and hist_row may be null.
template <typename T>
struct CGStepPtrs {
  T* x;
  T* r;
  T* p;
  const T* q;
  const T* inv_diag;
  T* rz;
  T* rel;
  const T* safe_b;
  T* curvature;
  int64_t* status;
  int64_t* iterations;
  T* hist_row;
};

// One CG iteration after q = A p, for every active column, in a single launch on `stream`.
// Returns the launch status (cudaGetLastError), for the caller to check.
cudaError_t launch_cg_step(const CGStepPtrs<float>& a, int64_t m, int64_t k, float tol, cudaStream_t stream);
cudaError_t launch_cg_step(const CGStepPtrs<double>& a, int64_t m, int64_t k, double tol, cudaStream_t stream);

}  // namespace cuda
}  // namespace prefprune
