// Upper Cholesky factor of the inverse of the dampened Hessian, with dampening escalation.
//
// The reference (pyprune/ops/hessian.py) factors H_d = H + damp I, inverts through the factor and
// factors the inverse again (three O(n^3) steps). Here the order of the rows is reversed instead:
// with J the reversal permutation and A = J H_d J = L L^T (cuSOLVER potrf, lower),
//     H_d^-1 = (J L^-T J) (J L^-1 J) = U^T U   with   U = J L^-1 J   upper triangular,
// so U[i][j] = (L^-1)[n-1-i][n-1-j]: one Cholesky and one triangular inverse (cuSOLVER trtri).
// U has a positive diagonal, so it is THE upper Cholesky factor of H_d^-1, as in the reference.
// Hand-written here: the diagonal statistics and dead-column fix, the reversed copy with the
// dampening (one pass), and the reversed transpose that turns L^-1 into U while zeroing the lower
// triangle and checking that every entry is finite (one pass, 32 x 32 tiles through shared memory).
#include <mutex>
#include <vector>

#include <cusolverDn.h>

#include "pyprune_kernels.h"

namespace {

constexpr int kStatsThreads = 1024;
constexpr int kTile = 32;

// dead[i] = (H_ii == 0); mean = mean of the diagonal after dead entries are set to 1.
__global__ void __launch_bounds__(kStatsThreads)
diag_stats_kernel(const float* __restrict__ H, int64_t n, unsigned char* __restrict__ dead,
                  float* __restrict__ mean) {
  __shared__ double partial[kStatsThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = H[i * n + i];
    const bool z = d == 0.0f;
    dead[i] = z ? 1 : 0;
    s += z ? 1.0 : static_cast<double>(d);
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) *mean = static_cast<float>(s / static_cast<double>(n));
  }
}

// A = J H_d J (row-major; symmetric, so also its column-major view): dead diagonal entries
// become 1, then damp = fraction * mean is added to the diagonal (rounded to float like the
// reference's `H[d, d] += fraction * mean`).
__global__ void reverse_damp_kernel(const float* __restrict__ H, int64_t n, const float* __restrict__ mean,
                                    double fraction, float* __restrict__ A) {
  const float damp = static_cast<float>(fraction * static_cast<double>(*mean));
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const float* src = H + (n - 1 - i) * n + (n - 1);
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float v = src[-j];
      if (i == j) v = (v == 0.0f ? 1.0f : v) + damp;
      A[i * n + j] = v;
    }
  }
}

// U[i][j] = Linv(n-1-i, n-1-j) for i <= j, 0 below the diagonal, where Linv is the lower
// triangle of A in column-major order: Linv(p, q) = A[q * n + p]. So for i <= j,
// U[i][j] = A[(n-1-j) * n + (n-1-i)]. Sets *bad when an entry of U is not finite.
__global__ void reverse_transpose_kernel(const float* __restrict__ A, int64_t n, float* __restrict__ U,
                                         int* __restrict__ bad) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;  // rows of U
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;  // columns of U
  const int tx = threadIdx.x, ty = threadIdx.y;                 // 32 x 8 threads
  const bool below = i0 > j0 + kTile - 1;                       // tile entirely below the diagonal
  if (!below) {
    // tile[c][r] = A[(n-1-(j0+c)) * n + (n-1-(i0+r))]: consecutive tx read consecutive addresses.
    for (int c = ty; c < kTile; c += 8) {
      const int64_t j = j0 + c, i = i0 + tx;
      tile[c][tx] = (i < n && j < n) ? A[(n - 1 - j) * n + (n - 1 - i)] : 0.0f;
    }
  }
  __syncthreads();
  int local_bad = 0;
  for (int r = ty; r < kTile; r += 8) {
    const int64_t i = i0 + r, j = j0 + tx;
    if (i >= n || j >= n) continue;
    float v = 0.0f;
    if (!below && i <= j) {
      v = tile[tx][r];
      if (!isfinite(v)) local_bad = 1;
    }
    U[i * n + j] = v;
  }
  if (local_bad) *bad = 1;
}

size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

struct Layout {
  size_t a, potrf, trtri, ints, mean, total;
};

int query_layout(cusolverDnHandle_t handle, int64_t n, float* scratch, Layout* out, size_t* host_bytes) {
  int lwork = 0;
  cusolverStatus_t st = cusolverDnSpotrf_bufferSize(handle, CUBLAS_FILL_MODE_LOWER, static_cast<int>(n),
                                                    scratch, static_cast<int>(n), &lwork);
  if (st != CUSOLVER_STATUS_SUCCESS) return PP_ERR_CUSOLVER + static_cast<int>(st);
  size_t trtri_dev = 0, trtri_host = 0;
  st = cusolverDnXtrtri_bufferSize(handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F,
                                   scratch, n, &trtri_dev, &trtri_host);
  if (st != CUSOLVER_STATUS_SUCCESS) return PP_ERR_CUSOLVER + static_cast<int>(st);
  Layout l;
  l.a = 0;
  l.potrf = l.a + align_up(static_cast<size_t>(n) * n * sizeof(float));
  l.trtri = l.potrf + align_up(static_cast<size_t>(lwork) * sizeof(float));
  l.ints = l.trtri + align_up(trtri_dev);
  l.mean = l.ints + align_up(4 * sizeof(int));
  l.total = l.mean + align_up(sizeof(float));
  *out = l;
  if (host_bytes) *host_bytes = trtri_host;
  return PP_OK;
}

