"""Truncated SVD, exact and randomized, shared by every method that cuts adapters out of weights."""

from __future__ import annotations

import torch


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of a 2-D `matrix` (computed in fp32 or better).

    Returns U (m, r), S (r,), Vh (r, n) with S descending. `method="randomized"` uses a Gaussian
    range finder with `oversample` extra columns and `power_iters` QR-stabilised power iterations
    (Halko, Martinsson & Tropp 2011, Alg. 4.4), then an exact SVD of the small projected matrix.
    """
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is out of range for a {m}x{n} matrix (1..{min(m, n)})")
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    if not torch.isfinite(work).all():
        raise ValueError("matrix has NaN or Inf entries")
    if method == "exact":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}; use exact or randomized")
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, dtype=work.dtype, device=work.device, generator=generator)
    q, _ = torch.linalg.qr(work @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(work.T @ q)
        q, _ = torch.linalg.qr(work @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ work, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def subspace_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Projection distance ‖P_a − P_b‖_F / sqrt(2r) between the row spaces of two r×n matrices, in [0, 1]."""
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    diff = qa @ qa.T - qb @ qb.T
    return float(torch.linalg.norm(diff) / (2 * qa.shape[1]) ** 0.5)


def top_right_singular_vectors(matrices: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` right singular vectors of each matrix in a (batch, m, n) stack, as (batch, rank, n) rows.

    Computed from an fp64 symmetric eigendecomposition of the smaller Gram matrix (MᵀM if n ≤ m, else
    MMᵀ, whose eigenvectors U give V = Mᵀ U / σ), batched over the stack; no full SVD is formed.
    Rows are orthonormal (up to fp64 rounding); signs are arbitrary, as in any SVD.
    """
    if matrices.ndim != 3:
        raise ValueError(f"expected a (batch, m, n) stack, got shape {tuple(matrices.shape)}")
    _, m, n = matrices.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is out of range for {m}x{n} matrices (1..{min(m, n)})")
    work = matrices.double()
    if not torch.isfinite(work).all():
        raise ValueError("matrix has NaN or Inf entries")
    if n <= m:
        _, vectors = torch.linalg.eigh(work.transpose(1, 2) @ work)  # ascending eigenvalues
        return vectors[:, :, -rank:].flip(-1).transpose(1, 2)
    values, vectors = torch.linalg.eigh(work @ work.transpose(1, 2))
    u = vectors[:, :, -rank:].flip(-1)  # (batch, m, rank)
    sigma = values[:, -rank:].flip(-1).clamp_min(0).sqrt()
    v = (work.transpose(1, 2) @ u) / sigma.clamp_min(torch.finfo(torch.float64).tiny)[:, None, :]
    q, r = torch.linalg.qr(v)  # re-orthonormalise; keeps each column's direction (diag of r > 0 up to sign)
    return (q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]).transpose(1, 2)


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
