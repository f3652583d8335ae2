"""The selection budgets' ranking kernel (``kernels/compaction.py``'s ``_ranked_keep_kernel``) through
``sparsectx.ops.ranked_keep_mask``, against ``sparsectx.reference.ranked_keep_mask_ref``.

On a machine without CUDA the kernel runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET).
Fixed counts are compared exactly (a ranking involves no rounding). Adaptive counts too: the masses are sums in
float64 in another order than the reference's, so a count could differ only where the mass ranked above a token
lies within a few float64 ulps of the threshold; the inputs here are random (and their exact boundaries are sums of
powers of two, which every order adds exactly).
"""
import itertools
import types

import pytest
import torch

from sparsectx import ops, reference
from sparsectx.kernels import compaction as kc

pytestmark = pytest.mark.skipif(ops.backend_for("cuda" if torch.cuda.is_available() else "cpu")
                                == ops.TORCH_REFERENCE, reason="the Triton kernels do not run here")

TOLERANCE = 1e-9  # sparsectx.selection.COVERAGE_TOL


def _scores(gen, batch, n_tokens, kind, dtype, device):
    if kind == "random":
        scores = torch.rand(batch, n_tokens, generator=gen)
    elif kind == "ties":  # a few values: ties inside and across images, and across blocks
        scores = torch.randint(0, 3, (batch, n_tokens), generator=gen).float()
    elif kind == "signed":  # the linear mass clips negatives to 0
        scores = torch.randn(batch, n_tokens, generator=gen)
    elif kind == "zeros":  # no mass: uniform
        scores = torch.zeros(batch, n_tokens)
    elif kind == "mixed":  # signed scores in some images, not in others ("auto": softmax there, linear here)
        scores = torch.randn(batch, n_tokens, generator=gen)
        scores = torch.where(torch.rand(1, n_tokens, generator=gen) < 0.5, scores.abs(), scores)
    elif kind == "-inf":  # the softmax of a row of -inf is uniform (sample 0's), a few finite scores take it all
        scores = torch.full((batch, n_tokens), -float("inf"))
        scores[1:, ::7] = torch.randn(batch - 1, len(range(0, n_tokens, 7)), generator=gen)
    else:  # "special": -inf, -0.0 beside 0.0, a huge and a tiny score
        scores = torch.rand(batch, n_tokens, generator=gen)
        values = torch.tensor([-float("inf"), -0.0, 0.0, 3e38, 1e-40])
        pick = torch.randint(0, 2, (batch, n_tokens), generator=gen).bool()
        scores = torch.where(pick, values[torch.randint(0, 5, (batch, n_tokens), generator=gen)], scores)
    return scores.to(dtype).to(device)


def _settings(gen, batch, lengths, device):
    """(low, high) int64 [B, n_refs]: random floors and caps, some floors above their caps."""
    def draw():
        return torch.tensor([[int(torch.randint(0, n + 1, (), generator=gen)) for n in lengths]
                             for _ in range(batch)], dtype=torch.int64).view(batch, len(lengths)).to(device)
    return draw(), draw()


def _assert_same(got, expected):
    (keep, counts), (want_keep, want_counts) = got, expected
    assert keep.dtype == torch.bool and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), want_counts.cpu())
    assert torch.equal(keep.cpu(), want_keep.cpu())


def _false_poisoning():
    """``torch`` for the kernel module with ``empty`` buffers full of False / 0 (conftest's poison is True / -7): a
    keep entry the kernel does not write then reads as dropped."""
    proxy = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    proxy.empty = lambda *args, **kwargs: torch.zeros(*args, **kwargs)
    return proxy


LAYOUTS = [[1], [7], [16, 16, 16], [48, 16, 35], [0, 5], [5, 0, 3], [37] * 4]


@pytest.mark.parametrize("lengths", LAYOUTS, ids=str)
@pytest.mark.parametrize("kind, poison", [("random", "true"), ("random", "false"), ("ties", "true"),
                                          ("signed", "true"), ("zeros", "true"), ("special", "true"),
                                          ("mixed", "true"), ("-inf", "true")])
