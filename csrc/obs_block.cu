// Fused OBS column sweep over one block of at most 128 columns (SparseGPT / GPTQ inner loop).
//
// The reference is pyprune/ops/obs_sweep.py (_sweep_block and _scale_for_column). For every
// column i of the block, left to right, and every row:
//   1. N:M: when column j = col0 + i starts a group of m, the m - n entries of lowest
//      w^2 / U_jj^2 among columns i .. i+m-1 (current, already updated values) become pruned
//      (ties: the lower column first).
//   2. INT4 with fitted scales: when j starts a group of g, scale = fp16(max|w| / 7) over the
//      group's columns inside the block (current values, entries pruned so far count as 0) and,
//      if the group reaches past the block, the columns of `tail` (W as it is now, unmasked);
//      0 (or underflow) gives scale 1. With static scales, the column's group scale is read.
//   3. q = 0 if pruned, else the INT4 grid point clamp(rint(w / s), -8, 7) * s if quantizing,
//      else w;  err = (w - q) / U_ii;  loss += err^2 / 2;
//      w_c -= err * U_ic for the columns c > i of the block.
// Every arithmetic step is spelled with an explicitly rounded intrinsic so that the kernel rounds
// exactly like the PyTorch reference on the GPU, and masks and grid points chosen on nearly tied
// values agree: IEEE division (__fdiv_rn), and products and differences rounded separately
// (__fmul_rn, __fsub_rn). The update is w - round(err * u): the reference's
// `W1[:, i:].addr_(err, u, alpha=-1)` runs `beta * self + alpha * v1 * v2` on CUDA, which nvcc
// contracts to fma(beta, self, (alpha * v1) * v2), i.e. with beta = 1 the product err * u is
// rounded before the subtraction (checked on the PTX of that expression with nvcc 13.0).
//
// Work split: a warp owns kRowsPerWarp rows; lane L holds columns L, L+32, L+64, L+96 of those
// rows in registers (kChunks values per row). Column i belongs to lane i % 32, register i / 32;
// the outer loop over i / 32 is unrolled so every register index is a compile-time constant.
// The block of U is staged once per thread block in shared memory, row stride 128 (zero padded),
// so lane L reads U[i][32k + L]: 32 consecutive words, no bank conflicts.
#include <cuda_fp16.h>

#include "pyprune_kernels.h"

namespace {

constexpr int kMaxCols = PP_OBS_MAX_COLS;
constexpr int kChunks = kMaxCols / 32;
constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr unsigned kFullMask = 0xffffffffu;

// int4_grid.fit_scale "minmax": fp16(absmax / 7), positive. On CUDA, PyTorch divides a tensor by a Python
// number as a multiplication by the float reciprocal (div_true_kernel_cuda), so the reference
// computes absmax * fl(1/7); this mirrors it.
// top = max(w, 0), bottom = max(-w, 0) over the group's kept weights.
__device__ __forceinline__ float fit_scale(float top, float bottom) {
  const float s = __half2float(__float2half_rn(__fmul_rn(fmaxf(top, bottom), 1.0f / 7.0f)));
  return s > 0.0f ? s : 1.0f;
}

// int4_grid.fit_scale "signed": the smallest |scale| whose grid scale * (-8 .. 7) holds the group,
// negative when the larger magnitude is positive (ties keep the positive scale).
__device__ __forceinline__ float fit_signed_scale(float top, float bottom) {
  const float positive = fmaxf(__fmul_rn(bottom, 0.125f), __fmul_rn(top, 1.0f / 7.0f));
  const float negative = fmaxf(__fmul_rn(top, 0.125f), __fmul_rn(bottom, 1.0f / 7.0f));
  const float s = __half2float(__float2half_rn(negative < positive ? -negative : positive));
  return s != 0.0f ? s : 1.0f;
}

// int4_grid.fake_quantize: nearest grid point (round half to even), codes clamped to -8..7.
__device__ __forceinline__ float fake_quantize(float w, float s) {
  const float q = fminf(fmaxf(rintf(__fdiv_rn(w, s)), -8.0f), 7.0f);
  return __fmul_rn(q, s);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__global__ void __launch_bounds__(kWarps * 32)
obs_block_kernel(const PPObsBlockArgs a) {
  extern __shared__ float Us[];  // [count][kMaxCols]
  const int count = a.count;

  for (int idx = threadIdx.x; idx < count * kMaxCols; idx += blockDim.x) {
    const int r = idx / kMaxCols;
    const int c = idx % kMaxCols;
    Us[idx] = c < count ? a.U[r * a.ld_u + c] : 0.0f;
  }
  __syncthreads();  // the only block-wide barrier: warps are independent from here on

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row_base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  if (row_base >= a.rows) return;  // whole warp leaves together

  float w[kRowsPerWarp][kChunks];    // current value; after freezing: q
  float e[kRowsPerWarp][kChunks];    // err of frozen columns
  unsigned pbits[kRowsPerWarp];      // bit k: column 32k + lane is pruned
  float scale[kRowsPerWarp];         // scale of the open group (fitted scales)
  double lsum[kRowsPerWarp];         // sum of err^2 over this lane's columns
  bool valid[kRowsPerWarp];
  int64_t row[kRowsPerWarp];

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    row[r] = row_base + r;
    valid[r] = row[r] < a.rows;
    pbits[r] = 0u;
    lsum[r] = 0.0;
    scale[r] = (valid[r] && a.carry_scale != nullptr) ? a.carry_scale[row[r]] : 1.0f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int c = 32 * k + lane;
      const bool in = valid[r] && c < count;
      w[r][k] = in ? a.W[row[r] * a.ld_w + c] : 0.0f;
      e[r][k] = 0.0f;
      if (in && a.pruned[row[r] * count + c]) pbits[r] |= 1u << k;
    }
  }

