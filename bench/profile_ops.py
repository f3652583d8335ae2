"""Torch-profiler tables of the ops whose targets the benchmarks miss, to find where their time goes (a diagnosis
tool beside ``sparsectx bench``; it times nothing the issues judge).

Sections (``--section``, default all, in this order: ``norm_rope``, ``compaction``, ``masked``, ``probe``,
``selection``):
- ``compaction``: ``compact_tokens(scores, hidden, ids, budget)`` at issue 3's shape (B=1, 3 x 4096 tokens, C=3072,
  keep 10%): the CUDA time of each kernel, then the selection kernel's time at each warp count it could launch with
  and at each candidate block of its filter (0: no filter; ``_select_config`` forced; the index it writes is
  checked against the shipped configuration's), on uniform scores and on scores of one value (where the filter's
  range never narrows).
- ``selection``: ``select`` with the ``subject`` selector and an adaptive budget at 3 references (issue 6's worst
  row): kernel count, CUDA time and host time per call.
- ``probe``: the drop-in's automatic attention probe on the FLUX.2-klein-9B architecture (random weights, 3
  references of 64 x 64 tokens): the ops with the most CUDA time and the most host time.
- ``masked``: ``masked_attention`` with query skipping at issue 4's shape (3 references x 4096 tokens kept at 5%,
  S=16896, H=24, D=128, bf16: the kept-queries rows of ``sparsectx bench --case masked``), without and with
  ``kept_prefix``, then the all-queries form with inputs that require grad: per-call times and the kernels with the
  most CUDA time (where the 2x to the ideal went).
- ``norm_rope``: ``rms_norm_rope``'s forward and backward kernels at a klein-9B layer's q (512 text + 5325 image
  tokens, 32 heads of 128, bf16): per-call times and a profiler table, then the op's forward + backward through
  autograd (the bench's ``norm_rope`` fwd+bwd row, slower than diffusers' eager code on 2026-11-30: its host and
  CUDA time per call), then each tile shape (tokens x heads per program, warps; chosen by arithmetic in
  ``kernels/norm_rope.py``): GB/s of the fewest bytes, and the largest difference to the shipped tiles' result.

Usage: ``python bench/profile_ops.py [--section NAME]... [--out DIR] [--tiny]``; writes ``profile_ops.txt`` (and
prints it). ``--tiny`` (and any machine without CUDA) runs the small shapes on the CPU: a dry run of the script,
without the CUDA tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

# most wanted first: gpu_check.sh runs the script last in part 1, under what is left of its budget
SECTIONS = ("norm_rope", "compaction", "masked", "probe", "selection")
# (tokens, heads per program, warps) tried by the norm_rope section; the first is the shipped one
NORM_ROPE_TILES = ((8, 4, 8), (4, 4, 4), (16, 4, 8), (8, 8, 8), (8, 2, 4), (16, 8, 8), (32, 1, 8), (4, 8, 8))
ROWS = 18  # rows of each profiler table


def _per_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time per call, back to back (host work included): the benchmarks' ``loop_ms`` (after a warm-up call)."""
    from sparsectx.benchmarks import loop_ms

    fn()
    return loop_ms(fn, device, quick=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profile(fn: Callable[[], object], calls: int, sort_by: tuple) -> str:
    """Profiler tables of ``calls`` calls of ``fn`` (after one warm-up call), one table per sort key."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync()
    averages = prof.key_averages()
    tables = []
    for key in sort_by:
        if "cuda" in key and not torch.cuda.is_available():
            continue
        tables.append(f"sorted by {key} ({calls} calls):\n{averages.table(sort_by=key, row_limit=ROWS)}")
    return "\n".join(tables)


def compaction_section(tiny: bool, device: torch.device) -> str:
    from sparsectx import ops
    from sparsectx.kernels import compaction as kernels

    n_tokens, width = (3 * 64, 48) if tiny else (3 * 4096, 3072)
    count = (n_tokens + 5) // 10
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(1, n_tokens, generator=gen, device=device)
    hidden = torch.randn(1, n_tokens, width, generator=gen, device=device).to(torch.bfloat16 if not tiny
                                                                                else torch.float16)
    ids = torch.randint(0, 64, (1, n_tokens, 4), generator=gen, device=device)
    call = lambda: ops.compact_tokens(scores, hidden, ids, budget=count)  # noqa: E731
    lines = [f"compact_tokens: B=1, N={n_tokens}, C={width}, keep {count}: "
             f"{_per_call_ms(call, device):.4f} ms per call back to back",
             _profile(call, 20 if not tiny else 2, ("self_cuda_time_total", "self_cpu_time_total"))]
    if not torch.cuda.is_available():
        return "\n".join(lines)
    # the selection kernel alone at each warp count and each candidate block of its filter (0: no filter); its
    # block is fixed by the row length. Scores of one value too: the filter's range never narrows there, its worst
    # case
    shipped = kernels._select_config
    shipped_config = shipped(n_tokens)
    block, shipped_warps, shipped_cands = shipped_config
    spread_variants = [(warps, shipped_cands) for warps in (4, 8, 16, 32)]
    spread_variants += [(shipped_warps, cands) for cands in (0, block // 32, block // 8, block // 4)]
    tied_variants = [(shipped_warps, shipped_cands), (shipped_warps, 0)]
    try:
        for name, row, variants in (("uniform scores", scores, spread_variants),
                                    ("one value", torch.zeros_like(scores), tied_variants)):
            kernels._select_config = shipped
            expected = kernels.compact_index(row, [count])[0].clone()
            for warps, cands in variants:
                kernels._select_config = lambda n, w=warps, c=cands: (block, w, c)
                got = kernels.compact_index(row, [count])[0]
                same = "same index" if torch.equal(got, expected) else "INDEX DIFFERS"
                us = _graph_us(lambda: kernels.compact_index(row, [count]))  # reads _select_config at each call
                mark = " (shipped)" if (block, warps, cands) == shipped_config else ""
                lines.append(f"selection kernel, {name}, BLOCK_N={block}, {warps} warps, CAND_BLOCK={cands}{mark}: "
                             f"{us:.2f} us per launch (CUDA graph of 20 launches), {same}")
    finally:
        kernels._select_config = shipped
    return "\n".join(lines)


def _graph_us(fn: Callable[[], object], launches: int = 20, replays: int = 10) -> float:
    """Microseconds per call of ``fn`` captured ``launches`` times in a CUDA graph, replayed ``replays`` times."""
    for _ in range(5):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    events[0].record()
    for _ in range(replays):
        graph.replay()
    events[1].record()
    torch.cuda.synchronize()
    return events[0].elapsed_time(events[1]) * 1e3 / (launches * replays)


def selection_section(tiny: bool, device: torch.device) -> str:
    from sparsectx.benchmarks import SelectionCase

    case = SelectionCase()
    workload = case.build((3, "subject"), "tiny" if tiny else "full", device)
    lines = []
    for impl in workload.impls:
        if impl.name not in ("select, fixed 10%", "select, adaptive"):
            continue
        lines.append(f"{workload.shape}, {impl.name}: {_per_call_ms(impl.fn, device):.4f} ms per "
                     "call back to back")
        lines.append(_profile(impl.fn, 5 if not tiny else 1, ("self_cuda_time_total", "cpu_time_total")))
    return "\n".join(lines)


def probe_section(tiny: bool, device: torch.device) -> str:
    from sparsectx.benchmarks import EndToEndCase

    case = EndToEndCase()
    workload = case.build((3, 0.05, case.BREAKDOWN), "tiny" if tiny else "full", device)
    probe = next(impl for impl in workload.impls if impl.name.startswith("(e) attention probe"))
    return "\n".join([f"{workload.shape}: {probe.name}: {_per_call_ms(probe.fn, device):.4f} ms per "
                      "call back to back",
                      _profile(probe.fn, 5 if not tiny else 1, ("self_cuda_time_total", "cpu_time_total",
                                                               "count"))])


def masked_section(tiny: bool, device: torch.device) -> str:
    from sparsectx.benchmarks import MaskedCase

    case, size = MaskedCase(), "tiny" if tiny else "full"
    wanted = {"kept-queries": ("sparsectx masked_attention (query_mask)",
                               "sparsectx masked_attention (query_mask, kept_prefix)",
                               "ideal: sdpa on compacted queries and keys"),
              "all-queries": ("sparsectx masked_attention (autograd: gathered)", "ideal: sdpa on compacted keys")}
    lines = []
    for config, names in wanted.items():
        workload = case.build(config, size, device)
        for impl in workload.impls:
            if impl.name not in names:
                continue
            lines.append(f"{workload.shape}, {impl.name}: {_per_call_ms(impl.fn, device):.4f} ms per call back "
                         "to back")
            if not impl.name.startswith("ideal"):
                lines.append(_profile(impl.fn, 5 if not tiny else 1, ("self_cuda_time_total", "cpu_time_total")))
    return "\n".join(lines)


def norm_rope_section(tiny: bool, device: torch.device) -> str:
    from sparsectx import ops
    from sparsectx.kernels import norm_rope as kernels

    n_text, n_image, heads, dim = (8, 64, 2, 32) if tiny else (512, 4096 + 1229, 32, 128)
    dtype = torch.float16 if tiny else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    text, image, dy = (torch.randn(1, n, heads, dim, generator=gen, device=device).to(dtype)
                       for n in (n_text, n_image, n_text + n_image))
    weights = [(1 + 0.1 * torch.randn(dim, generator=gen, device=device)).to(dtype) for _ in range(2)]
    angles = torch.rand(n_text + n_image, dim // 2, generator=gen, device=device) * 100
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    segments = [(text, weights[0]), (image, weights[1])]
    elements = (n_text + n_image) * heads * dim
    moved = {"forward": 2 * elements * dtype.itemsize + 2 * cos.numel() * 4,
             "backward": 3 * elements * dtype.itemsize + 2 * cos.numel() * 4}
    calls = {"forward": lambda: kernels.rms_norm_rope(segments, cos, sin, 1e-6),
             "backward": lambda: kernels.rms_norm_rope_backward(dy, segments, cos, sin, 1e-6)}
    lines = [f"text {n_text} + image {n_image} tokens, H={heads}, D={dim}, {dtype}, fp32 tables"]
    path = "the launcher"
    if ops.backend_for(device, dtype) == ops.TORCH_REFERENCE:  # a CPU dry run without the interpreter: no kernel
        path = "the op's torch reference path: the kernels can not run here"
        calls = {"forward": lambda: ops.rms_norm_rope(image, cos, sin, weights[1], 1e-6, prefix=text,
                                                      prefix_weight=weights[0])}
    lines += [f"{name} ({path}): {_per_call_ms(call, device):.4f} ms per call back to back"
              for name, call in calls.items()]
    lines.append(_profile(lambda: [call() for call in calls.values()], 20 if not tiny else 2,
                          ("self_cuda_time_total", "self_cpu_time_total")))
    # the op through autograd, as the bench's fwd+bwd row times it (x, prefix and both weights require grad)
    leaves = [t.detach().requires_grad_(True) for t in (image, text, weights[1], weights[0])]

    def op_forward_backward():
        out = ops.rms_norm_rope(leaves[0], cos, sin, leaves[2], 1e-6, prefix=leaves[1], prefix_weight=leaves[3])
        return torch.autograd.grad(out, leaves, dy)

    lines.append(f"op forward + backward through autograd: {_per_call_ms(op_forward_backward, device):.4f} ms per "
                 "call back to back")
    lines.append(_profile(op_forward_backward, 10 if not tiny else 1, ("self_cuda_time_total", "cpu_time_total")))
    if not torch.cuda.is_available():
        return "\n".join(lines + ["(tile sweep: CUDA only)"])
    shipped = (kernels.BLOCK_TOKENS, kernels.HEAD_BLOCK, kernels.NUM_WARPS)
    try:
        for name, call in calls.items():
            expected = None
            for tokens, head_block, warps in NORM_ROPE_TILES:
                kernels.BLOCK_TOKENS, kernels.HEAD_BLOCK, kernels.NUM_WARPS = tokens, head_block, warps
                result = call()
                result = result if isinstance(result, torch.Tensor) else result[1][0]  # backward: the image's dx
                expected = result.clone() if expected is None else expected
                diff = (result.float() - expected.float()).abs().max().item()
                us = _graph_us(call)
                mark = " (shipped)" if (tokens, head_block, warps) == shipped else ""
                lines.append(f"{name}, {tokens} tokens x {head_block} heads, {warps} warps{mark}: {us:.2f} us, "
                             f"{moved[name] / us / 1e3:.0f} GB/s, max |difference| to the first row {diff:.3g}")
    finally:
        kernels.BLOCK_TOKENS, kernels.HEAD_BLOCK, kernels.NUM_WARPS = shipped
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", action="append", choices=SECTIONS)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a dry run)")
    args = parser.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()  # no CUDA device: the dry run (as sparsectx bench does)
    device = torch.device("cpu" if tiny else "cuda")
    builders = {"compaction": compaction_section, "selection": selection_section, "probe": probe_section,
                "masked": masked_section, "norm_rope": norm_rope_section}
    report = []
    os.makedirs(args.out, exist_ok=True)
    for name in args.section or SECTIONS:
        started = time.perf_counter()
        try:
            text = builders[name](tiny, device)
        except Exception as exc:  # one section's failure must not lose the others
            text = f"FAILED: {type(exc).__name__}: {exc}"
        report.append(f"##### {name} ({time.perf_counter() - started:.1f} s)\n{text}\n")
        print(report[-1], flush=True)
        # rewritten after every section: a run cut by its timeout keeps the sections it finished
        with open(os.path.join(args.out, "profile_ops.txt"), "w") as f:
            f.write("\n".join(report))
    return 1 if any("\nFAILED: " in part for part in report) else 0


if __name__ == "__main__":
    sys.exit(main())
