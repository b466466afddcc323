"""Bytes on disk: the output protocol, artifacts and manifests, safetensors files, the Hub."""
