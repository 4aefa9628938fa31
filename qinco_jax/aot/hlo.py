"""What a compiled program does, read from its optimised HLO text
(`compiled.as_text()`): matmul FLOPs, an estimate of the memory traffic, the
collectives, and what should not be there (64-bit floats, host callbacks).

XLA's own `cost_analysis()` counts the body of a while loop once, and the encoder's
beam search and the decoder are `lax.scan` loops over the M steps, so its totals are
about 1/(M-1) of the work (and on GPU it returns nothing). Here every computation is
weighted by how often it runs: a while body by its trip count (XLA's
`known_trip_count`, else the bound of the loop condition `i < N`), the rest by their
callers.

  matmul_flops   2 x (output elements) x (contracted size) of every dot and
                 convolution (TPU lowers dots to convolutions), cuBLAS calls included.
  hbm_bytes      bytes read and written by every top-level operation (fusions as
                 wholes), outputs plus operands, leaving out buffers in a chip's
                 on-core memory (TPU layout `S(1)`): an estimate of the HBM traffic
                 that counts a fusion's whole operand even where it reads a slice.
  collectives    {kind: (count per step, bytes per step)}; "dcn-all-reduce": the part
                 of a TPU multi-slice all-reduce that crosses slices (send/recv through
                 the data-centre network).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
         "conditional", "call", "after-all", "partition-id", "replica-id",
         "opt-barrier", "add-dependency"}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                    r"=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


@dataclasses.dataclass
class Instr:
  name: str
  type: str  # "f32[8,128]{1,0}" or a tuple "(f32[...], s32[])"
  op: str
  operands: list[str]
  attrs: str
  literal: str = ""  # a constant's value ("3")


@dataclasses.dataclass
class HloStats:
  """Per-device totals of one compiled program, loops counted by their trip counts."""

  matmul_flops: float
  hbm_bytes: float
  collectives: dict[str, tuple[int, float]]  # kind -> (count, bytes) per call
  f64: bool  # any 64-bit float value
  host_transfers: list[str]  # host callbacks, infeed/outfeed, send/recv
  loops: list[tuple[str, int, bool]]  # (while op, trip count, trip count inferred)
  matmul_dtypes: dict[str, float]  # operand dtype -> FLOPs
  collective_dtypes: dict[str, float]  # "all-reduce bf16" -> bytes per call
  batch_collectives: list[str]  # collectives whose result has the global batch's size


def array_bytes(type_str: str, skip_on_core: bool = True) -> float:
  """Bytes of an HLO type (arrays and tuples of them); with skip_on_core, arrays in a
  non-default memory space (layout `S(n)`, n > 0: TPU on-core memory) count 0."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(type_str):
    if dtype not in _DTYPE_BYTES:
      continue
    if skip_on_core and layout and re.search(r"S\([1-9]\d*\)", layout):
      continue
    n = math.prod(int(d) for d in dims.split(",")) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _dims(type_str: str) -> tuple[str, list[int]]:
  m = _ARRAY.search(type_str)
  if m is None:
    return "", []
  return m.group(1), [int(d) for d in m.group(2).split(",")] if m.group(2) else []


def _split_type(rest: str) -> tuple[str, str]:
  """'(f32[2], s32[]) tuple(%a, %b), x=1' -> ('(f32[2], s32[])', 'tuple(%a, ...')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _parse_instr(line: str) -> Instr | None:
  m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
  if m is None:
    return None
  type_str, rest = _split_type(m.group(2))
  m2 = re.match(r"([\w\-]+)\((.*)$", rest)
  if m2 is None:
    return None
  op, body = m2.group(1), m2.group(2)
  depth, end = 1, len(body)
  for i, ch in enumerate(body):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  operands = re.findall(r"%([\w.\-]+)", body[:end])
  literal = body[:end] if op == "constant" else ""
  return Instr(m.group(1), type_str, op, operands, body[end + 1:], literal)


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation: instructions} in text order, and the entry computation's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h:
      current = h.group(2)
      comps[current] = []
      if h.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      ins = _parse_instr(line)
      if ins is not None:
        comps[current].append(ins)
  return comps, entry


def _trip_count(ins: Instr, comps: dict[str, list[Instr]]) -> tuple[int, bool]:
  """(trip count, inferred) of a while op."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
  if m:
    return int(m.group(1)), False
  cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
  body = comps.get(cond.group(1), []) if cond else []
  consts = {i.name: i.literal for i in body if i.op == "constant"}
  for i in body:  # the scan pattern: i < N, i counting up from 0 by 1
    if i.op == "compare" and "direction=LT" in i.attrs:
      for o in i.operands:
        if re.fullmatch(r"-?\d+", consts.get(o, "")):
          return max(int(consts[o]), 0), True
  return 1, True


