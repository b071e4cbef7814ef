"""Tests for resvae.report: the results table (CSV, Markdown), the figures and the HTML page,
over a small real sweep: four 2-epoch runs of the tiny preset (depths 20 and 24, plain and
residual), one hand-written eval.json, and one failed run that left no directory behind.
"""

import base64
import contextlib
import csv
import importlib
import io
import json
import math
import os
from html.parser import HTMLParser

import pytest
import torch
from conftest import clear_resvae_env, small_load
from PIL import Image

import resvae.data as data_module
from resvae import report as R
from resvae.cli import main
from resvae.config import resolve

T = importlib.import_module("resvae.train")  # the module: resvae.train is the function

RUNS = [(20, "none"), (20, "identity"), (24, "none"), (24, "identity")]
FAILED = {"name": "d24-projection", "depth": 24, "shortcut": "projection", "status": "failed",
          "error": "RuntimeError: out of memory | <script>alert(1)</script>\nTraceback ...",
          "dir": "d24-projection"}
EVAL = {"split": "test", "k": 8, "n_images": 64, "elbo_nats": 19000.0, "elbo_nats_se": 12.0,
        "elbo_bpd": 8.925, "elbo_bpd_se": 0.006, "iwae_nats": 18990.0, "iwae_nats_se": 12.0,
        "iwae_bpd": 8.9204, "iwae_bpd_se": 0.006, "active_units": 3, "latent_dim": 8}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep dir trained once for the module (small_runs is per test; its setup is repeated
    here: a private data cache, no RESVAE_* variables, 64-image val/test splits)."""
    root = tmp_path_factory.mktemp("sweep")
    # One thread: conftest's OMP_NUM_THREADS comes after torch's import, too late to count, and
    # two threads on two shared cores run these runs several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as undo:
        undo.callback(torch.set_num_threads, threads)
        clear_resvae_env(mp, tmp_path_factory.mktemp("cache"))
        mp.setattr(data_module, "load_dataset", small_load)
        entries = []
        for depth, shortcut in RUNS:
            name = f"d{depth}-{shortcut}"
            cfg = resolve(preset="tiny", environ={}, overrides={
                "max_epochs": 2, "subset": 64, "depth": depth, "shortcut": shortcut})
            T.train(cfg, root / name, progress=False)
            entries.append({"name": name, "depth": depth, "shortcut": shortcut,
                            "status": "done", "error": None, "dir": name})
    (root / "d20-identity" / "eval.json").write_text(json.dumps(EVAL))
    # a run from before summary.json had the model's size and cost: those cells stay empty
    summary_path = root / "d24-none" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for key in ("layers", "params", "flops_per_image", "images_seen"):
        del summary[key]
    summary_path.write_text(json.dumps(summary))
    entries.insert(2, FAILED)
    (root / "sweep.json").write_text(json.dumps({"runs": entries, "study": False}))
    return root


@pytest.fixture(scope="module")
def built(sweep):
    return R.report(sweep, html_out=sweep / "report.html")


def summary_of(sweep, name):
    return json.loads((sweep / name / "summary.json").read_text())


# --------------------------------------------------------------------------------- the table

def test_collect_rows_follow_sweep_json_and_read_each_file(sweep):
    dirs, entries = R.find_runs(sweep)
    rows = R.collect(dirs, entries)
    assert [r["name"] for r in rows] == ["d20-none", "d20-identity", "d24-projection",
                                         "d24-none", "d24-identity"]
    assert all(list(r) == R.COLUMNS for r in rows)
    by = {r["name"]: r for r in rows}
    # test bpd is the ELBO on the whole test split (summary.json), also when eval.json measured
    # the IWAE bound (and the ELBO) on fewer images
    assert by["d20-identity"]["test_bpd"] == summary_of(sweep, "d20-identity")["test_bpd"]
    assert by["d20-identity"]["test_iwae_bpd"] == EVAL["iwae_bpd"]
    assert by["d20-identity"]["active_units"] == 3
    s = summary_of(sweep, "d20-none")
    assert by["d20-none"]["test_bpd"] == s["test_bpd"]
    assert by["d20-none"]["test_iwae_bpd"] is None
    assert by["d20-none"]["val_loss"] == s["best_val_loss"]
    assert by["d20-none"]["train_loss"] == s["final_train_loss"]
    assert by["d20-none"]["train_time_s"] == s["training_seconds"]
    assert (by["d24-none"]["depth"], by["d24-none"]["shortcut"]) == (24, "none")
    s = summary_of(sweep, "d24-identity")
    assert by["d24-identity"]["params"] == s["params"] > 0
    assert by["d24-identity"]["gflops"] == s["flops_per_image"] / 1e9
    assert (by["d24-identity"]["layers"], by["d24-identity"]["images_seen"]) == (24, 2 * 64)
    assert by["d24-none"]["params"] is None  # not in that summary: unknown, not 0
    failed = by["d24-projection"]
    assert failed["status"] == "failed" and failed["error"] == FAILED["error"]
    assert (failed["depth"], failed["shortcut"]) == (24, "projection")
    assert all(failed[c] is None for c in R.COLUMNS
               if c not in ("name", "depth", "shortcut", "status", "error"))


def test_results_csv_has_every_run_with_full_values(sweep, built):
    with open(built["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["d20-none", "d20-identity", "d24-projection",
                                         "d24-none", "d24-identity"]
    by = {r["name"]: r for r in rows}
    assert by["d24-projection"]["error"] == FAILED["error"]  # whole text, newline and all
    assert by["d24-projection"]["val_loss"] == "" and by["d24-projection"]["status"] == "failed"
    assert float(by["d20-none"]["val_loss"]) == summary_of(sweep, "d20-none")["best_val_loss"]


def markdown_rows(text):
    """The body rows of the first Markdown table in `text`, split into cells."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    assert set(table[1]) <= set("|-: ")  # the header separator
    # split on unescaped pipes only
    return [[c.strip() for c in ln.replace("\\|", "\0").strip("|").split("|")] for ln in table[2:]]


