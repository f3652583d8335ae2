"""attention_key_mass (the selection probes' op) against the fp64 reference, with the flash-attention criterion.

Criterion: the error of the kernel against the float64 reference is at most twice the error of PyTorch computing
the same formula in the inputs' dtype (``reference.attention_key_mass_ref`` on those inputs) plus a small absolute
term. Inputs are random; the kernel's buffers start poisoned (tests/conftest.py), so an unwritten element fails.
"""
import math

import pytest
import torch

import sparsectx
from sparsectx import reference as ref
from sparsectx.ops import attention_key_mass

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
# bf16 on the CPU: the interpreter patched to compute it as a GPU does (tests/bf16_interpreter.py)
DTYPES_HERE = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.bf16_kernels)]

# (batch, queries, keys, heads, head dim): blocks of 32 in the interpreter, of 64 and 128 on a GPU
SHAPES = {
    "tails": (2, 37, 75, 3, 64),
    "one_query_one_key": (1, 1, 1, 1, 16),
    "head_dim_not_power_of_two": (3, 20, 50, 2, 40),
    "head_dim_wide": (1, 33, 65, 2, 160),
    "multiple_of_the_blocks": (1, 64, 128, 1, 128),
}


def _inputs(shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    batch, n_queries, n_keys, heads, dim = shape
    q = (scale * torch.randn(batch, n_queries, heads, dim, generator=gen)).to(dtype).to(DEVICE)
    k = (scale * torch.randn(batch, n_keys, heads, dim, generator=gen)).to(dtype).to(DEVICE)
    weights = torch.rand(batch, n_queries, generator=gen).to(DEVICE)
    return q, k, weights


def _assert_flash_criterion(got, q, k, weights, softmax_scale=None):
    exact = ref.attention_key_mass_ref(q.double(), k.double(), weights.double(), softmax_scale)
    same_dtype = ref.attention_key_mass_ref(q, k, weights, softmax_scale)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    baseline = (same_dtype.double() - exact).abs().max().item()
    assert math.isfinite(err), "non-finite mass (unwritten or NaN)"
    assert err <= 2 * baseline + ATOL[q.dtype], f"error {err:.3e} > 2 x torch's {baseline:.3e} + atol"


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_key_mass_matches_reference(name, dtype):
    q, k, weights = _inputs(SHAPES[name], dtype, seed=len(name))
    _assert_flash_criterion(attention_key_mass(q, k, weights), q, k, weights)
    scale = 0.37  # an explicit scale, and the default weights (the mean over queries)
    uniform = torch.full(weights.shape, 1.0 / weights.shape[1], device=DEVICE)
    _assert_flash_criterion(attention_key_mass(q, k, softmax_scale=scale), q, k, uniform, scale)


def test_default_weights_are_the_mean_in_float64_too():
    """query_weights=None is the mean over the queries: in float64 (the exact check) the default weights were built
    in float32, 1/Q rounded to float32 (0.5000000149 for Q=2 after the sum), not the mean."""
    q, k, _ = _inputs((2, 3, 11, 2, 16), torch.float64, seed=6)
    mean = torch.full((2, 3), 1.0 / 3, dtype=torch.float64, device=DEVICE)
    assert torch.equal(attention_key_mass(q, k), attention_key_mass(q, k, mean))


def test_each_query_gives_its_weight_once_per_head():
    """Per head, the mass over all keys is the sum of the query weights (every query's softmax sums to 1)."""
    q, k, weights = _inputs((2, 19, 70, 3, 32), torch.float32, seed=4)
    mass = attention_key_mass(q, k, weights)
    torch.testing.assert_close(mass.sum(-1), weights.sum(1, keepdim=True).expand(2, 3), rtol=1e-5, atol=1e-6)


def test_strided_views_equal_contiguous_inputs():
    """q and k as views of a fused qkv tensor (token and head strides of their own) give the contiguous result."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 30, 3, 2, 64, generator=gen).to(DEVICE)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    assert not q.is_contiguous()
    torch.testing.assert_close(attention_key_mass(q, k), attention_key_mass(q.contiguous(), k.contiguous()),
                               rtol=1e-6, atol=1e-7)


def test_keys_at_minus_infinity_get_no_mass_and_queries_seeing_none_give_nothing():
    """Keys holding -inf in the first key block get probability 0 (not NaN); a head whose keys are all -inf gives
    no mass at all (its queries see no finite score), as in the reference."""
    q, k, weights = _inputs((1, 9, 40, 2, 16), torch.float32, seed=6)
    q = q.abs() + 0.1  # positive queries: a key of -inf everywhere scores -inf (no 0 * inf)
    k[:, [0, 3], 0] = -math.inf
    k[:, :, 1] = -math.inf
    mass = attention_key_mass(q, k, weights)
    assert torch.isfinite(mass).all()
    assert torch.equal(mass[:, 0, [0, 3]], torch.zeros(1, 2, device=DEVICE))
    assert torch.equal(mass[:, 1], torch.zeros(1, 40, device=DEVICE))
    expected = ref.attention_key_mass_ref(q.double(), k.double(), weights.double())
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["nan_in_a_key", "inf_key", "nan_query"])
def test_nan_and_inf_scores_give_nan_as_the_reference_does(where):
    """A NaN or +inf score makes its head's mass NaN everywhere (torch's softmax gives NaN rows), never a silent 0
    for the other keys (before: a NaN row sum read as "no finite score" and gave every other key 0)."""
    q, k, weights = _inputs((1, 4, 6, 2, 8), torch.float32, seed=12)
    q = q.abs() + 0.1
    if where == "nan_in_a_key":
        k[0, 2, 0, 3] = math.nan
    elif where == "inf_key":
        k[0, 2, 0] = math.inf
    else:
        q[0, 1, 0, 0] = math.nan
    mass = attention_key_mass(q, k, weights)
    expected = ref.attention_key_mass_ref(q.double(), k.double(), weights.double())
    assert torch.isnan(expected[:, 0]).all() and torch.isnan(mass[:, 0]).all()
    torch.testing.assert_close(mass[:, 1].double(), expected[:, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_large_scores_keep_their_precision(dtype):
    """Scores of large magnitude (a big softmax scale, huge activations): the kernels keep each query's max and
    sum apart (max + log2(sum) in fp32 lost the sum: 6e-5 error at scores ~1e4, and keys of equal huge scores got
    the whole mass each instead of an equal share)."""
    q, k, weights = _inputs((1, 9, 40, 2, 16), dtype, seed=13)
    _assert_flash_criterion(attention_key_mass(q, k, weights, softmax_scale=1000.0), q, k, weights, 1000.0)
    if dtype == torch.float16:  # five keys equal to the query, scores ~1e11 (no overflow: fp32 accumulation)
        q = torch.full((1, 1, 1, 64), 6e4, dtype=dtype, device=DEVICE)
        mass = attention_key_mass(q, q.expand(1, 5, 1, 64), torch.ones(1, 1, device=DEVICE))
        torch.testing.assert_close(mass, torch.full((1, 1, 5), 0.2, device=DEVICE))


def test_queries_and_keys_with_different_strides():
    """q contiguous beside k a view of a fused k/v tensor: each is addressed with its own token and head strides."""
    gen = torch.Generator().manual_seed(14)
    q = torch.randn(2, 21, 3, 16, generator=gen).to(DEVICE)
    kv = torch.randn(2, 37, 2, 3, 16, generator=gen).to(DEVICE)
    k = kv[:, :, 0]
    weights = torch.rand(2, 21, generator=gen).to(DEVICE)
    _assert_flash_criterion(attention_key_mass(q, k, weights), q, k, weights)
    _assert_flash_criterion(attention_key_mass(k[:, :21], q.transpose(1, 0).transpose(0, 1), weights), k[:, :21],
                            q, weights)


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_inputs_without_a_unit_last_stride(dtype):
    """q and k whose head dim is not contiguous (transposed views): the kernels read a unit feature stride, so such
    inputs are made contiguous first; the criterion."""
    gen = torch.Generator().manual_seed(17)
    q, k = (torch.randn(2, n, 16, 3, generator=gen).to(DEVICE, dtype).transpose(2, 3) for n in (21, 37))
    weights = torch.rand(2, 21, generator=gen).to(DEVICE)
    assert q.stride(-1) != 1 and k.stride(-1) != 1
    _assert_flash_criterion(attention_key_mass(q, k, weights), q, k, weights)


def test_custom_op_passes_opcheck_and_compiles_fullgraph():
    q, k, weights = _inputs((2, 9, 13, 2, 16), torch.float32, seed=15)
    torch.library.opcheck(torch.ops.sparsectx.attention_key_mass.default, (q, k, weights, 0.25))
    compiled = torch.compile(lambda q, k, w: attention_key_mass(q, k, w) * 2.0, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, weights), 2.0 * attention_key_mass(q, k, weights))
    meta = attention_key_mass(q.to("meta"), k.to("meta"), weights.to("meta"))
    assert meta.shape == (2, 2, 13) and meta.dtype == torch.float32
    # the fake implementation's dtype is the real one's for other input dtypes too (fp32 for half, fp64 for fp64)
    for dtype, mass_dtype in ((torch.float16, torch.float32), (torch.float64, torch.float64)):
        q, k, weights = _inputs((2, 9, 13, 2, 16), dtype, seed=16)
        torch.library.opcheck(torch.ops.sparsectx.attention_key_mass.default, (q, k, weights, 0.25))
        meta = attention_key_mass(q.to("meta"), k.to("meta"), weights.to("meta"))
        assert meta.dtype == mass_dtype == attention_key_mass(q, k, weights).dtype, dtype


def test_fp16_scores_beyond_the_fp16_range_are_accumulated_in_fp32():
    """q·kᵀ of large fp16 activations exceeds fp16's 65504: the kernel accumulates the products in fp32."""
    q, k, weights = _inputs((1, 6, 9, 2, 64), torch.float16, seed=7, scale=40.0)
    k[:, :6] = q  # aligned keys: |q|² ≈ 64·40² overflows fp16
    assert not torch.isfinite(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()).half()).all()
    mass = attention_key_mass(q, k, weights)
    expected = ref.attention_key_mass_ref(q.double(), k.double(), weights.double())
    torch.testing.assert_close(mass.double(), expected, rtol=1e-4, atol=1e-6)


