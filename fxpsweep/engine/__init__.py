"""The fixed-point engine: the network builder (``network``), the operations of a network on integer codes
(``ops``), calibration (choosing each register's F) and its statistics, GPTQ rounding, a network's costs and
layer report, and top-k evaluation. Formats and quantization live in ``core``; the kernels that run the
arithmetic fast, in ``backends``."""
