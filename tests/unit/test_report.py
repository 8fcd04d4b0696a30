"""The report: every figure labelled, files written, missing data said plainly, the same
runs giving the same bytes, and seaborn/matplotlib kept inside the report module."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import report
from orchestrator.errors import UsageError
from orchestrator.results import analysis as an
from tests.synthetic import make_run

ORCHESTRATOR = Path(report.__file__).parent
UNIT = re.compile(r"\([^)]+\)")  # "walk duration (µs, log scale)"
ALL_FIGURES = {"ksm_timeline", "merge_rate", "ksmd_cpu", "latency_ecdf", "walk_cost", "density"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def analysis(run_dir: Path) -> an.Analysis:
    return an.analyze(an.load_run(run_dir), n_boot=500)


def test_every_figure_has_title_units_and_legend(analysis: an.Analysis) -> None:
    figures = report.build_figures(analysis)
    assert set(figures) == ALL_FIGURES
    for name, fig in figures.items():
        assert fig.get_suptitle().strip(), f"{name}: no title"
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert axes, f"{name}: no axes"
        for ax in axes:
            assert ax.get_title().strip(), f"{name}: a panel without a title"
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                assert UNIT.search(label), f"{name}: axis label {label!r} has no (unit)"
        legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
        legends += list(fig.legends)
        assert any(lg.get_texts() for lg in legends), f"{name}: no legend"


def test_write_report_writes_page_figures_tables_and_summary(run_dir: Path, tmp_path: Path):
    paths = report.write_report([run_dir], tmp_path / "out", host_ram_gib=64, reserve_gib=4)
    html = paths.index_html.read_text()
    assert set(paths.figures) == ALL_FIGURES
    for fig in paths.figures.values():
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{fig.name}"' in html
    for name, csv in paths.tables.items():
        assert f'href="{csv.name}"' in html, name
        assert not pd.read_csv(csv).empty, name
    assert "lower-bound proxy" in html and "≥ " in html  # proxies labelled beside the values
    assert "Host RAM: 64 GiB; reserve: 4 GiB" in html
    md = paths.summary_md.read_text()
    for heading in (
        "## Runs",
        "## A/B hygiene warnings",
        "## rmap_walk_ksm latency",
        "## Capacity",
        "## Methods",
    ):
        assert heading in md
    assert "lower-bound proxy" in md and "not recorded in this run" not in md


def test_missing_tables_are_said_not_recorded(tmp_path: Path) -> None:
    run = make_run(tmp_path, tables=frozenset({"trials"}))
    paths = report.write_report([run], tmp_path / "out")
    html = paths.index_html.read_text()
    for what in (
        "KSM samples (ksm_samples.parquet)",
        "Walk latency (latency.parquet)",
        "Guest timings (guests.parquet)",
        "vmstat and KSM samples, or phase deltas",
    ):
        assert f"{what}: not recorded in this run." in html
    assert "latency_ecdf" not in paths.figures and "ksm_timeline" not in paths.figures
    assert (
        "Walk latency (latency.parquet): not recorded in this run." in paths.summary_md.read_text()
    )


def test_odd_runs_still_give_a_report(tmp_path: Path) -> None:
    """Every trial failed; or a run stripped of optional columns and manifest facts."""
    failed = make_run(
        tmp_path, run_id="failed", kernels=("6.12",), fleet_sizes=(4,), failed_trials=3
    )
    paths = report.write_report([failed], tmp_path / "failed-report")
    assert paths.figures == {}
    assert "No successful trial recorded these metrics." in paths.index_html.read_text()

    run = make_run(tmp_path, run_id="stripped")
    for table, drop in (
        ("latency", ["vmas", "lower_bound"]),
        ("trials", ["guest_memory_mib", "general_profit_mib", "ksmd_cpu_s"]),
        ("ksm_samples", ["general_profit_bytes", "ksmd_cpu_s", "ts_ns"]),
    ):
        path = run / f"{table}.parquet"
        pd.read_parquet(path).drop(columns=drop).to_parquet(path)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["kernels"], manifest["host"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    paths = report.write_report([run], tmp_path / "stripped-report")
    assert set(paths.figures) == {"ksm_timeline", "merge_rate", "latency_ecdf"}
    html = paths.index_html.read_text()
    assert "lower-bound proxy" in html  # derived from the method when the column is absent


def test_report_is_a_pure_function_of_the_runs(run_dir: Path, tmp_path: Path) -> None:
    first = report.write_report([run_dir], tmp_path / "one")
    second = report.write_report([run_dir], tmp_path / "two")
    files = [first.index_html, first.summary_md, *first.tables.values(), *first.latex.values()]
    files += [f for fs in first.figure_files.values() for f in fs]  # PNG, PDF and SVG
    assert len(files) > len(first.figures) * 3
    for a in files:
        b = second.out_dir / a.name
        assert a.read_bytes() == b.read_bytes(), a.name


def test_two_runs_in_one_report(tmp_path: Path) -> None:
    a = make_run(tmp_path, run_id="a", kernels=("6.12",))
    b = make_run(tmp_path, run_id="b", kernels=("7.3",), seed=1)
    paths = report.write_report([a, b], tmp_path / "out")
    html = paths.index_html.read_text()
    assert "densitylab report: a, b" in html and "7.3 vs 6.12" in html
    assert "not recorded in these runs" not in html


def test_bad_input_is_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"manifest\.json"):
        report.write_report([tmp_path], tmp_path / "out")
    with pytest.raises(UsageError, match="no run directories"):
        report.write_report([], tmp_path / "out")


def test_manifest_text_is_escaped(tmp_path: Path) -> None:
    run = make_run(tmp_path, warnings=("<script>alert(1)</script>",))
    html = report.write_report([run], tmp_path / "out").index_html.read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["warnings"] == ["<script>alert(1)</script>"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_report_module_imports_plotting_libraries() -> None:
    offenders = {
        p.name
        for p in ORCHESTRATOR.glob("*.py")
        if p.name != "report.py" and _imports(p) & {"seaborn", "matplotlib"}
    }
    assert not offenders
    assert {"seaborn", "matplotlib"} <= _imports(ORCHESTRATOR / "report.py")


# --------------------------------------------------------------------------- paper output


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory: pytest.TempPathFactory) -> report.ReportPaths:
    """The series' benchmark shape, walks attributed, "guests" run as host processes."""
    parent = tmp_path_factory.mktemp("bench")
    run = make_run(
        parent,
        run_id="bench",
        spec_name="rmap-bench",
        one_content=True,
        pattern_process=True,
        guest_kind="host-process",
    )
    return report.write_report([run], parent / "out")


