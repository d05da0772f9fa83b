"""What a whole network is simulated with: word lengths, rounding, overflow and arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from fxpsweep.engine.calibration import GRANULARITIES, METHODS
from fxpsweep.backends.kernels import KERNEL_NAMES
from fxpsweep.core.fixedpoint import (
    OVERFLOW_MODES,
    ROUNDING_MODES,
    QFormat,
    check_bits,
)
from fxpsweep.core.errors import ConfigError

ARITHMETIC_MODES = ("exact", "fast")
BATCHNORM_MODES = ("fold", "keep")
WEIGHT_ROUNDINGS = ("plain", "gptq")


def _check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantSettings:
    """One network's fixed-point configuration; every word length counts the sign bit.

    ``param_bits``: weights. ``bias_bits``: biases (their LSB never finer
    than the accumulator's). ``fwd_bits``: activations (network input included). ``rounding`` / ``overflow``: the rule at every rounding
    point. ``acc_bits``: the conv/linear accumulator word (None: exact, as
    wide as needed) with ``acc_overflow`` ``wrap`` or ``saturate`` (after every
    add, in the order ``fxpsweep.backends.kernels`` states). ``product_bits``: round every
    product into a word of this many bits before it is summed (None: exact).
    ``batchnorm``: ``fold`` into the preceding conv, or ``keep`` as a quantized
    per-channel multiply-add. ``arithmetic``: ``exact`` (bit-exact) or ``fast``
    (one float32 or int8 call per layer, inexact where partial sums pass 2**24).
    ``kernel``: ``auto`` (each conv/linear runs on the fastest exact kernel,
    measured) or a kernel's name, forced on every layer it is exact for.
    ``act_calibration`` / ``weight_calibration``: how F is chosen (see
    ``calibration``), weights ``per tensor`` or ``per channel``
    (``weight_granularity``); ``overflow_rate``: the fraction the
    ``overflow_rate`` method lets saturate. ``bias_correction``: shift every
    conv/linear bias by the mean error of its output on the calibration images
    (see ``QuantizedNetwork.calibrate``). ``weight_rounding``: ``plain`` (each
    weight rounded to its nearest code by ``rounding``) or ``gptq`` (codes
    chosen layer by layer to keep the output on the calibration images, see
    ``gptq``). ``seed``: seeds stochastic rounding.
    """

    param_bits: int
    fwd_bits: int
    bias_bits: int = 32
    rounding: str = "nearest_even"
    overflow: str = "saturate"
    acc_bits: int | None = None
    acc_overflow: str = "wrap"
    product_bits: int | None = None
    batchnorm: str = "fold"
    arithmetic: str = "exact"
    kernel: str = "auto"
    act_calibration: str = "mse"
    weight_calibration: str = "mse"
    weight_granularity: str = "channel"
    overflow_rate: float = 0.0
    bias_correction: bool = True
    weight_rounding: str = "plain"
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.param_bits, "param_bits")
        check_bits(self.fwd_bits, "fwd_bits")
        check_bits(self.bias_bits, "bias_bits")
        _check_choice("rounding", self.rounding, ROUNDING_MODES)
        _check_choice("overflow", self.overflow, OVERFLOW_MODES)
        _check_choice("acc_overflow", self.acc_overflow, OVERFLOW_MODES)
        if self.acc_bits is not None:
            check_bits(self.acc_bits, "acc_bits")
        if self.product_bits is not None:
            check_bits(self.product_bits, "product_bits")
        _check_choice("batchnorm", self.batchnorm, BATCHNORM_MODES)
        _check_choice("arithmetic", self.arithmetic, ARITHMETIC_MODES)
        _check_choice("kernel", self.kernel, ("auto",) + KERNEL_NAMES[:-1])
        _check_choice("calibration.activations", self.act_calibration, METHODS)
        _check_choice("calibration.weights", self.weight_calibration, METHODS)
        _check_choice("calibration.granularity", self.weight_granularity, GRANULARITIES)
        if not (isinstance(self.overflow_rate, (int, float)) and 0.0 <= self.overflow_rate < 1.0):
            raise ConfigError(f"calibration.overflow_rate={self.overflow_rate!r} must be a fraction in [0, 1)")
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"calibration.bias_correction={self.bias_correction!r} must be true or false")
        _check_choice("calibration.weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)

    def activation_format(self, frac_bits: int) -> QFormat:
        return QFormat(self.fwd_bits, frac_bits, self.rounding, self.overflow)

    def parameter_format(self, frac_bits: int) -> QFormat:
        return QFormat(self.param_bits, frac_bits, self.rounding, self.overflow)

    def bias_format(self, frac_bits: int) -> QFormat:
        return QFormat(self.bias_bits, frac_bits, self.rounding, self.overflow)
