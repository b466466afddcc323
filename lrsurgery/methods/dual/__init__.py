"""DMC-LoRA, "dual" (Cao et al., 2025): the method, and its expert screening and orthogonality penalty."""

from lrsurgery.methods.dual.method import Dual

__all__ = ["Dual"]
