// Text for the error codes returned by the launchers (see pyprune_kernels.h).
#include <cusolverDn.h>

#include "pyprune_kernels.h"

static const char* cusolver_status_string(int status) {
  switch (status) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "cuSOLVER: handle not initialized";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "cuSOLVER: allocation failed";
    case CUSOLVER_STATUS_INVALID_VALUE: return "cuSOLVER: invalid value";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "cuSOLVER: architecture mismatch";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "cuSOLVER: execution failed";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "cuSOLVER: internal error";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "cuSOLVER: not supported";
    default: return "cuSOLVER: error";
  }
}

extern "C" const char* pp_error_string(int code) {
  if (code == PP_OK) return "no error";
  if (code == PP_ERR_ARGUMENT) return "unsupported launcher arguments";
  if (code == PP_ERR_WORKSPACE) return "workspace too small";
  if (code >= PP_ERR_CUSOLVER && code < PP_ERR_CUSOLVER + 1000)
    return cusolver_status_string(code - PP_ERR_CUSOLVER);
  if (code > 0 && code < 1000) return cudaGetErrorString(static_cast<cudaError_t>(code));
  return "unknown error code";
}

// The architectures this file was compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. "800,900").
#define PP_STR2(...) #__VA_ARGS__
#define PP_STR(...) PP_STR2(__VA_ARGS__)
extern "C" const char* pp_arch_list(void) {
#ifdef __CUDA_ARCH_LIST__
  return PP_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}
