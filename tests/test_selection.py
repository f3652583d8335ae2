"""Selectors, budgets and select(): contract, determinism, planted signals, spread, adaptive budgets, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsectx
from sparsectx import reference, selection
from sparsectx.selection import (
    BudgetResult,
    Selector,
    SelectionContext,
    adaptive,
    adaptive_budget,
    available_selectors,
    fixed_count,
    fixed_ratio,
    get_selector,
    register_selector,
    select,
)
from warning_checks import warnings_as_errors  # (tests/, on sys.path by pytest.ini)

BUILTIN = ["attention", "edit", "random", "subject", "uniform"]
HEADS, HEAD_DIM, CHANNELS = 2, 8, 4
# reference grids (h, w) for 1..4 references of different sizes
GRIDS = [(6, 8), (4, 4), (5, 7), (3, 9)]


def _layout(n_refs):
    shapes = GRIDS[:n_refs]
    return shapes, [h * w for h, w in shapes]


def _ids(shapes, n_axes=3):
    """FLUX-style position ids [1, N, n_axes] with (h, w) on axes 1, 2 and a per-image offset (ids need not start
    at 0)."""
    pieces = []
    for i, (h, w) in enumerate(shapes):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids = torch.zeros(h * w, n_axes)
        ids[:, 0] = i + 1
        ids[:, 1] = rows.flatten() + 2 * i
        ids[:, 2] = cols.flatten() + 3 * i
        pieces.append(ids)
    return torch.cat(pieces)[None]


def _full_context(batch, n_refs, seed=0, n_text=5, n_target=6):
    """A context with every signal the built-in selectors read."""
    shapes, lengths = _layout(n_refs)
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    extra = {
        "user_mask": torch.rand(batch, n, generator=gen) < 0.1,
        "text_queries": torch.randn(batch, n_text, HEADS, HEAD_DIM, generator=gen),
        "text_mask": torch.arange(n_text).expand(batch, -1) < n_text - 1,
        "target_queries": torch.randn(batch, n_target, HEADS, HEAD_DIM, generator=gen),
        "ref_keys": torch.randn(batch, n, HEADS, HEAD_DIM, generator=gen),
    }
    ctx = SelectionContext(n_refs, lengths, reference_ids=_ids(shapes), target_shape=(4, 4),
                           generator=torch.Generator().manual_seed(seed + 1), extra=extra)
    latents = torch.randn(batch, n, CHANNELS, generator=gen)
    return latents, ctx


def _square_mask(shapes, image, top, left, size, batch):
    """bool [B, N]: a size×size square at (top, left) of reference `image`."""
    lengths = [h * w for h, w in shapes]
    mask = torch.zeros(batch, sum(lengths), dtype=torch.bool)
    h, w = shapes[image]
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[top:top + size, left:left + size] = True
    start = sum(lengths[:image])
    mask[:, start:start + h * w] = grid.flatten()
    return mask


# ----------------------------------------------------------------------------------------------------------------
# contract
# ----------------------------------------------------------------------------------------------------------------
def test_builtin_selectors_are_registered():
    assert set(BUILTIN) <= set(available_selectors())
    assert available_selectors() == sorted(available_selectors())


def test_unknown_selector_lists_the_available_names():
    with pytest.raises(ValueError) as err:
        get_selector("no-such-selector")
    for name in BUILTIN:
        assert name in str(err.value)
    with pytest.raises(TypeError):
        get_selector(42)


def test_register_selector_and_duplicates():
    def first_tokens(latents, context):
        return -torch.arange(latents.shape[1], dtype=torch.float32).expand(latents.shape[0], -1)

    try:
        register_selector("test-first", first_tokens)
        assert "test-first" in available_selectors()
        latents, ctx = _full_context(2, 2)
        keep = select(latents, ctx, "test-first", 3)
        # each image keeps its first three tokens
        expected = torch.zeros_like(keep)
        for lo in (0, ctx.ref_lengths[0]):
            expected[:, lo:lo + 3] = True
        assert torch.equal(keep, expected)
        with pytest.raises(ValueError, match="already registered"):
            register_selector("test-first", first_tokens)
        with pytest.raises(TypeError, match="must be callable"):  # (said 'already registered' before)
            register_selector("test-first", 5)
        register_selector("test-first", selection.uniform_scores, overwrite=True)
        assert torch.equal(get_selector("test-first")(latents, ctx), selection.uniform_scores(latents, ctx))
    finally:
        selection._REGISTRY.pop("test-first", None)
    for name in ("", " spaced "):  # (a name with spaces around it could not be asked for by its spelling)
        with pytest.raises(ValueError, match="selector name"):
            register_selector(name, first_tokens)
    with pytest.raises(TypeError, match="selector name"):
        register_selector(123, first_tokens)
    with pytest.raises(TypeError):
        register_selector("test-not-callable", 3)


@pytest.mark.parametrize("bad_output, message", [
    (lambda x, c: torch.zeros(x.shape[0], x.shape[1] + 1), "must return"),
    (lambda x, c: torch.zeros(x.shape[:2], dtype=torch.int64), "float scores or a bool mask"),
    (lambda x, c: torch.full(x.shape[:2], math.nan), "NaN"),
    (lambda x, c: [0.0] * x.shape[1], "tensor"),
    (lambda x, c: torch.zeros(x.shape[:2], device="meta"), "meta tensor: its scores hold no values"),
])
def test_user_callable_output_is_validated(bad_output, message):
    latents, ctx = _full_context(2, 2)
    with pytest.raises(ValueError, match=message):
        get_selector(bad_output)(latents, ctx)


def test_user_callable_mask_is_accepted_and_budget_caps_it():
    latents, ctx = _full_context(2, 2)
    mask = ctx.extra["user_mask"] | _square_mask(GRIDS[:2], 0, 1, 1, 3, 2)

    def user(latents, context):
        return mask

    assert torch.equal(select(latents, ctx, user, None), mask)
    capped = select(latents, ctx, user, 2)
    for lo, hi in selection._image_slices(ctx.ref_lengths):
        in_mask = mask[:, lo:hi].sum(1)
        # the budget keeps mask tokens first (capping the mask), then pads images whose mask is smaller
        assert torch.equal((capped[:, lo:hi] & mask[:, lo:hi]).sum(1), torch.clamp(in_mask, max=2))
        assert torch.equal(capped[:, lo:hi].sum(1), torch.full_like(in_mask, 2))


def test_context_validation():
    with pytest.raises(ValueError, match="ref_lengths"):
        SelectionContext(2, [4])
    with pytest.raises(ValueError, match="ref_lengths"):
        SelectionContext(1, [0])
    with pytest.raises(ValueError, match="num_references"):
        SelectionContext(0, [])
    # a value of the wrong type is a TypeError (ValueError before), as in the ops
    for args in ((1.0, [4]), (2, (4.0, 4)), (1, 4), (1, [True])):
        with pytest.raises(TypeError, match="num_references|ref_lengths"):
            SelectionContext(*args)
    with pytest.raises(TypeError, match="ref_lengths"):
        selection.adaptive_budget(torch.rand(1, 8), 0.5, ref_lengths=[4.0, 4])
    with pytest.raises(TypeError, match="fixed_count: count must be an int"):
        selection.fixed_count(2.5)
    with pytest.raises(TypeError, match="generator"):
        SelectionContext(1, [4], generator=0)
    with pytest.raises(ValueError, match="reference_ids"):
        SelectionContext(1, [4], reference_ids=torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="target_shape"):
        SelectionContext(1, [4], target_shape=(4,))
    for bad in (4, (4, True), (-1, 3), (2.0, 2)):
        with pytest.raises(ValueError, match="target_shape"):
            SelectionContext(1, [4], target_shape=bad)
    with pytest.raises(TypeError, match="extra"):
        SelectionContext(1, [4], extra=[])


def test_selector_input_validation():
    ctx = SelectionContext(2, [4, 4])
    with pytest.raises(ValueError, match="ref_lengths"):
        get_selector("uniform")(torch.zeros(1, 9, 2), ctx)
    with pytest.raises(ValueError, match="reference_latents"):
        get_selector("uniform")(torch.zeros(1, 8), ctx)
    with pytest.raises(TypeError, match="context"):
        get_selector("uniform")(torch.zeros(1, 8, 2), {"ref_lengths": [8]})
    # an input that is no tensor is a TypeError, as in the ops (ValueError before)
    with pytest.raises(TypeError, match="reference_latents must be a .B, N, C. tensor, got list"):
        get_selector("uniform")(torch.zeros(1, 8, 2).tolist(), ctx)
    with pytest.raises(TypeError, match="reference_ids must be .* tensor or None, got list"):
        SelectionContext(1, [4], reference_ids=[[0, 0, 0]] * 4)
    with pytest.raises(TypeError, match="queries must be a float .B, ., H, D. tensor, got list"):
        selection.attention_mass([[1.0]], torch.zeros(1, 4, 1, 8))
    with pytest.raises(TypeError, match="scores must be a float .B, N. tensor, got list"):
        selection.adaptive_budget([[0.5, 0.5]], 0.9)


# ----------------------------------------------------------------------------------------------------------------
# shapes and determinism
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
@pytest.mark.parametrize("name", BUILTIN)
def test_scores_shape_and_per_image_budget(name, n_refs):
    batch = 2
    latents, ctx = _full_context(batch, n_refs)
    scores = get_selector(name)(latents, ctx)
    assert scores.shape == (batch, sum(ctx.ref_lengths))
    assert scores.is_floating_point() and torch.isfinite(scores).all()
    ratio = 0.25
    keep = select(*_full_context(batch, n_refs), name, ratio)  # a fresh context: random draws the same scores
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    for length, (lo, hi) in zip(ctx.ref_lengths, selection._image_slices(ctx.ref_lengths)):
        expected = math.floor(ratio * length + 0.5)
        assert keep[:, lo:hi].sum(1).tolist() == [expected] * batch
        # within each image, the kept tokens are the top-k by score with ties to the lower index
        assert torch.equal(keep[:, lo:hi], reference.topk_keep_mask(scores[:, lo:hi], [expected] * batch))


@pytest.mark.parametrize("name", BUILTIN)
def test_deterministic_under_a_seed(name):
    first = get_selector(name)(*_full_context(2, 3, seed=5))
    second = get_selector(name)(*_full_context(2, 3, seed=5))
    assert torch.equal(first, second)


def test_seeded_random_scores_are_one_writable_row_per_sample():
    """Seeded, every sample gets the same scores (a request keeps the same tokens at any batch position), as an
    ordinary tensor a user selector may edit in place (not a stride-0 view)."""
    latents, context = _full_context(3, 2)
    scores = get_selector("random")(latents, context)
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])
    scores[:, :2] = 2.0
    assert bool((scores[:, :2] == 2.0).all())


def test_random_scores_draw_each_sample_from_its_own_generator():
    """sample_generators (one per sample: diffusers' per-image generators): sample b's scores are what its generator
    draws alone, i.e. what a batch of that sample alone seeded with it gets."""
    latents, ctx = _full_context(2, 2)
    seeds = (11, 12)
    per_sample = get_selector("random")(latents, SelectionContext(
        2, ctx.ref_lengths, generator=torch.Generator().manual_seed(seeds[0]),
        sample_generators=[torch.Generator().manual_seed(s) for s in seeds]))
    for b, seed in enumerate(seeds):
        alone = get_selector("random")(latents[b:b + 1], SelectionContext(
            2, ctx.ref_lengths, generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(per_sample[b], alone[0])
    assert not torch.equal(per_sample[0], per_sample[1])
    with pytest.raises(TypeError, match="sample_generators"):
        SelectionContext(2, ctx.ref_lengths, sample_generators=[5, 6])
    # which selectors draw random numbers (a batch seeded per image is selected per sample only for those)
    assert get_selector("random").reads_generator and get_selector(lambda x, c: x[..., 0]).reads_generator
    assert not any(get_selector(name).reads_generator for name in ("uniform", "edit", "subject", "attention"))


def test_random_depends_on_the_seed_only():
    latents, ctx = _full_context(2, 2, seed=3)

    def scores(x, seed):
        return get_selector("random")(x, SelectionContext(2, ctx.ref_lengths,
                                                          generator=torch.Generator().manual_seed(seed)))

    assert torch.equal(scores(latents, 4), scores(2 * latents + 1, 4))  # content-blind
    assert not torch.equal(scores(latents, 4), scores(latents, 5))


# ----------------------------------------------------------------------------------------------------------------
# uniform: evenly spread
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 7, 16, 45])
def test_uniform_1d_keeps_every_stride(length):
    latents = torch.zeros(1, length, 1)
    ctx = SelectionContext(1, [length])
    scores = get_selector("uniform")(latents, ctx)
    assert sorted((1 - scores[0]) * length) == pytest.approx(list(range(length)))  # a permutation
    for k in range(1, length + 1):
        kept = torch.nonzero(reference.topk_keep_mask(scores, [k])[0]).flatten()
        stride = 1 << max(0, math.ceil(math.log2(length / k)))  # smallest power of 2 with ceil(L/s) <= k
        assert set(range(0, length, stride)) <= set(kept.tolist())
        gaps = torch.diff(torch.cat([kept, torch.tensor([length])]))
        assert gaps.max() <= stride < 2 * length / k + 1


@pytest.mark.parametrize("shape", [(8, 8), (5, 7), (3, 12)])
def test_uniform_2d_covers_the_grid(shape):
    h, w = shape
    latents = torch.zeros(1, h * w, 1)
    by_ids = get_selector("uniform")(latents, SelectionContext(1, [h * w], reference_ids=_ids([shape])))
    by_shape = get_selector("uniform")(latents, SelectionContext(1, [h * w], extra={"ref_shapes": [shape]}))
    assert torch.equal(by_ids, by_shape)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    for stride in (1, 2, 4):
        k = math.ceil(h / stride) * math.ceil(w / stride)
        kept = reference.topk_keep_mask(by_ids, [k])[0]
        # every cell lies within Chebyshev distance < stride of a kept cell
        dist = torch.maximum((rows[:, None] - rows[kept][None]).abs(), (cols[:, None] - cols[kept][None]).abs())
        assert dist.min(dim=1).values.max() < stride


def test_uniform_global_topk_shares_in_proportion():
    shapes, lengths = _layout(3)
    n = sum(lengths)
    latents = torch.zeros(1, n, 1)
    scores = get_selector("uniform")(latents, SelectionContext(3, lengths, reference_ids=_ids(shapes)))
    for k in (5, 17, 40, n // 2):
        packed = sparsectx.compact_tokens(scores, budget=k)
        index = packed.index[:k].long()
        for length, (lo, hi) in zip(lengths, selection._image_slices(lengths)):
            share = ((index >= lo) & (index < hi)).sum().item()
            assert abs(share - k * length / n) <= len(lengths)


# ----------------------------------------------------------------------------------------------------------------
# planted signals
# ----------------------------------------------------------------------------------------------------------------
def _planted_latents(shapes, squares, batch=2, seed=0):
    """Background latents near one vector per image, with distinct latents inside the planted squares."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [h * w for h, w in shapes]
    latents = torch.randn(batch, 1, CHANNELS, generator=gen) + 0.05 * torch.randn(batch, sum(lengths), CHANNELS,
                                                                                  generator=gen)
    planted = torch.zeros(batch, sum(lengths), dtype=torch.bool)
    for image, top, left, size in squares:
        planted |= _square_mask(shapes, image, top, left, size, batch)
    latents[planted] += 3.0 * torch.randn(int(planted.sum()), CHANNELS, generator=gen).sign()
    return latents, planted


def _planted_keys(planted, seed=0, n_queries=6):
    """Queries aligned with one direction that the planted keys share: they get almost all the attention."""
    gen = torch.Generator().manual_seed(seed)
    batch, n = planted.shape
    direction = torch.randn(HEADS, HEAD_DIM, generator=gen)
    keys = 0.1 * torch.randn(batch, n, HEADS, HEAD_DIM, generator=gen)
    keys[planted] += 2.0 * direction
    queries = 2.0 * direction + 0.1 * torch.randn(batch, n_queries, HEADS, HEAD_DIM, generator=gen)
    return queries, keys


@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
def test_subject_saliency_recovers_planted_squares(n_refs):
    shapes, lengths = _layout(n_refs)
    squares = [(i, 1, 1 + i % 2, 2) for i in range(n_refs)]
    latents, planted = _planted_latents(shapes, squares)
    ctx = SelectionContext(n_refs, lengths, extra={"ref_shapes": shapes})
    keep = select(latents, ctx, "subject", 4)  # each image keeps exactly its 2x2 square
    assert torch.equal(keep, planted)


def test_subject_recast_attention_recovers_the_subject():
    shapes, lengths = _layout(2)
    planted = _square_mask(shapes, 0, 2, 3, 3, 2) | _square_mask(shapes, 1, 0, 0, 3, 2)
    queries, keys = _planted_keys(planted)
    latents = torch.randn(2, sum(lengths), CHANNELS, generator=torch.Generator().manual_seed(1))
    ctx = SelectionContext(2, lengths, reference_ids=_ids(shapes),
                           extra={"target_queries": queries, "ref_keys": keys})
    subject_by_attention = selection.get_selector(
        lambda x, c: selection.subject_scores(x, c, saliency=False))
    assert torch.equal(select(latents, ctx, subject_by_attention, 9), planted)


def test_edit_keeps_region_then_ring_then_spread():
    shapes, lengths = _layout(2)
    batch = 2
    region = _square_mask(shapes, 0, 2, 3, 2, batch) | _square_mask(shapes, 1, 2, 2, 1, batch)
    ctx = SelectionContext(2, lengths, reference_ids=_ids(shapes), extra={"user_mask": region})
    latents = torch.randn(batch, sum(lengths), CHANNELS, generator=torch.Generator().manual_seed(0))
    edit = get_selector(lambda x, c: selection.edit_scores(x, c, ring=1))
    assert torch.equal(select(latents, ctx, edit, fixed_count(torch.tensor([4, 1]))), region)
    ring = _square_mask(shapes, 0, 1, 2, 4, batch) | _square_mask(shapes, 1, 1, 1, 3, batch)
    assert torch.equal(select(latents, ctx, edit, fixed_count(torch.tensor([16, 9]))), ring)
    # beyond the ring, the rest of the budget follows the uniform order
    extra = torch.tensor([4, 3])
    wide = select(latents, ctx, edit, fixed_count(torch.tensor([16, 9]) + extra))
    assert torch.equal(wide & ring, ring)
    outside = selection.uniform_scores(latents, ctx).masked_fill(ring, -1.0)
    assert torch.equal(wide & ~ring, selection._topk_per_image(outside, lengths, extra.expand(batch, -1)))


def test_edit_text_probe_recovers_the_instruction_region():
    shapes, lengths = _layout(3)
    planted = _square_mask(shapes, 2, 0, 4, 3, 2)
    queries, keys = _planted_keys(planted)
    latents = torch.randn(2, sum(lengths), CHANNELS)
    ctx = SelectionContext(3, lengths, reference_ids=_ids(shapes),
                           extra={"text_queries": queries, "ref_keys": keys})
    scores = selection.edit_scores(latents, ctx, ring=0)
    lo, hi = selection._image_slices(lengths)[2]
    assert torch.equal(reference.topk_keep_mask(scores[:, lo:hi], [9, 9]), planted[:, lo:hi])


def test_attention_mass_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 7, 3, HEAD_DIM, generator=gen)
    keys = torch.randn(2, 11, 3, HEAD_DIM, generator=gen)
    query_mask = torch.rand(2, 7, generator=gen) < 0.7
    query_mask[:, 0] = True
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", queries.double(), keys.double()) / math.sqrt(HEAD_DIM),
                          dim=-1)
    weights = query_mask.double() / query_mask.sum(1, keepdim=True)
    expected = torch.einsum("bhqk,bq->bk", probs, weights) / 3
    got = selection.attention_mass(queries, keys, query_mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2), rtol=1e-5, atol=1e-6)
    # evenly strided query subsampling keeps the first and the last query
    sub = selection.attention_mass(queries, keys, max_queries=2)
    assert torch.allclose(sub, selection.attention_mass(queries[:, [0, 6]], keys))


