"""Golden vectors for hardware: a bit-exact run exported as integer test vectors (``export``, needs torch),
and a checker that recomputes them with numpy alone (``replay``, the contract a hardware team reads).
Nothing here may import torch at package import: ``replay`` runs without it."""
