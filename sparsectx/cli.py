"""The ``sparsectx`` command: ``sparsectx info``, ``sparsectx bench``, ``sparsectx report`` and
``sparsectx compile-check``."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _info(_args) -> int:
    import torch

    from . import __version__
    from .ops import backend_for

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - platform without triton
        triton_version = "not installed"
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except Exception:  # pragma: no cover
        diffusers_version = "not installed"
    from .benchmarks import host_cpu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else host_cpu()  # (platform.processor() is often empty)
    rows = [
        ("sparsectx", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("diffusers", diffusers_version),
        ("device", f"{device} ({name})"),
    ]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        path = backend_for(device, dtype)
        rows.append((f"ops path, {str(dtype).replace('torch.', '')}", path))
    from .benchmarks import check_autotune_setting  # (a value the kernels refuse: exit 2, naming it)

    tuned = check_autotune_setting("sparsectx info")
    rows.append(("autotune", "every candidate timed (SPARSECTX_AUTOTUNE unset or true)" if tuned else
                 "off: each launch takes the first candidate the GPU can run (SPARSECTX_AUTOTUNE false)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args) -> int:
    from . import benchmarks

    return benchmarks.main(args)


def _compile_check(args) -> int:
    from . import compile_check

    return compile_check.main(args)


def _report(args) -> int:
    from . import benchmarks

    return benchmarks.report(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsectx", description="Sparse Context kernels for diffusion transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, and which path (Triton GPU / interpreter / torch) ops take")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks against the peers users would otherwise use, as a table")
    try:
        from . import benchmarks

        benchmarks.add_arguments(bench)
    except ImportError:  # pragma: no cover
        pass
    bench.set_defaults(func=_bench)
    report = sub.add_parser("report", help="`sparsectx bench --json` files as markdown tables for bench/RESULTS.md, "
                                           "or as a short summary with the issues' targets")
    report.add_argument("json_paths", metavar="BENCH_JSON", nargs="+",
                        help="one run, or the parts of one run (merged in order; missing parts are skipped)")
    report.add_argument("--summary", action="store_true",
                        help="a few lines: one per shape with each peer's ratio, then each target met or missed")
    report.add_argument("--merged", metavar="PATH", help="also write the merged run as one JSON file")
    report.set_defaults(func=_report)
    check = sub.add_parser("compile-check", help="compile every Triton kernel for an NVIDIA arch on this machine (no "
                                                 "GPU needed): compile errors, registers, spills, shared memory")
    from . import compile_check

    compile_check.add_arguments(check)
    check.set_defaults(func=_compile_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # stdout closed early (``sparsectx bench | head``): no traceback, and no further writes
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor (io.UnsupportedOperation is both)
            pass
        print("sparsectx: stdout was closed before the command finished; its output is incomplete", file=sys.stderr)
        return 1


def console() -> int:
    """The ``sparsectx`` command: ``main``, with a refused option that the command itself finds (``UsageError``)
    printed and exit status 2, argparse's own for a usage error, so that 1 keeps one meaning: a check FAILED."""
    from .benchmarks import UsageError  # (main's parser imports it too)

    try:
        return main()
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
