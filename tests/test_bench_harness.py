"""The benchmark harness's judgement: the issues' targets read off a run's rows, the short summary a GPU check prints,
the merge of a GPU check's per-step JSON files. Rows are made by hand: these test the harness, not a speed."""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from sparsectx import benchmarks, cli, ops


def _row(case, shape, impl, time_ms, ok=True, **extra):
    row = dict(case=case, shape=shape, impl=impl, time_ms=time_ms, tflops=None, gbps=None, ratio=None, ok=ok,
               err=None, peak_mem_gb=None, note="")
    row.update(extra)
    return row


def _block(case, shape, times):
    """Rows of one (case, shape) block with ratios to the first row, as run_workload fills them: the first row
    sparsectx's (``ok`` None: the others are compared with it), the others compared with it and agreeing."""
    rows = [_row(case, shape, impl, t, ok=None if i == 0 else True, err=None if i == 0 else 0.0)
            for i, (impl, t) in enumerate(times.items())]
    for r in rows:
        if r["time_ms"] and rows[0]["time_ms"]:
            r["ratio"] = r["time_ms"] / rows[0]["time_ms"]
    return rows


def test_every_target_names_rows_its_case_produces():
    for target in benchmarks.TARGETS:
        case = benchmarks.CASES[target.case]
        names = tuple(case.impl_names) + tuple(getattr(case, "breakdown_impl_names", ()))
        assert target.ours in names and target.peer in names, target


def test_target_verdicts_judge_each_shape_against_its_goal():
    rows = _block("attention", "L=5632 (1 ref x 25%), H=24, D=128, bfloat16",
                  {"sparsectx (compacted)": 1.0, "sparsectx (gather)": 1.2, "sdpa cudnn": 0.7, "sdpa flash": 1.3})
    rows += _block("kv", "3 ref x 10% (1230 of 12288 tokens), target 4096", {
        "sparsectx.enable + KV cache": 10.0, "sparsectx.enable (sparsectx attn) + KV cache": 9.0,
        "plain run, all references, no cache": 46.0})
    rows += _block("kv", "4 ref x 5% (820 of 16384 tokens), target 4096", {
        "sparsectx.enable + KV cache": 10.0, "plain run, all references, no cache": 59.0})
    rows += _block("training", "B=4", {"sparsectx (packed varlen)": 2.0, "sdpa padded + key mask": None})
    lines = benchmarks.target_verdicts(rows)
    by_goal = {goal: [line for line in lines if goal in line] for goal in
               ("cuDNN", "FA2", "gather within 10%", "sparse + KV", "padded")}
    assert len(by_goal["cuDNN"]) == 1 and "x0.700 (>= 0.750: MISSES)" in by_goal["cuDNN"][0]
    assert len(by_goal["FA2"]) == 1 and "x1.300 (>= 1.150: meets)" in by_goal["FA2"][0]
    # gather 1.2 ms vs compacted 1.0 ms: 20% slower, outside the 10% allowed
    assert len(by_goal["gather within 10%"]) == 1 and "MISSES" in by_goal["gather within 10%"][0]
    kv = [line for line in by_goal["sparse + KV"] if "sparsectx attention" not in line]
    # the target depends on the reference count (4.5 for 3 refs, 6.0 for 4 refs), at either kept share; the shapes
    # the run lacks are said to be not measured
    assert len(kv) == 4
    assert "3 ref" in kv[0] and "x4.600 (>= 4.500: meets)" in kv[0]
    assert "4 ref" in kv[1] and "x5.900 (>= 6.000: MISSES)" in kv[1]
    assert "3 ref x 5%" in kv[2] and "not measured (no kv block of 3 ref x 5% in this run)" in kv[2]
    assert "4 ref x 10%" in kv[3] and "not measured (no kv block of 4 ref x 10% in this run)" in kv[3]
    # the sparsectx-attention row is judged on its own line; the shape without that row says so
    kv_attn = [line for line in by_goal["sparse + KV"] if "sparsectx attention" in line]
    assert len(kv_attn) == 4 and "3 ref" in kv_attn[0] and "x5.111 (>= 4.500: meets)" in kv_attn[0]
    assert "4 ref" in kv_attn[1] and "not measured" in kv_attn[1]
    assert len(by_goal["padded"]) == 1 and "not measured" in by_goal["padded"][0]
    assert len(lines) == 12  # no line for the targets whose case the run lacks


def test_masked_targets_judge_4x_over_both_peers_besides_the_ideal():
    """Issue 4's dense key-mask line asks for "within 1.3x of the ideal (>= 4x faster than both peers)": the first
    does not imply the second (x3.80 over cuDNN's boolean mask in the 2026-11-30 H200 run, within 1.3x of the
    ideal), so each peer is judged, for the plain and the autograd rows."""
    rows = _block("masked", "S=16896, 5220 keys kept, all queries, H=24, D=128, bfloat16", {
        "sparsectx masked_attention": 2.0, "sparsectx masked_attention (autograd: gathered)": 2.5,
        "sdpa bool key mask (cudnn)": 7.9, "flex_attention mask_mod": 8.0, "ideal: sdpa on compacted keys": 1.9})
    lines = [line for line in benchmarks.target_verdicts(rows) if ">= 4x faster" in line]
    assert len(lines) == 4, lines
    cudnn, flex, cudnn_grad, flex_grad = lines
    assert "than sdpa bool key mask (cudnn):" in cudnn and "x3.950 (>= 4.000: MISSES)" in cudnn
    assert "than flex_attention mask_mod:" in flex and "x4.000 (>= 4.000: meets)" in flex
    assert "(inputs requiring grad)" in cudnn_grad and "x3.160 (>= 4.000: MISSES)" in cudnn_grad
    assert "(inputs requiring grad)" in flex_grad and "x3.200 (>= 4.000: MISSES)" in flex_grad
    # the kept-queries block: against the kept queries under the boolean key mask (its same query set)
    kept = _block("masked", "S=16896, 5220 keys kept, kept queries only, H=24, D=128, bfloat16", {
        "sparsectx masked_attention (query_mask)": 0.75, "sdpa bool key mask (cudnn), kept queries": 2.9,
        "ideal: sdpa on compacted queries and keys": 0.6})
    lines = [line for line in benchmarks.target_verdicts(kept) if ">= 4x faster" in line]
    assert len(lines) == 1 and "(kept queries): x3.867 (>= 4.000: MISSES)" in lines[0], lines


def test_selection_verdict_takes_the_worst_share_probe_included():
    shape = "3 ref x 4096 tokens, C=128, selector {}, H=32, D=128"
    rows = [_row("selection", shape.format("uniform"), "select, fixed 10%", 0.1, step_pct=0.3),
            _row("selection", shape.format("attention"), "select, adaptive", 0.2, step_pct=0.6,
                 step_pct_with_probe=2.4),
            _row("selection", shape.format("attention"), "selector scores + torch stable top-k (fixed 10%)", 9.0,
                 step_pct=30.0)]  # a peer: not ours, not judged
    line = benchmarks.selection_verdict(rows)
    assert "MISSES: worst 2.40% with the automatic probe (attention, 3 ref, select, adaptive" in line
    assert "2 of 2 rows judged" in line
    rows[1]["step_pct_with_probe"] = 1.5
    assert "meets: worst 1.50%" in benchmarks.selection_verdict(rows)
    unjudged = [dict(r, step_pct=None, step_pct_with_probe=None) for r in rows]
    assert "not judged" in benchmarks.selection_verdict(unjudged)
    assert benchmarks.selection_verdict(_block("kv", "3 ref", {"a": 1.0})) is None


def test_drop_in_selection_verdict_is_what_a_new_attention_selection_adds_to_the_step():
    """(d3) - (d) of each e2e breakdown block, as a share of the run's no-reference step; a failed check or a
    missing time judges nothing; blocks without a (d3) row give no line."""
    steps = _block("e2e", "1 ref x 10%", {"sparsectx compact_tokens + step": 101.0, "no reference (limit)": 100.0})
    breakdown = _block("e2e", "3 ref x 5%, enable-path breakdown",
                       {"sparsectx compact_tokens + step": 120.0, benchmarks.DROP_IN_STEP_ROW: 120.5,
                        benchmarks.DROP_IN_ATTENTION_ROW: 123.0})
    lines = benchmarks.drop_in_selection_verdicts(steps + breakdown)
    assert len(lines) == 1 and "3 ref x 5%" in lines[0]
    assert "MISSES: adds 2.5 ms, 2.50% of the no-reference step (100 ms)" in lines[0]
    breakdown[2]["time_ms"] = 121.5
    assert "meets: adds 1 ms, 1.00%" in benchmarks.drop_in_selection_verdicts(steps + breakdown)[0]
    # timed in two passes (A B, B A): the mean of each pass's difference, not the fastest passes' difference
    breakdown[1]["pass_ms"], breakdown[2]["pass_ms"] = [120.5, 125.0], [121.5, 125.5]
    assert "meets: adds 0.75 ms, 0.75% of the no-reference step (100 ms) (mean of the 2 passes' differences: +1, " \
           "+0.5 ms)" in benchmarks.drop_in_selection_verdicts(steps + breakdown)[0]
    breakdown[2]["pass_ms"] = [126.0, 123.0]  # fastest passes 1 ms apart; the passes' differences +5.5 and -2
    line = benchmarks.drop_in_selection_verdicts(steps + breakdown)[0]
    assert "not resolved (the passes disagree): adds 1.75 ms" in line and "+5.5, -2 ms" in line
    breakdown[2]["pass_ms"] = [124.0, 128.0]
    assert "MISSES: adds 3.25 ms" in benchmarks.drop_in_selection_verdicts(steps + breakdown)[0]
    del breakdown[1]["pass_ms"], breakdown[2]["pass_ms"]
    assert benchmarks.target_verdicts(steps + breakdown)[-1] == benchmarks.drop_in_selection_verdicts(
        steps + breakdown)[0]  # the summary's targets end with it
    assert "not measured" in benchmarks.drop_in_selection_verdicts(breakdown)[0]  # no no-reference step in the run
    breakdown[2]["ok"] = False
    assert "not judged" in benchmarks.drop_in_selection_verdicts(steps + breakdown)[0]
    assert benchmarks.drop_in_selection_verdicts(steps) == []


def test_summary_lists_untimed_and_failed_peers_and_the_targets():
    rows = _block("compaction", "B=1, N=12288", {"sparsectx compact_tokens (scores+budget)": 0.02,
                                                 "topk+sort+gather": 0.13, "x[mask] (host sync)": 0.07})
    rows += [_row("compaction", "B=1, N=12288", "CUDA graph replay", None, ok=None),
             _row("compaction", "B=1, N=12288", "broken peer", None, ok=False)]
    rows[2]["ok"] = False
    meta = {"device": "NVIDIA H200", "cuda": "12.8", "size": "full", "autotune_runs": [
        {"attention_fwd": {"picked": {"D=128": "BLOCK_M: 128"}}}]}
    text = benchmarks.format_summary(meta, rows)
    block_line = next(line for line in text.splitlines() if line.startswith("compaction"))
    assert "topk+sort+gather 0.130ms x6.50 |" in block_line
    assert "x[mask] (host sync) 0.070ms x3.50 FAIL" in block_line
    assert block_line.endswith("CUDA graph replay n/a | broken peer n/a FAIL")
    assert "issue 3 compaction" in text and "x6.500 (>= 5.000: meets)" in text
    assert "tiny shapes" not in text
    assert "autotune attention_fwd D=128: BLOCK_M: 128" in text
    assert "tiny shapes" in benchmarks.format_summary(dict(meta, size="tiny"), rows)
    assert "a CPU run" not in text  # a CPU run's summary says the targets are a GPU's
    assert "a CPU run: the targets are set for a GPU" in benchmarks.format_summary(dict(meta, cuda=None), rows)


def test_parts_without_a_commit_are_not_merged(tmp_path):
    """Two parts that both record no commit (a GPU machine's tree has no .git; SPARSECTX_COMMIT not given) were
    merged as one run: None equals None. Nothing shows they are one code, as the merge's rule requires."""
    rows = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    more = _block("training", "B=4", {"sparsectx (packed varlen)": 1.0, "sdpa padded + key mask": 1.6})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    benchmarks.write_json(str(a), {"device": "NVIDIA H200", "commit": None}, rows)
    benchmarks.write_json(str(b), {"device": "NVIDIA H200", "commit": None}, more)
    with pytest.raises(ValueError, match="record no commit .*SPARSECTX_COMMIT"):
        benchmarks.merge_runs([str(a), str(b)])
    assert len(benchmarks.merge_runs([str(a)])["rows"]) == 2  # one part alone is no merge


def test_a_merge_never_writes_over_its_own_inputs(tmp_path):
    """``report a.json b.json --merged a.json`` replaced part a with the merge (a later report of the two parts
    then failed on rows found twice); ``bench --json X --merge-into X`` wrote the run alone over the earlier
    parts first. Both are refused before anything is written."""
    rows = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    more = _block("training", "B=4", {"sparsectx (packed varlen)": 1.0, "sdpa padded + key mask": 1.6})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    benchmarks.write_json(str(a), {"device": "cpu", "commit": "abc1234"}, rows)
    benchmarks.write_json(str(b), {"device": "cpu", "commit": "abc1234"}, more)
    before = a.read_text()
    with pytest.raises(SystemExit, match="--merged .* is one of the files to merge"):
        cli.main(["report", str(a), str(b), "--merged", str(a)])
    assert a.read_text() == before
    with pytest.raises(SystemExit, match="--json and --merge-into are both"):
        cli.main(["bench", "--quick", "--case", "compaction", "--json", str(a), "--merge-into", str(a)])
    assert a.read_text() == before
    # the earlier run --steps-from reads, and one output written over another (--plot over the JSON): refused too
    # (the run replaced the file it read its step times from)
    # (--steps-from and --merge-into may name one file: the merge keeps the rows it reads)
    for pair in (("--steps-from", "--json"), ("--json", "--plot"), ("--merge-into", "--plot")):
        with pytest.raises(SystemExit, match=f"{pair[0]} and {pair[1]} are both"):
            cli.main(["bench", "--quick", "--case", "compaction", pair[0], str(a), pair[1], str(a)])
        assert a.read_text() == before


def test_the_run_records_its_host_cpu():
    """Host-bound rows depend on the machine's CPU: the run's metadata names it, and the summary and the markdown
    header show it."""
    meta = benchmarks.run_metadata(benchmarks.default_device(), "tiny", True, ["compaction"])
    assert meta["host"] == benchmarks.host_cpu() and meta["host"].endswith(f", {os.cpu_count()} CPUs")
    assert len(meta["host"]) > len(f", {os.cpu_count()} CPUs")  # a model name before the count
    assert benchmarks.format_summary(meta, []).splitlines()[0].endswith(f"host {meta['host']}")
    assert f"Host: {meta['host']}." in benchmarks.format_markdown(meta, []).splitlines()


def test_report_merges_step_files_and_prints_the_summary(tmp_path, capsys):
    meta = {"device": "NVIDIA H200", "size": "full", "autotune": {}, "commit": "abc1234"}
    first = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    second = _block("training", "B=4", {"sparsectx (packed varlen)": 1.0, "sdpa padded + key mask": 1.6})
    paths = [tmp_path / "a.json", tmp_path / "missing.json", tmp_path / "b.json"]
    benchmarks.write_json(str(paths[0]), meta, first)
    benchmarks.write_json(str(paths[2]), dict(meta, autotune={"fwd": {"picked": {}}}), second)
    merged = tmp_path / "bench.json"
    assert cli.main(["report", "--summary", "--merged", str(merged), *map(str, paths)]) == 0
    out, err = capsys.readouterr()
    data = json.loads(merged.read_text())
    assert data["rows"] == first + second
    assert data["meta"]["device"] == "NVIDIA H200" and data["meta"]["cases"] == ["attention", "training"]
    assert len(data["meta"]["autotune_runs"]) == 2
    assert "missing.json does not exist (skipped)" in err
    assert "x0.800 (>= 0.750: meets)" in out and "x1.600 (>= 1.500: meets)" in out
    # the merged file is a run like any other: markdown by default
    assert cli.main(["report", str(merged)]) == 0
    assert capsys.readouterr().out.startswith("### ")
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["report", str(paths[1])])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a `sparsectx bench --json` file"):
        cli.main(["report", str(tmp_path / "bad.json")])


def test_e2e_full_shapes_cover_one_three_and_four_references():
    configs = benchmarks.CASES["e2e"].configs("full")
    assert {refs for refs, *_ in configs} == {1, 3, 4}


def test_a_failed_check_judges_no_target():
    """A row whose result failed its check (wrong output) is never counted as meeting a target."""
    rows = _block("e2e", "3 ref x 5%", {"sparsectx compact_tokens + step": 150.0,
                                        "sparsectx.enable (native attn)": 150.0,
                                        "torch topk+sort+index_select + step": 200.0})
    rows[1]["ok"] = False
    lines = [line for line in benchmarks.target_verdicts(rows) if "e2e" in line]
    assert any("not judged (sparsectx.enable (native attn): check FAILED)" in line for line in lines)
    assert not any("meets" in line and "drop-in" in line for line in lines)
    shape = "3 ref x 4096 tokens, C=128, selector uniform, H=32, D=128"
    selection = [_row("selection", shape, "select, fixed 10%", 0.1, step_pct=0.3, ok=False)]
    assert "not judged" in benchmarks.selection_verdict(selection)
    assert "1 row(s) with a FAILED check" in benchmarks.selection_verdict(selection)


def test_compaction_time_target_is_judged_on_the_row_itself():
    """Issue 3's <= 25 us holds on the compaction's own time (a 5x ratio to a slow peer is not enough)."""
    rows = _block("compaction", "B=1, N=12288", {"sparsectx compact_tokens (scores+budget)": 0.030,
                                                 "topk+sort+gather": 0.160})
    rows += [_row("compaction", "B=1, N=12288", "sparsectx compact_tokens (scores+budget), CUDA graph replay", 0.02)]
    lines = benchmarks.target_verdicts(rows)
    assert any("x5.333 (>= 5.000: meets)" in line for line in lines)
    assert any("<= 25 us" in line and "30.0 us (<= 25 us: MISSES)" in line for line in lines)
    assert any("graph replay" in line and "20.0 us (<= 25 us: meets)" in line for line in lines)


