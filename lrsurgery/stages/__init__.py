"""Artifacts into artifacts: init (the SVD surgery), fuse, PEFT export; an artifact applied to its base model."""
