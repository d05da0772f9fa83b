"""Export a bit-exact run of the fixed-point network as integer test vectors (see ``replay`` for the contract).

The folder holds ``manifest.json`` (format version, model, dataset,
settings, image indices, every operation in execution order with its kind,
inputs, output, geometry and formats) and, per tensor, its integer codes as
``NAME.npy`` and as ``NAME.mem`` for Verilog's ``$readmemh``: one ``W``-bit
two's-complement word per line, ``ceil(W/4)`` hex digits, after a comment
header with the shape, order and format. The float images are ``image.npy``;
the logits are also ``logits_values.npy`` (real values) and ``top5.npy``
(classes, best first, equal logits by class index). The folder is written
beside its destination and renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import operator
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import Dequantize, FixedAdd, FixedAvgPool, FixedCat, FixedClamp, FixedDot, FixedInput, FixedOp
from fxpsweep.core.errors import ConfigError
from fxpsweep.core.storage import temporary_folder_beside
from fxpsweep.engine.evaluate import ranked_classes

FORMAT = "fxpsweep-golden-vectors"
VERSION = 1
LAYOUTS = {1: "N", 2: "NC", 3: "NCL", 4: "NCHW"}


class _Recorder(torch.fx.Interpreter):
    """Runs the network's graph and keeps every node's value."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        # A copy: an in-place ReLU later in the graph would otherwise change what this node wrote.
        self.values[n] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


def format_record(fmt: QFormat) -> dict[str, Any]:
    return {"total_bits": fmt.total_bits, "frac_bits": fmt.frac_bits, "rounding": fmt.rounding, "overflow": fmt.overflow}


def int_dtype(total_bits: int) -> np.dtype:
    """The narrowest numpy integer that holds codes of ``total_bits``."""
    return np.dtype(np.int8 if total_bits <= 8 else np.int16 if total_bits <= 16 else np.int32 if total_bits <= 32 else np.int64)


def mem_text(name: str, codes: np.ndarray, fmt: dict[str, Any], layout: str) -> str:
    """``codes`` as a ``$readmemh`` file: a comment header, then one two's-complement word per line."""
    bits = fmt["total_bits"]
    digits = math.ceil(bits / 4)
    frac = fmt.get("frac_bits")
    scale = f"value = code * 2^{-frac}" if frac is not None else "fractional bits per output channel: see manifest.json"
    header = [
        f"// fxpsweep golden vectors, format version {VERSION}: tensor {name}",
        f"// shape {list(codes.shape)} {layout}, row-major (the last index changes fastest): {codes.size} words",
        f"// {bits}-bit two's complement, {scale}; {fmt['rounding']}, {fmt['overflow']}",
        f"// one word per line, {digits} hex digits (a negative code k is written as k + 2^{bits})",
    ]
    words = np.mod(codes.reshape(-1).astype(np.int64), 1 << bits)
    # Hex digits as ASCII, most significant first, and a newline per word: built with array operations.
    nibbles = (words[:, None] >> (4 * np.arange(digits - 1, -1, -1))) & 15
    text = np.empty((words.size, digits + 1), dtype=np.uint8)
    text[:, :digits] = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    text[:, digits] = ord("\n")
    return "\n".join(header) + "\n" + text.tobytes().decode("ascii")