def _multiplicities(comps: dict[str, list[Instr]], entry: str
                    ) -> tuple[dict[str, float], set[str], list[tuple[str, int, bool]]]:
  """(times each computation runs per call of the entry, fusion bodies, while loops)."""
  mult: dict[str, float] = collections.defaultdict(float)
  mult[entry] = 1.0
  fused: set[str] = set()
  loops = []
  for comp in reversed(list(comps)):  # callers are printed after their callees
    m = mult.get(comp, 0.0)
    if m == 0:
      continue
    for ins in comps[comp]:
      if ins.op in ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort",
                    "map") or ins.op.startswith(COLLECTIVES):
        continue  # to_apply: a scalar combiner, not a computation that runs per call
      if ins.op == "while":
        trip, inferred = _trip_count(ins, comps)
        loops.append((ins.name, trip, inferred))
        for kind, callee in _CALLS.findall(ins.attrs):
          mult[callee] += m * (trip if kind == "body" else trip + 1)
        continue
      for kind, callee in _CALLS.findall(ins.attrs):
        mult[callee] += m
        if ins.op == "fusion" and kind == "calls":
          fused.add(callee)
      for _, names in _CALL_LISTS.findall(ins.attrs):
        for callee in re.findall(r"%([\w.\-]+)", names):
          mult[callee] += m
  # A computation called from a fusion is fused (its nested calls too).
  changed = True
  while changed:
    changed = False
    for comp in list(fused):
      for ins in comps.get(comp, []):
        for _, callee in _CALLS.findall(ins.attrs):
          if callee not in fused:
            fused.add(callee)
            changed = True
  return mult, fused, loops


