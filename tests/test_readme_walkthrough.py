"""The walk on your own data (README and docs/own-data.md: one text, tests/test_docs.py), run exactly
as written (the `source .venv/bin/activate` line aside: this interpreter's environment is already
the active one) in an empty folder: every command must succeed and print no traceback. Then, in the
same folder, the blocks of docs/own-data.md marked to run after it: a tokenizer and a small model
built from a config, offline, trained and evaluated with `robalign train --model`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the walk needs the `weigh` and `train` extras")

README = Path(__file__).resolve().parents[1] / "README.md"
OWN_DATA = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```\s*<!-- /walkthrough -->", text, re.S).group(1)
    return "\n".join(line for line in block.splitlines() if not line.startswith("source "))


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    assert "reward accuracy" in out.stdout and "LlamaForCausalLM" in out.stdout
    assert (tmp_path / "my_run" / "summary.json").is_file() and (tmp_path / "my_data" / "report" / "weigh_report.png").is_file()
    after = re.findall(r"<!-- runs after the walkthrough -->\s*```(python|bash)\n(.*?)```",
                       OWN_DATA.read_text(encoding="utf-8"), re.S)
    assert [lang for lang, _ in after] == ["python", "bash"]
    for lang, code in after:
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "Traceback" not in out.stdout + out.stderr
    assert (tmp_path / "my_model" / "tokenizer.json").is_file() and (tmp_path / "my_model_run" / "final").is_dir()
    assert "reward accuracy" in out.stdout
