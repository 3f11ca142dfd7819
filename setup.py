"""The compiled feature kernels (everything else is in pyproject.toml): Cython writes its
C into build/, so neither the source tree nor a model package carries generated code."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# no fused multiply-add: the same features, to the bit, on every CPU that builds them
kernels = Extension("features._kernels", ["features/_kernels.pyx"],
                    extra_compile_args=["-ffp-contract=off"])
setup(ext_modules=cythonize([kernels], build_dir="build"))