def test_query_subsampling_picks_among_the_valid_queries():
    """With padding (a text mask) the strided subsample is taken among each sample's valid queries: a sample with
    few valid queries keeps all of them, one with many keeps an even spread of them, its first and last included,
    the same queries as without a mask (before: an all-valid mask picked [0, 3, 6, 9] where no mask picked
    [0, 4, 7, 11])."""
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(2, 12, 2, HEAD_DIM, generator=gen)
    keys = torch.randn(2, 9, 2, HEAD_DIM, generator=gen)
    query_mask = torch.zeros(2, 12, dtype=torch.bool)
    query_mask[0, [2, 5, 11]] = True  # 3 valid queries (< max_queries): all of them
    query_mask[1] = True  # 12 valid: 0, 11/3, 22/3, 11 rounded half up
    got = selection.attention_mass(queries, keys, query_mask, max_queries=4)
    alone = [selection.attention_mass(queries[:1, [2, 5, 11]], keys[:1], max_queries=None),
             selection.attention_mass(queries[1:, [0, 4, 7, 11]], keys[1:], max_queries=None)]
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-6, atol=1e-7)
    unmasked = selection.attention_mass(queries[1:], keys[1:], max_queries=4)
    torch.testing.assert_close(got[1:], unmasked, rtol=0, atol=0)
    half = torch.zeros(2, 12, dtype=torch.bool)
    half[:, 1::2] = True  # valid queries 1, 3, ..., 11: slots 0, 5/3, 10/3, 5 -> 0, 2, 3, 5 of them
    torch.testing.assert_close(selection.attention_mass(queries, keys, half, max_queries=4),
                               selection.attention_mass(queries[:, [1, 5, 7, 11]], keys, max_queries=None),
                               rtol=1e-6, atol=1e-7)


def test_fp16_probe_tensors_do_not_overflow():
    """q·kᵀ of large fp16 activations exceeds fp16's range: the probe accumulates fp16 products in fp32."""
    gen = torch.Generator().manual_seed(3)
    queries = (40 * torch.randn(1, 6, 2, 64, generator=gen)).half()
    keys = (40 * torch.randn(1, 9, 2, 64, generator=gen)).half()
    keys[:, :6] = queries  # aligned keys: |q|² ≈ 64·40² exceeds fp16's 65504
    assert not torch.isfinite(torch.einsum("bqhd,bkhd->bhqk", queries, keys)).all()  # the fp16 product overflows
    got = selection.attention_mass(queries, keys)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, selection.attention_mass(queries.float(), keys.float()), rtol=1e-5, atol=1e-7)


def test_mixed_count_and_ratio_lists_keep_each_entrys_kind():
    """[1, 0.25]: one token of the first image, a quarter of the second (not a ratio of 1.0 for the first)."""
    scores = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    assert adaptive_budget(scores, 0.0, floor=[1, 0.25], ref_lengths=[8, 8]).counts.tolist() == [[1, 2], [1, 2]]
    assert adaptive_budget(scores, 1.0, cap=[[3, 0.5], [1.0, 2]], ref_lengths=[8, 8]).counts.tolist() == \
        [[3, 4], [8, 2]]
    with pytest.raises(TypeError, match="floor entries"):
        adaptive_budget(scores, 0.5, floor=[1, True], ref_lengths=[8, 8])
    with pytest.raises(ValueError, match="cap ratios"):
        adaptive_budget(scores, 0.5, cap=[2, 1.5], ref_lengths=[8, 8])


def test_numpy_scalar_budgets_count_as_their_kind():
    import numpy as np

    latents, ctx = _full_context(2, 2)
    assert torch.equal(select(latents, ctx, "uniform", np.float32(0.25)), select(latents, ctx, "uniform", 0.25))
    assert torch.equal(select(latents, ctx, "uniform", np.int64(3)), select(latents, ctx, "uniform", 3))
    # a float32 ratio as the decimal written: 0.45 of 50 tokens keeps 23 (0.449999988 x 50 + 0.5 would keep 22)
    fifty = SelectionContext(1, [50])
    for ratio, kept in ((0.45, 23), (0.77, 39), (0.83, 42)):
        assert int(select(torch.randn(1, 50, 4), fifty, "uniform", np.float32(ratio)).sum()) == kept
    scores = latents.norm(dim=-1)
    assert torch.equal(adaptive_budget(scores, 0.5, floor=np.int64(4), ref_lengths=ctx.ref_lengths).counts,
                       adaptive_budget(scores, 0.5, floor=4, ref_lengths=ctx.ref_lengths).counts)
    with pytest.raises(TypeError, match="budget"):
        select(latents, ctx, "uniform", np.bool_(True))


def test_adaptive_budget_on_a_selector_mask_covers_the_mask():
    """A selector's keep mask with an adaptive budget keeps its coverage share of the mask's tokens (all inside the
    mask), not a share of the mask padded by the spread order."""
    latents, ctx = _full_context(2, 2)
    mask = torch.zeros(2, sum(ctx.ref_lengths), dtype=torch.bool)
    mask[:, :10] = True  # 10 tokens of image 0 (48 tokens)
    mask[:, 48:52] = True  # 4 tokens of image 1 (16 tokens)
    kept = select(latents, ctx, lambda latents, context: mask, adaptive(0.9))
    assert not (kept & ~mask).any()
    assert kept[:, :48].sum(1).tolist() == [9, 9] and kept[:, 48:].sum(1).tolist() == [4, 4]


def test_attention_probe_runs_lazily_once():
    latents, ctx = _full_context(2, 2)
    provided = {name: ctx.extra.pop(name) for name in ("text_queries", "target_queries", "ref_keys")}
    calls = []

    def probe(x, context):
        calls.append(1)
        return dict(provided)

    ctx.extra["attention_probe"] = probe
    get_selector("uniform")(latents, ctx)
    assert calls == []
    lazy = get_selector("attention")(latents, ctx)
    get_selector("subject")(latents, ctx)
    assert calls == [1]
    eager = get_selector("attention")(latents, _full_context(2, 2)[1])
    torch.testing.assert_close(lazy, eager)


def test_attention_selector_probes_for_the_queries_it_lacks():
    """Keys given, queries left to the probe: the probe runs and its queries are used."""
    latents, ctx = _full_context(2, 2)
    provided = {name: ctx.extra.pop(name) for name in ("text_queries", "target_queries")}
    calls = []
    ctx.extra["attention_probe"] = lambda x, context: calls.append(1) or dict(provided)
    lazy = get_selector("attention")(latents, ctx)
    assert calls == [1]
    torch.testing.assert_close(lazy, get_selector("attention")(latents, _full_context(2, 2)[1]))


def test_attention_selector_keeps_the_queries_given_when_the_probe_runs_for_the_keys():
    """Text queries given, keys left to the probe: the probe's own "queries" (its target queries) took the place of
    the given ones, silently. The given queries (under their text_mask) are read against the probe's keys."""
    latents, ctx = _full_context(2, 2)
    given_queries, given_mask = ctx.extra["text_queries"], ctx.extra["text_mask"]
    probed = {"ref_keys": ctx.extra["ref_keys"], "target_queries": ctx.extra["target_queries"],
              "queries": ctx.extra["target_queries"]}  # (as the drop-in's probe returns them)
    extra = {"text_queries": given_queries, "text_mask": given_mask, "attention_probe": lambda x, c: dict(probed)}
    lazy = SelectionContext(ctx.num_references, ctx.ref_lengths, extra=extra)
    scores = get_selector("attention")(latents, lazy)
    expected = selection.attention_mass(given_queries, probed["ref_keys"], given_mask)
    torch.testing.assert_close(scores, expected.to(scores.device))
    assert not torch.allclose(scores, selection.attention_mass(probed["queries"], probed["ref_keys"]))


def test_edit_selector_reads_the_given_text_queries_without_the_probes_text_mask():
    """Text queries given without a mask, keys left to the probe, which returns its own prompt's text_mask (as the
    Qwen-Image probe does): that mask was applied to the given queries (the last ones ignored, silently; of another
    query count, an error about a mask never given). The given queries are read unmasked against the probe's keys."""
    latents, ctx = _full_context(2, 2)
    given_queries = ctx.extra["text_queries"]
    probe_mask = torch.zeros(given_queries.shape[:2], dtype=torch.bool)
    probe_mask[:, 0] = True
    probed = {"ref_keys": ctx.extra["ref_keys"], "text_queries": torch.randn_like(given_queries),
              "text_mask": probe_mask}
    edit = get_selector("edit")

    def scores(queries, **given):
        extra = {"text_queries": queries, "attention_probe": lambda x, c: dict(probed), **given}
        return edit(latents, SelectionContext(ctx.num_references, ctx.ref_lengths, extra=extra))
    unmasked = scores(given_queries, ref_keys=probed["ref_keys"])
    torch.testing.assert_close(scores(given_queries), unmasked)
    assert not torch.allclose(unmasked, scores(given_queries, ref_keys=probed["ref_keys"], text_mask=probe_mask))
    longer = torch.cat([given_queries, given_queries[:, :1]], dim=1)  # another query count than the probe's mask
    torch.testing.assert_close(scores(longer), scores(longer, ref_keys=probed["ref_keys"]))


# ----------------------------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------------------------
def test_fixed_budgets_per_image_and_per_request():
    lengths = [10, 6, 9]
    scores = torch.randn(2, sum(lengths), generator=torch.Generator().manual_seed(0))
    per_image = fixed_ratio(torch.tensor([0.5, 0.25, 1.0]))(scores, lengths)
    rounded = [math.floor(r * n + 0.5) for r, n in zip([0.5, 0.25, 1.0], lengths)]
    assert per_image.counts.tolist() == [rounded, rounded]
    per_request = fixed_count(torch.tensor([[2], [7]]))(scores, lengths)
    assert per_request.counts.tolist() == [[2, 2, 2], [7, 6, 7]]  # clamped to each image's length
    assert torch.equal(per_request.per_sample, per_request.keep.sum(1))
    for result in (per_image, per_request):
        for i, (lo, hi) in enumerate(selection._image_slices(lengths)):
            assert torch.equal(result.keep[:, lo:hi],
                               reference.topk_keep_mask(scores[:, lo:hi], result.counts[:, i].tolist()))


