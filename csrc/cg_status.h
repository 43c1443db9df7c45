// Column status codes of the CG solver, shared by the C++ loop and the CUDA kernels.
// They equal CG_CONVERGED, CG_MAX_ITER and CG_NONPOSITIVE_CURVATURE in prefprune/ops/reference.py.
#pragma once

#include <cstdint>

namespace prefprune {

constexpr int64_t kConverged = 0;
constexpr int64_t kMaxIter = 1;
constexpr int64_t kNonpositiveCurvature = 2;
// Marks a column still iterating; replaced by kMaxIter when the loop ends.
constexpr int64_t kRunning = -1;

}  // namespace prefprune
