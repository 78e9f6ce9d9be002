"""Only for the optional C matching kernel; everything else is in pyproject.toml.

The extension needs a C compiler and OpenSSL's headers (Debian: libssl-dev). Where they
are missing the build is skipped (optional=True) and the pure-Python matcher is used."""

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
        )
    ]
)