def test_figures_in_every_format(bench_report: report.ReportPaths) -> None:
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}
    for name, files in bench_report.figure_files.items():
        assert {p.suffix for p in files} == set(magic), name
        for p in files:
            assert p.read_bytes().startswith(magic[p.suffix]), p.name
    html = bench_report.index_html.read_text()
    assert 'href="walk_cost.pdf"' in html and 'href="walk_cost.svg"' in html


def _braces_balanced(text: str) -> bool:
    depth = 0
    for m in re.finditer(r"\\.|[{}]", text):  # \{ and \} are escaped: skip them
        tok = m.group(0)
        if tok in "{}":
            depth += 1 if tok == "{" else -1
            if depth < 0:
                return False
    return depth == 0


def _latex_rows(tex: str) -> tuple[str, list[list[str]]]:
    """The column spec and the cells of a tabular, split on unescaped &."""
    lines = tex.strip().splitlines()
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0])
    assert spec, lines[0]
    assert lines[-1] == r"\end{tabular}" and lines.count(r"\hline") == 3
    body = [ln for ln in lines[1:-1] if ln != r"\hline"]
    assert all(ln.endswith(r" \\") for ln in body)
    return spec.group(1), [re.split(r"(?<!\\)&", ln.removesuffix(r" \\")) for ln in body]


