"""Build roga_cuda against the torch that is already installed.

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

`--no-build-isolation` matters: an isolated build would compile against whatever torch pip
puts in a throw-away environment, and the extension would not load into yours.

Environment variables:
  ROGA_NO_CUDA=1       build the CPU kernels only, even with a CUDA build of torch
  FORCE_CUDA=1         require the CUDA kernels: stop with the reason instead of building the
                       CPU kernels only when they cannot be built (CUDA kernels are built
                       whenever they can, GPU visible or not)
  TORCH_CUDA_ARCH_LIST GPU architectures to compile for (default without a visible GPU:
                       "8.0;9.0+PTX", i.e. A100 and H100/H200 plus PTX for newer GPUs)
  MAX_JOBS             parallel compile jobs (ninja)
  ROGA_DEBUG=1         -O0 -g builds
"""
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "roga_cuda compiles against the torch you already have, and none is importable here.\n"
        "Install torch first (for CPU-only machines: pip install torch), then build with\n"
        "    pip install --no-build-isolation -e .\n"
        "(without --no-build-isolation pip builds in a fresh environment that has no torch)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_cuda():
    if flag("ROGA_NO_CUDA"):
        if flag("FORCE_CUDA"):
            sys.exit("roga_cuda: FORCE_CUDA=1 and ROGA_NO_CUDA=1 contradict each other")
        return False, "ROGA_NO_CUDA is set"
    why_not = None
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME to the folder whose bin/nvcc is the compiler)"
    if why_not and flag("FORCE_CUDA"):
        sys.exit(f"roga_cuda: FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    # Built whether or not a GPU is visible (CI proves the CUDA build on a GPU-less machine).
    return why_not is None, why_not


def cxx_std():
    """The C++ standard the installed torch's headers demand (torch 2.14 requires C++20)."""
    for inc in cpp_extension.include_paths():
        try:
            with open(os.path.join(inc, "ATen", "ATen.h"), encoding="utf-8") as f:
                if "__cplusplus < 202002L" in f.read():
                    return "-std=c++20"
        except OSError:
            continue
    return "-std=c++17"


def extensions():
    debug = flag("ROGA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    define = [("ROGA_TORCH_VERSION", f'"{torch.__version__}"')]
    # -ffp-contract=off: no silent FMA contraction, so the AVX2 and baseline loops (and the
    # reference) round identically.
    std = cxx_std()
    cxx = opt + [std, "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
    sources = ["csrc/frontend.cpp", "csrc/library.cpp", "csrc/checks.cpp", "csrc/cpu/ops.cpp", "csrc/cpu/kernels_base.cpp", "csrc/cpu/kernels_avx2.cpp"]
    cuda, why_not = want_cuda()
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        cu = sorted(os.path.join("csrc/cuda", f) for f in os.listdir(os.path.join(HERE, "csrc/cuda"))
                    if f.endswith(".cu"))
        define.append(("ROGA_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "roga_cuda._C", sources + cu,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": opt + [std, "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
        print(f"roga_cuda: building CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})")
    else:
        ext = cpp_extension.CppExtension(
            "roga_cuda._C", sources, define_macros=define,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
        print(f"roga_cuda: building the CPU kernels only ({why_not})")
    return [ext]


def read(path):
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        return f.read()


setup(
    name="roga_cuda",
    version="0.1.0",
    description="Fused multi-tensor kernels and optimizers for gradient-alignment training "
                "(SAM/ASAM, RoGA, PCGrad family) with deepfake-detection training apps",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["roga_cuda", "roga_cuda.*"]),
    package_data={"roga_cuda": ["apps/*/presets/*.yaml"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    # The library (ops, optimizers) needs torch and numpy only; the training apps' packages
    # are the [apps] extra (roga-train / dpda-train say so when they are missing).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "apps": ["pyyaml", "tqdm", "matplotlib", "pillow", "soundfile"],
        # the apps' packages (their tests), scikit-learn (the metrics tests' reference),
        # torchjd (the peer the weighting tests cross-check against; needs torch>=2.3, keeps
        # the installed one; its [cagrad] extra, cvxpy + Clarabel, runs the CAGrad check) and
        # pytorch-optimizer (the SAM variants' peer; needs torch>=2.1)
        "test": ["pytest", "hypothesis", "pytest-benchmark", "scikit-learn",
                 "torchjd[quadprog-projector,cagrad]>=0.18",
                 "pytorch-optimizer>=4.1", "pyyaml", "tqdm", "matplotlib", "pillow", "soundfile"],
        "audio": ["soundfile"],
        "timm": ["timm"],  # EfficientNet-B4 backbone; pulls torchvision
    },
    entry_points={
        "console_scripts": [
            "roga-train=roga_cuda.apps.launch:roga_train",
            "roga-eval=roga_cuda.apps.launch:roga_eval",
            "dpda-train=roga_cuda.apps.launch:dpda_train",
            "dpda-eval=roga_cuda.apps.launch:dpda_eval",
        ]
    },
)
