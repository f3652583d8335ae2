"""The README's example runs as written (on the CPU: device and dtype swapped) and computes what it says."""
import re
from pathlib import Path

import torch

import sparsectx

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_code() -> str:
    text = README.read_text()
    section = text[text.index("## Example"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_matches_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch reference path: the shapes are GPU-sized
    code = _example_code().replace('device="cuda"', 'device="cpu"').replace("torch.bfloat16", "torch.float32")
    assert "sparse_attention" in code and "compact_tokens" in code
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), scope)
    q, k, v, cu, kept, out = (scope[name] for name in ("q", "k", "v", "cu", "kept", "out"))
    assert kept.cu_seqlens.tolist() == [0, 205, 205 + 1024]  # 5% and 25% of 4096 (rounded half up)
    expected, _ = sparsectx.reference.sparse_attention_ref(
        q.double(), k.double(), v.double(), cu, cu, ref_k=scope["ref_k"].double(), ref_v=scope["ref_v"].double(),
        ref_index=kept.index, cu_seqlens_ref=kept.cu_seqlens)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


DOCS = sorted((README.parent / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation other than '-' and '_' dropped, spaces
    turned into '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # (a '#' line in a code block is no heading)
    return {_github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_the_docs_pages_exist_and_the_readme_links_each():
    assert {p.name for p in DOCS} >= {"drop-in.md", "fine-tuning.md", "ops.md", "benchmarks.md"}
    linked = {(README.parent / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert set(DOCS) <= linked


def test_relative_links_of_the_readme_and_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with an anchor, a heading there
    (the README's long sections moved to docs/ on 2026-12-03: a moved heading must not leave a dead link)."""
    checked = 0
    for page in [README, *DOCS]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # (http:, https:, mailto:)
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                assert anchor in _anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"
            checked += 1
    assert checked >= 10


RUNS = README.parent / "bench" / "runs"
MS_FIGURES = re.compile(r"((?:\d+(?:\.\d+)?\s*/\s*)*\d+(?:\.\d+)?) ms\b")
DROP_IN_ROW, KEEP_ALL_ROW, NO_REFERENCE_ROW = ("sparsectx.enable (native attn)", "keep all reference tokens",
                                               "no reference (limit)")


def _runs() -> tuple:
    """(commit -> the rows of every GPU run of that commit recorded in bench/runs (``*-bench.json``), the commit of
    the latest run)."""
    import json

    runs: dict = {}
    dated = []
    for path in sorted(RUNS.glob("*-bench.json")):
        recorded = json.loads(path.read_text())
        runs.setdefault(recorded["meta"].get("commit"), []).extend(recorded["rows"])
        dated.append((recorded["meta"]["date"], recorded["meta"].get("commit")))
    return runs, max(dated)[1]


def _quoted(time_ms: float, figure: str) -> str:
    """``time_ms`` written with as many decimals as ``figure``."""
    return f"{time_ms:.{len(figure.partition('.')[2])}f}"


def test_the_readmes_measured_times_are_those_of_the_runs_it_names():
    """The README's "Measured speed" table is the klein-9B step rows of the run of the commit it names (each cell the
    drop-in's time at that reference count and ratio, the keep-all and no-reference columns those rows, the
    speed-ups keep-all over the cell), and every time in ms quoted below the table is a row's time of the latest
    recorded run: a figure typed by hand, or left behind when a run replaces another, fails here."""
    text = README.read_text()
    start = text.index("## Measured speed")
    section = text[start:text.index("\n## ", start + 1)]
    table_start = section.index("\n|")
    commit = re.findall(r"commit (\w+)", section[:table_start])[-1]
    runs, latest_commit = _runs()
    steps = [r for r in runs[commit] if r["case"] == "e2e"]

    def times(impl, shape_start):
        return {r["time_ms"] for r in steps if r["impl"] == impl and r["shape"].startswith(shape_start)}

    lines = [line for line in section.splitlines() if line.startswith("|")]
    percents = [int(cell.split("%")[0]) for cell in lines[0].split("|")[3:-2]]  # "| references | keep all | 25% ..."
    rows = [line.split("|")[1:-1] for line in lines[2:]]
    assert len(rows) == 3 and percents == [25, 10, 5]
    for cells in rows:
        refs = int(cells[0])
        keep_all = cells[1].split()[0]
        assert keep_all in {_quoted(t, keep_all) for t in times(KEEP_ALL_ROW, f"{refs} ref x")}, cells
        no_reference = cells[-1].split()[0]
        assert no_reference in {_quoted(t, no_reference) for t in times(NO_REFERENCE_ROW, "")}, cells
        for percent, cell in zip(percents, cells[2:-1]):
            time_ms, speed_up = re.fullmatch(r"\s*([\d.]+) ms \(([\d.]+)x\)\s*", cell).groups()
            assert time_ms in {_quoted(t, time_ms) for t in times(DROP_IN_ROW, f"{refs} ref x {percent}%")}, cells
            assert abs(float(keep_all) / float(time_ms) - float(speed_up)) <= 0.01, cells
    latest = [r["time_ms"] for r in runs[latest_commit] if r.get("time_ms") is not None]
    below = [figure.strip() for group in MS_FIGURES.findall(section[section.index("\n\n", table_start):])
             for figure in group.split("/")]
    assert len(below) >= 10, below
    assert [figure for figure in below if figure not in {_quoted(t, figure) for t in latest}] == []


def test_the_benchmark_docs_latest_run_is_the_latest_recorded_run():
    """docs/benchmarks.md's "Latest run" names the date and commit of the newest run in bench/runs: a new run
    recorded without that section rewritten (it described 2026-11-30's run after 2026-12-04's) fails here."""
    import json

    text = (README.parent / "docs" / "benchmarks.md").read_text()
    start = text.index("## Latest run")
    section = text[start:text.find("\n## ", start + 1) if "\n## " in text[start + 1:] else len(text)]
    meta = max((json.loads(path.read_text())["meta"] for path in RUNS.glob("*-bench.json")), key=lambda m: m["date"])
    named = re.search(r"Latest run \(([^)]*)\)", " ".join(section.split()))
    assert named is not None, "the section names its run as 'Latest run (card, versions, date, commit ...)'"
    assert meta["date"][:10] in named.group(1) and f"commit {meta['commit']}" in named.group(1), named.group(1)
