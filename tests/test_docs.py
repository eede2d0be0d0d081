"""The documentation is checked like code: the site builds with ``mkdocs build --strict`` (a broken
link, anchor or API name fails it), every code block that claims to run (``<!-- runs -->`` before
it) runs, the README's walk and TRL example are the docs' (one text, run once), the layout page names
every module, the charts are the committed benchmark records' own, and — where Chromium is
installed — the built pages open with no console error and every image loaded."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
BLOCK = re.compile(r"<!-- runs -->\s*```(python|bash)\n(.*?)```", re.S)
BUILD_TIMEOUT_S = 300           # a hang guard only: the build's time is measured by `make docs`, not asserted


def runnable_blocks():
    """``(page:index, language, code)`` of every block marked ``<!-- runs -->``."""
    return [pytest.param(lang, code, id=f"{page.name}:{i}")
            for page in PAGES for i, (lang, code) in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")))]


def marked(text: str, name: str) -> str:
    return re.search(rf"<!-- {name} -->\s*```\w+\n(.*?)```\s*<!-- /{name} -->", text, re.S).group(1)


@pytest.mark.slow
def test_the_site_builds_with_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the `docs` extra builds the site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    out = subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                         env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("DoRALoss", "FusedLinearDoRALoss", "Objective", "LossParams", "KLDRO", "linear_sequence_logps"):
        assert 'id="robalign.' in api and name in api


def test_there_are_blocks_that_run():
    assert len(runnable_blocks()) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("lang, code", runnable_blocks())
def test_every_block_that_claims_to_run_runs(lang, code, tmp_path):
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr


def test_the_readme_examples_are_the_docs_examples():
    """One text for each example the README and a guide share: the test that runs one runs both."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert marked(readme, "walkthrough") == marked((DOCS / "own-data.md").read_text(encoding="utf-8"), "walkthrough")
    assert marked(readme, "trl-example") == marked((DOCS / "trl.md").read_text(encoding="utf-8"), "trl-example")
    loss = BLOCK.findall((DOCS / "loss.md").read_text(encoding="utf-8"))[0][1]
    assert BLOCK.findall(readme)[0][1] == loss


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260
    for page in re.findall(r"\]\((docs/[\w./-]+\.md)", "\n".join(lines)):
        assert (ROOT / page).is_file(), page


def test_the_layout_page_names_every_module():
    layout = (DOCS / "layout.md").read_text(encoding="utf-8")
    files = [p for p in (*ROOT.glob("robalign/**/*.py"), *ROOT.glob("robalign/app/assets/*"), *ROOT.glob("kernels/*.py"),
                         *ROOT.glob("csrc/*.cpp")) if "__pycache__" not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in files if f"`{p.relative_to(ROOT).as_posix()}`" not in layout]
    assert not missing, f"docs/layout.md does not name {missing}"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert not [p.name for p in DOCS.glob("*.md") if p.name not in nav]


def test_the_charts_are_the_committed_records():
    """docs/img holds copies of benchmarks/results' charts (the site cannot reach outside docs/): a
    chart re-measured there must be copied here too."""
    for chart in (DOCS / "img").glob("*.png"):
        record = ROOT / "benchmarks" / "results" / chart.name
        assert record.is_file() and record.read_bytes() == chart.read_bytes(), chart.name


@pytest.mark.slow
def test_the_pages_open_clean_in_chromium(tmp_path):
    """Headless Chromium on the index, the API page and the benchmarks page (its three charts): no
    console error or uncaught exception, every image loaded (``make docs-check`` runs the same)."""
    pytest.importorskip("mkdocs", reason="the `docs` extra builds the site")
    import docs_check

    if docs_check.chromium() is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium); `make docs-check` says the same")
    site = tmp_path / "site"
    subprocess.run([str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "-q", "-d", str(site)],
                   cwd=ROOT, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
    reports = docs_check.check_site(site, ("index.html", "api/index.html", "benchmarks/index.html"))
    assert not docs_check.problems(reports)
    assert sum(len(r["images"]) for r in reports) >= 4 and all(Path(r["screenshot"]).is_file() for r in reports)
    shutil.rmtree(site / "_check")