def test_fixed_and_adaptive_counts_match_the_reference(device, monkeypatch, lengths, kind, poison):
    """Every layout (one image, images of one length, of different lengths, empty images) and score kind, fixed
    counts and adaptive ones (coverage 0, a fraction, 1, one per image; random floors and caps; the linear,
    softmax and automatic masses, the last two on finite and -inf scores: +inf has no mass); each output starts
    poisoned True (conftest) or False, so every entry must be written."""
    if poison == "false":
        monkeypatch.setattr(kc, "torch", _false_poisoning())
    gen = torch.Generator().manual_seed(sum(lengths) * 7 + len(kind))
    dtypes = (torch.float32, torch.float16, torch.float64) if kind in ("random", "special") else (torch.float32,)
    for batch in (1, 3):
        n_tokens = sum(lengths)
        for dtype in dtypes:
            scores = _scores(gen, batch, n_tokens, kind, dtype, device)
            counts, _ = _settings(gen, batch, lengths, device)
            _assert_same(ops.ranked_keep_mask(scores, lengths, counts),
                         reference.ranked_keep_mask_ref(scores, lengths, counts))
            low, high = _settings(gen, batch, lengths, device)
            per_image = torch.rand(batch, len(lengths), generator=gen, dtype=torch.float64).to(device)
            masses = ("linear", "softmax", "auto") if kind in ("ties", "signed", "mixed", "-inf") else ("linear",)
            for coverage, mass in itertools.product((0.0, 0.9, 1.0, per_image), masses):
                got = ops.ranked_keep_mask(scores, lengths, coverage=coverage, low=low, high=high,
                                           tolerance=TOLERANCE, mass=mass)
                _assert_same(got, reference.ranked_keep_mask_ref(scores, lengths, None, coverage, low, high,
                                                                 TOLERANCE, mass))


@pytest.mark.parametrize("block", [16, 32])
def test_rows_longer_than_a_block_carry_their_mass(device, monkeypatch, block):
    """Images longer than the kernel's block are read block by block: the running mass and the keep mask continue
    across blocks (the block forced small)."""
    monkeypatch.setattr(kc, "RANK_BLOCK", block)
    gen = torch.Generator().manual_seed(block)
    lengths = [block * 3 + 5, block - 1, 2 * block]
    for kind, mass in (("random", "linear"), ("ties", "linear"), ("zeros", "linear"), ("signed", "softmax"),
                       ("mixed", "auto")):
        scores = _scores(gen, 2, sum(lengths), kind, torch.float32, device)
        counts, _ = _settings(gen, 2, lengths, device)
        _assert_same(ops.ranked_keep_mask(scores, lengths, counts),
                     reference.ranked_keep_mask_ref(scores, lengths, counts))
        no_bounds = (torch.zeros(2, 3, dtype=torch.int64, device=device),
                     torch.tensor([lengths, lengths], device=device))
        for coverage in (0.3, 0.75, 0.999):
            got = ops.ranked_keep_mask(scores, lengths, coverage=coverage, low=no_bounds[0], high=no_bounds[1],
                                       tolerance=TOLERANCE, mass=mass)
            want = reference.ranked_keep_mask_ref(scores, lengths, None, coverage, *no_bounds, TOLERANCE, mass)
            _assert_same(got, want)


def test_the_adaptive_count_covers_the_mass_with_the_fewest_tokens(device):
    """Planted: an image whose mass is known, 1/2, 1/4, 1/8, ... of it on its tokens in a shuffled order (each
    partial sum exact in float64): covering k/8 of it takes exactly the tokens whose shares add up to it."""
    shares = torch.tensor([2.0 ** -i for i in range(1, 8)] + [2.0 ** -7])  # sums to 1
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    scores = shares[order][None].to(device)
    zeros, full = (torch.tensor([[v]], dtype=torch.int64, device=device) for v in (0, 8))
    # (a coverage above 0 keeps at least one token, also below the tolerance)
    expected_counts = {0.0: 0, 1e-10: 1, 0.25: 1, 0.5: 1, 0.75: 2, 0.875: 3, 0.99: 7, 1.0: 8}
    for coverage, expected in expected_counts.items():
        keep, counts = ops.ranked_keep_mask(scores, [8], coverage=coverage, low=zeros, high=full,
                                            tolerance=TOLERANCE)
        assert counts.item() == expected, coverage
        kept = torch.sort(scores[0].cpu(), descending=True, stable=True).indices[:expected]  # the largest shares
        assert keep[0].cpu().nonzero()[:, 0].tolist() == sorted(kept.tolist()), coverage


