"""Only for the optional C extensions; everything else is in pyproject.toml.

- ``agent.exposure._fastmatch``: the matching kernel; needs a C compiler and OpenSSL's
  headers (Debian: libssl-dev);
- ``agent.protocol._fastexport``: export.bin's protobuf straight into arrays; a C compiler.

Where they cannot be built the build is skipped (optional=True) and the pure-Python
paths (the same results, tested against each other) are used."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "agent.exposure._fastmatch",
            sources=["agent/exposure/_native/fastmatch.c"],
            libraries=["crypto"],
            extra_compile_args=["-O3", "-pthread", "-Wno-deprecated-declarations"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(
            "agent.protocol._fastexport",
            sources=["agent/protocol/_native/fastexport.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
    ]
)
