"""The adapted linear layer: its adapter spec (branches + edit log), its fused branches op, the adapter file."""
