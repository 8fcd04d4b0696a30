"""The HTML report in a real browser: headless Chromium (Debian's) loads it, every figure
decodes, and a screenshot of the page is not blank.

The report itself carries no JavaScript. The probe copies index.html next to it with a
small script that, once the page has loaded, marks each <img> "ok" (decoded, non-zero
natural width) or "broken"; Chromium's --dump-dom then hands back the marked DOM.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from orchestrator import proc
from orchestrator.report import ReportPaths, write_report
from tests.synthetic import make_run

pytestmark = pytest.mark.system

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  for (const img of imgs) {
    img.dataset.probe = img.complete && img.naturalWidth > 0 ? "ok" : "broken";
  }
  document.body.dataset.probe = "done:" + imgs.length;
});
</script>
</body>"""


@pytest.fixture(scope="module")
def report_paths(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    root = tmp_path_factory.mktemp("browser")
    run = make_run(root / "results")  # two kernels, two fleet sizes, walk latency
    return write_report([run], root / "report")


def _chromium(profile: Path, *args: str) -> str:
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return proc.run(argv, timeout_s=120).stdout


def test_every_figure_loads_in_chromium(report_paths: ReportPaths, tmp_path: Path) -> None:
    index = report_paths.index_html
    probe = index.with_name("probe.html")
    html = index.read_text()
    assert html.count("</body>") == 1
    probe.write_text(html.replace("</body>", PROBE))
    dom = _chromium(
        tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()
    )
    assert re.search(r'data-probe="done:(\d+)"', dom), "the probe script did not run"
    n_images = int(re.search(r'data-probe="done:(\d+)"', dom).group(1))  # type: ignore[union-attr]
    assert n_images == len(report_paths.figures) == 6
    states = re.findall(r'<img [^>]*data-probe="(\w+)"', dom)
    assert states == ["ok"] * n_images, f"broken figures: {states}"


def test_screenshot_is_not_blank(report_paths: ReportPaths, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    _chromium(
        tmp_path / "profile",
        "--window-size=1280,4000",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        report_paths.index_html.as_uri(),
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
    with Image.open(shot) as img:
        assert img.size == (1280, 4000)
        gray = img.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 100  # text and figures, not a white page
        colours = img.convert("RGB").resize((320, 1000)).getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # the figures' colours are there