def test_report_refuses_parts_of_different_runs_and_names_bad_files(tmp_path):
    meta = {"device": "NVIDIA H200", "size": "full", "commit": "abc1234", "cases": ["attention"]}
    block = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    a, b, c = (str(tmp_path / name) for name in ("a.json", "b.json", "c.json"))
    benchmarks.write_json(a, meta, block)
    benchmarks.write_json(b, dict(meta, commit="def5678", cases=["training"]),
                          _block("training", "B=4", {"sparsectx (packed varlen)": 1.0}))
    with pytest.raises(SystemExit, match="b.json: its commit 'def5678' differs from .*a.json's 'abc1234'"):
        cli.main(["report", "--summary", a, b])
    benchmarks.write_json(c, meta, block[:1])  # the same row timed again (a rerun of one step)
    with pytest.raises(SystemExit, match=r"c.json: attention \| L=1 \| sparsectx \(compacted\) is also in .*a.json"):
        cli.main(["report", "--summary", a, c])
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(SystemExit, match="empty.json: can not be read as JSON"):
        cli.main(["report", a, str(tmp_path / "empty.json")])
    (tmp_path / "rowless.json").write_text(json.dumps({"meta": {}, "rows": [{}]}))
    with pytest.raises(SystemExit, match=r"rowless.json: row 0 lacks \['case'"):
        cli.main(["report", str(tmp_path / "rowless.json")])
    for wrong in ("fast", True):  # a string (or a bool) where a number goes: a traceback in a format before
        typed = dict(block[0], time_ms=wrong)
        (tmp_path / "typed.json").write_text(json.dumps({"meta": meta, "rows": [typed]}))
        with pytest.raises(SystemExit, match=r"typed.json: row 0 has \['time_ms'\] of the wrong type"):
            cli.main(["report", str(tmp_path / "typed.json")])
    (tmp_path / "okay.json").write_text(json.dumps({"meta": meta, "rows": [dict(block[0], ok="yes", note=3)]}))
    with pytest.raises(SystemExit, match=r"okay.json: row 0 has \['ok', 'note'\] of the wrong type"):
        cli.main(["report", str(tmp_path / "okay.json")])
    # a null shape, or a string ceiling: a traceback in the summary or the header before; a null note reads as ""
    (tmp_path / "shape.json").write_text(json.dumps({"meta": meta, "rows": [dict(block[0], shape=None)]}))
    with pytest.raises(SystemExit, match=r"shape.json: row 0 has \['shape'\] of the wrong type"):
        cli.main(["report", "--summary", str(tmp_path / "shape.json")])
    (tmp_path / "speed.json").write_text(json.dumps({"meta": dict(meta, ceilings={"copy_GBps": "fast"}),
                                                     "rows": block}))
    with pytest.raises(SystemExit, match=r"speed.json: meta.ceilings \['copy_GBps'\] must be numbers or null"):
        cli.main(["report", str(tmp_path / "speed.json")])
    (tmp_path / "note.json").write_text(json.dumps({"meta": meta, "rows": [dict(block[0], note=None,
                                                                                   time_ms=None)]}))
    for form in ([], ["--summary"]):
        assert cli.main(["report", *form, str(tmp_path / "note.json")]) == 0
    (tmp_path / "ceil.json").write_text(json.dumps({"meta": dict(meta, ceilings="fast"), "rows": block}))
    with pytest.raises(SystemExit, match=r"ceil.json: meta.ceilings must be a dict, got str"):
        cli.main(["report", str(tmp_path / "ceil.json")])
    (tmp_path / "parts.json").write_text(json.dumps({"meta": dict(meta, parts="x"), "rows": block}))
    with pytest.raises(SystemExit, match=r"parts.json: meta.parts must be a list, got str"):
        cli.main(["report", str(tmp_path / "parts.json")])
    # a part's cases or ran that is no list of names (the header reads them): a traceback, or letters as cases
    for part in ("x", {"ran": 5}, {"ran": "norm_rope"}, {"cases": [1]}):
        (tmp_path / "part.json").write_text(json.dumps({"meta": dict(meta, parts=[part]), "rows": block}))
        with pytest.raises(SystemExit, match=r"part.json: meta.parts\[0\] must be an object whose cases and ran"):
            cli.main(["report", str(tmp_path / "part.json")])
    (tmp_path / "cut.json").write_text(json.dumps({"meta": meta, "rows": [dict(block[0], unfinished="yes")]}))
    with pytest.raises(SystemExit, match=r"cut.json: row 0 has \['unfinished'\] of the wrong type"):
        cli.main(["report", str(tmp_path / "cut.json")])
    (tmp_path / "plan.json").write_text(json.dumps({"meta": dict(meta, planned_shapes={"attention": "L=1"}),
                                                    "rows": block}))
    with pytest.raises(SystemExit, match=r"plan.json: meta.planned_shapes must map each case to a list of shape"):
        cli.main(["report", "--summary", str(tmp_path / "plan.json")])
    (tmp_path / "norows.json").write_text(json.dumps({"meta": {}, "rows": []}))
    with pytest.raises(SystemExit, match="norows.json holds no result rows"):  # printed '### ?, None' before
        cli.main(["report", str(tmp_path / "norows.json")])
    with pytest.raises(SystemExit, match="norows.json holds no result rows"):  # and left a merged file behind
        cli.main(["report", "--merged", str(tmp_path / "merged.json"), str(tmp_path / "norows.json")])
    assert not (tmp_path / "merged.json").exists()
    with pytest.raises(SystemExit, match="is a folder"):
        cli.main(["report", str(tmp_path)])
    with pytest.raises(SystemExit, match="--merged .* is a folder"):
        cli.main(["report", "--merged", str(tmp_path), a])
    assert not (tmp_path.parent / f"{tmp_path.name}.tmp").exists()
    # a path under a file: refused before any work (bench ran every case first, then a FileExistsError traceback)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="--merged .*afile/m.json.: its folder can not be made"):
        cli.main(["report", "--merged", str(tmp_path / "afile" / "m.json"), a])
    for option in ("--json", "--plot"):
        with pytest.raises(SystemExit, match=f"{option} .*afile/x.: its folder can not be made"):
            cli.main(["bench", "--case", "rope_tables", "--quick", option, str(tmp_path / "afile" / "x")])
    cli.main(["report", "--merged", str(tmp_path / "new" / "m.json"), a])  # a missing folder is made
    assert (tmp_path / "new" / "m.json").exists()


def test_summary_names_planned_cases_that_did_not_run(tmp_path, capsys):
    meta = {"device": "cpu", "size": "tiny", "cases": ["attention", "kv", "e2e_batch"]}
    benchmarks.write_json(str(tmp_path / "cut.json"), meta,
                          _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8}))
    assert cli.main(["report", "--summary", str(tmp_path / "cut.json")]) == 0
    assert "NOT RUN (planned, no row; a step cut short?): kv, e2e_batch" in capsys.readouterr().out


def test_markdown_header_says_the_size_and_a_quick_run():
    """The markdown a run is recorded with said neither its size nor --quick: a CPU run's tiny tables read like the
    real shapes' (only the summary said so)."""
    rows = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    tiny = benchmarks.format_markdown({"size": "tiny", "quick": True}, rows).splitlines()
    assert tiny[0].endswith("size tiny quick (fewer shapes and repetitions)"), tiny[0]
    assert "The tiny shapes: not the real models' shapes, and no issue's target applies to them." in tiny
    full = benchmarks.format_markdown({"size": "full", "quick": False}, rows).splitlines()
    assert full[0].endswith("size full") and not any("tiny shapes" in line for line in full)
    # a merged run whose parts differ said "quick" for the whole run (2026-12-04: full-size headline tables)
    parts = [{"cases": ["attention", "batch"], "quick": False}, {"cases": ["e2e", "kv"], "quick": True}]
    mixed = benchmarks.format_markdown({"size": "full", "quick": True, "parts": parts}, rows).splitlines()
    assert mixed[0].endswith("size full quick (fewer shapes and repetitions) for e2e, kv, full for the rest"), mixed[0]
    # the cases a part gave rows of, where the merge recorded them: a case run quick and full is "partly" quick
    ran = [dict(parts[0], ran=["attention", "e2e"]), dict(parts[1], ran=["e2e"])]
    partly = benchmarks.format_markdown({"size": "full", "quick": True, "parts": ran}, rows).splitlines()
    assert partly[0].endswith("quick (fewer shapes and repetitions) for e2e (partly), full for the rest"), partly[0]
    parts[0]["quick"] = True
    both = benchmarks.format_markdown({"size": "full", "quick": True, "parts": parts}, rows).splitlines()
    assert both[0].endswith("size full quick (fewer shapes and repetitions)"), both[0]


def test_summary_names_planned_shapes_a_cut_case_did_not_reach_and_merges_keep_them(tmp_path, capsys):
    """A case cut short after some of its shapes: the summary named only cases with no row at all, so its missing
    shapes went unsaid. The run records each case's planned shapes (its configs' labels, in the order they run);
    the summary names the last ones the case's blocks fall short of, also after a merge of parts."""
    first = {"device": "cpu", "size": "tiny", "commit": "c", "cases": ["attention"],
             "planned_shapes": {"attention": ["L=1", "L=2", "L=3"]}}
    second = {"device": "cpu", "size": "tiny", "commit": "c", "cases": ["kv"], "planned_shapes": {"kv": ["3 ref"]}}
    benchmarks.write_json(str(tmp_path / "a.json"), first,
                          _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8}))
    benchmarks.write_json(str(tmp_path / "b.json"), second, _block("kv", "3 ref", {"sparsectx.enable + KV cache": 1.0}))
    assert cli.main(["report", "--summary", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "NOT RUN: the last 2 of attention's 3 planned shapes (no row; a step cut short?): L=2; L=3" in out, out
    assert "NOT RUN kv" not in out and "NOT RUN (planned" not in out, out
    merged = benchmarks.merge_runs([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert merged["meta"]["planned_shapes"] == {"attention": ["L=1", "L=2", "L=3"], "kv": ["3 ref"]}
    # a case planned by a part cut before it and run by another (with --quick: shapes that are no prefix of the
    # full plan's): the plan of the part that ran it counts (the union named the shape that ran as NOT RUN)
    cut_first = dict(first, planned_shapes={"attention": ["L=1", "L=2", "L=3"], "kv": ["1 ref", "3 ref"]})
    benchmarks.write_json(str(tmp_path / "a.json"), cut_first,
                          _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8}))
    merged = benchmarks.merge_runs([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert merged["meta"]["planned_shapes"]["kv"] == ["3 ref"]
    assert not any(line.startswith("NOT RUN: the last") and "kv" in line
                   for line in benchmarks.format_summary(merged["meta"], merged["rows"]).splitlines())


def test_a_bench_run_records_each_cases_planned_shapes(tmp_path):
    path = str(tmp_path / "run.json")
    assert cli.main(["bench", "--case", "rope_tables", "--quick", "--json", path]) == 0
    run = benchmarks.load_run(path)
    labels = [benchmarks.CASES["rope_tables"].label(c) for c in benchmarks.CASES["rope_tables"].configs("tiny", True)]
    assert run["meta"]["planned_shapes"] == {"rope_tables": labels} and labels
    assert len({r["shape"] for r in run["rows"]}) == len(labels)  # (one block per planned config)
    assert not any("unfinished" in r for r in run["rows"])  # (a finished run's rows)


def test_steps_from_refuses_another_device_or_size(tmp_path):
    path = str(tmp_path / "h200.json")
    benchmarks.write_json(path, {"device": "NVIDIA H200", "size": "full"}, [])
    with pytest.raises(SystemExit, match="measured with device 'NVIDIA H200', this run with 'x86_64'"):
        benchmarks.steps_from(path, {"device": "x86_64", "size": "tiny"})
    assert benchmarks.steps_from(path, {"device": "NVIDIA H200", "size": "full"}) == []
    assert benchmarks.steps_from(str(tmp_path / "missing.json"), {}) == []
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="--steps-from .*bad.json: can not be read as JSON"):
        benchmarks.steps_from(str(tmp_path / "bad.json"), {})
    # through the CLI: refused before anything is written (before: after --json and --merge-into were written, an
    # earlier result in --json overwritten by an empty run, an empty part appended to --merge-into)
    kept = tmp_path / "kept.json"
    kept.write_text("earlier result")
    with pytest.raises(SystemExit, match="--steps-from .*measured with device 'NVIDIA H200'"):
        cli.main(["bench", "--quick", "--case", "selection", "--steps-from", path, "--json", str(kept)])
    assert kept.read_text() == "earlier result"


@pytest.mark.parametrize("device", ["xpu", "meta"])
def test_bench_refuses_devices_it_does_not_run_on(device):
    with pytest.raises(SystemExit, match="the benchmarks run on cuda or cpu"):
        benchmarks._parse_device(device)


def _workload(impls, **kw):
    import torch

    return benchmarks.Workload("compaction", "B=1, N=8", impls, torch.float32, exact=True, **kw)


def test_a_sparsectx_output_every_peer_disagrees_with_fails_and_judges_no_target():
    """sparsectx's row is the one the peers are compared with: when every compared peer disagrees with it, its
    output is the suspect, so its row fails and the shape's targets are not judged (before, only the peers showed
    FAIL and the compaction time target still said meets / MISSES on a wrong output)."""
    import torch

    right = torch.arange(8.0)
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: right + 1),
             benchmarks.Impl("x[mask] (host sync)", lambda: right),
             benchmarks.Impl("topk+sort+gather", lambda: right)]
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    assert [r["ok"] for r in rows] == [False, False, False]
    assert "every compared peer (2) disagrees" in rows[0]["note"]
    assert "not bit-exact" in rows[1]["note"]  # an exact comparison has no relative error to show
    lines = [line for line in benchmarks.target_verdicts(rows) if "compaction" in line]
    assert lines and all("not judged" in line for line in lines), lines
    # one peer disagreeing among agreeing ones is that peer's fault: sparsectx's row stays unflagged
    impls[1] = benchmarks.Impl("x[mask] (host sync)", lambda: right + 1)
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    assert [r["ok"] for r in rows] == [None, True, False]


def test_sparsectx_rows_agreeing_with_a_wrong_output_do_not_vouch_for_it():
    """sparsectx's other rows (the keep-mask path, the gather form, the drop-in) run the same kernels as its first
    row: a wrong kernel agrees with itself. Only independent peers decide whether sparsectx's output is the suspect,
    in the table and in the pytest-benchmark check (before, one agreeing sparsectx row kept a wrong output unflagged
    and its time judged the compaction targets)."""
    import torch

    right = torch.arange(8.0)
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: right + 1),
             benchmarks.Impl("sparsectx compact_tokens (keep mask)", lambda: right + 1),
             benchmarks.Impl("x[mask] (host sync)", lambda: right),
             benchmarks.Impl("topk+sort+gather", lambda: right)]
    assert impls[1].ours and not impls[2].ours
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    assert [r["ok"] for r in rows] == [False, True, False, False]
    assert "every compared peer (2) disagrees" in rows[0]["note"]
    lines = [line for line in benchmarks.target_verdicts(rows) if "compaction" in line]
    assert lines and all("not judged" in line for line in lines), lines
    # pytest-benchmark's check of sparsectx's row: against an independent peer, though a sparsectx row comes first
    _fn, result, expected = benchmarks.checked_run(_workload(impls), impls[0].name)
    assert torch.equal(result, right + 1) and torch.equal(expected, right)
    # a case with no independent peer (e2e_qwen, train_step): its other sparsectx rows still accuse its first row
    impls = [benchmarks.Impl("sparsectx.enable (native attn)", lambda: right + 1),
             benchmarks.Impl("sparsectx.enable (sparsectx attn)", lambda: right)]
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    assert [r["ok"] for r in rows] == [False, False] and "every compared peer (1) disagrees" in rows[0]["note"]


def test_pytest_benchmarks_check_reads_each_rows_own_state_and_checks_a_lone_primary_by_its_verify():
    """pytest-benchmark's check (``checked_run``): a peer row ran before sparsectx's first row, which then left its
    own state (the e2e_batch case: the selection the drop-in's "groups" rows verify was the packed row's); and a
    first row with a verify of its own and no comparable peer (the pipeline case's baseline) was skipped."""
    import torch

    calls, right = [], torch.arange(4.0)

    def noting(name):
        return lambda: calls.append(name) or right

    impls = [benchmarks.Impl("sparsectx.enable, packed", noting("packed")),
             benchmarks.Impl("sparsectx.enable, groups", noting("groups"))]
    benchmarks.checked_run(_workload(impls), "sparsectx.enable, groups")
    assert calls == ["packed", "groups"]  # the row's own call last: what its verify reads is its own
    impls = [benchmarks.Impl("sparsectx.enable, given scores", lambda: right, verify=lambda result: ""),
             benchmarks.Impl("select, uniform", lambda: right + 1, comparable=False)]
    _fn, result, expected = benchmarks.checked_run(_workload(impls), impls[0].name)
    assert torch.equal(result, right) and expected is None
    impls[0] = benchmarks.Impl("sparsectx.enable, given scores", lambda: right)  # (no verify: nothing checks it)
    with pytest.raises(benchmarks.Unavailable, match="no peer runs here"):
        benchmarks.checked_run(_workload(impls), impls[0].name)


def test_the_correctness_check_edges():
    """The check's documented edges, each a mutation the suite let through: outputs of another count differ (a
    peer returning fewer tensors passed an inexact check), an all-zero expected output has an error relative to
    the difference itself, one small row zeroed among large rows fails (the row error's scale is the mean row norm,
    not the largest), and the row error of a tensor of fewer than 2 dims is 0."""
    import torch

    inexact = benchmarks.Workload("t", "s", [], torch.float32)
    x = torch.arange(8.0).reshape(2, 4) + 1
    assert benchmarks.results_match((x,), (x, x + 1), inexact) == (False, math.inf)
    assert benchmarks.relative_error(x, torch.zeros(2, 4)) == pytest.approx(float(x.norm()))
    rows = torch.ones(1000, 8)
    rows[:10] *= 50  # ten large rows among small ones
    wrong = rows.clone()
    wrong[500] = 0  # a small row zeroed: 0.1% of the tensor's norm, all of its row's
    assert benchmarks.worst_row_error(wrong, rows) > benchmarks.ROW_ERR_BOUND
    assert not benchmarks.results_match(wrong, rows, benchmarks.Workload("t", "s", [], torch.bfloat16))[0]
    assert benchmarks.worst_row_error(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 0.0])) == 0.0


def test_a_peer_the_host_read_counter_can_not_run_under_is_still_timed():
    """The host reads of a case that counts them run under a TorchDispatchMode, which some ops refuse (compiled
    flex_attention: the batch case's FlexAttention peer showed as unavailable once the case counted): the row says
    they were not counted and is timed as before."""
    import torch

    class NoRule(Exception):
        pass

    def refuses_modes():
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None and \
                torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
            raise NoRule("no rule registered for this mode")
        return torch.arange(8.0)

    impls = [benchmarks.Impl("sparsectx (packed varlen)", lambda: torch.arange(8.0)),
             benchmarks.Impl("flex_attention document mask", refuses_modes)]
    workload = benchmarks.Workload("batch", "B=1", impls, torch.float32, count_syncs=True)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert rows[1]["ok"] is True and rows[1]["time_ms"] is not None, rows[1]
    assert "host reads not counted (NoRule: no rule registered for this mode)" in rows[1]["note"]
    assert "0 host reads per call" in rows[0]["note"]


def test_a_sparsectx_output_holding_nan_or_inf_fails_and_no_peer_passes_against_it():
    """sparsectx's output is what the peers are compared with: a NaN or inf in it gave a NaN error, which ``max``
    dropped, so every peer showed ok (error 0) and the targets were judged on a broken output's time."""
    import torch

    right = torch.arange(8.0).reshape(2, 4)
    for bad in (math.nan, math.inf):
        broken = right.clone()
        broken[1, 2] = bad
        workload = benchmarks.Workload("t", "2x4", [], torch.float32)
        assert benchmarks.relative_error(right, broken) == math.inf
        assert benchmarks.worst_row_error(right, broken) == math.inf
        assert benchmarks.results_match(right, broken, workload) == (False, math.inf)
        impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda b=broken: b),
                 benchmarks.Impl("topk+sort+gather", lambda: right)]
        rows = benchmarks.run_workload(benchmarks.Workload("compaction", "B=1, N=8", impls, torch.float32),
                                       torch.device("cpu"), quick=True)
        assert [r["ok"] for r in rows] == [False, False], rows
        assert rows[0]["note"].startswith("CHECK FAILED: the output holds NaN or inf")
        assert " FAIL" in benchmarks.format_summary({}, rows).splitlines()[1].split("|")[0]  # its own row too


