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


def add_gram_upper(
    total: torch.Tensor | None, rows: torch.Tensor, right: torch.Tensor | None = None, beta: float = 1.0
) -> torch.Tensor:
    """beta·`total` + rowsᵀ·right (right defaults to rows: the Gram rowsᵀ·rows) for (t, d) matrices or
    (batch, t, d) stacks, computed on and above the diagonal only; what lies below it is not kept
    (`symmetrize_upper_` fills it in). With beta = 0, `total` is only written to (its contents, NaN
    included, are ignored).

    The d columns are cut into panels and each panel is one GEMM against the columns from its
    diagonal on: about 7/12 of the full product's flops, as BLAS `syrk` would do, which PyTorch does
    not expose.
    """
    right = rows if right is None else right
    d, step = rows.shape[-1], _panel(rows.shape[-1])
    if total is None:
        total, beta = rows.new_empty(*rows.shape[:-2], d, d), 0.0
    for start in range(0, d, step):
        panel = total[..., start : start + step, start:]
        left, ahead = rows[..., start : start + step], right[..., start:]
        if rows.ndim == 2:
            panel.addmm_(left.T, ahead, beta=beta)
        else:
            panel.baddbmm_(left.mT, ahead, beta=beta)
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


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` upcast to fp32 when it is in a narrower float type (bf16, fp16); fp32 and fp64 as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


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
    `rank` eigenpairs are computed (`top_eigenpairs`), so neither a full SVD nor a full
    eigendecomposition is formed.
    Rows are orthonormal (up to fp64 rounding); signs are arbitrary, as in any SVD. The Gram stack
    lives in `workspace` when one is given.
    """
    if matrices.ndim != 3:
        raise ValueError(f"expected a (batch, m, n) stack, got shape {tuple(matrices.shape)}")
    batch, m, n = matrices.shape
    _check_rank(rank, m, n)
    work = matrices.double()
    side = min(m, n)
    gram = None if workspace is None else workspace.get("gram", (batch, side, side), work.device)
    if n <= m:
        return _top_eigenvectors(add_gram_upper(gram, work, beta=0.0), rank)[1].transpose(1, 2)
    values, u = _top_eigenvectors(add_gram_upper(gram, work.mT, beta=0.0), rank)  # u: (batch, m, rank)
    sigma = values.clamp_min(0).sqrt()
    v = (work.transpose(1, 2) @ u) / sigma.clamp_min(torch.finfo(torch.float64).tiny)[:, None, :]
    q, r = torch.linalg.qr(v)  # re-orthonormalise; keeps each column's direction (diag of r > 0 up to sign)
    return (q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]).transpose(1, 2)


def top_right_singular_vectors_of_product(
    weights: torch.Tensor, covariances: torch.Tensor, rank: int, workspace: Workspace
) -> torch.Tensor:
    """Top-`rank` right singular vectors of each W·C, for a (batch, m, n) stack of W and a (batch, n, n)
    stack of symmetric C (both fp64), as (batch, rank, n) rows, by the cheaper of two exact routes:

    - the product M = W·C (m·n² flops), then `top_right_singular_vectors` of M;
    - for W much taller than wide (m > 19/12·n, as gate and up projections are), the Gram MᵀM straight
      from its factors, C·(WᵀW)·C: WᵀW and the last product on the upper triangle only, so
      (7/12·m + 19/12·n)·n² flops instead of 19/12·m·n², and no (m, n) product is formed.
    """
    batch, m, n = weights.shape
    _check_rank(rank, m, n)
    if 12 * m <= 19 * n:
        product = torch.bmm(weights, covariances, out=workspace.get("product", (batch, m, n), weights.device))
        return top_right_singular_vectors(product, rank, workspace)
    square = add_gram_upper(workspace.get("square", (batch, n, n), weights.device), weights, beta=0.0)
    symmetrize_upper_(square)
    half = torch.bmm(square, covariances, out=workspace.get("product", (batch, n, n), weights.device))  # (WᵀW)·C
    gram = add_gram_upper(workspace.get("gram", (batch, n, n), weights.device), half, covariances, beta=0.0)
    return _top_eigenvectors(gram, rank)[1].transpose(1, 2)  # Gram = ((WᵀW)·C)ᵀ·C = C·WᵀW·C


def _check_rank(rank: int, m: int, n: int) -> None:
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is out of range for {m}x{n} matrices (1..{min(m, n)})")


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

    By LAPACK's MRRR `syevr` on the index range (`lrsurgery.lapack`), on the host whatever the stack's
    device (GPU dense eigensolvers are built for large matrices; these Grams are a few MB each), one
    matrix per thread with each thread's BLAS single-threaded: the reduction to tridiagonal form is
    memory-bound and scales across matrices, not within one. A CPU stack is used as work space: its
    contents are undefined afterwards.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from lrsurgery.lapack import top_eigenpairs_upper

    matrices = grams.contiguous().cpu().numpy()
    threads = max(1, min(len(matrices), torch.get_num_threads()))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        pairs = list(pool.map(top_eigenpairs_upper, matrices, [rank] * len(matrices)))
    values = torch.stack([torch.from_numpy(v[::-1].copy()) for v, _ in pairs])
    vectors = torch.stack([torch.from_numpy(z[::-1].T.copy()) for _, z in pairs])  # (batch, k, rank)
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
