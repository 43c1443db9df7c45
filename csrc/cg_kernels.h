// Launchers of the fused CUDA CG update kernels (cg_kernels.cu). Plain CUDA: no ATen here, so that the
// .cu compiles with a bare `nvcc -c` (see `make nvcc-check`); cg_cuda.cpp owns the ATen side.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cg_launch.h"

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

// Device workspace of the multi-block kernels: per (column, block) partial sums (2 per block),
// per-column step sizes, and per-column arrival counters (zero between launches; the last block
// of a column resets its counter). Sized for `cg_launch_config(m, k, sms).blocks_per_column` blocks.
struct CGWork {
  double* partials;        // (m, blocks_per_column, 2)
  double* alpha;           // (m,)
  double* beta;            // (m,)
  unsigned int* arrivals;  // (m,), zero-initialised
};

// One CG iteration after q = A p, for every active column, in three launches on `stream` and no host
// synchronisation: (1) pᵀq and the curvature test, (2) x, r and ||r||², rᵀz with the convergence test,
// (3) the new direction p. Each launch spreads every column over `launch.blocks_per_column` blocks
// (grid-stride) and reduces their partial sums in a fixed order in the column's last block.
// Returns the first launch error (cudaGetLastError), for the caller to check.
cudaError_t launch_cg_step(const CGStepPtrs<float>& a, const CGWork& w, const CGLaunch& launch, int64_t m,
                           int64_t k, float tol, cudaStream_t stream);
cudaError_t launch_cg_step(const CGStepPtrs<double>& a, const CGWork& w, const CGLaunch& launch, int64_t m,
                           int64_t k, double tol, cudaStream_t stream);

}  // namespace cuda
}  // namespace prefprune
