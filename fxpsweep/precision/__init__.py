"""Per-layer word lengths: precision rules, costs (weight memory, activation storage, BitOps),
layer sensitivity and the minimum-bits search."""