def test_budget_result_feeds_compact_tokens():
    latents, ctx = _full_context(3, 3)
    scores = get_selector("subject")(latents, ctx)
    result = adaptive(0.6, floor=2, cap=0.5)(scores, ctx.ref_lengths)
    packed = sparsectx.compact_tokens(result.keep, latents)
    assert torch.equal(torch.diff(packed.cu_seqlens).long(), result.per_sample)
    assert torch.equal(packed.tensors[0], latents[result.keep])


def test_a_floor_above_a_cap_of_the_same_kind_is_refused():
    """adaptive(floor=0.5, cap=0.1) kept the cap's count without a word (the README says "between floor and cap")."""
    # (per-request lists too: [[6], [1]] against 5 clamped request 0's floor to 5 without a word)
    for floor, cap in ((0.5, 0.1), (5, 3), ([0.1, 0.6], [0.5, 0.5]), ([4, 1], 2), ([torch.tensor(0.1), 0.9], 0.2),
                       ([[6], [1]], [[5], [5]]), ([[6], [1]], 5), ([[1, 6], [1, 1]], [5, 5]), ([4, 1], [[5], [3]])):
        with pytest.raises(ValueError, match=r"floor .* is above cap .*: the cap would win"):
            adaptive(0.9, floor=floor, cap=cap)
        with pytest.raises(ValueError, match=r"floor .* is above cap .*: the cap would win"):
            adaptive_budget(torch.rand(1, 8), 0.9, floor, cap, [4, 4])
    latents, ctx = _full_context(2, 2)
    scores = torch.rand(2, sum(ctx.ref_lengths), generator=torch.Generator().manual_seed(0))
    for request_floor, request_cap in (([[1], [2]], [[2], [2]]), ([[1], [2]], 3), ([[1, 2]], [[2, 2], [3, 3]])):
        adaptive(0.9, floor=request_floor, cap=request_cap)  # per-request lists within their caps are accepted
    for floor, cap in ((0.5, 2), (3, 0.1), (0.1, 0.5), (2, 2)):  # a ratio meets a count: the cap wins, documented
        counts = adaptive(0.0, floor=floor, cap=cap)(scores, ctx.ref_lengths).counts
        for i, n in enumerate(ctx.ref_lengths):
            as_count = [c if isinstance(c, int) else math.floor(c * n + 0.5) for c in (floor, cap)]
            assert counts[:, i].tolist() == [min(as_count)] * 2, (floor, cap)


def test_select_warns_about_a_user_mask_its_selector_does_not_read():
    """enable warns about a user_mask the chosen selector does not read (e.g. "uniform" where "edit" was meant);
    select did not."""
    latents, ctx = _full_context(1, 2)
    for name in ("uniform", "random", "subject", "attention"):
        with pytest.warns(UserWarning, match=rf"selector '{name}' does not read the signals \['user_mask'\]"):
            sparsectx.select(latents, ctx, name, 0.5)
    with warnings_as_errors():
        sparsectx.select(latents, ctx, "edit", 0.5)
        del ctx.extra["user_mask"]
        sparsectx.select(latents, ctx, "uniform", 0.5)


def _coverage_needed(mass):
    """Smallest count of top-mass tokens whose mass reaches each coverage: brute force over prefixes."""
    ordered = torch.sort(mass, descending=True).values.double()
    return [ordered[:k].sum().item() for k in range(len(ordered) + 1)]


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       c1=st.floats(0.0, 1.0), c2=st.floats(0.0, 1.0), softmax=st.booleans())
def test_adaptive_budget_is_monotone_and_minimal(seed, lengths, c1, c2, softmax):
    low, high = min(c1, c2), max(c1, c2)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, sum(lengths), generator=gen)
    scores = scores if softmax else scores.abs()
    mode = "softmax" if softmax else "linear"
    small = adaptive_budget(scores, low, 0, 1.0, lengths, mass=mode)
    large = adaptive_budget(scores, high, 0, 1.0, lengths, mass=mode)
    assert (small.counts <= large.counts).all()
    assert not (small.keep & ~large.keep).any()  # nested sets
    for b in range(2):
        for i, (lo, hi) in enumerate(selection._image_slices(lengths)):
            part = scores[b, lo:hi]
            mass = torch.softmax(part.double(), 0) if softmax else part.double() / part.double().sum()
            prefix = _coverage_needed(mass)
            count = int(large.counts[b, i])
            assert prefix[count] >= high - 1e-6  # covers
            if count > 1:
                assert prefix[count - 1] < high + 1e-6  # and one token fewer does not


def test_any_positive_coverage_keeps_a_token():
    """A coverage above zero, however small, keeps at least the top token, given as a float or as a tensor."""
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert adaptive_budget(scores, 1e-10).counts.tolist() == [[1]]
    assert adaptive_budget(scores, torch.tensor(1e-10, dtype=torch.float64)).counts.tolist() == [[1]]
    assert adaptive_budget(scores, 0.0).counts.tolist() == [[0]]


def test_a_tiny_positive_coverage_keeps_one_token_per_image_as_a_float_or_a_tensor():
    """A positive coverage keeps at least one token per image, also one within the coverage tolerance (1e-12): as a
    float and as a tensor alike (the float branch's minimum of one was untested)."""
    scores = torch.rand(2, 7, generator=torch.Generator().manual_seed(0))
    as_float = adaptive_budget(scores, coverage=1e-12, ref_lengths=[3, 4])
    as_tensor = adaptive_budget(scores, coverage=torch.full((2, 2), 1e-12, dtype=torch.float64), ref_lengths=[3, 4])
    assert as_float.counts.tolist() == [[1, 1], [1, 1]]
    assert torch.equal(as_float.counts, as_tensor.counts) and torch.equal(as_float.keep, as_tensor.keep)


def test_adaptive_budget_keeps_the_smallest_set_at_the_coverage_boundary():
    """Where the mass ranked above a token equals the coverage (less the rounding slack) exactly, that token is not
    needed: equal scores at coverage 3/4 (+ COVERAGE_TOL) keep 3 of 4, and one more token past the slack 4."""
    flat = torch.ones(1, 4)
    assert adaptive_budget(flat, 0.75 + selection.COVERAGE_TOL).counts.item() == 3
    assert adaptive_budget(flat, 0.75 + 4 * selection.COVERAGE_TOL).counts.item() == 4


@pytest.mark.parametrize("mass", ["linear", "softmax"])
@pytest.mark.parametrize("lengths", [[24, 24, 24], [24, 10]], ids=["one_length", "two_lengths"])
def test_adaptive_budget_keeps_each_images_top_counts_ties_to_the_lower_index(mass, lengths):
    """The adaptive keep mask is each image's top-``counts`` by score, ties to the lower index (``compact_tokens``'
    rule, the reference's ``topk_keep_mask``), also where the linear mass and the top-k share one sort."""
    gen = torch.Generator().manual_seed(31)
    n_tokens = sum(lengths)
    for scores in ((torch.rand(3, n_tokens, generator=gen) * 4).floor(), torch.rand(3, n_tokens, generator=gen)):
        result = adaptive_budget(scores, 0.7, 2, 0.8, lengths, mass=mass)
        for i, (lo, hi) in enumerate(selection._image_slices(lengths)):
            expected = reference.topk_keep_mask(scores[:, lo:hi], result.counts[:, i].tolist())
            assert torch.equal(result.keep[:, lo:hi], expected), (mass, i)


def test_adaptive_budget_adapts_and_clamps():
    lengths = [16, 16]
    peaked = torch.full((1, 32), -4.0)
    peaked[0, [3, 20]] = 4.0
    flat = torch.zeros(1, 32)
    scores = torch.cat([peaked, flat])
    counts = adaptive_budget(scores, 0.8, 0, 1.0, lengths).counts
    assert (counts[0] < counts[1]).all()  # a peaked distribution keeps fewer tokens than a flat one
    floored = adaptive_budget(scores, 0.8, 5, 1.0, lengths).counts
    assert (floored >= 5).all() and torch.equal(floored, counts.clamp(min=5))
    capped = adaptive_budget(scores, 0.8, 0, 0.25, lengths).counts
    assert torch.equal(capped, counts.clamp(max=4))
    per_request = adaptive_budget(flat.expand(2, -1), torch.tensor([[0.25], [0.75]]), 0, 1.0, lengths).counts
    assert per_request.tolist() == [[4, 4], [12, 12]]  # flat mass: coverage c keeps c·L tokens
    # a coverage per image (and per request and image) reaches each image: not the first image's for all
    per_image = adaptive_budget(flat.expand(2, -1), torch.tensor([0.25, 0.75]), 0, 1.0, lengths).counts
    assert per_image.tolist() == [[4, 12], [4, 12]]
    per_both = adaptive_budget(flat.expand(2, -1), torch.tensor([[0.25, 0.5], [1.0, 0.125]]), 0, 1.0, lengths).counts
    assert per_both.tolist() == [[4, 8], [16, 2]]
    unequal = adaptive_budget(torch.zeros(1, 12), torch.tensor([0.5, 1.0]), 0, 1.0, [4, 8]).counts
    assert unequal.tolist() == [[2, 8]]
    assert adaptive_budget(scores, 0.0, 0, 1.0, lengths).counts.sum() == 0


def test_select_with_an_adaptive_budget_keeps_the_planted_subject():
    shapes, lengths = _layout(2)
    latents, planted = _planted_latents(shapes, [(0, 2, 2, 3), (1, 0, 1, 2)])
    ctx = SelectionContext(2, lengths, extra={"ref_shapes": shapes})
    scores = selection.subject_scores(latents, ctx)
    # coverage just under each image's planted share of the score mass: the smallest covering set is the subject
    share = torch.stack([(scores[:, lo:hi] * planted[:, lo:hi]).sum(1) / scores[:, lo:hi].sum(1)
                         for lo, hi in selection._image_slices(lengths)], dim=1)
    keep = select(latents, ctx, "subject", adaptive(share.double() - 1e-6, mass="linear"))
    assert torch.equal(keep, planted)


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
def test_float64_scores_are_ranked_in_float64():
    """Scores that differ below fp32 resolution (or overflow it) keep the truly highest, as compact_tokens does."""
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.5, 0.25], [1e300, 2e300, 0.0, -1.0]], dtype=torch.float64)
    expected = reference.topk_keep_mask(scores, [1, 1])
    assert expected[:, 1].all()
    assert torch.equal(fixed_count(1)(scores, [4]).keep, expected)
    assert torch.equal(adaptive_budget(scores[:1], 0.01, floor=1, cap=1).keep, expected[:1])
    # images of different lengths take another ranking path: in float64 there too
    uneven = torch.tensor([[1.0, 1.0 + 1e-12, 0.0, 5.0, 4.0]], dtype=torch.float64)
    assert fixed_count(1)(uneven, [3, 2]).keep.tolist() == [[False, True, False, True, False]]


def test_ratio_settings_round_half_up_like_fixed_ratio():
    """A Python float floor/cap is a ratio rounded half up in float64, as fixed_ratio and compact_tokens do."""
    scores = torch.rand(1, 40, generator=torch.Generator().manual_seed(0))
    for length, ratio in ((5, 0.7), (10, 0.35), (10, 0.45), (20, 0.025)):
        lengths = [length, 40 - length]
        fixed = fixed_ratio(ratio)(scores, lengths).counts[0, 0]
        floored = adaptive_budget(scores, 0.0, floor=ratio, ref_lengths=lengths).counts[0, 0]
        assert int(fixed) == math.floor(ratio * length + 0.5) == int(floored), (length, ratio)


def test_every_path_turns_a_ratio_into_the_same_count():
    """One ratio keeps one number of tokens whichever way it is given: compact_tokens' budget, fixed_ratio, an
    adaptive floor and cap, the drop-in's per-image budget and drop training's ratios (five computations of the
    same rounding; each is tested alone elsewhere, none against the others). Products on decimal halves, the
    float products just below them (0.29 x 50 = 14.499999999999998), and random ratios and lengths."""
    from sparsectx import integration, ops, training

    gen = torch.Generator().manual_seed(3)
    cases = [(0.1, 4096), (0.3, 10), (0.29, 50), (0.45, 50), (0.7, 5), (1.0, 7), (1e-6, 100), (0.005, 100),
             (0.015, 100), (0.5, 1), (0.25, 2), (0.35, 10), (0.05, 10)]
    cases += [(float(f"{(k + 0.5) / n:.6g}"), n) for n in (2, 10, 50) for k in range(n)]
    cases += [(round(float(torch.rand((), generator=gen)), 3) or 0.5, int(torch.randint(1, 5000, (), generator=gen)))
              for _ in range(40)]
    for ratio, n in cases:
        scores = torch.rand(1, n, generator=gen)
        counts = {
            "compact_tokens": ops._check_budget(ratio, 1, n)[0],
            "fixed_ratio": int(fixed_ratio(ratio)(scores, [n]).counts[0, 0]),
            "fixed_ratio tensor": int(fixed_ratio(torch.tensor([ratio], dtype=torch.float64))(scores, [n])
                                      .counts[0, 0]),
            "adaptive floor": int(adaptive_budget(scores, 0.0, floor=ratio, cap=1.0, ref_lengths=[n]).counts[0, 0]),
            "adaptive cap": int(adaptive_budget(scores, 1.0, floor=0, cap=ratio, ref_lengths=[n]).counts[0, 0]),
            "enable": integration.budget_counts(integration.check_budget(ratio), 1, [n])[0][0],
            "drop training": int(training.random_drop_mask(1, [n], 0, ratios=[ratio]).sum()),
        }
        assert len(set(counts.values())) == 1, (ratio, n, counts)


def test_linear_mass_rejects_negative_scores():
    with pytest.raises(ValueError, match="linear"):
        adaptive_budget(torch.tensor([[0.5, -0.1, 0.2]]), 0.5, mass="linear")
    assert adaptive_budget(torch.tensor([[0.5, -0.1, 0.2]]), 0.5, mass="softmax").counts.shape == (1, 1)


def test_mass_of_extreme_scores_is_defined():
    """An image whose scores are all -inf has uniform mass, as any image of equal scores (before: NaN mass, and one
    token kept at every coverage); scores near float64's maximum sum without overflow (before: zero mass)."""
    for row in ([-math.inf] * 8, [-5.0] * 8):
        kept = [int(adaptive_budget(torch.tensor([row]), c).counts) for c in (0.1, 0.5, 0.9)]
        assert kept == [1, 4, 8], (row, kept)
    big = torch.tensor([[1e308, 1e308, 1.0, 1.0]], dtype=torch.float64)
    assert adaptive_budget(big, 0.5).keep.tolist() == [[True, False, False, False]]


