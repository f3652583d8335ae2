"""rms_norm_rope (FLUX attention's QK RMS norm, text/image join and rotary embedding) against the fp64 reference,
with the flash-attention criterion.

Criterion: the error of the op against the float64 reference is at most twice the error that PyTorch itself makes
in the same dtype (``reference.rms_norm_rope_ref`` on the inputs as given, or diffusers' own sequence of modules)
plus a small absolute term. The exact answer takes the tables as the op reads them (rounded to fp32, as the
reference does for fp16/bf16/fp32 inputs) and ``eps`` as the op resolves it (None: ``torch.finfo(x.dtype).eps``).
Inputs are random; the kernel's output starts poisoned (tests/conftest.py), so an unwritten element fails.
"""
import math

import numpy
import pytest
import torch

from sparsectx import ops
from sparsectx import reference as ref
from sparsectx.ops import rms_norm_rope

try:  # imported here, in the suite's mode, so that conftest's poisoning fixture patches it from the first test on
    from sparsectx.kernels import norm_rope as kernel_module
except ImportError:  # no triton: every call takes the reference
    kernel_module = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# bf16 on the CPU: the interpreter patched to compute it as a GPU does (tests/bf16_interpreter.py)
DTYPES_HERE = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.bf16_kernels)]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _random_tables(rows, dim, gen, dtype=torch.float32):
    """cos/sin of an independent random angle per feature: the two entries of a pair differ (FLUX's repeat them)."""
    angles = torch.rand(rows, dim, generator=gen, dtype=torch.float64) * (2 * math.pi)
    return angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)


def _inputs(shape, dtype, seed, weight=True, prefix_weight=True, table_dtype=torch.float32, scale=1.0):
    """``shape = (B, S0, S, H, D)``; S0 None: no prefix (S0 = 0: an empty prefix tensor)."""
    batch, n_prefix, seq, heads, dim = shape
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size):
        return (scale * torch.randn(*size, generator=gen)).to(DEVICE, dtype)

    cos, sin = _random_tables((n_prefix or 0) + seq, dim, gen, table_dtype)
    return dict(
        x=rnd(batch, seq, heads, dim), cos=cos, sin=sin,
        weight=torch.randn(dim, generator=gen).to(DEVICE, dtype) if weight else None,
        prefix=rnd(batch, n_prefix, heads, dim) if n_prefix is not None else None,
        prefix_weight=torch.randn(dim, generator=gen).to(DEVICE, dtype) if prefix_weight and n_prefix is not None
        else None)


def _call(args, eps=None):
    return rms_norm_rope(args["x"], args["cos"], args["sin"], args["weight"], eps, prefix=args["prefix"],
                         prefix_weight=args["prefix_weight"])