def test_the_adaptive_count_grows_with_the_coverage(device):
    gen = torch.Generator().manual_seed(5)
    lengths = [40, 23]
    scores = _scores(gen, 2, 63, "random", torch.float32, device)
    low, high = torch.zeros(2, 2, dtype=torch.int64, device=device), torch.tensor([lengths] * 2, device=device)
    previous = None
    for coverage in torch.linspace(0, 1, 41).tolist():
        keep, counts = ops.ranked_keep_mask(scores, lengths, coverage=coverage, low=low, high=high,
                                            tolerance=TOLERANCE)
        if previous is not None:
            assert (counts >= previous[1]).all() and (keep | ~previous[0]).all(), coverage  # kept sets nest
        previous = keep, counts
    assert previous[1].tolist() == [lengths] * 2  # all of the mass: every token of these positive scores


def test_counts_floors_and_caps_of_any_integer_dtype(device):
    scores = torch.rand(2, 9, generator=torch.Generator().manual_seed(2), device="cpu").to(device)
    counts = torch.tensor([[3, 1], [0, 4]], device=device)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        _assert_same(ops.ranked_keep_mask(scores, [5, 4], counts.to(dtype)),
                     reference.ranked_keep_mask_ref(scores, [5, 4], counts))
        got = ops.ranked_keep_mask(scores, [5, 4], coverage=0.7, low=counts.to(dtype), high=(counts + 1).to(dtype))
        _assert_same(got, reference.ranked_keep_mask_ref(scores, [5, 4], None, 0.7, counts, counts + 1))


def test_no_samples_and_no_tokens(device):
    for batch, lengths in ((0, [4, 3]), (2, [0]), (2, [0, 0])):
        scores = torch.rand(batch, sum(lengths), device=device)
        bounds = torch.zeros(batch, len(lengths), dtype=torch.int64, device=device)
        for got in (ops.ranked_keep_mask(scores, lengths, bounds),
                    ops.ranked_keep_mask(scores, lengths, coverage=0.5, low=bounds, high=bounds)):
            assert got[0].shape == (batch, sum(lengths)) and got[1].shape == (batch, len(lengths))
            assert not got[0].any() and not got[1].any()


@pytest.mark.parametrize("call, match", [
    (lambda s, c: ops.ranked_keep_mask(s.long(), [4, 3], c), "scores"),
    (lambda s, c: ops.ranked_keep_mask(s[0], [4, 3], c), "scores"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 4], c), "ref_lengths"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, -1, 4], c), "ref_lengths"),
    (lambda s, c: ops.ranked_keep_mask(s, (4.0, 3), c), "ref_lengths"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3]), "either counts or coverage"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], c, coverage=0.5, low=c, high=c), "either counts or coverage"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], c.float()), "counts"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], c[:, :1]), "counts"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], coverage=0.5, low=c), "high"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], coverage=1.5, low=c, high=c), "coverage"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], coverage=torch.ones(2, 2), low=c, high=c), "coverage"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], coverage=0.5, low=c, high=c, tolerance=-1.0), "tolerance"),
    (lambda s, c: ops.ranked_keep_mask(s, [4, 3], coverage=0.5, low=c, high=c, mass="log"), "mass"),
])
def test_bad_input_is_refused_naming_the_argument(device, call, match):
    scores = torch.rand(2, 7, device=device)
    counts = torch.ones(2, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=match):
        call(scores, counts)


