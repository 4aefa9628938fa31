"""Model configuration: a typed, frozen `QincoConfig` and the paper's presets.

Vocabulary (the paper's): K codewords per step, M steps (codes per vector; bytes when
K=256), L residual blocks per step network, de (E) embedding width (None = data
dimension D), dh (H) hidden width, A candidates pre-selected per beam (0 = no
pre-selection, every one of the K codes is scored), B beam size (1 = greedy).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, NoReturn, TypeVar

Dtype = Literal["float32", "bfloat16"]  # compute dtype of the step networks
MAX_K = 65536  # codes are stored as uint16 at most
MAX_B = 65536
C = TypeVar("C")


def flag(default: Any, help: str, **meta: Any) -> Any:
  """A config field that is also a command-line flag, with its help text (the
  programs' and the benchmarks' flags are generated from such fields):
  `x: int = flag(3, "what x is")`. `meta`: more of the field's metadata for the flag
  parser (e.g. `empty_ok=True`: a tuple flag may be given no value)."""
  return dataclasses.field(default=default, metadata={"help": help, **meta})


def _flag_type(tp: Any) -> tuple[Any, bool]:
  """(element type, is a tuple) of a config field's annotation: int, float, str, bool,
  `X | None` or `tuple[X, ...]`."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    (tp,) = [a for a in args if a is not type(None)]
    args = typing.get_args(tp)
  if typing.get_origin(tp) is tuple:
    return args[0], True
  return tp, False


