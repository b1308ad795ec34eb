"""Builds reid_ext._C against the installed torch.

CUDA sources are compiled when torch is a CUDA build and nvcc is found, with or
without a GPU. FORCE_CUDA=1 forces them, FORCE_ONLY_CPU=1 skips them.
TORCH_CUDA_ARCH_LIST picks the architectures (default 8.0;9.0).
"""
import glob
import os
import shutil
import site
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[reid-ext setup] {msg}", file=sys.stderr, flush=True)


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def toolkit_of(nvcc):
    """The toolkit a (possibly wrapped) nvcc really runs: its dry run names its own bin folder."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return toolkit_of(nvcc)
    default = "/usr/local/cuda"
    return default if os.path.exists(os.path.join(default, "bin", "nvcc")) else None


def wheel_cuda_includes(cuda_home):
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include, from the toolkit or torch's nvidia wheels."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for header in glob.glob(os.path.join(root, "nvidia", "*", "include", "cublas_v2.h")) + glob.glob(
            os.path.join(root, "nvidia", "*", "include", "cusparse.h")
        ):
            inc = os.path.dirname(header)
            if inc not in found:
                found.append(inc)
    return found


import torch  # noqa: E402

want_cuda = not flag("FORCE_ONLY_CPU") and (torch.version.cuda is not None or flag("FORCE_CUDA"))
cuda_home = find_cuda_home() if want_cuda else None
if want_cuda and cuda_home is None:
    if flag("FORCE_CUDA"):
        raise RuntimeError("FORCE_CUDA=1 but no nvcc was found: set CUDA_HOME to a CUDA toolkit")
    want_cuda = False
if cuda_home:
    # cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
# -fno-trapping-math lets the compiler vectorize the kernels' selects; NaN and inf semantics are unchanged.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
# The module records the torch it was built against; reid_ext refuses to load under another one.
define_macros = [("REID_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
include_dirs = [os.path.join(ROOT, "csrc")]

if want_cuda:
    extra_includes = wheel_cuda_includes(cuda_home)
    include_dirs += extra_includes
    define_macros.append(("REID_EXT_WITH_CUDA", None))
    log(
        f"building CPU and CUDA kernels: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        + (f", extra CUDA headers from {', '.join(extra_includes)}" if extra_includes else "")
    )
    ext = CUDAExtension(
        "reid_ext._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
else:
    reason = "FORCE_ONLY_CPU=1" if flag("FORCE_ONLY_CPU") else (
        "torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found"
    )
    log(f"building CPU kernels only ({reason}): torch {torch.__version__}")
    ext = CppExtension(
        "reid_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    packages=find_packages(include=["reid_ext", "reid_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