def test_a_scoped_rows_timed_calls_follow_a_call_in_the_same_scope(monkeypatch):
    """A row whose scope (e.g. sparsectx.enable around the calls) makes its first call slower (the first selection
    and plan) is timed only after a call in the scope it is timed in: sparsectx's row, whose check ran in a scope of
    its own, and every row in a later pass, which enters its scope anew (at a fixed 2 reps, the cold call made half
    of the reported median)."""
    import contextlib

    import torch

    entered = []  # calls made in the current scope

    @contextlib.contextmanager
    def scope():
        entered.clear()
        yield

    def fn():
        entered.append(1)
        return torch.ones(2)

    timed_after = []  # for each timed call: how many calls its scope had made before

    def fake_time_ms(fn_, device, reps=None, quick=False):
        timed_after.append(len(entered))
        fn_()
        return 1.0

    impls = [benchmarks.Impl("sparsectx x", fn, scope=scope), benchmarks.Impl("peer", fn, scope=scope)]
    monkeypatch.setattr(benchmarks, "time_ms", fake_time_ms)
    benchmarks.run_workload(_workload(impls, passes=2, reps=2), torch.device("cpu"), quick=True)
    assert len(timed_after) == 4 and min(timed_after) >= 1, timed_after


def test_a_later_timing_pass_that_fails_fails_sparsectx_rows():
    import torch

    broken = []

    def flaky():
        if broken:
            raise RuntimeError("boom")
        return torch.zeros(2)

    # the first pass's row is added (on_row), then every later call fails
    rows = benchmarks.run_workload(_workload([benchmarks.Impl("sparsectx x", flaky)], passes=2, reps=1),
                                   torch.device("cpu"), quick=True, on_row=lambda rows: broken.append(1))
    assert rows[0]["ok"] is False and "pass 2: error RuntimeError: boom" in rows[0]["note"]


def test_a_target_whose_other_row_is_missing_says_so():
    """A step cut short before the peer's row (or a peer dropped) leaves a 'not measured' line, not silence."""
    rows = _block("e2e", "3 ref x 5%", {"sparsectx compact_tokens + step": 150.0})
    lines = [line for line in benchmarks.target_verdicts(rows) if "3% of the compacted ideal" in line]
    assert len(lines) == 1 and "not measured (no row 'torch topk+sort+index_select + step' in this run)" in lines[0]


def test_ratio_and_bound_never_read_equal_when_they_differ():
    rows = _block("e2e", "3 ref x 5%", {"sparsectx compact_tokens + step": 1.0,
                                        "torch topk+sort+index_select + step": 0.9706})
    line = next(line for line in benchmarks.target_verdicts(rows)
                if "compacted ideal" in line and "drop-in" not in line)
    assert "x0.9706 (>= 0.9709: MISSES)" in line
    assert benchmarks._distinct(1.5, 1.15) == ("1.500", "1.150") and benchmarks._distinct(0.75, 0.75)[0] == "0.750"


def test_report_refuses_parts_with_other_versions_or_no_commit(tmp_path):
    meta = {"device": "NVIDIA H200", "size": "full", "commit": "abc1234", "diffusers": "0.42.1",
            "cases": ["attention"]}
    a, b, c = (str(tmp_path / name) for name in ("a.json", "b.json", "c.json"))
    benchmarks.write_json(a, meta, _block("attention", "L=1", {"sparsectx (compacted)": 1.0}))
    benchmarks.write_json(b, dict(meta, diffusers="0.30.0"), _block("training", "B=4", {"sparsectx (packed)": 1.0}))
    benchmarks.write_json(c, dict(meta, commit=None), _block("training", "B=4", {"sparsectx (packed)": 1.0}))
    with pytest.raises(SystemExit, match="b.json: its diffusers '0.30.0' differs"):
        cli.main(["report", "--summary", a, b])
    with pytest.raises(SystemExit, match="c.json: its commit None differs"):
        cli.main(["report", "--summary", a, c])


def test_summary_prints_implementation_names_and_shapes_in_full(tmp_path, capsys):
    shape = "B=1, 3 ref x 4096 tokens, C=3072 bfloat16 + ids int64[4], keep 10% (a long shape that goes on)"
    rows = _block("compaction", shape, {"sparsectx compact_tokens (scores+budget)": 0.03,
                                        "sparsectx compact_tokens (scores+budget), CUDA graph replay": 0.02})
    benchmarks.write_json(str(tmp_path / "run.json"), {"device": "cpu", "size": "tiny"}, rows)
    assert cli.main(["report", "--summary", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert shape in out and "sparsectx compact_tokens (scores+budget), CUDA graph replay" in out


def test_plot_leaves_out_reference_points_and_marks_failed_peers(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _block("compaction", "B=1", {"sparsectx compact_tokens (scores+budget)": 0.03, "x[mask] (host sync)": 0.07,
                                        "topk+sort+gather": 0.13, "bytes-moved floor": 0.004})
    rows[2]["ok"] = False
    # the drop-in with SDPA forced onto cuDNN runs sparsectx's code: not ours (so its rows say unavailable where
    # torch refuses cuDNN), yet no peer either
    rows += _block("e2e", "3 ref x 5%", {"sparsectx.enable (native attn)": 10.0, benchmarks.CUDNN_NATIVE_ROW: 9.0})
    rows[-1]["ours"] = False
    drawn = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_yticks

    def record(self, ticks, labels=None, **kw):
        drawn["labels"] = list(labels)
        return original(self, ticks, labels, **kw)

    matplotlib.axes.Axes.set_yticks = record
    try:
        assert benchmarks.write_plot(str(tmp_path / "p.png"), rows).startswith("plot written")
    finally:
        matplotlib.axes.Axes.set_yticks = original
    assert len(drawn["labels"]) == 2 and not any("floor" in label for label in drawn["labels"])
    assert drawn["labels"][1].startswith("FAILED CHECK: compaction: topk+sort+gather")


def test_this_runs_step_times_come_before_steps_from(tmp_path, monkeypatch):
    """`--steps-from` supplies step times a run lacks; a run that measured its own e2e step relates its selection
    to that (it took the file's first before)."""

    earlier_row = _row("e2e", "1 ref x 5%", benchmarks.NO_REFERENCE_ROW, 240.5)
    this_row = _row("e2e", "1 ref x 5%", benchmarks.NO_REFERENCE_ROW, 24.0)
    meta = benchmarks.run_metadata(benchmarks.default_device(), "tiny", True, ["e2e", "selection"])
    path = str(tmp_path / "steps.json")
    benchmarks.write_json(path, {"device": meta["device"], "size": "tiny"}, [earlier_row])
    seen = {}

    def fake_run_case(name, device, size, *, earlier_rows=(), **kw):
        seen[name] = list(earlier_rows)
        return [this_row] if name == "e2e" else []

    monkeypatch.setattr(benchmarks, "run_case", fake_run_case)
    monkeypatch.setattr(benchmarks, "measure_ceilings", lambda device: {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0,
                                                                        "matmul": "x"})
    args = cli.build_parser().parse_args(["bench", "--quick", "--case", "e2e", "selection", "--steps-from", path])
    assert benchmarks.main(args) == 0
    assert seen["selection"][0] is this_row and seen["selection"][1]["time_ms"] == 240.5


def test_the_drop_in_is_also_judged_against_the_model_on_pre_compacted_inputs():
    """The by-hand peer selects on every call while the drop-in row reuses its selection (a later step): the
    breakdown block also judges the drop-in against the model on pre-compacted inputs, which does neither."""
    rows = _block("e2e", "3 ref x 5%, enable-path breakdown", {
        "sparsectx compact_tokens + step": 100.0, "sparsectx.enable (native attn)": 104.0,
        "(b) model on the compacted inputs": 100.0})
    lines = [line for line in benchmarks.target_verdicts(rows) if "pre-compacted" in line]
    assert len(lines) == 1 and "x0.962 (>= 0.971: MISSES)" in lines[0]


def test_a_row_a_block_never_has_is_not_reported_missing():
    """The breakdown block has no by-hand peer and the plain block no breakdown rows, by design: no line for them."""
    plain = _block("e2e", "3 ref x 5%", {"sparsectx compact_tokens + step": 100.0,
                                         "sparsectx.enable (native attn)": 101.0,
                                         "torch topk+sort+index_select + step": 101.0})
    breakdown = _block("e2e", "3 ref x 5%, enable-path breakdown", {
        "sparsectx compact_tokens + step": 100.0, "sparsectx.enable (native attn)": 101.0,
        "(b) model on the compacted inputs": 100.0})
    lines = benchmarks.target_verdicts(plain + breakdown)
    assert not any("not measured" in line for line in lines), lines
    assert len(lines) == 3  # compacted ideal (drop-in, by hand) on the plain block, pre-compacted on the breakdown


def test_report_reads_rows_without_the_optional_columns(tmp_path, capsys):
    """A row with only the required keys (an older or hand-made file) is reported with empty cells (the report
    raised KeyError: 'gbps')."""
    row = {"case": "attention", "shape": "L=1", "impl": "sparsectx (compacted)", "time_ms": 1.0, "ratio": 1.0,
           "ok": None, "note": ""}
    (tmp_path / "bare.json").write_text(json.dumps({"meta": {"device": "cpu"}, "rows": [row]}))
    assert cli.main(["report", str(tmp_path / "bare.json")]) == 0
    assert cli.main(["report", "--summary", str(tmp_path / "bare.json")]) == 0
    assert "sparsectx (compacted)" in capsys.readouterr().out


def _bench_tool_for_a_dry_run(name: str):
    """The GPU tool ``bench/<name>.py`` loaded as a module (it is a script, not part of the package); the test is
    skipped on a GPU machine, where the tool runs its full sizes instead of the CPU dry run."""
    if torch.cuda.is_available():
        pytest.skip("the dry run is for machines without a GPU (the tool itself runs the full sizes there)")
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not torch.cuda.is_available() and not ops.interpreter_enabled(),
                    reason="the sweep's dry run needs the kernels (interpreter) on the CPU")
def test_attention_sweep_dry_run_checks_and_times_every_forced_configuration(tmp_path, monkeypatch):
    """``bench/sweep_attention.py --tiny`` (the GPU tool's CPU dry run): every configuration it forces passes its
    accuracy check against the fp32 reference (a forced configuration must carry the kernel's pre-hook, which sets
    the descriptors' tile), the three key layouts are measured, and the backward's configurations are timed."""
    sweep = _bench_tool_for_a_dry_run("sweep_attention")
    # under SPARSECTX_AUTOTUNE=0 the launches bypass the autotuners it forces: it refuses to time the first config
    # under every config's name
    monkeypatch.setattr(sweep.shipped, "AUTOTUNE_ALL", False)
    with pytest.raises(SystemExit, match="without SPARSECTX_AUTOTUNE=0"):
        sweep.main(["--tiny", "--out", str(tmp_path)])
    monkeypatch.setattr(sweep.shipped, "AUTOTUNE_ALL", True)
    sweep.main(["--tiny", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sweep.json").read_text())
    ours = [r for r in report["forward"] if r["variant"] == "shipped"]
    assert ours and all("error" not in r and r["ok"] and r["ms"] > 0 for r in ours), [
        r for r in ours if "error" in r or not r.get("ok")][:3]
    assert {r["mode"] for r in ours} == {"compacted", "gathered", "gathered in place"}
    assert len({tuple(r["config"]) for r in ours}) == len(sweep.FWD_EXTRA) + len(sweep.shipped.FWD_CONFIGS)
    timed = [r for r in report["backward"] if r.get("kernel") in ("dkdv", "dq")]
    assert {r["kernel"] for r in timed} == {"dkdv", "dq"} and all(r.get("ms", 0) > 0 for r in timed)


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="Triton without its NVIDIA backend can not compile for sm_90")
def test_precompile_coverage_lists_what_a_case_builds_and_nothing_once_cached(tmp_path):
    """``bench/precompile_coverage.py`` (the offline check of what compile-check builds ahead): the compaction
    case's own rows run to the end with compile-only launches (valid lengths from its stand-in for the compaction's
    index); over an empty cache the tool lists the kernels they build, in a copy of the cache (the cache is left as it
    was); over a cache that holds them (filled by the same launches), nothing."""
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / "precompile_coverage.py"
    spec = importlib.util.spec_from_file_location("precompile_coverage_under_test", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cache = tmp_path / "cache"
    cache.mkdir()
    first = tool.check_case("compaction", str(cache), 90, str(tmp_path))
    assert [impl for _, impl, why in first["outcomes"] if not why] == [
        "sparsectx compact_tokens (scores+budget)", "sparsectx compact_tokens (keep mask)"], first["outcomes"]
    assert sorted(set(first["built"])) == ["_block_counts_kernel", "_gather_rows_kernel", "_topk_threshold_kernel",
                                           "_write_index_kernel"], first
    assert os.listdir(cache) == [] and sorted(os.listdir(tmp_path)) == ["cache"]  # (the copy is gone)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    filled = subprocess.run([sys.executable, str(path), "--child", "compaction"], capture_output=True, text=True,
                            env={**env, "TRITON_CACHE_DIR": str(cache)}, timeout=600)
    assert filled.returncode == 0, filled.stderr[-2000:]
    second = tool.check_case("compaction", str(cache), 90, str(tmp_path))
    assert second["built"] == [] and second["launches"] == first["launches"], second
    assert "| compaction | " in tool._table({"compaction": second}) and "| none | none |" in tool._table(
        {"compaction": second})


def test_profile_dry_run_writes_every_section(tmp_path):
    """``bench/profile_ops.py --tiny`` (the GPU diagnosis tool's CPU dry run): each section runs its op, times it
    and writes its profiler table; a section that raises is reported as FAILED with a non-zero exit status."""
    profile_ops = _bench_tool_for_a_dry_run("profile_ops")
    assert profile_ops.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "profile_ops.txt").read_text()
    for name in profile_ops.SECTIONS:
        section = report.split(f"##### {name} ")[1].split("#####")[0]
        assert "ms per call back to back" in section and "Self CPU time total" in section, (name, section[:300])
    assert "FAILED" not in report
    assert "op forward + backward through autograd" in report.split("##### norm_rope ")[1].split("#####")[0]
    broken = lambda *args: 1 / 0  # noqa: E731
    profile_ops.compaction_section = broken
    assert profile_ops.main(["--tiny", "--section", "compaction", "--out", str(tmp_path)]) == 1
    assert "FAILED: ZeroDivisionError" in (tmp_path / "profile_ops.txt").read_text()


def test_profile_run_cut_short_keeps_the_sections_it_finished(tmp_path):
    """gpu_check.sh runs the profile last, under a timeout: every finished section is on disk before the next
    starts (a run killed in the middle of a section keeps the ones before it)."""
    profile_ops = _bench_tool_for_a_dry_run("profile_ops")
    profile_ops.compaction_section = lambda *args: "first section's table"

    def killed(*args):  # the timeout's kill arrives while this section runs: look at what is on disk then
        raise SystemExit((tmp_path / "profile_ops.txt").read_text())

    profile_ops.selection_section = killed
    with pytest.raises(SystemExit) as cut:
        profile_ops.main(["--tiny", "--section", "compaction", "--section", "selection", "--out", str(tmp_path)])
    assert "##### compaction" in str(cut.value) and "first section's table" in str(cut.value)


def test_qwen_step_shrinks_each_reference_to_a_grid_of_exactly_the_kept_count():
    for count in list(range(1, 300)) + [410, 1024, 205]:
        h, w = benchmarks._near_square_grid(count)
        assert h * w == count and h <= w and h * h <= count, (count, h, w)
        assert not any(count % d == 0 for d in range(h + 1, math.isqrt(count) + 1)), (count, h)  # the squarest
    assert benchmarks._near_square_grid(1024) == (32, 32)
    with pytest.raises(ValueError, match="at least one token"):
        benchmarks._near_square_grid(0)
    full = benchmarks.CASES["e2e_qwen"].sizes["full"]  # FACTS §1's Qwen-Image-Edit peer: 256 text tokens
    assert (full["text"], full["target_side"], full["ref_side"]) == (256, 64, 64)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
def test_drop_in_rows_check_what_the_selection_kept(monkeypatch):
    """The e2e cases' drop-in rows verify that the drop-in kept the budget's count of every reference (a drop-in that
    kept every token, or none, would time another step)."""
    from sparsectx import integration

    workload = benchmarks.CASES["e2e_qwen"].build((3, 0.25), "tiny", torch.device("cpu"))
    impl = workload.impl("sparsectx.enable (native attn)")
    n_ref = benchmarks.CASES["e2e_qwen"].sizes["tiny"]["ref_side"] ** 2
    with impl.context():
        result = impl.output(impl.fn())
    assert result.shape[1] == benchmarks.CASES["e2e_qwen"].sizes["tiny"]["target_side"] ** 2
    assert impl.verify(result) == ""
    assert impl.verify(result) == "sparsectx made no selection"  # each check reads the selection of its own call
    real = integration.last_selection

    def one_more_token(model):
        selection = real(model)
        keep = selection.keep.clone()
        keep[0, n_ref + int((~keep[0, n_ref:2 * n_ref]).nonzero()[0])] = True  # the second reference keeps 5
        return integration.Selection(keep, selection.ref_lengths, selection.ref_positions)

    def another_token(model):  # the right counts, one token of the second reference swapped for a dropped one
        selection = real(model)
        keep = selection.keep.clone()
        second = keep[0, n_ref:2 * n_ref]
        second[int(second.nonzero()[0])], second[int((~second).nonzero()[0])] = False, True
        return integration.Selection(keep, selection.ref_lengths, selection.ref_positions)

    monkeypatch.setattr(integration, "last_selection", another_token)
    with impl.context():
        result = impl.output(impl.fn())
    assert impl.verify(result) == "kept other tokens than each reference's top-scored ones"
    monkeypatch.setattr(integration, "last_selection", one_more_token)
    with impl.context():
        result = impl.output(impl.fn())
    assert impl.verify(result) == "kept [4, 5, 4] tokens per reference, not 4 each"
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["sparsectx.enable (native attn)"]["ok"] is False
    assert "CHECK FAILED: kept [4, 5, 4]" in by_impl["sparsectx.enable (native attn)"]["note"]


def test_qwen_step_is_judged_against_references_shrunk_to_the_kept_count():
    rows = _block("e2e_qwen", "3 ref x 10% (1230 of 12288 tokens), target 4096", {
        "sparsectx.enable (native attn)": 272.0, "sparsectx.enable (sparsectx attn)": 280.0,
        "reference grid shrunk to the kept count": 266.0, "keep all reference tokens": 1043.0})
    lines = [line for line in benchmarks.target_verdicts(rows) if "e2e_qwen" in line]
    assert len(lines) == 1 and "within 3% of the compacted ideal" in lines[0]
    assert "x0.978 (>= 0.971: meets)" in lines[0]
    rows[0]["time_ms"] = 275.0
    assert "MISSES" in benchmarks.target_verdicts(rows)[0]


def test_the_drop_in_target_is_not_judged_when_the_blocks_sparsectx_row_failed():
    """In an e2e block the drop-in target compares "sparsectx.enable (native attn)" with the by-hand peer, both
    checked against the block's first row ("sparsectx compact_tokens + step"); when that row's own check failed,
    the rows compared against it judge nothing ("not judged", naming it)."""
    shape = "3 ref x 10%, 1024x1024"
    rows = [_row("e2e", shape, "sparsectx compact_tokens + step", 10.0, ok=False),
            _row("e2e", shape, "sparsectx.enable (native attn)", 10.1),
            _row("e2e", shape, "torch topk+sort+index_select + step", 10.2)]
    lines = [line for line in benchmarks.target_verdicts(rows) if "drop-in within 3% of the compacted" in line]
    assert len(lines) == 1 and "not judged" in lines[0] and "sparsectx compact_tokens + step" in lines[0], lines


def test_gpu_checks_test_step_reports_each_failure_as_it_happens(tmp_path):
    """The GPU check's test step runs under a timeout that can kill pytest before its failure summary: with
    SPARSECTX_REPORT_AS_RUN=1 (which gpu_check.sh sets) this suite's conftest prints each test's time and a
    failure's traceback right after the test, before the next test starts."""
    import subprocess
    import sys

    (tmp_path / "test_planted.py").write_text(
        "def test_fails():\n    assert 1 == 2, 'planted failure'\n\n\ndef test_after():\n    pass\n")
    tests_dir = Path(__file__).parent
    env = {**os.environ, "SPARSECTX_REPORT_AS_RUN": "1", "PYTHONPATH": str(tests_dir)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "conftest",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_planted.py")],
                         capture_output=True, text=True, env=env, timeout=120)
    out = run.stdout
    assert run.returncode == 1, out
    planted = out.index("planted failure")
    assert planted < out.index("test_after"), out  # the traceback came before the next test ran
    assert "test_fails call: failed" in out and "test_after call: passed" in out
    script = (tests_dir.parent / "bench" / "gpu_check.sh").read_text()
    assert "SPARSECTX_REPORT_AS_RUN=1" in script


def test_gpu_checks_test_step_in_parallel_workers_still_reports_and_counts(tmp_path):
    """The GPU check runs its longer test steps in pytest-xdist workers (kernel builds in parallel: the 120 s cap cut
    the GPU tests after 11 of 44 on 2026-12-04): a failure's traceback still comes as it happens, and the summary's
    counts of the -v lines (its grep patterns, copied here from gpu_check.sh) still see each test once."""
    import re
    import subprocess
    import sys

    (tmp_path / "test_planted.py").write_text(
        "def test_fails():\n    assert 1 == 2, 'planted failure'\n\n\ndef test_after():\n    pass\n")
    tests_dir = Path(__file__).parent
    env = {**os.environ, "SPARSECTX_REPORT_AS_RUN": "1", "PYTHONPATH": str(tests_dir)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "conftest", "-n", "2",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_planted.py")],
                         capture_output=True, text=True, env=env, timeout=180)
    out = run.stdout
    assert run.returncode == 1, out
    assert "test_fails call: failed" in out and "test_after call: passed" in out and "planted failure" in out
    script = (tests_dir.parent / "bench" / "gpu_check.sh").read_text()
    passed, failed = (re.search(rf'grep -c?E "({word}[^"]*)" "\$TESTS_LOG"', script).group(1)
                      for word in (r" PASSED", r" \(FAILED"))
    lines = out.splitlines()
    assert sum(bool(re.search(passed, line)) for line in lines) == 1, out
    assert sum(bool(re.search(failed, line)) for line in lines) == 1, out
    assert re.search(r'tests "pytest -m gpu" [^\n]*"\$\{PARALLEL\[@\]\}"', script)
    assert re.search(r'tests "pytest not gpu" [^\n]*"\$\{PARALLEL\[@\]\}"', script)


def test_gpu_checks_test_step_killed_by_its_timeout_says_where_the_test_was(tmp_path):
    """A GPU check step's timeout kills pytest with SIGTERM in the middle of a test, whose -v line then holds its
    name alone: with SPARSECTX_REPORT_AS_RUN=1 the suite's conftest first writes every thread's Python stack to
    the real stderr (past pytest's capture), which names the line the test was at."""
    import signal
    import subprocess
    import sys
    import time

    started = tmp_path / "started"
    (tmp_path / "test_planted.py").write_text(
        "import pathlib, time\n\n\ndef planted_wait():\n"
        f"    pathlib.Path({str(started)!r}).touch()\n    time.sleep(120)\n\n\n"
        "def test_waits():\n    planted_wait()\n")
    tests_dir = Path(__file__).parent
    env = {**os.environ, "SPARSECTX_REPORT_AS_RUN": "1", "PYTHONPATH": str(tests_dir)}
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "conftest",
                            "--rootdir", str(tmp_path), str(tmp_path / "test_planted.py")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert started.exists(), "the planted test never started"
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == -signal.SIGTERM, out  # (the dump chains to the default action: the run still ends)
    assert "in planted_wait" in out and "in test_waits" in out, out


def test_a_ratio_or_time_exactly_at_its_bound_meets():
    """The targets read ">= bound" and "<= 25 us": a value exactly at the bound meets; the selection target is
    "under 2%": a share of exactly 2% misses."""
    rows = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.75})
    rows += _block("compaction", "B=1, N=8", {"sparsectx compact_tokens (scores+budget)": 0.025,
                                              "index_select (precomputed indices)": 0.02})
    lines = benchmarks.target_verdicts(rows)
    assert any("cuDNN" in line and "x0.750 (>= 0.750: meets)" in line for line in lines), lines
    assert any("25.0 us (<= 25 us: meets)" in line for line in lines), lines
    shape = "3 ref x 4096 tokens, C=128, selector uniform, H=32, D=128"
    at_bound = [_row("selection", shape, "select, fixed 10%", 0.1, step_pct=benchmarks.SELECTION_STEP_TARGET_PCT)]
    assert "MISSES: worst 2.00%" in benchmarks.selection_verdict(at_bound)