def test_a_budget_callables_result_is_checked():
    """A user budget callable's BudgetResult must hold integer counts [B, n_refs] and a bool keep [B, N]: anything
    else is a ValueError naming the budget (before: a wrong-width or float keep mask was returned as the
    selection, wrong-shaped counts failed with an IndexError)."""
    scores = torch.rand(2, 12, generator=torch.Generator().manual_seed(0))
    context = SelectionContext(2, [8, 4])
    good = adaptive_budget(scores, 0.5, ref_lengths=[8, 4])
    for bad in (BudgetResult(good.counts[:, 0], good.keep), BudgetResult(good.counts.float(), good.keep),
                BudgetResult(good.counts, good.keep[:, 1:]), BudgetResult(good.counts, good.keep.float())):
        def budget(s, lengths, result=bad):
            return result
        for chosen in (scores, scores > 0.5):
            with pytest.raises(ValueError, match="budget .* returned (counts|keep)"):
                selection.apply_budget(chosen, torch.zeros(2, 12, 3), context, budget)
    assert torch.equal(selection.apply_budget(scores, torch.zeros(2, 12, 3), context, lambda s, lengths: good),
                       good.keep)


def test_host_reads_of_a_selection_do_not_grow_with_images_or_batch():
    """Each host read is a GPU sync: `uniform` and `edit` with a ratio or a count read the host a fixed number of
    times, whatever the batch and the number of references (before: one more per repeat_interleave, a scalar ratio
    cost a read a count did not, and edit's grids cost two reads per image)."""
    from sparsectx.diagnostics import count_host_reads

    counts = {}
    for batch, n_refs in ((1, 1), (3, 4)):
        latents, context = _full_context(batch, n_refs)
        for name in ("uniform", "edit"):
            for budget in (0.25, 3):
                with count_host_reads() as reads:
                    select(latents, context, name, budget=budget)
                counts.setdefault((name, budget), set()).add(reads.count)
    assert all(len(seen) == 1 for seen in counts.values()), counts
    assert counts[("uniform", 0.25)] == counts[("uniform", 3)] and max(counts[("edit", 3)]) <= 4, counts


def test_adaptive_budget_without_reference_tokens():
    result = adaptive_budget(torch.zeros(2, 0), 0.9)
    assert result.counts.tolist() == [[0], [0]] and result.keep.shape == (2, 0)


@pytest.mark.parametrize("lengths", [[16], [16, 16], [8, 24]])
def test_budgets_of_an_empty_batch_keep_their_shapes(lengths):
    """A batch of no samples: counts [0, n_refs] and an empty keep mask, for every budget kind (the scalar settings'
    rows lost the image dimension: a RuntimeError, or counts of shape [0, 0])."""
    for budget in (adaptive(0.8), adaptive(0.8, floor=1, cap=0.5), fixed_ratio(0.5), fixed_count(3)):
        result = budget(torch.randn(0, sum(lengths)), lengths)
        assert result.counts.shape == (0, len(lengths)) and result.keep.shape == (0, sum(lengths)), budget


def test_budget_settings_checked_when_built():
    with pytest.raises(TypeError, match="ratio"):
        fixed_ratio("0.5")
    with pytest.raises(TypeError, match="ratio"):
        fixed_ratio(None)
    with pytest.raises(ValueError, match="coverage"):
        adaptive(1.5)
    with pytest.raises(TypeError, match="coverage"):
        adaptive("high")
    with pytest.raises(ValueError, match="cap"):
        adaptive(0.5, cap=2.0)
    with pytest.raises(TypeError, match="floor"):
        adaptive(0.5, floor=None)
    with pytest.raises(TypeError, match="must be an int count"):  # a count budget, not a bad ratio
        fixed_count(torch.tensor(2.0))(torch.randn(1, 8), [8])


def test_bad_budgets():
    scores = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"ref_lengths must be a non-empty list of positive ints, got \[0, 8\]"):
        fixed_ratio(0.5)(scores, [0, 8])  # (an image of no tokens: a surviving mutant accepted it)
    with pytest.raises(ValueError, match="ratio"):
        fixed_ratio(1.5)
    with pytest.raises(ValueError, match="count"):
        fixed_count(-1)
    with pytest.raises(TypeError, match="count"):  # a ratio where a count goes, as a float tensor below
        fixed_count(0.5)
    with pytest.raises(TypeError, match="fixed_count"):
        fixed_count(torch.tensor([0.5]))(scores, [8])
    with pytest.raises(ValueError, match="broadcast"):
        fixed_ratio(torch.tensor([0.5, 0.5, 0.5]))(scores, [4, 4])
    with pytest.raises(ValueError, match="coverage"):
        adaptive_budget(scores, 1.5)
    with pytest.raises(ValueError, match="floor"):
        adaptive_budget(scores, 0.5, floor=-1)
    with pytest.raises(ValueError, match="mass"):
        adaptive(0.5, mass="log")
    with pytest.raises(ValueError, match="ref_lengths"):
        adaptive_budget(scores, 0.5, ref_lengths=[3, 4])
    with pytest.raises(ValueError, match="NaN"):
        adaptive_budget(torch.full((1, 4), math.nan), 0.5)
    with pytest.raises(ValueError, match=r"\+inf: their mass is undefined \(an adaptive budget reads the "
                                         r"selector.s scores as a distribution"):
        adaptive_budget(torch.full((1, 4), math.inf), 0.5)
    latents, ctx = _full_context(2, 2)
    with pytest.raises(ValueError, match="budget is required"):
        select(latents, ctx, "uniform", None)
    with pytest.raises(TypeError, match="budget"):
        select(latents, ctx, "uniform", "half")
    with pytest.raises(ValueError, match="BudgetResult"):
        select(latents, ctx, "uniform", lambda s, lengths: s > 0)
    assert isinstance(fixed_count(1)(scores), BudgetResult)


def test_missing_or_malformed_signals():
    latents, ctx = _full_context(2, 2)
    bare = SelectionContext(2, ctx.ref_lengths)
    with pytest.raises(ValueError, match="user_mask"):
        get_selector("edit")(latents, bare)
    with pytest.raises(ValueError, match="queries"):
        get_selector("attention")(latents, bare)
    with pytest.raises(ValueError, match="target_queries"):
        get_selector(lambda x, c: selection.subject_scores(x, c, saliency=False))(latents, bare)
    wrong_mask = SelectionContext(2, ctx.ref_lengths, extra={"user_mask": ctx.extra["user_mask"].float()})
    with pytest.raises(ValueError, match="user_mask"):
        get_selector("edit")(latents, wrong_mask)
    wrong_keys = SelectionContext(2, ctx.ref_lengths, extra={"queries": ctx.extra["text_queries"],
                                                             "ref_keys": ctx.extra["ref_keys"][:, :-1]})
    with pytest.raises(ValueError, match="ref_keys"):
        get_selector("attention")(latents, wrong_keys)
    bad_shapes = SelectionContext(2, ctx.ref_lengths, extra={"ref_shapes": [(2, 2), (2, 2)]})
    with pytest.raises(ValueError, match="ref_shapes"):
        get_selector("uniform")(latents, bad_shapes)
    shapes, _ = _layout(2)
    h, w = shapes[0]
    for shape in ((-h, -w), (h * w, 1.0), (True, h * w), (0, 0), h * w, (h, w, 1), None, f"{h}x{w}"):
        # products that match, or not, but no sizes; entries that are not pairs (before: unpacking errors)
        entries = [shape, shapes[1]]
        with pytest.raises(ValueError, match="ref_shapes"):
            get_selector("uniform")(latents, SelectionContext(2, ctx.ref_lengths, extra={"ref_shapes": entries}))
    for name in ("text_queries", "target_queries", "ref_keys"):  # integer probe tensors, named as given
        wrong_dtype = SelectionContext(2, ctx.ref_lengths, extra={**ctx.extra, name: ctx.extra[name].long()})
        for selector in ("edit", "attention", "subject"):
            if (name, selector) in (("text_queries", "subject"), ("target_queries", "edit")):
                continue  # (signals these selectors do not read)
            with pytest.raises(ValueError, match=rf"extra\['[a-z_/]*{name}[a-z_/]*'\] must be a float tensor"):
                get_selector(selector)(latents, wrong_dtype)
    bad_probe = SelectionContext(2, ctx.ref_lengths, extra={"attention_probe": lambda x, c: None})
    with pytest.raises(ValueError, match="attention_probe"):
        get_selector("attention")(latents, bad_probe)


@pytest.mark.parametrize("lengths", [[16, 16], [16, 9]], ids=["one_length", "two_lengths"])
def test_empty_batch_selects_nothing(lengths):
    """A batch of no sample: every selector, with a fixed and an adaptive budget, returns an empty [0, N] mask."""
    n = sum(lengths)
    extra = {"user_mask": torch.zeros(0, n, dtype=torch.bool), "target_queries": torch.randn(0, 4, HEADS, HEAD_DIM),
             "queries": torch.randn(0, 4, HEADS, HEAD_DIM), "ref_keys": torch.randn(0, n, HEADS, HEAD_DIM)}
    ctx = SelectionContext(len(lengths), lengths, generator=torch.Generator().manual_seed(0), extra=extra)
    for name in available_selectors():
        for budget in (0.25, adaptive(0.9)):
            keep = select(torch.randn(0, n, CHANNELS), ctx, name, budget=budget)
            assert keep.dtype == torch.bool and keep.shape == (0, n), (name, budget)


# ----------------------------------------------------------------------------------------------------------------
# GPU: the same selection on the device as on the CPU
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", BUILTIN)
def test_device_selection_matches_cpu(name):
    """The same keep masks on the GPU as on the CPU. Inputs in float64, so that cuBLAS and the CPU's different
    fp32 rounding cannot flip a near-tie at the budget's edge (the selection logic is what is compared)."""
    latents, ctx = _full_context(2, 4)
    latents = latents.double()
    ctx.extra = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in ctx.extra.items()}
    cuda_extra = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in ctx.extra.items()}
    cuda_ctx = SelectionContext(4, ctx.ref_lengths, reference_ids=ctx.reference_ids.cuda(), target_shape=(4, 4),
                                generator=torch.Generator("cuda").manual_seed(1), extra=cuda_extra)
    keep = select(latents.cuda(), cuda_ctx, name, adaptive(0.7, floor=2, cap=0.5))
    assert keep.device.type == "cuda"
    if name == "random":  # the CUDA generator draws other numbers than the CPU one: the CPU ranks the CUDA draw
        cuda_ctx.generator = torch.Generator("cuda").manual_seed(1)
        scores = get_selector("random")(latents.cuda(), cuda_ctx).cpu()
        expected = select(latents, ctx, lambda latents, context: scores, adaptive(0.7, floor=2, cap=0.5))
    else:
        expected = select(latents, ctx, name, adaptive(0.7, floor=2, cap=0.5))
    assert torch.equal(keep.cpu(), expected)


@pytest.mark.gpu
def test_user_scores_on_another_device_are_moved_to_the_latents():
    """A user callable that scores on the CPU for CUDA latents: its scores (and so the keep mask) come back on the
    latents' device, for select() and for the selector wrapper that enable() calls."""
    latents, ctx = _full_context(2, 2)
    cuda_ctx = SelectionContext(2, ctx.ref_lengths, reference_ids=ctx.reference_ids.cuda())
    scores = get_selector(lambda latents, context: latents.norm(dim=-1).cpu())(latents.cuda(), cuda_ctx)
    assert scores.device.type == "cuda"
    keep = select(latents.cuda(), cuda_ctx, lambda latents, context: latents.norm(dim=-1).cpu(), adaptive(0.5))
    assert keep.device.type == "cuda"
    assert torch.equal(keep.cpu(), select(latents, ctx, lambda latents, context: latents.norm(dim=-1), adaptive(0.5)))


# ----------------------------------------------------------------------------------------------------------------
# a second review's findings: each test failed before its fix
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mass", ["auto", "linear", "softmax"])
def test_adaptive_budget_on_a_keep_mask_covers_the_marked_tokens_only(mass):
    """A selector's keep mask with an adaptive budget keeps ceil(coverage x marked) of each image's marked tokens;
    an image with nothing marked keeps its floor (before: an all-zero row read as a uniform mass kept 90% of it, and
    mass='softmax' spread the mass over unmarked tokens too)."""
    latents = torch.randn(1, 20, CHANNELS)
    context = SelectionContext(2, [10, 10])
    marked = torch.zeros(1, 20, dtype=torch.bool)
    marked[0, [1, 5, 6]] = True

    def counts(budget):
        keep = select(latents, context, lambda x, c: marked, budget)
        assert not (keep & ~marked).any() or budget.floor  # only marked tokens, unless the floor pads
        return [int(keep[0, :10].sum()), int(keep[0, 10:].sum())]

    assert counts(adaptive(coverage=0.9, mass=mass)) == [3, 0]
    assert counts(adaptive(coverage=0.5, mass=mass)) == [2, 0]
    assert counts(adaptive(coverage=0.9, floor=2, mass=mass)) == [3, 2]
    # cap wins over floor (a ratio's 4 tokens against a count; of one kind, a floor above the cap is refused)
    assert counts(adaptive(coverage=0.9, floor=0.4, cap=2, mass=mass)) == [2, 2]


def test_fixed_count_refuses_numpy_floats_and_strings():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="count must be an int"):
        fixed_count(np.float32(0.5))  # was read as a ratio: half of each image
    with pytest.raises(TypeError, match="fixed_count"):
        fixed_count("3")  # was accepted, failed when used
    assert fixed_count(np.int64(3))(torch.rand(1, 10), [10]).counts.tolist() == [[3]]
    with pytest.raises(TypeError, match="must be an int count"):  # a ratio reaching a count budget's scalar path
        selection._per_image("count", np.float32(0.5), 1, [10], "cpu", allow_ratio=False)


