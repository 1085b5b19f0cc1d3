"""Builds tfm_kernels._C: the C++ operators (CPU always, CUDA when a CUDA toolkit and a CUDA torch are found).

Environment knobs (all optional):
  TFM_KERNELS_CUDA=auto|0|1          build the CUDA sources: auto (default) when torch has CUDA and nvcc is found
  TFM_KERNELS_CUDA_ARCHS="80;90a"    SM architectures to compile for (sets TORCH_CUDA_ARCH_LIST)
  TFM_KERNELS_HEAD_DIMS="64,128"     head dims of the CUDA attention kernels (also 32, 96, 256)
  TFM_KERNELS_DEBUG=1                -O0 -g host code, -lineinfo device code
  MAX_JOBS=N                         parallel compile jobs (ninja)
  NVCC_THREADS=N                     threads of each nvcc job (default 2)
  CUDA_HOME or CUDA_PATH             CUDA toolkit root; found from nvcc when unset
  CXX                                the host compiler (default c++)
No network and no git are used.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))


def find_cuda_home():
    """The CUDA toolkit root. The `nvcc` on PATH may be a wrapper outside the toolkit; its dry run names the
    real `bin` folder as _HERE_."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=60)
            match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
            if match and os.path.exists(os.path.join(match.group(1), "nvcc")):
                return os.path.dirname(os.path.realpath(match.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for path in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    return None


def want_cuda(cuda_home):
    knob = os.environ.get("TFM_KERNELS_CUDA", "auto").lower()
    if knob in ("0", "false", "off"):
        return False
    import torch

    found = torch.version.cuda is not None and cuda_home is not None
    if knob in ("1", "true", "on") and not found:
        raise RuntimeError(f"TFM_KERNELS_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={cuda_home}")
    return found


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must precede the import of torch.utils.cpp_extension

ARCHS = [a.strip() for a in os.environ.get("TFM_KERNELS_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
         if a.strip()]
# torch reads TORCH_CUDA_ARCH_LIST in "8.0;9.0a" form; without it and without a GPU it guesses every arch.
os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" if a[-1].isdigit() else f"{a[:-2]}.{a[-2:]}"
                                              for a in ARCHS)
HEAD_DIMS = [int(d) for d in os.environ.get("TFM_KERNELS_HEAD_DIMS", "64,128").split(",") if d.strip()]
DEBUG = os.environ.get("TFM_KERNELS_DEBUG", "0") == "1"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_sources():
    """The CUDA translation units; attention kernel instantiations are generated per head dim and dtype."""
    generator = os.path.join(ROOT, "csrc", "generate_kernels.py")
    if os.path.exists(generator):
        subprocess.run([sys.executable, generator, "--head-dims", ",".join(map(str, HEAD_DIMS))], check=True)
    sources = glob.glob(os.path.join("csrc", "cuda", "**", "*.cu"), recursive=True)
    sources += glob.glob(os.path.join("csrc", "cuda", "**", "*.cpp"), recursive=True)
    return sorted(sources)


def nvidia_wheel_dirs(kind):
    """include/ or lib/ folders of the nvidia-* wheels torch depends on (cuBLASLt headers live there when the
    toolkit lacks them)."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", kind))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", kind))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def cublaslt_library(library_dirs):
    """The linker name of cuBLASLt: "cublasLt" where libcublasLt.so exists, else the versioned file the nvidia
    wheels ship (":libcublasLt.so.13"), which `-lcublasLt` alone does not find."""
    dirs = library_dirs + [os.path.join(CUDA_HOME, "lib64")] if CUDA_HOME else library_dirs
    if any(os.path.exists(os.path.join(d, "libcublasLt.so")) for d in dirs):
        return "cublasLt"
    versioned = sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")) for d in dirs)
    versioned = [os.path.basename(f) for files in versioned for f in files]
    return ":" + versioned[0] if versioned else "cublasLt"


def shared_libstdcxx_link_args():
    """Where the C++ compiler finds no shared libstdc++ to link (libstdc++.so missing or a broken link, so the
    linker falls back to libstdc++.a), the extension would carry a static copy of it beside the shared one that
    torch loads; two copies of its locale tables crash the first message that formats a number (a SIGSEGV in
    a TORCH_CHECK, seen on a GPU machine's image). There the libstdc++.so.6 torch runs with is linked instead;
    elsewhere nothing changes."""
    compiler = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    import torch  # noqa: F401  (loads the libstdc++ the extension will run with)

    with open("/proc/self/maps") as maps:
        loaded = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    print(f"setup.py: {compiler} finds no shared libstdc++ ({found!r}); linking {loaded or 'nothing'}")
    return loaded[:1]


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0 over Python's own -g: the CPU-only library is 0.5 MB instead of 18.6 MB
    cxx = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    cxx += ["-fopenmp", "-fno-trapping-math", "-DTFM_KERNELS_VERSION=\"0.1.0\""]
    include_dirs = [os.path.join(ROOT, "csrc")]
    link_libstdcxx = shared_libstdcxx_link_args()
    if not want_cuda(CUDA_HOME):
        return CppExtension("tfm_kernels._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"] + link_libstdcxx)
    head_dims = ",".join(map(str, HEAD_DIMS))
    defines = ["-DTFM_KERNELS_WITH_CUDA", f"-DTFM_KERNELS_CUDA_ARCHS=\"{';'.join(ARCHS)}\"",
               f"-DTFM_KERNELS_HEAD_DIMS=\"{head_dims}\""]
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-Xptxas=-warn-spills", f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    if DEBUG:
        nvcc[0] = "-O1"
    include_dirs += nvidia_wheel_dirs("include")
    library_dirs = nvidia_wheel_dirs("lib")
    return CUDAExtension("tfm_kernels._C", sources + cuda_sources(), include_dirs=include_dirs,
                         library_dirs=library_dirs, libraries=[cublaslt_library(library_dirs)],
                         runtime_library_dirs=library_dirs,
                         extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
                         extra_link_args=["-fopenmp"] + link_libstdcxx)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
