"""lrsurgery: calibrate, cut low-rank adapters out of pretrained weights, fine-tune, fuse back."""

__version__ = "0.1.0"
