// Fused CG update kernels: one launch per iteration instead of ~25 small ATen ops.
//
// One thread block owns one column (a contiguous row of the (m, k) state), so every per-column
// reduction (pᵀq, ||r||², rᵀz) finishes inside the block and the decisions that depend on it
// (α, stop, β) are taken in the same launch. The order of decisions is cg_reference's.
#include "cg_kernels.h"
#include "cg_status.h"

namespace prefprune {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide sums of a and b, returned to every thread. shm: 2 * (kWarp + 1) doubles.
// The leading barrier keeps a previous call's broadcast slot alive until everyone has read it.
__device__ void block_sum2(double& a, double& b, double* shm) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
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

// Grid: one block per column. Dots accumulate in double (float32 columns lose nothing to long
// sums); values are stored in T like the reference's.
template <typename T>
__global__ void cg_step_kernel(CGStepPtrs<T> a, int64_t k, T tol) {
  __shared__ double shm[2 * (kWarp + 1)];
  const int64_t j = blockIdx.x;
  const int tid = threadIdx.x;
  // Uniform per block: every thread reads it before thread 0 can change it (barriers below).
  if (a.status[j] != kRunning) {
    if (a.hist_row != nullptr && tid == 0) a.hist_row[j] = a.rel[j];
    return;
  }
  T* x = a.x + j * k;
  T* r = a.r + j * k;
  T* p = a.p + j * k;
  const T* q = a.q + j * k;
  const T* inv = a.inv_diag;
  const T rz_old = a.rz[j];

  double pq_acc = 0.0, unused = 0.0;
  for (int64_t i = tid; i < k; i += blockDim.x) pq_acc += static_cast<double>(p[i]) * static_cast<double>(q[i]);
  block_sum2(pq_acc, unused, shm);
  const T pq = static_cast<T>(pq_acc);
  if (pq <= T(0)) {
    if (tid == 0) {
      a.status[j] = kNonpositiveCurvature;
      a.curvature[j] = pq;
      a.iterations[j] += 1;
      if (a.hist_row != nullptr) a.hist_row[j] = a.rel[j];
    }
    return;
  }

  const T alpha = rz_old / pq;
  double rr = 0.0, rz_acc = 0.0;
  for (int64_t i = tid; i < k; i += blockDim.x) {
    x[i] += alpha * p[i];
    const T ri = r[i] - alpha * q[i];
    r[i] = ri;
    const T zi = inv != nullptr ? inv[i] * ri : ri;
    rr += static_cast<double>(ri) * static_cast<double>(ri);
    rz_acc += static_cast<double>(ri) * static_cast<double>(zi);
  }
  block_sum2(rr, rz_acc, shm);
  const T rel = static_cast<T>(sqrt(rr)) / a.safe_b[j];
  if (tid == 0) {
    a.iterations[j] += 1;
    a.rel[j] = rel;
    if (a.hist_row != nullptr) a.hist_row[j] = rel;
  }
  if (rel <= tol) {
    if (tid == 0) a.status[j] = kConverged;
    return;
  }
  const T rz_new = static_cast<T>(rz_acc);
  const T beta = rz_new / rz_old;
  // Each thread revisits exactly the elements it updated above: no barrier needed.
  for (int64_t i = tid; i < k; i += blockDim.x) {
    const T zi = inv != nullptr ? inv[i] * r[i] : r[i];
    p[i] = zi + beta * p[i];
  }
  if (tid == 0) a.rz[j] = rz_new;
}

template <typename T>
cudaError_t launch(const CGStepPtrs<T>& a, int64_t m, int64_t k, T tol, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  // Enough threads to cover short columns in one sweep, in whole warps (block_sum2 needs them).
  int64_t threads = ((k + kWarp - 1) / kWarp) * kWarp;
  if (threads < kWarp) threads = kWarp;
  if (threads > kMaxThreads) threads = kMaxThreads;
  cg_step_kernel<T><<<static_cast<unsigned int>(m), static_cast<unsigned int>(threads), 0, stream>>>(a, k, tol);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cg_step(const CGStepPtrs<float>& a, int64_t m, int64_t k, float tol, cudaStream_t stream) {
  return launch<float>(a, m, k, tol, stream);
}

cudaError_t launch_cg_step(const CGStepPtrs<double>& a, int64_t m, int64_t k, double tol, cudaStream_t stream) {
  return launch<double>(a, m, k, tol, stream);
}

}  // namespace cuda
}  // namespace prefprune
