"""The hop's C codec, ``appliance/wire/_codec.c``; everything else is in pyproject.toml.

It is optional: an install without a C compiler (or without the Python headers, python3-dev)
still works, and the hop then runs in Python alone (the same frames and errors). Declared
here, not in pyproject.toml, because setuptools' ``ext-modules`` table there is still
experimental.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("appliance.wire._codec", sources=["appliance/wire/_codec.c"],
                             optional=True, extra_compile_args=["-O2"])])