  const int m = a.m;
  const int drop = a.m - a.n;
  const int g = a.groupsize;
  const bool fitted = g > 0;
  const bool quantize = fitted || a.static_scales != nullptr;
  const int64_t first_group = fitted ? (a.col0 + g - 1) / g : 0;

#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
#pragma unroll 1
    for (int l = 0; l < 32; ++l) {
      const int i = 32 * k + l;
      if (i >= count) break;
      const int64_t j = a.col0 + i;

      // 1. N:M selection on the group starting at column i (lanes l .. l+m-1 of register k).
      if (m > 0 && j % m == 0) {
        const int own = 32 * k + lane;
        const float d = own < count ? Us[own * kMaxCols + own] : 1.0f;
        const float d2 = __fmul_rn(d, d);
        const int base = lane & ~(m - 1);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float s = __fdiv_rn(__fmul_rn(w[r][k], w[r][k]), d2);
          int rank = 0;
          for (int t = 0; t < m; ++t) {
            const float st = __shfl_sync(kFullMask, s, base + t);
            rank += (st < s || (st == s && base + t < lane)) ? 1 : 0;
          }
          if (base == l && rank < drop) pbits[r] |= 1u << k;
        }
      }

      // 2. Scale of a group of g columns starting at column i.
      if (fitted && j % g == 0) {
        const int end = min(i + g, count);
        const int beyond = i + g - count;  // > 0: the group continues into `tail`
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          float top = 0.0f, bottom = 0.0f;
#pragma unroll
          for (int k2 = 0; k2 < kChunks; ++k2) {
            const int c = 32 * k2 + lane;
            if (c >= i && c < end && !((pbits[r] >> k2) & 1u)) {
              top = fmaxf(top, w[r][k2]);
              bottom = fmaxf(bottom, -w[r][k2]);
            }
          }
          if (beyond > 0 && valid[r]) {
            for (int t = lane; t < beyond; t += 32) {
              const float v = a.tail[row[r] * a.ld_tail + t];
              top = fmaxf(top, v);
              bottom = fmaxf(bottom, -v);
            }
          }
          top = warp_max(top);
          bottom = warp_max(bottom);
          scale[r] = a.signed_scales ? fit_signed_scale(top, bottom) : fit_scale(top, bottom);
          if (lane == 0 && valid[r]) a.block_scales[row[r] * a.nstarts + (j / g - first_group)] = scale[r];
        }
      }

      // 3. Freeze column i and push its error into the later columns of the block.
      const float d = Us[i * kMaxCols + i];
      float u[kChunks];
