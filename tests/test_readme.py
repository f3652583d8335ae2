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
