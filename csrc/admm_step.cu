// Fused ADMM projection and dual step (reference: pyprune/ops/admm_step.py):
//     V = W + U;  pruned = the selection on |V|;  Z = V with pruned entries 0;
//     U <- (U + W) - Z;  rhs = rho * (Z - U)
// rounded exactly as the reference (each operation rounded to float32, no contraction).
//
// Selection of the k lowest |V| (per layer or per row) is a radix select on the bit pattern of
// |V| (for non-negative floats the bit pattern orders like the value): three passes over 11, 11
// and 10 bits build a histogram of the keys sharing the prefix found so far and pick the bucket
// holding the k-th smallest key. That yields the threshold key T and how many keys equal to T
// must go; everything below T is pruned, and the entries equal to T are taken first come first
// served (an atomic counter), so the count is exactly k. Which of several tied entries goes is
// therefore unspecified, as with torch.topk. N:M ranks each group of m directly (ties: the lower
// column goes first).
#include "pyprune_kernels.h"

namespace {

constexpr int kBins = 2048;
constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;
__constant__ int kShift[3] = {21, 10, 0};
__constant__ int kBits[3] = {11, 11, 10};

struct LayerState {          // the workspace of mode PP_ADMM_LAYER
  unsigned prefix, mask;     // key bits fixed so far
  unsigned long long krem;   // rank (1-based) of the threshold among the keys matching prefix
  unsigned long long taken;  // entries equal to the threshold pruned so far
  unsigned long long hist[3][kBins];
};

__device__ __forceinline__ unsigned key_of(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Z, U, rhs (and the mask) of one entry.
__device__ __forceinline__ void apply_one(int64_t i, float w, float u, bool p, float rho, float* __restrict__ U,
                                          float* __restrict__ Z, float* __restrict__ rhs,
                                          unsigned char* __restrict__ pruned, bool write_mask) {
  const float z = p ? 0.0f : __fadd_rn(w, u);
  const float un = __fsub_rn(__fadd_rn(u, w), z);
  Z[i] = z;
  U[i] = un;
  rhs[i] = __fmul_rn(rho, __fsub_rn(z, un));
  if (write_mask) pruned[i] = p ? 1 : 0;
}

// Warp-aggregated increment of a shared-memory histogram (many lanes often hit one bin).
// All 32 lanes must call it.
__device__ __forceinline__ void hist_add(unsigned* hist, unsigned bin, bool take) {
  const unsigned active = __ballot_sync(kFullMask, take);
  if (!take) return;
  const unsigned peers = __match_any_sync(active, bin);
  if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32). `warp_total` is 32 shared words.
__device__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long* warp_total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  unsigned long long x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_total[warp] = x;
  __syncthreads();
  if (warp == 0) {
    unsigned long long t = lane < nwarps ? warp_total[lane] : 0ull;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(kFullMask, t, o);
      if (lane >= o) t += y;
    }
    warp_total[lane] = t;  // inclusive totals of warps 0..lane
  }
  __syncthreads();
  const unsigned long long before = warp > 0 ? warp_total[warp - 1] : 0ull;
  __syncthreads();  // warp_total may be reused after this
  return before + x - v;
}

// The bin holding the k-th smallest key (1 <= k <= sum of counts) and the number of keys in the
// bins below it, written to *bin / *below (shared) and visible to the block on return.
template <typename C>
__device__ void block_pick(const C* counts, int nb, unsigned long long k, unsigned long long* scratch, int* bin,
                           unsigned long long* below) {
  const int per = (nb + blockDim.x - 1) / blockDim.x;
  const int lo = threadIdx.x * per, hi = min(lo + per, nb);
  unsigned long long sum = 0;
  for (int b = lo; b < hi; ++b) sum += counts[b];
  const unsigned long long excl = block_exclusive_scan(sum, scratch);
  if (excl < k && k <= excl + sum) {
    unsigned long long run = excl;
    for (int b = lo; b < hi; ++b) {
      const unsigned long long c = counts[b];
      if (k <= run + c) {
        *bin = b;
        *below = run;
        break;
      }
      run += c;
    }
  }
  __syncthreads();
}

