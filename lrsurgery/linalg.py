"""Truncated SVD, exact and randomized, shared by every method that cuts adapters out of weights."""

from __future__ import annotations

import math

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf; one reduction, far cheaper than `isfinite(t).all()`.

    A sum is non-finite exactly when an entry is, or when finite entries are so large that the sum
    overflows, which for weights, activations and their statistics means they are unusable anyway.
    """
    work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    return bool(torch.isfinite(work.sum()))


class Workspace:
    """fp64 scratch buffers kept between batches, one per role, grown when a batch needs more.

    Batched linear algebra over a model's modules allocates the same large stacks batch after batch;
    fresh allocations of that size are new pages from the OS, each zero-filled on first touch, which
    costs about as much as a BLAS pass over them. Reused buffers are touched once.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised fp64 tensor of `shape` on `device`, a view of the buffer kept for `role`."""
        size = math.prod(shape)
        buffer = self.buffers.get(role)
        if buffer is None or buffer.numel() < size or buffer.device != torch.device(device):
            self.buffers.pop(role, None)  # free the old buffer before the new one is allocated
            buffer = self.buffers[role] = torch.empty(size, dtype=torch.float64, device=device)
        return buffer[:size].view(shape)


def stack_fp64(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Same-shaped tensors as one fp64 (batch, ...) stack (into `out` if given, which may be on another
    device than the tensors), converted in a single pass."""
    if out is None:
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float64, device=tensors[0].device)
    for slot, tensor in zip(out, tensors, strict=True):
        slot.copy_(tensor)
    return out


def _panel(d: int) -> int:
    """Column-panel width for `add_gram_upper`: up to 6 panels of at least 96 columns."""
    return -(-d // max(1, min(6, d // 96)))


def add_gram_upper(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """`total` + rowsᵀ·rows for a (t, d) matrix or a (batch, t, d) stack, computed on and above the
    diagonal only; what lies below it is not kept (`symmetrize_upper_` fills it in).

    The d columns are cut into panels and each panel is one GEMM against the columns from its
    diagonal on: about 7/12 of the full product's flops, as BLAS `syrk` would do, which PyTorch does
    not expose.
    """
    d, step = rows.shape[-1], _panel(rows.shape[-1])
    if total is None:
        total = rows.new_zeros(*rows.shape[:-2], d, d)
    for start in range(0, d, step):
        panel = total[..., start : start + step, start:]
        left, right = rows[..., start : start + step], rows[..., start:]
        if rows.ndim == 2:
            panel.addmm_(left.T, right)
        else:
            panel.baddbmm_(left.mT, right)
    return total


def symmetrize_upper_(total: torch.Tensor) -> torch.Tensor:
    """Make `total` (from `add_gram_upper`) the exactly symmetric matrix its upper triangle gives, in
    place, one panel at a time (no full-size temporaries)."""
    d, step = total.shape[-1], _panel(total.shape[-1])
    for start in range(0, d, step):
        stop = start + step
        diagonal = total[..., start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        total[..., stop:, start:stop] = total[..., start:stop, stop:].mT
    return total


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
    if not all_finite(work):
        raise ValueError("matrix has NaN or Inf entries")
    if method == "exact":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}; use exact or randomized")
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, dtype=work.dtype, generator=generator).to(work.device)  # same draw on any device
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


def top_right_singular_vectors(matrices: torch.Tensor, rank: int, workspace: Workspace | None = None) -> torch.Tensor:
    """Top-`rank` right singular vectors of each matrix in a (batch, m, n) stack, as (batch, rank, n) rows.

    From the smaller Gram matrix in fp64 (MᵀM if n ≤ m, else MMᵀ, whose eigenvectors U give
    V = Mᵀ U / σ): the Gram products are batched and form the upper triangle only, and only the top
    `rank` eigenpairs are computed (LAPACK's MRRR `syevr` on an index range), so neither a full SVD
    nor a full eigendecomposition is formed.
    Rows are orthonormal (up to fp64 rounding); signs are arbitrary, as in any SVD. The Gram stack
    lives in `workspace` when one is given.
    """
    if matrices.ndim != 3:
        raise ValueError(f"expected a (batch, m, n) stack, got shape {tuple(matrices.shape)}")
    _, m, n = matrices.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is out of range for {m}x{n} matrices (1..{min(m, n)})")
    work = matrices.double()
    if not all_finite(work):
        raise ValueError("matrix has NaN or Inf entries")
    side = min(m, n)
    gram = None if workspace is None else workspace.get("gram", (matrices.shape[0], side, side), work.device).zero_()
    if n <= m:
        _, vectors = top_eigenpairs(add_gram_upper(gram, work), rank)
        return vectors.transpose(1, 2)
    values, u = top_eigenpairs(add_gram_upper(gram, work.transpose(1, 2)), rank)  # u: (batch, m, rank)
    sigma = values.clamp_min(0).sqrt()
    v = (work.transpose(1, 2) @ u) / sigma.clamp_min(torch.finfo(torch.float64).tiny)[:, None, :]
    q, r = torch.linalg.qr(v)  # re-orthonormalise; keeps each column's direction (diag of r > 0 up to sign)
    return (q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]).transpose(1, 2)


def top_eigenpairs(grams: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenvalues (batch, rank), descending, and eigenvectors (batch, k, rank) of
    each symmetric fp64 matrix in a (batch, k, k) stack, given by its upper triangle (what lies below
    the diagonal is not read): on the CPU by MRRR on the requested index range only, on a GPU by the
    batched full eigendecomposition there, which keeps the stack on the device. The stack is used as
    work space: its contents are undefined afterwards."""
    return (top_eigenpairs_mrrr if grams.device.type == "cpu" else top_eigenpairs_batched)(grams, rank)


def top_eigenpairs_mrrr(grams: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_eigenpairs` by LAPACK's MRRR `syevr` on the index range (`lrsurgery.lapack`), one matrix per
    thread, each thread's BLAS single-threaded: the reduction to tridiagonal form is memory-bound and
    scales across matrices, not within one. `grams` (CPU) is overwritten."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from lrsurgery.lapack import top_eigenpairs_upper

    matrices = grams.contiguous().numpy()
    threads = max(1, min(len(matrices), torch.get_num_threads()))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        pairs = list(pool.map(top_eigenpairs_upper, matrices, [rank] * len(matrices)))
    values = torch.stack([torch.from_numpy(v[::-1].copy()) for v, _ in pairs])
    vectors = torch.stack([torch.from_numpy(z[::-1].T.copy()) for _, z in pairs])  # (batch, k, rank)
    return values, vectors


def top_eigenpairs_batched(grams: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_eigenpairs` by one batched `torch.linalg.eigh` of the whole stack, on the stack's device."""
    k = grams.shape[-1]
    values, vectors = torch.linalg.eigh(grams, UPLO="U")
    return values[:, k - rank :].flip(-1), vectors[..., k - rank :].flip(-1)


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
