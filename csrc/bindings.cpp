// pyprune._C: tensor-level bindings of the launchers in csrc/*.cu.
//
// Every binding checks dtypes and shapes first, then that the tensors are on one CUDA device,
// so a call with CPU tensors fails with a clear message (and the shape checks can be exercised
// without a GPU). Kernels run on the current CUDA stream of the tensors' device.
// Only the headers needed (tensors, two factory ops, the CUDA guard and stream, pybind11 with
// torch's tensor casters) instead of torch/extension.h: this file then compiles in about a third
// of the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "pyprune_kernels.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

// Error messages are assembled from strings only: with torch 2.11, streaming a number (or a
// shape) through std::ostream inside this module segfaulted in the numeric insert, so numbers go
// through std::to_string / snprintf.
std::string num(int64_t v) { return std::to_string(v); }
std::string num(int v) { return std::to_string(v); }

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string dims(at::IntArrayRef d) {
  std::string out = "[";
  for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
  return out + "]";
}

std::string dev(const at::Tensor& t) { return t.device().str(); }

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", c10::toString(want), ", got ", c10::toString(t.scalar_type()));
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a matrix (2 dimensions), got shape ", dims(t.sizes()));
}

void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == want, name, " must have shape ", dims(want), ", got ", dims(t.sizes()));
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ", dims(t.strides()));
}

// Row-major with unit column stride; rows may be strided (a column slice of a wider matrix).
void check_unit_column_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name,
                    " must have unit column stride (a row-major matrix or a column slice of one), got strides ",
                    dims(t.strides()));
  TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) >= t.size(1), name, " has overlapping rows, strides ",
                    dims(t.strides()));
}

// All tensors on the same CUDA device; returns that device.
at::Device check_cuda(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  const at::Tensor* first = tensors.begin()->first;
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK_VALUE(t->is_cuda(), name, " must be a CUDA tensor (pyprune._C kernels run on the GPU), got device ",
                      dev(*t), "; CPU tensors take the PyTorch reference in pyprune.ops");
    TORCH_CHECK_VALUE(t->device() == first->device(), "all tensors must be on one device: ", name, " is on ",
                      dev(*t), ", ", tensors.begin()->second, " on ", dev(*first));
  }
  return first->device();
}

void check_rc(int rc, const char* what) {
  TORCH_CHECK(rc == PP_OK, "pyprune._C.", what, " failed: ", pp_error_string(rc), " (code ", num(rc), ")");
}

// ---- Hessian ------------------------------------------------------------------------------------

int64_t accumulate_hessian(at::Tensor H, const at::Tensor& x, int64_t nsamples) {
  check_dtype(H, at::kFloat, "H");
  check_matrix(H, "H");
  TORCH_CHECK_VALUE(H.size(0) == H.size(1), "H must be square, got shape ", dims(H.sizes()));
  check_contiguous(H, "H");
  check_matrix(x, "x");
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
                   "x must be float32, float16 or bfloat16, got ", c10::toString(xt));
  TORCH_CHECK_VALUE(x.size(1) == H.size(0), "x must be [tokens, ", num(H.size(0)), "] to match H, got shape ", dims(x.sizes()));
  check_contiguous(x, "x");
  TORCH_CHECK_VALUE(nsamples >= 0, "nsamples must be >= 0, got ", num(nsamples));
  const int64_t b = x.size(0);
  if (b == 0) return nsamples;
  check_cuda({{&H, "H"}, {&x, "x"}});
  const c10::cuda::CUDAGuard guard(H.device());
  const double total = static_cast<double>(nsamples + b);
  const int dtype = xt == at::kFloat ? PP_DTYPE_F32 : (xt == at::kHalf ? PP_DTYPE_F16 : PP_DTYPE_BF16);
  check_rc(pp_accumulate_hessian(H.data_ptr<float>(), x.data_ptr(), dtype, b, H.size(0),
                                 static_cast<float>(nsamples / total), static_cast<float>(2.0 / total),
                                 c10::cuda::getCurrentCUDAStream()),
           "accumulate_hessian");
  return nsamples + b;
}

