"""`sparsectx compile-check`: every Triton kernel compiled for sm_90 (H100/H200) on this machine, no GPU needed.

The suite runs the kernels through Triton's interpreter, which never lowers them to GPU code: a kernel can pass
every test here and still not compile for a GPU (an op the interpreter accepts and the compiler does not, a block
shape whose shared memory exceeds what an SM has). These tests compile each kernel for Hopper with the installed
Triton and assert what the GPU launch needs, in child processes without TRITON_INTERPRET.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend can not compile for sm_90")

from sparsectx import compile_check  # noqa: E402


def _without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _kernel_names(module_name):
    """The @triton.jit kernels a kernel module launches (functions named *_kernel), read from its source."""
    import importlib

    source = inspect.getsource(importlib.import_module(module_name))
    return {line.split("(")[0][len("def "):] for line in source.splitlines()
            if line.startswith("def _") and line.split("(")[0].endswith("_kernel")}


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    """bf16 attention at head dims 64/128 (the supported models') and 256 (the largest the ops accept: its own
    launch configurations) with the first autotune candidate (the launch config under SPARSECTX_AUTOTUNE=0), and
    every compaction kernel, compiled for sm_90 through the command line."""
    out = tmp_path_factory.mktemp("compile") / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")  # as the suite runs: the command must leave the interpreter itself
    done = subprocess.run([sys.executable, "-m", "sparsectx.cli", "compile-check", "--dtypes", "bf16", "--head-dims",
                           "64,128,256", "--first-config", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    return done, json.loads(out.read_text()) if out.exists() else None


def test_every_kernel_compiles_for_sm90(quick_check):
    done, report = quick_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["arch"] == 90 and report["first_config"] and report["problems"] == []
    rows = report["rows"]
    assert rows and not [r for r in rows if r["error"]]
    compiled = {r["kernel"] for r in rows}
    expected = _kernel_names("sparsectx.kernels.attention") | _kernel_names("sparsectx.kernels.compaction")
    assert len(expected) >= 8 and compiled == expected  # no kernel left out of the check
    # each key layout at each head dim compiles its forward and its three backward kernels
    for dim in (64, 128, 256):
        for refs in ("no refs", "gathered refs", "packed refs"):
            kernels = {r["kernel"] for r in rows if r["variant"] == f"attention bf16 D={dim} {refs}"}
            assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"} <= kernels, (dim, refs, kernels)
    limit = compile_check.SHARED_MEMORY_LIMIT[90]
    assert all(0 <= r["shared_bytes"] <= limit for r in rows)
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_first_configs_do_not_spill_in_bf16_and_compaction_never_spills(quick_check):
    """kernels/attention.py says its first candidates compile for sm_90 (bf16) without register spills: they are
    the launch config of SPARSECTX_AUTOTUNE=0 and the autotuner's first guess. At head dim 256 the first candidates
    of the head-dim-128 lists needed 256 KB of shared memory (forward) and spilled (backward)."""
    _, report = quick_check
    spilled = [(r["variant"], r["kernel"], r["config"], r["spill_bytes"]) for r in report["rows"] if r["spill_bytes"]]
    assert spilled == []


def test_table_lists_every_binary(quick_check):
    done, report = quick_check
    for row in report["rows"]:
        assert any(line.startswith(row["variant"]) and row["kernel"] in line and row["config"] in line
                   for line in done.stdout.splitlines()), row
    assert f"{len(report['rows'])} binaries for sm_90; spilling: 0" in done.stdout


def _run_script(tmp_path, body):
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_without_interpreter(),
                          timeout=300)


def test_compile_only_launch_reports_resources_and_compile_errors(tmp_path):
    """The compile-only launch path on kernels of known cost: a launch compiles (nothing runs: the output keeps its
    values) for the asked arch, a kernel with a large local tile needs the shared memory it asks for, and a kernel
    that can not compile raises its compile error (the check reports it as a problem)."""
    done = _run_script(tmp_path, """
        import torch, triton, triton.language as tl
        from sparsectx import compile_check as cc

        @triton.jit
        def double(X, Y, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)

        @triton.jit
        def bad(X, BLOCK: tl.constexpr):
            tl.store(X + tl.arange(0, BLOCK), 1.0)  # BLOCK is not a power of two: not compilable

        seen = []
        x, y = torch.ones(256), torch.full((256,), 7.0)
        for arch in (80, 90):
            with cc._compile_only(arch, lambda f, kw, k, s: seen.append((arch, f.fn.__name__, k))):
                double[(2,)](x, y, 256, BLOCK=128)
        assert torch.equal(y, torch.full((256,), 7.0)), "a compile-only launch ran"
        assert [(a, n) for a, n, _ in seen] == [(80, "double"), (90, "double")]
        assert ".target sm_80" in seen[0][2].asm["ptx"] and ".target sm_90a" in seen[1][2].asm["ptx"]
        regs, stack = cc._resources(seen[1][2].asm["cubin"])
        assert 0 < regs <= 255 and stack == 0
        try:
            with cc._compile_only(90, lambda *a: None):
                bad[(1,)](x, BLOCK=100)
        except Exception as e:
            print("compile error:", type(e).__name__)
        else:
            raise AssertionError("a kernel that can not compile compiled")
        # after the block, Triton's own driver and launch path are back
        from triton.runtime.jit import JITFunction
        from triton.runtime.autotuner import Autotuner
        assert JITFunction.run.__name__ == "run" and Autotuner.run.__name__ == "run"
        print("ok")
    """)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "compile error:" in done.stdout and done.stdout.rstrip().endswith("ok")


def test_problems_flags_errors_and_shared_memory_over_the_arch_limit():
    rows = [compile_check.Compiled("a", "_fwd_kernel", "w8", 128, 0, compile_check.SHARED_MEMORY_LIMIT[90]),
            compile_check.Compiled("b", "_fwd_kernel", "w8", 128, 0, compile_check.SHARED_MEMORY_LIMIT[90] + 1),
            compile_check.Compiled("c", "?", "?", error="CompilationError: boom")]
    found = compile_check.problems(rows, 90)
    assert len(found) == 2 and found[0].startswith("c: does not compile") and found[1].startswith("b: _fwd_kernel")
    assert compile_check.problems(rows[:2], 89)[0].startswith("a:")  # 99 KB per block on sm_89


def test_command_line_refuses_unknown_dtypes_and_head_dims(capsys):
    from sparsectx import cli

    for argv in (["--dtypes", "fp8"], ["--head-dims", "0"], ["--head-dims", "64,x"]):
        with pytest.raises(SystemExit):
            cli.main(["compile-check", *argv])
        assert "expected" in capsys.readouterr().err
