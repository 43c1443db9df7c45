// Fused CG update kernels: three launches per iteration instead of ~25 small ATen ops, and no host sync.
//
// Every column (a contiguous row of the (m, k) state) is spread over `blocks_per_column` blocks that
// grid-stride over its k entries (cg_launch.h sizes the grid so that one long column, an influence solve
// with m = 1 and k in the millions, fills the GPU as well as many short ones). Per-column reductions
// (pᵀq, ||r||², rᵀz) are two-phase: every block writes its partial sums, and the last block of the
// column to arrive (an atomic counter after a memory fence) adds them up in a fixed order, so results do
// not depend on block scheduling, and takes the decisions that depend on them (α, stop, β) the way
// cg_reference does. The last block arrives only after every block of its column has read the column's
// status, so its writes never race with those reads.
#include "cg_kernels.h"
#include "cg_status.h"

namespace prefprune {
namespace cuda {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide sums of a and b, returned to every thread. shm: 2 * (kWarp + 1) doubles.
// The leading barrier keeps a previous call's broadcast slot alive until everyone has read it.
__device__ void block_sum2(double& a, double& b, double* shm) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int nwarps = static_cast<int>(blockDim.x) / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) {
    shm[warp] = a;
    shm[kWarp + 1 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? shm[lane] : 0.0;
    b = lane < nwarps ? shm[kWarp + 1 + lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      shm[kWarp] = a;
      shm[2 * kWarp + 1] = b;
    }
  }
  __syncthreads();
  a = shm[kWarp];
  b = shm[2 * kWarp + 1];
}

// Publishes this block's partial sums (a, b) of column j and returns, to every thread, whether it is the
// column's last block to arrive. The fence orders the partials before the counter increment.
__device__ bool arrive(const CGWork& w, int64_t j, double a, double b, bool* last) {
  const int64_t nb = gridDim.x;
  if (threadIdx.x == 0) {
    double* slot = w.partials + (j * nb + blockIdx.x) * 2;
    slot[0] = a;
    slot[1] = b;
    __threadfence();
    const unsigned int ticket = atomicAdd(w.arrivals + j, 1u);
    *last = ticket == static_cast<unsigned int>(nb - 1);
  }
  __syncthreads();
  return *last;
}

// In the last block: the column's partial sums, added in block order (deterministic), to every thread.
// Loads bypass L1 (other blocks wrote them); the arrival counter is reset for the next launch.
__device__ void gather(const CGWork& w, int64_t j, double& a, double& b, double* shm) {
  const int64_t nb = gridDim.x;
  a = 0.0;
  b = 0.0;
  for (int64_t blk = threadIdx.x; blk < nb; blk += blockDim.x) {
    a += __ldcg(w.partials + (j * nb + blk) * 2);
    b += __ldcg(w.partials + (j * nb + blk) * 2 + 1);
  }
  block_sum2(a, b, shm);
  if (threadIdx.x == 0) w.arrivals[j] = 0u;
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t index_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// (1) pq = pᵀq; pq <= 0 stops the column (non-positive curvature), else α = rz / pq.
template <typename T>
__global__ void cg_curvature_kernel(CGStepPtrs<T> a, CGWork w, int64_t m, int64_t k) {
  __shared__ double shm[2 * (kWarp + 1)];
  __shared__ bool last;
  for (int64_t j = blockIdx.y; j < m; j += gridDim.y) {
    if (a.status[j] != kRunning) continue;  // uniform per block
    const T* p = a.p + j * k;
    const T* q = a.q + j * k;
    double pq_acc = 0.0, unused = 0.0;
    for (int64_t i = first_index(); i < k; i += index_stride()) {
      pq_acc += static_cast<double>(p[i]) * static_cast<double>(q[i]);
    }
    block_sum2(pq_acc, unused, shm);
    if (!arrive(w, j, pq_acc, 0.0, &last)) continue;
    gather(w, j, pq_acc, unused, shm);
    if (threadIdx.x == 0) {
      const T pq = static_cast<T>(pq_acc);
      if (pq <= T(0)) {
        a.status[j] = kNonpositiveCurvature;
        a.curvature[j] = pq;
        a.iterations[j] += 1;
      } else {
        w.alpha[j] = static_cast<double>(a.rz[j] / pq);  // α in T, as the reference computes it
      }
    }
  }
}

// (2) x += αp, r -= αq, ||r||² and rᵀz; rel = ||r|| / ||b|| <= tol stops the column, else β = rᵀz / rz.
template <typename T>
__global__ void cg_update_kernel(CGStepPtrs<T> a, CGWork w, int64_t m, int64_t k, T tol) {
  __shared__ double shm[2 * (kWarp + 1)];
  __shared__ bool last;
  for (int64_t j = blockIdx.y; j < m; j += gridDim.y) {
    if (a.status[j] != kRunning) {
      if (a.hist_row != nullptr && blockIdx.x == 0 && threadIdx.x == 0) a.hist_row[j] = a.rel[j];
      continue;
    }
    T* x = a.x + j * k;
    T* r = a.r + j * k;
    const T* p = a.p + j * k;
    const T* q = a.q + j * k;
    const T* inv = a.inv_diag;
    const T alpha = static_cast<T>(w.alpha[j]);
    double rr = 0.0, rz_acc = 0.0;
    for (int64_t i = first_index(); i < k; i += index_stride()) {
      x[i] += alpha * p[i];
      const T ri = r[i] - alpha * q[i];
      r[i] = ri;
      const T zi = inv != nullptr ? inv[i] * ri : ri;
      rr += static_cast<double>(ri) * static_cast<double>(ri);
      rz_acc += static_cast<double>(ri) * static_cast<double>(zi);
    }
    block_sum2(rr, rz_acc, shm);
    if (!arrive(w, j, rr, rz_acc, &last)) continue;
    gather(w, j, rr, rz_acc, shm);
    if (threadIdx.x == 0) {
      const T rel = static_cast<T>(sqrt(rr)) / a.safe_b[j];
      a.iterations[j] += 1;
      a.rel[j] = rel;
      if (a.hist_row != nullptr) a.hist_row[j] = rel;
      if (rel <= tol) {
        a.status[j] = kConverged;
      } else {
        const T rz_new = static_cast<T>(rz_acc);
        w.beta[j] = static_cast<double>(rz_new / a.rz[j]);  // β in T, as the reference computes it
        a.rz[j] = rz_new;
      }
    }
  }
}

// (3) p = z + βp for the columns still running.
template <typename T>
__global__ void cg_direction_kernel(CGStepPtrs<T> a, CGWork w, int64_t m, int64_t k) {
  for (int64_t j = blockIdx.y; j < m; j += gridDim.y) {
    if (a.status[j] != kRunning) continue;
    T* p = a.p + j * k;
    const T* r = a.r + j * k;
    const T* inv = a.inv_diag;
    const T beta = static_cast<T>(w.beta[j]);
    for (int64_t i = first_index(); i < k; i += index_stride()) {
      const T zi = inv != nullptr ? inv[i] * r[i] : r[i];
      p[i] = zi + beta * p[i];
    }
  }
}

template <typename T>
cudaError_t launch_step(const CGStepPtrs<T>& a, const CGWork& w, const CGLaunch& c, int64_t m, int64_t k, T tol,
                        cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(c.blocks_per_column), static_cast<unsigned int>(c.grid_y));
  const dim3 block(static_cast<unsigned int>(c.threads));
  cg_curvature_kernel<T><<<grid, block, 0, stream>>>(a, w, m, k);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  cg_update_kernel<T><<<grid, block, 0, stream>>>(a, w, m, k, tol);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  cg_direction_kernel<T><<<grid, block, 0, stream>>>(a, w, m, k);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cg_step(const CGStepPtrs<float>& a, const CGWork& w, const CGLaunch& launch, int64_t m,
                           int64_t k, float tol, cudaStream_t stream) {
  return launch_step<float>(a, w, launch, m, k, tol, stream);
}

cudaError_t launch_cg_step(const CGStepPtrs<double>& a, const CGWork& w, const CGLaunch& launch, int64_t m,
                           int64_t k, double tol, cudaStream_t stream) {
  return launch_step<double>(a, w, launch, m, k, tol, stream);
}

}  // namespace cuda
}  // namespace prefprune
