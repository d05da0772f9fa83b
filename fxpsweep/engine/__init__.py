"""The fixed-point engine: formats and quantization, the operations of a network on integer codes,
exact dot-product kernels, the network builder, and calibration (choosing each register's F)."""
