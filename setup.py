"""Builds the optional CPU kernels (`bbsmall_jax.generation._cpu_kernels`); everything else is in pyproject.toml.

The kernels are an XLA FFI extension compiled against jaxlib's headers. A machine without a C++ compiler
(or without AVX-512 at run time) still installs and runs the package: generation then uses XLA's own
matmuls.
"""

import os

from setuptools import Extension, setup


def _cpu_kernels() -> list:
    try:
        import jaxlib
    except ImportError:  # only when building without the declared build requirements
        print("bbsmall_jax: jaxlib is not importable at build time; building without the CPU kernels")
        return []
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return [Extension("bbsmall_jax.generation._cpu_kernels", ["bbsmall_jax/generation/csrc/cpu_kernels.cc"], include_dirs=[include],
                      extra_compile_args=["-O3", "-std=c++17"], language="c++", optional=True)]


setup(ext_modules=_cpu_kernels())
