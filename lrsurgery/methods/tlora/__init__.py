"""TLoRA (Lin et al., 2026): the method, and its sensitivity-proportional rank and alpha allocation."""

from lrsurgery.methods.tlora.method import TLoRA

__all__ = ["TLoRA"]
