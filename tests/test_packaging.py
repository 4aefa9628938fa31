"""The package as users install it: a wheel holding the programs, configs, licence and
type marker, installed into a fresh virtual environment, run from another directory."""

import os
import subprocess
import sys
import zipfile

import pytest

import qinco_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                      str(out), ROOT], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  (path,) = out.glob("qinco_jax-*.whl")
  return path


def test_wheel_holds_programs_configs_licence_and_version(wheel):
  assert wheel.name.startswith(f"qinco_jax-{qinco_jax.__version__}-")
  names = zipfile.ZipFile(wheel).namelist()
  for f in ("qinco_jax/cli.py", "qinco_jax/configs/glove_small.py",
            "qinco_jax/configs/common.py", "qinco_jax/py.typed"):
    assert f in names, f
  assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
             for n in names)
  (ep,) = [n for n in names if n.endswith("entry_points.txt")]
  text = zipfile.ZipFile(wheel).read(ep).decode()
  for line in ("qinco-train = qinco_jax.cli:train", "qinco-search = qinco_jax.cli:search",
               "qinco-eval = qinco_jax.cli:evaluate",
               "qinco-compile = qinco_jax.cli:compile_pods"):
    assert line in text
  assert not any(n.startswith(("tests/", "experiments/")) for n in names)


def _venv_with_our_dependencies(venv) -> str:
  """A new virtual environment whose Python also imports every package the suite's
  Python imports, however that one was installed (the system's, a venv, conda): their
  directories are listed in a .pth file (no `--system-site-packages`, which from inside
  a venv means the base interpreter's packages, without jax). The directories' own .pth
  hooks do not run, so an editable install of this checkout does not shadow the wheel.
  Returns the new Python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                 timeout=300)
  py = str(venv / "bin" / "python")
  site_dir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()"
                             "['purelib'])"], capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip()
  ours = [p for p in sys.path if os.path.isdir(p)
          and os.path.basename(p) in ("site-packages", "dist-packages")]
  with open(os.path.join(site_dir, "_suite_packages.pth"), "w") as f:
    f.write("".join(p + "\n" for p in ours))
  return py


def test_installed_programs_run_from_another_directory(wheel, tmp_path):
  venv = tmp_path / "venv"
  # The dependencies come from this environment; the package itself from the wheel.
  py, bin_dir = _venv_with_our_dependencies(venv), venv / "bin"
  # --ignore-installed: the suite's own qinco_jax (visible through the .pth file) is
  # neither taken for this one nor uninstalled.
  r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                      str(wheel)], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  env.pop("PYTHONPATH", None)

  def run(*args):
    return subprocess.run(list(args), cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600)

  r = run(py, "-c", "import qinco_jax; print(qinco_jax.__file__)")
  assert str(venv) in r.stdout, (r.stdout, r.stderr[-2000:])  # the wheel's copy
  for prog in ("qinco-train", "qinco-search", "qinco-eval", "qinco-compile"):
    r = run(str(bin_dir / prog), "--help")
    assert r.returncode == 0, r.stderr[-2000:]
  assert "--config" in run(str(bin_dir / "qinco-train"), "--help").stdout
  r = run(str(bin_dir / "qinco-train"), "--config=synthetic_tiny", "--workdir=tiny",
          "--config.eval.rq_baseline=False")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "QINCo2" in r.stdout and (elsewhere / "tiny" / "eval.json").exists()