class _OneLineParser(argparse.ArgumentParser):
  """argparse, but a refused flag is one line (`prog: error: ...`), without the usage."""

  def error(self, message) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parse_config(cls: type[C], argv: Sequence[str], description: str = "") -> C:
  """A frozen config dataclass from command-line flags, one flag per field.

  `--name value` or `--name=value`; `-` may stand for `_` (`--target-s`); booleans
  are `--name` / `--no-name`; tuple fields take several values, space- or
  comma-separated (`--bytes 8 16`, `--inits=rq,reference`), at least one unless
  the default is empty or the field's metadata says `empty_ok`. Each field's
  `metadata["help"]` is its help text. Unknown or abbreviated flags, wrong types and
  the config's own checks are refused in one line naming the problem (exit status 2).
  """
  hints = typing.get_type_hints(cls)
  p = _OneLineParser(description=description.strip().split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              allow_abbrev=False)  # no flag is taken for another
  tuples = {}
  for f in dataclasses.fields(cls):  # type: ignore[arg-type]
    tp, many = _flag_type(hints[f.name])
    names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
    kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", " ")}
    if f.default is not dataclasses.MISSING:
      kw["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      kw["default"] = f.default_factory()
    else:
      kw["required"] = True
    if tp is bool:
      kw["action"] = argparse.BooleanOptionalAction
    elif many:
      # At least one value, unless the default is empty or the field allows none.
      kw["nargs"] = "*" if kw.get("default") == () or f.metadata.get("empty_ok") else "+"
      tuples[f.name] = tp
    else:
      kw["type"] = tp
    p.add_argument(*names, **kw)
  ns = vars(p.parse_args(list(argv)))
  for name, tp in tuples.items():
    if isinstance(ns[name], list):
      try:
        ns[name] = tuple(tp(v.strip()) for item in ns[name] for v in item.split(",")
                         if v.strip())
      except ValueError as e:
        p.error(f"--{name}: expected {tp.__name__} values, got {ns[name]} ({e})")
  try:
    return cls(**ns)
  except ValueError as e:  # the config's own checks (__post_init__)
    p.error(str(e))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QincoConfig:
  """Hyperparameters of a QINCo2 (or QINCo1-emulation) model.

  A and B here are the *training* (and default encoding) values; `Codec.encode`
  accepts other values at evaluation time.
  """

  K: int = 256  # codebook size per step
  M: int = 8  # number of steps (codes per vector)
  L: int = 2  # residual blocks in each step network f_m
  de: int | None = 128  # embedding width E; None means E = D (no projections)
  dh: int = 256  # hidden width H of the residual blocks
  A: int = 16  # candidates kept per beam by pre-selection; 0 = off (all K scored)
  B: int = 32  # beam size; 1 = greedy
  Ls: int = 0  # residual blocks of the pre-selection network g; 0 = learned codebook
  dh_pre: int = 128  # hidden width of g when Ls > 0
  qinco1_mode: bool = False  # QINCo1 architecture (no outer residual, PyTorch init)
  # Initialisation of a new model (spec 4.2): "rq" starts exactly at the RQ solution
  # (f(c, x_hat) = c at init); "reference" is the paper's (f = c + P_out P_in c, 2c when
  # de = D). None: "rq" in QINCo2 mode, "reference" in qinco1_mode.
  init: Literal["rq", "reference"] | None = None
  codebook_noise_init: float = 0.1  # relative noise added to the RQ-initialised codebooks
  enc_max_bs: int = 65536  # encoder chunk: chunk * B * (A or K) <= enc_max_bs
  # Compute dtype of the step networks' matmuls: "float32" or "bfloat16" (spec 9.9).
  # Parameters, optimiser state, codebook look-ups, scores, top-k, losses and the
  # returned reconstructions stay float32 either way.
  dtype: Literal["float32", "bfloat16"] = "float32"
  ivf_K: int = 0  # IVF lists of a frozen IVF step 0 (spec 4.1); 0 = no IVF step

  def __post_init__(self):
    def check(ok: bool, what: str, value: Any):
      if not ok:
        raise ValueError(f"QincoConfig: {what}, got {value!r}")

    for name in ("K", "M", "L", "dh", "A", "B", "Ls", "dh_pre", "enc_max_bs", "ivf_K"):
      v = getattr(self, name)
      check(isinstance(v, int) and not isinstance(v, bool),
            f"{name} must be an int", v)
    check(2 <= self.K <= MAX_K, f"K must be in [2, {MAX_K}]", self.K)
    check(self.M >= 1, "M must be >= 1", self.M)
    check(self.L >= 0, "L must be >= 0", self.L)
    check(self.dh >= 1, "dh must be >= 1", self.dh)
    check(self.de is None or (isinstance(self.de, int) and self.de >= 1),
          "de must be None (= D) or a positive int", self.de)
    check(0 <= self.A <= self.K,
          f"A (candidates per beam) must be in [0, K={self.K}]; 0 turns "
          "pre-selection off", self.A)
    check(1 <= self.B <= MAX_B,
          f"B (beam size) must be in [1, {MAX_B}]; 1 is greedy", self.B)
    check(self.Ls >= 0, "Ls must be >= 0", self.Ls)
    if self.init is None:
      object.__setattr__(self, "init", "reference" if self.qinco1_mode else "rq")
    check(self.init in ("rq", "reference"), "init must be 'rq' or 'reference'", self.init)
    check(not (self.qinco1_mode and self.init == "rq"),
          "init='rq' is for QINCo2 mode; qinco1_mode keeps the reference initialisation",
          self.init)
    check(self.codebook_noise_init >= 0, "codebook_noise_init must be >= 0",
          self.codebook_noise_init)
    check(self.enc_max_bs >= 1, "enc_max_bs must be >= 1", self.enc_max_bs)
    check(self.dtype in ("float32", "bfloat16"),
          "dtype must be 'float32' or 'bfloat16'", self.dtype)
    check(self.ivf_K == 0 or 2 <= self.ivf_K <= 2**31 - 1,
          "ivf_K must be 0 (no IVF) or in [2, 2**31 - 1]", self.ivf_K)

  def replace(self, **overrides) -> QincoConfig:
    """Returns a copy with some fields changed (unknown names raise)."""
    _check_names(overrides)
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> QincoConfig:
    """From `to_dict` output. Configs saved before `init` existed were created with
    the reference initialisation, and say so."""
    _check_names(d)
    return cls(**{"init": "reference", **d})

  def codeword_scale(self, d: int) -> float:
    """How the "rq" init stores a network step's codewords: halved when E = D (no
    projections: f(c, x_hat) = 2c at initialisation, so that the decoded codeword is
    the RQ's), as they are otherwise (P_out = 0 there: f = c). Dead-codeword resets
    (spec 9.7) store their new rows the same way."""
    return 0.5 if self.init == "rq" and self.embed_dim(d) == d else 1.0

  @property
  def n_ivf(self) -> int:
    """1 when a frozen IVF step precedes the QINCo steps, else 0."""
    return 1 if self.ivf_K else 0

  @property
  def M_tot(self) -> int:
    """Steps in all = code columns: M, plus 1 for the IVF list id."""
    return self.M + self.n_ivf

  @property
  def n_net(self) -> int:
    """Steps with a network: M - 1 (step 0 is a plain codebook), or M after IVF."""
    return self.M_tot - 1

  def embed_dim(self, d: int) -> int:
    """E for data dimension d."""
    return d if self.de is None else self.de


def _check_names(overrides: dict[str, Any]):
  names = {f.name for f in dataclasses.fields(QincoConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(
        f"unknown QincoConfig field(s) {unknown}; valid fields: {sorted(names)}")


# Presets of the paper (spec section 10). de=None means E = D.
PRESETS: dict[str, dict[str, Any]] = {
    "qinco1": dict(K=256, M=8, L=16, de=None, dh=256, A=0, B=1,
                   qinco1_mode=True, codebook_noise_init=1.0),
    "qinco2-S": dict(K=256, M=8, L=2, de=128, dh=256, A=16, B=32),
    "qinco2-M": dict(K=256, M=8, L=4, de=384, dh=384, A=16, B=32),
    "qinco2-L": dict(K=256, M=8, L=16, de=384, dh=384, A=16, B=32),
}


def preset(name: str, **overrides) -> QincoConfig:
  """Returns a preset config with any field overridden, e.g. `preset("qinco2-S", M=16)`.

  Unknown preset names and unknown field names raise ValueError: a preset never
  silently ignores an override.
  """
  key = {k.lower(): k for k in PRESETS}.get(name.lower())
  if key is None:
    raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
  _check_names(overrides)
  return QincoConfig(**{**PRESETS[key], **overrides})
