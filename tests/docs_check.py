"""Open pages of the built documentation site in headless Chromium and report what a reader's
browser would: console errors, uncaught exceptions, images that did not load. ``make docs-check``
runs it on ``site/``; ``tests/test_docs.py`` runs it where Chromium is installed.

    python tests/docs_check.py SITE_DIR [PAGE ...]        (default pages: the index and the API page)

The site is served over HTTP on localhost (as a reader gets it; ``file://`` would block the search
worker). Each page is copied with a probe script at the top of its ``<head>``: it records
``console.error`` calls and uncaught errors from the first line on, and after the ``load`` event it
writes them, with every ``<img>`` that is incomplete or has no pixels, into the DOM, which
``chromium --dump-dom`` prints. A screenshot of each page goes to ``SITE_DIR/_check/``.
Exit status 0 when every page is clean; 1 otherwise (the problems are printed); 2 without Chromium.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PROBE = """<script>
window.__check = {errors: [], images: []};
(function () {
  const original = console.error;
  console.error = function (...args) { window.__check.errors.push(args.map(String).join(" ")); original.apply(console, args); };
  window.addEventListener("error", (e) => {
    const t = e.target || {};
    window.__check.errors.push(e.message ? "uncaught: " + e.message + (e.filename ? " at " + e.filename : "")
                                         : "failed to load: <" + (t.tagName || "?") + "> " + (t.src || t.href || ""));
  }, true);
  window.addEventListener("unhandledrejection", (e) => window.__check.errors.push("unhandled rejection: " + e.reason));
  window.addEventListener("load", () => setTimeout(() => {
    for (const img of document.images) {
      window.__check.images.push({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0});
    }
    const out = document.createElement("pre");
    out.id = "__check";
    out.textContent = JSON.stringify(window.__check);
    document.body.appendChild(out);
  }, 500));
})();
</script>"""
PAGES = ("index.html", "api/index.html")


def chromium() -> str | None:
    """The Chromium binary on PATH (Debian's ``chromium``), or ``None``."""
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(root: Path):
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _run(browser: str, args: list, timeout: float = 90) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", "--virtual-time-budget=8000"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=timeout)


def check_page(browser: str, base_url: str, page: str, shots: Path) -> dict:
    """``{"page", "errors", "images", "screenshot"}`` of one probed page."""
    url = f"{base_url}/{page}"
    dom = _run(browser, ["--dump-dom", url]).stdout
    found = re.search(r'<pre id="__check">(.*?)</pre>', dom, re.S)
    if found is None:
        return {"page": page, "errors": ["the probe wrote nothing: the page did not finish loading"], "images": []}
    report = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">"))
    shot = shots / (page.replace("/", "_").replace(".html", "") + ".png")
    _run(browser, [f"--screenshot={shot}", "--window-size=1280,1600", url])
    return {"page": page, "errors": report["errors"], "images": report["images"], "screenshot": str(shot)}


def check_site(site: Path, pages=PAGES) -> list[dict]:
    """Probe ``pages`` of the built ``site``; one report per page."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium on PATH (Debian: apt-get install chromium)")
    shots = site / "_check"
    shots.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "site"
        shutil.copytree(site, probed, ignore=shutil.ignore_patterns("_check"))
        for page in pages:
            path = probed / page
            path.write_text(path.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
        server = _serve(probed)
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            return [check_page(browser, base, page, shots) for page in pages]
        finally:
            server.shutdown()


def problems(reports: list[dict]) -> list[str]:
    out = []
    for r in reports:
        out += [f"{r['page']}: console: {e}" for e in r["errors"]]
        out += [f"{r['page']}: image not loaded: {i['src']}" for i in r["images"] if not i["ok"]]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    site, pages = Path(argv[0]), tuple(argv[1:]) or PAGES
    try:
        reports = check_site(site, pages)
    except FileNotFoundError as err:
        print(f"docs-check: {err}")
        return 2
    for r in reports:
        loaded = sum(i["ok"] for i in r["images"])
        print(f"{r['page']}: {len(r['errors'])} console errors, {loaded}/{len(r['images'])} images loaded, "
              f"screenshot {r.get('screenshot')}")
    bad = problems(reports)
    print("\n".join(bad) if bad else "docs-check: every page clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
