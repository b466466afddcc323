"""Linear algebra for the inits: SVDs, Gram kernels, eigensolvers (LAPACK's MRRR) and PSD powers."""
