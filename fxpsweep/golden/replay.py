"""Replay exported golden vectors with numpy alone, and check them: the datapath contract in executable form.

    python -m fxpsweep.replay EXPORT_DIR

Every operation of ``manifest.json`` is recomputed from its exported inputs,
weights and biases, in integers, following ``docs/semantics.md``, and its
output compared with the exported one, code for code; so is every ``.mem``
file with its ``.npy``, and the top-5 with the logits. Prints ``N/N
operations match``; on a mismatch it names the operation, the first
differing index and both codes, and exits 1. Nothing here imports torch or
fxpsweep's engine: a hardware team can copy this file.

Conventions (the words of ``docs/semantics.md``):

- A tensor holds integer codes ``k``; its format ``Q(W, F)`` gives the value
  ``k * 2**-F``. Activations are NCHW (or NC), weights OIHW (or OI), row-major.
- Rounding a value ``v / 2**s`` (``s > 0`` bits dropped) is decided on the
  exact remainder: ``nearest_even``, ``nearest_up`` (ties up), ``nearest_away``
  (ties away from 0), ``floor``, ``toward_zero``. Then ``saturate`` clamps to
  ``[-2**(W-1), 2**(W-1)-1]`` or ``wrap`` keeps the low ``W`` bits.
- A register may be clamped as it is written (``clamp``: a ReLU or ReLU6
  that was its only reader), after rounding and overflow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

FORMAT = "fxpsweep-golden-vectors"
VERSION = 1


class ReplayError(Exception):
    """A problem with the export folder itself (missing, foreign, truncated): one line names the file or key."""


# ---------------------------------------------------------------------------
# Integer arithmetic of a datapath (int64 numpy arrays; values stay below 2**62).
# ---------------------------------------------------------------------------


def overflow(k: np.ndarray, bits: int, mode: str) -> np.ndarray:
    """Codes ``k`` brought into a signed ``bits``-bit word: clamped (``saturate``) or their low bits kept (``wrap``)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if mode == "saturate":
        return np.clip(k, lo, hi)
    low = np.bitwise_and(k, (1 << bits) - 1)
    return np.where(low > hi, low - (1 << bits), low)


def divide_round(p: np.ndarray, q: np.ndarray, rounding: str) -> np.ndarray:
    """``p / q`` (``q > 0``) rounded by the rule, decided on the exact remainder (average pooling)."""
    low = np.floor_divide(p, q)
    r = p - low * q
    if rounding == "nearest_even":
        up = (2 * r > q) | ((2 * r == q) & (low % 2 == 1))
    elif rounding == "nearest_up":
        up = 2 * r >= q
    elif rounding == "nearest_away":
        up = (2 * r > q) | ((2 * r == q) & (p > 0))
    elif rounding == "floor":
        up = np.zeros_like(r, dtype=bool)
    elif rounding == "toward_zero":
        up = (r > 0) & (p < 0)
    else:
        raise ReplayError(f"rounding {rounding!r} cannot be replayed")
    return low + up.astype(np.int64)


def shift_round(v: np.ndarray, s: np.ndarray | int, rounding: str) -> np.ndarray:
    """``v * 2**-s`` rounded to an integer: exact left shifts for ``s <= 0``, ``divide_round`` by ``2**s`` for ``s > 0``."""
    v = np.asarray(v, dtype=np.int64)
    s = np.broadcast_to(np.asarray(s, dtype=np.int64), v.shape)
    rounded = divide_round(v, np.left_shift(np.int64(1), np.maximum(s, 0)), rounding)
    return np.where(s <= 0, np.left_shift(v, np.maximum(-s, 0)), rounded)


def write_register(v: np.ndarray, s: np.ndarray | int, fmt: dict, clamp: list[int] | None) -> np.ndarray:
    """A register written from the exact value ``v * 2**-s`` (in its own LSBs): round, overflow, clamp."""
    k = overflow(shift_round(v, s, fmt["rounding"]), fmt["total_bits"], fmt["overflow"])
    return np.clip(k, *clamp) if clamp is not None else k


# ---------------------------------------------------------------------------
# One function per operation kind: (manifest entry, input codes, tensors) -> output codes.
# ---------------------------------------------------------------------------


