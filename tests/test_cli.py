"""The ``sparsectx`` command (help, info, bench) and the packaging of the kernels folder."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sparsectx
from sparsectx import benchmarks, cli

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (sparsectx may be installed elsewhere)
SMALL_CASE = "compaction"
ROW_KEYS = {"case", "shape", "impl", "time_ms", "tflops", "gbps", "ratio", "ok", "err", "peak_mem_gb", "note", "ours"}
SUBPROCESS_TIMEOUT_S = 120


def _console_script() -> str:
    """The installed ``sparsectx`` entry point: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("sparsectx")
    found = str(beside) if beside.exists() else shutil.which("sparsectx")
    assert found, "the sparsectx console script is not installed (pip install -e .)"
    return found


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "bench" in out


def test_importing_sparsectx_leaves_torch_dynamo_unimported(tmp_path):
    """torch._dynamo takes about as long to import as torch itself: sparsectx's host work that torch.compile must
    not trace is marked lazily (``ops._eager_under_compile``), so a plain import (the CLI's too) does not load it."""
    code = "import sys, sparsectx, sparsectx.cli; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_bench_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--case", "--json", "--plot", "--quick"):
        assert option in out


def test_bench_rejects_unknown_case(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--case", "no-such-case"])
    assert exit_info.value.code != 0
    assert "--case" in capsys.readouterr().err


@pytest.mark.parametrize("device, words", [("bogus", "not a torch device")] +
                         ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]))
def test_bench_rejects_an_unusable_device(device, words):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--case", SMALL_CASE, "--device", device])
    assert words in str(exit_info.value.code) and "--device" in str(exit_info.value.code)


def test_bench_refuses_the_full_shapes_on_a_cpu_before_any_work(capsys, tmp_path):
    """--size full on the CPU ran for hours or ran out of memory (klein-9B's step in fp32), after printing a header;
    refused before anything is made (the --json path's folders included)."""
    with pytest.raises(SystemExit, match="--size full is the real models' shapes, for a GPU"):
        cli.main(["bench", "--case", SMALL_CASE, "--device", "cpu", "--size", "full",
                  "--json", str(tmp_path / "made" / "run.json")])
    assert capsys.readouterr().out == "" and not (tmp_path / "made").exists()


