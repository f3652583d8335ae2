"""Launch-configuration sweep of the attention kernels on a GPU, against cuDNN and FA2 measured in the same run.

Every forward configuration (the autotune candidates and a few more shapes) is forced one at a time, at issue 4's
single-sample shapes (H=24, D=128, bf16), own keys only ("compacted"), with the reference keys gathered by index
("gathered": the launcher copies the kept rows into packed ones first at head dims up to 128) and the same from a
head-major buffer, which the forward gathers in place ("gathered in place"); each is checked against an fp32
reference (flash-attention criterion against cuDNN's bf16 error) before it is timed. Then the backward kernels'
configurations at the training shape (H=32). Other builds of the forward kernel can be compared in the same run with
``--variant name=path/to/module.py`` (a module with the launcher ``attention_forward`` and the autotuners
``FWD_TUNERS`` of ``sparsectx.kernels.attention``).

Usage (on the GPU machine, the package installed):  python bench/sweep_attention.py [--variant a=x.py] [--out DIR]
Writes ``sweep.json`` under ``--out`` (default ``$OUT`` or ``.``) and prints a table per shape, best first.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sparsectx.kernels import attention as shipped

HEADS, DIM, OWN = 24, 128, 4608            # klein: 4096 target + 512 text tokens, 24 heads of 128 (FLUX.1 widths)
# (label, reference tokens in the buffer, kept); kept == 0: no reference
FWD_SHAPES = [("L=4608 (0 ref)", 0, 0), ("L=8704 (1 ref x 100%)", 4096, 4096), ("L=16896 (3 ref x 100%)", 12288, 12288)]
# configurations tried beyond each kernel's candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD_EXTRA = [(128, 128, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 4),
             (128, 128, 8, 1), (64, 64, 8, 3)]
DKDV_EXTRA = [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 32, 4, 3), (16, 64, 4, 3)]
DQ_EXTRA = [(64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3), (32, 64, 4, 3), (64, 128, 4, 2)]
TRAIN_HEADS, TRAIN_OWN, TRAIN_REF = 32, 4608, 4096   # the training case's longest sample (1 ref x 100%)
DTYPE = torch.bfloat16
PEER_BACKENDS = {"sdpa cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa flash": SDPBackend.FLASH_ATTENTION}
EXACT_BACKEND = SDPBackend.EFFICIENT_ATTENTION   # fp32 reference


def load_variant(name, path):
    spec = importlib.util.spec_from_file_location(f"sweep_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_of(shape, pre_hook=None):
    bm, bn, warps, stages = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


def shape_of(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def force(tuner, shape):
    """The autotuner runs ``shape`` only (a single candidate is launched without benchmarking), with the kernel's
    config pre-hook, the one its candidates carry (the forward's sets its tensor descriptors' tile to the block:
    without it they keep a placeholder tile and the kernel refuses to compile)."""
    tuner.configs = [config_of(shape, tuner.configs[0].pre_hook)]
    tuner.cache = {}


DEVICE = "cuda"


def median_ms(fn):
    if DEVICE != "cuda":  # --tiny dry run on the CPU (interpreter): one timed call
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tiny():
    """Dry-run sizes for a CPU with TRITON_INTERPRET=1 (fp16: bf16 is wrong in the interpreter)."""
    global DEVICE, HEADS, DIM, OWN, FWD_SHAPES, TRAIN_HEADS, TRAIN_OWN, TRAIN_REF, DTYPE, PEER_BACKENDS
    global EXACT_BACKEND
    DEVICE, HEADS, DIM, OWN, DTYPE = "cpu", 2, 32, 40, torch.float16
    PEER_BACKENDS = {"sdpa cudnn": SDPBackend.MATH, "sdpa flash": SDPBackend.MATH}
    EXACT_BACKEND = SDPBackend.MATH
    FWD_SHAPES = [("tiny (0 ref)", 0, 0), ("tiny (1 ref)", 50, 30)]
    TRAIN_HEADS, TRAIN_OWN, TRAIN_REF = 2, 40, 30


def fwd_inputs(ref_len, kept, generator):
    """Packed q/k/v of one sample (own tokens + kept reference tokens as queries), the compacted keys, and the
    reference buffer with its sorted kept index (the layout compaction produces)."""
    total = OWN + kept

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE, dtype=DTYPE)

    q, k, v = rnd(total, HEADS, DIM), rnd(total, HEADS, DIM), rnd(total, HEADS, DIM)
    case = dict(q=q, k=k, v=v, total=total)
    if kept:
        ref_k, ref_v = rnd(1, ref_len, HEADS, DIM), rnd(1, ref_len, HEADS, DIM)
        index = torch.randperm(ref_len, generator=generator, device=DEVICE)[:kept].sort().values.to(torch.int32)
        ref_k[0, index.long()] = k[OWN:]
        ref_v[0, index.long()] = v[OWN:]
        case.update(ref_k=ref_k, ref_v=ref_v, index=index)
    return case


def cu(*lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=DEVICE)


def fwd_calls(module, case):
    """{mode: zero-argument forward call} for one shape."""
    q, k, v, total = case["q"], case["k"], case["v"], case["total"]
    scale = 1.0 / math.sqrt(DIM)
    cu_q = cu(total)
    calls = {"compacted": lambda: module.attention_forward(q, k, v, cu_q, cu(total), total, None, None, None, None,
                                                           scale)}
    if "index" in case:
        own_k, own_v, cu_own, cu_ref = k[:OWN], v[:OWN], cu(OWN), cu(case["index"].numel())
        calls["gathered"] = lambda: module.attention_forward(q, own_k, own_v, cu_q, cu_own, total, case["ref_k"],
                                                             case["ref_v"], case["index"], cu_ref, scale)
        # the same values in a head-major buffer: the launcher does not copy its kept rows into packed ones first
        # ("gathered" does at head dims up to 128), so this mode times the forward's loads of gathered rows
        head_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (case["ref_k"], case["ref_v"])]
        calls["gathered in place"] = lambda: module.attention_forward(q, own_k, own_v, cu_q, cu_own, total,
                                                                      *head_major, case["index"], cu_ref, scale)
    return calls


def to_bhsd(t):
    return t.unsqueeze(0).transpose(1, 2)


def peers(case):
    """cuDNN and FA2 on the compacted sequence: {name: (ms, output [L, H, D])}."""
    q, k, v = (to_bhsd(case[n]) for n in ("q", "k", "v"))
    result = {}
    for name, backend in PEER_BACKENDS.items():
        with sdpa_kernel(backend):
            out = sdpa(q, k, v)
            result[name] = (median_ms(lambda: sdpa(q, k, v)), out[0].transpose(0, 1))
    return result


def exact_forward(case):
    q, k, v = (to_bhsd(case[n]).float() for n in ("q", "k", "v"))
    with sdpa_kernel(EXACT_BACKEND):
        return sdpa(q, k, v)[0].transpose(0, 1)


def max_err(a, b):
    return (a.float() - b).abs().max().item()


def sweep_forward(variants, extra_for, log):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    results = []
    for label, ref_len, kept in FWD_SHAPES:
        case = fwd_inputs(ref_len, kept, generator)
        flops = 4.0 * case["total"] ** 2 * HEADS * DIM
        exact = exact_forward(case)
        peer = peers(case)
        bound = 2 * max_err(peer["sdpa cudnn"][1], exact) + 2e-3   # the flash-attention criterion, fp32 reference
        cudnn_ms = peer["sdpa cudnn"][0]
        for name, (ms, out) in peer.items():
            results.append(dict(shape=label, variant=name, mode="compacted", config=None, ms=ms,
                                tflops=flops / ms / 1e9, vs_cudnn=cudnn_ms / ms, err=max_err(out, exact), ok=True))
        for vname, module in variants.items():
            tuner = module.FWD_TUNERS[0]
            saved = (tuner.configs, tuner.cache)
            candidates = [shape_of(c) for c in module.FWD_CONFIGS]
            extra = [s for s in FWD_EXTRA if s not in candidates] if vname in extra_for else []
            try:
                for shape in candidates + extra:
                    force(tuner, shape)
                    for mode, call in fwd_calls(module, case).items():
                        row = dict(shape=label, variant=vname, mode=mode, config=list(shape),
                                   candidate=shape in candidates)
                        try:
                            out, _ = call()
                            row["err"] = max_err(out, exact)
                            row["ok"] = row["err"] <= bound
                            row["ms"] = median_ms(call)
                            row["tflops"] = flops / row["ms"] / 1e9
                            row["vs_cudnn"] = cudnn_ms / row["ms"]
                        except Exception as exc:  # e.g. out of shared memory for this tile
                            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        results.append(row)
                        log(row)
            finally:
                tuner.configs, tuner.cache = saved
        del case, exact, peer
        torch.cuda.empty_cache()
    return results


def sweep_backward(log):
    """The dK/dV and dQ configurations forced one at a time (the other kernel at its first candidate), one sample
    of the training shape, keys gathered from the reference buffer as the drop-training processors pass them."""
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    total = TRAIN_OWN + TRAIN_REF

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE, dtype=DTYPE)

    q, k, v, dout = (rnd(total, TRAIN_HEADS, DIM) for _ in range(4))
    scale = 1.0 / math.sqrt(DIM)
    cu_q, cu_k = cu(total), cu(total)
    out, lse = shipped.attention_forward(q, k, v, cu_q, cu_k, total, None, None, None, None, scale)
    dlse = torch.zeros_like(lse)
    flops = 2.5 * 4.0 * total ** 2 * TRAIN_HEADS * DIM   # backward = 2.5 forward matmul flops

    def call():
        return shipped.attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, total, total, None, None, None,
                                          None, 0, scale)

    qb, kb, vb, dob = (to_bhsd(t).detach().requires_grad_(True) for t in (q, k, v, dout))
    results = []
    with sdpa_kernel(PEER_BACKENDS["sdpa cudnn"]):
        o = sdpa(qb[..., :], kb, vb)
        cudnn_ms = median_ms(lambda: torch.autograd.grad(o, (qb, kb, vb), dob, retain_graph=True))
    results.append(dict(kernel="peer", variant="sdpa cudnn backward", ms=cudnn_ms, tflops=flops / cudnn_ms / 1e9))
    first = {"dkdv": shape_of(shipped.DKDV_CONFIGS[0]), "dq": shape_of(shipped.DQ_CONFIGS[0])}
    tuners = {"dkdv": shipped.DKDV_TUNERS[0], "dq": shipped.DQ_TUNERS[0]}
    saved = {n: (t.configs, t.cache) for n, t in tuners.items()}
    try:
        for kernel, configs, extra in (("dkdv", shipped.DKDV_CONFIGS, DKDV_EXTRA), ("dq", shipped.DQ_CONFIGS,
                                                                                   DQ_EXTRA)):
            candidates = [shape_of(c) for c in configs]
            for shape in candidates + [s for s in extra if s not in candidates]:
                other = "dq" if kernel == "dkdv" else "dkdv"
                force(tuners[other], first[other])
                force(tuners[kernel], shape)
                row = dict(kernel=kernel, config=list(shape), candidate=shape in candidates)
                try:
                    call()
                    row["ms"] = median_ms(call)
                    row["tflops"] = flops / row["ms"] / 1e9
                    row["vs_cudnn"] = cudnn_ms / row["ms"]
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                results.append(row)
                log(row)
    finally:
        for n, t in tuners.items():
            t.configs, t.cache = saved[n]
    return results


def table(rows, keys):
    lines = []
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="name=path of another forward build")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--candidates-only", action="append", default=[], metavar="NAME",
                        help="time this variant at its autotune candidates only")
    parser.add_argument("--skip-backward", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU (export TRITON_INTERPRET=1 first)")
    args = parser.parse_args(argv)
    if not shipped.AUTOTUNE_ALL:  # (the untimed launch would run each kernel's first config, whatever is forced)
        sys.exit("sweep_attention forces each config through the kernels' autotuners: run it without "
                 "SPARSECTX_AUTOTUNE=0")
    if args.tiny:
        tiny()
    elif not torch.cuda.is_available():
        sys.exit("sweep_attention needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1)")
    else:
        def allocate(size, alignment, stream):  # scratch for kernels that build tensor descriptors on the device
            return torch.empty(size, device="cuda", dtype=torch.int8)

        triton.set_allocator(allocate)
    variants = {"shipped": shipped}
    for item in args.variant:
        name, _, path = item.partition("=")
        variants[name] = load_variant(name, path)
    started = time.time()

    def log(row):
        print(f"[{time.time() - started:6.1f}s] " + json.dumps(row), flush=True)

    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("SPARSECTX_COMMIT", "?"),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report["forward"] = sweep_forward(variants, {n for n in variants if n not in args.candidates_only}, log)
    if not args.skip_backward:
        report["backward"] = sweep_backward(log)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"##### sweep {report['device']} torch {report['torch']} triton {report['triton']} "
          f"commit {report['commit']} ({time.time() - started:.0f} s)")
    for label, _, _ in FWD_SHAPES:
        for mode in ("compacted", "gathered", "gathered in place"):
            rows = [r for r in report["forward"] if r["shape"] == label and r["mode"] == mode and "ms" in r]
            if not rows:
                continue
            rows.sort(key=lambda r: r["ms"])
            print(f"--- forward {label} {mode} (best first; vs_cudnn > 1: faster than cuDNN)")
            print(table(rows[:8], ["variant", "config", "ms", "tflops", "vs_cudnn", "ok"]))
    if "backward" in report:
        for kernel in ("dkdv", "dq"):
            rows = sorted((r for r in report["backward"] if r.get("kernel") == kernel and "ms" in r),
                          key=lambda r: r["ms"])
            print(f"--- backward ({kernel} forced, the other at its first candidate), L={TRAIN_OWN + TRAIN_REF} "
                  f"H={TRAIN_HEADS}; cudnn fwd+bwd-graph backward {report['backward'][0]['ms']:.3f} ms")
            print(table(rows[:6], ["config", "candidate", "ms", "tflops"]))
    failed = [r for r in report["forward"] if r.get("ok") is False]
    print(f"{len(failed)} forward runs failed the accuracy check: "
          + ", ".join(f"{r['variant']} {r['config']} {r['mode']}" for r in failed[:10]))


if __name__ == "__main__":
    main()