def op_input(op: dict, images: np.ndarray, out_fmt: dict) -> np.ndarray:
    """The input register: each float image value rounded into ``Q(W, F)``, decided on its exact value."""
    flat = []
    for x in images.reshape(-1).tolist():
        v = Fraction(x) * Fraction(2) ** out_fmt["frac_bits"]
        low = math.floor(v)
        flat.append((low, v - low))
    low = np.array([f[0] for f in flat], dtype=np.int64)
    frac = [f[1] for f in flat]
    half = Fraction(1, 2)
    rule = out_fmt["rounding"]
    if rule == "nearest_even":
        up = [f > half or (f == half and lo % 2 == 1) for f, lo in zip(frac, low.tolist())]
    elif rule == "nearest_up":
        up = [f >= half for f in frac]
    elif rule == "nearest_away":
        up = [f > half or (f == half and lo >= 0) for f, lo in zip(frac, low.tolist())]
    elif rule == "floor":
        up = [False] * len(frac)
    elif rule == "toward_zero":
        up = [f > 0 and lo < 0 for f, lo in zip(frac, low.tolist())]
    else:
        raise ReplayError(f"rounding {rule!r} cannot be replayed")
    k = overflow(low + np.array(up, dtype=np.int64), out_fmt["total_bits"], out_fmt["overflow"]).reshape(images.shape)
    return np.clip(k, *op["clamp"]) if op.get("clamp") is not None else k


def _windows(x: np.ndarray, kh: int, kw: int, stride, padding, dilation, pad_value: int = 0) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) views of ``x`` padded with ``pad_value``: every window a kernel sees."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    n, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = x.strides
    return np.lib.stride_tricks.as_strided(x, (n, c, oh, ow, kh, kw), (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw))


def op_dot(op: dict, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, fmts: dict) -> np.ndarray:
    """Conv or linear: exact products, the accumulator (exact, or ``accumulator`` bits with its overflow rule
    after every add in the order input channel, kernel row, kernel column), the bias added at the finer LSB,
    one rounding into the output register."""
    a_fmt, w_fmt, out_fmt = fmts["input"], fmts["weight"], fmts["output"]
    cout = weight.shape[0]
    w_frac = np.array(w_fmt.get("frac_bits_per_channel") or [w_fmt["frac_bits"]] * cout, dtype=np.int64)
    product = op.get("product")
    drop = product["drop"] if product else 0
    acc_frac = a_fmt["frac_bits"] + w_frac - drop  # per output channel
    if op["kind"] == "linear":
        cols = x.reshape(x.shape[0], 1, -1)  # (N, positions=1, K)
        w = weight.reshape(cout, -1)
        groups, out_shape = 1, (x.shape[0], cout)
    else:
        kh, kw = weight.shape[2:]
        groups = op["groups"]
        win = _windows(x, kh, kw, op["stride"], op["padding"], op["dilation"])  # (N, C, OH, OW, kh, kw)
        n, c, oh, ow = win.shape[:4]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, c * kh * kw)  # K over (channel, row, column)
        w = weight.reshape(cout, -1)
        out_shape = (n, oh, ow, cout)
    k_group = w.shape[1]
    per_group = cout // groups
    group_of = np.arange(cout) // per_group
    in_order = product is not None or (op.get("accumulator") or {}).get("overflow") == "saturate"
    if not in_order:
        acc = np.stack([cols[..., g * k_group:(g + 1) * k_group] @ w[group_of == g].T for g in range(groups)], axis=-1)
        acc = acc.reshape(cols.shape[0], cols.shape[1], per_group, groups).transpose(0, 1, 3, 2).reshape(cols.shape[0], cols.shape[1], cout)
        if op.get("accumulator"):  # a wrapping accumulator is order-independent: wrap the exact sum
            acc = overflow(acc, op["accumulator"]["total_bits"], "wrap")
    else:  # in order: each product rounded, each add overflowed
        acc = np.zeros(cols.shape[:2] + (cout,), dtype=np.int64)
        a_for = np.stack([cols[..., g * k_group:(g + 1) * k_group] for g in group_of], axis=-1)  # (N, P, Kg, Cout)
        for k in range(k_group):
            p = a_for[:, :, k, :] * w[:, k]
            if product is not None:
                p = overflow(shift_round(p, drop, product["rounding"]), product["total_bits"], "saturate")
            acc = acc + p
            if op.get("accumulator"):
                acc = overflow(acc, op["accumulator"]["total_bits"], op["accumulator"]["overflow"])
    acc = acc.reshape(out_shape)
    if op["kind"] == "conv":
        acc = acc.transpose(0, 3, 1, 2)  # NCHW
    view = (1, -1) if op["kind"] == "linear" else (1, -1, 1, 1)
    if bias is not None:
        b_frac = fmts["bias"]["frac_bits"]
        sum_frac = np.maximum(acc_frac, b_frac)
        v = np.left_shift(acc, (sum_frac - acc_frac).reshape(view)) + np.left_shift(bias.reshape(view), (sum_frac - b_frac).reshape(view))
    else:
        sum_frac, v = acc_frac, acc
    return write_register(v, (sum_frac - out_fmt["frac_bits"]).reshape(view), out_fmt, op.get("clamp"))