def test_an_output_path_that_can_not_be_written_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """The folder check asked os.access, which says yes to root for any folder (containers run as root): the case
    ran, then writing the JSON failed with a traceback. Now a file is made and removed first (a unique name: the
    write's own PATH.tmp may be another process's)."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def refusing_mkstemp(*args, dir=None, **kwargs):
        if str(dir).startswith(str(tmp_path / "locked")):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refusing_mkstemp)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # as for root
    ran = []
    monkeypatch.setattr(benchmarks, "measure_ceilings", lambda device: ran.append(device) or {})
    with pytest.raises(SystemExit, match=r"--json '.*locked/run.json' can not be written \(.*Permission denied"):
        cli.main(["bench", "--case", SMALL_CASE, "--json", str(tmp_path / "locked" / "run.json")])
    assert not ran and capsys.readouterr().out == ""
    path = tmp_path / "free" / "run.json"
    benchmarks.check_output_path("--json", str(path))  # a writable path passes and leaves nothing behind
    assert list(path.parent.iterdir()) == []


def test_a_closed_stdout_ends_the_command_without_a_traceback(monkeypatch, capsys):
    """``sparsectx bench ... | head``: the reader went away; a BrokenPipeError traceback ended the run before."""
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    dup2 = []
    monkeypatch.setattr(os, "dup2", lambda fd, fd2: dup2.append(fd2))
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(fileno=lambda: 99, write=len, flush=lambda: None))
    parser = cli.build_parser()
    args = parser.parse_args(["info"])
    args.func = broken
    monkeypatch.setattr(cli, "build_parser", lambda: types.SimpleNamespace(parse_args=lambda argv: args))
    assert cli.main(["info"]) == 1
    assert dup2 == [99]  # later writes to stdout (at exit) go nowhere
    assert "stdout was closed before the command finished" in capsys.readouterr().err


def test_info_prints_the_path_each_op_takes(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        match = re.search(rf"^ops path, {name}\s+(\S+)\s*$", out, re.MULTILINE)
        assert match, f"no ops path line for {name} in:\n{out}"
        assert match.group(1) == sparsectx.backend_for(device, dtype)
    assert torch.__version__ in out
    if device == "cpu":  # the CPU's model and count, as the bench records its host (said 'cpu (cpu)' before)
        assert re.search(rf"^device\s+cpu \({re.escape(benchmarks.host_cpu())}\)$", out, re.MULTILINE), out


def _check_bench_json(path: Path, case: str) -> list:
    data = json.loads(path.read_text())
    assert {"meta", "rows"} <= set(data)
    meta, rows = data["meta"], data["rows"]
    assert meta["cases"] == [case]
    assert meta["torch"] == torch.__version__
    assert meta["ceilings"]["copy_GBps"] > 0
    assert isinstance(meta["autotune"], dict)  # the run's own autotuner picks (a subprocess has its own)
    assert rows and all(set(row) - {"checked_by"} == ROW_KEYS for row in rows)
    assert {row["case"] for row in rows} == {case}
    blocks = {}
    for row in rows:
        blocks.setdefault(row["shape"], []).append(row)
    for block in blocks.values():
        base = block[0]
        assert base["impl"].startswith("sparsectx")
        assert base["time_ms"] > 0 and base["ratio"] == 1.0
        assert base["ok"] is not None or base["checked_by"] >= 1  # its output was checked (its own or by peers)
        for row in block[1:]:
            assert row["ok"] is not False, f"{row['impl']}: {row['note']}"
            if row["time_ms"] is not None:
                assert math.isclose(row["ratio"], row["time_ms"] / base["time_ms"], rel_tol=1e-9)
            else:
                assert row["note"].startswith("unavailable")
        # every peer that ran was checked against sparsectx's result
        checked = [r for r in block[1:] if r["ok"] is not None]
        assert checked and all(r["ok"] for r in checked)
    return rows


def test_bench_in_process_writes_json_table_and_plot(tmp_path, capsys):
    out_json, plot = tmp_path / "bench.json", tmp_path / "ratios.png"
    assert cli.main(["bench", "--quick", "--case", SMALL_CASE, "--json", str(out_json), "--plot", str(plot)]) == 0
    rows = _check_bench_json(out_json, SMALL_CASE)
    assert json.loads(out_json.read_text())["meta"]["autotune"] == sparsectx.ops.kernel_configs()  # same process
    printed = capsys.readouterr().out
    # the same run as markdown for bench/RESULTS.md: a header with the versions, one table row per implementation
    assert cli.main(["report", str(out_json)]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("### ") and f"torch {torch.__version__}" in markdown
    table_lines = [line for line in markdown.splitlines()
                   if line.startswith("| ") and not line.startswith("| implementation |")]
    assert len(table_lines) == len(rows)  # rows come block by block, in the tables' order
    for row, line in zip(rows, table_lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["impl"]
        if row["time_ms"] is not None:
            assert math.isclose(float(cells[1]), row["time_ms"], rel_tol=1e-3)
            assert math.isclose(float(cells[3]), row["ratio"], abs_tol=0.006)
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["report", str(out_json) + ".missing"])
    for row in rows:
        assert row["impl"] in printed  # the table shows every implementation
    assert plot.read_bytes().startswith(b"\x89PNG") and f"plot written to {plot}" in printed


def test_bench_merge_into_keeps_the_runs_parts_in_one_file_as_rows_come(tmp_path, monkeypatch):
    """The GPU check's bench steps merge into one file as their rows come (``--merge-into``: the device brings
    back 8 files, and the steps' own JSON files were merged only at the end, so a check killed in a later step lost
    every row): the file equals ``report --merged`` of the parts; a case already there, or a run of another commit,
    is refused before it runs."""
    merged = tmp_path / "bench.json"
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    for case, part in zip((SMALL_CASE, "rope_tables"), parts):
        assert cli.main(["bench", "--quick", "--case", case, "--json", str(part), "--merge-into", str(merged)]) == 0
    expected = tmp_path / "expected.json"
    assert cli.main(["report", "--merged", str(expected), *map(str, parts)]) == 0
    assert json.loads(merged.read_text()) == json.loads(expected.read_text())
    assert [p["file"] for p in json.loads(merged.read_text())["meta"]["parts"]] == ["a.json", "b.json"]
    before = merged.read_text()
    with pytest.raises(SystemExit, match="already holds rows of rope_tables"):
        cli.main(["bench", "--quick", "--case", "rope_tables", "--merge-into", str(merged)])
    monkeypatch.setenv("SPARSECTX_COMMIT", "another-commit")
    with pytest.raises(SystemExit, match="commit 'another-commit' differs"):
        cli.main(["bench", "--quick", "--case", "selection", "--merge-into", str(merged)])
    assert merged.read_text() == before


def test_bench_plot_of_a_format_matplotlib_lacks_is_refused_before_the_run(tmp_path, capsys):
    """--plot ratios.xyz failed in matplotlib's savefig after the whole run (and the FAILED lines after it were
    never printed); --plot ratios (no extension) wrote ratios.png and said it wrote ratios; --plot ratios.pgf (a
    matplotlib format that needs a TeX installation) failed after the run with "'xelatex' not found"."""
    pytest.importorskip("matplotlib")
    for name in ("ratios.xyz", "ratios", "ratios.pgf"):
        out_json, plot = tmp_path / "bench.json", tmp_path / name
        with pytest.raises(SystemExit, match=r"--plot .*a file name ending in one of matplotlib.s formats .*\.png"):
            cli.main(["bench", "--quick", "--case", SMALL_CASE, "--json", str(out_json), "--plot", str(plot)])
        assert not out_json.exists() and not list(tmp_path.glob("ratios*"))
        assert "sparsectx bench on" not in capsys.readouterr().out  # refused before the run started


def test_bench_plot_without_matplotlib_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """--plot asks for a file: without matplotlib the command fails at once (it ran the whole benchmark and exited 0
    without the plot before), and nothing is measured or written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out_json, plot = tmp_path / "bench.json", tmp_path / "ratios.png"
    with pytest.raises(SystemExit, match=r"--plot .*matplotlib is not installed"):
        cli.main(["bench", "--quick", "--case", SMALL_CASE, "--json", str(out_json), "--plot", str(plot)])
    assert not out_json.exists() and not plot.exists()
    assert "sparsectx bench on" not in capsys.readouterr().out  # refused before the run started


