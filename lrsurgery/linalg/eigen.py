"""Top eigenpairs of symmetric matrices (LAPACK's MRRR, one matrix per thread) and PSD powers."""

from __future__ import annotations

import torch

from lrsurgery.linalg.basics import all_finite
from lrsurgery.linalg.gram import symmetrize_upper_
from lrsurgery.linalg.krylov import MIN_SIZE, krylov_top_eigenpairs
from lrsurgery.linalg.lapack import top_eigenpairs_upper


def _top_eigenvectors(grams: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_eigenpairs` of Gram matrices, refused if any is non-finite: a Gram's diagonal holds the
    squared norms of its factor's columns, so it is finite exactly when every entry of the factor is
    (short of overflow), a check on d numbers instead of the whole stack."""
    if not all_finite(torch.diagonal(grams, dim1=-2, dim2=-1)):
        raise ValueError("matrix has NaN or Inf entries")
    return top_eigenpairs(grams, rank)


def top_eigenpairs(grams: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenvalues (batch, rank), descending, and eigenvectors (batch, k, rank) of
    each symmetric fp64 matrix in a (batch, k, k) stack, given by its upper triangle (what lies below
    the diagonal is not read), on the stack's device.

    Matrices of size ≥ 1024 first try block Krylov (`linalg.krylov`), kept only where its convergence
    check bounds the subspace error below 1e-8. The others, and any that fail the check,
    by LAPACK's MRRR `syevr` on the index range (`lrsurgery.lapack`), on the host whatever the stack's
    device (GPU dense eigensolvers are built for large matrices; these Grams are a few MB each), one
    matrix per thread with each thread's BLAS single-threaded: the reduction to tridiagonal form is
    memory-bound and scales across matrices, not within one. A CPU stack is used as work space: its
    contents are undefined afterwards.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    stack = grams.contiguous().cpu()
    found: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(stack)
    if stack.shape[-1] >= MIN_SIZE:  # large: block Krylov where its convergence check passes (linalg/krylov.py)
        for i, matrix in enumerate(symmetrize_upper_(stack)):  # fills the lower triangle; the upper stays
            found[i] = krylov_top_eigenpairs(matrix, rank)
    rest = [i for i, pair in enumerate(found) if pair is None]
    matrices = stack.numpy()
    threads = max(1, min(len(rest), torch.get_num_threads()))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        for i, (v, z) in zip(
            rest, pool.map(top_eigenpairs_upper, [matrices[i] for i in rest], [rank] * len(rest)), strict=True
        ):
            found[i] = torch.from_numpy(v[::-1].copy()), torch.from_numpy(z[::-1].T.copy())
    values = torch.stack([v for v, _ in found])
    vectors = torch.stack([z for _, z in found])  # (batch, k, rank)
    return values.to(grams.device), vectors.to(grams.device)


def psd_power(matrix: torch.Tensor, power: float, damping: float = 0.0) -> torch.Tensor:
    """C^power of a symmetric PSD matrix (fp64), eigenvalues damped first: λ + damping · mean(λ).

    The damping (like GPTQ's dampening of the Hessian) keeps C^{-1/2} finite on the ill-conditioned
    activation covariances of language models.
    """
    values, vectors = torch.linalg.eigh(matrix.double())
    values = values.clamp_min(0)
    values = values + damping * values.mean()
    if power < 0 and float(values.min()) <= 0:
        raise ValueError("the matrix is singular; a negative power needs damping > 0")
    return (vectors * values.pow(power)) @ vectors.T