def test_a_selection_row_that_failed_its_check_is_not_the_worst_share():
    shape = "3 ref x 4096 tokens, C=128, selector {}, H=32, D=128"
    rows = [_row("selection", shape.format("uniform"), "select, fixed 10%", 0.1, step_pct=0.3),
            _row("selection", shape.format("random"), "select, fixed 10%", 9.0, step_pct=9.0, ok=False)]
    line = benchmarks.selection_verdict(rows)
    assert "meets: worst 0.30%" in line and "1 of 1 rows judged" in line, line


def test_kv_target_judges_3_and_4_references_at_either_share_and_nothing_else():
    """The KV speed-up target is set per reference count (3: 4.5x, 4: 6x; the issue names no kept share), so 3 and
    4 references are judged at 10% and at 5%; a block with another count gets no line."""
    rows = []
    for refs, keep in ((1, "10%"), (2, "10%"), (3, "10%"), (13, "10%"), (3, "5%"), (4, "10%"), (4, "5%")):
        rows += _block("kv", f"{refs} ref x {keep}, target 4096", {
            "sparsectx.enable + KV cache": 10.0, "plain run, all references, no cache": 50.0})
    lines = [line for line in benchmarks.target_verdicts(rows) if "sparse + KV" in line]
    assert all(line.split()[3:6] in (["3", "ref", "x"], ["4", "ref", "x"]) for line in lines), lines
    lines = [line for line in lines if "sparsectx attention" not in line]  # (that row is not in these blocks)
    assert [" ".join(line.split()[3:7]) for line in lines] == ["3 ref x 10%,", "3 ref x 5%,", "4 ref x 10%,",
                                                              "4 ref x 5%,"], lines
    assert all("x5.000 (>= 4.500: meets)" in line for line in lines[:2]), lines
    assert all("x5.000 (>= 6.000: MISSES)" in line for line in lines[2:]), lines


def test_back_to_back_time_target_reads_the_rows_loop_time():
    """Issue 3's third compaction verdict is on the row's back-to-back time (``loop_ms``), not its event time."""
    rows = _block("compaction", "B=1, N=8", {"sparsectx compact_tokens (scores+budget)": 0.030,
                                             "index_select (precomputed indices)": 0.02})
    rows[0]["loop_ms"] = 0.020
    lines = [line for line in benchmarks.target_verdicts(rows) if "<= 25 us" in line]
    back_to_back = [line for line in lines if "back to back" in line]
    per_call = [line for line in lines if "CUDA events" in line]
    assert len(back_to_back) == 1 and "20.0 us (<= 25 us: meets)" in back_to_back[0], lines
    assert len(per_call) == 1 and "30.0 us (<= 25 us: MISSES)" in per_call[0], lines
    del rows[0]["loop_ms"]
    lines = [line for line in benchmarks.target_verdicts(rows) if "back to back" in line]
    assert len(lines) == 1 and "not measured" in lines[0] and "loop_ms" in lines[0], lines


def test_the_kontext_step_is_judged_by_issue_5s_step_target():
    """Issue 5: "within 3% of the compacted ideal ... Also FLUX.1-Kontext-12B shapes": the Kontext step's drop-in
    and compaction rows are judged against its by-hand compacted step as klein's are (before, no line)."""
    shape = "1 ref x 10% (410 of 4096 tokens), target 4096, text 512, Kontext-12B bfloat16"
    rows = _block("e2e_kontext", shape, {"sparsectx compact_tokens + step": 100.0,
                                         "sparsectx.enable (native attn)": 150.0,
                                         "torch topk+sort+index_select + step": 100.0})
    lines = [line for line in benchmarks.target_verdicts(rows) if "e2e_kontext" in line]
    assert len(lines) == 2, lines
    assert "drop-in within 3%" in lines[0] and "x0.667 (>= 0.971: MISSES)" in lines[0]
    assert "x1.000 (>= 0.971: meets)" in lines[1]


def test_no_host_sync_targets_read_the_counted_syncs():
    """Issue 3's scores+budget path and issue 4's mixed-budget batch must not synchronise: judged on the syncs the
    run counted on CUDA (``host_syncs``; runs before the field gave the count in the note only, and the record
    called the path sync-free while every one counted 1 sync per call)."""
    row_of = {"compaction": "sparsectx compact_tokens (scores+budget)", "batch": "sparsectx (packed varlen)"}
    for case, impl in row_of.items():
        def line(**fields):
            rows = _block(case, "B=1", {impl: 0.03, "topk+sort+gather": 0.16})
            rows[0].update(fields)
            found = [text for text in benchmarks.target_verdicts(rows) if "no host sync" in text]
            assert len(found) == 1, found
            return found[0]

        assert line(host_syncs=0).endswith("0 per call (meets)")
        assert line(host_syncs=2).endswith("2 per call (MISSES)")
        assert line(note="selection included; 1 host syncs per call; 0 host reads per call").endswith(
            "1 per call (MISSES)")
        assert "not measured" in line()  # a CPU run counts no sync
        # (the batch row was first counted on 2026-12-02: earlier H200 runs read as uncounted, not as CPU runs)
        assert line().endswith("counted on CUDA only, on this row since 2026-12-02)" if case == "batch" else
                               "counted on CUDA only)")
        assert "not judged" in line(host_syncs=0, ok=False)


def _selection_rows(refs, selector, time_ms):
    shape = f"{refs} ref x 4096 tokens, C=128, selector {selector}, H=32, D=128"
    return [_row("selection", shape, "select, fixed 10%", time_ms)]


def test_selection_shares_relate_to_the_no_reference_step_and_the_probe_of_the_same_reference_count():
    """annotate: each selection row's share of the no-reference e2e step; with the keep-all step of its reference
    count in the note; for a selector that reads probe tensors, the share with the automatic probe (the e2e
    breakdown's probe row of the same reference count) added to the selection's time."""
    case = benchmarks.CASES["selection"]
    earlier = [_row("e2e", "1 ref x 5%", benchmarks.NO_REFERENCE_ROW, 100.0),
               _row("e2e", "1 ref x 5%", benchmarks.KEEP_ALL_ROW, 250.0),
               _row("e2e", "3 ref x 5%", benchmarks.KEEP_ALL_ROW, 500.0),
               _row("e2e", "1 ref x 5%, enable-path breakdown", "(e) attention probe (first block)", 7.0),
               _row("e2e", "3 ref x 5%, enable-path breakdown", "(e) attention probe (first block)", 1.0)]
    attention = _selection_rows(3, "attention", 0.5)
    case.annotate(attention, earlier)
    assert attention[0]["step_pct"] == pytest.approx(0.5)  # 0.5 ms of the 100 ms no-reference step
    assert attention[0]["step_pct_with_probe"] == pytest.approx(1.5)  # (0.5 + 1.0) ms of 100 ms
    assert "0.10% of keep-all with 3 ref" in attention[0]["note"]  # 0.5 of 500 ms
    uniform = _selection_rows(3, "uniform", 0.5)  # reads no probe tensor: no probe share
    case.annotate(uniform, earlier)
    assert uniform[0]["step_pct"] == pytest.approx(0.5) and "step_pct_with_probe" not in uniform[0]
    assert "automatic probe" not in uniform[0]["note"]
    unmeasured = _selection_rows(3, "attention", 0.5)
    case.annotate(unmeasured, [r for r in earlier if r["impl"] != benchmarks.NO_REFERENCE_ROW])
    assert "step_pct" not in unmeasured[0] and "step not measured" in unmeasured[0]["note"]


def test_results_match_holds_the_dtypes_relative_error_bound():
    gen = torch.Generator().manual_seed(0)
    expected = torch.randn(64, 32, generator=gen)
    workload = benchmarks.Workload("t", "64x32", [], torch.float32)
    bound = benchmarks.REL_ERR_BOUND[torch.float32]
    assert benchmarks.results_match(expected * (1 + bound / 2), expected, workload)[0] is True
    ok, err = benchmarks.results_match(expected * (1 + 3 * bound), expected, workload)  # every row 3x the bound off
    assert ok is False and err == pytest.approx(3 * bound, rel=1e-3)


def test_an_exact_check_fails_outputs_of_another_count():
    x = torch.arange(6.0)
    exact = benchmarks.Workload("t", "6", [], torch.float32, exact=True)
    assert benchmarks.results_match((x,), (x, x), exact)[0] is False
    assert benchmarks.results_match((x, x), (x,), exact)[0] is False
    assert benchmarks.results_match((x, x), (x, x), exact)[0] is True


def test_run_workload_fills_throughput_and_the_bytes_moved_floor(monkeypatch):
    """TFLOP/s and GB/s from the workload's counts and the row's time; the floor row is the bytes moved at the copy
    rate measured in the run (so its own GB/s is that rate)."""
    monkeypatch.setattr(benchmarks, "time_ms", lambda fn, device, **kw: 2.0)
    x = torch.ones(4)
    workload = benchmarks.Workload("t", "4", [benchmarks.Impl("sparsectx", lambda: x)], torch.float32,
                                   flops=6e9, bytes_moved=4e6)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True,
                                   shared={"ceilings": {"copy_GBps": 100.0}})
    ours, floor = rows
    assert ours["tflops"] == pytest.approx(3.0)  # 6 GFLOP in 2 ms
    assert ours["gbps"] == pytest.approx(2.0)  # 4 MB in 2 ms
    assert floor["impl"] == "bytes-moved floor" and floor["time_ms"] == pytest.approx(0.04)  # 4 MB at 100 GB/s
    assert floor["gbps"] == pytest.approx(100.0) and floor["ratio"] == pytest.approx(0.02)


def test_an_unavailable_peer_is_neither_checked_nor_timed_and_judges_nothing():
    x = torch.ones(4)
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: x),
             benchmarks.Impl("topk+sort+gather", lambda: x, skip="needs a GPU")]
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    peer = rows[1]
    assert peer["ok"] is None and peer["time_ms"] is None and peer["ratio"] is None
    assert peer["note"] == "unavailable: needs a GPU"
    line = next(line for line in benchmarks.format_table(rows).splitlines() if "topk+sort+gather" in line)
    assert line.endswith("-  unavailable: needs a GPU"), line  # no check shown: it was not compared
    lines = [line for line in benchmarks.target_verdicts(rows) if "topk+sort+gather" in line]
    assert len(lines) == 1 and "not measured" in lines[0], lines


def test_a_sparsectx_output_no_peer_compared_judges_no_target():
    """A block whose every peer is unavailable (or computes something else by design) leaves sparsectx's output
    unchecked (``ok`` None, no agreeing comparison): its time and sync count judge nothing, and the tables say
    "unchecked" (before, the 25 us compaction targets said meets / MISSES on an output nothing checked)."""
    x = torch.ones(4)
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: x),
             benchmarks.Impl("topk+sort+gather", lambda: x, skip="needs a GPU"),
             benchmarks.Impl("index_select (precomputed indices)", lambda: x, comparable=False)]
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    assert rows[0]["ok"] is None and rows[2]["ok"] is True and rows[2]["err"] is None  # (shape and finite only)
    rows[0]["loop_ms"], rows[0]["host_syncs"] = rows[0]["time_ms"], 0
    lines = [line for line in benchmarks.target_verdicts(rows) if "issue 3" in line]
    assert len(lines) == 4, lines  # 5x, 25 us by events and back to back, no host sync
    assert "topk+sort+gather" in lines[0] and "not measured" in lines[0], lines  # (a missing time says so first)
    for line in lines[1:]:
        assert line.endswith("not judged (sparsectx compact_tokens (scores+budget): no peer compared with its "
                             "output in this run)"), line
    for table in (benchmarks.format_table(rows), benchmarks.format_markdown({}, rows)):
        first = [line for line in table.splitlines() if line.lstrip(" |").startswith("sparsectx compact_tokens")]
        assert len(first) == 1 and "unchecked (no peer compared)" in first[0], first
    # sparsectx's other rows run the same kernels: where the workload has independent peers, their agreeing
    # does not check it (a wrong kernel agrees with itself)
    with_own = impls + [benchmarks.Impl("sparsectx compact_tokens (keep mask)", lambda: x)]
    rows = benchmarks.run_workload(_workload(with_own), torch.device("cpu"), quick=True)
    assert rows[-1]["ok"] is True and rows[-1]["err"] == 0.0 and rows[0]["checked_by"] == 0
    rows[0]["loop_ms"], rows[0]["host_syncs"] = rows[0]["time_ms"], 0
    assert all("not judged" in line for line in benchmarks.target_verdicts(rows) if "issue 3" in line
               and "topk+sort+gather" not in line)
    # ... where it has none (the e2e breakdown, train_step), they do
    own_only = [with_own[0], with_own[-1]]
    rows = benchmarks.run_workload(_workload(own_only), torch.device("cpu"), quick=True)
    assert rows[0]["checked_by"] == 1 and "unchecked" not in benchmarks.format_table(rows)
    # a peer compared with it and agreeing makes it checked; one that only ran (no comparison) does not
    impls[1] = benchmarks.Impl("topk+sort+gather", lambda: x)
    rows = benchmarks.run_workload(_workload(impls), torch.device("cpu"), quick=True)
    assert rows[1]["ok"] is True and rows[1]["err"] == 0.0 and rows[0]["checked_by"] == 1
    lines = [line for line in benchmarks.target_verdicts(rows) if "issue 3" in line]
    assert lines and not any("not judged" in line for line in lines), lines
    assert "unchecked" not in benchmarks.format_table(rows)
    # the selection target leaves out a select row nothing checked, and says how many
    shape = "3 ref x 4096 tokens, C=128, selector {}, H=32, D=128"
    selection = (_block("selection", shape.format("uniform"), {"select, fixed 10%": 0.1,
                                                                "selector scores + torch stable top-k": 0.1})
                 + [_row("selection", shape.format("random"), "select, fixed 10%", 9.0, ok=None, step_pct=9.0)])
    selection[0]["step_pct"] = 0.3
    line = benchmarks.selection_verdict(selection)
    assert "(1 row(s) whose output no peer checked not judged)" in line and "meets: worst 0.30%" in line, line
    assert "1 of 1 rows judged" in line, line