def test_bench_console_script_writes_json(tmp_path):
    out_json = tmp_path / "bench.json"
    done = subprocess.run([_console_script(), "bench", "--quick", "--case", SMALL_CASE, "--json", str(out_json)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    _check_bench_json(out_json, SMALL_CASE)


def test_the_console_script_exits_2_on_a_refused_option_and_1_is_left_to_failed_checks(tmp_path):
    """A refused option that the command finds itself (``--device bogus``, a folder as --json, a report of no file)
    exited 1, the status of a run whose checks FAILED, while argparse's own refusals exit 2: a script running the
    benchmarks could not tell a typo from a failed check. Both exit 2 now, the message on stderr."""
    runs = [["bench", "--case", SMALL_CASE, "--device", "bogus"],
            ["bench", "--quick", "--case", SMALL_CASE, "--json", str(tmp_path)],
            ["report", str(tmp_path / "missing.json")],
            ["bench", "--case", "no-such-case"]]  # argparse's own refusal, for comparison
    for argv in runs:
        done = subprocess.run([_console_script(), *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
        assert done.returncode == 2, (argv, done.returncode, done.stderr)
        assert "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(SystemExit) as exit_info:  # cli.main itself raises it (a caller in Python catches it)
        cli.main(["bench", "--case", SMALL_CASE, "--device", "bogus"])
    assert isinstance(exit_info.value, benchmarks.UsageError) and "--device" in str(exit_info.value)


def test_format_table_marks_failed_checks():
    row = dict(case="c", shape="s", impl="peer", time_ms=2.0, tflops=None, gbps=None, ratio=2.0, ok=False,
               err=0.5, peak_mem_gb=None, note="MISMATCH with sparsectx")
    base = dict(row, impl="sparsectx", time_ms=1.0, ratio=1.0, ok=None, err=None, note="")
    table = benchmarks.format_table([base, row])
    peer_line = next(line for line in table.splitlines() if line.strip().startswith("peer"))
    assert "FAIL" in peer_line


def test_relative_error_flags_nan_and_shape_changes():
    a = torch.ones(4, dtype=torch.float64)
    assert benchmarks.relative_error(a, a) == 0.0
    assert benchmarks.relative_error(a * float("nan"), a) == math.inf
    assert benchmarks.relative_error(torch.ones(5, dtype=torch.float64), a) == math.inf
    assert benchmarks.relative_error((a, a + 1e-3), (a, a)) == pytest.approx(1e-3)


def test_one_wrong_row_among_many_fails_the_benchmark_check():
    """The whole-tensor relative error hardly sees one zeroed token among 16384 (7.8e-3 of the norm: under bf16's
    bound); the worst row's error against the mean row norm (~1 here) fails the check. Rounding-sized noise on
    every row passes."""
    gen = torch.Generator().manual_seed(0)
    expected = torch.randn(16384, 2, 32, generator=gen)
    workload = types.SimpleNamespace(exact=False, dtype=torch.bfloat16)
    wrong = expected.clone()
    wrong[1234] = 0.0
    assert benchmarks.relative_error(wrong, expected) <= benchmarks.REL_ERR_BOUND[torch.bfloat16]
    assert benchmarks.worst_row_error(wrong, expected) > 0.5  # the zeroed row: its own norm over the mean one
    assert benchmarks.results_match(wrong, expected, workload)[0] is False
    noisy = expected * (1 + 4e-3 * torch.randn(expected.shape, generator=gen))
    assert benchmarks.results_match(noisy, expected, workload)[0] is True
    assert benchmarks.results_match((noisy, wrong), (expected, expected), workload)[0] is False


def test_kernels_import_as_sparsectx_kernels():
    import sparsectx.kernels as kernels

    assert kernels.__name__ == "sparsectx.kernels"
    # the installed sparsectx.kernels is this checkout's kernels/ (linked by an editable install, copied otherwise)
    installed = Path(kernels.__file__).resolve().parent
    for name in ("attention.py", "compaction.py"):
        assert (installed / name).read_bytes() == (REPO_ROOT / "kernels" / name).read_bytes()


def test_top_level_kernels_folder_is_not_hugging_face_kernels(tmp_path):
    """Run in the repo root (its folder ``kernels/`` is then importable as ``kernels``): transformers must not
    take it for Hugging Face's ``kernels`` package, i.e. it finds that package available there exactly when it finds
    it elsewhere (transformers 5.25 depends on it: installed with it, it is what ``import kernels`` gives, as the
    next test checks; without it, this folder must read as absent)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib.metadata as m, transformers.utils as u\n"
             "try:\n    m.version('kernels'); installed = True\nexcept m.PackageNotFoundError:\n    installed = False\n"
             "print(installed, u.is_kernels_available())")
    answers = {}
    for where in (REPO_ROOT, tmp_path):
        done = subprocess.run([sys.executable, "-c", probe], cwd=where, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        answers[where] = done.stdout.strip().splitlines()[-1]
    assert answers[REPO_ROOT] == answers[tmp_path], answers
    installed, available = answers[REPO_ROOT].split()
    assert installed == available or installed == "True", answers  # (available only if installed)
    # without Hugging Face's package (its site-packages left off sys.path: installed here with transformers), the
    # folder reads as an empty namespace package, which no probe takes for it: no __file__, nothing exported
    hidden = ("import sys\nsys.path = [p for p in sys.path if not p.endswith(('site-packages', 'dist-packages'))]\n"
              "import kernels\nprint(getattr(kernels, '__file__', None), "
              "[n for n in vars(kernels) if not n.startswith('_')])")
    done = subprocess.run([sys.executable, "-c", hidden], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None []", done.stdout


def test_top_level_kernels_folder_hands_over_to_an_installed_hugging_face_kernels(tmp_path):
    """Run in the repo root with Hugging Face's ``kernels`` installed (a stand-in here): ``import kernels`` gives
    that package, as diffusers' hub-kernel backends import it (before: this checkout's folder, without
    ``get_kernel``: an ImportError inside diffusers)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", "from kernels import get_kernel; import kernels; "
                           "print(get_kernel('x'), kernels.__file__)"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["x", str(site / "kernels" / "__init__.py")]


def test_reference_point_rows_are_checked_for_shape_and_finite_values():
    """A row computing a different function by design (comparable=False, no verify) still fails on a wrong shape or
    non-finite values, in the table as in pytest bench/."""
    device = torch.device("cpu")
    x = torch.randn(3, 4)
    impls = [benchmarks.Impl("sparsectx", lambda: x * 2),
             benchmarks.Impl("different but sound", lambda: x * 3, comparable=False),
             benchmarks.Impl("wrong shape", lambda: x[:2], comparable=False),
             benchmarks.Impl("nan", lambda: x * math.nan, comparable=False)]
    rows = benchmarks.run_workload(benchmarks.Workload("t", "3x4", impls, torch.float32), device, quick=True)
    by_name = {row["impl"]: row for row in rows}
    assert by_name["different but sound"]["ok"] is True
    assert by_name["wrong shape"]["ok"] is False and "(2, 4)" in by_name["wrong shape"]["note"]
    assert by_name["nan"]["ok"] is False and "non-finite" in by_name["nan"]["note"]
    assert benchmarks.reference_point_problem((x, x), (x,)) == "2 outputs, not 1"
    assert "float64" in benchmarks.reference_point_problem(x.double(), x)
    assert benchmarks.reference_point_problem((x, None), (x, None)) == ""


def test_a_failing_sparsectx_row_is_an_error_and_a_failing_peer_is_unavailable():
    """Only peers may be "unavailable": an exception in one of sparsectx's own rows (a variant, a breakdown part)
    fails the table and pytest bench/ instead of passing as a skip."""
    device = torch.device("cpu")
    x = torch.randn(3, 4)

    def broken():
        raise RuntimeError("boom")

    impls = [benchmarks.Impl("sparsectx", lambda: x * 2), benchmarks.Impl("sparsectx variant", broken),
             benchmarks.Impl("(a) a part of the drop-in", broken, comparable=False),
             benchmarks.Impl("cache of every token", broken, comparable=False, ours=True),
             benchmarks.Impl("selector scores + a peer's top-k", broken),
             benchmarks.Impl("a peer", broken), benchmarks.Impl("a working peer", lambda: x * 2)]
    workload = benchmarks.Workload("t", "3x4", impls, torch.float32)
    by_name = {row["impl"]: row for row in benchmarks.run_workload(workload, device, quick=True)}
    for name in ("sparsectx variant", "(a) a part of the drop-in", "cache of every token"):
        assert by_name[name]["ok"] is False and by_name[name]["note"] == "error: RuntimeError: boom"
    for name in ("a peer", "selector scores + a peer's top-k"):
        assert by_name[name]["ok"] is None and by_name[name]["note"].startswith("unavailable")
    assert by_name["a working peer"]["ok"] is True
    with pytest.raises(RuntimeError, match="boom"):
        benchmarks.checked_run(workload, "sparsectx variant")
    with pytest.raises(benchmarks.Unavailable, match="boom"):
        benchmarks.checked_run(workload, "a peer")


def test_bench_on_a_cpu_runs_one_torch_thread_and_restores_the_count(monkeypatch):
    """On a busy 2-core machine torch's threads competing with other work inflated CPU timings 50-100x (ratios
    became noise): a CPU run uses one thread, says so in its metadata, and gives the caller its count back."""
    from sparsectx import benchmarks

    seen = []
    monkeypatch.setattr(benchmarks, "_main", lambda args, device: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli.main(["bench", "--device", "cpu"]) == 0
        assert seen == [benchmarks.CPU_THREADS] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    meta = benchmarks.run_metadata(torch.device("cpu"), "tiny", True, ["compaction"])
    assert f"{benchmarks.CPU_THREADS} torch thread" in meta["timing"]


def test_the_command_without_a_subcommand_is_a_usage_error(capsys):
    """CLI1: `sparsectx` alone exits with argparse's usage error (2), not an AttributeError."""
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_the_benchmark_docs_list_every_case():
    """docs/benchmarks.md's `sparsectx bench [--case ...]` line lists the cases in the order they run (it lacked
    e2e_glm)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    listed = re.search(r"sparsectx bench \[--case ([a-z0-9_ \n]+)\]", text)
    assert listed, "no `sparsectx bench [--case ...]` line in docs/benchmarks.md"
    assert tuple(listed.group(1).split()) == benchmarks.CASE_ORDER
