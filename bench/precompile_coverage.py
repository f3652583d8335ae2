"""Which kernel binaries the benchmarks would still build on a GPU after ``sparsectx compile-check --quick``: an
offline check, no GPU needed (Triton's NVIDIA backend compiles for sm_90 on any machine).

Each case of ``sparsectx bench`` (default: every case) runs sparsectx's own implementations (the rows named
``sparsectx...`` and the breakdown's) at the case's full shapes, with one layer of each kind in its model and a
target of 8 x 8 tokens and 32 text tokens (no kernel's binary depends on those counts), with every Triton launch
compiled for the arch instead of run (``compile_check._compile_only``), against a copy of a Triton cache that
compile-check filled. The binaries each case added to its copy are the ones its first launches would build on the
GPU, in the bench step's time (each step is a process of its own, and ``bench/gpu_check.sh`` builds the
``--quick`` kernels ahead).

How the CPU stands in for the GPU: the ops take their kernels for CPU tensors; the cases compute in bf16, their
dtype on a GPU; a compaction's index and lengths, which a launch that only compiles leaves unwritten, are the
reference's values, so that the code after it sees valid lengths; FLUX's RoPE-table check, which runs on CPU ids
(the torch reference on a GPU machine), is taken as passed. Every other kernel output is left unwritten: the values
are garbage, the shapes are right. A case whose own code fails on such values is listed with its error.

Usage: python bench/precompile_coverage.py [--cache DIR] [--case NAME]... [--quick] [--arch 90] [--jobs N]
[--json PATH]. The cache must come from the same Triton release (its keys depend on it); without ``--cache`` it is
built first in a temporary directory (``compile-check --quick``, about 100 s in two processes on a 2-core CPU). The
``pipeline`` case runs its VAE at the full size: it had not finished after 13 minutes on such a CPU (a case gets 15).
Exit status: 0 when no case built a binary, 1 when one did or a case failed, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

LAYER_KEYS = ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers")  # one layer of each kind
TARGET_SIDE, TEXT_TOKENS = 8, 32  # a small target and text: the models' own layers compute, the kernels only build
CHILD_TIMEOUT_S = 900


def _stand_in_for_the_gpu() -> None:
    """The patches the module docstring lists (in the child process that runs a case)."""
    import torch

    from sparsectx import benchmarks, ops, processors, reference
    from sparsectx.kernels import compaction as kernels_compaction

    ops._use_triton = lambda t: True
    processors._tables_match = lambda pos_embed: True
    benchmarks._dtype_for = lambda device: torch.bfloat16
    launch = kernels_compaction.compact_index

    def compact_index(selection, counts=None, n_rows=None):
        launch(selection, counts, n_rows)  # built or loaded, not run
        keep = selection if counts is None else reference.topk_keep_mask(selection, list(counts))
        index, cu_seqlens, _ = reference.compact_ref(keep)
        if n_rows is not None:  # (the kernel's contract: n_rows rows, zeros past the kept total)
            index = torch.cat([index[:n_rows], index.new_zeros(max(n_rows - index.numel(), 0))])
        return index, cu_seqlens

    kernels_compaction.compact_index = compact_index


def run_case(name: str, arch: int, quick: bool = False) -> dict:
    """Child process: runs case ``name``'s own implementations with compile-only launches (see the module docstring);
    returns the kernels launched and each implementation's outcome."""
    import torch

    from sparsectx import benchmarks, compile_check

    _stand_in_for_the_gpu()
    for value in vars(benchmarks).values():  # the full size's model configs (one layer of each kind) and presets
        if isinstance(value, benchmarks.ModelFamily):
            value.configs["coverage"] = {k: (1 if k in LAYER_KEYS else v) for k, v in value.configs["full"].items()}
        elif isinstance(value, dict) and {"full", "tiny"} <= set(value):
            value["coverage"] = value["full"]
    case = benchmarks.CASES[name]
    size = dict(case.sizes["full"])
    for key, value in (("target_side", TARGET_SIDE), ("text", TEXT_TOKENS)):
        if isinstance(size.get(key), int):
            size[key] = value
    case.sizes["coverage"] = size
    launches = collections.Counter()
    outcomes = []

    def record(fn, kwargs, compiled, seconds, candidate, error):
        launches[fn.__name__ if error is None else f"{fn.__name__} (compile error: {error!r})"[:300]] += 1

    with compile_check._compile_only(arch, record):
        for config in case.configs("coverage", quick=quick):
            try:
                workload = case.build(config, "coverage", torch.device("cpu"))
            except Exception as exc:
                outcomes.append([case.label(config), "(build)", f"{type(exc).__name__}: {exc}"[:300]])
                continue
            for impl in workload.impls:
                if not impl.ours or impl.fn is None or impl.skip:
                    continue
                try:
                    with impl.scope() if impl.scope else contextlib.nullcontext():
                        impl.fn()
                    outcome = ""
                except Exception as exc:
                    outcome = f"{type(exc).__name__}: {exc}"[:300]
                outcomes.append([case.label(config), impl.name, outcome])
    return dict(launches=dict(launches), outcomes=outcomes)