std::tuple<at::Tensor, at::Tensor, double, int64_t, int64_t> inverse_hessian_factor(const at::Tensor& H,
                                                                                 double damp_fraction,
                                                                                 int64_t max_attempts) {
  check_dtype(H, at::kFloat, "H");
  check_matrix(H, "H");
  TORCH_CHECK_VALUE(H.size(0) == H.size(1), "H must be square, got shape ", dims(H.sizes()));
  check_contiguous(H, "H");
  const int64_t n = H.size(0);
  TORCH_CHECK_VALUE(n >= 1 && n <= 46340, "H must be between 1 x 1 and 46340 x 46340 (cuSOLVER 32-bit sizes), got ",
                    dims(H.sizes()));
  TORCH_CHECK_VALUE(damp_fraction >= 0.0 && std::isfinite(damp_fraction),
                    "damp_fraction must be finite and >= 0, got ", num(damp_fraction));
  TORCH_CHECK_VALUE(max_attempts >= 0 && max_attempts <= 64, "max_attempts must be in [0, 64], got ", num(max_attempts));
  check_cuda({{&H, "H"}});
  const c10::cuda::CUDAGuard guard(H.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor U = at::empty({n, n}, H.options());
  at::Tensor dead = at::empty({n}, H.options().dtype(at::kBool));
  size_t bytes = 0;
  check_rc(pp_inverse_factor_workspace(n, U.data_ptr<float>(), &bytes), "inverse_hessian_factor");
  at::Tensor work = at::empty({static_cast<int64_t>(bytes)}, H.options().dtype(at::kByte));
  double used = damp_fraction;
  int attempts = 0, status = -2;
  check_rc(pp_inverse_factor(H.data_ptr<float>(), n, damp_fraction, static_cast<int>(max_attempts),
                             work.data_ptr(), bytes, U.data_ptr<float>(),
                             reinterpret_cast<unsigned char*>(dead.data_ptr<bool>()), &used, &attempts, &status,
                             stream),
           "inverse_hessian_factor");
  return {U, dead, used, attempts, status};
}

// ---- OBS sweep ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> obs_block(
    const at::Tensor& W1, const at::Tensor& U1, at::Tensor prune1, int64_t n, int64_t m, int64_t col0,
    int64_t groupsize, const OptTensor& carry_scale, const OptTensor& tail, const OptTensor& static_scales,
    const OptTensor& group_index, bool signed_scales) {
  check_dtype(W1, at::kFloat, "W1");
  check_matrix(W1, "W1");
  check_unit_column_stride(W1, "W1");
  const int64_t rows = W1.size(0), count = W1.size(1);
  TORCH_CHECK_VALUE(count >= 1 && count <= PP_OBS_MAX_COLS, "a block must have 1 to ", num(PP_OBS_MAX_COLS),
                    " columns, got W1 of shape ", dims(W1.sizes()));
  check_dtype(U1, at::kFloat, "U1");
  check_matrix(U1, "U1");
  check_shape(U1, {count, count}, "U1");
  check_unit_column_stride(U1, "U1");
  check_dtype(prune1, at::kBool, "prune1");
  check_shape(prune1, {rows, count}, "prune1");
  check_contiguous(prune1, "prune1");
  TORCH_CHECK_VALUE(col0 >= 0, "col0 must be >= 0, got ", num(col0));
  if (m != 0) {
    TORCH_CHECK_VALUE(m == 2 || m == 4 || m == 8 || m == 16 || m == 32,
                      "N:M group size m must be 2, 4, 8, 16 or 32 for the kernel, got ", num(m));
    TORCH_CHECK_VALUE(n > 0 && n < m, "N:M needs 0 < n < m, got ", num(n), ":", num(m));
    TORCH_CHECK_VALUE(col0 % m == 0 && count % m == 0, "the block (col0 ", num(col0), ", ", num(count),
                      " columns) must be aligned to N:M groups of ", num(m));
  }
  TORCH_CHECK_VALUE(groupsize >= 0, "groupsize must be >= 0 (0: no fitted scales), got ", num(groupsize));
  TORCH_CHECK_VALUE(!(groupsize > 0 && static_scales.has_value()),
                    "give either groupsize > 0 (scales fitted in the sweep) or static_scales, not both");

  std::vector<std::pair<const at::Tensor*, const char*>> devs = {{&W1, "W1"}, {&U1, "U1"}, {&prune1, "prune1"}};
  int64_t nstarts = 0;
  if (groupsize > 0) {
    const int64_t first = (col0 + groupsize - 1) / groupsize, last = (col0 + count - 1) / groupsize;
    nstarts = last >= first ? last - first + 1 : 0;
    const int64_t beyond = nstarts > 0 ? last * groupsize + groupsize - (col0 + count) : 0;
    if (col0 % groupsize) {
      TORCH_CHECK_VALUE(carry_scale.has_value(), "carry_scale is required: the block starts inside a group (col0 ",
                        num(col0), ", groupsize ", num(groupsize), ")");
    }
    if (carry_scale.has_value()) {
      check_dtype(*carry_scale, at::kFloat, "carry_scale");
      check_shape(*carry_scale, {rows}, "carry_scale");
      check_contiguous(*carry_scale, "carry_scale");
      devs.push_back({&*carry_scale, "carry_scale"});
    }
    if (beyond > 0) {
      TORCH_CHECK_VALUE(tail.has_value(), "tail is required: a group of ", num(groupsize), " columns starting in the block ",
                        "continues ", num(beyond), " columns past it");
      check_dtype(*tail, at::kFloat, "tail");
      check_matrix(*tail, "tail");
      TORCH_CHECK_VALUE(tail->size(0) == rows && tail->size(1) >= beyond, "tail must be [", num(rows), ", >= ", num(beyond),
                        "], got ", dims(tail->sizes()));
      check_unit_column_stride(*tail, "tail");
      devs.push_back({&*tail, "tail"});
    }
  }
  if (static_scales.has_value()) {
    check_dtype(*static_scales, at::kFloat, "static_scales");
    check_matrix(*static_scales, "static_scales");
    TORCH_CHECK_VALUE(static_scales->size(0) == rows, "static_scales must have ", num(rows), " rows, got ",
                      dims(static_scales->sizes()));
    check_unit_column_stride(*static_scales, "static_scales");
    TORCH_CHECK_VALUE(group_index.has_value(), "group_index is required with static_scales");
    check_dtype(*group_index, at::kInt, "group_index");
    check_shape(*group_index, {count}, "group_index");
    check_contiguous(*group_index, "group_index");
    devs.push_back({&*static_scales, "static_scales"});
    devs.push_back({&*group_index, "group_index"});
  }
  for (const auto& [t, name] : devs) check_cuda({{&W1, "W1"}, {t, name}});
  const c10::cuda::CUDAGuard guard(W1.device());

  const auto f32 = W1.options();
  at::Tensor Q = at::empty({rows, count}, f32);
  at::Tensor Err = at::empty({rows, count}, f32);
  at::Tensor loss = at::empty({rows}, f32.dtype(at::kDouble));
  at::Tensor block_scales = at::empty({rows, nstarts}, f32);

  PPObsBlockArgs a{};
  a.W = W1.data_ptr<float>();
  a.ld_w = W1.stride(0);
  a.U = U1.data_ptr<float>();
  a.ld_u = U1.stride(0);
  a.pruned = reinterpret_cast<unsigned char*>(prune1.data_ptr<bool>());
  a.Q = Q.data_ptr<float>();
  a.Err = Err.data_ptr<float>();
  a.loss = loss.data_ptr<double>();
  a.rows = rows;
  a.count = static_cast<int>(count);
  a.col0 = col0;
  a.n = static_cast<int>(n);
  a.m = static_cast<int>(m);
  a.groupsize = static_cast<int>(groupsize);
  a.carry_scale = (groupsize > 0 && carry_scale.has_value()) ? carry_scale->data_ptr<float>() : nullptr;
  const bool has_tail = groupsize > 0 && tail.has_value();
  a.tail = has_tail ? tail->data_ptr<float>() : nullptr;
  a.ld_tail = has_tail ? tail->stride(0) : 0;
  a.tail_cols = has_tail ? static_cast<int>(tail->size(1)) : 0;
  a.block_scales = nstarts > 0 ? block_scales.data_ptr<float>() : nullptr;
  a.nstarts = static_cast<int>(nstarts);
  a.signed_scales = signed_scales ? 1 : 0;
  a.static_scales = static_scales.has_value() ? static_scales->data_ptr<float>() : nullptr;
  a.ld_static = static_scales.has_value() ? static_scales->stride(0) : 0;
  a.group_index = static_scales.has_value() ? group_index->data_ptr<int>() : nullptr;
  check_rc(pp_obs_block(&a, c10::cuda::getCurrentCUDAStream()), "obs_block");
  return {Q, Err, loss, block_scales};
}