#define PP_CUDA(call)                                   \
  do {                                                  \
    cudaError_t e_ = (call);                            \
    if (e_ != cudaSuccess) return static_cast<int>(e_); \
  } while (0)
#define PP_SOLVER(call)                                                         \
  do {                                                                          \
    cusolverStatus_t s_ = (call);                                               \
    if (s_ != CUSOLVER_STATUS_SUCCESS) return PP_ERR_CUSOLVER + static_cast<int>(s_); \
  } while (0)

// One cuSOLVER handle per device, created on first use and kept for the life of the process.
// The mutex also serialises the calls, since a call sets the handle's stream.
constexpr int kMaxDevices = 64;
std::mutex handle_mutex;
cusolverDnHandle_t handles[kMaxDevices] = {};

int current_handle(cusolverDnHandle_t* out) {
  int device = 0;
  PP_CUDA(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) return PP_ERR_ARGUMENT;
  if (handles[device] == nullptr) PP_SOLVER(cusolverDnCreate(&handles[device]));
  *out = handles[device];
  return PP_OK;
}

}  // namespace

extern "C" int pp_inverse_factor_workspace(int64_t n, float* scratch, size_t* bytes) {
  if (n < 1 || n > 46340 || scratch == nullptr) return PP_ERR_ARGUMENT;  // n*n must fit an int
  std::lock_guard<std::mutex> lock(handle_mutex);
  cusolverDnHandle_t handle;
  int rc = current_handle(&handle);
  if (rc != PP_OK) return rc;
  Layout l;
  rc = query_layout(handle, n, scratch, &l, nullptr);
  if (rc != PP_OK) return rc;
  *bytes = l.total;
  return PP_OK;
}

extern "C" int pp_inverse_factor(const float* H, int64_t n, double damp_fraction, int max_attempts, void* workspace,
                                 size_t workspace_bytes, float* U, unsigned char* dead, double* used_fraction,
                                 int* attempts, int* status, cudaStream_t stream) {
  *status = -2;
  *attempts = 0;
  *used_fraction = damp_fraction;
  if (n < 1 || n > 46340) return PP_ERR_ARGUMENT;
  std::lock_guard<std::mutex> lock(handle_mutex);
  cusolverDnHandle_t handle;
  const int hrc = current_handle(&handle);
  if (hrc != PP_OK) return hrc;
  PP_SOLVER(cusolverDnSetStream(handle, stream));
  Layout l;
  size_t host_bytes = 0;
  int rc = query_layout(handle, n, U, &l, &host_bytes);
  if (rc != PP_OK) return rc;
  if (workspace_bytes < l.total) return PP_ERR_WORKSPACE;
  char* base = static_cast<char*>(workspace);
  float* A = reinterpret_cast<float*>(base + l.a);
  float* potrf_work = reinterpret_cast<float*>(base + l.potrf);
  void* trtri_work = base + l.trtri;
  int* ints = reinterpret_cast<int*>(base + l.ints);  // [0] potrf info, [1] trtri info, [2] bad
  float* mean = reinterpret_cast<float*>(base + l.mean);
  const int lwork = static_cast<int>((l.trtri - l.potrf) / sizeof(float));
  std::vector<char> host_work(host_bytes > 0 ? host_bytes : 1);

  diag_stats_kernel<<<1, kStatsThreads, 0, stream>>>(H, n, dead, mean);
  PP_CUDA(cudaGetLastError());

  const int ni = static_cast<int>(n);
  const dim3 copy_block(256);
  const dim3 copy_grid(static_cast<unsigned>((n + 255) / 256), static_cast<unsigned>(n < 65535 ? n : 65535));
  const dim3 tile_block(kTile, 8);
  const dim3 tile_grid(static_cast<unsigned>((n + kTile - 1) / kTile), static_cast<unsigned>((n + kTile - 1) / kTile));

  double fraction = damp_fraction;
  for (int attempt = 1; attempt <= max_attempts; ++attempt, fraction *= 10.0) {
    *attempts = attempt;
    *used_fraction = fraction;
    reverse_damp_kernel<<<copy_grid, copy_block, 0, stream>>>(H, n, mean, fraction, A);
    PP_CUDA(cudaGetLastError());
    PP_SOLVER(cusolverDnSpotrf(handle, CUBLAS_FILL_MODE_LOWER, ni, A, ni, potrf_work, lwork, ints));
    int info[3] = {0, 0, 0};
    PP_CUDA(cudaMemcpyAsync(info, ints, sizeof(int), cudaMemcpyDeviceToHost, stream));
    PP_CUDA(cudaStreamSynchronize(stream));
    if (info[0] != 0) {
      *status = info[0];
      continue;
    }
    PP_SOLVER(cusolverDnXtrtri(handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, A, n,
                               trtri_work, l.ints - l.trtri, host_work.data(), host_bytes, ints + 1));
    PP_CUDA(cudaMemsetAsync(ints + 2, 0, sizeof(int), stream));
    reverse_transpose_kernel<<<tile_grid, tile_block, 0, stream>>>(A, n, U, ints + 2);
    PP_CUDA(cudaGetLastError());
    PP_CUDA(cudaMemcpyAsync(info, ints, 3 * sizeof(int), cudaMemcpyDeviceToHost, stream));
    PP_CUDA(cudaStreamSynchronize(stream));
    if (info[1] == 0 && info[2] == 0) {
      *status = 0;
      return PP_OK;
    }
    *status = -1;
  }
  return PP_OK;
}
