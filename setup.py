"""Builds the compiled parts (fastrelay/_core.pyx, fastrelay/audit/_journal.pyx and
_sqlite.pyx); everything else is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastrelay._core",
        ["fastrelay/_core.pyx"],
        # libcrypto for the low-level SHA256_*/MD5_* calls in the signature checks; those
        # are deprecated in OpenSSL 3 yet exported and much cheaper than EVP/HMAC().
        extra_compile_args=["-O2", "-Wno-deprecated-declarations"],
        libraries=["crypto"],
    ),
    # the journal's frames (zlib's crc32, as spill.py's frames: one format for both)
    Extension("fastrelay.audit._journal", ["fastrelay/audit/_journal.pyx"], libraries=["z"]),
    # the SQLite audit's batches: packed in the worker, inserted by the writer child
    Extension(
        "fastrelay.audit._sqlite",
        ["fastrelay/audit/_sqlite.pyx"],
        extra_compile_args=["-O2"],
        libraries=["sqlite3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