def test_register_selector_signals_and_selector_objects():
    """signals given as a string is refused (it was split into characters); a Selector registered under another
    name takes that name and the call's returns_scores / signals (they were ignored)."""
    with pytest.raises(TypeError, match="signals must be a list of names"):
        register_selector("_test_string_signals", lambda x, c: torch.rand(x.shape[:2]), signals="user_mask")
    with pytest.raises(TypeError, match="signals must be a list of names"):
        register_selector("_test_string_signals", lambda x, c: torch.rand(x.shape[:2]), signals=3)
    with pytest.raises(TypeError, match="signals must be a list of names"):
        register_selector("_test_string_signals", lambda x, c: torch.rand(x.shape[:2]), signals=["a", 3])
    assert "_test_string_signals" not in available_selectors()
    # switches given as strings: overwrite="no" replaced a built-in selector, returns_scores="no" read as True
    uniform = get_selector("uniform")
    for flag in ("overwrite", "returns_scores", "reads_generator"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            register_selector("uniform", lambda x, c: torch.rand(x.shape[:2]), **{flag: "no"})
    assert get_selector("uniform") is uniform
    base = get_selector("uniform")
    try:
        again = register_selector("_test_uniform_again", base, signals=["my_signal"])
        assert again.name == "_test_uniform_again" and again.returns_scores and again.signals == {"my_signal"}
        plain = register_selector("_test_mask_selector", Selector(lambda x, c: x[..., 0] > 0), signals=["a"])
        assert not plain.returns_scores and plain.signals == {"a"}
        once = register_selector("_test_generator_signals", lambda x, c: torch.rand(x.shape[:2]),
                                 signals=(name for name in ["my_signal"]))  # (a generator, read once)
        assert once.signals == {"my_signal"}
    finally:
        for name in ("_test_uniform_again", "_test_mask_selector", "_test_generator_signals"):
            selection._REGISTRY.pop(name, None)


def test_a_registered_function_given_itself_is_its_registered_selector():
    """A function registered with what it returns, reads and draws is that selector when given as the function
    too (before: a fresh wrapper that may return anything and reads the generator, so enable(selector=fn,
    budget=None) on a score function was accepted and a misspelt signal was not refused)."""
    def scorer(latents, context):
        return latents.norm(dim=-1)

    def unregistered(latents, context):
        return latents.norm(dim=-1)

    try:
        registered = register_selector("_test_scorer", scorer, returns_scores=True, signals=["weights"],
                                       reads_generator=False)
        assert get_selector(scorer) is registered
        assert get_selector(unregistered) is not registered and get_selector(unregistered).signals is None
        with pytest.raises(ValueError, match="returns scores"):
            sparsectx.integration._check_settings_for(get_selector(scorer), None, {})
        with pytest.raises(ValueError, match="reads no signal named"):
            sparsectx.integration._check_settings_for(get_selector(scorer), 0.5, {"wieghts": 1})
    finally:
        selection._REGISTRY.pop("_test_scorer", None)


def test_per_request_lists_in_budget_objects_map_onto_the_batch():
    """fixed_ratio([[0.5], [0.25]]) / adaptive(floor=[[6], [1]]) (one list per request) on a batch of 2 requests
    x 2 samples: the same as the [R, 1] tensor form (before: 'does not broadcast to [B=4, n_refs=2]')."""
    from sparsectx.selection import budget_first_sample, budget_for_batch

    for as_list, as_tensor in ((fixed_ratio([[0.5], [0.25]]), fixed_ratio(torch.tensor([[0.5], [0.25]]))),
                               (adaptive(0.5, floor=[[6], [1]]), adaptive(0.5, floor=torch.tensor([[6], [1]])))):
        scores = torch.rand(4, 20, generator=torch.Generator().manual_seed(0))
        got, want = (budget_for_batch(b, 4)(scores, [12, 8]) for b in (as_list, as_tensor))
        assert torch.equal(got.counts, want.counts) and torch.equal(got.keep, want.keep)
        assert not torch.equal(got.counts[0], got.counts[2])  # the two requests differ
        first = budget_first_sample(as_list)(scores[:1], [12, 8]).counts
        assert torch.equal(first, want.counts[:1])
    with pytest.raises(ValueError, match="3 rows .one per request., which does not divide the batch of 4"):
        budget_for_batch(fixed_ratio([[0.5], [0.25], [1.0]]), 4)


def test_numpy_coverage_is_accepted():
    np = pytest.importorskip("numpy")
    scores = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    for numpy_value in (np.float32(0.7), np.float64(0.7)):
        assert torch.equal(adaptive(numpy_value)(scores).counts, adaptive(float(numpy_value))(scores).counts)
    with pytest.raises(ValueError, match="coverage"):
        adaptive(np.float32(1.5))


def test_a_narrow_float_coverage_counts_as_written():
    """float32/float16 coverage (a numpy scalar or a tensor, per image too) is read as the decimal written, as the
    ratios are: 0.3 of 10 equal scores keeps 3 (before: float32's 0.30000001 is above 0.3 of the mass, 4 kept)."""
    np = pytest.importorskip("numpy")
    scores, lengths = torch.ones(1, 20), [10, 10]
    mask = torch.ones(1, 20, dtype=torch.bool)
    for coverage in (0.3, np.float32(0.3), torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float16),
                     torch.tensor([0.3, 0.3]), torch.tensor(0.3, dtype=torch.bfloat16)):
        budget = adaptive(coverage)  # (bf16's 0.30078125 too is the decimal 0.3 written)
        assert budget(scores, lengths).counts.tolist() == [[3, 3]], coverage
        assert budget.sized_on_mask(mask, lengths).counts.tolist() == [[3, 3]], coverage


def test_attention_selector_names_a_missing_ref_keys():
    batch, n = 2, 16
    context = SelectionContext(1, [n], extra={"text_queries": torch.randn(batch, 3, HEADS, HEAD_DIM)})
    with pytest.raises(ValueError, match=r"selector 'attention' needs context.extra\['ref_keys'\]"):
        get_selector("attention")(torch.randn(batch, n, CHANNELS), context)


@pytest.mark.parametrize("max_queries, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_attention_mass_refuses_a_bad_max_queries(max_queries, error):
    with pytest.raises(error, match="max_queries must be None or an int >= 1"):
        selection.attention_mass(torch.randn(1, 4, 1, 8), torch.randn(1, 6, 1, 8), max_queries=max_queries)


def test_select_names_a_bad_budget_as_the_budget():
    """select(..., budget=1.5) said 'fixed_ratio: ratio must lie in [0, 1]', naming the helper a number becomes; the
    ratio 0.0 keeps nothing, as in enable and compact_tokens."""
    latents, ctx = _full_context(2, 2)
    for budget, words in ((1.5, r"budget 1.5: ratio must lie in \[0, 1\], got 1.5"),
                          (-1, r"budget -1: count must be an int >= 0, got -1")):
        with pytest.raises(ValueError, match=words):
            select(latents, ctx, "uniform", budget)
    assert not select(latents, ctx, "uniform", 0.0).any()


def test_standalone_api_refuses_what_it_would_get_wrong():
    """Found by using the selection API outside a pipeline: sample_generators of another length than the batch
    fell back to the global RNG (other tokens at every call), bool reference_ids failed inside torch, and
    attention_mass failed inside einsum on mismatched or 3-D inputs; each is now a ValueError/TypeError naming the
    argument. Queries and keys of different float dtypes are computed in the wider one (they failed in matmul)."""
    latents, ctx = _full_context(3, 2)
    # a context that is not one (an AttributeError inside before), values on the meta device (blamed on the selector,
    # or torch's "Cannot copy out of meta tensor")
    for context in ({"ref_lengths": ctx.ref_lengths}, None):
        with pytest.raises(TypeError, match="context must be a SelectionContext"):
            select(latents, context, "uniform", 0.5)
    with pytest.raises(ValueError, match="reference_latents is on the meta device"):
        select(latents.to("meta"), ctx, "uniform", 0.5)
    misspelt = SelectionContext(2, ctx.ref_lengths, extra={"user_mask_": None})
    with pytest.raises(ValueError, match="reference_latents must be a"):  # the latents first, then the signals
        select(latents[0], misspelt, "edit", 0.5)
    from sparsectx.selection import adaptive_budget

    with pytest.raises(ValueError, match="scores are on the meta device"):
        adaptive_budget(torch.rand(3, 8, device="meta"), 0.5)
    masked = SelectionContext(2, ctx.ref_lengths, extra={"user_mask": torch.zeros(latents.shape[:2], dtype=torch.bool,
                                                                                    device="meta")})
    with pytest.raises(ValueError, match=r"extra\['user_mask'\] is on the meta device"):
        select(latents, masked, "edit", 0.5)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    short = SelectionContext(2, ctx.ref_lengths, sample_generators=generators)
    with pytest.raises(ValueError, match="sample_generators has 2 generators for a batch of 3"):
        select(latents, short, "random", 5)
    with pytest.raises(TypeError, match="reference_ids must hold integer or float positions"):
        SelectionContext(2, ctx.ref_lengths, reference_ids=ctx.reference_ids.bool())
    from sparsectx.selection import attention_mass

    queries, keys = ctx.extra["target_queries"], ctx.extra["ref_keys"]
    for bad_queries, bad_keys, mask, words in (
            (queries[..., 0], keys, None, "queries must be a float"),
            (queries, keys[:1], None, "keys .* must have the batch, heads and head dim of queries"),
            (queries, keys[:, :, :1], None, "keys .* must have the batch, heads and head dim of queries"),
            (queries, keys, torch.ones(3, 2, dtype=torch.bool), "query_mask must be bool")):
        with pytest.raises(ValueError, match=words):
            attention_mass(bad_queries, bad_keys, mask)
    for q_dtype, k_dtype in ((torch.float32, torch.float16), (torch.bfloat16, torch.float32)):
        got = attention_mass(queries.to(q_dtype), keys.to(k_dtype))
        # computed in the wider dtype: within fp32 rounding of the same (rounded) inputs in fp64 (computed in the
        # narrower one, the error is 2e-5 in fp16 and 2e-4 in bf16, which this bound catches)
        expected = attention_mass(queries.to(q_dtype).double(), keys.to(k_dtype).double())
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-7)


# fewer ops per selection
def _aten_ops(fn) -> int:
    """How many aten ops one call of ``fn()`` dispatches (each a kernel launch or a view on a GPU; sparsectx's ops
    run as their custom ops under the mode, one call each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_selection_ops_do_not_grow_per_bit_or_per_image():
    """Selection is host-bound on a GPU (small tensors, one launch after another): `uniform` scores, a fixed budget's
    top-k and an adaptive budget's counts take a bounded number of ops (before: ~6 ops per code bit and a handful
    per image: 182 / 195 ops for `uniform` at 3 / 4 references, 57 / 70 for a fixed ratio, 235 for `adaptive` at 4;
    then 22 for a fixed ratio and 85 / 100 for `adaptive`, before the budgets' ranking kernel)."""
    ops = {}
    for n_refs in (3, 4):
        latents, context = _full_context(1, n_refs)
        context.extra.clear()
        scores = selection.uniform_scores(latents, context)
        ops["uniform", n_refs] = _aten_ops(lambda: selection.uniform_scores(latents, context))
        for name, budget in (("fixed", fixed_ratio(0.1)), ("adaptive", adaptive(0.9, floor=0.02, cap=0.5))):
            budget(scores, context.ref_lengths)  # (the layout's constants made once, as by any earlier call)
            ops[name, n_refs] = _aten_ops(lambda: budget(scores, context.ref_lengths))
    assert ops["uniform", 3] == ops["uniform", 4] <= 80, ops
    # one sort of the images' rows (padded to the longest: the images differ in length) and one Triton launch
    assert ops["fixed", 3] == ops["fixed", 4] <= 16, ops
    assert ops["adaptive", 3] == ops["adaptive", 4] <= 16, ops


def test_images_of_one_length_are_budgeted_in_one_pass():
    """Images of one length are budgeted as one row per (sample, image): counts and keep masks equal those of each
    image budgeted alone, and the ops of the budgets and of the task-aware selectors do not grow with the number
    of images."""
    gen = torch.Generator().manual_seed(3)
    budgets = {"fixed": fixed_ratio(0.3), "adaptive": adaptive(0.8, floor=1, cap=0.9),
               "linear": adaptive(0.6, mass="linear")}
    ops = {}
    for n_refs in (1, 3, 4):
        lengths = [7] * n_refs
        scores = torch.randn(2, 7 * n_refs, generator=gen).round(decimals=1)  # ties inside and across images
        for name, budget in budgets.items():
            x = scores.abs() if name == "linear" else scores
            whole = budget(x, lengths)
            alone = [budget(x[:, lo:hi], [7]) for lo, hi in selection._image_slices(lengths)]
            assert torch.equal(whole.counts, torch.cat([r.counts for r in alone], dim=1)), (name, n_refs)
            assert torch.equal(whole.keep, torch.cat([r.keep for r in alone], dim=1)), (name, n_refs)
            ops[name, n_refs] = _aten_ops(lambda: budget(x, lengths))
        shapes = [(3, 4)] * n_refs  # the task-aware selectors' per-image work too
        extra = {"user_mask": torch.rand(1, 12 * n_refs, generator=gen) < 0.2,
                 "target_queries": torch.randn(1, 5, HEADS, HEAD_DIM, generator=gen),
                 "ref_keys": torch.randn(1, 12 * n_refs, HEADS, HEAD_DIM, generator=gen)}
        context = SelectionContext(n_refs, [12] * n_refs, reference_ids=_ids(shapes), extra=extra)
        latents = torch.randn(1, 12 * n_refs, CHANNELS, generator=gen)
        for name in ("subject", "edit"):
            ops[name, n_refs] = _aten_ops(lambda: get_selector(name)(latents, context))
    for name in (*budgets, "subject", "edit"):
        assert ops[name, 3] == ops[name, 4], ops


def test_counts_beyond_int64_keep_the_whole_image():
    """A count budget of 2**63 or more (a scalar, or a list entry) keeps every token of its image (before: the
    float64 count overflowed int64 when converted and the image kept nothing)."""
    latents, context = _full_context(1, 2)
    context.extra.clear()
    everything = torch.ones(latents.shape[:2], dtype=torch.bool)
    for budget in (2 ** 63 - 1, 2 ** 64, fixed_count([2 ** 63, 2 ** 70])):
        assert torch.equal(select(latents, context, "uniform", budget=budget), everything), budget
    assert torch.equal(fixed_count([2 ** 63, 3])(torch.rand(latents.shape[:2]), context.ref_lengths).counts,
                       torch.tensor([[context.ref_lengths[0], 3]]))


def _dilate_brute_force(signal, shapes, radius):
    """Max of signal over each token's (2r+1)² neighbourhood in its own image (row-major h x w images)."""
    out, lo = torch.empty_like(signal), 0
    for h, w in shapes:
        image = signal[:, lo:lo + h * w].view(-1, h, w)
        for r in range(h):
            for c in range(w):
                window = image[:, max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1]
                out[:, lo + r * w + c] = window.amax(dim=(1, 2))
        lo += h * w
    return out


@pytest.mark.parametrize("shapes", [[(4, 5), (5, 4), (3, 3)], [(3, 5), (2, 4)], [(2, 24), (24, 2), (1, 1)]],
                         ids=["similar_shapes", "wider_than_tall", "shapes_far_apart"])
@pytest.mark.parametrize("grid_from", ["ids", "ref_shapes"])
def test_dilation_stays_inside_each_image(shapes, grid_from):
    """The edit selector's context ring: max over each token's neighbourhood in its own image, whether the images
    share one canvas (similar shapes; a canvas wider than tall, whose rows and columns must not be swapped) or are
    pooled one by one (shapes far apart: one canvas sized for the largest height and width would be mostly padding),
    with the grid read from ids or made from known shapes."""
    lengths = [h * w for h, w in shapes]
    signal = torch.rand(2, sum(lengths), generator=torch.Generator().manual_seed(16))
    context = SelectionContext(len(shapes), lengths, reference_ids=_ids(shapes)) if grid_from == "ids" else \
        SelectionContext(len(shapes), lengths, extra={"ref_shapes": shapes})
    for radius in (1, 2):
        assert torch.equal(selection._dilate(signal, context, radius), _dilate_brute_force(signal, shapes, radius))


def test_dilation_refuses_ids_that_are_not_a_token_grid():
    """Ids far from a token grid (scaled positions: 4 tokens spanning 1e6 x 1e6 cells) would size a dense canvas
    of 1e12 cells: a ValueError names the reference instead of an allocation failure."""
    ids = _ids([(2, 2), (2, 2)])
    ids[:, 4:, 1:] *= 1e6
    context = SelectionContext(2, [4, 4], reference_ids=ids)
    with pytest.raises(ValueError, match="the ids of reference 1 span a .* grid for its 4 tokens: not a token grid"):
        selection._dilate(torch.rand(1, 8), context, 1)