def test_the_judged_rows_are_written_before_the_later_passes(monkeypatch):
    """The checks judged after the first pass (every compared peer disagreeing, the higher-precision reference)
    reached the rows written out (on_row) only at the end of the second pass: a run cut there (the GPU check's
    step timeouts) kept its sparsectx row unjudged, a FAIL lost. Now they are written before the later passes."""
    right, wrong = torch.arange(8.0), torch.arange(8.0) + 1
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: wrong),
             benchmarks.Impl("topk+sort+gather", lambda: right)]
    written = []

    def on_row(rows):
        written.append([dict(r) for r in rows])

    workload = _workload(impls, passes=2)
    real_timing = benchmarks.time_ms
    calls = []

    def cut_in_pass_two(fn, device, **kw):
        calls.append(fn)
        if len(calls) > len(impls):  # the second pass's first timing: the run is cut here
            raise KeyboardInterrupt
        return real_timing(fn, device, **kw)

    monkeypatch.setattr(benchmarks, "time_ms", cut_in_pass_two)
    with pytest.raises(KeyboardInterrupt):
        benchmarks.run_workload(workload, torch.device("cpu"), quick=True, on_row=on_row)
    last = written[-1]
    assert last[0]["ok"] is False and "every compared peer (1) disagrees" in last[0]["note"], last[0]
    assert "not judged" in benchmarks.target_verdicts(last)[0]


class _OneShapeCase:
    """A bench case of one shape, ``label``, whose workload ``build()`` makes."""

    def __init__(self, label, build):
        self._label, self._build = label, build

    def configs(self, size, quick=False):
        return [None]

    def label(self, config):
        return self._label

    def build(self, config, size, device):
        return self._build()


def _cut_run_rows(monkeypatch, cut_at_call):
    """The rows a run leaves written when the ``cut_at_call``-th timing raises (a step's timeout): the compaction
    workload of three rows, run through ``run_case`` (which marks the rows of a workload still running)."""
    x = torch.arange(8.0)
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: x),
             benchmarks.Impl("topk+sort+gather", lambda: x + 0), benchmarks.Impl("x[mask] (host sync)", lambda: x + 0)]

    calls = []

    def cut(fn, device, **kw):
        calls.append(fn)
        if len(calls) == cut_at_call:
            raise KeyboardInterrupt
        return {impls[0].fn: 1.0, impls[1].fn: 6.0, impls[2].fn: 2.0}[fn]

    monkeypatch.setitem(benchmarks.CASES, "compaction", _OneShapeCase("B=1, N=8", lambda: _workload(impls, passes=2)))
    monkeypatch.setattr(benchmarks, "time_ms", cut)
    written = []
    with pytest.raises(KeyboardInterrupt):
        benchmarks.run_case("compaction", torch.device("cpu"), "tiny", on_rows=written.append)
    return written[-1]


def test_a_run_cut_before_a_shapes_checks_judges_nothing_there_and_says_it_was_cut(monkeypatch):
    """A file written while a workload ran (the GPU check cuts steps by timeouts) was judged as it stood: cut
    after one peer agreed but before the checks were judged, its targets read meets / MISSES and nothing said the
    block was cut. Its rows are now marked unfinished: the tables and the summary say CUT SHORT, and the targets
    are not judged."""
    rows = _cut_run_rows(monkeypatch, cut_at_call=3)  # the third row's first timing
    assert [r["impl"] for r in rows] == ["sparsectx compact_tokens (scores+budget)", "topk+sort+gather"]
    assert all(r["unfinished"] for r in rows) and rows[1]["ok"] is True  # (the peer agreed)
    verdicts = benchmarks.target_verdicts(rows)
    ratio = next(line for line in verdicts if ">= 5x faster than topk+sort+gather" in line)
    assert ratio.endswith("not judged (the run was cut before this shape's checks were judged)"), ratio
    time = next(line for line in verdicts if "<= 25 us (CUDA events per call)" in line)
    assert time.endswith("not judged (the run was cut before this shape's checks were judged)"), time
    assert "B=1, N=8 (CUT SHORT before its checks: the run stopped inside this shape)" in \
        benchmarks.format_table(rows)
    markdown = benchmarks.format_markdown({}, rows)
    assert "**compaction**, B=1, N=8 (CUT SHORT before its checks" in markdown
    assert "unchecked (cut before its checks)" in markdown
    assert "CUT SHORT before its checks" in benchmarks.format_summary({}, rows)


def test_a_run_cut_while_building_the_next_shape_leaves_the_finished_one_unmarked(monkeypatch):
    """The last write of a finished workload kept its rows marked unfinished until the next workload wrote a row: a
    run cut while the next shape was built (a model loading) called the finished shape CUT SHORT. The finished
    shape's rows are written unmarked first."""
    x = torch.arange(8.0)
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", lambda: x),
             benchmarks.Impl("topk+sort+gather", lambda: x + 0)]

    class TwoShapes(_OneShapeCase):
        def configs(self, size, quick=False):
            return [1, 2]

        def build(self, config, size, device):
            if config == 2:
                raise KeyboardInterrupt  # (the step's timeout while the second shape is built)
            return _workload(impls)

    monkeypatch.setitem(benchmarks.CASES, "compaction", TwoShapes("B=1, N=8", None))
    monkeypatch.setattr(benchmarks, "time_ms", lambda fn, device, **kw: 1.0 if fn is impls[0].fn else 6.0)
    written = []
    with pytest.raises(KeyboardInterrupt):
        benchmarks.run_case("compaction", torch.device("cpu"), "tiny", on_rows=written.append)
    rows = written[-1]
    assert len(rows) == 2 and not any(r.get("unfinished") for r in rows), rows
    assert "CUT SHORT" not in benchmarks.format_table(rows) + benchmarks.format_summary({}, rows)


def test_a_run_cut_in_a_later_pass_judges_the_checked_shape_and_says_it_was_cut(monkeypatch):
    rows = _cut_run_rows(monkeypatch, cut_at_call=4)  # the second pass's first timing
    assert len(rows) == 3 and all(r["unfinished"] for r in rows) and rows[0]["checked_by"] == 2
    ratio = next(line for line in benchmarks.target_verdicts(rows) if ">= 5x faster than topk+sort+gather" in line)
    assert "x6.000 (>= 5.000: meets)" in ratio, ratio
    assert "(CUT SHORT after its checks: the run stopped inside this shape)" in benchmarks.format_table(rows)


def test_a_case_needing_a_missing_package_is_unavailable_not_failed(monkeypatch):
    """The pipeline case on a machine without transformers (diffusers' Flux2KleinPipeline needs it): its row says
    unavailable and what to install, and fails nothing (before, a '(setup)' FAIL noting only 'ImportError: ', as
    diffusers' messages start with a newline)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers"
                        else real(name, *a))
    rows = benchmarks.run_case("pipeline", torch.device("cpu"), "tiny", quick=True)
    assert [(r["impl"], r["ok"]) for r in rows] == [("(setup)", None)]
    assert rows[0]["note"] == "unavailable: Flux2KleinPipeline needs transformers (pip install transformers)"
    assert benchmarks._first_line(ImportError("\nFlux2KleinPipeline requires the transformers library")) == \
        "ImportError: Flux2KleinPipeline requires the transformers library"


def test_rows_written_as_they_come_are_annotated_as_the_finished_case(monkeypatch):
    """A case with ``annotate`` (selection, pipeline) filled its shares only once a workload finished: a run cut by
    its timeout mid-workload (the pipeline's second pass on the H200's part 1) left timed rows without them, and the
    summary said 'not judged'. Each incremental write now holds the annotations of the rows written so far, made on
    copies (the rows themselves are annotated once, at the end)."""
    class Annotated(_OneShapeCase):
        def annotate(self, rows, earlier_rows):
            for row in rows:
                row["note"] = (row["note"] or "") + f" annotated among {len(rows)}"

    def fake_run_workload(workload, device, quick, shared, on_row):
        rows = []
        for impl in ("first", "second"):
            rows.append(_row("fake", "s", impl, 1.0, ok=True))
            on_row(list(rows))
        return rows

    monkeypatch.setitem(benchmarks.CASES, "fake", Annotated("s", object))
    monkeypatch.setattr(benchmarks, "run_workload", fake_run_workload)
    written = []
    rows = benchmarks.run_case("fake", torch.device("cpu"), "tiny", on_rows=written.append)
    # (the last write: the finished shape's own rows, annotated once, written before the next shape is built)
    assert [[r["note"].strip() for r in w] for w in written] == [["annotated among 1"],
                                                                 ["annotated among 2", "annotated among 2"],
                                                                 ["annotated among 2", "annotated among 2"]]
    assert [r["note"].strip() for r in rows] == ["annotated among 2"] * 2  # once each, at the end


def test_a_later_pass_notes_each_rows_time_and_its_ratio_to_sparsectxs(monkeypatch):
    x = torch.ones(4)
    ours, peer = (lambda: x), (lambda: x + 0)
    times = {ours: 2.0, peer: 3.0}
    monkeypatch.setattr(benchmarks, "time_ms", lambda fn, device, **kw: times[fn])
    impls = [benchmarks.Impl("sparsectx compact_tokens (scores+budget)", ours),
             benchmarks.Impl("topk+sort+gather", peer)]
    rows = benchmarks.run_workload(_workload(impls, passes=2), torch.device("cpu"), quick=True)
    assert rows[1]["ratio"] == pytest.approx(1.5)
    assert rows[0]["note"].endswith("pass 2: 2 ms x1.00") and rows[1]["note"].endswith("pass 2: 3 ms x1.50")


def test_later_passes_alternate_the_order_and_targets_take_each_rows_fastest_pass(monkeypatch):
    """A second pass runs the rows in the opposite order (A B, B A, A B): a drift over the block weighs on each row
    alike; the notes keep the rows' order, and a target judges each row's fastest pass."""
    x = torch.ones(4)
    ours, peer = (lambda: x), (lambda: x + 0)
    order, times = [], {ours: [3.0, 2.0, 2.5], peer: [2.0, 2.4, 2.2]}
    names = {ours: "ours", peer: "peer"}

    def fake_time_ms(fn, device, **kw):
        order.append(names[fn])
        return times[fn][sum(name == names[fn] for name in order) - 1]

    monkeypatch.setattr(benchmarks, "time_ms", fake_time_ms)
    impls = [benchmarks.Impl("sparsectx compact_tokens + step", ours),
             benchmarks.Impl("torch topk+sort+index_select + step", peer)]
    workload = benchmarks.Workload("e2e", "3 ref x 5%", impls, torch.float32, exact=True, passes=3)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert order == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert rows[0]["pass_ms"] == [3.0, 2.0, 2.5] and rows[1]["pass_ms"] == [2.0, 2.4, 2.2]
    assert "pass 2: 2 ms x1.00" in rows[0]["note"] and "pass 2: 2.4 ms x1.20" in rows[1]["note"]
    line = next(line for line in benchmarks.target_verdicts(rows)
                if "within 3% of the compacted ideal" in line and "drop-in" not in line)
    # first pass: 2.0 / 3.0 = x0.667; fastest passes: 2.0 / 2.0 = x1.000
    assert "x1.000 (>= 0.971, fastest of 3 passes each: meets)" in line, line


def test_tables_show_peak_memory_and_the_byte_rate_of_data_movement():
    rows = _block("e2e", "3 ref x 5%", {"sparsectx compact_tokens + step": 100.0,
                                        "torch topk+sort+index_select + step": 120.0})
    rows[0]["peak_mem_gb"], rows[1]["peak_mem_gb"] = 12.5, 20.0
    table, markdown = benchmarks.format_table(rows), benchmarks.format_markdown({}, rows)
    assert "peak GiB" in table and "peak GiB" in markdown
    assert "12.5" in next(line for line in table.splitlines() if "sparsectx compact_tokens" in line)
    assert "| 20.0 |" in next(line for line in markdown.splitlines() if "torch topk" in line)
    assert "peak GiB" not in benchmarks.format_table(_block("e2e", "1 ref", {"sparsectx compact_tokens + step": 1.0}))
    moved = _block("compaction", "B=1", {"sparsectx compact_tokens (scores+budget)": 0.03, "x[mask] (host sync)": None})
    moved[0]["gbps"] = 400.0
    assert "GB/s" in benchmarks.format_table(moved) and "TFLOP/s" not in benchmarks.format_table(moved)


def test_merged_meta_keeps_every_parts_planned_cases_and_quick_flag(tmp_path):
    meta = {"device": "NVIDIA H200", "size": "full", "commit": "abc1234"}
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    benchmarks.write_json(a, dict(meta, cases=["attention"], quick=False),
                          _block("attention", "L=1", {"sparsectx (compacted)": 1.0}))
    benchmarks.write_json(b, dict(meta, cases=["training", "kv"], quick=True),
                          _block("training", "B=4", {"sparsectx (packed varlen)": 1.0}))
    merged = benchmarks.merge_runs([a, b])["meta"]
    assert merged["planned_cases"] == ["attention", "training", "kv"]
    assert merged["cases"] == ["attention", "training"]
    assert merged["quick"] is True  # one quick part makes the whole run quick
    assert benchmarks.merge_runs([a])["meta"]["quick"] is False
    # each part's machine details: parts run on two lent machines keep both hosts, and the summary names both
    benchmarks.write_json(a, dict(meta, cases=["attention"], host="Intel Xeon 8480", date="2026-12-01"),
                          _block("attention", "L=1", {"sparsectx (compacted)": 1.0}))
    benchmarks.write_json(b, dict(meta, cases=["training"], host="AMD EPYC 9654", date="2026-12-02"),
                          _block("training", "B=4", {"sparsectx (packed varlen)": 1.0}))
    run = benchmarks.merge_runs([a, b])
    assert [(p["host"], p["date"]) for p in run["meta"]["parts"]] == [("Intel Xeon 8480", "2026-12-01"),
                                                                      ("AMD EPYC 9654", "2026-12-02")]
    header = benchmarks.format_summary(run["meta"], run["rows"]).splitlines()[0]
    assert header.endswith("hosts (by part) Intel Xeon 8480 / AMD EPYC 9654"), header
    # the markdown (what RESULTS.md records) names each part's host and ceilings too (the first part's alone before)
    markdown = benchmarks.format_markdown(run["meta"], run["rows"]).splitlines()
    # (no ceilings measured in these hand-made parts: not applicable, not 0)
    assert "Part a.json (attention): host Intel Xeon 8480; ceilings copy n/a TB/s (read + write), None n/a " \
           "TFLOP/s." in markdown
    assert any(line.startswith("Part b.json (training): host AMD EPYC 9654;") for line in markdown)
    assert not any(line.startswith("Host:") for line in markdown)
    # two parts of one machine (gpu_check's steps): one Host line, though each part measured its own ceilings
    same_host = [dict(part, host="Intel Xeon 8480", ceilings={"copy_GBps": 4240.0 + i, "matmul": "bf16",
                                                             "matmul_TFLOPs": 700.0 + i})
                 for i, part in enumerate(run["meta"]["parts"])]
    one_host = benchmarks.format_markdown(dict(run["meta"], host="Intel Xeon 8480", parts=same_host),
                                          run["rows"]).splitlines()
    assert "Host: Intel Xeon 8480." in one_host and not any(line.startswith("Part ") for line in one_host)


def test_cpu_timings_are_per_call_medians(monkeypatch):
    """On a fake clock each call advances (no wall-clock timing in the tests): ``time_ms`` is the median of the
    calls (one slow call among fast ones moves it not at all, as a mean would), ``loop_ms`` the time per call of a
    batch, whatever the count of calls per batch."""
    import types

    clock = {"now": 0.0}
    monkeypatch.setattr(benchmarks, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    calls = []

    def slow_first():  # 200 ms, then 1 ms per call
        clock["now"] += 0.2 if not calls else 0.001
        calls.append(1)

    assert benchmarks.time_ms(slow_first, torch.device("cpu"), quick=True) == pytest.approx(1.0)
    assert len(calls) == benchmarks.CPU_QUICK_REPS

    def two_ms():
        clock["now"] += 0.002

    assert benchmarks.loop_ms(two_ms, torch.device("cpu"), quick=True) == pytest.approx(2.0)


def _pipeline_rows(times: dict, passes: dict = None, failed: tuple = ()) -> list:
    shape = "3 ref x 10% (1230 of 12288 tokens), 1024px target and references"
    rows = _block("pipeline", shape, times)
    for row in rows:
        if passes and row["impl"] in passes:
            row["pass_ms"] = [row["time_ms"], passes[row["impl"]]]
        if row["impl"] in failed:
            row["ok"] = False
    return rows


def test_pipeline_selection_cost_is_each_selectors_fastest_pass_over_the_given_scores_call():
    """annotate: a select row's cost is its fastest pass minus the given-scores row's fastest pass, as a share of
    the run's no-reference e2e step, else of the case's own no-reference call per step; the summary line gives the
    worst share of the rows whose check passed, and judges nothing when the baseline's check failed."""
    case = benchmarks.CASES["pipeline"]
    times = {benchmarks.GIVEN_SCORES_ROW: 700.0, "select, uniform": 701.0, "select, subject (automatic probe)": 706.0,
             benchmarks.KEEP_ALL_ROW: 2940.0, benchmarks.NO_REFERENCE_ROW: 640.0}
    passes = {benchmarks.GIVEN_SCORES_ROW: 698.0, "select, uniform": 699.5, "select, subject (automatic probe)": 709.0,
              benchmarks.NO_REFERENCE_ROW: 600.0}
    earlier = [_row("e2e", "1 ref x 10%", benchmarks.NO_REFERENCE_ROW, 150.0)]
    rows = _pipeline_rows(times, passes)
    case.annotate(rows, earlier)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["select, uniform"]["call_added_ms"] == pytest.approx(1.5)  # 699.5 - 698
    assert by_impl["select, uniform"]["step_pct"] == pytest.approx(1.0)  # 1.5 of the 150 ms step
    assert by_impl["select, subject (automatic probe)"]["call_added_ms"] == pytest.approx(8.0)  # 706 - 698
    assert "4.21x faster than keeping every reference token" in by_impl[benchmarks.GIVEN_SCORES_ROW]["note"]
    lines = benchmarks.pipeline_selection_verdicts(rows)
    assert len(lines) == 1 and "MISSES: worst 5.33% (select, subject (automatic probe), adds 8 ms)" in lines[0]
    own = _pipeline_rows(times, passes)
    case.annotate(own, [])  # no e2e step in the run: the case's no-reference call, per step (600 / 4 ms)
    assert {r["impl"]: r for r in own}["select, uniform"]["step_pct"] == pytest.approx(1.0)
    assert "this case's no-reference call per step" in own[1]["note"]
    subject_failed = _pipeline_rows(times, passes, failed=("select, subject (automatic probe)",))
    case.annotate(subject_failed, earlier)
    line = benchmarks.pipeline_selection_verdicts(subject_failed)[0]
    assert "meets: worst 1.00% (select, uniform" in line and "check FAILED: select, subject" in line
    base_failed = _pipeline_rows(times, passes, failed=(benchmarks.GIVEN_SCORES_ROW,))
    case.annotate(base_failed, earlier)
    assert "not judged (sparsectx.enable, given scores: check FAILED)" in benchmarks.pipeline_selection_verdicts(
        base_failed)[0]


