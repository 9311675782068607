// Launchers of pyprune's CUDA kernels (the C interface of csrc/*.cu).
//
// Every launcher takes raw device pointers and a cudaStream_t, enqueues its work on that stream
// and returns an error code: PP_OK, a cudaError_t value (1..999), PP_ERR_CUSOLVER + the
// cusolverStatus_t, or one of the PP_ERR_* codes below. pp_error_string() describes a code.
// No torch header is included here or in any .cu file: csrc/bindings.cpp adapts tensors.
//
// Layouts: every matrix is row-major with unit column stride; `ld*` is the row stride in
// elements. Bool masks are one byte per element (0/1), as torch.bool.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#define PP_OK 0
#define PP_ERR_CUSOLVER 2000      // + cusolverStatus_t
#define PP_ERR_ARGUMENT 3001      // a launcher was called with arguments it does not support
#define PP_ERR_WORKSPACE 3002     // the workspace given is smaller than the size asked for

// The OBS kernel handles blocks of at most this many columns (the block of U lives in shared
// memory, 128 x 128 float32 = 64 KiB) and N:M groups whose size M divides the warp width.
#define PP_OBS_MAX_COLS 128

// Dtype codes of the activations given to pp_accumulate_hessian.
#define PP_DTYPE_F32 0
#define PP_DTYPE_F16 1
#define PP_DTYPE_BF16 2

// ADMM selection modes (the `mode` argument of pp_admm_step).
#define PP_ADMM_LAYER 0   // the k lowest |W+U| of the whole matrix
#define PP_ADMM_ROW 1     // the k lowest |W+U| of every row
#define PP_ADMM_NM 2      // the m-n lowest of every m consecutive columns of a row
#define PP_ADMM_FIXED 3   // the mask given in `pruned`

#ifdef __cplusplus
extern "C" {
#endif

const char* pp_error_string(int code);
const char* pp_arch_list(void);  // compute capabilities compiled, e.g. "800,900"

// H <- alpha * H + beta * X^T X for X [batch, n] (fp32, fp16 or bf16), H [n, n] fp32 symmetric.
// One pass over X; only the upper triangle of tiles is computed and mirrored, so H must be
// symmetric on entry (it always is when it was built by this function or by the reference).
int pp_accumulate_hessian(float* H, const void* X, int dtype, int64_t batch, int64_t n,
                          float alpha, float beta, cudaStream_t stream);

// Bytes of device workspace pp_inverse_factor needs for an n x n Hessian on the current device.
// `scratch` must point to n*n device floats (any content); cuSOLVER's size queries want a matrix.
// Both functions use a cuSOLVER handle per device owned by the library (created on first use).
int pp_inverse_factor_workspace(int64_t n, float* scratch, size_t* bytes);

// U (upper, n x n) with U^T U = (H' + damp I)^-1, where H' is H with zero diagonal entries set to
// 1 (dead inputs, flagged in `dead`) and damp = fraction * mean(diag H'). On a failed Cholesky or
// a non-finite U the fraction is multiplied by 10 and the factorisation retried, `max_attempts`
// times in all. Numerical outcome in *status: 0 success, > 0 the order of the leading minor that
// was not positive definite in the last attempt, -1 non-finite or singular factor in the last
// attempt, -2 no attempt made. The return value reports CUDA / cuSOLVER failures only.
int pp_inverse_factor(const float* H, int64_t n, double damp_fraction, int max_attempts,
                      void* workspace, size_t workspace_bytes, float* U, unsigned char* dead,
                      double* used_fraction, int* attempts, int* status, cudaStream_t stream);

// One block of the OBS column sweep (see csrc/obs_block.cu for the exact rule per column).
typedef struct {
  const float* W;              // [rows, count], ld_w: the block of weights (not modified)
  int64_t ld_w;
  const float* U;              // [count, count], ld_u: the block of the inverse-Hessian factor
  int64_t ld_u;
  unsigned char* pruned;       // [rows, count] contiguous, in/out (True = pruned)
  float* Q;                    // [rows, count] contiguous out: frozen values
  float* Err;                  // [rows, count] contiguous out: (w - q) / U_jj per column
  double* loss;                // [rows] out: sum over the block of err^2 / 2
  int64_t rows;
  int count;                   // 1 .. PP_OBS_MAX_COLS
  int64_t col0;                // index of the block's first column in the whole matrix
  int n, m;                    // N:M (keep n of m), m = 0 for none; m in {2,4,8,16,32}
  // INT4 with scales fitted during the sweep (groupsize > 0):
  int groupsize;
  const float* carry_scale;    // [rows]: scale of the group open at col0 (when col0 % g != 0)
  const float* tail;           // [rows, tail_cols], ld_tail: the columns after the block that
  int64_t ld_tail;             //   belong to a group starting inside it (W as it is now)
  int tail_cols;
  float* block_scales;         // [rows, nstarts] contiguous out: scales of groups starting here
  int nstarts;
  int signed_scales;           // 0: min-max fit, 1: int4_grid's "signed" fit
  // INT4 with static scales (act-order with static groups), exclusive with groupsize > 0:
  const float* static_scales;  // [rows, *], ld_static
  int64_t ld_static;
  const int* group_index;      // [count]: group (column of static_scales) of each column
} PPObsBlockArgs;

int pp_obs_block(const PPObsBlockArgs* args, cudaStream_t stream);

// Bytes of device workspace pp_admm_step needs (mode PP_ADMM_LAYER uses it; it must be zeroed).
size_t pp_admm_workspace_bytes(void);

// Z = mask(W + U), U <- U + W - Z (in place), rhs = rho * (Z - U), pruned written (read for
// PP_ADMM_FIXED). k: number pruned in total (LAYER) or per row (ROW). All [rows, cols] contiguous.
int pp_admm_step(const float* W, float* U, float rho, int mode, int64_t k, int n, int m,
                 unsigned char* pruned, float* Z, float* rhs, int64_t rows, int64_t cols,
                 void* workspace, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