def test_empty_inputs_give_zero_mass():
    q, k, _ = _inputs((2, 0, 5, 1, 16), torch.float32, seed=8)
    assert torch.equal(attention_key_mass(q, k), torch.zeros(2, 1, 5, device=DEVICE))
    q, k, _ = _inputs((2, 3, 0, 1, 16), torch.float32, seed=8)
    assert attention_key_mass(q, k).shape == (2, 1, 0)


def test_float64_and_cpu_bf16_take_the_reference():
    q, k, weights = _inputs((1, 5, 7, 1, 16), torch.float64, seed=9)
    got = attention_key_mass(q, k, weights)
    assert got.dtype == torch.float64
    assert torch.equal(got, ref.attention_key_mass_ref(q, k, weights))
    if DEVICE == "cpu":  # bf16 on the CPU: the reference in fp32 (the interpreter computes bf16 wrongly)
        qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
        torch.testing.assert_close(attention_key_mass(qb, kb, weights),
                                   ref.attention_key_mass_ref(qb.float(), kb.float(), weights.float()))


def test_reference_chunks_do_not_change_the_result(monkeypatch):
    """The reference holds at most KEY_MASS_CHUNK_ELEMENTS scores at a time (queries are chunked when one head
    alone exceeds it), and chunking does not change the result."""
    q, k, weights = _inputs((2, 16, 10, 3, 8), torch.float64, seed=10)
    whole = ref.attention_key_mass_ref(q, k, weights)
    sizes, softmax = [], torch.softmax

    def recording_softmax(x, *args, **kwargs):
        sizes.append(x.numel())
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    monkeypatch.setattr(ref, "KEY_MASS_CHUNK_ELEMENTS", 2 * 10 * 4)  # 4 queries of one head per chunk
    chunked = ref.attention_key_mass_ref(q, k, weights)
    assert sizes and max(sizes) <= 2 * 10 * 4 and len(sizes) == 3 * 4
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def _valid():
    q, k, weights = _inputs((2, 5, 7, 2, 16), torch.float32, seed=11)
    return dict(q=q, k=k, query_weights=weights)


