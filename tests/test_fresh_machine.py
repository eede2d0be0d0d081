"""A fresh machine, with the packages the registry serves: the folder kernels/ never shadows
Hugging Face's ``kernels`` (which transformers >= 5.25 imports when installed), the project
installs no top-level name but ``robalign``, and import errors say what they are.

Hugging Face's ``kernels`` is part of the ``test`` extra, so the collision is exercised on every
run: each process below is started the ways a user starts one — from the clone's root (which is
then on ``sys.path``: ``python -m``, a script saved in the clone, torchrun's workers), from a
subfolder and from elsewhere — and must import transformers' Trainer with ``kernels.__file__``
the installed package's.
"""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from robalign.app.commands import cli

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import kernels, transformers; from transformers import Trainer; print(kernels.__file__)"


def _installed_kernels() -> Path:
    """Hugging Face's ``kernels`` as this environment installed it (never the clone's folder)."""
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin, "Hugging Face's `kernels` must be installed (the `test` extra)"
    return Path(spec.origin).resolve()


def _python(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))


def test_hugging_face_kernels_is_installed_and_is_not_the_clones_folder():
    origin = _installed_kernels()
    assert importlib.metadata.version("kernels")
    assert ROOT / "kernels" not in origin.parents and "site-packages" in origin.parts


@pytest.mark.parametrize("where", ["clone root", "subfolder", "elsewhere"])
def test_transformers_trainer_imports_with_the_installed_kernels_from_anywhere(where, tmp_path):
    cwd = {"clone root": ROOT, "subfolder": ROOT / "tests", "elsewhere": tmp_path}[where]
    result = _python(["-c", PROBE], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.split()[-1]).resolve() == _installed_kernels()


def test_a_script_saved_in_the_clone_imports_transformers_trainer():
    """A script's folder comes first on ``sys.path``: the clone's root, for a script saved there."""
    script = ROOT / f"_probe_{os.getpid()}.py"
    script.write_text(PROBE + "\n")
    try:
        result = _python([script.name], ROOT)
    finally:
        script.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.split()[-1]).resolve() == _installed_kernels()


def test_python_m_robalign_train_help_from_the_clone_root():
    result = _python(["-m", "robalign", "train", "--help"], ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--objective" in result.stdout


def test_demo_data_and_weigh_run_from_the_clone_root(tmp_path):
    """``robalign demo`` and ``robalign weigh`` import transformers too: from the clone's root they
    failed with the shadowed ``kernels`` (the demo's message sent the user to the extras)."""
    exported = _python(["-m", "robalign", "demo", "--export-data", str(tmp_path)], ROOT)
    assert exported.returncode == 0, exported.stderr[-3000:]
    weighed = _python(["-m", "robalign", "weigh", str(tmp_path / "train.jsonl"), "--target-source", "human",
                       "--features", "tfidf", "--folds", "2", "--out", str(tmp_path / "weighed.jsonl")], ROOT)
    assert weighed.returncode == 0, weighed.stderr[-3000:]
    assert (tmp_path / "weighed.jsonl").read_text().count("\n") == (tmp_path / "train.jsonl").read_text().count("\n")


TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
import kernels, torch.distributed as dist
from robalign.app.commands.cli import main
out = Path(sys.argv[1])
code = main(["train", "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"])
out.joinpath(f"kernels-{dist.get_rank() if dist.is_initialized() else 'solo'}.txt").write_text(kernels.__file__)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_torchrun_step_from_the_clone_root(tmp_path):
    """``torchrun`` started in the clone's root, its two workers running a script saved there: each
    imports the installed ``kernels`` and trains one step of the embedded default."""
    script = ROOT / f"_probe_torchrun_{os.getpid()}.py"
    script.write_text(TORCHRUN_SCRIPT)
    try:
        result = _python(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", script.name,
                          str(tmp_path / "run")], ROOT, env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                         timeout=600)
    finally:
        script.unlink()
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-6000:]}"
    for rank in (0, 1):
        written = tmp_path / "run" / f"kernels-{rank}.txt"
        assert Path(written.read_text()).resolve() == _installed_kernels(), rank
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"]["world_size"] == 2


