"""fxpsweep: how accurate a pretrained CNN stays on a signed fixed-point datapath."""

__version__ = "0.1.0"
