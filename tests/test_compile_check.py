"""`sparsectx compile-check`: every Triton kernel compiled for sm_90 (H100/H200) on this machine, no GPU needed.

The suite runs the kernels through Triton's interpreter, which never lowers them to GPU code: a kernel can pass
every test here and still not compile for a GPU (an op the interpreter accepts and the compiler does not, a block
shape whose shared memory exceeds what an SM has). These tests compile each kernel for Hopper with the installed
Triton and assert what the GPU launch needs, in child processes without TRITON_INTERPRET.
"""
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

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
    """bf16 attention at head dims 64/128 (the supported models'), 160 and 256 (above 128: their own launch
    configurations; 160 with a masked tail, 256 the largest the ops accept) with the first autotune candidate (the
    launch config under SPARSECTX_AUTOTUNE=0), and every compaction kernel, compiled for sm_90 through the command
    line, in two processes side by side (``--jobs 2``: the rows are the one process's, merged)."""
    out = tmp_path_factory.mktemp("compile") / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")  # as the suite runs: the command must leave the interpreter itself
    done = subprocess.run([sys.executable, "-m", "sparsectx.cli", "compile-check", "--dtypes", "bf16", "--head-dims",
                           "64,128,160,256", "--first-config", "--jobs", "2", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    return done, json.loads(out.read_text()) if out.exists() else None


def test_every_kernel_compiles_for_sm90(quick_check):
    done, report = quick_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["arch"] == 90 and report["first_config"] and report["problems"] == []
    rows = report["rows"]
    assert rows and not [r for r in rows if r["error"]]
    compiled = {r["kernel"] for r in rows}
    expected = (_kernel_names("sparsectx.kernels.attention") | _kernel_names("sparsectx.kernels.compaction")
                | _kernel_names("sparsectx.kernels.norm_rope"))
    assert len(expected) >= 9 and compiled == expected  # no kernel left out of the check
    # every binary with FMA contraction, asked for by every launch (kernels/_launch.py's COMPILE_OPTIONS): Triton 3.9
    # warns at a first compile that leaves it to the default, which Triton 3.10 turns off
    assert [r for r in rows if r["fp_fusion"] is not True] == []
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr
    # the norm + RoPE pass in each form the processors call, at the checked head dims and at head dim 128 in the
    # models' other head counts and dtypes (klein-9B's 32 heads, Z-Image's 30, FLUX.3's fp32 rows with fp32 or bf16
    # weights): the forward, the backward of the forms listed with one, and the weights' gradient reduction

    def flags(config):
        return frozenset(word for word in config.split() if "=" not in word and not re.fullmatch(r"[ws]\d+", word))

    expected_forward, expected_backward = set(), set()
    for prefix, weighted, per_pair, round_before_weight, backward in compile_check.NORM_ROPE_FORMS:
        named = {"HAS_PREFIX": prefix, "PREFIX_WEIGHT": prefix and weighted, "WEIGHT": weighted,
                 "TABLE_PER_PAIR": per_pair}
        expected_forward.add(frozenset(n for n, on in {**named, "ROUND_BEFORE_WEIGHT": round_before_weight}.items()
                                       if on))
        if backward:
            expected_backward.add(frozenset(n for n, on in named.items() if on))
    assert len(expected_forward) == 6 and len(expected_backward) == 5
    variants = [f"norm+rope bf16 D={dim}" for dim in (64, 128, 160, 256)]
    variants += ["norm+rope bf16 D=128 H=32", "norm+rope bf16 D=128 H=30", "norm+rope fp32 D=128",
                 "norm+rope fp32 D=128, bf16 weights"]
    for variant in variants:
        norm_rope = [r for r in rows if r["variant"] == variant]
        forward = {flags(r["config"]) for r in norm_rope if r["kernel"] == "_rms_norm_rope_kernel"}
        backward = {flags(r["config"]) for r in norm_rope if r["kernel"] == "_rms_norm_rope_bwd_kernel"}
        # (other weights: the forms without weights are the same binaries as the variant's of its rows' dtype, listed
        # there)
        weighted = variant.endswith(" weights")
        assert forward == {f for f in expected_forward if "WEIGHT" in f or not weighted}, (variant, forward)
        assert backward == {f for f in expected_backward if "WEIGHT" in f or not weighted}, (variant, backward)
    assert {r["variant"] for r in rows if r["kernel"] == "_weight_grads_kernel"} >= {
        "norm+rope bf16 D=64", "norm+rope fp32 D=128"}  # (a binary per dtype and head dim, not per head count)
    # each key layout at each head dim compiles its forward and its three backward kernels; at head dims whose
    # packed rows load by tile copies (64, 128) the forward of gathered references is the copy of the kept rows and
    # the packed references' forward (the same binary as the packed layout's, listed once, under the first)
    for dim in (64, 128, 160, 256):
        packs = dim <= 128
        for refs in ("no refs", "gathered refs", "packed refs"):
            kernels = {r["kernel"] for r in rows if r["variant"] == f"attention bf16 D={dim} {refs}"}
            forward = set() if packs and refs == "packed refs" else {"_fwd_kernel"}
            assert forward | {"_bwd_dkdv_kernel", "_bwd_dq_kernel"} <= kernels, (dim, refs, kernels)
    assert "_gather_rows_kernel" in {r["kernel"] for r in rows if r["variant"] == "attention bf16 D=64 gathered refs"}
    for dim in (64, 128):  # a reference buffer whose heads are not adjacent: the forward gathers in place
        forward = [r for r in rows if r["variant"] == f"attention bf16 D={dim} gathered refs, heads apart"
                   and r["kernel"] == "_fwd_kernel"]
        assert forward and "REF_PACKED" not in forward[0]["config"], (dim, forward)
    for dim in (64, 128):  # masked_attention's plainest forward: packed references by tile copies, no own keys
        forward = [r["config"].split() for r in rows if r["variant"] == f"attention bf16 D={dim} packed refs, no own "
                   "keys" and r["kernel"] == "_fwd_kernel"]
        assert forward and {"REF_PACKED", "REF_TMA"} <= set(forward[0]) and "OWN_TMA" not in forward[0], forward
    gathers = {tuple(r["config"].split()) for r in rows if r["kernel"] == "_gather_rows_kernel"}
    for count in (1, 2, 3):  # with zero padding or without (masked_attention's packed q, k and v)
        for padding in (True, False):
            assert any(f"NUM_PAYLOADS={count}" in c and ("ZERO_PADDING" in c) == padding for c in gathers), \
                (count, padding)
    assert report["shared_memory_limit"] == compile_check.SHARED_MEMORY_LIMIT[90]
    # the compaction kernels at batch 1 (the usual inference call) as well as 2, and every score dtype
    variants = {r["variant"] for r in rows}
    assert {f"select scores {d} B={b} N=4096 uniform counts" for d in ("fp16", "bf16", "fp32") for b in (1, 2)} \
        <= variants


def test_first_configs_do_not_spill_in_bf16_and_compaction_never_spills(quick_check):
    """kernels/attention.py says its first candidates compile for sm_90 (bf16) without register spills: they are
    the launch config of SPARSECTX_AUTOTUNE=0 and the autotuner's first guess. At head dim 256 the first candidates
    of the head-dim-128 lists needed 256 KB of shared memory (forward) and spilled (backward)."""
    _, report = quick_check
    spilled = [(r["variant"], r["kernel"], r["config"], r["spill_bytes"]) for r in report["rows"] if r["spill_bytes"]]
    assert spilled == []


def test_first_configs_fit_sm90_in_fp32(tmp_path):
    """fp32 attention (IEEE dots: correct, slow, it spills at every tile) at head dims 64 and 128 with the first
    autotune candidates, the launch configs of SPARSECTX_AUTOTUNE=0 and of torch's deterministic algorithms: each
    fits sm_90's shared memory. The first dQ tile of the head-dim-128 list needed 289 KB there in fp32 (sm_90 gives a
    block 227 KB), so such a backward could not launch; head rows wider than 256 bytes (fp32 head dims above 64) take
    the tiles of wide rows now."""
    from sparsectx.kernels import attention as kernels

    out = tmp_path / "fp32.json"
    done = subprocess.run([sys.executable, "-m", "sparsectx.cli", "compile-check", "--dtypes", "fp32", "--head-dims",
                           "64,128", "--first-config", "--json", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == [] and not [r for r in report["rows"] if r["error"]]
    limit = compile_check.SHARED_MEMORY_LIMIT[90]
    attention = [r for r in report["rows"] if r["variant"].startswith("attention fp32")]
    assert attention and all(r["shared_bytes"] <= limit for r in attention)
    for dim, shapes in ((64, kernels.DQ_SHAPES), (128, kernels.DQ_SHAPES_WIDE)):
        dq = [r["config"].split() for r in attention if r["variant"] == f"attention fp32 D={dim} no refs"
              and r["kernel"] == "_bwd_dq_kernel"]
        assert len(dq) == 1 and {f"BLOCK_M={shapes[0][0]}", f"BLOCK_N={shapes[0][1]}"} <= set(dq[0]), (dim, dq)


# the lines of a child script (indented as they are) after it set ``wanted``: run_check compiles only the variants
# whose labels are in it, no compaction kernel
_ONLY_WANTED_VARIANTS = """
        from sparsectx import compile_check as cc

        for name in ("_attention_variants", "_key_mass_variants", "_norm_rope_variants"):
            variants = getattr(cc, name)
            setattr(cc, name, lambda d, h, variants=variants: (v for v in variants(d, h) if v[0] in wanted))
        cc._compaction_variants = lambda: iter(())"""


def _check_one_variant(tmp_path, label, dtype, dim, archs, env=None):
    """run_check of the one variant ``label`` (e.g. "attention bf16 D=128 no refs") in a child process, per arch:
    ``{arch: {"rows": [[kernel, candidate, shared_bytes, error]], "problems": [...], "dropped": [[kernel,
    candidate]]}}`` (arch as a string, as JSON keeps it)."""
    done = _run_script(tmp_path, f"""
        import json

        wanted = {{{label!r}}}{_ONLY_WANTED_VARIANTS}
        found = {{}}
        for arch in {list(archs)!r}:
            rows = cc.run_check(arch, ({dtype!r},), ({dim},), progress=False)
            found[arch] = dict(rows=[(r.kernel, r.candidate, r.shared_bytes, r.error) for r in rows],
                               problems=cc.problems(rows, arch),
                               dropped=[(r.kernel, r.candidate) for r in cc.dropped(rows, arch)])
        print(json.dumps(found))
    """, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_untimed_launch_on_sm89_compiles_up_to_the_first_candidate_that_fits(tmp_path):
    """An sm_89 (RTX 4090, L40S) block gets 99 KB of shared memory: the first dQ tile of bf16 at head dim 128 (sized
    for sm_90) needs 128 KB there, so the untimed launch (SPARSECTX_AUTOTUNE=0, deterministic algorithms) failed.
    It goes on to the next candidate now, and the check does what the GPU's launcher does: it compiles the first,
    finds it over the limit, compiles the second, which fits, and reports no problem (the first is listed as
    dropped). On sm_90 the first fits and is the only one compiled."""
    found = _check_one_variant(tmp_path, "attention bf16 D=128 no refs", "bf16", 128, (89, 90),
                               env={"SPARSECTX_AUTOTUNE": "0"})
    limit = compile_check.SHARED_MEMORY_LIMIT[89]
    dq = [(candidate, shared) for kernel, candidate, shared, _ in found["89"]["rows"] if kernel == "_bwd_dq_kernel"]
    assert [c for c, _ in dq] == [0, 1] and dq[0][1] > limit >= dq[1][1], dq
    assert found["89"]["problems"] == [] and found["89"]["dropped"] == [["_bwd_dq_kernel", 0]]
    assert all(error is None for *_, error in found["89"]["rows"])
    assert [c for kernel, c, _, _ in found["90"]["rows"] if kernel == "_bwd_dq_kernel"] == [0]
    assert found["90"]["problems"] == [] and found["90"]["dropped"] == []


def test_fp32_key_mass_at_head_dim_128_fits_sm89(tmp_path):
    """The key-mass kernels (one configuration each, no autotuning) take their tile by a head row's bytes: fp32 at
    head dim 128 (512-byte rows) the wide rows' tile. The head-dim-128 tile needed 131,072 B of shared memory there,
    over an sm_86/sm_89 block's 101,376: the probe could not launch on such a GPU in fp32."""
    found = _check_one_variant(tmp_path, "key mass fp32 D=128", "fp32", 128, (89,))["89"]
    assert sorted(kernel for kernel, *_ in found["rows"]) == ["_mass_columns_kernel", "_mass_rows_kernel"]
    assert found["problems"] == []


def test_sass_loops_count_one_step_of_each_loop():
    """``--loops``: a loop is a branch back to an earlier address (also one with a predicate operand); one step
    counts the instructions from its head to its last branch back, an inner loop's once, and never those predicated
    on ``!PT`` (padding); a branch forward or to itself (the trap at a kernel's end) is no loop, nor is the jump back
    of a block placed after the kernel's end (a wait on a barrier there is a loop of its own)."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA 0x0060 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   STS.128 [R2], R4 ;
        /*0040*/              @!PT LDS RZ, [RZ] ;
        /*0050*/                   SHFL.BFLY PT, R3, R4, 0x1, 0x1f ;
        /*0060*/                   LDS.128 R8, [R2] ;
        /*0070*/              @!P1 BRA 0x0060 ;
        /*0080*/                   LDSM.16.M88.4 R12, [R2] ;
        /*0090*/               @P2 BRA P3, 0x0020 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [R2+URZ], R5 ;
        /*00c0*/              @!P4 BRA 0x00b0 ;
        /*00d0*/                   BRA 0x0080 ;
        /*00e0*/                   BRA 0xe0;
    """
    inner = {"instructions": 2, "barriers": 0, "shuffles": 0, "shared_stores": 0, "shared_loads": 1}
    outer = {"instructions": 7, "barriers": 1, "shuffles": 1, "shared_stores": 1, "shared_loads": 2}
    wait = {"instructions": 2, "barriers": 0, "shuffles": 0, "shared_stores": 0, "shared_loads": 0}
    assert compile_check._sass_loops(sass) == [outer, inner, wait]
    assert compile_check._sass_loops("/*0000*/ EXIT ;") == []


def test_key_mass_and_weight_gradient_loops_make_no_round_trip_per_step(tmp_path):
    """The key-mass passes (the selection probes' signal) and the norm + RoPE weight gradient compiled for sm_90
    (bf16, head dim 128): no step of their loops stores to shared memory, and a step holds at most the pipeline's two
    barriers (none in the weight gradient's). The columns pass reduced each block over its queries across warps
    (Triton 3.9: 10 barriers and 12 shared stores a step; 3.6: 3 and 18) and stored its loop-invariant key block
    again in every step; the weight gradient reduced each tile across warps (2 barriers; 3.6: 3)."""
    done = _run_script(tmp_path, """
        import json

        wanted = {"key mass bf16 D=128", "norm+rope bf16 D=128"}""" + _ONLY_WANTED_VARIANTS + """
        rows = cc.run_check(90, ("bf16",), (128,), progress=False, loops=True)
        print(json.dumps([(r.kernel, r.error, r.loops) for r in rows]))
    """)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {kernel: (error, loops) for kernel, error, loops in json.loads(done.stdout.strip().splitlines()[-1])}
    for kernel, most_barriers in (("_mass_rows_kernel", 2), ("_mass_columns_kernel", 2), ("_weight_grads_kernel", 0)):
        error, loops = rows[kernel]
        assert error is None and loops, (kernel, error, loops)
        assert all(loop["shared_stores"] == 0 and loop["barriers"] <= most_barriers for loop in loops), (kernel, loops)


def test_selection_kernel_scans_its_held_row_without_shared_memory_round_trips(tmp_path):
    """The compaction's selection kernel at issue 3's row (bf16 scores, 3 x 4096 tokens held in one block, 8 warps),
    compiled for sm_90: the whole binary holds at most 20 barriers and 16 shared-memory stores. Its prefix counts
    (the candidate filter's compaction, the index rows' ranks) scan within each thread and once across the threads
    only while Triton gives each thread consecutive tokens (``_tile_positions``); over tiles in token order the
    binary held 29-30 barriers and 57-62 shared stores (Triton 3.9 / 3.6), its filter 12 steps of one scan each, and
    16 / 13 barriers and 12 / 7 stores since (3.6 / 3.9, with the reduction to the row's largest and smallest key)."""
    done = _run_script(tmp_path, """
        import json
        import torch
        from sparsectx import compile_check as cc
        from sparsectx.kernels.compaction import compact_index

        found = []

        def record(fn, kwargs, compiled, seconds, candidate, error):
            assert error is None, error
            # the binary's opcode families (padding instructions, predicated on !PT, left out)
            ops = [opcode.split(".")[0] for _, predicate, opcode, _ in
                   cc._sass_code(cc._cuobjdump_output(compiled.asm["cubin"], "-sass")) if predicate != "@!PT"]
            found.append((fn.__name__, ops.count("BAR"), ops.count("STS") + ops.count("STSM"),
                          cc._resources(compiled.asm["cubin"])))

        with cc._compile_only(90, record):
            compact_index(torch.zeros(1, 3 * 4096, dtype=torch.bfloat16), [3 * 4096 // 10])
        print(json.dumps(found))
    """)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert [name for name, *_ in found] == ["_topk_threshold_kernel"], found  # (one launch: the row fits a block)
    _, barriers, shared_stores, (registers, spilled, _) = found[0]
    assert barriers <= 20 and shared_stores <= 16 and spilled == 0, found


def test_request_dependent_counts_compile_no_second_binary(tmp_path):
    """Triton specialises an int argument on its divisibility by 16 (and on 1), one binary per class. The counts
    that change from one request to the next (kept counts and totals, query and key counts, text and image lengths)
    are values in these kernels, not strides of vector loads: each kernel compiles one binary for every count
    (``do_not_specialize``), without spills, so a first request whose counts fall in another class compiles
    nothing, and compile-check's one class stands for all (likewise the selection budgets' image count, which set
    the alignment of a pointer: 4 images built a binary compile-check's 1 and 3 had not). The selection kernel's
    binary for a kept count divisible
    by 16 on rows of 3 or 4 x 4096 tokens (1216 kept; 3072, a 25% budget of 3 references) spilled 568-584 B (Triton
    3.6) and 696 B (3.9), in a second compile; the attention kernels' second binary was the same code, compiled
    again; the others differed in scalar code only, their loads and stores as wide."""
    done = _run_script(tmp_path, """
        import json
        import torch
        from sparsectx import compile_check as cc
        from sparsectx.kernels.attention import attention_backward, attention_forward
        from sparsectx.kernels.compaction import compact_index, gather_rows, ranked_keep_mask, scatter_rows
        from sparsectx.kernels.norm_rope import rms_norm_rope, rms_norm_rope_backward, rope_tables

        found = []

        def record(fn, kwargs, compiled, seconds, candidate, error):
            assert error is None, error
            form = fn.__name__ + repr(sorted((k, str(v)) for k, v in kwargs.items()))
            found.append((size[0], fn.__name__, form, compiled.hash, cc._resources(compiled.asm["cubin"])[1]))

        size = [None]
        heads, dim, dtype = 2, 64, torch.bfloat16
        with cc._compile_only(90, record):
            for kept in (1216, 1229, 1):  # (1: Triton's other int class)
                size[0] = kept
                index, cu = compact_index(torch.zeros(1, 3 * 4096, dtype=dtype), [kept])
                gather_rows([torch.zeros(1, 3 * 4096, 256, dtype=dtype)], index, cu, kept)
                scatter_rows(torch.zeros(kept, 256, dtype=dtype), index, cu, torch.zeros(1, 3 * 4096, 256, dtype=dtype))
                compact_index(torch.zeros(1, 3 * 4096, dtype=torch.bool), None, kept)  # (rows sized by the caller)
            for images in (2, 3, 4):  # (the image count: the budgets' layout rows start aligned whatever it is)
                size[0] = ("images", images)
                ranked_keep_mask(torch.zeros(images, 4096), torch.zeros(images, 4096, dtype=torch.int64),
                                 [4096] * images, 4096 * images, torch.zeros(1, images, dtype=torch.int64))
            for queries in (64, 77, 1):
                size[0] = queries
                q = torch.zeros(queries, heads, dim, dtype=dtype)
                cu = torch.tensor([0, queries], dtype=torch.int32)
                out, lse = attention_forward(q, q, q, cu, cu, queries, None, None, None, None, dim ** -0.5)
                attention_backward(torch.zeros_like(out), torch.zeros_like(lse), q, q, q, out, lse, cu, cu,
                                   queries, queries, None, None, None, None, 0, dim ** -0.5)
            for n_text, n_image in ((32, 64), (77, 64), (1, 77)):  # text and image lengths in each class
                size[0] = (n_text, n_image)
                text, image = (torch.zeros(1, n, heads, dim, dtype=dtype) for n in (n_text, n_image))
                weight = torch.zeros(dim, dtype=dtype)
                cos, sin = rope_tables(torch.zeros(n_text + n_image, 4, dtype=torch.int64),
                                       torch.zeros(dim, dtype=torch.float64), (16, 16, 16, 16))
                for segments, rows in (([(text, weight), (image, weight)], slice(None)),
                                       ([(image, weight)], slice(n_text, None))):
                    out = rms_norm_rope(segments, cos[rows], sin[rows], 1e-6)
                    rms_norm_rope_backward(out, segments, cos[rows], sin[rows], 1e-6)
        print(json.dumps(found))
    """, env={"SPARSECTX_AUTOTUNE": "0"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    binaries, sizes = {}, {}
    for size, name, form, binary, stack in found:
        binaries.setdefault(form, set()).add(binary)
        sizes.setdefault(name, set()).add(json.dumps(size))
        assert stack <= compile_check.LOCAL_ARRAY_BYTES.get(name, 0), (name, size, stack)  # no spill
    assert {form: b for form, b in binaries.items() if len(b) > 1} == {}
    for name in ("_topk_threshold_kernel", "_write_index_kernel", "_gather_rows_kernel", "_scatter_rows_kernel",
                 "_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_rms_norm_rope_kernel",
                 "_rms_norm_rope_bwd_kernel", "_weight_grads_kernel", "_rope_tables_kernel", "_ranked_keep_kernel"):
        assert len(sizes.get(name, ())) == 3, (name, sizes.get(name))  # launched at counts of three classes


def test_kernel_cache_keys_do_not_depend_on_what_a_process_compiled_first(tmp_path):
    """Triton keys a binary on disk by its function's cache key, computed at the function's first compile; Triton 3.4
    and 3.6 take in the constexpr globals of the callees whose keys were computed before only: a kernel whose helper
    another kernel compiled first got another key (the selection kernel and the block counts, which share the score
    keys), and its binary built by another process was compiled again. The kernel modules compute every key at
    import, callees first: the keys are the ones recomputed to a fixed point in any order. (With Triton 3.6 this
    fails without the keys computed at import; Triton 3.9 computes a callee's key first, and it holds either way.)"""
    done = _run_script(tmp_path, """
        import json
        import random
        from triton.runtime.jit import JITFunction
        import sparsectx.kernels.attention as attention
        import sparsectx.kernels.compaction as compaction
        import sparsectx.kernels.norm_rope as norm_rope

        functions = [f for m in (attention, compaction, norm_rope) for f in vars(m).values()
                     if isinstance(f, JITFunction) and f.__module__ == m.__name__]
        kernels = [f for f in functions if f.__name__.endswith("_kernel")]
        at_import = {f.__name__: f.cache_key for f in kernels}  # (computed lazily here, kernels first, without it)
        random.seed(0)
        fixed = None
        for _ in range(10):  # every key recomputed in a random order until none changes
            for f in functions:
                f.hash = None
            random.shuffle(functions)
            keys = {f.__name__: f.cache_key for f in functions}
            if keys == fixed:
                break
            fixed = keys
        print(json.dumps([len(kernels), {name: key == fixed[name] for name, key in at_import.items()}]))
    """)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    count, same = json.loads(done.stdout.strip().splitlines()[-1])
    assert count >= 9 and all(same.values()), same


def test_loops_reach_the_child_process_and_the_table(monkeypatch):
    """``--loops`` is handed to the child process that compiles, and the table lists each binary's loop steps."""
    from sparsectx import cli

    calls = _children(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["compile-check", "--quick", "--loops"]) == 0
    assert "--loops" in calls[-1][0]
    row = compile_check.Compiled("key mass bf16 D=128", "_mass_columns_kernel", "w8 s3", 80, 0, 1024, 0.1,
                                 loops=[{"instructions": 253, "barriers": 2, "shuffles": 4, "shared_stores": 0,
                                         "shared_loads": 1}])
    assert ("  key mass bf16 D=128: _mass_columns_kernel [w8 s3] 253 ins, 2 bar, 4 shfl, 0 st / 1 ld"
            in compile_check.format_table([row], 90).splitlines())


def test_table_lists_every_binary(quick_check):
    done, report = quick_check
    for row in report["rows"]:
        assert any(line.startswith(row["variant"]) and row["kernel"] in line and row["config"] in line
                   for line in done.stdout.splitlines()), row
    assert f"{len(report['rows'])} binaries for sm_90; spilling: 0" in done.stdout
    assert done.stdout.startswith("Triton ") and ", 2 processes" in done.stdout.splitlines()[0]
    assert len({(r["kernel"], r["binary"]) for r in report["rows"]}) == len(report["rows"])  # each binary once


# an autotuned toy kernel of two candidates, in the scripts below (indented as they are)
_TUNED_TOY_KERNEL = """
        @triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128})],
                         key=["N"])
        @triton.jit
        def tuned(X, Y, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)
"""


def _run_script(tmp_path, body, env=None):
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**_without_interpreter(), **(env or {})}, timeout=300)


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

""" + _TUNED_TOY_KERNEL + """
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
        from triton.runtime.autotuner import Autotuner
        before = (driver._active, JITFunction.run, Autotuner.run)
        seen = []
        x, y = torch.ones(256), torch.full((256,), 7.0)
        for arch in (80, 90):
            with cc._compile_only(arch, lambda f, kw, k, s, c, e: seen.append((arch, f.fn.__name__, k, c, e))):
                double[(2,)](x, y, 256, BLOCK=128)
        assert [(a, n, c, e) for a, n, _, c, e in seen] == [(80, "double", None, None), (90, "double", None, None)]
        assert ".target sm_80" in seen[0][2].asm["ptx"] and ".target sm_90a" in seen[1][2].asm["ptx"]
        regs, stack, static = cc._resources(seen[1][2].asm["cubin"])
        assert 0 < regs <= 255 and stack == 0 and static == 0
        # an autotuned kernel compiles every candidate, in order, each with its index and its own warps
        seen.clear()
        with cc._compile_only(90, lambda f, kw, k, s, c, e: seen.append((c, kw["BLOCK"], k.metadata.num_warps))):
            tuned[lambda meta: (4,)](x, y, 256)
        assert seen == [(0, 64, 2), (1, 128, 4)], seen
        # a kernel that can not compile is reported with its error, and the launch goes on
        errors = []
        with cc._compile_only(90, lambda f, kw, k, s, c, e: errors.append((f.fn.__name__, k, type(e).__name__))):
            bad[(1,)](x, BLOCK=100)
            double[(2,)](x, y, 256, BLOCK=128)
        assert [(n, k is None) for n, k, _ in errors] == [("bad", True), ("double", False)], errors
        print("compile error:", errors[0][2])
        # after the blocks, Triton's own driver and launch path are back
        assert (driver._active, JITFunction.run, Autotuner.run) == before
        print("ok")
    """)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "compile error:" in done.stdout and done.stdout.rstrip().endswith("ok")


def test_problems_are_what_a_launch_can_not_avoid():
    """Shared memory over the arch's limit fails a launch only where the launch has no other choice: a kernel
    without autotuning, or all compiled candidates of a kernel (one alone: a --first-config run whose first did not
    fit and that compiled no other); a candidate that does not fit while another does is dropped by the autotuner
    and skipped by the untimed launch (listed, not a problem), the first one included. Compile errors always are
    problems."""
    limit = compile_check.SHARED_MEMORY_LIMIT[90]

    def row(variant, kernel, shared, candidate=None, error=None):
        return compile_check.Compiled(variant, kernel, "w8", 128, 0, shared, 1.0, error=error, candidate=candidate)

    rows = [row("fits", "_gather_rows_kernel", limit),
            row("plain", "_gather_rows_kernel", limit + 1),
            row("first", "_fwd_kernel", limit + 1, candidate=0), row("first", "_fwd_kernel", limit, candidate=1),
            row("later", "_fwd_kernel", limit, candidate=0), row("later", "_fwd_kernel", limit + 1, candidate=1),
            row("none", "_bwd_dq_kernel", limit + 1, candidate=1),
            row("none", "_bwd_dq_kernel", limit + 2, candidate=2),
            row("alone", "_bwd_dq_kernel", limit + 1, candidate=0),
            row("broken", "_bwd_dq_kernel", None, error="CompilationError: boom")]
    found = compile_check.problems(rows, 90)
    assert [line.split(":")[0] for line in found] == ["broken", "plain", "none", "alone"], found
    assert "(no autotuning)" in found[1]
    assert "none of its 2 compiled autotune candidates fits" in found[2]
    assert "none of its 1 compiled autotune candidates fits" in found[3]
    assert {(r.variant, r.candidate) for r in compile_check.dropped(rows, 90)} == {("first", 0), ("later", 1)}
    table = compile_check.format_table(rows, 90)
    assert "autotune candidates dropped on sm_90" in table
    assert "shared memory NOT checked: no per-block limit known for sm_75" in compile_check.format_table(rows, 75)
    assert compile_check.problems(rows, 75) == [found[0]]  # no limit known: only the compile error


def test_main_exits_1_on_a_problem_and_writes_it_to_the_json(tmp_path, monkeypatch, capsys):
    from sparsectx import cli

    limit = compile_check.SHARED_MEMORY_LIMIT[90]
    rows = [compile_check.Compiled("v", "_fwd_kernel", "w8", 128, 0, limit + 1, 1.0, candidate=0)]
    monkeypatch.setattr(compile_check, "run_check", lambda arch, dtypes, head_dims, loops=False, shard=(0, 1): rows)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # runs in this process: run_check is the stand-in
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    out = tmp_path / "check.json"
    assert cli.main(["compile-check", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert len(report["problems"]) == 1 and "needs" in report["problems"][0] and report["rows"][0]["candidate"] == 0
    assert "PROBLEM: v: _fwd_kernel" in capsys.readouterr().out
    rows[0].shared_bytes = limit
    assert cli.main(["compile-check", "--json", str(out)]) == 0 and json.loads(out.read_text())["problems"] == []
    # a path that can not be written is refused before the compiles (minutes), not after them with a traceback and
    # exit status 1 (which also means "problems found"): a folder, under a file, in a folder that takes no file
    monkeypatch.setattr(compile_check, "run_check", lambda *a, **k: pytest.fail("compiled before the path was checked"))
    (tmp_path / "a_file").write_text("")
    for bad in (tmp_path, tmp_path / "a_file" / "check.json", "/proc/check.json"):
        assert cli.main(["compile-check", "--json", str(bad)]) == 2
        assert "sparsectx compile-check: error: --json" in capsys.readouterr().err
    # a missing folder is made, as `sparsectx bench --json` makes it
    monkeypatch.setattr(compile_check, "run_check", lambda arch, dtypes, head_dims, loops=False, shard=(0, 1): rows)
    assert cli.main(["compile-check", "--json", str(tmp_path / "made" / "check.json")]) == 0
    assert (tmp_path / "made" / "check.json").exists()


def test_an_error_without_a_message_is_reported():
    assert compile_check._error_line(AssertionError()) == "AssertionError"
    assert compile_check._error_line(ValueError("first\nlast")) == "ValueError: last"


def test_command_line_refuses_unknown_dtypes_and_head_dims(capsys):
    from sparsectx import cli

    for argv in (["--dtypes", "fp8"], ["--head-dims", "0"], ["--head-dims", "64,x"]):
        with pytest.raises(SystemExit):
            cli.main(["compile-check", *argv])
        assert "expected" in capsys.readouterr().err


def test_command_line_refuses_an_unknown_arch_and_quick_with_explicit_variants(tmp_path, monkeypatch, capsys):
    """--arch 12 reached LLVM ("'sm_12' is not a recognized processor", then an abort); --quick with --dtypes or
    --head-dims silently compiled --quick's variants. The defaults stand when neither is given."""
    from sparsectx import cli

    with pytest.raises(SystemExit):
        cli.main(["compile-check", "--arch", "12"])
    assert "invalid choice: 12" in capsys.readouterr().err
    for extra in (["--dtypes", "fp32"], ["--head-dims", "40"]):
        assert cli.main(["compile-check", "--quick", *extra]) == 2
        assert "--quick stands for --dtypes bf16 --head-dims 64,128" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(compile_check, "run_check", lambda arch, dtypes, head_dims, loops=False, shard=(0, 1):
                        seen.append((dtypes, head_dims)) or [])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # runs in this process: run_check is the stand-in
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    for argv in ([], ["--quick"], ["--dtypes", "fp32", "--head-dims", "40"]):
        assert cli.main(["compile-check", *argv]) == 0
    assert seen == [(compile_check.DTYPES, compile_check.HEAD_DIMS), (("bf16",), (64, 128)), (("fp32",), (40,))]


def test_run_check_records_candidate_index_and_dynamic_plus_static_shared(tmp_path):
    """run_check's own record(): an autotuned kernel's rows carry their candidate index (problems() and dropped()
    depend on it: without it a later candidate over the limit reads as 'no autotuning', a problem), a plain kernel's
    None; shared_bytes is the launch's dynamic shared memory plus the binary's static (cuobjdump's SHARED)."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import torch, triton, triton.language as tl
        from sparsectx import compile_check as cc

""" + _TUNED_TOY_KERNEL + """
        @triton.jit
        def plain(X, Y, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)

        def launch():
            x, y = torch.ones(256), torch.zeros(256)
            tuned[lambda meta: (4,)](x, y, 256)
            plain[(2,)](x, y, 256, BLOCK=128)

        real = cc._resources
        cc._resources = lambda cubin: (real(cubin)[0], 0, 1000)  # a binary with 1000 B of static shared memory
        for name in ("_attention_variants", "_key_mass_variants", "_norm_rope_variants"):
            setattr(cc, name, lambda *a: iter(()))
        cc._compaction_variants = lambda: iter([("toy", launch)])
        rows = cc.run_check(90, progress=False)
        assert [(r.kernel, r.candidate) for r in rows] == [("tuned", 0), ("tuned", 1), ("plain", None)], rows
        assert all(r.error is None and r.shared_bytes >= 1000 for r in rows), rows
        print("ok")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_without_interpreter(),
                          timeout=300)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


def test_quick_form_covers_every_layout_key_mass_dim_and_per_sample_selection(quick_check):
    """The suite's quick form (the fixture's command): each head dim's 'queries in place' forward
    (masked_attention's kept queries), the key-mass passes at each head dim, the per-sample counts of the selection;
    every autotuned attention kernel at its first candidate (index 0), the others not autotuned (None)."""
    done, report = quick_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = report["rows"]
    variants = {r["variant"] for r in rows}
    for dim in (64, 128, 160, 256):
        assert f"attention bf16 D={dim} queries in place" in variants, dim
        assert f"key mass bf16 D={dim}" in variants, dim
        # one sample of a token count not a multiple of 16: the attention kernels' binaries are the other layouts'
        # (listed there), the backward's row pass is its own (Triton specialises its sample count, 1; not its counts)
        one_sample = {r["kernel"] for r in rows if r["variant"] == f"attention bf16 D={dim} gathered refs, one sample"}
        assert "_bwd_delta_kernel" in one_sample and not one_sample & {"_fwd_kernel", "_bwd_dq_kernel"}, one_sample
    for name in ("fp16", "bf16", "fp32"):
        assert f"select scores {name} B=2 N=4096 per-sample counts" in variants, name
    tuned = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    assert {r["candidate"] for r in rows if r["kernel"] in tuned} == {0}
    assert {r["candidate"] for r in rows if r["kernel"] not in tuned} == {None}


def test_empty_variant_lists_are_refused(capsys):
    """`--dtypes ''` or `--head-dims ,` (an unset shell variable) must not silently compile every default variant."""
    from sparsectx import cli

    for argv in (["--dtypes", ""], ["--dtypes", ","], ["--head-dims", ""], ["--head-dims", ","]):
        with pytest.raises(SystemExit):  # (the parser only: an accepted list would start the full compile)
            cli.build_parser().parse_args(["compile-check", *argv])
        assert "expected" in capsys.readouterr().err, argv


def _children(monkeypatch):
    calls = []
    monkeypatch.setattr(compile_check.subprocess, "call", lambda argv, env: calls.append((argv, env)) or 0)
    monkeypatch.setattr(compile_check, "run_check", lambda *a, **k: pytest.fail("compiled in this process"))
    return calls


def test_interpreter_in_the_environment_runs_the_check_in_a_child_without_it(monkeypatch):
    """TRITON_INTERPRET=1 with the autotune setting the command wants (no --first-config, SPARSECTX_AUTOTUNE=1):
    the kernels of this process are the interpreter's, so the check must run in a child without TRITON_INTERPRET."""
    from sparsectx import cli

    calls = _children(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    assert cli.main(["compile-check", "--quick"]) == 0
    assert len(calls) == 1 and "TRITON_INTERPRET" not in calls[0][1] and calls[0][1]["SPARSECTX_AUTOTUNE"] == "1"
    assert calls[0][1][compile_check.CHILD_MARK] == "1"


def test_the_child_process_does_not_start_another(monkeypatch):
    """The child runs the check itself: were the interpreter or the other autotune setting still on there (a bug in
    what the parent hands it), it stops with an error naming both instead of starting a child of its own (a chain of
    processes until a timeout)."""
    from sparsectx import cli

    calls = _children(monkeypatch)
    monkeypatch.setenv(compile_check.CHILD_MARK, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET='1' and SPARSECTX_AUTOTUNE='1'"):
        cli.main(["compile-check", "--quick"])
    assert calls == []


def test_a_refused_autotune_setting_runs_the_check_in_a_child_with_the_commands_own(monkeypatch):
    """SPARSECTX_AUTOTUNE=maybe (refused by the kernels at import) must not reach an in-process import: the child
    gets the command's own value."""
    from sparsectx import cli

    calls = _children(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "maybe")
    for argv, value in ((["--quick"], "1"), (["--quick", "--first-config"], "0")):
        assert cli.main(["compile-check", *argv]) == 0
        assert calls[-1][1]["SPARSECTX_AUTOTUNE"] == value, argv
        assert ("--first-config" in calls[-1][0]) == (value == "0")


def test_json_records_the_run_as_asked_and_keeps_error_rows(tmp_path, monkeypatch):
    from sparsectx import cli

    rows = [compile_check.Compiled("v", "_fwd_kernel", "w8", 128, 0, 1000, 1.0, candidate=0),
            compile_check.Compiled("v", "_bwd_dq_kernel", "w8", error="CompilationError: boom", candidate=1)]
    monkeypatch.setattr(compile_check, "run_check", lambda arch, dtypes, head_dims, loops=False, shard=(0, 1): rows)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    out = tmp_path / "check.json"
    assert cli.main(["compile-check", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["first_config"] is False
    assert [r["kernel"] for r in report["rows"]] == ["_fwd_kernel", "_bwd_dq_kernel"]
    assert report["rows"][1]["error"] == "CompilationError: boom"


def test_jobs_merge_the_shards_rows_in_the_one_process_order_each_binary_once(tmp_path, monkeypatch, capsys):
    """``--jobs N`` starts N children, child i compiling ``--shard i/N``; their rows are merged in the order of the
    variants (as one process lists them: each variant's rows together, in their order) and a binary reached by two
    variants of different shards is listed once, under the earlier variant. A child that fails stops the command
    (status 2), naming it."""
    from sparsectx import cli

    # what three shards of five variants (v0..v4, round robin) write: v3 reaches shard 1's binary "h1" again
    shards = {
        1: {"variants": {"v0": 0, "v3": 3}, "rows": [("v0", "_a", "h1"), ("v0", "_b", "h2"), ("v3", "_a", "h1"),
                                                     ("v3", "_c", "h5")]},
        2: {"variants": {"v1": 1, "v4": 4}, "rows": [("v1", "_a", "h3"), ("v4", "_b", "h2")]},
        3: {"variants": {"v2": 2}, "rows": [("v2", "_d", None)]},  # (an error row: no binary)
    }
    started, fail = [], [None]

    class Child:
        def __init__(self, argv, env, stdout):
            started.append((argv, env))
            index = int(argv[argv.index("--shard") + 1].split("/")[0])
            self.returncode = 1 if index == fail[0] else 0
            if self.returncode == 0:
                rows = [dataclasses.asdict(compile_check.Compiled(v, k, "w4", 32, 0, 0, 0.1, binary=h,
                                                                  error=None if h else "boom"))
                        for v, k, h in shards[index]["rows"]]
                Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"variants": shards[index]["variants"],
                                                                            "rows": rows}))

        def wait(self):
            return self.returncode

    monkeypatch.setattr(compile_check.subprocess, "Popen", Child)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    out = tmp_path / "merged.json"
    assert cli.main(["compile-check", "--quick", "--jobs", "3", "--json", str(out)]) == 1  # (the error row)
    assert [argv[argv.index("--shard") + 1] for argv, _ in started] == ["1/3", "2/3", "3/3"]
    assert all(env[compile_check.CHILD_MARK] == "1" and "TRITON_INTERPRET" not in env for _, env in started)
    rows = [(r["variant"], r["kernel"], r["binary"]) for r in json.loads(out.read_text())["rows"]]
    assert rows == [("v0", "_a", "h1"), ("v0", "_b", "h2"), ("v1", "_a", "h3"), ("v2", "_d", None),
                    ("v3", "_c", "h5")]
    assert ", 3 processes" in capsys.readouterr().out
    started.clear()
    fail[0] = 2
    assert cli.main(["compile-check", "--quick", "--jobs", "3"]) == 2
    assert "shard 2/3 exited with status 1" in capsys.readouterr().err and len(started) == 3


def test_a_shard_writes_its_rows_and_its_variants_places(tmp_path, monkeypatch, capsys):
    """A --jobs child (``--shard I/N``) compiles variants I-1, I-1+N, ... and writes their places in the one
    process's order beside its rows (no table); without --json it is refused. ``--jobs`` and ``--shard`` refuse
    what is not a count or a share."""
    from sparsectx import cli

    labels = [f"v{i}" for i in range(7)]
    asked = []
    monkeypatch.setattr(compile_check, "_variants", lambda dtypes, head_dims: [(label, None) for label in labels])
    monkeypatch.setattr(compile_check, "run_check", lambda arch, dtypes, head_dims, loops=False, shard=(0, 1):
                        asked.append(shard) or [compile_check.Compiled("v1", "_a", "w4", 32, 0, 0, 0.1, binary="h")])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "1")
    monkeypatch.setenv(compile_check.CHILD_MARK, "1")
    out = tmp_path / "shard.json"
    assert cli.main(["compile-check", "--quick", "--shard", "2/3", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert asked == [(1, 3)] and written["variants"] == {"v1": 1, "v4": 4}
    assert [r["binary"] for r in written["rows"]] == ["h"] and capsys.readouterr().out == ""
    assert cli.main(["compile-check", "--quick", "--shard", "2/3"]) == 2
    assert "--shard (a --jobs child's share) writes its rows to --json" in capsys.readouterr().err
    for bad in (["--jobs", "0"], ["--jobs", "two"], ["--shard", "4/3"], ["--shard", "0/3"], ["--shard", "1"]):
        with pytest.raises(SystemExit):
            cli.main(["compile-check", *bad])
        assert "expected" in capsys.readouterr().err, bad
