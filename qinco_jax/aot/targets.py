"""Compile targets: TPU slices and GPU hosts, their chips' public figures, and the
compile-only devices JAX builds for them.

A target is written as the cloud names it (`v5p-128`, `v5e-16`, `v6e-256`, `v4-8`),
as a topology (`v5p:4x4x4`, `v5e:2x2`), or as a GPU host (`h100x8`, `h200x8`), plus
the number of TPU slices or GPU hosts. `Target.devices()` returns JAX's compile-only
devices for it (TPU: libtpu's topology; GPU: the CUDA plugin with a target
description), each with its `process_index` (host) and, on several TPU slices, its
`slice_index`: the mesh is built from them exactly as a run on that hardware builds it.
"""

from __future__ import annotations

import dataclasses
import math
import re

# The chips' public figures (per chip). TPU: Cloud TPU system-architecture pages; GPU:
# NVIDIA's data sheets (dense figures, without structured sparsity).
#   peak_bf16: FLOP/s of bfloat16 matmuls.
#   peak_f32: FLOP/s of float32 matmuls at JAX's default precision (one bfloat16 pass
#     on TPU; TensorFloat-32 tensor cores on H100/H200), what a float32 model runs at.
#   hbm_bytes, hbm_bw: memory per chip (bytes) and its bandwidth (bytes/s).
#   link_bw: bidirectional chip-to-chip bandwidth inside a slice or host (ICI,
#     NVLink), bytes/s; None where the page does not state it.
#   dcn_bw: data-centre network bandwidth per chip between TPU slices or GPU hosts,
#     bytes/s (v5p: stated per chip; v5e: the pod's 6.4 Tbps over its 256 chips;
#     H100/H200: one 400 Gbit/s InfiniBand port per GPU, as NVIDIA's DGX H100/H200
#     systems have, https://www.nvidia.com/en-us/data-center/dgx-h200/); None if not
#     stated.


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "tpu" or "gpu"
  peak_bf16: float
  peak_f32: float
  hbm_bytes: int
  hbm_bw: float
  link_bw: float | None
  source: str
  dcn_bw: float | None = None


GIB = 1 << 30
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "tpu", 275e12, 275e12, 32 * GIB, 1200e9, None,
         "https://cloud.google.com/tpu/docs/v4"),
    Chip("v5e", "tpu", 197e12, 197e12, 16 * GIB, 819e9, 400e9,
         "https://cloud.google.com/tpu/docs/v5e", dcn_bw=6.4e12 / 8 / 256),
    Chip("v5p", "tpu", 459e12, 459e12, 95 * GIB, 2765e9, 1200e9,
         "https://cloud.google.com/tpu/docs/v5p", dcn_bw=50e9 / 8),
    Chip("v6e", "tpu", 918e12, 918e12, 32 * GIB, 1640e9, 800e9,
         "https://cloud.google.com/tpu/docs/v6e"),
    Chip("h100", "gpu", 989.4e12, 494.7e12, 80 * 10**9, 3.35e12, 900e9,
         "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM)", dcn_bw=400e9 / 8),
    Chip("h200", "gpu", 989.4e12, 494.7e12, 141 * 10**9, 4.8e12, 900e9,
         "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM)", dcn_bw=400e9 / 8),
)}

# Cloud accelerator names count TensorCores on v4/v5p (2 per chip) and chips on
# v5e/v6e; the usual slice shapes (chips) of each size.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
              128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
              2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
              128: "8x16", 256: "16x16"}
_TPU_CHIPS_PER_HOST = 4  # the multi-host slices' VMs (chips_per_host_bounds 2x2x1)
GPUS_PER_HOST = 8