def _window_taps(attrs: str, lhs_labels: str, out_labels: str, lhs: list[int],
                 out: list[int]) -> int:
  """(output position, window tap) pairs of a convolution that read an input element,
  over all spatial dimensions: padding taps do no work. TPU writes a batched dot as a
  convolution whose batch dimensions are spatial, with a window as wide as the batch
  and padding around it, where each output reads one tap: a plain "window size"
  count would be that many times too high."""
  spatial = sorted(ch for ch in out_labels if ch.isdigit())
  if not spatial:
    return 1
  w = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(re.findall(r"(\w+)=([\w_x\-]+)", w.group(1))) if w else {}

  def per_dim(key: str, default: int) -> list[int]:
    if key not in fields:
      return [default] * len(spatial)
    return [int(v) for v in fields[key].split("x")]

  size = per_dim("size", 1)
  stride = per_dim("stride", 1)
  lhs_d = per_dim("lhs_dilate", 1)
  rhs_d = per_dim("rhs_dilate", 1)
  pads = ([tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")]
          if "pad" in fields else [(0, 0)] * len(spatial))
  total = 1
  for j, ch in enumerate(spatial):
    n_in, n_out = lhs[lhs_labels.index(ch)], out[out_labels.index(ch)]
    pairs = 0
    for o in range(n_out):
      for t in range(size[j]):
        pos = o * stride[j] + t * rhs_d[j] - pads[j][0]
        if pos >= 0 and pos % lhs_d[j] == 0 and pos // lhs_d[j] < n_in:
          pairs += 1
    total *= pairs
  return total


def _matmul_flops(ins: Instr, types: dict[str, str]) -> tuple[float, str]:
  """(FLOPs, lhs dtype) of a dot, convolution or cuBLAS call; (0, '') otherwise."""
  out_dtype, out = _dims(ins.type)
  lhs_dtype, lhs = _dims(types.get(ins.operands[0], "")) if ins.operands else ("", [])
  if ins.op == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * math.prod(out) * k, lhs_dtype
  if ins.op == "convolution":
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not (m and lhs):
      return 0.0, lhs_dtype
    lhs_l, _, out_l = m.groups()
    f = lhs[lhs_l.index("f")]
    non_spatial = out[out_l.index("b")] * out[out_l.index("f")]
    g = re.search(r"feature_group_count=(\d+)", ins.attrs)
    taps = _window_taps(ins.attrs, lhs_l, out_l, lhs, out)
    return 2.0 * non_spatial * f * taps / (int(g.group(1)) if g else 1), lhs_dtype
  if ins.op == "custom-call" and re.search(r'custom_call_target="__cublas', ins.attrs):
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    ks = [int(v.strip('" ')) for v in m.group(1).split(",") if v.strip('" ')] if m else []
    k = math.prod(lhs[i] for i in ks) if lhs else 1
    return 2.0 * math.prod(out) * k, lhs_dtype
  return 0.0, ""


def _collective_bytes(ins: Instr) -> tuple[float, dict[str, float]]:
  """(bytes, bytes by dtype) a collective moves per call: every array of an all-reduce
  (XLA combines many into one tuple); for the other *-start ops, whose tuple holds the
  operand and the result (plus flags), and for a send (data, context, token), the
  largest array."""
  arrays = [(dt, (math.prod(int(v) for v in dims.split(",")) if dims else 1)
             * _DTYPE_BYTES.get(dt, 4)) for dt, dims, _ in _ARRAY.findall(ins.type)
            if dt not in ("token",)]
  if not ins.op.startswith("all-reduce") and ins.type.startswith("(") and arrays:
    arrays = [max(arrays, key=lambda a: a[1])]
  by: dict[str, float] = collections.defaultdict(float)
  for dt, b in arrays:
    by[dt] += b
  return sum(by.values()), dict(by)


def analyse(text: str, global_batch: int = 0) -> HloStats:
  """HloStats of an optimised HLO module's text (one device's program).

  global_batch: rows of the whole step's batch; a collective whose result has a
  dimension of that size gathers or moves the batch (a data-parallel step moves only
  gradients and statistics) and is listed in `batch_collectives`."""
  comps, entry = parse(text)
  types = {i.name: i.type for c in comps.values() for i in c}
  mult, fused, loops = _multiplicities(comps, entry)
  flops = 0.0
  by_dtype: dict[str, float] = collections.defaultdict(float)
  hbm = 0.0
  coll: dict[str, list[float]] = {}
  coll_dtypes: dict[str, float] = collections.defaultdict(float)
  batch_coll: list[str] = []
  host: list[str] = []
  for comp, instrs in comps.items():
    m = mult.get(comp, 0.0)
    if m == 0:
      continue
    for ins in instrs:
      f, dtype = _matmul_flops(ins, types)
      if f:
        flops += m * f
        by_dtype[dtype] += m * f
      kind = next((k for k in COLLECTIVES if ins.op in (k, k + "-start")), None)
      dcn = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.attrs)
      if dcn and ins.op == "recv":
        continue  # the other half of a send: counted there
      if dcn:  # TPU multi-slice: a collective across slices, over the data-centre network
        kind = "dcn-" + dcn.group(1).lower().replace("_", "-")
      if kind:
        c = coll.setdefault(kind, [0, 0.0])
        b, by = _collective_bytes(ins)
        c[0] += m
        c[1] += m * b
        for dt, v in by.items():
          coll_dtypes[f"{kind} {dt}"] += m * v
        dims = [int(x) for _, ds, _ in _ARRAY.findall(ins.type) for x in ds.split(",") if x]
        if global_batch > 1 and global_batch in dims:
          batch_coll.append(f"{ins.op} {ins.type.split('{')[0]}")
      target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
      if (ins.op in ("infeed", "outfeed", "send", "recv") and not dcn) or (
          target and re.search(r"callback|host|python", target.group(1), re.I)):
        host.append(f"{ins.op} {target.group(1) if target else ''}".strip())
      if comp in fused or ins.op in _FREE or ins.op.endswith("-done"):
        continue
      if ins.op == "dynamic-slice":
        hbm += m * 2 * array_bytes(ins.type)
      elif ins.op == "dynamic-update-slice" and len(ins.operands) > 1:
        hbm += m * 2 * array_bytes(types.get(ins.operands[1], ""))
      else:
        hbm += m * (array_bytes(ins.type)
                    + sum(array_bytes(types.get(o, "")) for o in ins.operands))
  return HloStats(
      matmul_flops=flops, hbm_bytes=hbm,
      collectives={k: (int(round(v[0])), v[1]) for k, v in coll.items()},
      f64=bool(re.search(r"\bf64\[", text)), host_transfers=sorted(set(host)),
      loops=loops, matmul_dtypes=dict(by_dtype), collective_dtypes=dict(coll_dtypes),
      batch_collectives=batch_coll)