def op_add(op: dict, a: np.ndarray, b: np.ndarray, fmts: dict) -> np.ndarray:
    """Residual add: both operands aligned to the finer F exactly, summed, one rounding."""
    fa, fb, out = fmts["inputs"][0]["frac_bits"], fmts["inputs"][1]["frac_bits"], fmts["output"]
    f = max(fa, fb)
    return write_register(np.left_shift(a, f - fa) + np.left_shift(b, f - fb), f - out["frac_bits"], out, op.get("clamp"))


def op_concat(op: dict, parts: list[np.ndarray], fmts: dict) -> np.ndarray:
    """Concatenation: each input rounded into the one output format."""
    out = fmts["output"]
    return np.concatenate([write_register(p, f["frac_bits"] - out["frac_bits"], out, op.get("clamp")) for p, f in zip(parts, fmts["inputs"])], axis=op["dim"])


def op_avgpool(op: dict, x: np.ndarray, fmts: dict) -> np.ndarray:
    """Average pooling: the window sum exact, the division by the window size (torch's divisor) a rounding point."""
    f_in, out = fmts["inputs"][0]["frac_bits"], fmts["output"]
    n, c, h, w = x.shape
    if "output_size" in op:
        oh, ow = op["output_size"]
        rows = [(i * h // oh, -(-(i + 1) * h // oh)) for i in range(oh)]
        cols = [(j * w // ow, -(-(j + 1) * w // ow)) for j in range(ow)]
        sums = np.array([[x[:, :, r0:r1, c0:c1].sum((2, 3)) for c0, c1 in cols] for r0, r1 in rows]).transpose(2, 3, 0, 1)
        counts = np.array([[(r1 - r0) * (c1 - c0) for c0, c1 in cols] for r0, r1 in rows])
    else:
        (kh, kw), (sh, sw), (ph, pw) = op["kernel_size"], op["stride"], op["padding"]
        span = lambda size, k, s, p: (-(-(size + 2 * p - k) // s) if op["ceil_mode"] else (size + 2 * p - k) // s) + 1  # noqa: E731
        oh, ow = span(h, kh, sh, ph), span(w, kw, sw, pw)
        if op["ceil_mode"]:  # the last window must start inside the input or its left padding
            oh -= int((oh - 1) * sh >= h + ph)
            ow -= int((ow - 1) * sw >= w + pw)
        sums = np.zeros((n, c, oh, ow), dtype=np.int64)
        counts = np.zeros((oh, ow), dtype=np.int64)
        for i in range(oh):
            for j in range(ow):
                r0, c0 = i * sh - ph, j * sw - pw
                r1, c1 = min(r0 + kh, h + ph), min(c0 + kw, w + pw)
                counts[i, j] = (r1 - r0) * (c1 - c0) if op["count_include_pad"] else (min(r1, h) - max(r0, 0)) * (min(c1, w) - max(c0, 0))
                sums[:, :, i, j] = x[:, :, max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)].sum((2, 3))
    shift = out["frac_bits"] - f_in
    k = divide_round(np.left_shift(sums, max(shift, 0)), np.left_shift(counts, max(-shift, 0)), out["rounding"])
    k = overflow(k, out["total_bits"], out["overflow"])
    return np.clip(k, *op["clamp"]) if op.get("clamp") is not None else k


def op_clamp(op: dict, x: np.ndarray) -> np.ndarray:
    """ReLU6 / Hardtanh kept as an operation: the codes clipped to the clamp constants on the grid."""
    return np.clip(x, *op["clamp"])


def op_relu(op: dict, x: np.ndarray) -> np.ndarray:
    """A ReLU kept as an operation (its register has other readers): negative codes become 0."""
    return np.maximum(x, 0)


def op_maxpool(op: dict, x: np.ndarray) -> np.ndarray:
    """Max pooling on codes (exact on the grid); padding never wins."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op["kernel_size"], op["stride"], op["padding"], op["dilation"]
    n, c, h, w = x.shape
    extra_h = extra_w = 0
    if op["ceil_mode"]:
        out_h = -(-(h + 2 * ph - dh * (kh - 1) - 1) // sh) + 1
        out_w = -(-(w + 2 * pw - dw * (kw - 1) - 1) // sw) + 1
        out_h -= int((out_h - 1) * sh >= h + ph)
        out_w -= int((out_w - 1) * sw >= w + pw)
        extra_h = max(0, (out_h - 1) * sh + dh * (kh - 1) + 1 - (h + 2 * ph))
        extra_w = max(0, (out_w - 1) * sw + dw * (kw - 1) + 1 - (w + 2 * pw))
    lowest = np.iinfo(np.int64).min
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w)), constant_values=lowest)
    return _windows(padded, kh, kw, (sh, sw), (0, 0), (dh, dw)).max(axis=(4, 5))


def op_reshape(op: dict, x: np.ndarray) -> np.ndarray:
    return x.reshape(op["shape"])


def op_pad(op: dict, x: np.ndarray) -> np.ndarray:
    """Zero padding (code 0 in any format), torch's F.pad order: last dimension first, (before, after) pairs."""
    pad = op["pad"]
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return np.pad(x, widths)


def op_slice(op: dict, x: np.ndarray) -> np.ndarray:
    return x[tuple(slice(*s) for s in op["slices"])]


# ---------------------------------------------------------------------------
# Reading the folder and checking every operation.
# ---------------------------------------------------------------------------


class Export:
    """An export folder: its manifest and its tensors, checked as they are read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ReplayError(f"{self.folder} is not a folder; give the folder python -m fxpsweep.export wrote")
        path = self.folder / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise ReplayError(f"{path} is missing; this is not an export folder") from None
        except json.JSONDecodeError as err:
            raise ReplayError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); the export is damaged") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ReplayError(
                f"{path}: format {self.manifest.get('format')!r} version {self.manifest.get('version')!r}; "
                f"this replay reads {FORMAT!r} version {VERSION}"
            )
        self.cache: dict[str, np.ndarray] = {}

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.cache:
            info = self.manifest["tensors"].get(name)
            if info is None:
                raise ReplayError(f"manifest.json: tensor {name!r} is used but not listed under 'tensors'")
            path = self.folder / f"{info['file']}.npy"
            try:
                array = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                raise ReplayError(f"{path} is missing") from None
            except (ValueError, OSError, EOFError) as err:
                raise ReplayError(f"{path} is truncated or not a .npy file ({err})") from None
            if list(array.shape) != info["shape"]:
                raise ReplayError(f"{path}: shape {list(array.shape)}, the manifest says {info['shape']}")
            self.cache[name] = array if array.dtype.kind == "f" else array.astype(np.int64)
        return self.cache[name]

    def check_mem(self, name: str) -> None:
        """The ``.mem`` file of ``name`` holds the same codes as its ``.npy``, as W-bit two's-complement hex words."""
        info = self.manifest["tensors"][name]
        path = self.folder / f"{info['file']}.mem"
        if not path.exists():
            raise ReplayError(f"{path} is missing")
        words = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("//")]
        codes = self.tensor(name).reshape(-1)
        if len(words) != codes.size:
            raise ReplayError(f"{path} has {len(words)} words, the tensor {codes.size}: truncated or damaged")
        bits = info["format"]["total_bits"]
        try:
            values = np.array([int(w, 16) for w in words], dtype=np.int64)
        except ValueError:
            raise ReplayError(f"{path}: a line is not a hex word") from None
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
        bad = np.flatnonzero(values != codes)
        if bad.size:
            raise ReplayError(f"{path}: word {bad[0]} is {values[bad[0]]}, the .npy has {codes[bad[0]]}")

    def fmt(self, name: str) -> dict:
        return self.manifest["tensors"][name]["format"]


def replay_operation(export: Export, op: dict) -> np.ndarray:
    """The output codes of ``op`` recomputed from the exported inputs."""
    kind = op["kind"]
    inputs = [export.tensor(name) for name in op["inputs"]]
    out_fmt = export.fmt(op["output"])
    if kind == "input":
        return op_input(op, inputs[0], out_fmt)
    if kind in ("conv", "linear"):
        fmts = {"input": export.fmt(op["inputs"][0]), "weight": export.fmt(op["weight"]), "output": out_fmt}
        bias = None
        if op["bias"] is not None:
            fmts["bias"], bias = export.fmt(op["bias"]), export.tensor(op["bias"])
        return op_dot(op, inputs[0], export.tensor(op["weight"]), bias, fmts)
    fmts = {"inputs": [export.fmt(name) for name in op["inputs"]], "output": out_fmt}
    if kind == "add":
        return op_add(op, inputs[0], inputs[1], fmts)
    if kind == "concat":
        return op_concat(op, inputs, fmts)
    if kind == "avgpool":
        return op_avgpool(op, inputs[0], fmts)
    operations = {"clamp": op_clamp, "relu": op_relu, "maxpool": op_maxpool, "reshape": op_reshape, "pad": op_pad, "slice": op_slice}
    if kind not in operations:
        raise ReplayError(f"manifest.json: operation {op['name']!r} has kind {kind!r}, which this replay does not know")
    return operations[kind](op, inputs[0])


def replay(folder: Path, out=sys.stdout) -> int:
    """Check every operation and file of an export; returns 0 if all match, 1 otherwise."""
    export = Export(folder)
    operations = export.manifest["operations"]
    for i, op in enumerate(operations, 1):
        expected = export.tensor(op["output"])
        got = replay_operation(export, op)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            if got.shape != expected.shape:
                print(f"operation {op['name']} ({op['kind']}): shape {list(got.shape)}, exported {list(expected.shape)}", file=out)
            else:
                index = tuple(int(j) for j in np.argwhere(got != expected)[0])
                print(f"operation {op['name']} ({op['kind']}): first difference at index {list(index)}: "
                      f"exported code {int(expected[index])}, replay gives {int(got[index])}", file=out)
            print(f"{i - 1}/{len(operations)} operations match before it", file=out)
            return 1
    for name, info in export.manifest["tensors"].items():
        if "format" in info:
            export.check_mem(name)
    logits = export.manifest["logits"]
    values = np.load(export.folder / logits["values"])
    codes = export.tensor(logits["codes"])
    frac = export.fmt(logits["codes"])["frac_bits"]
    if not np.array_equal(values, codes.astype(np.float64) * 2.0**-frac):
        print("logits_values.npy is not the logits' codes times 2**-F", file=out)
        return 1
    top = np.load(export.folder / logits["top5"])
    ranked = np.argsort(-codes, axis=1, kind="stable")[:, : top.shape[1]]  # equal codes: the lower class first
    if not np.array_equal(top, ranked):
        print("top5.npy does not rank the logits' codes (best first, ties by class index)", file=out)
        return 1
    print(f"{len(operations)}/{len(operations)} operations match", file=out)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Recompute exported golden vectors with numpy and check them.")
    parser.add_argument("folder", type=Path, help="a folder written by python -m fxpsweep.export")
    args = parser.parse_args(argv)
    try:
        sys.exit(replay(args.folder))
    except ReplayError as err:
        sys.exit(f"replay: error: {err}")