class _Writer:
    """Collects the tensors and operations of one export into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tensors: dict[str, dict[str, Any]] = {}

    def codes(self, name: str, codes: torch.Tensor | np.ndarray, fmt: dict[str, Any], kind: str, layout: str | None = None) -> str:
        array = np.asarray(codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else codes)
        if not np.array_equal(array, np.round(array)):
            raise RuntimeError(f"{name}: not integer codes")
        array = array.astype(np.int64).astype(int_dtype(fmt["total_bits"]))
        layout = layout or LAYOUTS.get(array.ndim, "")
        file = _file_name(name)
        np.save(self.folder / f"{file}.npy", array)
        (self.folder / f"{file}.mem").write_text(mem_text(name, array, fmt, layout))
        self.tensors[name] = {"file": file, "kind": kind, "shape": list(array.shape), "layout": layout, "dtype": str(array.dtype), "format": fmt}
        return name

    def floats(self, name: str, values: torch.Tensor, kind: str) -> str:
        array = values.detach().cpu().numpy()
        file = _file_name(name)
        np.save(self.folder / f"{file}.npy", array)
        self.tensors[name] = {"file": file, "kind": kind, "shape": list(array.shape), "layout": LAYOUTS.get(array.ndim, ""), "dtype": str(array.dtype)}
        return name


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _tensor_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "placeholder":
        return "image"
    if node.op == "call_module":
        module = modules[node.target]
        return module.name if isinstance(module, FixedOp) else str(node.target)
    return node.name


def check_destination(out: Path, rounding: str) -> None:
    """Raise ConfigError where an export into the new folder ``out`` cannot be written, or would hold codes
    that no rerun gives (stochastic rounding); the command calls it before any work."""
    if rounding == "stochastic":
        raise ConfigError("rounding=stochastic draws random numbers that golden vectors cannot hold; choose a deterministic rounding")
    if out.exists():
        raise ConfigError(f"export.out={out} exists; choose a new folder (an export is never written over another)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"export.out={out}: its folder cannot be made ({err.strerror}); choose a folder you can write to") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"export.out={out}: {out.parent} cannot be written; choose a folder you can write to")


def export(network: QuantizedNetwork, images: torch.Tensor, out: Path, about: dict[str, Any], layers: str | None = None) -> dict[str, Any]:
    """Run ``network`` (calibrated) on ``images`` and write the golden vectors into ``out``; returns the manifest.

    ``layers``: a glob over operation names; only the matching operations are
    exported (with the tensors they read). ``about``: what the manifest
    records of the run (model, dataset, settings, image indices).
    """
    out = Path(out)
    check_destination(out, network.settings.rounding)
    gm = network.graph_module
    modules = dict(gm.named_modules())
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(images.to(next(gm.parameters(), torch.zeros(0)).device))
    values = recorder.values

    names: dict[torch.fx.Node, str] = {}
    formats: dict[str, dict[str, Any]] = {}  # tensor name -> format of its codes
    operations: list[dict[str, Any]] = []
    for node in gm.graph.nodes:
        entry = _operation(node, modules, names, formats, values)
        if entry is not None:
            operations.append(entry)
    if layers is not None:
        chosen = [op for op in operations if fnmatch.fnmatchcase(op["name"], layers)]
        if not chosen:
            close = difflib.get_close_matches(layers, [op["name"] for op in operations], n=5, cutoff=0.3)
            raise ConfigError(f"export.layers={layers!r} matches no operation; closest: {', '.join(close) or ', '.join(op['name'] for op in operations[:5])}")
        operations = chosen

    tmp = temporary_folder_beside(out)
    try:
        writer = _Writer(tmp)
        by_name: dict[str, torch.fx.Node] = {}
        for node, name in names.items():  # graph order: the first node of a name computes it, the rest alias it
            by_name.setdefault(name, node)
        needed = {t for op in operations for t in (*op["inputs"], op["output"])}
        for name in sorted(needed, key=lambda t: list(names.values()).index(t)):
            value = values[by_name[name]]
            if name == "image":
                writer.floats(name, value, "image")
            else:
                writer.codes(name, value, formats[name], "activation")
        for op in operations:
            node = by_name[op["output"]]
            module = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, FixedDot):
                _write_parameters(writer, module, op)
        logits_node = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], Dequantize))
        logits_name = names[logits_node.args[0]]
        logits = values[logits_node.args[0]].detach().cpu()
        writer.codes("logits", logits, formats[logits_name], "logits")
        np.save(tmp / "logits_values.npy", values[logits_node].detach().cpu().double().numpy())
        top5 = ranked_classes(values[logits_node].detach().cpu(), min(5, logits.shape[1]))
        np.save(tmp / "top5.npy", top5.numpy())
        manifest = {
            "format": FORMAT, "version": VERSION, **about,
            "images": {**about.get("images", {}), "count": len(images)},
            "operations": operations, "tensors": writer.tensors,
            "logits": {"register": logits_name, "codes": "logits", "values": "logits_values.npy", "top5": "top5.npy"},
            "layers": layers,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out)  # the folder appears whole, or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_parameters(writer: _Writer, op: FixedDot, entry: dict[str, Any]) -> None:
    """The weight and bias codes of a conv/linear layer, with their formats."""
    fracs = [f.frac_bits for f in op.weight_fmts]
    w = op.weight_fmts[0]
    weight_fmt = format_record(w) | ({"frac_bits": None, "frac_bits_per_channel": fracs} if len(set(fracs)) > 1 else {})
    writer.codes(entry["weight"], op.weight_codes(), weight_fmt, "weight", "OI" if op.geometry.is_linear else "OIHW")
    if entry["bias"] is not None:
        writer.codes(entry["bias"], op.bias_codes(), format_record(op.bias_fmt), "bias", "O")


def _operation(node: torch.fx.Node, modules: dict[str, nn.Module], names: dict, formats: dict, values: dict) -> dict[str, Any] | None:
    """The manifest entry of one graph node (None for nodes that compute no tensor of values)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    inputs = [n for n in node.all_input_nodes if n in names]
    if node.op == "placeholder":
        names[node] = "image"
        return None
    if node.op == "output" or isinstance(module, Dequantize):
        return None
    name = _tensor_name(node, modules)
    if isinstance(module, FixedOp):
        names[node] = name
        formats[name] = format_record(module.out_fmt)
        return _fixed_entry(module, name, [names[n] for n in inputs])
    kind, extra = _exact_kind(node, module, values.get(node))
    if kind is None:
        return None  # sizes and other values that are not tensors
    if kind == "alias":
        names[node] = names[inputs[0]]
        return None
    names[node] = name
    formats[name] = formats[names[inputs[0]]]  # exact on the grid: the input's codes and format
    return {"name": name, "kind": kind, "inputs": [names[inputs[0]]], "output": name, **extra}