def test_select_refuses_a_signal_the_selector_does_not_read():
    """A misspelt signal in context.extra was ignored by select() (`subject` then ran on saliency alone); it is
    refused as enable(signals=...) refuses it. Names a selector reads, and internal ones, pass."""
    latents, context = _full_context(1, 2)
    context.extra["target_query"] = context.extra.pop("target_queries")
    with pytest.raises(ValueError, match=r"selector 'subject' reads no signal named \['target_query'\]"):
        select(latents, context, "subject", 0.25)
    context.extra["target_queries"] = context.extra.pop("target_query")
    context.extra["_probe_ran"] = False
    assert select(latents, context, "subject", 0.25).sum() > 0
    custom = selection.Selector(lambda latents, context: context.extra["my_mask"].float(), "reads_my_mask",
                                returns_scores=True, signals=frozenset({"my_mask"}))
    context.extra = {"my_mask": torch.ones(latents.shape[:2], dtype=torch.bool), "text_queries": None}
    assert select(latents, context, custom, 3).sum() == 6  # a probe tensor name left from an earlier selection
    context.extra["my_masks"] = context.extra["my_mask"]
    with pytest.raises(ValueError, match=r"reads no signal named \['my_masks'\]"):
        select(latents, context, custom, 3)


# ----------------------------------------------------------------------------------------------------------------
# host work: cached constants, shortcuts that must select exactly as the general path does
# ----------------------------------------------------------------------------------------------------------------
def test_cached_layout_tensors_never_reach_callers():
    """Counts of scalar budget settings and uniform scores of a layout without ids are cached per layout: what a
    caller gets is its own copy (writing into it changes no later result)."""
    shapes = [(3, 5), (4, 4)]
    lengths = [h * w for h, w in shapes]
    latents = torch.randn(1, sum(lengths), CHANNELS)
    for extra in ({"ref_shapes": shapes}, {}):
        context = SelectionContext(2, lengths, extra=extra)
        first = get_selector("uniform")(latents, context)
        expected = first.clone()
        first.fill_(0.0)
        assert torch.equal(get_selector("uniform")(latents, context), expected)
    scores = torch.rand(2, sum(lengths), generator=torch.Generator().manual_seed(3))
    result = fixed_ratio(0.3)(scores, lengths)
    expected = result.counts.clone()
    result.counts.zero_()
    assert torch.equal(fixed_ratio(0.3)(scores, lengths).counts, expected)
    assert torch.equal(fixed_ratio(0.3)(scores, lengths).keep.sum(dim=1), expected.sum(dim=1))


def test_constants_cached_under_inference_mode_serve_autograd_calls():
    """A layout first seen under torch.inference_mode (a pipeline call) caches plain tensors: a later call with
    latents that require grad (training) can use them."""
    shapes = [(3, 7), (2, 9)]  # a layout no other test uses: its constants are made under inference mode here
    lengths = [h * w for h, w in shapes]
    latents = torch.randn(2, sum(lengths), CHANNELS)
    for extra in ({"ref_shapes": shapes}, {}):
        context = SelectionContext(2, lengths, extra=extra)
        with torch.inference_mode():
            expected = [select(latents, context, name, budget)
                        for name in ("subject", "uniform") for budget in (0.3, 4, adaptive(0.8, floor=2, cap=0.5))]
        grad_latents = latents.clone().requires_grad_(True)
        scores = get_selector("subject")(grad_latents, context)
        scores.sum().backward()  # the cached grid and spread enter the graph as constants
        assert grad_latents.grad is not None
        got = [select(grad_latents, context, name, budget)
               for name in ("subject", "uniform") for budget in (0.3, 4, adaptive(0.8, floor=2, cap=0.5))]
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("bits", [1, 5, 16, 20, 32])
@pytest.mark.parametrize("spread", [False, True])
def test_bit_reversal_matches_a_bit_by_bit_reference(bits, spread):
    values = torch.randint(0, 2**40, (300,), generator=torch.Generator().manual_seed(bits))
    values[:3] = torch.tensor([0, 2**bits - 1, 2**bits])
    expected = [sum(((v >> i) & 1) << ((2 if spread else 1) * (bits - 1 - i)) for i in range(bits))
                for v in values.tolist()]
    assert selection._reversed_bits(values, bits, spread).tolist() == expected


def test_adaptive_auto_mass_is_decided_per_row():
    """mass='auto' reads the scores of a row without a negative score linearly and a row with one through a
    softmax, whether or not other rows of the batch have negative scores."""
    generator = torch.Generator().manual_seed(8)
    positive, signed = torch.rand(1, 24, generator=generator), torch.randn(1, 24, generator=generator)
    lengths = [10, 14]
    for coverage in (0.3, 0.7, 0.95):
        alone_positive = adaptive_budget(positive, coverage, ref_lengths=lengths, mass="linear")
        alone_signed = adaptive_budget(signed, coverage, ref_lengths=lengths, mass="softmax")
        assert torch.equal(adaptive_budget(positive, coverage, ref_lengths=lengths).counts, alone_positive.counts)
        batch = adaptive_budget(torch.cat([positive, signed]), coverage, ref_lengths=lengths)
        assert torch.equal(batch.counts, torch.cat([alone_positive.counts, alone_signed.counts]))
        assert torch.equal(batch.keep, torch.cat([alone_positive.keep, alone_signed.keep]))


def test_a_fixed_budget_given_unchecked_scores_still_refuses_nan():
    """select() skips the fixed budget's NaN check (its Selector checked the scores); apply_budget given scores of
    its own still checks them, and a selector returning NaN is still refused by name."""
    latents = torch.randn(1, 8, CHANNELS)
    context = SelectionContext(2, [4, 4])
    nan_scores = torch.full((1, 8), math.nan)
    for budget in (0.5, 2, fixed_ratio([0.5, 0.25]), adaptive(0.9)):
        with pytest.raises(ValueError, match="scores contain NaN"):
            selection.apply_budget(nan_scores, latents, context, budget)
        with pytest.raises(ValueError, match="returned NaN scores"):
            select(latents, context, lambda x, c: torch.full(x.shape[:2], math.nan), budget)


def test_budget_settings_refused_at_construction_and_selectors_named_in_errors():
    """Found by a review: per-request floor and cap of different request counts (2 rows against 3) were accepted,
    and a floor above its cap in them found only after the selector and its probe ran; a bool or complex coverage
    tensor was read as numbers; numpy scalars out of range built a budget that failed at its first use (or, as a
    floor, said "above cap"); +inf scores under an adaptive budget did not name the selector; a user_mask of the
    wrong shape or dtype did not say what it was."""
    import numpy as np
    with pytest.raises(ValueError, match="give 2 and 3 rows"):
        adaptive(0.5, floor=[[0.5], [0.1]], cap=[[0.6], [0.3], [0.2]])
    adaptive(0.5, floor=[[0.1]], cap=[[0.6], [0.3], [0.2]])  # (one row serves every request)
    # a floor per request and a cap per sample (2 images per prompt) agree on the requests (a first fix refused it)
    per_sample = adaptive(0.5, floor=[[0.5], [0.05]], cap=[[1.0], [1.0], [0.4], [0.4]])
    scores = torch.zeros(4, 10)
    scores[:, 0] = 1.0  # (all the mass on one token: the floor decides)
    assert selection.budget_for_batch(per_sample, 4)(scores, [10]).counts.flatten().tolist() == [5, 5, 1, 1]
    with pytest.raises(ValueError, match="is above cap"):  # compared sample by sample
        adaptive(0.5, floor=[[0.5], [0.05]], cap=[[1.0], [0.4], [0.4], [0.4]])
    for coverage in (torch.tensor(True), torch.tensor(0.5 + 0j)):
        with pytest.raises(TypeError, match="coverage must be a float or a real tensor"):
            adaptive(coverage)
    for bad in (np.float32(1.5), np.int64(2)):
        with pytest.raises(ValueError, match="fixed_ratio: ratio must lie in"):
            fixed_ratio(bad)
    with pytest.raises(ValueError, match="floor ratio must lie in"):
        adaptive(0.9, floor=np.float32(1.5))
    with pytest.raises(ValueError, match="count must be >= 0"):
        adaptive(0.9, cap=np.int64(-1))
    latents, ctx = _full_context(1, 2)
    with pytest.raises(ValueError, match="selector '<lambda>' returned \\+inf scores: their mass is undefined"):
        select(latents, ctx, lambda x, c: torch.full(x.shape[:2], math.inf), adaptive(0.5))
    n = latents.shape[1]
    context = SelectionContext(ctx.num_references, ctx.ref_lengths, extra={"user_mask": torch.ones(1, n - 1)})
    with pytest.raises(ValueError, match=f"must be bool \\[B=1, N={n}\\], got torch.float32 \\[1, {n - 1}\\]"):
        get_selector("edit")(latents, context)


def test_an_adaptive_budget_reads_the_scores_once():
    """Under an adaptive budget the selector's NaN check is left to the budget's read of the scores' range (one
    host read per selection, not two); a fixed budget keeps the selector's check (its only read)."""
    from sparsectx.diagnostics import count_host_reads

    latents, context = _full_context(1, 3)
    for budget, reads in ((adaptive(0.8, floor=0.1), 1), (0.3, 1)):
        with count_host_reads() as counted:  # (float ids: one read more, their finiteness check)
            select(latents, context, "subject", budget)
        assert counted.count == reads + 1, (budget, counted.ops)
        context.reference_ids = context.reference_ids.long()  # integer ids (FLUX.2's) need no check
        with count_host_reads() as counted:
            select(latents, context, "subject", budget)
        assert counted.count == reads, (budget, counted.ops)
        context.reference_ids = context.reference_ids.float()


# the drop-in's grid shapes: the selectors' grid made from shapes known on the host instead of the device ids
def test_row_major_shapes_recognise_exactly_the_pipelines_grids():
    for n_refs in (1, 2, 4):
        shapes, lengths = _layout(n_refs)
        for n_axes in (3, 4):
            hw = _ids(shapes, n_axes)[0, :, 1:3]
            assert selection.row_major_shapes(hw, lengths) == shapes
            assert selection.row_major_shapes(hw.long(), lengths) == shapes
    shapes, lengths = _layout(2)
    hw = _ids(shapes)[0, :, 1:3]
    swapped = hw.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # two tokens out of row-major order
    column_major = torch.cat([_ids([(w, h)])[0, :, [2, 1]] for h, w in shapes])  # same cells, column-major order
    holed = hw.clone()
    holed[5, 1] += 100  # one token outside its image's grid
    fractional = hw.clone()
    fractional[3, 0] += 0.5
    for bad in (swapped, column_major, holed, fractional):
        assert selection.row_major_shapes(bad, lengths) is None
    assert selection.row_major_shapes(hw, [lengths[0] - 1, lengths[1] + 1]) is None  # images split elsewhere


@pytest.mark.parametrize("n_refs", [1, 3, 4])
@pytest.mark.parametrize("name", BUILTIN)
def test_selection_is_the_same_from_the_grid_shapes_as_from_the_ids(name, n_refs):
    """With the drop-in's ``IDS_GRID_SHAPES`` in ``extra`` every built-in selector gives the same scores and masks
    (fixed and adaptive budgets) as from the device ids, with fewer ops (the grid and the uniform order are made once
    per layout)."""
    latents, context = _full_context(2, n_refs)
    shapes, lengths = _layout(n_refs)
    with_shapes = SelectionContext(n_refs, lengths, reference_ids=context.reference_ids, target_shape=(4, 4),
                                   generator=torch.Generator().manual_seed(1),
                                   extra={**context.extra, selection.IDS_GRID_SHAPES: shapes})
    for budget in (0.3, adaptive(0.8, floor=0.1, cap=0.6)):
        for ctx in (context, with_shapes):
            ctx.generator.manual_seed(1)
        got = select(latents, with_shapes, name, budget=budget)
        want = select(latents, context, name, budget=budget)
        assert torch.equal(got, want), (name, budget)
    for ctx in (context, with_shapes):
        ctx.generator.manual_seed(1)
    assert torch.equal(get_selector(name)(latents, with_shapes), get_selector(name)(latents, context))
    unknown = SelectionContext(n_refs, lengths, reference_ids=context.reference_ids, target_shape=(4, 4),
                               generator=torch.Generator().manual_seed(1),
                               extra={**context.extra, selection.IDS_GRID_SHAPES: None})  # no shapes: the ids' grid
    context.generator.manual_seed(1)
    assert torch.equal(get_selector(name)(latents, unknown), get_selector(name)(latents, context))
    if name in ("uniform", "edit", "subject"):  # the selectors that read the grid
        assert _aten_ops(lambda: get_selector(name)(latents, with_shapes)) < \
            _aten_ops(lambda: get_selector(name)(latents, context))


def test_narrow_float_ratio_tensors_count_as_the_decimals_written(monkeypatch):
    """A float32 (the default of torch.tensor) ratio tensor keeps the count its Python float keeps: 0.7 of 5 tokens
    is 4 (half up), where float32's 0.69999998 gave 3, in budgets, adaptive floors and compact_tokens alike.
    (compact_tokens counts on the host before it dispatches: its 600 calls of the sweep take the torch reference
    path, 0.2 ms each against 70 ms through the interpreter; the binary ratios below run the kernels' path.)"""
    mismatches = []
    with monkeypatch.context() as reference_path:
        reference_path.setattr(sparsectx.ops, "_use_triton", lambda t: False)
        for hundredths in range(1, 101):
            ratio = hundredths / 100
            for length in (5, 10, 25, 45, 50, 75):
                want = math.floor(ratio * length + 0.5)
                scores = torch.rand(1, length, generator=torch.Generator().manual_seed(length))
                got = (int(fixed_ratio(torch.tensor([ratio]))(scores, [length]).counts[0, 0]),
                       int(adaptive(0.0, floor=torch.tensor([[ratio]]))(scores, [length]).counts[0, 0]),
                       int(sparsectx.compact_tokens(scores, budget=torch.tensor([ratio])).cu_seqlens[-1]))
                if got != (want,) * 3:
                    mismatches.append((ratio, length, want, got))
    assert not mismatches, mismatches[:5]
    # exact binary ratios keep their counts, and a positive ratio never becomes 0 (a fixed number of decimals did)
    for dtype, ratio, length, want in ((torch.bfloat16, 0.125, 4096, 512), (torch.float16, 0.0625, 4096, 256),
                                       (torch.float32, 1.5 / 4096, 4096, 2), (torch.bfloat16, 1 / 512, 1024, 2)):
        scores = torch.rand(1, length, generator=torch.Generator().manual_seed(0))
        budget = torch.tensor([ratio], dtype=dtype)
        assert int(fixed_ratio(budget)(scores, [length]).counts[0, 0]) == want, (dtype, ratio)
        assert int(sparsectx.compact_tokens(scores, budget=budget).cu_seqlens[-1]) == want, (dtype, ratio)


