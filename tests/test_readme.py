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