def _default_eps(dtype):
    """torch.nn.RMSNorm's eps when given None: the epsilon of its computation dtype (fp32 for fp16/bf16/fp32, see
    torch's ``_fused_rms_norm`` decomposition; ``test_torch_rmsnorm_default_eps`` checks it), not x's own."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def _exact(args, eps=None):
    """The float64 reference on the values the op reads: the tables rounded to fp32 like the reference in x's
    dtype rounds them (``promote_types(dtype, fp32)``), eps None resolved as torch.nn.RMSNorm resolves it for x's
    dtype (not float64's)."""
    dtype = args["x"].dtype
    wide = torch.promote_types(dtype, torch.float32)
    eps = _default_eps(dtype) if eps is None else eps

    def double(t):
        return None if t is None else t.double()

    return ref.rms_norm_rope_ref(args["x"].double(), args["cos"].to(wide).double(), args["sin"].to(wide).double(),
                                 double(args["weight"]), eps, double(args["prefix"]), double(args["prefix_weight"]))


def _assert_criterion(name, got, args, eps=None, same_dtype=None):
    """``same_dtype``: PyTorch's result in x's dtype to measure against (default: the reference in that dtype)."""
    x, prefix = args["x"], args["prefix"]
    exact = _exact(args, eps)
    if same_dtype is None:
        same_dtype = ref.rms_norm_rope_ref(x, args["cos"], args["sin"], args["weight"], eps, prefix,
                                           args["prefix_weight"])
    n_prefix = 0 if prefix is None else prefix.shape[1]
    assert got.shape == (x.shape[0], n_prefix + x.shape[1], *x.shape[2:]), f"{name}: shape {tuple(got.shape)}"
    assert got.dtype == x.dtype, f"{name}: dtype {got.dtype}"
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    baseline = (same_dtype.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert math.isfinite(err), f"{name}: non-finite error (unwritten or NaN output)"
    assert err <= 2 * baseline + ATOL[x.dtype], f"{name}: error {err:.3e} > 2 x torch's {baseline:.3e} + atol"


def _takes_the_kernel(dtype):
    """Whether a call on x of this dtype launches the kernel (float64 always takes the reference)."""
    return (kernel_module is not None and dtype != torch.float64
            and ops.backend_for(DEVICE, dtype) != ops.TORCH_REFERENCE)


# ----------------------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------------------
# name: ((B, S0 (None: no prefix), S, H, D), weight, prefix_weight, eps, table dtype, scale of the activations).
# The kernel takes tokens in blocks of 8 and heads in blocks of 4; head dims are padded to a power of two.
CASES = {
    "no_prefix_no_weight_d2": ((1, None, 7, 1, 2), False, False, 1e-5, torch.float32, 1.0),
    "prefix_both_weights_d6": ((3, 5, 9, 3, 6), True, True, 1e-6, torch.float32, 1.0),
    "weight_without_prefix_weight_d16": ((2, 13, 1, 5, 16), True, False, 1e-6, torch.float32, 1.0),
    "prefix_weight_without_weight_d16": ((1, 9, 7, 3, 16), False, True, 1e-6, torch.float32, 1.0),
    "empty_prefix_d64": ((1, 0, 13, 3, 64), True, True, 1e-6, torch.float32, 1.0),
    "no_image_rows_d64": ((3, 9, 0, 5, 64), True, True, None, torch.float32, 1.0),
    "tails_d128_float64_tables": ((1, 7, 9, 5, 128), True, True, 1e-6, torch.float64, 1.0),
    "multiples_of_the_blocks_fp16_tables": ((2, 8, 16, 4, 16), False, True, 1e-6, torch.float16, 1.0),
    "no_prefix_one_token_d128": ((3, None, 1, 1, 128), True, False, None, torch.float32, 1.0),
    "widest_head_d256": ((1, 2, 3, 2, 256), True, True, None, torch.float32, 1.0),
    "head_dim_40": ((2, 1, 7, 3, 40), True, True, 1e-6, torch.float32, 1.0),
    # mean square ~ x's dtype's epsilon: a wrong eps (for None: another default than _default_eps) shows by O(1)
    "tiny_activations_eps_matters": ((2, 3, 5, 3, 16), True, True, None, torch.float32, "sqrt_eps"),
    # |x| up to ~1e4: x² overflows fp16 (the statistics must be fp32)
    "huge_activations": ((1, 4, 9, 2, 64), True, True, 1e-6, torch.float32, 2000.0),
}


# the interpreter's tiles, as the module sets them (the fixture below replaces them in this file)
INTERPRETER_TILES = None if kernel_module is None else (kernel_module.INTERPRETER_BLOCK_TOKENS,
                                                         kernel_module.INTERPRETER_TABLE_BLOCK_ROWS)


def _use_tiles(monkeypatch, tokens: int, table_rows: int) -> None:
    monkeypatch.setattr(kernel_module, "INTERPRETER_BLOCK_TOKENS", tokens)
    monkeypatch.setattr(kernel_module, "INTERPRETER_TABLE_BLOCK_ROWS", table_rows)


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    """This file runs the kernels at the GPU's tiles (``BLOCK_TOKENS`` tokens, ``TABLE_BLOCK_ROWS`` table rows per
    program: several programs and partial tiles at its sizes); the rest of the suite runs the interpreter's larger
    ones, which ``test_the_interpreters_tiles_compute_the_same`` checks against them."""
    if kernel_module is not None:
        _use_tiles(monkeypatch, kernel_module.BLOCK_TOKENS, kernel_module.TABLE_BLOCK_ROWS)


@pytest.mark.skipif(kernel_module is None or not ops.interpreter_enabled(), reason="the interpreter's tiles")
@pytest.mark.parametrize("n_prefix", [None, 5])
def test_the_interpreters_tiles_compute_the_same(n_prefix, monkeypatch):
    """The interpreter's tiles (tokens across several of the GPU's tiles in one program, a partial one at the end;
    table rows likewise) give the GPU tiles' output, input gradients and tables bit for bit (the same code, other
    constants), and the weight's gradient up to the order of its partial sums."""
    _use_tiles(monkeypatch, *INTERPRETER_TILES)  # (back from the file's fixture)
    assert INTERPRETER_TILES[0] > 2 * kernel_module.BLOCK_TOKENS
    assert INTERPRETER_TILES[1] > kernel_module.TABLE_BLOCK_ROWS
    tokens = INTERPRETER_TILES[0] + 3 * kernel_module.BLOCK_TOKENS + 5  # 2 of its programs
    prefix = None if n_prefix is None else torch.randn(2, n_prefix, 3, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, tokens, 3, 16, generator=torch.Generator().manual_seed(2))
    n = tokens + (n_prefix or 0)
    cos, sin = (torch.randn(n, 16, generator=torch.Generator().manual_seed(3 + i)) for i in range(2))
    weight = torch.rand(16, generator=torch.Generator().manual_seed(5)) + 0.5
    ids, freqs = _table_inputs(n, (4, 6, 6), torch.int64, torch.float64, seed=6)

    def run():
        xs = [t.clone().requires_grad_(True) for t in (x, prefix) if t is not None]
        w = weight.clone().requires_grad_(True)
        out = rms_norm_rope(xs[0], cos, sin, w, 1e-6, prefix=xs[1] if prefix is not None else None,
                            prefix_weight=w if prefix is not None else None)
        grads = torch.autograd.grad(out, [*xs, w], torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
        return (out.detach(), *grads, *ops.rope_tables(ids, freqs, [4, 6, 6]))

    interpreter = run()
    _use_tiles(monkeypatch, kernel_module.BLOCK_TOKENS, kernel_module.TABLE_BLOCK_ROWS)
    gpu = run()
    for got, want in zip(interpreter[:-3] + interpreter[-2:], gpu[:-3] + gpu[-2:], strict=True):
        assert torch.equal(got, want)
    # the weight's gradient: the programs' partial rows are summed in another order
    torch.testing.assert_close(interpreter[-3], gpu[-3], rtol=1e-5, atol=1e-6)  # (fp32 sums: a few ulps off)


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_float64_reference(name, dtype):
    shape, weight, prefix_weight, eps, table_dtype, scale = CASES[name]
    if scale == "sqrt_eps":
        scale = math.sqrt(torch.finfo(dtype).eps)
    args = _inputs(shape, dtype, seed=len(name), weight=weight, prefix_weight=prefix_weight, table_dtype=table_dtype,
                   scale=scale)
    _assert_criterion(name, _call(args, eps), args, eps)


# eps = 0: the masked-off lanes of a token block (zeros) divide by zero in the interpreter; they are never stored
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_eps_zero_and_numpy_eps():
    """eps = 0 (an int) and a numpy scalar are numbers like any other (the latter as the float it holds)."""
    args = _inputs((2, 3, 6, 3, 16), torch.float32, seed=3)
    _assert_criterion("eps=0", _call(args, 0), args, 0)
    assert torch.equal(_call(args, numpy.float32(1e-3)), _call(args, float(numpy.float32(1e-3))))
    _assert_criterion("eps=1e-3", _call(args, numpy.float32(1e-3)), args, float(numpy.float32(1e-3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_torch_rmsnorm_default_eps(dtype):
    """The premise of ``_default_eps``: torch.nn.RMSNorm(D) (eps None) equals F.rms_norm with the epsilon of the
    computation dtype, at activations whose mean square is near eps (where the choice shows)."""
    x = (math.sqrt(torch.finfo(dtype).eps) * torch.randn(3, 16, generator=torch.Generator().manual_seed(2))).to(
        DEVICE, dtype)
    module = torch.nn.RMSNorm(16).to(DEVICE, dtype)
    assert module.eps is None
    with torch.no_grad():
        assert torch.equal(module(x), torch.nn.functional.rms_norm(x, (16,), module.weight, _default_eps(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_default_eps_is_torch_rmsnorms(dtype):
    """eps None is torch.nn.RMSNorm's default (the docstring's promise, and the reference's meaning of None): the
    op equals diffusers' sequence with ``RMSNorm(D)`` modules built without an eps, at activations whose mean
    square is near x's dtype's epsilon (where a different default changes the result by O(1)). bf16 on the CPU
    takes the reference path."""
    gen = torch.Generator().manual_seed(23)
    batch, n_prefix, seq, heads, dim = 2, 3, 7, 3, 16
    scale = math.sqrt(torch.finfo(dtype).eps)
    norm, prefix_norm = [torch.nn.RMSNorm(dim).to(DEVICE, dtype) for _ in range(2)]
    for module in (norm, prefix_norm):
        module.weight.data = torch.randn(dim, generator=gen).to(DEVICE, dtype)
    cos, sin = _random_tables(n_prefix + seq, dim, gen)
    x = (scale * torch.randn(batch, seq, heads, dim, generator=gen)).to(DEVICE, dtype)
    prefix = (scale * torch.randn(batch, n_prefix, heads, dim, generator=gen)).to(DEVICE, dtype)
    with torch.no_grad():
        theirs = _diffusers_sequence(x, prefix, cos, sin, norm, prefix_norm)
        ours = rms_norm_rope(x, cos, sin, norm.weight, prefix=prefix, prefix_weight=prefix_norm.weight)
        spec = ref.rms_norm_rope_ref(x, cos, sin, norm.weight, None, prefix, prefix_norm.weight)
        # the reference's other norm (diffusers' RMSNorm rounding) takes the same default
        rounded = [ref.rms_norm_rope_ref(x, cos, sin, norm.weight, eps, prefix, prefix_norm.weight, True)
                   for eps in (None, _default_eps(dtype))]
    assert torch.equal(spec, theirs)
    assert torch.equal(*rounded)
    args = dict(x=x, cos=cos, sin=sin, weight=norm.weight.detach(), prefix=prefix,
                prefix_weight=prefix_norm.weight.detach())
    _assert_criterion("eps None", ours, args, None, same_dtype=theirs)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_fp32_weights_with_fp16_activations():
    """Weights of another float dtype than x (fp32 weights of an fp16 model): read as fp32."""
    args = _inputs((2, 5, 9, 3, 32), torch.float16, seed=4)
    args["weight"], args["prefix_weight"] = args["weight"].float() * 1.7, args["prefix_weight"].float() - 0.3
    _assert_criterion("fp32 weights", _call(args, 1e-5), args, 1e-5)


def test_nan_stays_in_its_head_vector():
    """A NaN feature makes its own head vector NaN (its norm is NaN), nothing else: no value leaks between the
    tokens and heads that one program handles."""
    args = _inputs((2, 5, 9, 6, 16), torch.float32, seed=5)
    args["x"][1, 4, 2, 7] = math.nan
    args["prefix"][0, 3, 5, 0] = math.nan
    out, exact = _call(args, 1e-6), _exact(args, 1e-6)
    assert torch.equal(torch.isnan(out), torch.isnan(exact))
    assert torch.isnan(out[1, 5 + 4, 2]).all() and torch.isnan(out[0, 3, 5]).all()
    assert int(torch.isnan(out).sum()) == 2 * 16
    finite = ~torch.isnan(exact)
    same_dtype = ref.rms_norm_rope_ref(args["x"], args["cos"], args["sin"], args["weight"], 1e-6, args["prefix"],
                                       args["prefix_weight"])
    err = (out.double() - exact)[finite].abs().max().item()
    baseline = (same_dtype.double() - exact)[finite].abs().max().item()
    assert err <= 2 * baseline + ATOL[torch.float32], f"error {err:.3e} > 2 x torch's {baseline:.3e} + atol"


# ----------------------------------------------------------------------------------------------------------------
# strided inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_thirds_of_fused_projections_are_read_in_place(dtype):
    """x the q third of a fused image QKV projection, the prefix the k third of the text one (each its own token
    stride): the result of contiguous copies, bit for bit (every head vector is computed alone, the same way)."""
    batch, n_prefix, seq, heads, dim = 2, 5, 11, 3, 16
    gen = torch.Generator().manual_seed(6)
    proj = torch.randn(batch, seq, 3 * heads * dim, generator=gen).to(DEVICE, dtype)
    text_proj = torch.randn(batch, n_prefix, 3 * heads * dim, generator=gen).to(DEVICE, dtype)
    cos, sin = _random_tables(n_prefix + seq, dim, gen)
    args = dict(x=proj[..., :heads * dim].unflatten(-1, (heads, dim)), cos=cos, sin=sin,
                weight=torch.randn(dim, generator=gen).to(DEVICE, dtype),
                prefix=text_proj[..., heads * dim:2 * heads * dim].unflatten(-1, (heads, dim)),
                prefix_weight=torch.randn(dim, generator=gen).to(DEVICE, dtype))
    assert not args["x"].is_contiguous() and args["x"].stride(-1) == 1 and not args["prefix"].is_contiguous()
    out = _call(args, 1e-6)
    _assert_criterion("q third", out, args, 1e-6)
    contiguous = {k: v.contiguous() if v is not None else None for k, v in args.items()}
    assert torch.equal(out, _call(contiguous, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_inputs_without_a_unit_last_stride_and_strided_tables(dtype):
    """x and the prefix with stride(-1) != 1 (transposed views), tables with a row stride of 2D (halves of one
    tensor), transposed or broadcast along the rows (stride 0), weights with stride 2: all right."""
    batch, n_prefix, seq, heads, dim = 2, 3, 9, 5, 8
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, seq, dim, heads, generator=gen).to(DEVICE, dtype).transpose(2, 3)
    prefix = torch.randn(heads, dim, n_prefix, batch, generator=gen).to(DEVICE, dtype).permute(3, 2, 0, 1)
    assert x.shape == (batch, seq, heads, dim) and x.stride(-1) != 1 and prefix.stride(-1) != 1
    angles = torch.rand(n_prefix + seq, dim, generator=gen, dtype=torch.float64) * (2 * math.pi)
    both = torch.cat([angles.cos(), angles.sin()], dim=1).float().to(DEVICE)
    weights = torch.randn(2 * dim, 2, generator=gen).to(DEVICE, dtype)
    args = dict(x=x, cos=both[:, :dim], sin=both[:, dim:], weight=weights[::2, 0], prefix=prefix,
                prefix_weight=weights[1::2, 1])
    assert args["cos"].stride(0) == 2 * dim and args["weight"].stride(0) == 4
    _assert_criterion("row-strided tables", _call(args, 1e-6), args, 1e-6)
    args["cos"] = angles.cos().float().t().contiguous().t().to(DEVICE)  # stride (1, rows)
    assert args["cos"].stride(-1) != 1
    _assert_criterion("transposed cos", _call(args, 1e-6), args, 1e-6)
    args["cos"], args["sin"] = (t[4].expand(n_prefix + seq, dim) for t in (both[:, :dim], both[:, dim:]))
    assert args["cos"].stride(0) == 0
    _assert_criterion("broadcast table rows", _call(args, 1e-6), args, 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# diffusers' sequence: RMSNorm modules, the text/image concatenation, apply_rotary_emb
# ----------------------------------------------------------------------------------------------------------------
def _flux_tables(n_prefix, rows, cols, axes_dim, theta):
    """FLUX.2's rotary tables (diffusers' Flux2PosEmbed: per-pair angles repeated with repeat_interleave(2)): text
    tokens at positions (0, 0, 0, l), image tokens at (0, h, w, 0)."""
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    text_ids = torch.zeros(n_prefix, 4)
    text_ids[:, 3] = torch.arange(n_prefix)
    image_ids = torch.zeros(rows, cols, 4)
    image_ids[..., 1] = torch.arange(rows)[:, None]
    image_ids[..., 2] = torch.arange(cols)[None, :]
    ids = torch.cat([text_ids, image_ids.flatten(0, 1)]).to(DEVICE)
    cos, sin = Flux2PosEmbed(theta=theta, axes_dim=axes_dim)(ids)
    return cos, sin


def _diffusers_sequence(x, prefix, cos, sin, norm, prefix_norm):
    from diffusers.models.embeddings import apply_rotary_emb

    joint = torch.cat([prefix_norm(prefix), norm(x)], dim=1)
    return apply_rotary_emb(joint, (cos, sin), sequence_dim=1)


def _norm_modules(dim, dtype, gen, eps=1e-6):
    modules = [torch.nn.RMSNorm(dim, eps=eps) for _ in range(2)]
    for module in modules:
        module.weight.data = torch.randn(dim, generator=gen)
    return [module.to(DEVICE, dtype) for module in modules]


@pytest.mark.parametrize("tables", ["flux2", "pairs_differ"])
@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_equals_what_diffusers_does(dtype, tables):
    """FLUX.2's attention on q: norm_added_q(text), norm_q(image), torch.cat on the sequence, apply_rotary_emb
    (sequence_dim=1). The reference in x's dtype equals it bit for bit (the same torch operations in the same
    order); the op meets the criterion with diffusers' result as PyTorch's. Weights are Parameters (requires_grad)
    under no_grad, as at inference: the kernel runs."""
    batch, n_prefix, rows, cols, heads, dim = 2, 5, 3, 4, 3, 16
    gen = torch.Generator().manual_seed(8)
    if tables == "flux2":
        cos, sin = _flux_tables(n_prefix, rows, cols, [4, 4, 4, 4], theta=2000)
        assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and not torch.equal(cos[:, 4], cos[:, 6])
    else:  # any table: the first feature of a pair takes cos[2i], sin[2i]; the second cos[2i + 1], sin[2i + 1]
        cos, sin = _random_tables(n_prefix + rows * cols, dim, gen)
        assert not torch.equal(cos[:, 0::2], cos[:, 1::2])
    norm, prefix_norm = _norm_modules(dim, dtype, gen)
    x = torch.randn(batch, rows * cols, heads, dim, generator=gen).to(DEVICE, dtype)
    prefix = torch.randn(batch, n_prefix, heads, dim, generator=gen).to(DEVICE, dtype)
    with torch.no_grad():
        theirs = _diffusers_sequence(x, prefix, cos, sin, norm, prefix_norm)
        ours = rms_norm_rope(x, cos, sin, norm.weight, 1e-6, prefix=prefix, prefix_weight=prefix_norm.weight)
        spec = ref.rms_norm_rope_ref(x, cos, sin, norm.weight, 1e-6, prefix, prefix_norm.weight)
    assert ours.grad_fn is None
    assert torch.equal(spec, theirs)
    args = dict(x=x, cos=cos, sin=sin, weight=norm.weight.detach(), prefix=prefix,
                prefix_weight=prefix_norm.weight.detach())
    _assert_criterion(f"diffusers {tables}", ours, args, 1e-6, same_dtype=theirs)


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_pairs_take_their_own_table_entries(dtype):
    """One-hot tables: cos = e_j, sin = 0 leaves only feature j (the normalised x_j); cos = 0, sin = e_k (k the
    other feature of j's pair) leaves only feature k, equal to x_j when k = j + 1 (rot(x)[2i+1] = x[2i]) and to
    -x_j when k = j - 1 (rot(x)[2i] = -x[2i+1])."""
    args = _inputs((2, 3, 5, 3, 8), dtype, seed=9)
    rows = args["cos"].shape[0]
    for j in (0, 3, 6, 7):
        k = j ^ 1
        one_hot = torch.zeros(rows, 8, device=DEVICE)
        cos_only = dict(args, cos=one_hot.index_fill(1, torch.tensor([j], device=DEVICE), 1.0), sin=one_hot)
        sin_only = dict(args, cos=one_hot, sin=one_hot.index_fill(1, torch.tensor([k], device=DEVICE), 1.0))
        a, b = _call(cos_only, 1e-6), _call(sin_only, 1e-6)
        others = [i for i in range(8) if i != j]
        assert torch.equal(a[..., others], torch.zeros_like(a[..., others])), f"cos = e_{j}: features besides {j}"
        others = [i for i in range(8) if i != k]
        assert torch.equal(b[..., others], torch.zeros_like(b[..., others])), f"sin = e_{k}: features besides {k}"
        assert torch.equal(b[..., k], a[..., j] if k == j + 1 else -a[..., j]), f"pair ({j}, {k})"
        _assert_criterion(f"cos = e_{j}", a, cos_only, 1e-6)
        _assert_criterion(f"sin = e_{k}", b, sin_only, 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------------
def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(10)
    dim = 4
    inputs = [torch.randn(*size, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
              for size in ((1, 3, 2, dim), (5, dim), (5, dim), (dim,), (1, 2, 2, dim), (dim,))]

    def fn(x, cos, sin, weight, prefix, prefix_weight):
        return rms_norm_rope(x, cos, sin, weight, 1e-6, prefix=prefix, prefix_weight=prefix_weight)

    assert torch.autograd.gradcheck(fn, inputs)


def test_an_output_that_does_not_reach_the_loss_gives_no_gradient():
    """An undefined output gradient (a user's autograd.Function returning None for it, as gradcheck's undefined-grad
    check does): x's gradient is what reaches it by other paths (before: the eager backward failed reading None)."""

    class Blocked(torch.autograd.Function):  # gives its first input no gradient
        @staticmethod
        def forward(ctx, y, z):
            return y.detach() * 0 + z

        @staticmethod
        def backward(ctx, grad):
            return None, grad

    gen = torch.Generator().manual_seed(11)
    x, z = (torch.randn(1, 3, 2, 8, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    cos, sin = (torch.randn(3, 8, generator=gen).to(DEVICE) for _ in range(2))
    weight = torch.randn(8, generator=gen).to(DEVICE).requires_grad_()
    (Blocked.apply(rms_norm_rope(x, cos, sin, weight, 1e-6), z) + 2 * x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0)) and weight.grad is None and torch.equal(z.grad,
                                                                                                  torch.ones_like(z))
    x64 = torch.randn(1, 2, 1, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    tables = [torch.randn(2, 4, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda t: rms_norm_rope(t, *tables, None, 1e-6), (x64,))  # undefined grads too


GRAD_CASES = {
    # (B, S0, S, H, D), weight, prefix_weight, per-pair tables
    "prefix_and_weights": ((2, 5, 9, 3, 16), True, True, False),
    "no_prefix_no_weight": ((1, None, 13, 5, 6), False, False, False),
    "empty_prefix_head_dim_128": ((2, 0, 9, 4, 128), True, True, False),
    "qwen_tables_weight_only_on_x": ((3, 4, 7, 1, 8), True, False, True),
}


@pytest.mark.parametrize("dtype", DTYPES_HERE)
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients_meet_the_criterion(case, dtype, monkeypatch):
    """x, prefix and the weights requiring grad (the tables not: FLUX's and Qwen-Image's are made from positions):
    the backward kernel's gradients against the float64 reference's autograd, within twice the error of the
    reference's autograd in x's dtype (plus atol); the kernel ran; a second backward raises."""
    shape, weight, prefix_weight, per_pair = GRAD_CASES[case]
    args = _inputs(shape, dtype, seed=21, weight=weight, prefix_weight=prefix_weight)
    if per_pair:
        args["cos"], args["sin"] = args["cos"][:, ::2], args["sin"][:, ::2]  # strided [S, D/2] views
    upstream = torch.randn((shape[0], (shape[1] or 0) + shape[2], *shape[3:]),
                           generator=torch.Generator().manual_seed(22)).to(DEVICE, dtype)
    _assert_gradients_meet_the_criterion(args, upstream, dtype, monkeypatch)


def _assert_gradients_meet_the_criterion(args, upstream, dtype, monkeypatch, eps=1e-6):
    """Gradients of x, prefix and the weights given (the tables not) for ``upstream``: the op's against the
    float64 reference's autograd, within twice the error of the reference's autograd in x's dtype (plus atol);
    the backward kernel ran where ``backend_for`` says kernels run; a second backward raises."""
    names = [n for n in ("x", "weight", "prefix", "prefix_weight") if args[n] is not None]
    launches = []
    if kernel_module is not None and ops.backend_for(DEVICE, dtype) != ops.TORCH_REFERENCE:
        real = kernel_module.rms_norm_rope_backward
        monkeypatch.setattr(kernel_module, "rms_norm_rope_backward",
                            lambda *a, **k: launches.append(1) or real(*a, **k))

    def reference_grads(wide):
        """Autograd through the reference: in float64 (``wide``) on the op's values, or in x's dtype."""
        cast = (lambda t: t.double()) if wide else (lambda t: t)  # noqa: E731
        tables = [cast(args[t].to(torch.promote_types(dtype, torch.float32)) if wide else args[t])
                  for t in ("cos", "sin")]
        leaves = {n: cast(args[n]).detach().requires_grad_() for n in names}
        values = {n: leaves.get(n, args[n]) for n in ("x", "weight", "prefix", "prefix_weight")}
        out = ref.rms_norm_rope_ref(values["x"], *tables, values["weight"], eps, values["prefix"],
                                    values["prefix_weight"])
        return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], cast(upstream))))

    leaves = {n: args[n].detach().requires_grad_() for n in names}
    values = {n: leaves.get(n, args[n]) for n in ("x", "weight", "prefix", "prefix_weight")}
    out = rms_norm_rope(values["x"], args["cos"], args["sin"], values["weight"], eps, prefix=values["prefix"],
                        prefix_weight=values["prefix_weight"])
    got = dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], upstream, create_graph=True)))
    exact, same = reference_grads(True), reference_grads(False)
    for name in names:
        assert got[name].dtype == args[name].dtype and got[name].shape == args[name].shape, name
        err = (got[name].double() - exact[name]).abs().max().item() if got[name].numel() else 0.0
        baseline = (same[name].double() - exact[name]).abs().max().item() if got[name].numel() else 0.0
        assert math.isfinite(err), f"d{name}: non-finite gradient"
        assert err <= 2 * baseline + ATOL[dtype], f"d{name}: error {err:.3e} > 2 x torch's {baseline:.3e} + atol"
    if kernel_module is not None and ops.backend_for(DEVICE, dtype) != ops.TORCH_REFERENCE:
        assert launches == [1]
    with pytest.raises(NotImplementedError, match="first-order"):
        torch.autograd.grad(got["x"].sum(), leaves["x"])


@pytest.mark.parametrize("dtype", DTYPES_HERE)
def test_gradients_of_an_upstream_without_a_unit_last_stride(dtype, monkeypatch):
    """An output gradient whose head dim is not contiguous (a transposed view, as a permute after the op gives):
    gradients within the criterion (the backward kernel reads dy with a unit feature stride)."""
    args = _inputs((2, 3, 6, 3, 8), dtype, seed=25)
    upstream = torch.randn(2, 9, 8, 3, generator=torch.Generator().manual_seed(26)).to(DEVICE, dtype).transpose(2, 3)
    assert upstream.stride(-1) != 1
    _assert_gradients_meet_the_criterion(args, upstream, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES_HERE)
def test_gradients_of_thirds_of_fused_projections(dtype, monkeypatch):
    """x and prefix read in place as the k thirds of fused QKV projections (token strides of 3·H·D): their
    gradients are new contiguous tensors, each written with its own strides, within the criterion."""
    shape = (2, 5, 11, 3, 16)
    args = _inputs(shape, dtype, seed=33)
    heads, dim = shape[3:]
    for name in ("x", "prefix"):
        fused = torch.zeros(*args[name].shape[:2], 3 * heads * dim, device=DEVICE, dtype=dtype)
        third = fused[..., heads * dim:2 * heads * dim].unflatten(-1, (heads, dim))
        third.copy_(args[name])
        args[name] = third
    assert not args["x"].is_contiguous() and not args["prefix"].is_contiguous()
    upstream = torch.randn(2, 16, heads, dim, generator=torch.Generator().manual_seed(34)).to(DEVICE, dtype)
    _assert_gradients_meet_the_criterion(args, upstream, dtype, monkeypatch)


@pytest.mark.skipif(kernel_module is None, reason="no Triton")
@pytest.mark.parametrize("shape", [(2, 5, 9, 3, 6), (1, None, 0, 2, 8)], ids=["rows_and_features_in_steps", "no_row"])
def test_weight_gradients_summed_in_steps(shape, monkeypatch):
    """The weights' gradients summed from the backward programs' partial rows a few rows and features at a time
    (several steps over the rows, a last feature block past the head dim), and with no row at all (zeros)."""
    monkeypatch.setattr(kernel_module, "REDUCE_ROWS", 2)
    monkeypatch.setattr(kernel_module, "REDUCE_FEATURES", 4)
    dtype = torch.float32
    args = _inputs(shape, dtype, seed=35)
    upstream = torch.randn(shape[0], (shape[1] or 0) + shape[2], *shape[3:],
                           generator=torch.Generator().manual_seed(36)).to(DEVICE, dtype)
    _assert_gradients_meet_the_criterion(args, upstream, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES_HERE)
def test_gradients_take_the_forwards_eps(dtype, monkeypatch):
    """The backward normalises with the forward's eps: 0.5, near these activations' mean square (1), changes every
    gradient by O(1) from what another eps gives."""
    args = _inputs((2, 3, 6, 3, 8), dtype, seed=27)
    upstream = torch.randn(2, 9, 3, 8, generator=torch.Generator().manual_seed(28)).to(DEVICE, dtype)
    _assert_gradients_meet_the_criterion(args, upstream, dtype, monkeypatch, eps=0.5)


def test_backward_formulas_are_the_references_autograd():
    """The explicit gradients (``rms_norm_rope_bwd_ref``, what the backward kernel implements) equal autograd
    through ``rms_norm_rope_ref`` in float64, with and without prefix, weights and per-pair tables."""
    gen = torch.Generator().manual_seed(23)
    for n_prefix, weights, per_pair in ((4, True, False), (None, False, True), (3, False, False)):
        x = torch.randn(2, 6, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        prefix = None if n_prefix is None else torch.randn(2, n_prefix, 3, 8, generator=gen, dtype=torch.float64,
                                                           requires_grad=True)
        weight, prefix_weight = ((torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
                                  for _ in range(2)) if weights else (None, None))
        rows = 6 + (n_prefix or 0)
        cos, sin = (torch.rand(rows, 4 if per_pair else 8, generator=gen, dtype=torch.float64) for _ in range(2))
        upstream = torch.randn(2, rows, 3, 8, generator=gen, dtype=torch.float64)
        leaves = [t for t in (x, weight, prefix, prefix_weight) if t is not None]
        out = ref.rms_norm_rope_ref(x, cos, sin, weight, 1e-6, prefix, prefix_weight if prefix is not None else None)
        expected = torch.autograd.grad(out, leaves, upstream)
        explicit = [g for g in ref.rms_norm_rope_bwd_ref(upstream, x.detach(), cos, sin,
                                                         None if weight is None else weight.detach(), 1e-6,
                                                         None if prefix is None else prefix.detach(),
                                                         None if prefix_weight is None else prefix_weight.detach())
                    if g is not None]
        assert len(explicit) == len(expected)
        for a, b in zip(explicit, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tables_requiring_grad_take_the_differentiable_reference(monkeypatch):
    """fp32 inputs that require grad, the tables too (the kernels give no table gradient): the reference's values
    and gradients exactly (the same code); under no_grad the same inputs take the op's usual path (no graph, the
    kernel where ``backend_for`` names one, the criterion)."""
    args = _inputs((2, 3, 6, 3, 16), torch.float32, seed=11)
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    copies = {k: v.clone().requires_grad_() for k, v in args.items()}
    out = _call(leaves, 1e-6)
    expected = ref.rms_norm_rope_ref(copies["x"], copies["cos"], copies["sin"], copies["weight"], 1e-6,
                                     copies["prefix"], copies["prefix_weight"])
    assert out.grad_fn is not None
    assert torch.equal(out, expected)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    out.backward(upstream)
    expected.backward(upstream)
    for name in args:
        assert leaves[name].grad is not None and torch.equal(leaves[name].grad, copies[name].grad), name
    only_x = dict(args, x=args["x"].clone().requires_grad_())
    out = _call(only_x)
    assert out.requires_grad
    out.sum().backward()
    assert torch.isfinite(only_x["x"].grad).all() and only_x["x"].grad.abs().sum() > 0
    launches = []
    if _takes_the_kernel(torch.float32):
        launch = kernel_module.rms_norm_rope
        monkeypatch.setattr(kernel_module, "rms_norm_rope", lambda *a, **k: launches.append(1) or launch(*a, **k))
    with torch.no_grad():
        out = _call(leaves, 1e-6)
    assert out.grad_fn is None and len(launches) == _takes_the_kernel(torch.float32)
    _assert_criterion("under no_grad", out, args, 1e-6)


@pytest.mark.parametrize("table", ["cos", "sin"])
def test_one_table_requiring_grad_gets_the_references_gradient(table):
    """cos or sin alone requires grad (the other a constant): the differentiable reference runs, and that table
    gets the reference's gradient exactly (the kernels' autograd gives none)."""
    args = _inputs((2, 3, 6, 3, 16), torch.float32, seed=29)
    leaf, copy = (args[table].clone().requires_grad_() for _ in range(2))
    out = _call(dict(args, **{table: leaf}), 1e-6)
    tables = dict(args, **{table: copy})
    expected = ref.rms_norm_rope_ref(args["x"], tables["cos"], tables["sin"], args["weight"], 1e-6, args["prefix"],
                                     args["prefix_weight"])
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(30)).to(DEVICE)
    out.backward(upstream)
    expected.backward(upstream)
    assert leaf.grad is not None and torch.equal(leaf.grad, copy.grad)


# ----------------------------------------------------------------------------------------------------------------
# the custom op, torch.compile, meta tensors
# ----------------------------------------------------------------------------------------------------------------
def test_custom_op_passes_opcheck_and_compiles_fullgraph():
    args = _inputs((2, 3, 5, 3, 16), torch.float32, seed=13)
    op = torch.ops.sparsectx.rms_norm_rope.default
    torch.library.opcheck(op, (args["x"], args["cos"], args["sin"], args["weight"], 1e-6, args["prefix"],
                               args["prefix_weight"], False))
    no_prefix = _inputs((1, None, 7, 5, 6), torch.float32, seed=14, weight=False, prefix_weight=False)
    torch.library.opcheck(op, (no_prefix["x"], no_prefix["cos"], no_prefix["sin"], None, 1e-5, None, None, False))
    # Qwen-Image's form: tables of one value per pair (views of complex frequencies), diffusers' RMSNorm rounding
    freqs = torch.polar(torch.ones(7, 3), torch.rand(7, 3))
    torch.library.opcheck(op, (no_prefix["x"], freqs.real, freqs.imag, torch.rand(6), 1e-5, None, None, True))

    def fn(x, cos, sin, weight, prefix, prefix_weight):
        return rms_norm_rope(x, cos, sin, weight, 1e-6, prefix=prefix, prefix_weight=prefix_weight) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**args), 2.0 * _call(args, 1e-6), rtol=0, atol=0)
    meta = _call({k: v.to("meta") for k, v in args.items()})
    assert meta.device.type == "meta" and meta.shape == (2, 8, 3, 16) and meta.dtype == torch.float32


def test_compiled_forward_and_backward_equal_eager():
    """Inputs that require grad under torch.compile(fullgraph=True): the traced reference, the values and
    gradients of eager."""
    args = _inputs((2, 3, 5, 3, 8), torch.float32, seed=15)

    def fn(x, cos, sin, weight, prefix, prefix_weight):
        return rms_norm_rope(x * 1.5, cos, sin, weight, None, prefix=prefix, prefix_weight=prefix_weight).tanh()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    copies = {k: v.clone().requires_grad_() for k, v in args.items()}
    out, expected = compiled(**leaves), fn(**copies)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for name in args:
        torch.testing.assert_close(leaves[name].grad, copies[name].grad, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# contract: a fresh output, untouched inputs, which implementation runs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_prefix", [None, 0, 4])
def test_returns_a_fresh_contiguous_tensor_and_leaves_the_inputs_alone(n_prefix):
    args = _inputs((2, n_prefix, 9, 3, 16), torch.float16, seed=16)
    args["x"] = torch.randn(2, 9, 3 * 16 * 2, generator=torch.Generator().manual_seed(17)).to(
        DEVICE, torch.float16)[..., :48].unflatten(-1, (3, 16))
    before = {k: v.clone() for k, v in args.items() if v is not None}
    out = _call(args)
    assert out.is_contiguous() and out.shape == (2, (n_prefix or 0) + 9, 3, 16) and out.dtype == torch.float16
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} was modified"
        assert out.untyped_storage().data_ptr() != args[name].untyped_storage().data_ptr(), f"out aliases {name}"
    out.fill_(0.0)
    for name, value in before.items():
        assert torch.equal(args[name], value), f"writing the output changed {name}"
    empty = _inputs((0, n_prefix, 9, 3, 16), torch.float16, seed=18)
    assert _call(empty).shape == (0, (n_prefix or 0) + 9, 3, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_the_kernel_runs_where_backend_for_says(dtype, monkeypatch):
    """fp16/fp32 launch the kernel where ``backend_for`` names one (a GPU, the interpreter); float64, and bf16 on
    the CPU, take the reference and equal it exactly."""
    if kernel_module is None:
        pytest.skip("no triton")
    launches = []
    launch = kernel_module.rms_norm_rope

    def counting(*args, **kwargs):
        launches.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "rms_norm_rope", counting)
    args = _inputs((1, 2, 3, 2, 8), dtype, seed=19)
    out = _call(args, 1e-6)
    assert bool(launches) == _takes_the_kernel(dtype)
    if not launches:
        assert torch.equal(out, ref.rms_norm_rope_ref(args["x"], args["cos"], args["sin"], args["weight"], 1e-6,
                                                      args["prefix"], args["prefix_weight"]))
    if DEVICE == "cpu" and dtype in (torch.float32, torch.float16) and ops.interpreter_enabled():
        assert launches, "the interpreter is on: fp16/fp32 on the CPU must run the kernel"


def test_kernel_buffers_start_poisoned():
    """The criterion tests rely on the kernel's output starting as NaN (conftest): an unwritten element fails."""
    if kernel_module is None:
        pytest.skip("no triton")
    assert torch.isnan(kernel_module.torch.empty(4)).all()


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
def _valid():
    return _inputs((2, 4, 5, 3, 8), torch.float32, seed=20)


_META = torch.zeros(1, device="meta")


@pytest.mark.parametrize("change, error, words", [
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(2, 5, 24)), ValueError, "x must have 4 dimensions"),
    (dict(x=torch.zeros(2, 5, 3, 8, dtype=torch.int32)), ValueError, "x must have dtype in"),
    (dict(x=torch.zeros(2, 5, 3, 8, dtype=torch.bool)), ValueError, "x must have dtype in"),
    (dict(x=torch.zeros(2, 5, 3, 7)), ValueError, r"head dim \(x\.shape\[-1\]\) must be even"),
    (dict(x=torch.zeros(2, 5, 3, 0)), ValueError, r"head dim \(x\.shape\[-1\]\)"),
    (dict(x=torch.zeros(2, 5, 3, 258)), ValueError, r"head dim \(x\.shape\[-1\]\) must be even and in 2\.\.256"),
    (dict(x=torch.zeros(65536, 0, 3, 8), prefix=None, prefix_weight=None), ValueError,
     "x has 65536 samples; one call takes at most 65535"),
    (dict(prefix="p"), TypeError, "prefix must be a torch.Tensor"),
    (dict(prefix=torch.zeros(2, 4, 24)), ValueError, "prefix must have 4 dimensions"),
    (dict(prefix=torch.zeros(2, 4, 3, 8, dtype=torch.float16)), ValueError, "prefix has dtype torch.float16"),
    (dict(prefix=torch.zeros(1, 4, 3, 8)), ValueError, r"prefix must be \[B=2, S0, H=3, D=8\]"),
    (dict(prefix=torch.zeros(2, 4, 2, 8)), ValueError, r"prefix must be \[B=2, S0, H=3, D=8\]"),
    (dict(prefix=torch.zeros(2, 4, 3, 6)), ValueError, r"prefix must be \[B=2, S0, H=3, D=8\]"),
    (dict(prefix=_META.expand(2, 4, 3, 8)), ValueError, "prefix is on meta"),
    (dict(prefix=None), ValueError, "prefix_weight is given without a prefix"),
    (dict(weight=[1.0] * 8), TypeError, "weight must be a torch.Tensor"),
    (dict(weight=torch.ones(1, 8)), ValueError, "weight must have 1 dimensions"),
    (dict(weight=torch.ones(6)), ValueError, r"weight must be a float16, .* \[D=8\] tensor"),
    (dict(weight=torch.ones(8, dtype=torch.int64)), ValueError, r"weight must be a float16, .* \[D=8\] tensor"),
    (dict(weight=_META.expand(8)), ValueError, "weight is on meta"),
    (dict(prefix_weight=torch.ones(10)), ValueError, r"prefix_weight must be a float16, .* \[D=8\] tensor"),
    (dict(prefix_weight=torch.ones(8, dtype=torch.bool)), ValueError, r"prefix_weight must be a float16, .* \[D=8\]"),
    (dict(prefix_weight=torch.ones(8, 1)), ValueError, "prefix_weight must have 1 dimensions"),
    (dict(cos=torch.ones(5, 8)), ValueError, r"cos must be a float \[S0 \+ S=9, D=8\] table"),
    (dict(cos=torch.ones(9, 3)), ValueError, r"cos must be a float \[S0 \+ S=9, D=8\] table"),
    (dict(cos=torch.ones(9, 4)), ValueError, r"cos and sin must have one shape"),
    (dict(round_before_weight=1), TypeError, "round_before_weight must be a bool"),
    (dict(round_before_weight=True, weight=torch.ones(8, dtype=torch.float64)), ValueError,
     r"round_before_weight=True takes a weight of x's dtype \(torch.float32\), got torch.float64"),
    (dict(round_before_weight=True, prefix_weight=torch.ones(8, dtype=torch.float16)), ValueError,
     r"round_before_weight=True takes a prefix_weight of x's dtype"),
    (dict(cos=torch.ones(9, 8, dtype=torch.int32)), ValueError, r"cos must be a float \[S0 \+ S=9, D=8\] table"),
    (dict(cos=torch.ones(1, 9, 8)), ValueError, "cos must have 2 dimensions"),
    (dict(cos=None), TypeError, "cos must be a torch.Tensor"),
    (dict(cos=_META.expand(9, 8)), ValueError, "cos is on meta"),
    (dict(sin=torch.ones(10, 8)), ValueError, r"sin must be a float \[S0 \+ S=9, D=8\] table"),
    (dict(sin=torch.ones(9, 8, dtype=torch.complex64)), ValueError, r"sin must be a float \[S0 \+ S=9, D=8\]"),
    (dict(sin=torch.ones(9 * 8)), ValueError, "sin must have 2 dimensions"),
    (dict(sin=_META.expand(9, 8)), ValueError, "sin is on meta"),
    (dict(eps=math.nan), ValueError, "eps must be finite and >= 0"),
    (dict(eps=math.inf), ValueError, "eps must be finite and >= 0"),
    (dict(eps=-1e-6), ValueError, "eps must be finite and >= 0"),
    (dict(eps=10 ** 400), ValueError, "eps must be finite and >= 0"),  # (was float()'s bare OverflowError)
    (dict(weight=torch.ones(8).to(torch.float8_e4m3fn)), ValueError,  # (failed inside torch's dtype promotion)
     r"weight must be a float16, .* \[D=8\] tensor"),
    (dict(eps=True), TypeError, "eps must be a Python number or None"),
    (dict(eps="1e-6"), TypeError, "eps must be a Python number or None"),
    (dict(eps=torch.tensor(1e-6)), TypeError, "eps must be a Python number or None"),
], ids=lambda v: None)
def test_bad_input_raises_naming_the_argument(change, error, words, monkeypatch):
    """Each check names its argument and fires before any launch."""
    if kernel_module is not None:
        def no_launch(*args, **kwargs):
            raise AssertionError("launched on bad input")

        monkeypatch.setattr(kernel_module, "rms_norm_rope", no_launch)
    args = dict(_valid(), eps=1e-6)
    args.update({name: value.to(DEVICE) if isinstance(value, torch.Tensor) and not value.is_meta else value
                 for name, value in change.items()})
    with pytest.raises(error, match=words):
        rms_norm_rope(args["x"], args["cos"], args["sin"], args["weight"], args["eps"], prefix=args["prefix"],
                      prefix_weight=args["prefix_weight"], round_before_weight=args.get("round_before_weight", False))


def test_the_valid_arguments_of_the_bad_input_table_pass():
    """The table above changes one argument of these: they pass as they are."""
    args = _valid()
    _assert_criterion("valid", _call(args, 1e-6), args, 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at FLUX.2-klein-like sizes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_bf16_at_flux2_klein_sizes():
    """512 text and 4608 image tokens (a 64 x 72 latent), 32 heads of 128 (klein's q/k before attention), bf16,
    FLUX.2's fp32 tables: the criterion against the reference in bf16, x as the q third of a fused projection, and
    against diffusers' modules."""
    batch, n_prefix, rows, cols, heads, dim = 1, 512, 64, 72, 32, 128
    seq = rows * cols
    gen = torch.Generator().manual_seed(21)
    cos, sin = _flux_tables(n_prefix, rows, cols, [32, 32, 32, 32], theta=2000)
    assert cos.dtype == torch.float32 and cos.shape == (n_prefix + seq, dim)
    norm, prefix_norm = _norm_modules(dim, torch.bfloat16, gen)
    prefix = torch.randn(batch, n_prefix, heads, dim, generator=gen).to(DEVICE, torch.bfloat16)
    proj = torch.randn(batch, seq, 3 * heads * dim, generator=gen).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        weight, prefix_weight = norm.weight.detach(), prefix_norm.weight.detach()
        for x in (proj[..., :heads * dim].unflatten(-1, (heads, dim)).contiguous(),
                  proj[..., :heads * dim].unflatten(-1, (heads, dim))):
            args = dict(x=x, cos=cos, sin=sin, weight=weight, prefix=prefix, prefix_weight=prefix_weight)
            ours = _call(args, 1e-6)
            _assert_criterion("bf16 klein", ours, args, 1e-6)
            theirs = _diffusers_sequence(x, prefix, cos, sin, norm, prefix_norm)
            _assert_criterion("bf16 klein vs diffusers", ours, args, 1e-6, same_dtype=theirs)
        no_prefix = dict(args, prefix=None, prefix_weight=None, cos=cos[n_prefix:], sin=sin[n_prefix:])
        _assert_criterion("bf16 image only", _call(no_prefix, 1e-6), no_prefix, 1e-6)


def _bf16_flux2_args(n_prefix, rows, cols, heads, dim, gen):
    """bf16 arguments of FLUX.2's query pass on a ``rows x cols`` latent after ``n_prefix`` text tokens: x the q
    third of a fused projection, weights near 1, a text stream, FLUX.2's fp32 tables (its 4 axes, D/4 each)."""
    cos, sin = _flux_tables(n_prefix, rows, cols, [dim // 4] * 4, theta=2000)
    proj = torch.randn(1, rows * cols, 3 * heads * dim, generator=gen).to(DEVICE, torch.bfloat16)
    return dict(x=proj[..., :heads * dim].unflatten(-1, (heads, dim)), cos=cos, sin=sin,
                weight=(1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE, torch.bfloat16),
                prefix=torch.randn(1, n_prefix, heads, dim, generator=gen).to(DEVICE, torch.bfloat16),
                prefix_weight=(1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE, torch.bfloat16))


@pytest.mark.gpu
def test_gpu_bf16_gradients_at_flux2_klein_sizes(monkeypatch):
    """Drop training's backward at klein's sizes (512 text + 4608 image tokens, 32 heads of 128, bf16, FLUX.2's
    fp32 tables): the gradients of x (the q third of a fused projection), the text stream and both weights meet
    the criterion against the float64 reference's autograd."""
    n_prefix, rows, cols, heads, dim = 512, 64, 72, 32, 128
    gen = torch.Generator().manual_seed(24)
    args = _bf16_flux2_args(n_prefix, rows, cols, heads, dim, gen)
    upstream = torch.randn(1, n_prefix + rows * cols, heads, dim, generator=gen).to(DEVICE, torch.bfloat16)
    _assert_gradients_meet_the_criterion(args, upstream, torch.bfloat16, monkeypatch)


_TEST_MODEL_SIZES = pytest.mark.parametrize("fused, dim, prefix", [
    pytest.param(fused, dim, prefix, id=f"{'fused_qkv' if fused else 'own_projection'}-{dim}-"
                                        f"{'text+image' if prefix else 'image'}")
    for fused in (True, False) for dim in (16, 32) for prefix in (True, False)])


@pytest.mark.gpu
@_TEST_MODEL_SIZES
def test_gpu_bf16_at_the_test_models_sizes(dim, prefix, fused, monkeypatch):
    _check_bf16_at_the_test_models_sizes(dim, prefix, fused, monkeypatch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the test above runs")
@pytest.mark.bf16_kernels
@_TEST_MODEL_SIZES
def test_bf16_at_the_test_models_sizes_through_the_interpreter(dim, prefix, fused, monkeypatch):
    """The GPU check above with its bf16 kernels run by the interpreter patched to compute bf16 as a GPU does."""
    _check_bf16_at_the_test_models_sizes(dim, prefix, fused, monkeypatch)


def _check_bf16_at_the_test_models_sizes(dim, prefix, fused, monkeypatch):
    """The sizes of the tiny FLUX models the processors' GPU check runs (2 heads of 16 or 32, a few text and image
    tokens: fewer elements per program tile than threads), which only those checks ran on a GPU so far: bf16
    forward and gradients against the float64 reference, x as the q third of a fused projection (FLUX.2's
    single-stream layers) or contiguous (the other layers: without a text prefix, FLUX.1's single-stream ones,
    a form only FLUX.1 calls), FLUX.2's tables (a joint sequence) or their image rows."""
    n_prefix, rows, cols, heads = 7, 5, 6, 2
    gen = torch.Generator().manual_seed(25 + dim)
    args = _bf16_flux2_args(n_prefix, rows, cols, heads, dim, gen)
    if not fused:
        args["x"] = args["x"].contiguous()
    if not prefix:
        args.update(prefix=None, prefix_weight=None, cos=args["cos"][n_prefix:], sin=args["sin"][n_prefix:])
    with torch.no_grad():
        _assert_criterion(f"bf16 D={dim}", _call(args, 1e-6), args, 1e-6)
    upstream = torch.randn(1, (n_prefix if prefix else 0) + rows * cols, heads, dim,
                           generator=gen).to(DEVICE, torch.bfloat16)
    _assert_gradients_meet_the_criterion(args, upstream, torch.bfloat16, monkeypatch)


# ----------------------------------------------------------------------------------------------------------------
# the two norms' roundings, and Qwen-Image's tables (one value per pair, complex frequencies)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["torch", "diffusers"])
def test_norm_rounds_as_the_model_module_bit_for_bit(module):
    """With the identity rotation and head dim 2 (a sum of two squares: no summation order to differ), the op's
    fp16 output is the model's norm module's output bit for bit: ``torch.nn.RMSNorm`` (one rounding) with
    ``round_before_weight=False``, diffusers' ``RMSNorm`` (rounded before and after the weight) with True; the
    other setting differs somewhere on these inputs (the flag is not a no-op)."""
    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(2, 64, 4, 2, generator=g)).to(torch.float16)
    norm = torch.nn.RMSNorm(2, eps=1e-6) if module == "torch" else RMSNorm(2, eps=1e-6)
    norm = norm.to(torch.float16).requires_grad_(False)
    norm.weight.copy_(2 * torch.randn(2, generator=g))
    cos, sin = torch.ones(64, 1), torch.zeros(64, 1)
    expected = norm(x)
    diffusers_rounding = module == "diffusers"
    same = rms_norm_rope(x, cos, sin, norm.weight, 1e-6, round_before_weight=diffusers_rounding)
    other = rms_norm_rope(x, cos, sin, norm.weight, 1e-6, round_before_weight=not diffusers_rounding)
    assert torch.equal(same, expected)
    assert not torch.equal(other, expected)
    spec = ref.rms_norm_rope_ref(x, cos, sin, norm.weight, 1e-6, round_before_weight=diffusers_rounding)
    assert torch.equal(spec, expected)


def test_tables_of_one_value_per_pair_equal_repeated_tables():
    """``[S, D/2]`` tables (strided views of complex frequencies' real and imaginary parts) give exactly the output
    of the same values repeated per feature, ``[S, D]`` contiguous."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 3, 16, generator=g)
    freqs = torch.polar(torch.ones(9, 8), 10 * torch.rand(9, 8, generator=g))
    per_pair = rms_norm_rope(x, freqs.real, freqs.imag, None, 1e-6)
    per_feature = rms_norm_rope(x, freqs.real.repeat_interleave(2, -1), freqs.imag.repeat_interleave(2, -1),
                                None, 1e-6)
    assert torch.isfinite(per_pair).all()
    assert torch.equal(per_pair, per_feature)


def test_qwen_image_norm_and_rope_equal_diffusers():
    """Qwen-Image's q/k: diffusers' ``RMSNorm`` then ``apply_rotary_emb_qwen`` (complex product) equals the op with
    ``round_before_weight`` and the frequencies' real/imaginary parts, within fp32 rounding."""
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, 3, 32, generator=g)
    norm = RMSNorm(32, eps=1e-6).requires_grad_(False)
    norm.weight.copy_(torch.randn(32, generator=g))
    freqs = torch.polar(torch.ones(11, 16), 10 * torch.rand(11, 16, generator=g))
    expected = apply_rotary_emb_qwen(norm(x), freqs, use_real=False)
    got = rms_norm_rope(x, freqs.real, freqs.imag, norm.weight, norm.eps, round_before_weight=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fp16_result_is_diffusers_flux_code_bit_for_bit_at_head_dim_2():
    """At head dim 2 (no summation order to differ) on the CPU, the op's fp16 output equals diffusers' FLUX code
    (two ``torch.nn.RMSNorm`` modules, ``torch.cat``, ``apply_rotary_emb``) bit for bit: the norm's output is
    rounded to fp16 before the rotation, as there (without that rounding, 388 of these 1152 values differ)."""
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(3)
    x, prefix = ((3 * torch.randn(2, n, 4, 2, generator=g)).to(torch.float16) for n in (64, 8))
    norm, prefix_norm = (torch.nn.RMSNorm(2, eps=1e-6).to(torch.float16).requires_grad_(False) for _ in range(2))
    for module in (norm, prefix_norm):
        module.weight.copy_(2 * torch.randn(2, generator=g))
    angles = 10 * torch.rand(72, 1, generator=g)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    expected = apply_rotary_emb(torch.cat([prefix_norm(prefix), norm(x)], dim=1), (cos, sin), sequence_dim=1)
    got = rms_norm_rope(x, cos, sin, norm.weight, 1e-6, prefix=prefix, prefix_weight=prefix_norm.weight)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES_HERE)
def test_eps_zero_gradients_with_partial_tiles(dtype):
    """eps = 0 with token and head counts that leave padding lanes in the kernels' tiles (9 tokens, 3 heads): the
    padding's zero vectors must not turn the weight gradient (a sum over the tile) into NaN; gradients within the
    criterion's bound of the float64 reference."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 9, 3, 8, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(8, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(9, 8, generator=gen).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    upstream = torch.randn(2, 9, 3, 8, generator=gen).to(DEVICE, dtype)

    def grads(fn, wide):
        leaves = [t.to(wide).detach().requires_grad_() for t in (x, weight)]
        tables = [t.to(wide) for t in (cos, sin)] if wide == torch.float64 else [cos, sin]
        return torch.autograd.grad(fn(leaves[0], *tables, leaves[1], 0.0), leaves, upstream.to(wide))

    got = grads(rms_norm_rope, dtype)
    exact = grads(ref.rms_norm_rope_ref, torch.float64)
    same = grads(ref.rms_norm_rope_ref, dtype)
    for name, g, e, b in zip(("dx", "dweight"), got, exact, same):
        err, baseline = (g.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert math.isfinite(err), f"{name}: non-finite gradient"
        assert err <= 2 * baseline + ATOL[dtype], f"{name}: error {err:.3e} > 2 x torch's {baseline:.3e} + atol"


# ----------------------------------------------------------------------------------------------------------------
# rope_tables: FLUX's rotary tables, exactly the reference's values (each an elementwise function of one position
# and one frequency: no rounding difference is allowed)
# ----------------------------------------------------------------------------------------------------------------
def _table_inputs(rows, axes_dim, ids_dtype, freqs_dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    n_axes = len(axes_dim)
    columns = n_axes + 2 if strided else n_axes
    if ids_dtype.is_floating_point:
        ids = (torch.rand(rows, columns, generator=g, dtype=torch.float64) * 8192 - 4096).to(ids_dtype)
    else:
        ids = torch.randint(-4096, 4096, (rows, columns), generator=g).to(ids_dtype)
    if strided:  # every other row, columns 1.. of a wider tensor: neither stride is the contiguous one
        ids = ids.repeat_interleave(2, dim=0)[::2, 1:]
    dim = sum(axes_dim)
    freqs = (1.0 / 10000 ** (torch.arange(dim, dtype=torch.float64) / max(dim, 1))).to(freqs_dtype)
    return ids.to(DEVICE), freqs.to(DEVICE)


@pytest.mark.parametrize("axes_dim", [(16,), (4, 6, 6), (32, 32, 32, 32), (6, 0, 10)], ids=str)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_rope_tables_equal_the_reference(axes_dim, ids_dtype, rows):
    ids, freqs = _table_inputs(rows, axes_dim, ids_dtype, torch.float64, seed=rows + len(axes_dim))
    got = ops.rope_tables(ids, freqs, list(axes_dim))
    want = ref.rope_tables_ref(ids, freqs, axes_dim)
    for name, g, w in zip(("cos", "sin"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == (rows, sum(axes_dim)), (name, g.dtype, g.shape)
        assert torch.equal(g, w), f"{name}: {(g - w).abs().max().item()}"


def test_rope_tables_read_strided_ids_and_take_the_kernel_where_it_runs(monkeypatch):
    ids, freqs = _table_inputs(45, (4, 6, 6), torch.int64, torch.float64, seed=3, strided=True)
    assert not ids.is_contiguous() and ids.stride(1) == 1 and ids.stride(0) == 2 * 5
    launched = []
    if kernel_module is not None:
        real = kernel_module.rope_tables
        monkeypatch.setattr(kernel_module, "rope_tables", lambda *a: launched.append(1) or real(*a))
    got = ops.rope_tables(ids, freqs, (4, 6, 6))
    want = ref.rope_tables_ref(ids.contiguous(), freqs, (4, 6, 6))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert bool(launched) == (kernel_module is not None and ops.backend_for(DEVICE, torch.float64)
                              != ops.TORCH_REFERENCE)


def test_sample_offsets_past_int32(past_int32_batch):
    """x ``[3, 5, 2, 16]`` fp16 whose sample stride is just above 2**30 elements: sample 2's rows lie past 2**31
    elements, which the kernel must address in int64 (a mutation to int32 passed the suite). The result equals that
    of a contiguous copy, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x = past_int32_batch((3, 5, 2, 16), gen)
    cos, sin = (torch.randn(5, 16, generator=gen).to(DEVICE) for _ in range(2))
    weight = torch.randn(16, generator=gen).to(DEVICE, torch.float16)
    assert torch.equal(rms_norm_rope(x, cos, sin, weight, 1e-6), rms_norm_rope(x.contiguous(), cos, sin, weight, 1e-6))


def test_rope_tables_of_fp32_frequencies_take_the_reference(monkeypatch):
    """fp32 angles: the kernel's fp32 cosine and torch's may differ in the last bit, so the reference computes them
    (no launch), as torch's fp32 cosine of the fp32 product."""
    ids, freqs = _table_inputs(37, (4, 6, 6), torch.float64, torch.float32, seed=7)
    if kernel_module is not None:
        monkeypatch.setattr(kernel_module, "rope_tables", lambda *a: pytest.fail("the kernel ran on fp32 freqs"))
    cos, sin = ops.rope_tables(ids, freqs, [4, 6, 6])
    angles = torch.cat([ids.float()[:, a:a + 1] * freqs[start:end]
                        for a, (start, end) in enumerate([(0, 4), (4, 10), (10, 16)])], dim=1)
    assert angles.dtype == torch.float32
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())


def test_rope_tables_with_positions_that_require_a_gradient_are_differentiable():
    ids, freqs = _table_inputs(9, (4, 4), torch.float32, torch.float64, seed=4)
    ids.requires_grad_(True)
    cos, sin = ops.rope_tables(ids, freqs, [4, 4])
    (cos.sum() + sin.sum()).backward()
    exact = ids.detach().double()
    expected = torch.cat([-(exact[:, a:a + 1] * freqs[4 * a:4 * a + 4]).sin() * freqs[4 * a:4 * a + 4]
                          + (exact[:, a:a + 1] * freqs[4 * a:4 * a + 4]).cos() * freqs[4 * a:4 * a + 4]
                          for a in range(2)], dim=1).view(9, 2, 4).sum(-1)
    assert torch.allclose(ids.grad.double(), expected, rtol=1e-6, atol=1e-6)  # (fp32 rounding: 5e-8 measured)


def test_rope_tables_with_frequencies_that_require_a_gradient_are_differentiable():
    """Frequencies that require a gradient take the differentiable reference too (the docstring's promise): their
    gradient is the reference's."""
    ids, freqs = _table_inputs(6, (4, 4), torch.float32, torch.float64, seed=5)
    freqs.requires_grad_(True)
    cos, sin = ops.rope_tables(ids, freqs, [4, 4])
    (cos.sum() + 2 * sin.sum()).backward()
    exact = freqs.detach().clone().requires_grad_(True)
    want_cos, want_sin = ref.rope_tables_ref(ids, exact, [4, 4])
    (want_cos.sum() + 2 * want_sin.sum()).backward()
    assert torch.allclose(freqs.grad, exact.grad, rtol=1e-6, atol=1e-6)


def test_rope_tables_custom_op_passes_opcheck_and_compiles():
    ids, freqs = _table_inputs(20, (4, 6, 6), torch.int64, torch.float64, seed=5)
    torch.library.opcheck(torch.ops.sparsectx.rope_tables.default, (ids, freqs, [4, 6, 6]))
    compiled = torch.compile(lambda i, f: ops.rope_tables(i, f, [4, 6, 6]), fullgraph=True, backend="eager")
    eager = ops.rope_tables(ids, freqs, [4, 6, 6])
    assert all(torch.equal(a, b) for a, b in zip(compiled(ids, freqs), eager, strict=True))


@pytest.mark.parametrize("change, error, words", [
    (dict(ids=torch.zeros(5)), ValueError, "ids"),
    (dict(ids=torch.zeros(5, 3, dtype=torch.bool)), ValueError, "ids"),
    (dict(ids=[[0, 1, 2]]), TypeError, "ids"),
    (dict(freqs=torch.zeros(16, dtype=torch.float16)), ValueError, "freqs"),
    (dict(freqs=torch.zeros(4, 4, dtype=torch.float64)), ValueError, "freqs"),
    (dict(axes_dim=[]), ValueError, "axes_dim"),
    (dict(axes_dim=[4, 6.0, 6]), TypeError, "axes_dim"),
    (dict(axes_dim=16), TypeError, "axes_dim"),
    (dict(axes_dim=[4, -6, 18]), ValueError, "axes_dim"),
    (dict(axes_dim=[4, True, 11]), TypeError, "axes_dim"),
    (dict(axes_dim=[4, 6, 4]), ValueError, "axes_dim"),
    (dict(axes_dim=[4, 4, 4, 2, 2]), ValueError, "axes_dim"),
    (dict(axes_dim=(4, 6, 6), ids=torch.zeros(5, 2, dtype=torch.int64)), ValueError, "axes_dim"),
])
def test_rope_tables_bad_input(change, error, words):
    ids, freqs = _table_inputs(5, (4, 6, 6), torch.int64, torch.float64, seed=6)
    args = dict(ids=ids, freqs=freqs, axes_dim=[4, 6, 6])
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=words):
        ops.rope_tables(**args)


def test_rope_tables_of_float8_positions_are_those_of_their_float32_values():
    """float8 ids passed the checks, then failed inside the kernel (the interpreter: "cannot cast ... to fp8e4nv")
    while the reference ran: fp32 holds every float8 position exactly, and the angle reads float32(ids)."""
    ids, freqs = _table_inputs(21, (4, 6, 6), torch.float32, torch.float64, seed=7)
    ids = (ids / 512).to(torch.float8_e4m3fn)
    got = ops.rope_tables(ids, freqs, [4, 6, 6])
    want = ref.rope_tables_ref(ids.float(), freqs, [4, 6, 6])
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert got[1].abs().max() > 0  # (positions that are not all zero)
