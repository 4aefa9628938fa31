"""Standard plots: rate-distortion and speed-recall curves (matplotlib, imported lazily).

Both functions take `{label: [(x, y), ...]}` and return the matplotlib Figure. With
`path` they save it (through the Agg canvas, whatever the interactive backend is);
with `ax` they draw into an existing Axes. Without either they draw through pyplot, so
the figure shows in a notebook.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

_MPL_HINT = "plotting needs matplotlib: pip install matplotlib"


def _check_results(results: Mapping[str, Sequence[Sequence[float]]], what: str,
                   names: tuple[str, str]) -> dict[str, list[tuple[float, float]]]:
  if not isinstance(results, Mapping) or not results:
    raise ValueError(f"{what}: results must be a non-empty dict label -> "
                     f"[({names[0]}, {names[1]}), ...], got {type(results).__name__}")
  out = {}
  for label, points in results.items():
    try:
      pts = [(float(a), float(b)) for a, b in points]
    except (TypeError, ValueError):
      raise ValueError(f"{what}: results[{label!r}] must be a sequence of "
                       f"({names[0]}, {names[1]}) number pairs") from None
    if not pts:
      raise ValueError(f"{what}: results[{label!r}] has no points")
    bad = [p for p in pts if not all(map(math.isfinite, p))]
    if bad:
      raise ValueError(f"{what}: results[{label!r}] has non-finite points {bad[:3]}")
    out[str(label)] = pts
  return out


def _figure(ax, path):
  """(fig, ax, owns_figure): an existing Axes, an Agg figure to save, or a pyplot one."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ImportError(_MPL_HINT) from None
  if ax is not None:
    return ax.figure, ax
  if path is not None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
  return fig, ax


def _log_y(ax):
  """Log-scale y axis whose tick labels are all plain numbers in one format ("2000",
  "5000", "10000", never "10^4" beside "2x10^3"); minor ticks are labelled only on
  ranges too short to have two major ones."""
  from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
  ax.set_yscale("log")
  plain = FuncFormatter(lambda v, _: f"{v:g}")
  ax.yaxis.set_major_formatter(plain)
  lo, hi = ax.get_ylim()
  majors = math.floor(math.log10(hi)) - math.ceil(math.log10(max(lo, 1e-300))) + 1
  if majors < 2:  # at most one power of ten in view: label 2x and 5x too
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain)
  else:
    ax.yaxis.set_minor_formatter(NullFormatter())


def _sorted_lines(ax, res: dict[str, list[tuple[float, float]]]):
  """One line with markers per label, its points sorted by x."""
  for label, pts in res.items():
    xs, ys = zip(*sorted(pts))
    ax.plot(xs, ys, marker="o", label=label)


def _finish(fig, ax, title: str | None, path: str | os.PathLike | None):
  ax.grid(True, which="both", alpha=0.3)
  # Outside the axes, on the right: a legend never covers data.
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
            fontsize="small")
  if title:
    ax.set_title(title)
  if path is not None:
    fig.savefig(os.fspath(path), dpi=120)
  return fig


def rate_distortion(results: Mapping[str, Sequence[tuple[float, float]]],
                    path: str | os.PathLike | None = None, ax: Any = None, *,
                    xlabel: str = "bytes per vector", ylabel: str = "MSE",
                    logy: bool = True, title: str | None = None):
  """Plots MSE against code size, one line per method.

  Args:
    results: {label: [(bytes_or_codes, mse), ...]}, e.g. MSE of prefix decoding
      with m = 1..M codes; points are drawn sorted by rate.
    path: save the figure there (png, pdf, svg, ... from the extension).
    ax: draw into this matplotlib Axes instead of a new figure.
    xlabel, ylabel, title: axis labels and title.
    logy: log-scale MSE axis.
  Returns:
    The matplotlib Figure.
  """
  res = _check_results(results, "rate_distortion", ("rate", "mse"))
  fig, ax = _figure(ax, path)
  _sorted_lines(ax, res)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    _log_y(ax)
  return _finish(fig, ax, title, path)


def speed_recall(results: Mapping[str, Sequence[tuple[float, float]]],
                 path: str | os.PathLike | None = None, ax: Any = None, *,
                 recall_label: str = "R@1", logy: bool = True,
                 title: str | None = None):
  """Plots search speed against recall (recall on x, queries per second on y).

  Args:
    results: {label: [(qps, recall), ...]}, one point per operating point of a
      method (e.g. a parameter sweep); points are drawn sorted by recall.
    path: save the figure there.
    ax: draw into this matplotlib Axes instead of a new figure.
    recall_label: name of the recall measure for the x axis (e.g. "R@10").
    logy: log-scale QPS axis.
    title: figure title.
  Returns:
    The matplotlib Figure.
  """
  res = _check_results(results, "speed_recall", ("qps", "recall"))
  fig, ax = _figure(ax, path)
  for label, pts in res.items():
    recalls, qps = zip(*sorted((r, q) for q, r in pts))
    ax.plot(recalls, qps, marker="o", label=label)
  ax.set_xlabel(recall_label)
  ax.set_ylabel("queries per second")
  if logy:
    _log_y(ax)
  return _finish(fig, ax, title, path)


def budget_curve(results: Mapping[str, Sequence[tuple[float, float]]],
                 baselines: Mapping[str, float] | None = None,
                 path: str | os.PathLike | None = None, ax: Any = None, *,
                 xlabel: str = "training budget (minutes, wall time)",
                 ylabel: str = "database MSE", title: str | None = None):
  """Plots MSE against training time, one line per method, with horizontal lines for
  methods that do not train by time (e.g. faiss RQ at the same code size).

  Args:
    results: {label: [(minutes, mse), ...]}; points are drawn sorted by time, on a
      log time axis.
    baselines: {label: mse} drawn as dashed horizontal lines.
    path, ax, xlabel, ylabel, title: as in `rate_distortion`.
  Returns:
    The matplotlib Figure.
  """
  res = _check_results(results, "budget_curve", ("minutes", "mse"))
  fig, ax = _figure(ax, path)
  _sorted_lines(ax, res)
  for i, (label, v) in enumerate((baselines or {}).items()):
    ax.axhline(float(v), ls="--", lw=1, color=f"C{len(res) + i}", label=label)
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  from matplotlib.ticker import FuncFormatter
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  return _finish(fig, ax, title, path)