def test_numpy_narrow_float_ratios_count_as_the_decimals_written():
    """``np.float32(0.7)`` (what a numpy pipeline config holds) keeps the count 0.7 keeps, as a float32 tensor does:
    4 of 5 tokens (its float value 0.69999999 rounded half up to 3), in fixed ratios (scalar, per image, per
    request), adaptive floors, 0-d tensors in lists, and the drop-in's budgets."""
    np = pytest.importorskip("numpy")
    from sparsectx.integration import check_budget

    scores = torch.rand(1, 5, generator=torch.Generator().manual_seed(0))
    for value in (np.float32(0.7), np.float16(0.7)):
        for setting in (value, [value], [[value]], [torch.tensor(0.7)]):
            assert int(fixed_ratio(setting)(scores, [5]).counts[0, 0]) == 4, setting
        assert int(adaptive(0.0, floor=value)(scores, [5]).counts[0, 0]) == 4
        assert check_budget(value) == 0.7 and check_budget([value, 3]) == [0.7, 3]
    # rows given as numpy arrays work (their narrow floats as written too, and without torch's warning about tensors
    # made from lists of arrays), and strings or 1-d tensors in a list are still refused by name
    two = torch.rand(1, 10, generator=torch.Generator().manual_seed(1))
    with warnings_as_errors():
        assert fixed_ratio([np.array([0.5, 0.3])])(two, [5, 5]).counts.tolist() == [[3, 2]]
        assert fixed_ratio([np.array([0.7, 0.3], dtype=np.float32)])(two, [5, 5]).counts.tolist() == [[4, 2]]
    for bad in (["0.5", "0.3"], [torch.tensor([0.5, 0.3])]):
        with pytest.raises(ValueError, match="fixed_ratio must be a ratio"):
            fixed_ratio(bad)(two, [5, 5])


def test_per_request_rows_of_a_count_and_a_ratio_are_not_the_same_setting():
    """``[[1], [1.0]]``: one token for the first request, every token for the second (Python's ``[1] == [1.0]`` made
    the drop-in take the batch as uniform and give both requests the first one's setting)."""
    budget = selection.budget_for_batch(adaptive(0.0, floor=[[1], [1.0]], cap=1.0), 2)
    assert not selection.budget_same_per_sample(budget)
    assert selection.budget_same_per_sample(selection.budget_for_batch(adaptive(0.0, floor=[[2], [2]]), 2))


def test_selection_builds_its_host_constants_on_the_host_whatever_the_default_device():
    """Under ``torch.set_default_device`` (meta stands in for a GPU here) the host-side constants (layouts, grids,
    tables) stay on the host: selection and the drop masks run (they refused a default-device tensor)."""
    from sparsectx.training import random_drop_mask

    latents = torch.randn(2, 28, 4)
    shapes_context = SelectionContext(2, [16, 12], extra={"ref_shapes": [(4, 4), (3, 4)]})
    hw = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    torch.set_default_device("meta")
    try:
        uniform = select(latents, shapes_context, "uniform", 0.25)
        randomly = select(latents, SelectionContext(2, [16, 12], generator=torch.Generator().manual_seed(0)),
                          "random", 0.25)
        shapes = selection.row_major_shapes(hw, [16])
        mask = random_drop_mask(2, [16, 12], 3, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_device(None)  # (not "cpu": that leaves a device mode on for the tests that follow)
    assert uniform.device.type == randomly.device.type == mask.device.type == "cpu"
    assert uniform.sum(1).tolist() == [7, 7] and shapes == [(4, 4)] and mask.shape == (2, 31)


def test_a_context_keeps_the_probe_in_its_own_copy_of_extra():
    """The probe's tensors are cached in the context, not in the dict the caller passed (a second context made from
    that dict reused the first one's probe tensors and never ran its own probe)."""
    latents, context = _full_context(1, 2)
    calls = []
    provided = {name: context.extra[name] for name in ("text_queries", "ref_keys")}
    extra = {"attention_probe": lambda x, c: calls.append(1) or dict(provided)}
    for _ in range(2):
        select(latents, SelectionContext(2, context.ref_lengths, reference_ids=context.reference_ids, extra=extra),
               "attention", 0.3)
    assert calls == [1, 1] and set(extra) == {"attention_probe"}


def test_edit_given_a_user_mask_runs_no_probe():
    """With a user mask the instruction's attention is used only when both its queries and the reference keys are
    given; a probe that would provide the missing keys is not run (it was, with text queries given alone)."""
    latents, context = _full_context(1, 2)
    calls = []
    probe = lambda x, c: calls.append(1) or {"ref_keys": context.extra["ref_keys"]}  # noqa: E731
    for names in (("user_mask",), ("user_mask", "text_queries")):
        extra = {name: context.extra[name] for name in names}
        extra["attention_probe"] = probe
        select(latents, SelectionContext(2, context.ref_lengths, reference_ids=context.reference_ids, extra=extra),
               "edit", 0.3)
    assert calls == []


def test_bad_budget_lists_and_ids_name_the_argument():
    shapes = [(2, 2)]
    with pytest.raises(ValueError, match="fixed_ratio must be a ratio, one per image, or one row of them"):
        fixed_ratio([[0.1, 0.2], [0.3]])(torch.rand(2, 8), [4, 4])
    with pytest.raises(ValueError, match=r"hw must be \[N, 2\] with N = sum\(lengths\) = 5"):
        selection.row_major_shapes(torch.zeros(4, 2), [5])
    assert selection.row_major_shapes(torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]), [4]) == shapes


# the built-in selectors against their documented formulas (tests from a mutation run: each failed on a mutant)
def _minmax_per_image(x, lengths):
    out = []
    for piece in x.split(lengths, dim=1):
        low, high = piece.amin(1, keepdim=True), piece.amax(1, keepdim=True)
        out.append(torch.where(high > low, (piece - low) / (high - low), torch.zeros_like(piece)))
    return torch.cat(out, dim=1)


def _border_mean(latents, shapes):
    """Per token: the mean latent of its image's border tokens (first/last row or column)."""
    out = []
    start = 0
    for h, w in shapes:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        border = ((rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)).flatten()
        piece = latents[:, start:start + h * w]
        out.append(piece[:, border].mean(1, keepdim=True).expand_as(piece))
        start += h * w
    return torch.cat(out, dim=1)


def test_uniform_order_of_an_image_does_not_depend_on_the_other_images():
    """U1: each image's rank order is its own (1D: bit-reversed position *inside* the image)."""
    lengths = [5, 12, 7]
    latents = torch.zeros(1, sum(lengths), 1)
    together = selection.get_selector("uniform")(latents, selection.SelectionContext(3, lengths))
    for (lo, hi), n in zip(selection._image_slices(lengths), lengths):
        alone = selection.get_selector("uniform")(torch.zeros(1, n, 1), selection.SelectionContext(1, [n]))
        assert torch.equal(together[:, lo:hi], alone)


@pytest.mark.parametrize("shape", [(8, 8), (5, 7), (3, 12), (16, 16)])
def test_uniform_2d_top_k_contains_the_stride_lattice(shape):
    """U2: the documented property: top-k contains the stride-s lattice once k = ceil(h/s)·ceil(w/s)."""
    h, w = shape
    scores = selection.get_selector("uniform")(torch.zeros(1, h * w, 1), selection.SelectionContext(1, [h * w],
                                                                               extra={"ref_shapes": [shape]}))
    rows, cols = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    for s in (1, 2, 4, 8):
        k = math.ceil(h / s) * math.ceil(w / s)
        kept = reference.topk_keep_mask(scores, [k])[0]
        lattice = (rows % s == 0) & (cols % s == 0)
        assert bool(kept[lattice].all()), f"stride {s}: lattice not inside the top {k}"