def test_pipeline_rows_check_the_selection_of_their_own_call():
    """The pipeline case's rows (tiny klein pipeline on the CPU): the given-scores row keeps each reference's
    top-scored tokens, a selector row the budget's count, the plain pipeline makes no selection; each check fails
    on what it guards against."""
    workload = benchmarks.CASES["pipeline"].build((3, 0.25), "tiny", torch.device("cpu"))
    results = {}
    for name in (benchmarks.GIVEN_SCORES_ROW, "select, uniform", benchmarks.KEEP_ALL_ROW):
        impl = workload.impl(name)
        with impl.context():
            results[name] = impl.output(impl.fn())
        assert impl.verify(results[name]) == "", name
    given, uniform, plain = (workload.impl(n) for n in results)
    latents, selection = results[benchmarks.GIVEN_SCORES_ROW]
    assert plain.verify(results[benchmarks.GIVEN_SCORES_ROW]) == "a selection was made"
    assert given.verify((latents, None)) == "sparsectx made no selection"
    assert given.verify((latents.clone().fill_(math.nan), selection)) == "non-finite latents"
    assert uniform.verify(results[benchmarks.GIVEN_SCORES_ROW]) == ""  # the same counts
    _, other = results["select, uniform"]
    assert not torch.equal(other.keep, selection.keep)  # (uniform keeps other tokens than the given scores)
    assert given.verify((latents, other)) == "kept other tokens than each reference's top-scored ones"
    keep = other.keep.clone()
    keep[0, int((~keep[0, :64]).nonzero()[0])] = True  # the first reference keeps one token more
    more = other._replace(keep=keep)
    assert uniform.verify((latents, more)) == "kept [17, 16, 16] tokens per reference, not 16 each"


def test_the_breakdowns_model_row_makes_the_rope_tables_as_the_drop_in_does(monkeypatch):
    """(b), the model on the compacted inputs, is the drop-in's step without its wrapper: a later call makes the
    RoPE tables as the drop-in's step does, with sparsectx's ``flux_rope_tables`` and the plan's kept rows (before:
    diffusers' ``pos_embed`` twice per call, so (d) - (b) and the 3% target leaned the drop-in's way)."""
    from diffusers.models.transformers import transformer_flux2

    from sparsectx import processors

    counts = {"diffusers": 0, "sparsectx": 0}
    diffusers_forward, sparsectx_tables = transformer_flux2.Flux2PosEmbed.forward, processors.flux_rope_tables

    def counted_diffusers(self, ids):
        counts["diffusers"] += 1
        return diffusers_forward(self, ids)

    def counted_sparsectx(*args, **kwargs):
        counts["sparsectx"] += 1
        return sparsectx_tables(*args, **kwargs)

    monkeypatch.setattr(transformer_flux2.Flux2PosEmbed, "forward", counted_diffusers)
    monkeypatch.setattr(processors, "flux_rope_tables", counted_sparsectx)
    case = benchmarks.CASES["e2e"]
    workload = case.build((3, 0.05, case.BREAKDOWN), "tiny", torch.device("cpu"))
    per_call = {}
    for name in ("(d) enabled once, step", "(b) model on the compacted inputs"):
        impl = workload.impl(name)
        with impl.context():
            impl.fn()  # the first call in the scope: the selection and its plan
            counts.update(diffusers=0, sparsectx=0)
            impl.fn()  # a later call, as the timed ones
            per_call[name] = dict(counts)
    assert per_call["(b) model on the compacted inputs"] == per_call["(d) enabled once, step"], per_call
    assert per_call["(d) enabled once, step"]["diffusers"] == 0, per_call


def _mutated_keep(select, mutate):
    """A replacement of ``_SparsePatch._select`` whose keep mask is ``mutate(keep)`` (the NaN check as it was)."""

    def mutated(self, *args, **kwargs):
        keep, nan = select(self, *args, **kwargs)
        return mutate(keep), nan

    return mutated


def test_the_training_cases_per_sample_loop_does_no_extra_full_size_work():
    """The per-sample SDPA loop peer takes each sample's rows by one split per leaf: its timed call makes no
    full-size ``[T, H, D]`` tensor beyond the output's and the three gradients' (before: a slice per sample, whose
    backward zero-filled a full gradient per slice and summed them, ~10% of the loop's time at the full shape)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    case = benchmarks.CASES["training"]
    workload = case.build(case.configs("tiny")[0], "tiny", torch.device("cpu"))
    loop = workload.impl("sdpa per-sample loop").fn
    rows = loop()[0].shape[0]
    full_size, detach = [], torch.ops.aten.detach.default  # (a view, no work)

    class FullSize(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[0] == rows and func is not detach:
                full_size.append(func.overloadpacket.__name__)
            return out

    with FullSize():
        loop()
    assert sorted(full_size) == ["cat"] * 4, full_size  # the output, and the gradients of q, k and v


def test_the_step_rows_without_a_drop_in_check_check_their_selection(monkeypatch):
    """The e2e step's compaction row and the KV-cache runs through the drop-in check what was kept, not only the
    output: in bf16 a step's output differs about as much between a right and a wrong selection as between two
    right implementations (1e-3 to 4e-3 of its norm, under the 1e-2 bound), so a wrong selection passed there."""
    from sparsectx import integration, ops

    scores = torch.rand(3, 40, generator=torch.Generator().manual_seed(0))
    assert benchmarks._compaction_problem(scores, 7) == ""
    real = ops.compact_tokens
    monkeypatch.setattr(ops, "compact_tokens", lambda s, *t, budget: real(-s, *t, budget=budget))  # the lowest
    assert "other tokens than each reference's top-scored" in benchmarks._compaction_problem(scores, 7)
    monkeypatch.setattr(ops, "compact_tokens", real)

    case = benchmarks.CASES["kv"]
    workload = case.build(case.configs("tiny")[0], "tiny", torch.device("cpu"))
    rows = [workload.impl(name) for name in ("sparsectx.enable + KV cache",
                                             "sparsectx.enable (sparsectx attn) + KV cache")]
    for impl in rows:
        impl.fn()
        assert impl.verify(None) == "", impl.name
    select = integration._SparsePatch._select
    monkeypatch.setattr(integration._SparsePatch, "_select", _mutated_keep(select, lambda keep: ~keep))
    for impl in rows:
        impl.fn()
        assert impl.verify(None).startswith("kept "), impl.name


def _tiny_rows(case_name: str, count: int) -> list:
    """The first ``count`` implementations of a case's first tiny workload."""
    case = benchmarks.CASES[case_name]
    workload = case.build(case.configs("tiny")[0], "tiny", torch.device("cpu"))
    return [workload.impl(name) for name in case.impl_names[:count]]


def _checked(impl) -> str:
    """An implementation's check as ``run_workload`` makes it: a call, its output mapping and its verify, in its
    scope."""
    with impl.context():
        return impl.verify(impl.output(impl.fn()))


def test_the_train_steps_rows_check_the_masks_they_trained_with(monkeypatch):
    """train_step's two forms check their masks (their bf16 outputs can not tell a wrong one): each keeps the
    configured count per reference, and drop training keeps the drop-in's tokens from the same seed."""
    from sparsectx import integration

    rows = _tiny_rows("train_step", 2)
    assert [_checked(impl) for impl in rows] == ["", ""]
    select = integration._SparsePatch._select
    monkeypatch.setattr(integration._SparsePatch, "_select",
                        _mutated_keep(select, lambda keep: keep.roll(1, dims=1)))  # other tokens, same counts
    assert _checked(rows[0]) == ""  # (the drop-in alone: right counts)
    assert _checked(rows[1]) == "drop training kept other tokens than the drop-in from the same seed"
    monkeypatch.setattr(integration._SparsePatch, "_select",
                        _mutated_keep(select, torch.zeros_like))  # none kept
    assert _checked(rows[0]).startswith("kept [0, 0, 0] tokens per reference")


def test_gpu_checks_step_tells_a_timeout_from_a_killed_or_failed_command(tmp_path):
    """gpu_check.sh's step(): a command cut by its time limit is TIMED OUT (not a failure of the run); one killed by
    a signal before its limit (the OOM killer's SIGKILL exits 137, as a timeout's kill does), or exiting 124 itself,
    FAILED (before: both read as TIMED OUT, and the run's exit status missed them)."""
    import re
    import subprocess

    script = (Path(__file__).parent.parent / "bench" / "gpu_check.sh").read_text()
    functions = re.search(r"seconds_left\(\) \{.*?\n# step NAME.*?\n    return \"\$rc\"\n\}\n", script, re.S)
    assert functions, "seconds_left and step not found in gpu_check.sh"
    log = tmp_path / "step.log"
    driver = (f"BUDGET_S=600; START=$SECONDS; SUMMARY_RESERVE_S=0; KILL_GRACE_S=1; SKIP_STEPS=; STEP_LINES=()\n"
              f"{functions.group(0)}\n"
              f"step cut 10 {log} sleep 30\n"
              f"step killed 30 {log} bash -c 'kill -9 $$'\n"
              f"step exits_124 30 {log} bash -c 'exit 124'\n"
              f"step fine 30 {log} true\n"
              'printf "STEP %s\\n" "${STEP_LINES[@]}"\n')
    run = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=120)
    verdicts = {line.split()[1]: line.split()[2] for line in run.stdout.splitlines() if line.startswith("STEP ")}
    assert verdicts == {"cut": "TIMED", "killed": "FAILED", "exits_124": "FAILED", "fine": "ok"}, run.stdout


def test_gpu_checks_parallel_workers_and_e2e_arguments(tmp_path):
    """gpu_check.sh's settings blocks, run as the script runs them: pytest-xdist workers (``-n 4`` by default, the
    count given, none for 0 or where xdist does not import) and the e2e step's arguments (``--quick`` when
    GPU_CHECK_E2E_ARGS is unset, nothing when it is set empty, the words given otherwise)."""
    import re
    import subprocess
    import sys

    script = (Path(__file__).parent.parent / "bench" / "gpu_check.sh").read_text()
    parallel = re.search(r"\nPARALLEL=\(\)\n.*?\nfi\n", script, re.S)
    e2e = re.search(r"\nif \[\[ -v GPU_CHECK_E2E_ARGS \]\].*?\nread -r -a E2E_ARGS <<<\"\$E2E_GIVEN\"\n", script, re.S)
    assert parallel and e2e, "the PARALLEL or E2E_ARGS block is not in gpu_check.sh"
    no_xdist = tmp_path / "python"  # a Python where `import xdist` fails
    no_xdist.write_text(f"#!/bin/sh\n[ \"$2\" = \"import xdist\" ] && exit 1\nexec {sys.executable} \"$@\"\n")
    no_xdist.chmod(0o755)

    def run(env, workers="4", python=sys.executable):
        driver = (f"set -u\nPY={python}\nTEST_WORKERS={workers}\n{parallel.group(0)}{e2e.group(0)}"
                  'echo "PARALLEL=${PARALLEL[*]}|E2E=${E2E_ARGS[*]}"\n')
        clean = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_E2E_ARGS"}
        done = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=60, env={**clean, **env})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    xdist = subprocess.run([sys.executable, "-c", "import xdist"], capture_output=True).returncode == 0
    assert xdist  # (pytest-xdist is in the test extra)
    assert run({}) == "PARALLEL=-n 4|E2E=--quick"
    assert run({"GPU_CHECK_E2E_ARGS": ""}, workers="2") == "PARALLEL=-n 2|E2E="
    assert run({"GPU_CHECK_E2E_ARGS": "--quick --size full"}, workers="0") == "PARALLEL=|E2E=--quick --size full"
    assert run({}, python=str(no_xdist)) == "PARALLEL=|E2E=--quick"


def test_bench_merge_into_alone_keeps_rows_as_they_come_and_refuses_bad_files_before_the_run(tmp_path, monkeypatch):
    """``bench --merge-into`` without ``--json``: the rows reported while a case runs are in the file (a step killed
    mid-case keeps them), a finished case leaves all its rows; a file that is not a bench JSON, and a path under a
    file, are refused before anything runs (the run crashed at its end)."""
    ran = []

    def killed(name, *args, on_rows=None, **kwargs):
        ran.append(name)
        on_rows(_block(name, "s", {"sparsectx": 1.0, "peer": 2.0}))
        raise KeyboardInterrupt  # the step's timeout

    def finished(name, *args, on_rows=None, **kwargs):
        ran.append(name)
        rows = _block(name, "s", {"sparsectx": 1.0, "peer": 2.0})
        on_rows(rows[:1])  # the rows as they come: the last one comes with the return
        return rows

    for fake, expected_rows in ((killed, 2), (finished, 2)):
        monkeypatch.setattr(benchmarks, "run_case", fake)
        path = tmp_path / f"{fake.__name__}.json"
        argv = ["bench", "--quick", "--case", "compaction", "--merge-into", str(path)]
        if fake is killed:
            with pytest.raises(KeyboardInterrupt):
                cli.main(argv)
        else:
            cli.main(argv)
        assert len(json.loads(path.read_text())["rows"]) == expected_rows, fake.__name__
    ran.clear()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, words in ((bad, "can not be read as JSON"), (bad / "x.json", "--merge-into")):
        with pytest.raises(SystemExit, match=words):
            cli.main(["bench", "--quick", "--case", "compaction", "--merge-into", str(path)])
    assert ran == []  # refused before the run


def test_a_step_cut_before_its_first_row_is_named_not_run(tmp_path, monkeypatch):
    """A bench step killed while its first shape was being built (the GPU check's step timeout) wrote nothing: no
    --json file, the --merge-into file as it was, so the summary never named the case NOT RUN. The run's plan is
    written before its first case."""
    monkeypatch.setattr(benchmarks, "run_case", lambda *args, **kwargs: _raise(KeyboardInterrupt()))
    own, merged = tmp_path / "own.json", tmp_path / "merged.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "--quick", "--case", "compaction", "--json", str(own), "--merge-into", str(merged)])
    for path in (own, merged):
        run = benchmarks.load_run(str(path))
        assert run["rows"] == [] and run["meta"]["planned_shapes"]["compaction"], path
        assert "NOT RUN (planned, no row; a step cut short?): compaction" in \
            benchmarks.format_summary(run["meta"], run["rows"]), path


def test_a_step_may_read_its_step_times_from_the_file_it_merges_into(tmp_path, monkeypatch):
    """``--steps-from run.json --merge-into run.json``: a GPU check's later step relating its selection case to the
    e2e step times an earlier step merged there; the merge keeps them (a first version of the path checks refused
    it)."""
    seen = {}

    def fake_run_case(name, device, size, *, earlier_rows=(), on_rows=None, **kwargs):
        seen[name] = [(row["case"], row["time_ms"]) for row in earlier_rows]
        return [_row("e2e", "1 ref x 5%", benchmarks.NO_REFERENCE_ROW, 24.0)] if name == "e2e" else \
            [_row("selection", "1 ref", "sparsectx", 1.0)]

    monkeypatch.setattr(benchmarks, "run_case", fake_run_case)
    path = str(tmp_path / "run.json")
    assert cli.main(["bench", "--quick", "--case", "e2e", "--merge-into", path]) == 0
    assert cli.main(["bench", "--quick", "--case", "selection", "--steps-from", path, "--merge-into", path]) == 0
    assert seen["selection"] == [("e2e", 24.0)]
    assert [row["case"] for row in benchmarks.load_run(path)["rows"]] == ["e2e", "selection"]


def test_parts_run_on_other_op_paths_are_not_merged():
    """A part run on the torch reference and one on Triton's interpreter (or on Triton) were merged, the merged
    file naming the first part's path for every row."""
    rows = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    more = _block("training", "B=4", {"sparsectx (packed varlen)": 1.0, "sdpa padded + key mask": 1.6})
    meta = {"device": "cpu", "commit": "abc1234", "sparsectx_path": {"float16": "torch-reference"}}
    other = {**meta, "sparsectx_path": {"float16": "triton-interpreter"}}
    with pytest.raises(ValueError, match="its sparsectx_path .* differs"):
        benchmarks.merge_parts([("a.json", {"meta": meta, "rows": rows}), ("b.json", {"meta": other, "rows": more})])
    assert len(benchmarks.merge_parts([("a.json", {"meta": meta, "rows": rows}),
                                       ("b.json", {"meta": dict(meta), "rows": more})])["rows"]) == 4


def _raise(exc):
    raise exc


def test_merge_of_an_earlier_merge_keeps_its_parts_and_the_cases_it_planned():
    """Merging a merged run with a further part (``--merge-into`` across three steps) keeps every part's details
    and the cases the earlier parts planned, run or not (a step cut before its case ran is then said NOT RUN)."""
    def part(cases, rows, name):
        meta = {"commit": "abc", "device": "GPU", "cases": cases, "quick": False, "host": name, "date": name}
        return name, {"meta": meta, "rows": rows}

    first = part(["attention"], _block("attention", "s", {"sparsectx": 1.0, "peer": 2.0}), "a.json")
    second = part(["training", "kv"], _block("training", "s", {"sparsectx": 1.0, "peer": 2.0}), "b.json")
    third = part(["e2e"], _block("e2e", "s", {"sparsectx": 1.0, "peer": 2.0}), "c.json")
    chained = benchmarks.merge_parts([("run.json", benchmarks.merge_parts([first, second])), third])
    at_once = benchmarks.merge_parts([first, second, third])
    assert chained == at_once
    assert [p["file"] for p in chained["meta"]["parts"]] == ["a.json", "b.json", "c.json"]
    assert [p["host"] for p in chained["meta"]["parts"]] == ["a.json", "b.json", "c.json"]
    assert chained["meta"]["planned_cases"] == ["attention", "training", "kv", "e2e"]
    assert len(chained["meta"]["autotune_runs"]) == 3 and len(chained["rows"]) == 6


