"""The adapted linear layer: the adapter spec (branches and edit log), the layer, its fused branches op, and
the adapter file."""
