"""The stages that turn artifacts into artifacts: init (SVD surgery), fuse and PEFT export; an artifact
applied to its base model."""
