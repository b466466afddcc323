"""Reading and writing: the output protocol, artifacts and manifests, safetensors files, the adapter
and stats file formats, the Hub."""