def test_results_md_is_a_formatted_markdown_table(sweep, built):
    text = built["md"].read_text()
    rows = markdown_rows(text)
    assert len(rows) == 5 and all(len(r) == len(R.COLUMNS) for r in rows)
    by = {r[0]: dict(zip(R.COLUMNS, r)) for r in rows}
    params = summary_of(sweep, "d24-identity")["params"]
    assert params >= 1000 and by["d24-identity"]["params"] == f"{params:,}"  # 12,345
    assert by["d24-none"]["params"] == "" and by["d24-none"]["gflops"] == ""
    s = summary_of(sweep, "d20-none")
    assert by["d20-none"]["val_loss"] == f"{s['best_val_loss']:.1f}"
    assert by["d20-none"]["test_bpd"] == f"{s['test_bpd']:.3f}"
    assert by["d20-identity"]["test_bpd"] == f"{summary_of(sweep, 'd20-identity')['test_bpd']:.3f}"
    # a pipe in the error is escaped (the row keeps its cell count); only the first line is shown
    failed = by["d24-projection"]["error"]
    assert failed == "RuntimeError: out of memory \0 <script>alert(1)</script>"
    assert R.format_table(R.collect(*R.find_runs(sweep))) in text
    assert "| 100 | 164.7 h | 1782.3 | 1804.0 |" in text  # the study's Table 1 below it


@pytest.mark.parametrize("seconds, text", [(3.14, "3.1s"), (42.4, "42s"), (252, "4m12s"),
                                           (3599.6, "1h00m"), (11100, "3h05m")])
def test_format_time(seconds, text):
    assert R.format_time(seconds) == text


def test_study_table1_is_the_paper_numbers():
    assert [r["depth"] for r in R.STUDY_TABLE1] == [28, 40, 70, 100]
    assert R.STUDY_TABLE1[3] == {"depth": 100, "train_hours": 164.7, "train_loss": 1782.3,
                                 "val_loss": 1804.0}
    assert sum(r["train_hours"] for r in R.STUDY_TABLE1) == pytest.approx(385.8)


# ------------------------------------------------------------------------------ the figures

def test_figures_are_pngs(built):
    for name in R.FIGURES:
        assert built[name].name == f"{name}.png"
        with Image.open(built[name]) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
            im.verify()