def test_every_table_is_also_a_latex_tabular_that_parses(bench_report: report.ReportPaths):
    latex = bench_report.latex
    assert set(bench_report.tables) <= set(latex)  # every CSV has its .tex
    assert {"latency_summary_display", "walk_cost_fits_display", "published_comparison"} <= set(
        latex
    )
    for name, path in latex.items():
        tex = path.read_text()
        assert _braces_balanced(tex), name
        assert tex.count(r"\begin{") == tex.count(r"\end{") == 1, name
        spec, rows = _latex_rows(tex)
        assert rows and all(len(r) == len(spec) for r in rows), name
        assert "µ" not in tex and "_" not in tex.replace(r"\_", ""), name
    header = _latex_rows(latex["latency_summary_display"].read_text())[1][0]
    assert r"p50 (\textmu{}s) [95\% CI]" in [c.strip() for c in header]


def test_latex_escape_of_every_special_character() -> None:
    assert report.latex_escape(r"a_b & 5% #1 $x {y} ~ ^ \ µs ≥ δ") == (
        r"a\_b \& 5\% \#1 \$x \{y\} \textasciitilde{} \textasciicircum{} "
        r"\textbackslash{} \textmu{}s $\geq$ $\delta$"
    )


def test_bench_report_states_model_published_figures_and_capacity(
    bench_report: report.ReportPaths,
) -> None:
    md = bench_report.summary_md.read_text()
    assert "### Walk-cost model" in md
    sentences = [ln for ln in md.splitlines() if ln.startswith(("- 6.12 (", "- 7.3 ("))]
    assert len(sentences) == 2  # one per kernel
    assert "grows ~linearly in VMAs" in sentences[0] and "flat in VMAs" in sentences[1]
    assert "~705 ms before the change and ~1.7 ms after" in md and "~20,000 VMAs" in md
    assert "TCG emulation inflates absolute times" in md and "the ratio" in md
    assert "Capacity table not applicable: the guests are host processes" in md
    assert "| unattributed |" in md  # its own row, under no VMA count
    # 3 trials a side: figures, and a verdict that says why no difference is called.
    assert "cannot be called: needs ≥ 6 trials a side" in md and "too few samples" not in md
    assert "density" not in bench_report.figures


def test_ecdf_is_a_grid_not_a_strip(bench_report: report.ReportPaths) -> None:
    from PIL import Image

    width, height = Image.open(bench_report.figures["latency_ecdf"]).size
    assert width <= report.ECDF_COLUMNS * 400 and height < 3 * width


# What pdflatex with textcomp defines, of what a tabular cell may need (LATEX_SPECIAL's
# commands and the tabular's own): a command outside it would stop a paper's build.
LATEX_KNOWN = {"begin", "end", "hline", "textmu", "textasciitilde", "textasciicircum"} | {
    "textbackslash", "textsuperscript", "textless", "textgreater", "textbar", "delta",
    "geq", "leq", "rightarrow", "times", "pm", "infty",
}  # fmt: skip


def test_every_latex_table_is_ascii_with_known_commands_and_closed_math(
    bench_report: report.ReportPaths,
) -> None:
    for name, path in bench_report.latex.items():
        tex = path.read_text(encoding="utf-8")
        # pdflatex reads UTF-8 but has no glyph for most symbols: µ, δ, ≥ must be commands.
        assert tex.isascii(), (name, sorted({c for c in tex if not c.isascii()}))
        words = set(re.findall(r"\\([A-Za-z]+)", tex))
        assert words <= LATEX_KNOWN, (name, words - LATEX_KNOWN)
        for line in tex.splitlines():  # math opened in a cell is closed in it
            assert len(re.findall(r"(?<!\\)\$", line)) % 2 == 0, (name, line)
    # Every special character the escaper knows comes out as ASCII the same way.
    assert report.latex_escape("".join(report.LATEX_SPECIAL)).isascii()


def test_panel_titles_break_after_commas_into_short_lines() -> None:
    label = "host-copy, distinct, 10,000 VMAs, 3 mappings/page, via remove_migration_pte"
    lines = report._wrap(label).split("\n")
    assert lines == [
        "host-copy, distinct, 10,000 VMAs,",
        "3 mappings/page,",
        "via remove_migration_pte",
    ]
    assert report._wrap("unattributed") == "unattributed"