@pytest.mark.parametrize("side", [4, 8])
def test_uniform_2d_spreads_between_the_lattices(side):
    """Between two lattice sizes the ordered-dither order keeps spreading: the top 2 of a square image are two
    opposite cells of the stride-(side/2) lattice (a diagonal), the top half is the checkerboard (every dropped
    cell's four neighbours kept), not rows or columns of the stride-2 lattice's."""
    scores = selection.get_selector("uniform")(torch.zeros(1, side * side, 1), selection.SelectionContext(
        1, [side * side], extra={"ref_shapes": [(side, side)]}))
    rows, cols = (t.flatten() for t in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    two = reference.topk_keep_mask(scores, [2])[0]
    assert sorted(zip(rows[two].tolist(), cols[two].tolist())) == [(0, 0), (side // 2, side // 2)]
    half = reference.topk_keep_mask(scores, [side * side // 2])[0]
    assert torch.equal(half, (rows + cols) % 2 == 0)


def test_attention_scores_from_text_and_target_queries_together():
    """Without ``queries``, the ``attention`` selector's mass is that of the text queries (their padding masked)
    and the target queries together, over the reference keys."""
    latents, ctx = _full_context(2, 2)
    extra = ctx.extra
    queries = torch.cat([extra["text_queries"], extra["target_queries"]], dim=1)
    mask = torch.cat([extra["text_mask"], torch.ones(extra["target_queries"].shape[:2], dtype=torch.bool)], dim=1)
    expected = selection.attention_mass(queries, extra["ref_keys"], mask)
    torch.testing.assert_close(get_selector("attention")(latents, ctx), expected, rtol=0, atol=0)
    text_only = selection.attention_mass(extra["text_queries"], extra["ref_keys"], extra["text_mask"])
    assert (expected - text_only).abs().max() > 1e-3  # the target queries count


@pytest.mark.parametrize("mask_name", ["query_mask", "text_mask"])
def test_attention_scores_of_a_sample_without_a_valid_query_spread_evenly(mask_name):
    """A sample whose queries are all masked out has an attention mass of zeros: its scores were all 0, so a ratio
    budget kept the image's first rows (ties go to the lower index) and adaptive read the zeros as flat. Now they
    are flat with the even spread's order: the same tokens `uniform` keeps, summing to 1; the other sample keeps
    its attention mass."""
    shapes = [(4, 6), (3, 5)]
    lengths = [h * w for h, w in shapes]
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, sum(lengths), CHANNELS, generator=gen)
    queries = torch.randn(2, 5, HEADS, HEAD_DIM, generator=gen)
    keys = torch.randn(2, sum(lengths), HEADS, HEAD_DIM, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    names = {"query_mask": ("queries", "query_mask"), "text_mask": ("text_queries", "text_mask")}[mask_name]
    ctx = selection.SelectionContext(2, lengths, extra={names[0]: queries, names[1]: mask, "ref_keys": keys,
                                                        "ref_shapes": shapes})
    scores = get_selector("attention")(latents, ctx)
    torch.testing.assert_close(scores[0], selection.attention_mass(queries, keys, mask)[0], rtol=0, atol=0)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2))
    assert scores[1].max() - scores[1].min() < 1e-3 / sum(lengths) * 1.01  # flat, but for the tie-break
    uniform_ctx = selection.SelectionContext(2, lengths, extra={"ref_shapes": shapes})
    for budget in (0.25, 3):
        kept = sparsectx.select(latents, ctx, "attention", budget)[1]
        assert torch.equal(kept, sparsectx.select(latents, uniform_ctx, "uniform", budget)[1]), budget
    kept = sparsectx.select(latents, ctx, "attention", adaptive(0.5))[1]
    assert abs(int(kept.sum()) - 0.5 * sum(lengths)) <= len(lengths) + 1  # about coverage x N, as flat scores


@pytest.mark.parametrize("shapes", [[(4, 6), (4, 6)], [(4, 6), (3, 5)]])
@pytest.mark.parametrize("with_attention", [False, True])
def test_subject_scores_are_the_mean_of_the_per_image_scaled_signals(shapes, with_attention):
    """SB1 / N1 / SJ1: saliency = ||x - mean of the image's border tokens||, attention = attention_mass, each min-max
    scaled per image, averaged, plus selection.SPREAD_WEIGHT·uniform."""
    gen = torch.Generator().manual_seed(0)
    lengths = [h * w for h, w in shapes]
    n = sum(lengths)
    latents = torch.randn(2, n, CHANNELS, generator=gen) + 2.0
    extra = {"ref_shapes": shapes}
    if with_attention:
        extra["target_queries"] = torch.randn(2, 5, HEADS, HEAD_DIM, generator=gen)
        extra["ref_keys"] = torch.randn(2, n, HEADS, HEAD_DIM, generator=gen)
    ctx = selection.SelectionContext(len(shapes), lengths, extra=extra)
    got = selection.subject_scores(latents, ctx)
    signals = [_minmax_per_image((latents - _border_mean(latents, shapes)).norm(dim=-1), lengths)]
    if with_attention:
        signals.append(_minmax_per_image(selection.attention_mass(extra["target_queries"], extra["ref_keys"]), lengths))
    expected = torch.stack(signals).mean(0) + selection.SPREAD_WEIGHT * selection.uniform_scores(latents, ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shapes", [[(4, 6), (4, 6)], [(4, 6), (3, 5)]])
def test_edit_region_is_the_max_of_the_user_mask_and_the_masked_instruction_attention(shapes):
    """E1 / E3: given a user mask and instruction queries (with a padding mask), the edit region is
    max(user_mask, scaled attention mass of the *valid* text queries)."""
    gen = torch.Generator().manual_seed(1)
    lengths = [h * w for h, w in shapes]
    n = sum(lengths)
    user_mask = torch.rand(2, n, generator=gen) < 0.2
    text_queries = torch.randn(2, 6, HEADS, HEAD_DIM, generator=gen)
    text_queries[:, -2:] *= 8.0  # the padding queries would dominate the mass if they voted
    text_mask = torch.arange(6).expand(2, -1) < 4
    keys = torch.randn(2, n, HEADS, HEAD_DIM, generator=gen)
    ctx = selection.SelectionContext(len(shapes), lengths, extra={
        "ref_shapes": shapes, "user_mask": user_mask, "text_queries": text_queries, "text_mask": text_mask,
        "ref_keys": keys})
    latents = torch.randn(2, n, CHANNELS, generator=gen)
    got = selection.edit_scores(latents, ctx, ring=0)  # ring 0: region + 0.5·region + spread
    probe = _minmax_per_image(selection.attention_mass(text_queries, keys, text_mask), lengths)
    region = torch.maximum(user_mask.float(), probe)
    expected = 1.5 * region + selection.SPREAD_WEIGHT * selection.uniform_scores(latents, ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_selector_weights_the_queries_by_query_mask():
    """AT1: extra['query_mask'] drops the masked queries from the mass."""
    gen = torch.Generator().manual_seed(2)
    n = 20
    queries = torch.randn(2, 6, HEADS, HEAD_DIM, generator=gen)
    queries[:, -2:] *= 8.0
    query_mask = torch.arange(6).expand(2, -1) < 4
    keys = torch.randn(2, n, HEADS, HEAD_DIM, generator=gen)
    ctx = selection.SelectionContext(1, [n], extra={"queries": queries, "query_mask": query_mask, "ref_keys": keys})
    got = selection.get_selector("attention")(torch.zeros(2, n, CHANNELS), ctx)
    torch.testing.assert_close(got, selection.attention_mass(queries, keys, query_mask))
    assert not torch.allclose(got, selection.attention_mass(queries, keys))


@pytest.mark.parametrize("side", [8, 16])
def test_uniform_2d_any_k_is_balanced_over_the_quadrants(side):
    """U2: an ordered-dither (Bayer) order cycles through the quadrants: for *every* k (not only the lattice sizes)
    the top-k of a 2^n x 2^n grid puts k/4 (±1) tokens in each quadrant."""
    shape = (side, side)
    scores = selection.get_selector("uniform")(torch.zeros(1, side * side, 1),
                                     selection.SelectionContext(1, [side * side], extra={"ref_shapes": [shape]}))
    rows, cols = (t.flatten() for t in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    quadrant = (rows >= side // 2).long() * 2 + (cols >= side // 2).long()
    for k in range(1, side * side + 1):
        kept = reference.topk_keep_mask(scores, [k])[0]
        counts = torch.bincount(quadrant[kept], minlength=4)
        assert int(counts.max() - counts.min()) <= 1, (k, counts.tolist())


def test_probe_tensors_never_replace_signals_the_user_gave():
    """P2: the lazy probe fills in what extra lacks; a tensor the user gave (here ref_keys) is used as given."""
    gen = torch.Generator().manual_seed(0)
    n = 12
    user_keys = torch.randn(1, n, HEADS, HEAD_DIM, generator=gen)
    probe_out = {"queries": torch.randn(1, 4, HEADS, HEAD_DIM, generator=gen),
                 "ref_keys": torch.randn(1, n, HEADS, HEAD_DIM, generator=gen)}
    probe = lambda x, c: dict(probe_out)  # noqa: E731
    ctx = selection.SelectionContext(1, [n], extra={"ref_keys": user_keys, "attention_probe": probe})
    got = selection.get_selector("attention")(torch.zeros(1, n, 4), ctx)
    torch.testing.assert_close(got, selection.attention_mass(probe_out["queries"], user_keys))
    assert ctx.extra["ref_keys"] is user_keys


@pytest.mark.parametrize("selector", ["uniform", "subject", "edit"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_reference_ids_are_refused(selector, value):
    """Float reference ids holding NaN or inf: a ValueError naming them (before: silently a grid cell for uniform
    and subject, an index error deep in torch for edit)."""
    latents, ctx = _full_context(1, 2)
    ctx.reference_ids = ctx.reference_ids.clone()
    ctx.reference_ids[0, 5, 1] = value
    with pytest.raises(ValueError, match="reference_ids hold non-finite positions"):
        select(latents, ctx, selector, 0.5)


def test_float_ids_centred_on_zero_give_the_integer_grids_selection():
    """Float ids of a grid centred on 0 (-1.5, -0.5, 0.5, 1.5: whole steps from the image's corner) select what
    the same grid's integer ids select (before: rounded first, half to even, several tokens shared a cell and the
    edit ring vanished); ids on half steps are refused, naming reference_ids."""
    latents, ctx = _full_context(2, 2)
    centred = []
    for (h, w), piece in zip(GRIDS[:2], ctx.reference_ids[0].split([h * w for h, w in GRIDS[:2]])):
        piece = piece.clone()
        piece[:, 1] -= piece[:, 1].min() + (h - 1) / 2
        piece[:, 2] -= piece[:, 2].min() + (w - 1) / 2
        centred.append(piece)
    for selector in ("edit", "uniform", "subject"):
        want = select(latents, ctx, selector, 0.3)
        got = select(latents, SelectionContext(2, ctx.ref_lengths, reference_ids=torch.cat(centred)[None],
                                               extra=ctx.extra), selector, 0.3)
        assert torch.equal(got, want), selector
    halves = ctx.reference_ids.clone()
    halves[..., 1:] = halves[..., 1:] / 2  # half steps apart
    with pytest.raises(ValueError, match="reference_ids place an image's tokens at positions that are not whole"):
        select(latents, SelectionContext(2, ctx.ref_lengths, reference_ids=halves, extra=ctx.extra), "uniform", 0.3)


@pytest.mark.parametrize("selector, setting, value", [
    ("edit", "ring", -1), ("edit", "ring", 1.5), ("edit", "ring", True), ("edit", "max_queries", 0),
    ("subject", "saliency", 1), ("subject", "max_queries", 0)])
def test_a_selectors_bad_keyword_is_refused_by_name(selector, setting, value):
    """A built-in selector's keyword set through functools.partial (a negative ring meant no ring; a float ring
    failed deep in torch; max_queries went unchecked without text queries)."""
    import functools

    latents, ctx = _full_context(1, 2)
    fn = functools.partial({"edit": selection.edit_scores, "subject": selection.subject_scores}[selector],
                           **{setting: value})
    with pytest.raises((ValueError, TypeError), match=setting):
        fn(latents, ctx)


@pytest.mark.parametrize("budget", [
    -1, 1.5, "x", None, "per-image tensor of 3 for 2 images", "per-image list of 3 for 2 images",
    "tensor ratio above 1", "count rows for 3 requests", "adaptive floor list of 3", "adaptive coverage tensor of 3",
    "adaptive cap ratio above 1"])
def test_a_bad_budget_is_refused_before_the_selector_and_its_probe_run(budget):
    """Every setting of a fixed or adaptive budget is checked before the selector and its probe run (before: only a
    tensor's shape; lists, tensor values and the adaptive settings after the probe had run)."""
    latents, ctx = _full_context(1, 2)
    calls = []
    probed = SelectionContext(2, ctx.ref_lengths, reference_ids=ctx.reference_ids,
                              extra={"attention_probe": lambda x, c: calls.append(1) or {
                                  "queries": ctx.extra["target_queries"], "ref_keys": ctx.extra["ref_keys"]}})
    budget = {"per-image tensor of 3 for 2 images": fixed_ratio(torch.tensor([0.1, 0.2, 0.3])),
              "per-image list of 3 for 2 images": fixed_ratio([0.1, 0.2, 0.3]),
              "tensor ratio above 1": fixed_ratio(torch.tensor([1.5, 0.2])),
              "count rows for 3 requests": fixed_count([[2, 3]] * 3),
              "adaptive floor list of 3": adaptive(floor=[1, 2, 3]),
              "adaptive coverage tensor of 3": adaptive(torch.tensor([0.5, 0.5, 0.5])),
              "adaptive cap ratio above 1": adaptive(cap=torch.tensor([2.0, 0.5]))}.get(budget, budget)
    with pytest.raises((ValueError, TypeError), match="budget|ratio|count|floor|coverage|cap"):
        select(latents, probed, "attention", budget)
    assert calls == []
    select(latents, probed, "attention", 0.5)
    assert calls == [1]  # (the probe the refused calls did not run)


def test_scalar_counts_above_an_images_length_are_clamped_in_the_result():
    """S02 (selection.py:1144 ``min(..., n)`` dropped in ``_scalar_counts``): a count above an image's size keeps the
    whole image, and ``BudgetResult.counts`` / ``per_sample`` say so (the mutant reported 20 kept of 9)."""
    scores = torch.rand(2, 17, generator=torch.Generator().manual_seed(0))
    result = selection.fixed_count(20)(scores, [9, 8])
    assert result.counts.tolist() == [[9, 8], [9, 8]]
    assert result.per_sample.tolist() == [17, 17]
    assert result.keep.all()
    # an adaptive budget's integer floor and cap above the image size: the count is the image size
    adaptive = selection.adaptive(0.5, floor=50, cap=100)(scores, [9, 8])
    assert adaptive.counts.tolist() == [[9, 8], [9, 8]]


# ----------------------------------------------------------------------------------------------------------------
# gaps a mutation test of the budget logic found (each assertion fails on a mutant the suite let pass before)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda scores: selection.fixed_count([-1, 2])(scores, [4, 4]),
    lambda scores: selection.fixed_count(torch.tensor([-1, 2]))(scores, [4, 4]),
    lambda scores: selection.adaptive_budget(scores, 0.5, floor=[-1, 0], ref_lengths=[4, 4]),
], ids=["count list", "count tensor", "floor list"])
def test_negative_per_image_counts_are_refused(make):
    with pytest.raises(ValueError, match="counts must be >= 0"):
        make(torch.rand(1, 8, generator=torch.Generator().manual_seed(0)))


def test_automatic_mass_is_decided_per_row():
    """mass="auto": a row without negative scores is linear even beside a negative row in the batch (linear mass
    [1, 0, 0, 0]: one token covers 0.9; softmax would give e^3 / (e^3 + 3) = 0.87 and need two)."""
    scores = torch.tensor([[3.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    counts = selection.adaptive_budget(scores, 0.9).counts
    assert counts[0, 0].item() == 1
    assert counts[1, 0].item() == selection.adaptive_budget(scores[1:], 0.9).counts[0, 0].item()


def test_a_constant_instruction_attention_leaves_edit_the_user_mask():
    """A constant signal normalises to 0 (not to a region covering its image): with every reference key alike the
    instruction's attention says nothing, and ``edit`` keeps the user's mask exactly."""
    g = torch.Generator().manual_seed(0)
    assert torch.equal(selection._normalise_per_image(torch.ones(2, 8), [4, 4]), torch.zeros(2, 8))
    n, heads, dim = 16, 2, 8
    user_mask = torch.zeros(1, n, dtype=torch.bool)
    user_mask[0, [5, 6, 9, 10]] = True  # the centre of a 4 x 4 image
    extra = {"user_mask": user_mask, "text_queries": torch.randn(1, 3, heads, dim, generator=g),
             "ref_keys": torch.zeros(1, n, heads, dim), "ref_shapes": [(4, 4)]}
    keep = selection.select(torch.randn(1, n, 4, generator=g), SelectionContext(1, [n], extra=extra), "edit",
                            selection.fixed_count(4))
    assert torch.equal(keep, user_mask)


def test_adaptive_defaults_to_ninety_percent_coverage():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1]])  # cumulative mass 0.5, 0.8, 0.9, 1.0
    assert selection.adaptive().coverage == 0.9 and selection.adaptive()(scores).counts.item() == 3


def test_a_numpy_float32_floor_equal_to_its_cap_is_accepted():
    """A floor of numpy float32 0.3 against a cap of 0.3 (numpy float64 or Python float): equal ratios, as the budget
    reads them (the decimal written), accepted (before: "floor np.float32(0.3) is above cap": 0.30000001 > 0.3), and
    the budget keeps that ratio; float32 0.4 against 0.3 is still above its cap."""
    import numpy as np

    scores = torch.rand(1, 50, generator=torch.Generator().manual_seed(0))
    for cap in (np.float64(0.3), 0.3, [np.float64(0.3)]):
        floor = [np.float32(0.3)] if isinstance(cap, list) else np.float32(0.3)
        assert adaptive(0.0, floor=floor, cap=cap)(scores, [50]).counts.tolist() == [[15]]
    with pytest.raises(ValueError, match="is above cap"):
        adaptive(0.0, floor=np.float32(0.4), cap=0.3)


@pytest.mark.parametrize("factory", ["adaptive", "fixed_ratio", "fixed_count", "adaptive_budget"])
def test_a_budget_factory_given_uncalled_is_refused_by_name(factory):
    """``budget=adaptive`` (the factory, not ``adaptive(...)``): a TypeError naming it and saying to call it, from
    enable and from select, before any selection (before: taken for a budget callable, it failed at the first call,
    after the attention probe, with an error that did not name the budget, or a TypeError about its arguments)."""
    function = getattr(selection, factory)
    latents, ctx = _full_context(1, 2)
    with pytest.raises(TypeError, match=rf"budget=sparsectx\.selection\.{factory} is a budget's factory.*call it"):
        select(latents, ctx, "uniform", function)
    with pytest.raises(TypeError, match=rf"budget=sparsectx\.selection\.{factory} is a budget's factory"):
        sparsectx.integration.check_budget(function)


def test_a_builtin_selector_registered_back_is_builtin_again():
    """register_selector says: keep get_selector(name) beforehand to register it back. Registered back, "uniform"
    was a new wrapper: no longer built-in, so select() stopped warning about a user_mask it does not read."""
    original = get_selector("uniform")
    latents, ctx = _full_context(1, 2)
    try:
        register_selector("uniform", lambda x, c: torch.rand(x.shape[:2]), overwrite=True)
        assert register_selector("uniform", original, overwrite=True) is original
        assert get_selector("uniform") is original and selection.is_builtin_selector(original)
        with pytest.warns(UserWarning, match=r"selector 'uniform' does not read the signals \['user_mask'\]"):
            sparsectx.select(latents, ctx, "uniform", 0.5)
        # registered back with other facts: a new selector that says so
        changed = register_selector("uniform", original, overwrite=True, signals=["mine"])
        assert changed is not original and changed.signals == {"mine"}
    finally:
        selection._REGISTRY["uniform"] = original
    assert get_selector("uniform") is original


@pytest.mark.parametrize("make", [
    lambda np: fixed_ratio([True, 0.25]), lambda np: fixed_ratio([[False, 0.25]]),
    lambda np: fixed_ratio([np.True_, 0.25]), lambda np: fixed_ratio([torch.tensor(True), 0.25]),
    lambda np: fixed_ratio([np.array([True, False])]), lambda np: fixed_count([1, True]),
    lambda np: adaptive(0.5, floor=[True, 2]), lambda np: adaptive(0.5, cap=[[0.5, np.False_]])])
def test_a_bool_inside_a_budget_list_is_refused(make):
    """A ratio list is read as floats: fixed_ratio([True, 0.25]) kept the whole first image (True read as 1.0)
    where every other budget form refuses a bool ("a flag is neither")."""
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="entries must be ints .counts. or floats .ratios., got a bool"):
        make(np)


@pytest.mark.parametrize("make", [
    lambda t: fixed_count(t([1, 2])), lambda t: fixed_ratio(t([0.1, 0.2])), lambda t: adaptive(t([0.5])),
    lambda t: adaptive(0.5, floor=t([1])), lambda t: adaptive(0.5, cap=t([0.5]))])
def test_a_budget_tensor_on_the_meta_device_is_refused_where_it_is_built(make):
    """A meta budget tensor passed the checks made before the selector runs and failed after it, with torch's
    "Cannot copy out of meta tensor" naming no budget."""
    with pytest.raises(ValueError, match="on the meta device"):
        make(lambda values: torch.tensor(values, device="meta"))


@pytest.mark.parametrize("setting", [dict(floor=[1.5]), dict(floor=[0.5, math.inf]), dict(floor=[[0.1, 2.0]]),
                                     dict(cap=[0.5, math.nan]), dict(floor=[[-1]])])
def test_an_out_of_range_entry_of_a_floor_or_cap_list_gets_the_range_error(setting):
    """floor=[1.5] was refused as "above cap 1.0: the cap would win", as though 1.5 were a floor at all; the
    scalar form gives the range error."""
    with pytest.raises(ValueError, match=r"(floor|cap) (ratio must lie in \[0, 1\]|count must be >= 0)"):
        adaptive(0.5, **setting)


@pytest.mark.parametrize("budget", [0.25, adaptive(0.5)])
def test_float8_scores_of_a_selector_rank_as_their_float32_values(budget):
    """A selector's float8 scores passed its output check, then failed in the budget (a ValueError that called
    float8 not a float, or torch's aminmax NotImplementedError); compact_tokens takes them as float32."""
    latents, ctx = _full_context(2, 2)
    scores = torch.rand(2, latents.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.float8_e4m3fn)
    keep = select(latents, ctx, lambda x, c: scores, budget)
    assert torch.equal(keep, select(latents, ctx, lambda x, c: scores.float(), budget))
    assert keep.any() and not keep.all()