def test_gpu_check_refuses_a_misspelt_setting_before_any_step(tmp_path):
    """A GPU run is rare: gpu_check.sh refuses a GPU_CHECK_SKIP name that is no step's (a misspelt one skipped
    nothing, and the step ran on), a budget that is not whole seconds (every step was then skipped for lack of
    time), and a tree without git given no SPARSECTX_COMMIT (a misspelt variable: results with no commit), each
    with exit status 2 before any step; the names it knows are those of its steps."""
    import re
    import shutil
    import subprocess

    script = Path(__file__).parent.parent / "bench" / "gpu_check.sh"
    text = script.read_text()
    listed = re.search(r"STEP_NAMES=\((.*?)\)\n", text, re.S).group(1)
    known = re.findall(r'"([^"]+)"', listed)
    used = re.findall(r'\b(?:step|tests|in_scratch) "([^"$]+)"', text)
    used += ["bench " + name for name in re.findall(r'\bquick_case (\w+) "', text)]  # (part 2's bench steps)
    used += re.findall(r'== \*",([^,"$]+),"\* \]\]', text)  # (the background build's own skip check)
    assert sorted(set(used)) == sorted(known), (sorted(set(used)), sorted(known))

    def run(env, where=script, out="out"):
        return subprocess.run(["bash", str(where)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "OUT": str(tmp_path / out), "SPARSECTX_COMMIT": "abc1234", **env})

    for skip in ("bench kv , bench e2e", " bench kv ,bench e2e "):  # spaces around the names are no part of them
        done = run({"GPU_CHECK_SKIP": skip, "GPU_CHECK_BUDGET_S": "0"}, out="accepted")  # (no time: no step runs)
        assert done.returncode == 0 and "bench kv" in done.stdout and "skipped: GPU_CHECK_SKIP" in done.stdout, skip
    for env, words in (({"GPU_CHECK_SKIP": "bench trainning"}, "'bench trainning' is no step's name"),
                       ({"GPU_CHECK_SKIP": "bench kv,, profile opps"}, "'profile opps' is no step's name"),
                       ({"GPU_CHECK_BUDGET_S": "570s"}, "GPU_CHECK_BUDGET_S must be whole seconds"),
                       # (bash arithmetic would read it as octal: 376 s, and 090 as an error at every step)
                       ({"GPU_CHECK_BUDGET_S": "0570"}, "GPU_CHECK_BUDGET_S must be whole seconds"),
                       ({"GPU_CHECK_TEST_WORKERS": "four"}, "GPU_CHECK_TEST_WORKERS must be a whole number"),
                       ({"GPU_CHECK_PRECOMPILE_JOBS": "-1"}, "GPU_CHECK_PRECOMPILE_JOBS must be a whole number")):
        done = run(env)
        assert done.returncode == 2 and words in done.stderr, (env, done.stderr)
        assert not (tmp_path / "out" / "env.log").exists()  # no step ran
    copy = tmp_path / "tree" / "bench" / "gpu_check.sh"  # a tree without git, as on a GPU machine
    copy.parent.mkdir(parents=True)
    shutil.copy(script, copy)
    done = run({"SPARSECTX_COMMIT": ""}, copy)
    assert done.returncode == 2 and "set SPARSECTX_COMMIT=<hash>" in done.stderr, done.stderr


def test_the_mixed_batch_drop_in_rows_check_each_requests_selection(monkeypatch):
    """e2e_batch's drop-in rows check that each request kept its top-scored tokens (their bf16 outputs can not tell
    a wrong selection): a selection shifted by one token fails them."""
    from sparsectx import integration

    rows = _tiny_rows("e2e_batch", 3)
    assert [_checked(impl) for impl in rows] == ["", "", ""]
    select = integration._SparsePatch._select
    monkeypatch.setattr(integration._SparsePatch, "_select",
                        _mutated_keep(select, lambda keep: keep.roll(1, dims=1)))
    assert all(_checked(impl) == "kept other tokens than each request's top-scored ones" for impl in rows)


def test_the_cudnn_forced_drop_in_row_is_the_native_drop_in_under_cudnn_sdpa():
    """The e2e case's informational row: on CUDA, the native drop-in row (same step, selection and check) with every
    SDPA call restricted to cuDNN inside its scope, and a peer's name (torch refusing cuDNN makes it unavailable, not
    the run wrong); on the CPU a skip. Its scope is entered here with the device said to be CUDA (nothing runs)."""
    from sparsectx import integration

    assert benchmarks.CUDNN_NATIVE_ROW in benchmarks.EndToEndCase.impl_names
    case = benchmarks.CASES["e2e"]
    workload = case.build(case.configs("tiny")[0], "tiny", torch.device("cpu"))
    assert workload.impl(benchmarks.CUDNN_NATIVE_ROW).skip == "cuDNN SDPA runs on CUDA only"
    # the native drop-in row notes the backend torch's SDPA picks by itself at the step's attention shape
    from torch.nn.attention import SDPBackend

    note = workload.impl("sparsectx.enable (native attn)").note
    model = benchmarks._cached_model(benchmarks.KLEIN, "tiny", torch.device("cpu"), torch.float32)
    refs, keep = case.configs("tiny")[0][:2]
    tiny = case.sizes["tiny"]
    n_kept = refs * int(keep * tiny["ref_side"] ** 2 + 0.5)
    q = torch.empty(1, tiny["text"] + tiny["target_side"] ** 2 + n_kept, model.config.num_attention_heads,
                    model.config.attention_head_dim).permute(0, 2, 1, 3)
    expected = SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    assert note.endswith(f"torch SDPA's own choice at this attention shape: {expected}"), note
    scores, step = torch.rand(1, 64), (lambda: None)
    native = benchmarks._enable_impl(model, step, scores, 6, "native")
    forced = benchmarks._cudnn_forced(native, torch.device("cuda"))
    assert not forced.ours and forced.fn is step and forced.verify is not None and forced.comparable
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled)
    before = [flag() for flag in flags]
    with forced.context():
        assert integration.is_enabled(model)
        assert [flag() for flag in flags] == [False, False, False, True]
    assert not integration.is_enabled(model) and [flag() for flag in flags] == before
    with native.context():
        assert integration.is_enabled(model) and [flag() for flag in flags] == before


def _reference_workload(primary_scale, peer_scale=1.0, reference=None, ours_peer=False, rows=64,
                        dtype=torch.bfloat16):
    """A bf16-like step workload judged against a higher-precision reference: sparsectx's output and an independent
    peer's each off the reference by ``scale`` x the same-sized random error (relative error ~1e-2 at scale 1; plus a
    sparsectx row agreeing with sparsectx's first)."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(rows, 16, generator=gen, dtype=torch.float64)
    noise = [torch.randn(rows, 16, generator=gen, dtype=torch.float64) * 1e-2 for _ in range(2)]
    ours = truth + primary_scale * noise[0]
    peer_name = "sparsectx.enable (native attn)" if ours_peer else "model on the compacted sequence"
    impls = [benchmarks.Impl("sparsectx.enable (sparsectx attn)", lambda: ours),
             benchmarks.Impl(peer_name, lambda: truth + peer_scale * noise[1]),
             benchmarks.Impl("sparsectx.enable (native attn, again)", lambda: ours)]
    assert impls[1].ours == ours_peer and impls[2].ours
    workload = benchmarks.Workload("e2e_zimage", "1 ref", impls, dtype, reference=reference or (lambda: truth))
    return workload, truth, noise


@pytest.mark.parametrize("scale, ok", [(1.5, True), (1.9, True), (2.3, False), (4.0, False)])
def test_rows_of_a_workload_with_a_reference_meet_the_flash_criterion_against_it(scale, ok):
    """A model that amplifies rounding (Z-Image: two native SDPA backends 1.4e-2 apart in bf16) is judged as the
    kernels are: each row's error against the fp32 run at most 2x an independent peer's + 1e-3, whatever the rows'
    distance to each other (1.2e-2 here at scale 1.5, past the bf16 bound of 1e-2, and still a pass)."""
    workload, truth, noise = _reference_workload(scale)
    peer_err = benchmarks.relative_error(truth + noise[1], truth)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert [r["ok"] for r in rows] == [ok, True, ok]
    assert rows[0]["ref_err"] == pytest.approx(benchmarks.relative_error(truth + scale * noise[0], truth))
    assert rows[1]["ref_err"] == pytest.approx(peer_err)
    assert ("CHECK FAILED: rel err vs the fp32 reference" in rows[0]["note"]) == (not ok)
    assert f"bound 2 x {peer_err:.2e} + 0.001" in rows[0]["note"]
    assert all("ref_row_err" not in r for r in rows)
    if scale == 1.5:  # the rows' distance to each other is past the fixed bound: it no longer decides
        assert rows[1]["err"] > benchmarks.REL_ERR_BOUND[torch.bfloat16]
    # the pytest-benchmark check says the same
    problem = benchmarks.comparison_problem(workload, workload.impls[0], truth + scale * noise[0], None)
    assert (problem == "") == ok, problem
    assert (benchmarks.comparison_problem(workload, workload.impls[1], truth + noise[1], None) == "")


def test_the_reference_bound_is_the_closest_peers_and_a_wrong_row_or_an_earlier_failure_fails():
    """The bound is set by the independent peer closest to the reference (two peers 1x and 3x off: sparsectx at 2.5x
    fails), a row whose one token is wrong fails though its whole-tensor error is small (the worst row's bound), and
    a row whose own check failed before stays failed."""
    workload, truth, noise = _reference_workload(2.5)
    far = truth + 3.0 * noise[1].flip(0)
    workload.impls.insert(2, benchmarks.Impl("torch topk+sort+index_select + step", lambda: far))
    assert not workload.impls[2].ours
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert [r["ok"] for r in rows] == [False, True, False, False]
    problem = benchmarks.comparison_problem(workload, workload.impls[0], truth + 2.5 * noise[0], None)
    assert "against the fp32 reference" in problem
    # one token's row zeroed among 4096: 1/64 of the tensor's norm, all of its row's
    workload, truth, noise = _reference_workload(0.5, rows=4096)
    wrong = truth + 0.5 * noise[0]
    wrong[7] = 0
    assert benchmarks.relative_error(wrong, truth) < 2 * benchmarks.relative_error(truth + noise[1], truth)
    workload.impls[0] = benchmarks.Impl("sparsectx.enable (sparsectx attn)", lambda: wrong)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert rows[0]["ok"] is False and "worst row" in rows[0]["note"]
    assert "worst row" in benchmarks.comparison_problem(workload, workload.impls[0], wrong, None)
    # a row whose verify failed: the reference's verdict does not clear it
    workload, truth, noise = _reference_workload(1.0)
    workload.impls[2] = benchmarks.Impl("sparsectx.enable (native attn, again)", workload.impls[2].fn,
                                        verify=lambda result: "planted failure")
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert rows[2]["ok"] is False and "planted failure" in rows[2]["note"]


def test_a_reference_workload_without_an_independent_peer_or_reference_says_so():
    """Only an independent peer's error sets the bound (sparsectx's rows share its kernels): without one the rows
    are judged by the dtype's fixed bound against sparsectx's output, as without a reference, and so they are where
    the reference fails to run, said in the first row's note."""
    workload, truth, noise = _reference_workload(1.0, ours_peer=True)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert ("no usable independent peer's error against the fp32 reference: judged by the fixed bound against this "
            "output instead") in rows[0]["note"]
    assert [r["ok"] for r in rows] == [None, False, True]  # 1.4e-2 apart: past bf16's fixed bound
    assert rows[1]["note"].startswith("MISMATCH with sparsectx (rel err")
    ours = truth + noise[0]
    assert "disagrees with the comparison result" in benchmarks.comparison_problem(
        workload, workload.impls[1], truth + noise[1], ours)
    assert benchmarks.comparison_problem(workload, workload.impls[2], ours, ours) == ""

    def broken():
        raise RuntimeError("out of memory")

    workload, truth, noise = _reference_workload(1.0, reference=broken)
    # the pytest route too: the fixed bound (1.4e-2 apart: past bf16's 1e-2), not an error
    assert "disagrees with the comparison result" in benchmarks.comparison_problem(
        workload, workload.impls[1], truth + noise[1], truth + noise[0])
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert ("the fp32 reference failed (RuntimeError: out of memory): judged by the torch.bfloat16 bound instead"
            in rows[0]["note"])
    assert all("ref_err" not in r for r in rows)
    assert rows[1]["ok"] is False and "MISMATCH with sparsectx" in rows[1]["note"]  # 1.4e-2 apart: the fixed bound


def test_weights_in_fp32_compute_in_fp32_and_restore_every_tensor_exactly():
    """The reference's model: bf16 weights cast to fp32 (exact) inside the block, each parameter and buffer back in
    its own dtype and values after it, an fp32 buffer kept fp32 (a model-wide .to(bfloat16) would round it)."""
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    model.register_buffer("table", torch.randn(8, dtype=torch.float32) / 3)
    model.register_buffer("half_table", torch.randn(8, dtype=torch.bfloat16))
    model.register_buffer("steps", torch.arange(4))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(2, 8)
    with benchmarks._weights_in_fp32(model):
        assert {t.dtype for t in model.parameters()} == {torch.float32}
        assert model.half_table.dtype == torch.float32 and model.steps.dtype == torch.int64
        out = model(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x @ before["weight"].float().T + before["bias"].float(), rtol=0, atol=0)
    after = model.state_dict()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    model.register_buffer("exact", torch.tensor([1 / 3], dtype=torch.float64))  # left alone: fp32 would round it
    with benchmarks._weights_in_fp32(model):
        assert model.exact.dtype == torch.float64
    assert model.exact.item() == 1 / 3
    with pytest.raises(ValueError):  # restored when the block raises too
        with benchmarks._weights_in_fp32(model):
            raise ValueError("reference failed")
    assert model.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("broken", ["nan", "shape", "far", "failed check"])
def test_a_broken_peer_sets_no_bound_and_a_wrong_output_still_fails(broken):
    """An independent peer whose output is NaN, of another shape, 30% off the reference or whose own check failed
    would make the bound infinite or loose: it sets none. With no other peer the fixed bound judges, and sparsectx's
    output 15% off the reference fails, in the table and in the pytest check: past what a peer may be off."""
    workload, truth, noise = _reference_workload(15.0)
    ours = truth + 15.0 * noise[0]
    bad = {"nan": torch.full_like(truth, float("nan")), "shape": truth[:-1],
           "far": truth + 30.0 * noise[1]}.get(broken, truth + noise[1])
    verify = (lambda result: "planted failure") if broken == "failed check" else None
    workload.impls[1] = benchmarks.Impl("model on the compacted sequence", lambda: bad, verify=verify)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert "no usable independent peer's error" in rows[0]["note"]
    assert [r["ok"] for r in rows] == [False, False, False], [r["note"] for r in rows]
    assert "(past 0.1 / 0.25)" in rows[0]["note"] and "(past 0.1 / 0.25)" in rows[2]["note"]
    for impl, result, expected in ((workload.impls[0], ours, bad), (workload.impls[1], bad, ours),
                                   (workload.impls[2], ours, ours)):
        assert benchmarks.comparison_problem(workload, impl, result, expected) != "", impl.name


def test_a_peer_the_reference_shows_broken_fails_and_fails_no_right_output():
    """sparsectx 1% off the reference, the only peer 40% off: the peer fails (it sets no bound) and its
    disagreement fails nothing; sparsectx's output, within what a peer may be off, is not failed."""
    workload, truth, noise = _reference_workload(1.0, peer_scale=40.0)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert rows[1]["ok"] is False and "is broken and sets no bound" in rows[1]["note"], rows[1]["note"]
    assert rows[0]["ok"] is not False and rows[2]["ok"] is True, [r["note"] for r in rows]
    assert "disagrees" not in rows[0]["note"]
    assert benchmarks.comparison_problem(workload, workload.impls[2], truth + noise[0], truth + noise[0]) == ""


def test_rows_written_while_a_reference_workload_runs_hold_no_internal_state():
    """``on_row`` writes the rows out as they come (a run cut short keeps them): no key of the check's own state."""
    workload, truth, noise = _reference_workload(1.0)
    keys = set()
    benchmarks.run_workload(workload, torch.device("cpu"), quick=True,
                            on_row=lambda rows: keys.update(k for r in rows for k in r))
    assert keys and not keys - set(benchmarks._row(workload, workload.impls[0])) - {
        "ref_err", "time_ms", "err", "ok", "note", "pass_ms", "checked_by"}, keys


def test_a_peer_running_sparsectx_code_sets_no_bound():
    """The cuDNN-forced drop-in is not ``ours`` (torch refusing cuDNN makes it unavailable, not the run wrong) but runs
    sparsectx's selection and compaction: it is no independent peer. One close to the reference does not tighten the
    bound, and one far from it does not loosen it."""
    forced = benchmarks._cudnn_forced(benchmarks.Impl("sparsectx.enable (native attn)", lambda: None),
                                      torch.device("cuda"))
    assert not forced.ours and not forced.independent
    for scale, ok in ((0.1, True), (100.0, False)):
        workload, truth, noise = _reference_workload(1.9 if ok else 2.3)
        workload.impls.append(benchmarks.replace(forced, fn=lambda scale=scale: truth + scale * noise[1].flip(0)))
        rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
        peer_err = benchmarks.relative_error(truth + noise[1], truth)
        assert rows[0]["ok"] is ok and f"bound 2 x {peer_err:.2e} + 0.001" in rows[0]["note"], rows[0]["note"]
        problem = benchmarks.comparison_problem(workload, workload.impls[0], workload.impls[0].fn(), None)
        assert (problem == "") == ok and (ok or f"2 x {peer_err:.3e} + 0.001" in problem), problem


def test_an_fp32_workload_keeps_fp32s_bound_against_its_reference():
    """On the CPU the workload runs in fp32 and its reference computes what the peer does (error 0): the criterion's
    absolute term is then fp32's fixed bound (1e-4), not bf16's 1e-3, so an output 5e-4 off fails as it does without
    a reference."""
    workload, truth, noise = _reference_workload(0.05, peer_scale=0.0, dtype=torch.float32)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert 4e-4 < rows[0]["ref_err"] < 6e-4 and rows[0]["ok"] is False, rows[0]["note"]
    assert "bound 2 x 0.00e+00 + 0.0001" in rows[0]["note"]
    assert "bound 2 x 0.000e+00 + 0.0001" in benchmarks.comparison_problem(workload, workload.impls[0],
                                                                           truth + 0.05 * noise[0], None)
    workload, truth, noise = _reference_workload(0.005, peer_scale=0.0, dtype=torch.float32)
    assert benchmarks.run_workload(workload, torch.device("cpu"), quick=True)[0]["ok"] is True


def test_a_reference_holding_nan_leaves_the_rows_to_the_fixed_bound():
    """A reference with NaN would fail every row, right ones too: it is set aside like one that fails to run."""
    workload, truth, noise = _reference_workload(0.5, peer_scale=0.5, reference=lambda: torch.full((64, 16), math.nan))
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert "the fp32 reference holds NaN or inf: judged by the torch.bfloat16 bound instead" in rows[0]["note"]
    assert [r["ok"] for r in rows] == [None, True, True] and all("ref_err" not in r for r in rows)
    assert benchmarks.comparison_problem(workload, workload.impls[1], truth + 0.5 * noise[1],
                                         truth + 0.5 * noise[0]) == ""


def test_the_kv_cases_cache_all_row_is_checked_against_torch_indexing():
    """The kv case's "KV cache of every token, kept rows gathered" is sparsectx's own row with an output no other
    row has: it was checked for its shape and finite values alone. Its check is now diffusers' cached steps on a
    cache cut to the same rows by torch indexing: its own output passes, another run's output fails."""
    case = benchmarks.CASES["kv"]
    workload = case.build(case.configs("tiny", quick=True)[0], "tiny", torch.device("cpu"))
    impls = {impl.name: impl for impl in workload.impls}
    row = impls["KV cache of every token, kept rows gathered"]
    assert row.verify(row.fn()) == ""
    problem = row.verify(impls["KV cache, all reference tokens"].fn())  # every cached row attended to
    assert problem.startswith("rel err") and "gathered by torch indexing" in problem, problem
    benchmarks.release_cached_models()


def test_markdown_ceilings_read_null_as_not_measured_and_small_rates_in_three_digits():
    """A run's ceilings may be null (``load_run`` allows it): the markdown says n/a (before: TypeError in
    ``sparsectx report``); a CPU's matmul rate below 1 TFLOP/s keeps 3 significant digits (before: "0 TFLOP/s")."""
    row = _block("attention", "L=1", {"sparsectx (compacted)": 1.0})

    def markdown(device, copy, matmul, rate):
        meta = {"device": device, "size": "full", "ceilings": {"copy_GBps": copy, "matmul": matmul,
                                                               "matmul_TFLOPs": rate}}
        return benchmarks.format_markdown(meta, row)

    assert "copy n/a TB/s (read + write), bf16 n/a TFLOP/s" in markdown("cpu", None, "bf16", None)
    assert "copy 0.02 TB/s (read + write), 512x512x512 float32 0.0837 TFLOP/s" in markdown(
        "cpu", 20.0, "512x512x512 float32", 0.0837)
    assert "copy 4.24 TB/s (read + write), bf16 712 TFLOP/s" in markdown("NVIDIA H200", 4240.0, "bf16", 712.4)