// ---- mode LAYER: radix select across the grid ----------------------------------------------------
__global__ void layer_init_kernel(LayerState* st, unsigned long long k) { st->krem = k; }

__global__ void __launch_bounds__(kThreads)
layer_hist_kernel(const float* __restrict__ W, const float* __restrict__ U, int64_t numel, LayerState* st, int pass) {
  __shared__ unsigned hist[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0u;
  __syncthreads();
  const unsigned prefix = st->prefix, mask = st->mask;
  const int shift = kShift[pass];
  const unsigned digit = (1u << kBits[pass]) - 1u;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Warp-uniform trip count (hist_add needs all lanes).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < numel;
       base += stride) {
    const int64_t i = base + (threadIdx.x & 31);
    const bool in = i < numel;
    const unsigned key = in ? key_of(__fadd_rn(W[i], U[i])) : 0u;
    hist_add(hist, (key >> shift) & digit, in && (key & mask) == prefix);
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= static_cast<int>(digit); b += blockDim.x)
    if (hist[b]) atomicAdd(&st->hist[pass][b], static_cast<unsigned long long>(hist[b]));
}

__global__ void __launch_bounds__(1024) layer_pick_kernel(LayerState* st, int pass) {
  __shared__ unsigned long long scratch[32];
  __shared__ int bin;
  __shared__ unsigned long long below;
  const unsigned long long k = st->krem;
  block_pick(st->hist[pass], 1 << kBits[pass], k, scratch, &bin, &below);
  if (threadIdx.x == 0) {
    st->prefix |= static_cast<unsigned>(bin) << kShift[pass];
    st->mask |= ((1u << kBits[pass]) - 1u) << kShift[pass];
    st->krem = k - below;
  }
}

// Modes LAYER (st != nullptr: threshold from the select) and FIXED (st == nullptr: mask given).
__global__ void __launch_bounds__(kThreads)
apply_kernel(const float* __restrict__ W, float* __restrict__ U, float rho, unsigned char* __restrict__ pruned,
             float* __restrict__ Z, float* __restrict__ rhs, int64_t numel, LayerState* st) {
  const unsigned T = st ? st->prefix : 0u;
  const unsigned long long need = st ? st->krem : 0ull;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const float w = W[i], u = U[i];
    bool p;
    if (st) {
      const unsigned key = key_of(__fadd_rn(w, u));
      p = key < T || (key == T && need > 0 && atomicAdd(&st->taken, 1ull) < need);
    } else {
      p = pruned[i] != 0;
    }
    apply_one(i, w, u, p, rho, U, Z, rhs, pruned, st != nullptr);
  }
}

// ---- mode ROW: one thread block per row ------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
row_kernel(const float* __restrict__ W, float* __restrict__ U, float rho, int64_t k, unsigned char* __restrict__ pruned,
           float* __restrict__ Z, float* __restrict__ rhs, int64_t cols) {
  __shared__ unsigned hist[kBins];
  __shared__ unsigned long long scratch[32];
  __shared__ int bin;
  __shared__ unsigned long long below;
  __shared__ unsigned long long taken;
  const int64_t off = static_cast<int64_t>(blockIdx.x) * cols;
  const float* w = W + off;
  const float* u = U + off;
  unsigned prefix = 0u, mask = 0u;
  unsigned long long krem = static_cast<unsigned long long>(k);
  if (k > 0) {
    for (int pass = 0; pass < 3; ++pass) {
      for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0u;
      __syncthreads();
      const int shift = kShift[pass];
      const unsigned digit = (1u << kBits[pass]) - 1u;
      for (int64_t base = threadIdx.x & ~31; base < cols; base += blockDim.x) {
        const int64_t c = base + (threadIdx.x & 31);
        const bool in = c < cols;
        const unsigned key = in ? key_of(__fadd_rn(w[c], u[c])) : 0u;
        hist_add(hist, (key >> shift) & digit, in && (key & mask) == prefix);
      }
      __syncthreads();
      block_pick(hist, static_cast<int>(digit) + 1, krem, scratch, &bin, &below);
      prefix |= static_cast<unsigned>(bin) << shift;
      mask |= digit << shift;
      krem -= below;
      __syncthreads();  // everyone has read bin / below before they change
    }
  } else {
    krem = 0ull;
  }
  if (threadIdx.x == 0) taken = 0ull;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float wv = w[c], uv = u[c];
    const unsigned key = key_of(__fadd_rn(wv, uv));
    const bool p = key < prefix || (key == prefix && krem > 0 && atomicAdd(&taken, 1ull) < krem);
    apply_one(off + c, wv, uv, p, rho, U, Z, rhs, pruned, true);
  }
}

