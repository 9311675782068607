// Hessian accumulation H <- alpha * H + beta * X^T X in one pass over the activations X [b, n].
//
// The reference (pyprune/ops/hessian.py) casts X to float32 and calls addmm. Here X is read in
// its own dtype and the products are summed in float32:
//  * fp16 / bf16: tensor cores (WMMA 16x16x16, float32 accumulators). The product of two 16-bit
//    floats is exact in float32, so this is float32 accumulation of exact products, no TF32.
//  * fp32: CUDA cores, FMA in float32 (TF32 would round the inputs; it is never used here).
// H is symmetric, so only tiles (I, J) with I <= J are computed; an off-diagonal tile is written
// to both (I, J) and (J, I), a diagonal tile's upper half to both halves, so H stays exactly
// symmetric. Each output tile is 128 x 128; the epilogue reads the old H (its upper triangle),
// scales and writes it, so H is touched once.
#include <mma.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "pyprune_kernels.h"

namespace {

constexpr int kTileN = 128;   // output tile edge
constexpr int kThreads = 256;

// ---- fp16 / bf16: tensor cores -----------------------------------------------------------------
constexpr int kTcK = 32;            // tokens per stage
constexpr int kTcLd = kTileN + 8;   // smem row stride in 16-bit elements (multiple of 8, 272 B)

// 8 consecutive 16-bit values of row t, columns c .. c+7 (zeros outside X), as raw bits.
__device__ __forceinline__ uint4 load8(const unsigned short* __restrict__ X, int64_t b, int64_t n, int64_t t,
                                       int64_t c, bool vec) {
  if (t < b && vec && c + 8 <= n) return *reinterpret_cast<const uint4*>(X + t * n + c);
  unsigned short h[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) h[q] = (t < b && c + q < n) ? X[t * n + c + q] : static_cast<unsigned short>(0);
  uint4 v;
  v.x = h[0] | (static_cast<unsigned>(h[1]) << 16);
  v.y = h[2] | (static_cast<unsigned>(h[3]) << 16);
  v.z = h[4] | (static_cast<unsigned>(h[5]) << 16);
  v.w = h[6] | (static_cast<unsigned>(h[7]) << 16);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
xtx_tensor_core_kernel(float* __restrict__ H, const unsigned short* __restrict__ X, int64_t b, int64_t n,
                       float alpha, float beta, bool vec) {
  using namespace nvcuda;
  const int I = blockIdx.y, J = blockIdx.x;
  if (I > J) return;
  const int64_t i0 = static_cast<int64_t>(I) * kTileN, j0 = static_cast<int64_t>(J) * kTileN;

  // As[t][i] = X[t0 + t][i0 + i], Bs[t][j] = X[t0 + t][j0 + j]; reused as the epilogue stage.
  __shared__ __align__(128) unsigned char smem[2 * kTcK * kTcLd * sizeof(unsigned short)];
  unsigned short* As = reinterpret_cast<unsigned short*>(smem);
  unsigned short* Bs = As + kTcK * kTcLd;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp >> 2;  // 2 x 4 warps, each 64 x 32 of the tile = 4 x 2 fragments
  const int wn = warp & 3;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int fi = 0; fi < 4; ++fi)
#pragma unroll
    for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);

  // Each thread moves 2 segments of 8 values per operand and stage (32 rows x 16 segments).
  uint4 ra[2], rb[2];
  auto fetch = [&](int64_t t0) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int seg = tid + s * kThreads;
      const int64_t t = t0 + (seg >> 4);
      const int c = (seg & 15) * 8;
      ra[s] = load8(X, b, n, t, i0 + c, vec);
      rb[s] = load8(X, b, n, t, j0 + c, vec);
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int seg = tid + s * kThreads;
      const int at = (seg >> 4) * kTcLd + (seg & 15) * 8;
      *reinterpret_cast<uint4*>(As + at) = ra[s];
      *reinterpret_cast<uint4*>(Bs + at) = rb[s];
    }
  };

  const int64_t stages = (b + kTcK - 1) / kTcK;
  fetch(0);
  stash();
  __syncthreads();
  for (int64_t st = 0; st < stages; ++st) {
    const bool more = st + 1 < stages;
    if (more) fetch((st + 1) * kTcK);  // in flight while the tensor cores work
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      // A = X^T (i x t): element (i, t) sits at As[t * ld + i], i.e. column-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int fi = 0; fi < 4; ++fi)
        wmma::load_matrix_sync(fa[fi], reinterpret_cast<const T*>(As + kk * kTcLd + wm * 64 + fi * 16), kTcLd);
#pragma unroll
      for (int fj = 0; fj < 2; ++fj)
        wmma::load_matrix_sync(fb[fj], reinterpret_cast<const T*>(Bs + kk * kTcLd + wn * 32 + fj * 16), kTcLd);
#pragma unroll
      for (int fi = 0; fi < 4; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
    }
    __syncthreads();
    if (more) {
      stash();
      __syncthreads();
    }
  }

  // Epilogue through a 16 x 16 float stage per warp (8 KiB in all, inside the operand buffers).
  float* stage = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int fi = 0; fi < 4; ++fi) {
#pragma unroll
    for (int fj = 0; fj < 2; ++fj) {
      wmma::store_matrix_sync(stage, acc[fi][fj], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t ti = i0 + wm * 64 + fi * 16, tj = j0 + wn * 32 + fj * 16;
      for (int e = lane; e < 256; e += 32) {
        const int64_t gi = ti + (e >> 4), gj = tj + (e & 15);
        float v = 0.0f;
        if (gi < n && gj < n && (I != J || gi <= gj)) {
          v = alpha * H[gi * n + gj] + beta * stage[e];
          H[gi * n + gj] = v;
        }
        stage[e] = v;
      }
      __syncwarp();
      // Mirror (consecutive lanes write consecutive columns of row gj). On a diagonal tile only
      // the upper half is mirrored, so H stays exactly symmetric whatever order the tensor cores
      // summed (i, j) and (j, i) in.
      for (int e = lane; e < 256; e += 32) {
        const int r = e & 15, c = e >> 4;
        const int64_t gi = ti + r, gj = tj + c;
        if (gi < n && gj < n && (I != J || gi < gj)) H[gj * n + gi] = stage[r * 16 + c];
      }
      __syncwarp();
    }
  }
}

