"""Rate-distortion and speed-recall plots."""

import pytest

from qinco_jax import plots

matplotlib = pytest.importorskip("matplotlib")


def test_rate_distortion_saves_png(tmp_path):
  path = tmp_path / "rd.png"
  fig = plots.rate_distortion({"QINCo2": [(8, 1.0), (1, 9.0), (4, 3.0)],
                               "RQ": [(1, 10.0), (8, 2.0)]}, path=path, title="t")
  assert path.stat().st_size > 1000
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  ax = fig.axes[0]
  assert [l.get_label() for l in ax.get_lines()] == ["QINCo2", "RQ"]
  assert list(ax.get_lines()[0].get_xdata()) == [1, 4, 8]  # sorted by rate
  assert ax.get_yscale() == "log" and ax.get_xlabel() == "bytes per vector"


def test_speed_recall_into_existing_axes(tmp_path):
  from matplotlib.figure import Figure
  fig = Figure()
  ax = fig.add_subplot()
  out = plots.speed_recall({"ivf": [(1000.0, 0.9), (5000.0, 0.5)]}, ax=ax,
                           recall_label="R@10")
  assert out is fig
  line = ax.get_lines()[0]
  assert list(line.get_xdata()) == [0.5, 0.9] and list(line.get_ydata()) == [5000, 1000]
  assert ax.get_xlabel() == "R@10"
  plots.speed_recall({"ivf": [(1000.0, 0.9)]}, path=tmp_path / "sr.svg")
  assert (tmp_path / "sr.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty"), ({"a": []}, "no points"), ({"a": [(1, 2, 3)]}, "pairs"),
    ({"a": [(1, float("nan"))]}, "non-finite"), ([(1, 2)], "non-empty")])
def test_bad_results(bad, match):
  with pytest.raises(ValueError, match=match):
    plots.rate_distortion(bad)


def test_budget_curve_lines_and_baselines(tmp_path):
  fig = plots.budget_curve({"QINCo2": [(10, 2.5), (1, 3.0), (3, 2.8)]},
                           {"faiss RQ beam 1": 3.4}, path=tmp_path / "b.png")
  ax = fig.axes[0]
  lines = ax.get_lines()
  assert [l.get_label() for l in lines] == ["QINCo2", "faiss RQ beam 1"]
  assert list(lines[0].get_xdata()) == [1, 3, 10] and ax.get_xscale() == "log"
  assert list(lines[1].get_ydata()) == [3.4, 3.4]  # a horizontal line at the baseline
  assert (tmp_path / "b.png").stat().st_size > 1000


def test_log_axis_labels_are_uniform_and_the_legend_is_outside(tmp_path):
  fig = plots.speed_recall({"a": [(5000, 0.3), (1000, 0.4), (200, 0.46)],
                            "b": [(6000, 0.2), (170, 0.39)]}, path=tmp_path / "s.png",
                           title="t")
  ax = fig.axes[0]
  fig.canvas.draw()
  labels = [t.get_text() for t in ax.get_yticklabels(minor=False) +
            ax.get_yticklabels(minor=True) if t.get_text()]
  assert {"200", "500", "1000", "2000", "5000"} <= set(labels)
  assert all(l.replace(".", "").isdigit() for l in labels), labels  # no 10^x mixed in
  legend = ax.get_legend()
  box = legend.get_window_extent()
  assert box.x0 >= ax.get_window_extent().x1  # right of the axes: covers no data
