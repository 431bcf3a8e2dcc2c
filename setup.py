"""Builds flagjax's optional CPU kernels (flagjax/csrc/cpu_kernels.cc, XLA FFI handlers loaded by
flagjax/native.py). Everything else about the package is in pyproject.toml. Without a C++17 compiler the
extension is skipped and flagjax runs its pure-XLA paths (docs/guide.md, "Native CPU kernels")."""

import os

import jaxlib
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flagjax._cpu_kernels",
            sources=["flagjax/csrc/cpu_kernels.cc"],
            include_dirs=[os.path.join(os.path.dirname(jaxlib.__file__), "include")],
            language="c++",
            # built where it runs (pip builds from source): -march=native vectorises for this CPU
            extra_compile_args=["-std=c++17", "-O3", "-march=native"],
            optional=True,
        )
    ]
)