@pytest.mark.parametrize("change, error, words", [
    (dict(q=torch.zeros(2, 5, 2, 16, dtype=torch.int32)), ValueError, "q must have dtype in"),
    (dict(q=torch.zeros(10, 2, 16)), ValueError, "q must have 4 dimensions"),
    (dict(q="q"), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.zeros(2, 7, 2, 16, dtype=torch.float16)), ValueError, "k has dtype torch.float16 but q has"),
    (dict(k=torch.zeros(1, 7, 2, 16)), ValueError, r"k must be \[B=2, N, H=2, D=16\]"),
    (dict(k=torch.zeros(2, 7, 1, 16)), ValueError, r"k must be \[B=2, N, H=2, D=16\]"),
    (dict(q=torch.zeros(2, 5, 1, 300), k=torch.zeros(2, 7, 1, 300)), ValueError, "head dim"),
    (dict(q=torch.zeros(2, 5, 1, 0), k=torch.zeros(2, 7, 1, 0)), ValueError, r"head dim .* must be in 1\.\.256, got 0"),
    (dict(q=torch.zeros(65536, 1, 1, 1), k=torch.zeros(65536, 1, 1, 1), query_weights=None), ValueError,
     "one call takes at most 65535"),
    (dict(q=torch.zeros(1, 1, 65536, 1), k=torch.zeros(1, 0, 65536, 1), query_weights=None), ValueError,
     "65536 heads; one call takes at most 65535"),
    (dict(query_weights=torch.ones(2, 4)), ValueError, r"query_weights must be a float \[B=2, Q=5\]"),
    (dict(query_weights=torch.ones(2, 5, dtype=torch.bool)), ValueError, "query_weights must be a float"),
    (dict(query_weights=[1.0]), TypeError, "query_weights must be a torch.Tensor"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number"),
    (dict(softmax_scale=1e39), ValueError, "softmax_scale must be a finite number of magnitude at most"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a Python number"),
])
def test_bad_input_raises_naming_the_argument(change, error, words):
    args = _valid()
    args.update({name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
                 for name, value in change.items()})
    with pytest.raises(error, match=words):
        attention_key_mass(args.pop("q"), args.pop("k"), **args)


def test_sample_offsets_past_int32(past_int32_batch):
    """q ``[3, 6, 2, 16]`` fp16 whose sample stride is just above 2**30 elements: sample 2's queries lie past 2**31
    elements, which the kernels must address in int64 (a mutation to int32 passed the suite). The mass equals that
    of a contiguous copy, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    q = past_int32_batch((3, 6, 2, 16), gen)
    k = torch.randn(3, 9, 2, 16, generator=gen).to(DEVICE, torch.float16)
    assert torch.equal(attention_key_mass(q, k), attention_key_mass(q.contiguous(), k))


def test_inputs_that_require_grad_are_refused_while_autograd_records():
    """The kernels have no backward: a silent zero gradient is refused; detached or under no_grad it runs."""
    args = _valid()
    for name in args:
        leaves = dict(args, **{name: args[name].clone().requires_grad_()})
        with pytest.raises(ValueError, match="attention_key_mass has no gradient"):
            attention_key_mass(leaves.pop("q"), leaves.pop("k"), **leaves)
    q = args["q"].requires_grad_()
    with torch.no_grad():
        under_no_grad = attention_key_mass(q, args["k"])
    assert torch.equal(under_no_grad, attention_key_mass(q.detach(), args["k"]))


def test_exported_at_the_top_level():
    assert sparsectx.attention_key_mass is attention_key_mass


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_gpu_bf16_key_mass_at_probe_shapes(dim):
    """bf16 at the klein probe's shape (1024 probe queries, 3 references of 4096 tokens, 32 heads at D=128), and
    head dims 64 and 256 (the other launch configuration) at fewer heads."""
    heads = 32 if dim == 128 else 4
    q, k, weights = _inputs((1, 1024, 3 * 4096, heads, dim), torch.bfloat16, seed=dim)
    weights[:, ::3] = 0.0  # padding queries
    weights = weights / weights.sum(1, keepdim=True)
    _assert_flash_criterion(attention_key_mass(q, k, weights), q, k, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_keys_give_an_empty_mass(dtype):
    """N = 0 keys: an empty [B, H, 0] mass on the kernel path and the reference (float64) path (the reference
    failed taking a max over no key)."""
    q = torch.randn(2, 3, 2, 16, dtype=dtype)
    mass = attention_key_mass(q, q[:, :0])
    assert mass.shape == (2, 2, 0) and mass.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU runs these tiles in every test")
@pytest.mark.bf16_kernels
@pytest.mark.parametrize("shape", [(2, 150, 140, 2, 64), (1, 70, 200, 2, 160)], ids=["D64", "D160"])
def test_gpu_tiles_in_the_interpreter(shape, monkeypatch):
    """The two passes with the GPU's tiles (the interpreter otherwise runs 32 x 32), in bf16 as a GPU computes it:
    query and key counts that are no multiple of a tile, heads up to 128 and above."""
    from sparsectx.kernels import attention as kernels

    used = []

    def gpu_config(block_d, dtype, columns):
        used.append(kernels.MASS_CONFIGS[kernels._wide_rows(block_d, dtype)][columns])
        return used[-1]

    monkeypatch.setattr(kernels, "_mass_config", gpu_config)
    q, k, weights = _inputs(shape, torch.bfloat16, seed=shape[-1])
    _assert_flash_criterion(attention_key_mass(q, k, weights), q, k, weights)
    assert set(used) == set(kernels.MASS_CONFIGS[shape[-1] > kernels.WIDE_HEAD_BLOCK_D])