def test_a_peer_with_one_broken_row_sets_no_bound():
    """A peer within the peer bound as a whole tensor but with one row past ROW_ERR_BOUND is broken and sets no bound:
    its error, inflated by that row, would loosen the criterion enough to pass a sparsectx output farther from the
    reference than any peer may be."""
    workload, truth, noise = _reference_workload(14.0)  # sparsectx ~0.14 off the reference: past bf16's peer bound 0.1
    peer = truth.clone()
    scale = truth.norm(dim=1).mean()
    peer[0] += 0.75 * scale * truth[0] / truth[0].norm()  # one row off by 0.75 of the mean row norm
    peer_err = benchmarks.relative_error(peer, truth)
    assert peer_err <= benchmarks._peer_bound(workload.dtype)  # the whole tensor looks usable...
    assert benchmarks.worst_row_error(peer, truth) > benchmarks.ROW_ERR_BOUND  # ...its worst row does not
    ours_err = benchmarks.relative_error(workload.impls[0].fn(), truth)
    assert benchmarks._peer_bound(workload.dtype) < ours_err < 2 * peer_err  # a bound from the peer would pass it
    workload.impls[1] = benchmarks.Impl("model on the compacted sequence", lambda: peer)
    rows = benchmarks.run_workload(workload, torch.device("cpu"), quick=True)
    assert rows[0]["ok"] is False, rows[0]["note"]  # past what a peer may be off: FAILED (exit status 1)
    assert rows[1]["ok"] is False and "is broken and sets no bound" in rows[1]["note"], rows[1]["note"]
    assert "no usable independent peer's error" in rows[0]["note"], rows[0]["note"]
    # the pytest-benchmark check agrees
    assert benchmarks.comparison_problem(workload, workload.impls[0], workload.impls[0].fn(), peer) != ""


def test_report_refuses_parts_of_another_size(tmp_path):
    """Parts measured at different sizes (tiny and full) are not merged: the merged header would keep the first part's
    size, and the tiny part's ratios would be judged as full-shape targets."""
    meta = {"device": "NVIDIA H200", "size": "full", "commit": "abc1234", "cases": ["attention"]}
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    benchmarks.write_json(a, meta, _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8}))
    benchmarks.write_json(b, dict(meta, size="tiny", cases=["training"]),
                          _block("training", "B=4", {"sparsectx (packed varlen)": 1.0,
                                                     "sdpa padded + key mask": 2.0}))
    with pytest.raises(SystemExit, match="b.json: its size 'tiny' differs"):
        cli.main(["report", "--summary", a, b])


def test_summary_names_a_single_missing_last_shape():
    """A case cut before its last planned shape (one shape missing: the commonest cut, a step's timeout in its last
    block) is named NOT RUN, as a case missing two shapes is."""
    meta = {"device": "cpu", "size": "tiny", "commit": "c", "cases": ["attention"],
            "planned_shapes": {"attention": ["L=1", "L=2"]}}
    rows = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    out = benchmarks.format_summary(meta, rows)
    assert "NOT RUN: the last 1 of attention's 2 planned shapes (no row; a step cut short?): L=2" in out, out


def test_bench_exits_1_when_a_peers_check_failed(monkeypatch, capsys):
    """docs/benchmarks.md: `sparsectx bench` exits 1 when a row FAILED its check, a peer's row included."""
    def run_case(name, device, size, **kwargs):
        rows = _block(name, "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
        rows[1].update(ok=False, note="MISMATCH with sparsectx (rel err 5.00e-01)")
        for r in rows:
            r["ours"] = r["impl"].startswith("sparsectx")
        return rows

    monkeypatch.setattr(benchmarks, "run_case", run_case)
    monkeypatch.setattr(benchmarks, "measure_ceilings",
                        lambda device: {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0, "matmul": "n/a"})
    assert cli.main(["bench", "--case", "attention", "--quick"]) == 1
    assert "FAILED: attention | L=1 | sdpa cudnn" in capsys.readouterr().err


def test_the_adaptive_selection_check_refuses_a_count_under_the_floor():
    """The selection case's adaptive row is checked to keep between the floor and the cap of each image: an image
    keeping nothing, or everything, fails the check."""
    workload = benchmarks.CASES["selection"].build((1, "uniform"), "tiny", torch.device("cpu"))
    verify = workload.impl("select, adaptive").verify
    n_ref = 8 * 8
    nothing = torch.zeros(1, n_ref, dtype=torch.bool)
    assert verify(nothing) != "", "an image keeping no token is under the floor"
    half = torch.zeros(1, n_ref, dtype=torch.bool)
    half[:, : n_ref // 2] = True
    assert verify(half) == ""
    assert verify(torch.ones(1, n_ref, dtype=torch.bool)) != ""


class _Selection:
    """A stand-in for ``sparsectx.last_selection``'s result: one keep mask ``[1, n]`` per reference, keeping the first
    ``kept`` tokens of each."""

    def __init__(self, kept_per_image, n=16):
        self.masks = []
        for kept in kept_per_image:
            mask = torch.zeros(1, n, dtype=torch.bool)
            mask[:, :kept] = True
            self.masks.append(mask)

    def per_image(self):
        return self.masks


def test_kept_count_is_checked_per_reference():
    """``_kept_count_problem`` (the drop-in and pipeline rows' check of what the selection kept) holds each reference to
    ``count``: 5 of one and 3 of another fail at 4 each, though the total is right."""
    assert benchmarks._kept_count_problem(_Selection([4, 4]), 4, 2) == ""
    assert benchmarks._kept_count_problem(_Selection([5, 3]), 4, 2) != ""
    assert benchmarks._kept_count_problem(_Selection([4]), 4, 2) != ""


def test_the_no_reference_step_is_the_e2e_cases_timed_row():
    """Issue 6's shares are taken of the e2e case's timed step without references: not of the pipeline case's row of the
    same name (a whole 4-step call), nor of an untimed e2e row (a cut run)."""
    none = benchmarks.NO_REFERENCE_ROW
    rows = [_row("pipeline", "3 ref x 10%", none, 400.0),
            _row("e2e", "1 ref x 25%", none, None),
            _row("e2e", "3 ref x 10%", none, 50.0)]
    assert benchmarks.no_reference_step_ms(rows) == 50.0
    assert benchmarks.no_reference_step_ms(rows[:2]) is None


def test_steps_from_refuses_another_size_on_the_same_device(tmp_path):
    """``--steps-from`` refuses a file measured at another size on the same device (its step times would judge the
    wrong shares)."""
    path = str(tmp_path / "full.json")
    benchmarks.write_json(path, {"device": "NVIDIA H200", "size": "full"}, [])
    with pytest.raises(SystemExit, match="measured with size 'full', this run with 'tiny'"):
        benchmarks.steps_from(path, {"device": "NVIDIA H200", "size": "tiny"})


def test_a_failed_peer_check_judges_no_target():
    """A target whose peer row FAILED its check judges nothing (a wrong, e.g. truncated, result may be fast or slow)."""
    rows = _block("compaction", "B=1, N=12288", {"sparsectx compact_tokens (scores+budget)": 0.030,
                                                 "topk+sort+gather": 0.160, "x[mask] (host sync)": 0.07})
    rows[1]["ok"] = False  # (x[mask] agreed: sparsectx's output is checked)
    lines = [line for line in benchmarks.target_verdicts(rows) if ">= 5x faster" in line]
    assert lines and all("not judged (topk+sort+gather: check FAILED)" in line for line in lines), lines


def test_a_pass_missing_on_one_row_pairs_the_first_passes():
    """``_paired_difference_ms`` with a pass missing on one row (its later pass failed) takes the difference of the
    first passes' times, not of each row's fastest pass."""
    new = _row("e2e", "3 ref x 10%", benchmarks.DROP_IN_ATTENTION_ROW, 12.0, pass_ms=[12.0, 9.0])
    step = _row("e2e", "3 ref x 10%", benchmarks.DROP_IN_STEP_ROW, 10.0, pass_ms=[10.0])
    added, per_pass = benchmarks._paired_difference_ms(new, step)
    assert added == 2.0 and per_pass == [2.0]


def _precompile_driver(tmp_path, compile_check_body: str, *, jobs: int = 3, skip: str = "", cuda: bool = True,
                       after: str = "") -> dict:
    """gpu_check.sh's kernels-built-ahead block (start_precompile at its end), run as the script runs it with a
    stand-in Python: Triton's cache folder is ``tmp_path/cache``, the GPU's arch 90 (or no CUDA device), and
    ``compile-check`` runs ``compile_check_body`` (sh). ``after``: commands run after the block (e.g.
    ``stop_precompile 60``). Returns the step lines, the env log and the script's output."""
    import re
    import subprocess

    script = (Path(__file__).parent.parent / "bench" / "gpu_check.sh").read_text()
    block = re.search(r"\n# ---- \(c2\) kernels built ahead.*?\nstart_precompile\n", script, re.S)
    assert block, "the (c2) block is not in gpu_check.sh"
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
case "$2" in
    "from triton import knobs"*) echo {cache} ;;
    "import torch"*) {"echo 90" if cuda else "exit 1"} ;;
    sparsectx.cli) echo "$@" > {tmp_path}/argv; {compile_check_body} ;;
esac
""")
    python.chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    driver = (f"set -u\nPY={python}\nSCRATCH={scratch}\nENV_LOG={tmp_path}/env.log\nSKIP_STEPS={skip}\n"
              f"PRECOMPILE_JOBS={jobs}\nBUDGET_S=600; START=$SECONDS; SUMMARY_RESERVE_S=0; STEP_LINES=()\n"
              "seconds_left() { echo $(( BUDGET_S - (SECONDS - START) - SUMMARY_RESERVE_S )); }\n"
              f"IN_SCRATCH=(bash -c 'cd \"$0\" && exec \"$@\"' \"$SCRATCH\")\n{block.group(0)}{after}\n"
              'printf "STEP %s\\n" "${STEP_LINES[@]}"\n')
    done = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    steps = [line.split(None, 1)[1] for line in done.stdout.splitlines() if line.startswith("STEP ")]
    return {"steps": steps, "env": (tmp_path / "env.log").read_text(), "out": done.stdout, "cache": cache}


def test_gpu_check_builds_kernels_ahead_and_counts_what_the_steps_built_after(tmp_path):
    """The background build: ``sparsectx compile-check`` for the GPU's arch with the jobs asked for; at the first
    timed step it ends (ok, its summary line in env.log), and the cache's binaries newer than its end are what the
    steps compiled themselves (the summary names them per kernel)."""
    cache = tmp_path / "cache"
    body = (f"mkdir -p {cache}/a && echo {{}} > {cache}/a/__grp___fwd_kernel.json && "
            "echo 'Triton 3.6.0, sm_90, 9 s, 3 processes' && echo '1 binaries for sm_90; spilling: 0'")
    after = (f"stop_precompile 60\nmkdir -p {cache}/b && echo {{}} > {cache}/b/__grp___gather_rows_kernel.json\n"
             'echo "AT START $CACHE_AT_START"; echo "NEWER $(cache_binaries "$PRECOMPILE_DONE" | wc -l)"; '
             'echo "ALL $(cache_binaries | wc -l)"')
    run = _precompile_driver(tmp_path, body, after=after)
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("compile-check") + 1:] == ["--arch", "90", "--quick", "--jobs", "3"]
    assert len(run["steps"]) == 1 and run["steps"][0].split()[:3] == ["precompile", "ok", "rc=0"], run["steps"]
    assert "=== precompile: ok (rc=0" in run["env"] and "Triton 3.6.0, sm_90, 9 s, 3 processes" in run["env"]
    assert "AT START 0" in run["out"] and "NEWER 1" in run["out"] and "ALL 2" in run["out"], run["out"]


def test_gpu_check_stops_a_build_still_running_with_its_processes_and_reports_a_failed_one(tmp_path):
    """A build still running when its wait ends is stopped with every process it started (compile-check's --jobs
    children must not share the host with a timed step): STOPPED, not a failure; one that exits non-zero (a kernel
    that does not compile for this GPU) FAILED."""
    import subprocess
    import time

    marker = f"{1000 + os.getpid() % 1000}.5"  # a sleep of its own, found by its argument
    body = f"sleep {marker} & sleep {marker}"
    run = _precompile_driver(tmp_path, body, after="sleep 1; stop_precompile 1")  # (a driver that waited: timeout)
    assert run["steps"][0].split()[:2] == ["precompile", "STOPPED"], run["steps"]
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the build left running: {left}"
    failed = _precompile_driver(tmp_path, "echo 'PROBLEM: v: _fwd_kernel does not compile'; exit 1",
                                after="stop_precompile 60")
    assert failed["steps"][0].split()[:3] == ["precompile", "FAILED", "rc=1"], failed["steps"]
    assert "PROBLEM: v: _fwd_kernel does not compile" in failed["env"]


def test_gpu_check_builds_nothing_ahead_when_told_not_to_or_without_a_gpu(tmp_path):
    """No build (and no process to stop) with GPU_CHECK_PRECOMPILE_JOBS=0, with the step skipped by name, and
    without a CUDA device (a dry run on a CPU machine): the summary says which."""
    for kwargs, why in (({"jobs": 0}, "GPU_CHECK_PRECOMPILE_JOBS=0"), ({"skip": "precompile"}, "GPU_CHECK_SKIP"),
                        ({"cuda": False}, "no CUDA device")):
        run = _precompile_driver(tmp_path, "exit 3", after="stop_precompile 60", **kwargs)
        assert run["steps"] == [f"precompile                 skipped: {why}"], (kwargs, run["steps"])
        assert not (tmp_path / "argv").exists()


def test_output_paths_write_through_links_and_refuse_special_files(tmp_path):
    """--json / --merge-into / report --merged wrote a temporary file and moved it over the path: a link was
    replaced by a file (its target never written), and as root /dev/null or a FIFO was replaced by a regular file.
    Now a link's target gets the file (the link stays) and a path that is no regular file is refused."""
    meta = {"device": "cpu", "size": "tiny", "commit": "abc1234", "cases": ["attention"]}
    block = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    benchmarks.check_output_path("--json", str(tmp_path / "link.json"))
    benchmarks.write_json(str(tmp_path / "link.json"), meta, block)
    assert (tmp_path / "link.json").is_symlink()
    assert benchmarks.load_run(str(tmp_path / "real.json"))["rows"] == block
    os.mkfifo(tmp_path / "pipe.json")
    for path in (str(tmp_path / "pipe.json"), os.devnull):
        with pytest.raises(SystemExit, match="is not a regular file"):
            benchmarks.check_output_path("--json", path)
    with pytest.raises(SystemExit, match="is not a regular file"):  # (never tried on /dev/null: a failure replaced it)
        cli.main(["report", "--merged", str(tmp_path / "pipe.json"), str(tmp_path / "real.json")])
    assert (tmp_path / "pipe.json").is_fifo()


def test_a_refused_autotune_setting_stops_bench_and_info_before_any_work(monkeypatch):
    """SPARSECTX_AUTOTUNE=maybe: the bench ran its first case, then failed with a traceback (exit 1) where the
    kernels read it; info said nothing of it. Both now refuse it first (exit 2 via the command's UsageError)."""
    ran = []
    monkeypatch.setattr(benchmarks, "run_case", lambda *args, **kwargs: ran.append(args) or [])
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "maybe")
    for argv in (["bench", "--case", "compaction", "--quick"], ["info"]):
        with pytest.raises(SystemExit, match="SPARSECTX_AUTOTUNE='maybe'"):
            cli.main(argv)
    assert not ran


def test_report_refuses_malformed_timing_fields_and_autotune_picks(tmp_path):
    """Fields the tables read that load_run did not check gave a traceback (exit 1, which means a FAILED check):
    meta.autotune without "picked" (KeyError), a string loop_ms or pass_ms (TypeError in --summary); a string
    planned_cases was read letter by letter."""
    meta = {"device": "cpu", "size": "tiny", "commit": "abc1234", "cases": ["attention"]}
    block = _block("attention", "L=1", {"sparsectx (compacted)": 1.0, "sdpa cudnn": 0.8})
    cases = [({"meta": dict(meta, autotune={"k": {}}), "rows": block}, r"meta.autotune .* must map each kernel"),
             ({"meta": dict(meta, autotune_runs={"k": {}}), "rows": block}, r"meta.autotune .* must map each kernel"),
             ({"meta": dict(meta, planned_cases="attention"), "rows": block}, "meta.planned_cases must be a list"),
             ({"meta": meta, "rows": [dict(block[0], loop_ms="fast")]}, r"row 0 has \['loop_ms'\] of the wrong type"),
             ({"meta": meta, "rows": [dict(block[0], pass_ms="1,2")]}, r"row 0 has \['pass_ms'\] of the wrong type"),
             ({"meta": meta, "rows": [dict(block[0], pass_ms=[1.0, "2"])]}, r"row 0 has \['pass_ms'\]")]
    for data, match in cases:
        (tmp_path / "bad.json").write_text(json.dumps(data))
        for form in ([], ["--summary"]):
            with pytest.raises(SystemExit, match=match):
                cli.main(["report", *form, str(tmp_path / "bad.json")])
    (tmp_path / "good.json").write_text(json.dumps({"meta": dict(meta, autotune={"k": {"picked": {"a": "b"}}}),
                                                    "rows": [dict(block[0], pass_ms=[1.0, None], loop_ms=0.5)]}))
    assert cli.main(["report", "--summary", str(tmp_path / "good.json")]) == 0


def test_the_summary_of_a_run_cut_before_its_first_row_says_what_did_not_run(tmp_path, capsys):
    """bench writes its JSON before the first case so that a run cut there still says what it planned; report
    refused such a file ("holds no result rows"), so its NOT RUN line never showed."""
    path = str(tmp_path / "cut.json")
    benchmarks.write_json(path, {"device": "cpu", "size": "tiny", "commit": "abc1234", "cases": ["e2e", "selection"],
                                 "planned_shapes": {"e2e": ["a"], "selection": ["b"]}}, [])
    assert cli.main(["report", "--summary", path]) == 0
    assert "NOT RUN (planned, no row; a step cut short?): e2e, selection" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds no result rows"):  # (a table of nothing, or a merged empty file)
        cli.main(["report", path])


def test_plot_labels_keep_rows_that_differ_past_the_cut_apart():
    """Labels were cut at 50 characters of the shape: a forward and a forward + backward row of norm_rope read the
    same on the chart."""
    shape = "text 8 + image 64 tokens, H=2, D=32 float32, fp32 weights"
    rows = [_row("norm_rope", f"{shape}, forward", "diffusers", 1.0), _row("norm_rope", f"{shape}, fwd+bwd",
                                                                          "diffusers", 2.0),
            _row("compaction", "N=12", "x[mask]", 1.0, ok=False)]
    labels = benchmarks.plot_labels(rows)
    assert len(set(labels)) == 3 and labels[0].endswith(", forward]") and labels[1].endswith(", fwd+bwd]")
    assert labels[2] == "FAILED CHECK: compaction: x[mask] [N=12]"
