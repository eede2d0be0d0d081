"""Backend dispatch rules and the command line's error handling."""

import subprocess
from pathlib import Path
import sys

import pytest
import torch

import robalign
from robalign import backends
from robalign.cli import main


def test_reference_backend_forced_and_by_env(monkeypatch):
    z, y = torch.randn(2, 3, 4), torch.randint(4, (2, 3))
    want = robalign.reference.sequence_logps(z, y)
    torch.testing.assert_close(robalign.sequence_logps(z, y, backend="reference"), want)
    monkeypatch.setenv("ROBALIGN_BACKEND", "reference")
    assert backends.resolve("f", None, "sequence_logps", z)[0] == "reference"
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


def test_auto_uses_reference_for_float64():
    assert backends.resolve("f", "auto", "sequence_logps", torch.zeros(1, dtype=torch.float64))[0] == "reference"


def test_auto_falls_back_to_chunked_torch_without_a_kernel(monkeypatch):
    def unavailable(op, device):
        raise backends.BackendUnavailable("no compiler")

    monkeypatch.setitem(backends._PROVIDERS, "cpp", unavailable)
    assert backends.resolve("f", "auto", "sequence_logps", torch.zeros(1))[0] == "torch"
    assert backends.resolve("f", "auto", "linear_sequence_logps", torch.zeros(1, device="meta"))[0] == "torch"


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


def test_top_level_kernels_folder_imports_cleanly_from_the_repo_root():
    """From the repository root, the folder kernels/ is also importable as a top-level package,
    and transformers imports any top-level `kernels` when probing for the Hub's kernels package:
    that import must not fail (a relative import beyond the top level would)."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", "import kernels, transformers.training_args"], cwd=root, check=True,
                   capture_output=True, timeout=300)