#pragma unroll
      for (int k2 = 0; k2 < kChunks; ++k2) u[k2] = k2 >= k ? Us[i * kMaxCols + 32 * k2 + lane] : 0.0f;
      const int sgroup = a.static_scales != nullptr ? a.group_index[i] : 0;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float wi = __shfl_sync(kFullMask, w[r][k], l);
        const bool pi = (__shfl_sync(kFullMask, pbits[r], l) >> k) & 1u;
        float q = pi ? 0.0f : wi;
        if (quantize) {
          float s = scale[r];
          if (a.static_scales != nullptr) s = valid[r] ? a.static_scales[row[r] * a.ld_static + sgroup] : 1.0f;
          q = pi ? 0.0f : fake_quantize(wi, s);
        }
        const float err = __fdiv_rn(__fsub_rn(wi, q), d);
        if (lane == l) {
          w[r][k] = q;
          e[r][k] = err;
          lsum[r] += static_cast<double>(err) * static_cast<double>(err);
        }
#pragma unroll
        for (int k2 = 0; k2 < kChunks; ++k2) {
          if (k2 >= k && 32 * k2 + lane > i) w[r][k2] = __fsub_rn(w[r][k2], __fmul_rn(err, u[k2]));
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const double total = warp_sum(lsum[r]);
    if (!valid[r]) continue;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int c = 32 * k + lane;
      if (c < count) {
        const int64_t at = row[r] * count + c;
        a.Q[at] = w[r][k];
        a.Err[at] = e[r][k];
        a.pruned[at] = static_cast<unsigned char>((pbits[r] >> k) & 1u);
      }
    }
    if (lane == 0) a.loss[row[r]] = 0.5 * total;
  }
}

bool valid_group(int m) { return m == 2 || m == 4 || m == 8 || m == 16 || m == 32; }

}  // namespace

extern "C" int pp_obs_block(const PPObsBlockArgs* args, cudaStream_t stream) {
  const PPObsBlockArgs& a = *args;
  if (a.count < 1 || a.count > kMaxCols || a.rows < 0) return PP_ERR_ARGUMENT;
  if (a.m != 0 && (!valid_group(a.m) || a.n <= 0 || a.n >= a.m || a.col0 % a.m || a.count % a.m))
    return PP_ERR_ARGUMENT;
  if (a.groupsize < 0 || (a.groupsize > 0 && a.static_scales != nullptr)) return PP_ERR_ARGUMENT;
  if (a.groupsize > 0 && a.col0 % a.groupsize && a.carry_scale == nullptr) return PP_ERR_ARGUMENT;
  if (a.static_scales != nullptr && a.group_index == nullptr) return PP_ERR_ARGUMENT;
  if (a.groupsize > 0) {
    // Groups starting in the block: their count must match block_scales, and the last one may
    // reach past the block into `tail`.
    const int64_t g = a.groupsize, end = a.col0 + a.count;
    const int64_t first = (a.col0 + g - 1) / g, last = (end - 1) / g;
    const int64_t starts = last >= first ? last - first + 1 : 0;
    if (starts != a.nstarts || (starts > 0 && a.block_scales == nullptr)) return PP_ERR_ARGUMENT;
    const int64_t beyond = starts > 0 ? last * g + g - end : 0;
    if (beyond > 0 && (a.tail == nullptr || a.tail_cols < beyond)) return PP_ERR_ARGUMENT;
  }
  if (a.rows == 0) return PP_OK;

  const size_t smem = static_cast<size_t>(a.count) * kMaxCols * sizeof(float);
  // Above 48 KiB dynamic shared memory must be opted into (once per device and function; the
  // call is cheap, so it is simply repeated).
  cudaError_t err = cudaFuncSetAttribute(obs_block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kMaxCols * kMaxCols * sizeof(float)));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = (a.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) return PP_ERR_ARGUMENT;
  obs_block_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, smem, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}
