"""The compiled feature kernels (everything else is in pyproject.toml): Cython writes its
C into build/, so neither the source tree nor a model package carries generated code."""

from Cython.Build import cythonize
from setuptools import setup

setup(ext_modules=cythonize("features/_kernels.pyx", build_dir="build"))
