"""tools.common.peak: FLOPs of a SwinUNETR window, and the peaks of this project's machine kinds."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from tools.common.peak import cpu_peak, device_peak, gpu_peak, limit, network_flops, peak_precision

# `lscpu` (C locale) of the project's two CPU machine kinds, the fields the peak reads.
LSCPU_AMX = """Architecture:                            x86_64
CPU(s):                                  2
Vendor ID:                               GenuineIntel
Model name:                              Intel(R) Xeon(R) Processor
Thread(s) per core:                      1
Core(s) per socket:                      2
Socket(s):                               1
BogoMIPS:                                5200.00
Flags:                                   fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
"""
CPUINFO_AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\ncpu MHz\t\t: 2600.000\n"

LSCPU_EPYC = """Architecture:                            x86_64
CPU(s):                                  4
Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC 7B13
Thread(s) per core:                      2
Core(s) per socket:                      2
Socket(s):                               1
CPU max MHz:                             3000.0000
BogoMIPS:                                4900.00
Flags:                                   fpu sse sse2 avx fma avx2 bmi2
"""


def _swin(feature_size: int) -> torch.nn.Module:
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size, use_flash_attention=True).eval()


def test_flops_of_a_tiny_swinunetr_window_are_positive_and_scale_with_the_roi():
    net = _swin(12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small, large = network_flops(net, (1, 1, 64, 64, 64)), network_flops(net, (1, 1, 96, 96, 96))
    assert small > 1e9  # ~14 GFLOP: convolutions, matrix products and attention of a 64^3 window
    # mostly convolutions, linear in the voxels (3.375x); windowed attention pads, so a little less
    assert 2.8 < large / small < 3.5
    assert network_flops(net, (2, 1, 64, 64, 64)) == 2 * small  # per window: linear in the batch
    # forward + backward costs about 3 forwards (2 for the gradients of inputs and weights)
    assert 2.5 < network_flops(net.train(), (1, 1, 64, 64, 64), backward=True) / small < 3.5
    # counted on a meta copy: the network keeps its weights and device
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # feature size doubles: channel products, so about 4x
    assert 3.0 < network_flops(_swin(24).eval(), (1, 1, 64, 64, 64)) / small < 4.5


def test_network_flops_reads_a_tuple_output_and_looks_through_ddp_like_wrappers():
    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.a(x), {"b": self.b(x)}

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    forward = network_flops(Wrapper(Heads()), (3, 8))
    assert forward == 2 * 3 * 8 * (4 + 2)
    # backward: gradients of the weights (and not of the input, which needs none)
    assert network_flops(Heads(), (3, 8), backward=True) == 2 * forward


def test_cpu_peak_of_the_amx_machine():
    peak = cpu_peak(LSCPU_AMX, CPUINFO_AMX, usable_cpus=2)
    assert peak["isa"] == "AVX-512" and peak["cores"] == 2 and peak["clock_ghz"] == pytest.approx(2.6)
    assert peak["peak_flops"]["float32"] == pytest.approx(2 * 2.6e9 * 64)  # 2 FMA x 16 lanes x 2
    assert peak["peak_flops"]["bfloat16"] == pytest.approx(2 * 2.6e9 * 1024)  # AMX tiles
    assert "AMX" in peak["assumption"] and "cpu MHz" in peak["assumption"]
    without_amx = cpu_peak(LSCPU_AMX.replace(" amx_bf16 amx_tile", ""), CPUINFO_AMX, usable_cpus=2)
    assert without_amx["peak_flops"]["bfloat16"] == pytest.approx(2 * 2.6e9 * 128)  # AVX-512 bf16
    assert cpu_peak(LSCPU_AMX, CPUINFO_AMX, usable_cpus=1)["cores"] == 1  # pinned to one CPU


def test_cpu_peak_of_the_avx2_epyc_machine():
    peak = cpu_peak(LSCPU_EPYC, "", usable_cpus=4)
    # 4 logical CPUs = 2 cores x 2 threads: the FMA units belong to the cores
    assert peak["isa"] == "AVX2+FMA" and peak["cores"] == 2 and peak["clock_ghz"] == pytest.approx(3.0)
    assert peak["peak_flops"]["float32"] == pytest.approx(2 * 3.0e9 * 32)
    assert peak["peak_flops"]["bfloat16"] == peak["peak_flops"]["float32"]  # no native bf16
    assert "CPU max MHz" in peak["assumption"] and "AVX2" in peak["assumption"]
    zen4 = cpu_peak(LSCPU_EPYC.replace("avx2", "avx2 avx512f"), "", usable_cpus=4)
    assert zen4["isa"] == "AVX-512" and zen4["fp32_flops_per_cycle_per_core"] == 32  # 256-bit units
    # no clock in lscpu or the model name: BogoMIPS / 2
    no_clock = cpu_peak(LSCPU_EPYC.replace("CPU max MHz:                             3000.0000\n", ""), "", 4)
    assert no_clock["clock_ghz"] == pytest.approx(2.45)


def test_this_machines_cpu_peak_is_positive():
    peak = device_peak("cpu")
    assert peak["kind"] == "cpu" and peak["cores"] >= 1 and peak["peak_flops"]["float32"] > 1e9


@pytest.mark.parametrize(
    "name, model, bf16_tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H200", "H200 SXM", 989.5),
        ("NVIDIA A100-SXM4-80GB", "A100 (SXM4 and PCIe)", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100 (SXM4 and PCIe)", 312.0),
    ],
)
def test_gpu_peak_from_the_datasheet_table(name, model, bf16_tflops):
    peak = gpu_peak(name)
    assert peak["model"] == model and peak["peak_flops"]["bfloat16"] == pytest.approx(bf16_tflops * 1e12)
    assert peak["peak_flops"]["float32"] < peak["peak_flops"]["tf32"] < peak["peak_flops"]["bfloat16"]
    assert "datasheet" in peak["assumption"]


def test_unknown_gpu_has_no_peak_and_limit_says_so():
    assert gpu_peak("NVIDIA GeForce GTX 1080") is None
    row = limit(2e12, 2.0, None, "float32")
    assert row["achieved_flops_per_s"] == 1e12 and row["fraction_of_peak"] is None


def test_limit_against_the_precision_it_ran_in():
    peak = gpu_peak("NVIDIA H200")
    row = limit(989.5e12, 2.0, peak, "bfloat16")
    assert row["fraction_of_peak"] == pytest.approx(0.5) and row["peak_precision"] == "bfloat16"
    assert peak_precision("cuda", "float32") == ("tf32" if torch.backends.cudnn.allow_tf32 else "float32")
    assert peak_precision("cpu", "float16") == "float32"