def _fixed_entry(op: FixedOp, name: str, inputs: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "inputs": inputs, "output": name}
    clamp = list(op.clamp_codes()) if op.read_clamp is not None else None
    if isinstance(op, FixedInput):
        entry.update(kind="input", inputs=["image"])
    elif isinstance(op, FixedDot):
        g = op.geometry
        entry.update(kind="linear" if g.is_linear else "conv", weight=f"{name}.weight", bias=f"{name}.bias" if op.bias_fmt is not None else None)
        if not g.is_linear:
            entry.update(stride=list(g.stride), padding=list(g.padding), dilation=list(g.dilation), groups=g.groups)
        entry["accumulator"] = {"total_bits": op.acc_fmt.total_bits, "overflow": op.acc_fmt.overflow} if op.acc_fmt else None
        entry["product"] = (
            {"total_bits": op.product_fmt.total_bits, "drop": -op.product_shift, "rounding": op.product_fmt.rounding}
            if op.product_fmt else None
        )
    elif isinstance(op, FixedAdd):
        entry.update(kind="add")
    elif isinstance(op, FixedCat):
        entry.update(kind="concat", dim=op.dim)
    elif isinstance(op, FixedAvgPool):
        if op.output_size is not None:
            size = op.output_size if isinstance(op.output_size, (tuple, list)) else (op.output_size, op.output_size)
            entry.update(kind="avgpool", output_size=list(size))
        else:
            a = op.pool_args
            pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
            entry.update(kind="avgpool", kernel_size=pair(a["kernel_size"]), stride=pair(a["stride"] or a["kernel_size"]),
                         padding=pair(a["padding"]), ceil_mode=bool(a["ceil_mode"]), count_include_pad=bool(a["count_include_pad"]))
    elif isinstance(op, FixedClamp):
        entry.update(kind="clamp")
    entry["clamp"] = clamp
    return entry


def _exact_kind(node: torch.fx.Node, module: nn.Module | None, value: Any) -> tuple[str | None, dict[str, Any]]:
    """(kind, geometry) of an operation that is exact on the grid, ``alias`` for one that changes nothing."""
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return "alias", {}
    if isinstance(module, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
        node.op == "call_method" and node.target in ("relu", "relu_")
    ):
        return "relu", {}  # a ReLU not fused into a register (its register has other readers)
    if isinstance(module, nn.MaxPool2d) or (node.op == "call_function" and node.target is F.max_pool2d):
        p = module if module is not None else _pool_args(node)
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
        stride = p.stride if p.stride else p.kernel_size
        return "maxpool", {"kernel_size": pair(p.kernel_size), "stride": pair(stride), "padding": pair(p.padding),
                           "dilation": pair(p.dilation), "ceil_mode": bool(p.ceil_mode)}
    if isinstance(module, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target in ("view", "reshape", "flatten")
    ):
        return "reshape", {"shape": list(value.shape)}
    if node.op == "call_method" and node.target == "contiguous":
        return "alias", {}
    if node.op == "call_function" and node.target is F.dropout:
        return "alias", {}
    if node.op == "call_function" and node.target is F.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        return "pad", {"pad": list(pad)}
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        if not isinstance(index, tuple) or not all(isinstance(s, slice) for s in index):
            raise ConfigError(f"operation {node.name}: indexing {index!r} cannot be exported; only slices")
        return "slice", {"slices": [[s.start, s.stop, s.step] for s in index]}
    if node.op == "call_function" and node.target is getattr or (node.op == "call_method" and node.target in ("size", "dim")):
        return None, {}
    raise ConfigError(f"operation {node.name} ({node.target}) cannot be exported yet")


class _PoolArgs:
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False) -> None:
        self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode = kernel_size, stride, padding, dilation, ceil_mode


def _pool_args(node: torch.fx.Node) -> _PoolArgs:
    return _PoolArgs(*node.args[1:], **node.kwargs)