def test_samples_figure_has_one_titled_grid_per_finished_run(built, sweep):
    with Image.open(built["samples"]) as im:
        im.verify()
    fig = R.plot_samples(*_rows_and_dirs(sweep))
    titles = sorted(ax.get_title() for ax in fig.axes if ax.images)
    assert titles == sorted(f"depth {d} {s}" for d, s in RUNS)  # the failed run has no grid


def _rows_and_dirs(sweep):
    dirs, entries = R.find_runs(sweep)
    return R.collect(dirs, entries), dirs


def test_degradation_draws_what_exists_with_one_kind_of_run(sweep):
    rows = [r for r in R.collect(*R.find_runs(sweep)) if r["shortcut"] == "none"]
    fig = R.plot_degradation(rows)
    ax = fig.axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == [20, 24]
    assert list(line.get_ydata()) == [r["train_loss"] for r in rows]
    assert "no residual runs" in ax.get_title()


# ------------------------------------------------------------------------------ the HTML page

class PageParser(HTMLParser):
    """Collects body rows per table class, every <img> src, and every attribute value."""

    def __init__(self):
        super().__init__()
        self.table, self.in_body = None, False
        self.body_rows, self.imgs, self.captions, self.attrs = {}, [], [], []
        self._caption = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attrs += [v for v in attrs.values() if v]
        if tag == "table":
            self.table = attrs.get("class")
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.body_rows[self.table] = self.body_rows.get(self.table, 0) + 1
        elif tag == "img":
            self.imgs.append(attrs["src"])
        elif tag == "figcaption":
            self._caption = ""

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False
        elif tag == "figcaption":
            self.captions.append(self._caption)
            self._caption = None

    def handle_data(self, data):
        if self._caption is not None:
            self._caption += data


def test_html_is_self_contained_with_every_run(built):
    text = built["html"].read_text(encoding="utf-8")
    page = PageParser()
    page.feed(text)
    page.close()
    assert page.body_rows == {"results": 5, "study": 4}
    assert "http://" not in text and "https://" not in text
    assert not any(a.startswith(("//", "file:")) for a in page.attrs)
    assert "<script>" not in text and "&lt;script&gt;" in text  # the error text is escaped
    # 3 figures + the 4 finished runs' sample grids (the failed one has none)
    assert len(page.imgs) == 7
    for src in page.imgs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True))) as im:
            assert im.format == "PNG"
            im.verify()
    assert sorted(page.captions) == sorted(f"depth {d}, shortcut {s}d{d}-{s}, epoch 2"
                                           for d, s in RUNS)  # (caption<br><small>detail)


# ------------------------------------------------------------------------ other entry points

def test_without_sweep_json_every_run_dir_is_a_run(sweep, tmp_path):
    for name in ("d24-none", "d20-identity"):
        (tmp_path / name).symlink_to(sweep / name)
    (tmp_path / "not-a-run").mkdir()  # no config.json
    paths = R.report(tmp_path)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["status"]) for r in rows] == [("d20-identity", "done"),
                                                        ("d24-none", "done")]
    assert "html" not in paths and all(paths[n].exists() for n in R.FIGURES)


def test_a_partly_finished_sweep_reports_every_run_with_its_state(sweep, tmp_path):
    # a sweep at work: one run done, one training now (its lock held), one not started
    from resvae.runs import RunLock

    (tmp_path / "d20-none").symlink_to(sweep / "d20-none")
    entries = [{"name": n, "depth": d, "shortcut": "none", "status": st, "dir": n}
               for n, d, st in (("d20-none", 20, "done"), ("d52-none", 52, "pending"),
                                ("d100-none", 100, "pending"))]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": entries}))
    with RunLock(tmp_path / "d52-none"):
        rows = R.collect(*R.find_runs(tmp_path))
        paths = R.report(tmp_path)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("d20-none", "done"), ("d52-none", "running"), ("d100-none", "pending")]
    assert [(r[0], r[-2]) for r in markdown_rows(paths["md"].read_text())] == [
        ("d20-none", "done"), ("d52-none", "running"), ("d100-none", "pending")]
    assert rows[0]["test_bpd"] is not None and rows[1]["test_bpd"] is None


