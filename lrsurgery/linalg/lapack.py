"""LAPACK's MRRR symmetric eigensolver on an index range, callable from several threads at once.

SciPy's `eigh` wrapper holds the GIL while LAPACK runs, so eigensolves in Python threads run one after
another. This calls the same routine (`dsyevr`, from the LAPACK SciPy ships, through the function
pointers `scipy.linalg.cython_lapack` exports) with ctypes, which releases the GIL for the call: each
thread then solves its own matrix on its own core."""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

_INT, _DOUBLE = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)


_PTR, _CHAR = ctypes.c_void_p, ctypes.c_char_p


# jobz range uplo n a lda vl vu il iu abstol m w z ldz isuppz work lwork iwork liwork info
_DSYEVR = ctypes.CFUNCTYPE(
    None, _CHAR, _CHAR, _CHAR, _INT, _PTR, _INT, _DOUBLE, _DOUBLE, _INT, _INT, _DOUBLE, _INT, _PTR, _PTR, _INT,
    _PTR, _PTR, _INT, _PTR, _INT, _INT,
)  # fmt: skip


@cache
def _dsyevr() -> ctypes._CFuncPtr:
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__["dsyevr"]
    get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return _DSYEVR(get_pointer(capsule, get_name(capsule)))


def top_eigenpairs_upper(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest eigenvalues (k,), ascending, and eigenvectors as rows (k, n) of a symmetric
    C-contiguous fp64 (n, n) `matrix`, read from its upper triangle; `matrix` is overwritten."""
    n = matrix.shape[0]
    if matrix.dtype != np.float64 or not matrix.flags.c_contiguous or matrix.shape != (n, n) or not 1 <= k <= n:
        raise ValueError(f"expected a C-contiguous fp64 square matrix and 1 <= k <= n, got {matrix.shape}, k={k}")
    values, vectors = np.empty(n), np.empty((k, n))  # row-major (k, n) is LAPACK's column-major (n, k)
    support = np.empty(2 * k, dtype=np.intc)
    size, low, high, found, info = (ctypes.c_int(v) for v in (n, n - k + 1, n, 0, 0))
    unused, tolerance = ctypes.c_double(0.0), ctypes.c_double(0.0)  # 0: LAPACK's default tolerance

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        _dsyevr()(
            b"V", b"I", b"L",  # LAPACK's lower triangle (column-major) is the row-major upper triangle
            ctypes.byref(size), matrix.ctypes.data, ctypes.byref(size), ctypes.byref(unused), ctypes.byref(unused),
            ctypes.byref(low), ctypes.byref(high), ctypes.byref(tolerance), ctypes.byref(found),
            values.ctypes.data, vectors.ctypes.data, ctypes.byref(size), support.ctypes.data,
            work.ctypes.data, ctypes.byref(ctypes.c_int(lwork)), iwork.ctypes.data, ctypes.byref(ctypes.c_int(liwork)),
            ctypes.byref(info),
        )  # fmt: skip

    work, iwork = np.empty(1), np.empty(1, dtype=np.intc)
    call(work, -1, iwork, -1)  # workspace query
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if info.value != 0 or found.value != k:
        raise np.linalg.LinAlgError(f"LAPACK dsyevr failed (info {info.value}, {found.value} of {k} eigenpairs)")
    return values[:k], vectors
