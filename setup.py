"""Builds the optional C++ CPU kernels of csrc/ as ``deep_ep_ops._C`` when torch is importable.

``pip install --no-build-isolation -e .`` builds them against the installed torch (the README's
commands). With build isolation the build environment has no torch, and the package installs as pure
Python: it works the same on its pure-torch kernels.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    pass
else:
    if os.environ.get("DEEP_EP_OPS_NO_BUILD") != "1":
        ext_modules = [CppExtension(
            "deep_ep_ops._C", ["csrc/kernels.cpp", "csrc/shm.cpp", "csrc/low_latency.cpp", "csrc/normal.cpp"],
            # -ffp-contract=off: results must round exactly as torch's separate multiply and add do.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
            extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