// ---- ADMM -----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> admm_step(const at::Tensor& W, at::Tensor U, double rho, int64_t mode, int64_t k,
                                             int64_t n, int64_t m, at::Tensor pruned) {
  check_dtype(W, at::kFloat, "W");
  check_matrix(W, "W");
  check_contiguous(W, "W");
  check_dtype(U, at::kFloat, "U");
  check_shape(U, W.sizes(), "U");
  check_contiguous(U, "U");
  check_dtype(pruned, at::kBool, "pruned");
  check_shape(pruned, W.sizes(), "pruned");
  check_contiguous(pruned, "pruned");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 3,
                    "mode must be 0 (per layer), 1 (per row), 2 (N:M) or 3 (fixed mask), got ", num(mode));
  if (mode == PP_ADMM_LAYER) {
    TORCH_CHECK_VALUE(k >= 0 && k <= rows * cols, "k=", num(k), " pruned weights is outside [0, ", num(rows * cols), "]");
  } else if (mode == PP_ADMM_ROW) {
    TORCH_CHECK_VALUE(k >= 0 && k <= cols, "k=", num(k), " pruned weights per row is outside [0, ", num(cols), "]");
    TORCH_CHECK_VALUE(rows <= 0x7fffffff, "too many rows for the per-row kernel: ", num(rows));
  } else if (mode == PP_ADMM_NM) {
    TORCH_CHECK_VALUE(m >= 2 && m <= 64 && n >= 1 && n < m, "N:M = ", num(n), ":", num(m),
                      " is not supported: need 0 < N < M <= 64");
    TORCH_CHECK_VALUE(cols % m == 0, "N:M group size ", num(m), " must divide the width ", num(cols));
  }
  TORCH_CHECK_VALUE(std::isfinite(rho), "rho must be finite, got ", num(rho));
  check_cuda({{&W, "W"}, {&U, "U"}, {&pruned, "pruned"}});
  const c10::cuda::CUDAGuard guard(W.device());
  at::Tensor Z = at::empty_like(W);
  at::Tensor rhs = at::empty_like(W);
  at::Tensor work;
  if (mode == PP_ADMM_LAYER) work = at::empty({static_cast<int64_t>(pp_admm_workspace_bytes())}, W.options().dtype(at::kByte));
  check_rc(pp_admm_step(W.data_ptr<float>(), U.data_ptr<float>(), static_cast<float>(rho), static_cast<int>(mode), k,
                        static_cast<int>(n), static_cast<int>(m), reinterpret_cast<unsigned char*>(pruned.data_ptr<bool>()),
                        Z.data_ptr<float>(), rhs.data_ptr<float>(), rows, cols,
                        work.defined() ? work.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()),
           "admm_step");
  return {Z, rhs};
}

