"""The adapted linear layer: the adapter spec (branches and edit log), the layer, and its fused branches op."""
