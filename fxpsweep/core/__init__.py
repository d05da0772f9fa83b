"""Foundations, imported by every other layer and importing none of them: fixed-point formats and quantization
(``fixedpoint``), per-layer precision rules (``rules``), atomic files and downloads (``storage``), the user-input
error (``errors``) and progress reporting (``progress``). No network tracing here."""