# GPU target descriptions for the CUDA compiler (XLA's GpuTargetConfig, text form):
# what XLA reads from a real device, written from the data sheets above.
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bw}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {mem}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{name}"
"""
_GPU_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
# device_memory_size as the CUDA driver reports it (a little less than the nominal).
_GPU_MEMORY = {"h100": 84_978_434_048, "h200": 150_754_820_096}


class TargetError(ValueError):
  """An unknown or inconsistent target (the message is one line for the user)."""


def _known() -> str:
  return ("TPU: v4-N, v5p-N, v5e-N, v6e-N (cloud names) or v5p:4x4x4, v5e:2x2 "
          "(topologies); GPU: h100x8, h200x8")


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice (times `slices`) or a GPU host (times `hosts`)."""

  chip: Chip
  topology: str  # TPU: "4x4x4" (chips); GPU: "8" (GPUs per host)
  slices: int = 1  # TPU slices joined over the data-centre network
  hosts: int = 1  # GPU hosts

  @property
  def chips_per_slice(self) -> int:
    return math.prod(int(v) for v in self.topology.split("x"))

  @property
  def n_chips(self) -> int:
    return self.chips_per_slice * self.slices * self.hosts

  @property
  def chips_per_host(self) -> int:
    if self.chip.platform == "gpu":
      return int(self.topology)
    return min(_TPU_CHIPS_PER_HOST, self.chips_per_slice)

  @property
  def name(self) -> str:
    if self.chip.platform == "gpu":
      return f"{self.chip.name}x{self.topology}" + (f" x {self.hosts} hosts"
                                                     if self.hosts > 1 else "")
    cores = self.chips_per_slice * _CORES_PER_CHIP[self.chip.name]
    s = f"{self.chip.name}-{cores} ({self.topology})"
    return s + (f" x {self.slices} slices" if self.slices > 1 else "")

  def devices(self) -> list:
    """JAX's compile-only devices of this target (needs its compiler plugin: libtpu
    for TPU, the CUDA plugin for GPU; `qinco_jax.aot.plugins`)."""
    from jax.experimental import topologies
    if self.chip.platform == "tpu":
      kw: dict = {"num_slices": self.slices} if self.slices > 1 else {}
      if self.chip.name == "v4":
        kw["chip_config_name"] = "megacore"  # one device per chip, as v4 runs
      if self.chips_per_slice >= _TPU_CHIPS_PER_HOST:
        kw["chips_per_host_bounds"] = (2, 2, 1)
      topo_name = f"{self.chip.name}:{self.topology}"
      return list(topologies.get_topology_desc(topo_name, platform="tpu", **kw).devices)
    config = _GPU_TARGET.format(bw=int(self.chip.hbm_bw), mem=_GPU_MEMORY[self.chip.name],
                                name=_GPU_NAMES[self.chip.name])
    topo = topologies.get_topology_desc(self.chip.name, "cuda", target_config=config,
                                        topology=f"1x{self.hosts}x{self.topology}")
    return list(topo.devices)


def parse(target: str, slices: int = 1, hosts: int = 1) -> Target:
  """A `Target` from its name; unknown names and inconsistent counts raise
  `TargetError` with one line naming what is accepted."""
  t = target.strip().lower()
  if slices < 1 or hosts < 1:
    raise TargetError(f"--slices and --hosts must be >= 1, got {slices} and {hosts}")
  m = re.fullmatch(r"(h100|h200)(?:x(\d+))?", t)
  if m:
    if slices != 1:
      raise TargetError(f"--slices is for TPU targets; {target} is a GPU host: use "
                        "--hosts for several hosts")
    n = int(m.group(2) or GPUS_PER_HOST)
    if not 1 <= n <= GPUS_PER_HOST:
      raise TargetError(f"{target}: a host has 1 to {GPUS_PER_HOST} GPUs, got {n}")
    return Target(CHIPS[m.group(1)], str(n), hosts=hosts)
  if hosts != 1:
    raise TargetError(f"--hosts is for GPU targets; {target} is a TPU slice, whose "
                      "hosts follow from its topology (use --slices for several slices)")
  m = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod):(\d+(?:x\d+){1,2})", t)
  if m:
    chip = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    dims = m.group(2).count("x") + 1
    if dims != (3 if chip in ("v4", "v5p") else 2):
      raise TargetError(f"{target}: {chip} topologies have "
                        f"{3 if chip in ('v4', 'v5p') else 2} dimensions (e.g. "
                        f"{'v5p:4x4x4' if chip in ('v4', 'v5p') else 'v5e:4x4'})")
    return Target(CHIPS[chip], m.group(2), slices=slices)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)-(\d+)", t)
  if m:
    chip = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    n = int(m.group(2))
    per = _CORES_PER_CHIP[chip]
    shapes = _SHAPES_3D if per == 2 else _SHAPES_2D
    if n % per or n // per not in shapes:
      valid = ", ".join(f"{chip}-{k * per}" for k in shapes)
      raise TargetError(f"{target}: no such {chip} slice (known sizes: {valid}; or give "
                        f"the topology, e.g. {chip}:{shapes[16 if per == 1 else 64]})")
    return Target(CHIPS[chip], shapes[n // per], slices=slices)
  raise TargetError(f"unknown target {target!r}; known: {_known()}")