py::dict build_info() {
  py::dict d;
  d["cuda_runtime"] = CUDART_VERSION;
  d["obs_max_cols"] = PP_OBS_MAX_COLS;
  d["kernels"] = std::vector<std::string>{"accumulate_hessian", "inverse_hessian_factor", "obs_block", "admm_step"};
  d["archs"] = std::string(pp_arch_list());
  return d;
}

std::string error_string(int64_t code) { return pp_error_string(static_cast<int>(code)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  py::module_::import("torch");  // torch's Python types must exist before tensors cross the boundary
  mod.doc() = "pyprune CUDA kernels (see csrc/); use them through pyprune.ops, which falls back to PyTorch.";
  mod.attr("OBS_MAX_COLS") = PP_OBS_MAX_COLS;
  mod.def("accumulate_hessian", &accumulate_hessian, py::arg("H"), py::arg("x"), py::arg("nsamples"),
          "H <- H*n/(n+b) + 2/(n+b) x^T x in place (x [b, in], fp32/fp16/bf16); returns n + b.");
  mod.def("inverse_hessian_factor", &inverse_hessian_factor, py::arg("H"), py::arg("damp_fraction"),
          py::arg("max_attempts"),
          "(U, dead, used_fraction, attempts, status): U^T U = (H + damp I)^-1, status 0 on success.");
  mod.def("obs_block", &obs_block, py::arg("W1"), py::arg("U1"), py::arg("prune1"), py::arg("n"), py::arg("m"),
          py::arg("col0"), py::arg("groupsize"), py::arg("carry_scale") = py::none(), py::arg("tail") = py::none(),
          py::arg("static_scales") = py::none(), py::arg("group_index") = py::none(), py::arg("signed_scales") = false,
          "One block of the OBS sweep: (Q1, Err1, loss_per_row float64, block_scales); prune1 updated in place. "
          "signed_scales: fit scales by int4_grid's \"signed\" rule instead of min-max.");
  mod.def("admm_step", &admm_step, py::arg("W"), py::arg("U"), py::arg("rho"), py::arg("mode"), py::arg("k"),
          py::arg("n"), py::arg("m"), py::arg("pruned"),
          "(Z, rhs); U updated in place to U + W - Z; pruned written (read for mode 3).");
  mod.def("build_info", &build_info, "How the extension was built.");
  mod.def("error_string", &error_string, py::arg("code"), "Text of a launcher error code.");
}