def _binaries(cache: str) -> dict:
    """Kernel name per binary directory of a Triton cache (the directories holding a ``.cubin``)."""
    found = {}
    for entry in os.listdir(cache):
        for file in os.listdir(os.path.join(cache, entry)):
            if file.endswith(".cubin"):
                found[entry] = file[:-len(".cubin")]
    return found


def check_case(name: str, cache: str, arch: int, scratch: str, quick: bool = False) -> dict:
    """Runs ``name`` in a child process over a linked copy of ``cache`` (Triton writes new files, never rewrites
    one); returns its launches, outcomes and the binaries it added."""
    copy = os.path.join(scratch, f"cache-{name}")
    shutil.copytree(cache, copy, copy_function=os.link)
    before = set(_binaries(copy))
    start = time.time()
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--arch", str(arch)]
                              + (["--quick"] if quick else []),
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              env={**os.environ, "TRITON_CACHE_DIR": copy, "TRITON_INTERPRET": "0"})
        lines = done.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if done.returncode == 0 and lines else dict(
            launches={}, outcomes=[["", "(child process)", f"exit {done.returncode}: {done.stderr[-600:]}"]])
    except subprocess.TimeoutExpired:
        result = dict(launches={}, outcomes=[["", "(child process)", f"timed out after {CHILD_TIMEOUT_S} s"]])
    added = _binaries(copy)
    result["built"] = sorted(kernel for entry, kernel in added.items() if entry not in before)
    result["seconds"] = round(time.time() - start, 1)
    shutil.rmtree(copy, ignore_errors=True)
    return result


def _fill_cache(cache: str, arch: int, jobs: int) -> None:
    subprocess.run([sys.executable, "-m", "sparsectx.cli", "compile-check", "--arch", str(arch), "--quick", "--jobs",
                    str(jobs)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_INTERPRET": "0"})


def _table(results: dict) -> str:
    rows = ["| case | launches | binaries built | implementations that failed |", "|---|---|---|---|"]
    for name, r in results.items():
        built = ", ".join(f"{kernel} x{count}" for kernel, count in sorted(collections.Counter(r["built"]).items()))
        failed = "; ".join(f"{label} {impl}: {why}" for label, impl, why in r["outcomes"] if why)
        rows.append(f"| {name} | {sum(r['launches'].values())} | {built or 'none'} | {failed or 'none'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="a Triton cache compile-check filled with this Python's Triton (its keys "
                                        "depend on the release; default: one built first)")
    parser.add_argument("--case", action="append", help="a bench case (repeatable; default: every case)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--jobs", type=int, default=2, help="compile-check's processes when it builds the cache")
    parser.add_argument("--quick", action="store_true", help="each case's --quick configs only")
    parser.add_argument("--json", help="also write the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args.arch, args.quick)))
        return 0
    from sparsectx.benchmarks import CASES

    cases = args.case or list(CASES)
    unknown = [name for name in cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; the cases: {', '.join(CASES)}")
    if args.cache is not None and not os.path.isdir(args.cache):
        parser.error(f"--cache {args.cache} is not a directory")
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache
        if cache is None:
            cache = os.path.join(scratch, "compile-check")
            print(f"building the cache: sparsectx compile-check --arch {args.arch} --quick --jobs {args.jobs}",
                  file=sys.stderr)
            _fill_cache(cache, args.arch, args.jobs)
        results = {}
        for name in tqdm(cases, desc="cases", unit="case", file=sys.stderr):
            results[name] = check_case(name, cache, args.arch, scratch, args.quick)
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = any(r["built"] or any(why for *_, why in r["outcomes"]) for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