@pytest.mark.gpu
def test_cuda_budgets_at_the_klein_shape_in_bf16_without_a_sync():
    """On a GPU: the selection benchmark's shape (3 references of 64 x 64 tokens, and images of different lengths,
    one longer than the kernel's block), fp32 and bf16 scores (bf16: many ties), fixed and adaptive counts (the
    linear mass; the softmax and automatic ones of signed scores: fp64 exponentials) against the reference; the op
    never waits for the device (torch's sync debug mode raising)."""
    gen = torch.Generator().manual_seed(31)
    for lengths in ([4096] * 3, [4096, 1024, 2 * kc.RANK_BLOCK + 17]):
        n_refs = len(lengths)
        for batch in (1, 2):
            low = torch.full((batch, n_refs), 2, dtype=torch.int64).cuda()
            high = torch.tensor([[n // 2 for n in lengths]] * batch).cuda()
            counts = torch.tensor([[n // 10 for n in lengths]] * batch).cuda()
            for dtype in (torch.float32, torch.bfloat16):
                scores = torch.rand(batch, sum(lengths), generator=gen).pow(4).cuda().to(dtype)
                signed = torch.randn(batch, sum(lengths), generator=gen).cuda().to(dtype)
                calls = [((scores, counts), {})] + [
                    ((x, ), dict(coverage=0.9, low=low, high=high, tolerance=TOLERANCE, mass=mass))
                    for x, mass in ((scores, "linear"), (signed, "softmax"), (signed, "auto"))]
                for (x, *args), kwargs in calls:
                    ops.ranked_keep_mask(x, lengths, *args, **kwargs)  # compiles outside the check
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        got = ops.ranked_keep_mask(x, lengths, *args, **kwargs)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                    want = reference.ranked_keep_mask_ref(x.cpu(), lengths, *[a.cpu() for a in args],
                                                          **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                             for k, v in kwargs.items()})
                    _assert_same(got, want)


def test_the_custom_op_passes_opcheck_and_a_dispatch_mode_sees_one_call(device):
    """``torch.ops.sparsectx.ranked_keep_mask`` (what a tracer or a dispatch mode sees: ``count_host_reads`` then
    tracks its outputs as device data) passes ``torch.library.opcheck`` in its fixed and adaptive forms, and under a
    dispatch mode the op goes through it with the eager call's results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(2, 12, generator=gen).to(device)
    counts = torch.tensor([[2, 5], [0, 7]], device=device)
    low, high = torch.zeros_like(counts), torch.full_like(counts, 7)
    op = torch.ops.sparsectx.ranked_keep_mask.default
    torch.library.opcheck(op, (scores, [5, 7], counts, None, None, None, None, 0.0, "linear"))
    torch.library.opcheck(op, (scores, [5, 7], None, 0.8, None, low, high, TOLERANCE, "auto"))
    per_image = torch.rand(2, 2, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(op, (scores, [5, 7], None, None, per_image, low, high, TOLERANCE, "softmax"))

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    for args, kwargs in (((counts,), {}), ((), dict(coverage=per_image, low=low, high=high, tolerance=TOLERANCE))):
        eager = ops.ranked_keep_mask(scores, [5, 7], *args, **kwargs)
        calls = []
        with Seen():
            seen = ops.ranked_keep_mask(scores, [5, 7], *args, **kwargs)
        assert calls == ["sparsectx.ranked_keep_mask.default"], calls
        _assert_same(seen, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equal_scores_keep_the_exact_share_by_default(device, dtype):
    """Ten equal scores at coverage 0.8 keep 8 tokens on both paths with the default tolerance: with 0 (the op's
    former default) the kernel kept 8 and the reference 9 (its running sum of ten shares of 0.1 is 0.7999...)."""
    scores = torch.full((2, 10), 0.5, dtype=dtype, device=device)
    low = torch.zeros(2, 1, dtype=torch.int64, device=device)
    high = torch.full((2, 1), 10, dtype=torch.int64, device=device)
    for coverage, kept in ((0.3, 3), (0.7, 7), (0.8, 8), (0.9, 9), (1.0, 10)):
        for got in (ops.ranked_keep_mask(scores, [10], coverage=coverage, low=low, high=high),
                    reference.ranked_keep_mask_ref(scores, [10], coverage=coverage, low=low, high=high)):
            assert got[1].tolist() == [[kept]] * 2, coverage
            assert torch.equal(got[0].cpu(), (torch.arange(10) < kept).expand(2, 10)), coverage
