"""How the engine's arithmetic runs fast on a machine: the exact dot-product kernels and the choice among them
(``kernels``, ``kernel_choice``), compiled and numba passes that round registers (``fused``, ``rounding_loop``,
``depthwise_loop``, with ``prefetch``), and the host-memory rule of a job
(``host_memory``). Every mechanism computes the codes the engine's reference defines; nothing here imports the
engine."""