def test_compare_prints_the_table_for_any_run_dirs(sweep):
    text = R.compare([sweep / "d24-identity", sweep / "d20-none"])
    assert [r[0] for r in markdown_rows(text)] == ["d24-identity", "d20-none"]


def test_missing_or_empty_sweep_dir_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        R.report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no runs"):
        R.report(tmp_path / "empty")
    with pytest.raises(ValueError, match="gone"):
        R.compare([tmp_path / "gone"])


@pytest.mark.parametrize("sweep_json, message", [
    ([1], "expected a JSON object, got a list"),
    ({"runs": 5}, "'runs' must be a list"),
    ({"runs": [{"depth": 20}]}, "needs a name"),  # (a KeyError traceback before)
    ({"runs": [{"name": "../../elsewhere"}]}, "needs a name"),  # never a path out of it
])
def test_a_malformed_sweep_json_is_one_line(tmp_path, capsys, sweep_json, message):
    (tmp_path / "sweep.json").write_text(json.dumps(sweep_json))
    for argv in (["report", str(tmp_path)], ["sweep", "--status", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sweep.json" in err[0] and message in err[0], err


def test_a_summary_json_that_is_not_an_object_is_one_line(sweep, tmp_path, capsys):
    # (an AttributeError traceback before)
    import shutil
    run = tmp_path / "r"
    shutil.copytree(sweep / "d20-none", run)
    (run / "summary.json").write_text("[1, 2]")
    for argv in (["compare", str(run)], ["report", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "summary.json: expected a JSON object, got a list" in err[0]


def _chromium():
    import shutil
    return os.environ.get("RESVAE_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")


def test_html_renders_in_a_real_browser(built, tmp_path):
    # A parser can't tell whether a browser shows the page: render it in headless Chromium and
    # check every embedded image decoded, then take the screenshot the README shows.
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="extra 'report' (playwright) not installed")
    if not _chromium():
        pytest.skip("no chromium executable (apt-get install chromium, or set RESVAE_CHROMIUM)")
    html_path = built["html"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            sizes = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            rows = page.eval_on_selector_all("table.results tbody tr", "rs => rs.length")
        finally:
            browser.close()
    assert len(sizes) == 3 + len(RUNS) and all(ok and w > 0 and h > 0 for ok, w, h in sizes)
    assert rows == len(RUNS) + 1  # and the failed run
    png = R.screenshot(html_path, tmp_path / "shot.png", chromium=_chromium())
    assert Image.open(png).size[0] == 1200


def test_curves_stay_readable_when_one_run_blows_up():
    from resvae.report import plot_curves, robust_top

    assert robust_top([9e3, 9.5e3, 1e4, 1.2e4]) is None  # nothing extreme: autoscale
    assert robust_top([9e3, 9.5e3, 1e4, 1.05e4, 1e23]) == 1.05e4
    assert robust_top([9e3, 1e4, math.inf]) == 1e4  # inf is clipped too
    rows = [{"depth": d, "shortcut": s} for d, s in ((20, "identity"), (20, "none"), (52, "none"))]

    def records(val):
        return [{"epoch": e + 1, "train_loss": 1e4 - e, "val_loss": v} for e, v in enumerate(val)]

    calm = [records([9.8e3, 9.6e3]), records([9.9e3, 9.7e3]), records([1.01e4, 9.9e3])]
    fig = plot_curves(rows, calm)
    assert fig.axes[1].get_ylim()[1] < 1.1e4 and "above the axis" not in fig.axes[1].get_title()
    blown = [*calm[:2], records([3.4e4, 1e23])]  # the README sweep's 204-layer plain run did this
    fig = plot_curves(rows, blown)
    lo, hi = fig.axes[1].get_ylim()
    assert hi < 4e4 and lo > 5e3  # the calm curves keep the axis, 1e23 does not flatten them
    assert "1 point above the axis" in fig.axes[1].get_title()
    marks = [ln for ln in fig.axes[1].lines if ln.get_marker() == "^"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [2]
    assert "above" not in fig.axes[0].get_title()  # train losses were calm
