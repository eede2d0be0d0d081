"""Backend dispatch rules and the command line's error handling."""

import subprocess
import sys

import pytest
import torch

import robalign
from robalign.app.commands.cli import main
from robalign.ops import registry as backends


def test_reference_backend_forced_and_by_env(monkeypatch):
    z, y = torch.randn(2, 3, 4), torch.randint(4, (2, 3))
    want = robalign.ground_truth.sequence_logps(z, y)
    torch.testing.assert_close(robalign.sequence_logps(z, y, backend="reference"), want)
    monkeypatch.setenv("ROBALIGN_BACKEND", "reference")
    assert backends.resolve("f", None, z).name == "reference"
    torch.testing.assert_close(robalign.sequence_logps(z, y), want)


def test_unknown_backend_names_the_argument_and_the_variable(monkeypatch):
    z, y = torch.randn(2, 3, 4), torch.randint(4, (2, 3))
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        robalign.sequence_logps(z, y, backend="cuda")
    monkeypatch.setenv("ROBALIGN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"ROBALIGN_BACKEND='fast' must be one of"):
        robalign.sequence_logps(z, y)


def test_forced_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y = torch.randn(2, 3, 4), torch.randint(4, (2, 3))
    with pytest.raises(backends.BackendUnavailable, match=r"TRITON_INTERPRET=1"):
        robalign.sequence_logps(z, y, backend="triton")


@pytest.mark.parametrize("triton, numpy, refused", [((3, 6), (2, 4), True), ((3, 6), (2, 3), False),
                                                   ((3, 7), (2, 5), False), ((3, 9), (), False)])
def test_forced_triton_under_an_interpreter_that_cannot_index_says_so(monkeypatch, triton, numpy, refused):
    """Triton ≤ 3.6's interpreter with numpy ≥ 2.4 fails inside every kernel ("only 0-dimensional
    arrays can be converted to Python scalars"); the backend says why before a kernel runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_release", {"triton": triton, "numpy": numpy}.get)
    z = torch.zeros(1)
    if not refused:
        assert backends.resolve("f", "triton", z).name == "triton"
        return
    with pytest.raises(backends.BackendUnavailable, match=r"f: backend 'triton': Triton 3\.6's interpreter .* "
                                                          r"numpy 2\.4: it needs numpy<2\.4 or triton>=3\.7"):
        backends.resolve("f", "triton", z)
    assert backends.get("triton").missing(torch.device("cuda")) is None        # compiled kernels: no interpreter


def test_auto_uses_reference_for_float64():
    assert backends.resolve("f", "auto", torch.zeros(1, dtype=torch.float64)).name == "reference"


def test_auto_falls_back_to_chunked_torch_without_a_kernel(monkeypatch):
    import dataclasses

    no_compiler = dataclasses.replace(backends.BACKENDS["cpp"], missing=lambda device: "no compiler")
    monkeypatch.setitem(backends.BACKENDS, "cpp", no_compiler)
    assert backends.resolve("f", "auto", torch.zeros(1)).name == "torch"
    assert backends.resolve("f", "auto", torch.zeros(1, device="meta")).name == "torch"
    with pytest.raises(backends.BackendUnavailable, match=r"f: no compiler"):
        backends.resolve("f", "cpp", torch.zeros(1))


def test_every_backend_module_named_by_the_registry_has_the_one_signature():
    """Each entry's ops module exports the three ops with the same keyword arguments, and each
    row-kernel module the three row functions: what makes a backend one module plus one entry."""
    import inspect

    for entry in backends.BACKENDS.values():
        ops = entry.load_ops()
        for op, args in (("sequence_logps", {"ignore_index", "cu_seqlens", "inplace_backward", "kernel"}),
                         ("sequence_logps_with_ref", {"ignore_index", "cu_seqlens", "inplace_backward", "kernel"}),
                         ("linear_sequence_logps", {"bias", "ignore_index", "cu_seqlens", "kernel", "transform"})):
            params = inspect.signature(getattr(ops, op)).parameters
            assert {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == args, (entry.name, op)
        if entry.rows is not None and entry.unavailable(torch.device("cpu")) is None:
            rows = entry.load_rows()
            assert all(callable(getattr(rows, f)) for f in ("rows_lse_target", "rows_softmax_grad", "empty_grad_like"))


def test_moved_module_paths_import_with_a_deprecation_warning_and_0_1_paths_are_gone():
    import importlib

    with pytest.warns(DeprecationWarning, match=r"`robalign.app.trl_trainer` moved to `robalign.trl`"):
        old = importlib.import_module("robalign.app.trl_trainer")
    import robalign.trl as new

    assert old is new and old.DoRADPOTrainer is importlib.import_module("robalign.app.training.trl").DoRADPOTrainer
    import robalign.objectives                                   # a permanent public name, no warning

    assert robalign.objectives is robalign.losses.objectives
    with pytest.raises(ModuleNotFoundError):                     # release 0.1's flat paths: removed in 0.2
        importlib.import_module("robalign.trainer")


def test_the_ground_truth_answers_to_its_old_name_with_a_warning():
    import importlib
    import sys

    import robalign
    import robalign.ground_truth.objectives as new

    for name in ("robalign.reference", "robalign.reference.objectives"):
        sys.modules.pop(name, None)
    vars(robalign).pop("reference", None)
    with pytest.warns(DeprecationWarning, match=r"`robalign.reference` moved to `robalign.ground_truth`"):
        assert robalign.reference is robalign.ground_truth
    with pytest.warns(DeprecationWarning, match=r"`robalign.reference.objectives` moved to "
                                                r"`robalign.ground_truth.objectives`"):
        old = importlib.import_module("robalign.reference.objectives")
    assert old is new and old.OBJECTIVES is new.OBJECTIVES


@pytest.mark.parametrize("old, new", [("trainer", "training.trainer"), ("config", "training.config"),
                                      ("cli", "commands.cli"), ("evaluate", "evaluation.accuracy")])
def test_the_applications_flat_paths_import_from_its_folders_with_a_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(f"robalign.app.{old}", None)
    with pytest.warns(DeprecationWarning, match=rf"`robalign.app.{old}` moved to `robalign.app.{new}`"):
        module = importlib.import_module(f"robalign.app.{old}")
    assert module is importlib.import_module(f"robalign.app.{new}")


def test_an_old_module_path_runs_with_python_m():
    """`python -m robalign.app.launch` (0.2's path, which scripts call) runs the moved module, its
    relative imports resolved from the new package, with the DeprecationWarning."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "robalign.app.launch"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "`robalign.app.launch` moved to `robalign.app.training.launch`" in out.stderr
    assert "DeepSpeed's CPU communication extension is ready" in out.stdout


def test_the_data_folder_keeps_the_preference_names_of_the_old_data_module():
    from robalign.app.data import PreferenceCollator
    from robalign.app.data.preferences import PreferenceCollator as moved

    assert PreferenceCollator is moved


def test_cli_unknown_subcommand_and_missing_file(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    assert main(["weigh", "/no/such/file.jsonl", "--target-source", "human", "--out", "/tmp/x.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "robalign weigh: no such file: /no/such/file.jsonl"


def test_python_m_robalign_help():
    out = subprocess.run([sys.executable, "-m", "robalign", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "weigh" in out.stdout and "demo" in out.stdout