// ---- fp32: CUDA cores ----------------------------------------------------------------------------
constexpr int kSimtK = 16;

__device__ __forceinline__ float4 load4(const float* __restrict__ X, int64_t b, int64_t n, int64_t t, int64_t c,
                                        bool vec) {
  if (t < b && vec && c + 4 <= n) return *reinterpret_cast<const float4*>(X + t * n + c);
  float4 v;
  v.x = (t < b && c + 0 < n) ? X[t * n + c + 0] : 0.0f;
  v.y = (t < b && c + 1 < n) ? X[t * n + c + 1] : 0.0f;
  v.z = (t < b && c + 2 < n) ? X[t * n + c + 2] : 0.0f;
  v.w = (t < b && c + 3 < n) ? X[t * n + c + 3] : 0.0f;
  return v;
}

__global__ void __launch_bounds__(kThreads)
xtx_f32_kernel(float* __restrict__ H, const float* __restrict__ X, int64_t b, int64_t n, float alpha, float beta,
               bool vec) {
  const int I = blockIdx.y, J = blockIdx.x;
  if (I > J) return;
  const int64_t i0 = static_cast<int64_t>(I) * kTileN, j0 = static_cast<int64_t>(J) * kTileN;
  __shared__ __align__(16) float As[kSimtK][kTileN];
  __shared__ __align__(16) float Bs[kSimtK][kTileN];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  // Thread (ty, tx) owns rows {4ty .. 4ty+3, 64+4ty .. 64+4ty+3} x the same pattern of columns.
  float acc[8][8];
#pragma unroll
  for (int p = 0; p < 8; ++p)
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[p][q] = 0.0f;

  for (int64_t t0 = 0; t0 < b; t0 += kSimtK) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int seg = tid + s * kThreads;  // 16 rows x 32 segments of 4
      const int row = seg >> 5, c = (seg & 31) * 4;
      *reinterpret_cast<float4*>(&As[row][c]) = load4(X, b, n, t0 + row, i0 + c, vec);
      *reinterpret_cast<float4*>(&Bs[row][c]) = load4(X, b, n, t0 + row, j0 + c, vec);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[k][4 * ty]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[k][64 + 4 * ty]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[k][4 * tx]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[k][64 + 4 * tx]);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int p = 0; p < 8; ++p)
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[p][q] = fmaf(av[p], bv[q], acc[p][q]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int p = 0; p < 8; ++p) {
    const int64_t gi = i0 + (p < 4 ? 4 * ty + p : 64 + 4 * ty + p - 4);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int64_t gj = j0 + (q < 4 ? 4 * tx + q : 64 + 4 * tx + q - 4);
      if (gi < n && gj < n && (I != J || gi <= gj)) {  // diagonal tile: upper half, mirrored
        const float v = alpha * H[gi * n + gj] + beta * acc[p][q];
        H[gi * n + gj] = v;
        if (gi != gj) H[gj * n + gi] = v;
      }
    }
  }
}

}  // namespace

extern "C" int pp_accumulate_hessian(float* H, const void* X, int dtype, int64_t batch, int64_t n, float alpha,
                                     float beta, cudaStream_t stream) {
  if (n < 1 || batch < 0) return PP_ERR_ARGUMENT;
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  if (tiles > 65535) return PP_ERR_ARGUMENT;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const uintptr_t addr = reinterpret_cast<uintptr_t>(X);
  switch (dtype) {
    case PP_DTYPE_F32:
      xtx_f32_kernel<<<grid, kThreads, 0, stream>>>(H, static_cast<const float*>(X), batch, n, alpha, beta,
                                                   n % 4 == 0 && addr % 16 == 0);
      break;
    case PP_DTYPE_F16:
      xtx_tensor_core_kernel<__half><<<grid, kThreads, 0, stream>>>(
          H, static_cast<const unsigned short*>(X), batch, n, alpha, beta, n % 8 == 0 && addr % 16 == 0);
      break;
    case PP_DTYPE_BF16:
      xtx_tensor_core_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          H, static_cast<const unsigned short*>(X), batch, n, alpha, beta, n % 8 == 0 && addr % 16 == 0);
      break;
    default:
      return PP_ERR_ARGUMENT;
  }
  return static_cast<int>(cudaGetLastError());
}
