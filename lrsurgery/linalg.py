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
