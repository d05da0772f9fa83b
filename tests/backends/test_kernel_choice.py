"""Kernels are chosen by timing them on the machine, remembered per machine and layer, and never
chosen when they disagree with the others; a setting forces one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from fxpsweep.backends import kernel_choice
from fxpsweep.engine import ops
from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.backends.kernel_choice import KernelChooser
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import FixedDot
from fxpsweep.engine.settings import QuantSettings


def conv_layer(bits: int = 12, rounding: str = "nearest_even") -> FixedDot:
    torch.manual_seed(0)
    op = FixedDot("conv", nn.Conv2d(16, 16, 3, padding=1))
    op.set_parameter_formats([QFormat(bits, 10)] * 16, QFormat(32, 20))
    op.finalize(QFormat(bits, 2, rounding), [QFormat(bits, 4)], QuantSettings(bits, bits, rounding=rounding), 0)
    return op


def codes(bits: int = 12) -> torch.Tensor:
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (4, 16, 12, 12)).float()


def test_the_choice_is_cached_in_the_cache_folder_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    op = conv_layer()
    assert len(op.candidates) > 1
    op.chooser = KernelChooser(tmp_path)
    op(codes())
    (cache_file,) = (tmp_path / "kernels").glob("*.json")
    record = json.loads(cache_file.read_text())
    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    (choice,) = record["choices"].values()
    assert choice["kernel"] == op.kernel and set(choice["seconds"]) == {k.label for k in op.candidates}

    # A new process (memory cleared) with the same layer reads the file and times nothing.
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    monkeypatch.setattr(KernelChooser, "_time", lambda *a: (_ for _ in ()).throw(AssertionError("timed again")))
    again = conv_layer()
    again.chooser = KernelChooser(tmp_path)
    again(codes())
    assert again.kernel == op.kernel


def test_a_processor_of_the_same_name_with_other_instruction_sets_is_another_machine(tmp_path, monkeypatch) -> None:
    # Cloud VMs of one model name ("Intel(R) Xeon(R) Processor") differ in AMX; a cluster may share cache_dir.
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(kernel_choice, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    timed = []
    real_time = KernelChooser._time
    monkeypatch.setattr(KernelChooser, "_time", lambda self, *a: timed.append(1) or real_time(self, *a))
    files = []
    for flags in ("fpu avx2 avx512f avx512_vnni smep", "fpu avx2 avx512f avx512_vnni amx_int8 amx_tile smep"):
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {flags}\n")
        kernel_choice._cpuinfo.cache_clear()
        monkeypatch.setattr(kernel_choice, "_in_memory", {})
        op = conv_layer()
        op.chooser = KernelChooser(tmp_path / "cache")
        op(codes())
        files.append(sorted((tmp_path / "cache" / "kernels").glob("*.json")))
    kernel_choice._cpuinfo.cache_clear()
    assert len(timed) == 2 and len(files[0]) == 1 and len(files[1]) == 2  # timed again, into a file of its own
    machines = {json.loads(f.read_text())["machine"]["processor"] for f in files[1]}
    assert machines == {"Intel(R) Xeon(R) Processor"}
    features = sorted(json.loads(f.read_text())["machine"]["cpu_features"] for f in files[1])
    assert features == [["amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx512f"], ["avx2", "avx512_vnni", "avx512f"]]


def test_instruction_set_caps_make_another_machine(monkeypatch) -> None:
    # Under ONEDNN_MAX_CPU_ISA=AVX2 (bench/throughput.py --isa-cap avx2) oneDNN's int8 kernels are other kernels.
    for name in kernel_choice.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    plain = kernel_choice.machine(torch.device("cpu"))
    assert "isa_caps" not in plain  # the key of an uncapped machine is what it was before caps were keyed
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = kernel_choice.machine(torch.device("cpu"))
    assert capped["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert kernel_choice._digest(capped) != kernel_choice._digest(plain)


def test_a_kernel_that_disagrees_is_never_chosen(monkeypatch, caplog) -> None:
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    op = conv_layer()
    wrong = next(k for k in op.candidates if k.name != "float64")
    fast_and_wrong = type("Wrong", (type(wrong),), {"__call__": lambda self, x: torch.zeros(1)})
    wrong.__class__ = fast_and_wrong
    op(codes())
    assert op.kernel != wrong.label
    assert "disagrees" in caplog.text


def test_fast_modes_kernels_may_differ_beyond_the_bound_and_are_timed_without_complaint(tmp_path, monkeypatch, caplog) -> None:
    # arithmetic=fast runs float32 or (8-bit words) oneDNN's int8 in one call, exact only below 2**24: where
    # partial sums pass it the two differ, which fast mode allows; neither is a bug to log and drop.
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    torch.manual_seed(0)
    conv = nn.Conv2d(512, 8, 3, padding=1)
    with torch.no_grad():
        # Codes 32..63: one weight digit on every processor (7-bit digits without VNNI), every product adds,
        # 4608 of them per output.
        conv.weight.uniform_(0.25, 63 / 128)
    op = FixedDot("conv", conv)
    op.set_parameter_formats([QFormat(8, 7)] * 8, QFormat(32, 20))
    op.finalize(QFormat(8, -8), [QFormat(8, 0)], QuantSettings(8, 8, arithmetic="fast"), 0)
    assert sorted(k.name for k in op.candidates) == ["float32", "onednn_int8"]
    inputs = torch.randint(60, 128, (2, 512, 14, 14)).float()
    float32, int8 = sorted(op.candidates, key=lambda k: k.name)
    assert not torch.equal(float32(inputs).double(), int8(inputs).double())  # sums to 3.7e7: float32's are rounded
    op.chooser = KernelChooser(tmp_path)
    op(inputs)
    assert "disagrees" not in caplog.text
    (cache_file,) = (tmp_path / "kernels").glob("*.json")
    (choice,) = json.loads(cache_file.read_text())["choices"].values()
    assert set(choice["seconds"]) == {"float32", "onednn_int8"}  # both timed, either may be chosen


def test_a_forced_kernel_runs_where_it_is_exact_and_is_reported() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    net = QuantizedNetwork(model, QuantSettings(8, 8, kernel="float64"))
    net.calibrate([torch.randn(4, 3, 8, 8)])
    net(torch.randn(4, 3, 8, 8))
    dots = [f for f in net.formats() if f.kind == "activation" and f.kernel]
    assert len(dots) == 2 and {f.kernel for f in dots} == {"float64"}


def test_a_kernel_wrong_only_on_extreme_codes_is_never_chosen(monkeypatch, caplog) -> None:
    # Like oneDNN's int16 pair sums without VNNI: right on ordinary inputs, off where sums grow large.
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    op = conv_layer()
    wrong = next(k for k in op.candidates if k.name != "float64")
    right = type(wrong).__call__

    def saturating(self, x: torch.Tensor) -> torch.Tensor:
        return right(self, x) if x.abs().max() < 2**11 - 1 else right(self, x) + 1

    wrong.__class__ = type("WrongOnExtremes", (type(wrong),), {"__call__": saturating})
    ordinary = torch.randint(-100, 100, (4, 16, 12, 12)).float()
    op(ordinary)
    assert op.kernel != wrong.label
    assert "disagrees" in caplog.text


def test_stochastic_rounding_draws_the_same_whether_the_kernels_were_timed_or_not(monkeypatch) -> None:
    # Kernels are timed with the rounding of their result, except a stochastic one: its draws
    # would advance the generator, so the codes would depend on the state of the cache.
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    x = codes()
    timed = conv_layer(rounding="stochastic")
    assert len(timed.candidates) > 1
    first = timed(x)
    second = conv_layer(rounding="stochastic")(x)  # the choice from memory, nothing timed
    assert torch.equal(first, second)


def test_every_candidate_is_timed_on_the_whole_batch_in_its_own_slices(monkeypatch) -> None:
    # A kernel timed on fewer images than it runs would hide what its slices cost.
    monkeypatch.setattr(kernel_choice, "_in_memory", {})
    monkeypatch.setattr(ops, "SCRATCH_FLOOR", 0)  # slices even on this small layer
    op = conv_layer(bits=16)
    batch = codes(16)
    assert any(op._slice_size(k, batch) < len(batch) for k in op.candidates)
    timed: list[tuple[str, int]] = []  # (kernel, images) of every timed call
    slices: dict[str, list[int]] = {}  # kernel -> images of each call of it while it was timed
    real_timed, real_rounded = kernel_choice._timed, op._rounded

    def timing(kernel, batch_codes, finish=None):
        timed.append((kernel.label, len(batch_codes)))
        slices[kernel.label] = []
        return real_timed(kernel, batch_codes, finish)

    monkeypatch.setattr(kernel_choice, "_timed", timing)
    monkeypatch.setattr(op, "_rounded", lambda k, c: slices.get(k.label, []).append(len(c)) or real_rounded(k, c))
    op(batch)
    assert {label for label, _ in timed} == {k.label for k in op.candidates}
    assert all(images == len(batch) for _, images in timed)
    for kernel in op.candidates:  # the last timed call of each, in its slices
        step = op._slice_size(kernel, batch)
        assert slices[kernel.label][: -(-len(batch) // step)] == [min(step, len(batch) - i) for i in range(0, len(batch), step)]


def test_a_small_output_holds_temporaries_within_the_floor() -> None:
    # A small output's kernel may hold SCRATCH_FLOOR bytes of temporaries (more than SCRATCH_BUDGET per
    # output element would give it), no more, in as few slices as that takes.
    op = conv_layer(bits=16)
    batch = torch.zeros(64, 16, 32, 32)
    outputs = 64 * 16 * 32 * 32
    allowed = max(ops.SCRATCH_BUDGET * outputs, ops.SCRATCH_FLOOR)
    assert max(k.scratch for k in op.candidates) * outputs > allowed  # some kernel must slice
    for kernel in op.candidates:
        step = op._slice_size(kernel, batch)
        assert kernel.scratch * outputs * step / len(batch) <= allowed
        assert -(-len(batch) // step) == max(1, math.ceil(kernel.scratch * outputs / allowed))  # as few slices as that allows