def test_the_only_top_level_package_is_robalign():
    """In the source tree no folder but robalign/ is a regular package (kernels/ has no
    ``__init__.py``: from the clone's root it would shadow any installed ``kernels``), and the
    installed distribution declares ``robalign`` alone."""
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["robalign"], packages
    dist = importlib.metadata.distribution("robalign")
    assert (dist.read_text("top_level.txt") or "").split() == ["robalign"]
    assert importlib.util.find_spec("robalign.kernels").origin == str(ROOT / "robalign" / "kernels" / "__init__.py")


@pytest.mark.slow
def test_a_wheel_installs_robalign_alone_with_its_kernels(tmp_path):
    """The wheel holds ``robalign/`` (the kernels copied into ``robalign/kernels/``) and its
    metadata, nothing else; installed, it imports ``robalign.kernels`` from itself, and
    ``kernels`` is still Hugging Face's. (No C++ extension: ROBALIGN_BUILD_EXT=0 keeps it quick.)"""
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, ROBALIGN_BUILD_EXT="0"))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("robalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"robalign", wheel.name.split("-py")[0] + ".dist-info"}
    kernel_modules = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.rpartition("/")[2] for n in names if n.startswith("robalign/kernels/") and n.endswith(".py")) \
        == sorted(["__init__.py", *kernel_modules])
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = ("import robalign.kernels as k, kernels; print(k.__path__[0], len(k.__path__), k.rows_lse_target.__module__,"
             " kernels.__file__)")
    result = _python(["-c", probe], tmp_path, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    path, count, module, hf = result.stdout.split()
    assert (Path(path), count, module) == (site / "robalign" / "kernels", "1", "robalign.kernels.logps")
    assert Path(hf).resolve() == _installed_kernels()


# -- errors that tell the truth --------------------------------------------------------------------

def _raise_from(module: str, code: str):
    """Run ``code`` as if it were in ``module`` (its frames carry that ``__name__``)."""
    exec(compile(code, f"<{module}>", "exec"), {"__name__": module})


def test_a_missing_module_of_an_extra_names_that_extra():
    with pytest.raises(cli.UsageError) as err, cli._needs_extras("weigh", "train"):
        _raise_from("robalign.app.ratio.classifier", "raise ModuleNotFoundError(\"No module named 'sklearn'\", "
                    "name='sklearn')")
    assert str(err.value) == "needs the `weigh` extra: pip install 'robalign[weigh]' (no module named 'sklearn')"
    with pytest.raises(cli.UsageError) as err, cli._needs_extras("weigh", "train"):
        _raise_from("robalign.app.training.trainer", "import transformers.no_such_module_here")
    assert "needs the `weigh` and `train` extras" not in str(err.value)       # transformers is there


def test_any_other_import_error_is_shown_as_itself_with_the_module_that_raised_it():
    with pytest.raises(cli.UsageError) as err, cli._needs_extras("weigh", "train"):
        _raise_from("transformers.integrations.hub_kernels",
                    "raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels' (/x/kernels/__init__.py)\")")
    assert str(err.value) == ("ImportError in transformers.integrations.hub_kernels: cannot import name "
                              "'CUDAProperties' from 'kernels' (/x/kernels/__init__.py)")
    with pytest.raises(cli.UsageError) as err, cli._needs_extras("train"):
        _raise_from("transformers.models.auto", "raise ModuleNotFoundError(\"No module named 'regex'\", name='regex')")
    assert str(err.value) == "ModuleNotFoundError in transformers.models.auto: No module named 'regex'"


def test_a_shadowing_kernels_package_is_reported_as_what_it_is(tmp_path):
    """The failure of the issue, reproduced: a regular package ``kernels`` ahead of the installed
    one. ``robalign demo`` must name transformers' ImportError, not send the user to the extras."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    result = _python(["-m", "robalign", "demo", "--quick", "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "extra" not in line and line.startswith("robalign demo: ImportError in transformers."), line
    assert str(tmp_path / "kernels") in line


def test_extra_modules_match_setup_extras():
    """``EXTRA_MODULES`` lists the top-level modules of each extra's distributions (as installed)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    extras = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    by_dist = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for d in dists:
            by_dist.setdefault(d.lower().replace("_", "-"), set()).add(module)
    for extra, modules in cli.EXTRA_MODULES.items():
        names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in extras[extra]}
        expected = {m for n in names for m in by_dist.get(n, ()) if not m.startswith("_") and m not in
                    {"pylab", "mpl_toolkits"}}
        assert set(modules) == expected, (extra, sorted(expected))
