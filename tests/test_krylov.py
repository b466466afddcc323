"""The block Krylov route to top eigenpairs: accurate where it claims convergence, refused where the
spectrum has no gap, and `top_eigenpairs` then falls back to LAPACK's MRRR."""

from __future__ import annotations

import torch

from lrsurgery.linalg.eigen import top_eigenpairs
from lrsurgery.linalg.krylov import MIN_SIZE, krylov_top_eigenpairs
from lrsurgery.linalg.svd import subspace_distance

N, RANK = MIN_SIZE, 12

# Why the constants below hold on any CPU: everything is fp64 (unit roundoff u = 1.1e-16) on matrices of
# norm 1 with n = 1024, so any backward-stable solver's eigenvalues err by ≲ n·u = 1e-13 absolute, which is
# ≤ 5e-12 relative to the smallest kept eigenvalue here (12^-1.5 = 0.024), and its vectors by that over
# the eigenvalue gap (≥ 0.003 here): ≲ 1e-10 only if a solver were 100× worse than backward stable. The
# Krylov route's 1e-8 is the bound its own check enforces (residual / gap), not a figure from one machine.


def _symmetric(spectrum: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric fp64 matrix with the given eigenvalues, and its eigenvectors (columns, in that order)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=generator, dtype=torch.float64))[0]
    matrix = (basis * spectrum) @ basis.T
    return (matrix + matrix.T) / 2, basis


def test_krylov_gets_the_top_eigenspace_of_a_decaying_spectrum_to_its_own_bound():
    """A power-law spectrum like a W·C Gram's: the route converges, and the subspace it returns is within
    the 1e-8 its check promises of the true one (fp64; the true one known by construction)."""
    spectrum = torch.arange(1, N + 1, dtype=torch.float64) ** -1.5
    matrix, basis = _symmetric(spectrum, 0)
    found = krylov_top_eigenpairs(matrix, RANK)
    assert found is not None
    values, vectors = found
    assert subspace_distance(vectors.T, basis[:, :RANK].T) <= 1e-8
    # Ritz values err by ~‖R‖²/gap ≤ 1e-16·gap, plus n·u rounding
    torch.testing.assert_close(values, spectrum[:RANK], rtol=1e-10, atol=0)
    # QR with re-orthogonalisation twice: orthonormal to O(n·u) = 1e-13
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)


def test_no_gap_after_the_rank_is_refused_and_top_eigenpairs_falls_back_to_mrrr():
    """Eigenvalues r and r + 1 equal: the top-r eigenspace is not unique, the check must fail, and
    `top_eigenpairs` answers by MRRR (exact eigenvalues; vectors inside the degenerate eigenspace)."""
    spectrum = torch.arange(1, N + 1, dtype=torch.float64) ** -1.5
    spectrum[RANK] = spectrum[RANK - 1]
    matrix, basis = _symmetric(spectrum, 1)
    assert krylov_top_eigenpairs(matrix, RANK) is None
    values, vectors = top_eigenpairs(matrix.triu()[None].clone(), RANK)  # upper triangle only, as Grams come
    torch.testing.assert_close(values[0], spectrum[:RANK], rtol=1e-10, atol=0)
    # the first r − 1 vectors are determined; the r-th lies in span(u_r, u_{r+1})
    assert subspace_distance(vectors[0, :, : RANK - 1].T, basis[:, : RANK - 1].T) < 1e-10
    in_plane = basis[:, RANK - 1 : RANK + 1].T @ vectors[0, :, RANK - 1]
    torch.testing.assert_close(torch.linalg.vector_norm(in_plane), torch.tensor(1.0, dtype=torch.float64))


def test_top_eigenpairs_of_a_large_stack_equal_mrrrs_by_either_route():
    """A stack of two large matrices, one with a gap (Krylov) and one without (MRRR), from their upper
    triangles: both answers agree with a full eigendecomposition."""
    decaying = torch.arange(1, N + 1, dtype=torch.float64) ** -1.0
    flat = decaying.clone()
    flat[RANK] = flat[RANK - 1]
    first, _ = _symmetric(decaying, 2)
    second, _ = _symmetric(flat, 3)
    stack = torch.stack([first, second])
    garbage = torch.randn(stack.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).tril(-1)
    values, vectors = top_eigenpairs(stack.triu() + garbage, RANK)  # what lies below the diagonal is not read
    full_values, full_vectors = torch.linalg.eigh(stack)
    torch.testing.assert_close(values, full_values[:, -RANK:].flip(-1), rtol=1e-10, atol=0)
    assert subspace_distance(vectors[0].T, full_vectors[0, :, -RANK:].T) <= 1e-8
    assert subspace_distance(vectors[1, :, : RANK - 1].T, full_vectors[1, :, -RANK + 1 :].T) < 1e-10
