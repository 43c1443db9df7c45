// Launch arithmetic of the fused CUDA CG kernels (cg_kernels.cu), as plain C++ so that the CPU build
// compiles it too: prefprune._C.cg_launch_config exposes it and tests/test_cg_launch.py checks it on CPU.
#pragma once

#include <algorithm>
#include <cstdint>

namespace prefprune {

// Threads per block at most, elements per thread per sweep at least (below that a block is mostly idle),
// blocks per SM the grid aims for, blocks per column at most (sizes the partial-sum buffer), and the
// largest grid y dimension (columns beyond it are looped over).
constexpr int64_t kCGMaxThreads = 256;
constexpr int64_t kCGMinPerThread = 4;
constexpr int64_t kCGBlocksPerSM = 4;
constexpr int64_t kCGMaxBlocksPerColumn = 1024;
constexpr int64_t kCGMaxGridY = 65535;

struct CGLaunch {
  int64_t threads;           // per block, a multiple of 32
  int64_t blocks_per_column; // grid x: the blocks that share one column (grid-stride over its k entries)
  int64_t grid_y;            // grid y: columns in flight (a block loops over j = y, y + grid_y, ...)
};

// Grid for m columns of length k on a GPU with `sm_count` multiprocessors: enough blocks in all to fill
// the GPU (kCGBlocksPerSM per SM) whether the work is one long column (an influence solve, m = 1, k in the
// millions) or many short ones, but never so many per column that a thread gets fewer than
// kCGMinPerThread elements.
inline CGLaunch cg_launch_config(int64_t m, int64_t k, int64_t sm_count) {
  CGLaunch c{};
  const int64_t warps = std::max<int64_t>(1, (k + 31) / 32);
  c.threads = std::min<int64_t>(kCGMaxThreads, warps * 32);
  const int64_t useful = std::max<int64_t>(1, (k + c.threads * kCGMinPerThread - 1) / (c.threads * kCGMinPerThread));
  const int64_t cols = std::max<int64_t>(1, m);
  const int64_t target = std::max<int64_t>(1, sm_count) * kCGBlocksPerSM;
  const int64_t wanted = (target + cols - 1) / cols;
  c.blocks_per_column = std::max<int64_t>(1, std::min({useful, wanted, kCGMaxBlocksPerColumn}));
  c.grid_y = std::min<int64_t>(cols, kCGMaxGridY);
  return c;
}

}  // namespace prefprune