// ---- mode NM: one thread per group of m columns ----------------------------------------------------
__global__ void __launch_bounds__(kThreads)
nm_kernel(const float* __restrict__ W, float* __restrict__ U, float rho, int n, int m, unsigned char* __restrict__ pruned,
          float* __restrict__ Z, float* __restrict__ rhs, int64_t groups) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t base = g * m;
    // Ranks first (all reads), then the writes: U is updated in place.
    unsigned drop_bits[2] = {0u, 0u};  // m <= 64
    for (int t = 0; t < m; ++t) {
      const unsigned kt = key_of(__fadd_rn(W[base + t], U[base + t]));
      int rank = 0;
      for (int s = 0; s < m; ++s) {
        const unsigned ks = key_of(__fadd_rn(W[base + s], U[base + s]));
        rank += (ks < kt || (ks == kt && s < t)) ? 1 : 0;
      }
      if (rank < m - n) drop_bits[t >> 5] |= 1u << (t & 31);
    }
    for (int t = 0; t < m; ++t) {
      const bool p = (drop_bits[t >> 5] >> (t & 31)) & 1u;
      apply_one(base + t, W[base + t], U[base + t], p, rho, U, Z, rhs, pruned, true);
    }
  }
}

int grid_for(int64_t work, int per_sm) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

}  // namespace

extern "C" size_t pp_admm_workspace_bytes(void) { return sizeof(LayerState); }

extern "C" int pp_admm_step(const float* W, float* U, float rho, int mode, int64_t k, int n, int m,
                            unsigned char* pruned, float* Z, float* rhs, int64_t rows, int64_t cols, void* workspace,
                            cudaStream_t stream) {
  if (rows < 0 || cols < 0) return PP_ERR_ARGUMENT;
  const int64_t numel = rows * cols;
  if (numel == 0) return PP_OK;
  switch (mode) {
    case PP_ADMM_LAYER: {
      if (k < 0 || k > numel || workspace == nullptr) return PP_ERR_ARGUMENT;
      LayerState* st = static_cast<LayerState*>(workspace);
      cudaError_t err = cudaMemsetAsync(st, 0, sizeof(LayerState), stream);
      if (err != cudaSuccess) return static_cast<int>(err);
      layer_init_kernel<<<1, 1, 0, stream>>>(st, static_cast<unsigned long long>(k));
      if (k > 0) {
        const int blocks = grid_for(numel, 4);
        for (int pass = 0; pass < 3; ++pass) {
          layer_hist_kernel<<<blocks, kThreads, 0, stream>>>(W, U, numel, st, pass);
          layer_pick_kernel<<<1, 1024, 0, stream>>>(st, pass);
        }
      }
      apply_kernel<<<grid_for(numel, 16), kThreads, 0, stream>>>(W, U, rho, pruned, Z, rhs, numel, st);
      break;
    }
    case PP_ADMM_ROW:
      if (k < 0 || k > cols || rows > 0x7fffffff) return PP_ERR_ARGUMENT;
      row_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(W, U, rho, k, pruned, Z, rhs, cols);
      break;
    case PP_ADMM_NM:
      if (m < 2 || m > 64 || n < 1 || n >= m || cols % m) return PP_ERR_ARGUMENT;
      nm_kernel<<<grid_for(numel / m, 16), kThreads, 0, stream>>>(W, U, rho, n, m, pruned, Z, rhs, numel / m);
      break;
    case PP_ADMM_FIXED:
      apply_kernel<<<grid_for(numel, 16), kThreads, 0, stream>>>(W, U, rho, pruned, Z, rhs, numel, nullptr);
      break;
    default:
      return PP_ERR_ARGUMENT;
  }
  return static_cast<int>(cudaGetLastError());
}
