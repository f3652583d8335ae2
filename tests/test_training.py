"""Random-ratio drop masks and attention with them (through sparsectx.masked_attention)."""
import math

import pytest
import torch

from sparsectx.reference import masked_attention_ref
from sparsectx.selection import SelectionContext
from sparsectx.training import random_drop_attention, random_drop_mask, random_drop_selector

REF_LENGTHS, N_PREFIX = [20, 12, 9], 7
SEQ = N_PREFIX + sum(REF_LENGTHS)


def _image_bounds(ref_lengths, n_prefix):
    start = n_prefix
    for length in ref_lengths:
        yield start, start + length
        start += length


def _kept_fractions(mask, ref_lengths, n_prefix):
    """float [B, n_refs]: kept fraction of each reference image."""
    return torch.stack([mask[:, lo:hi].double().mean(1) for lo, hi in _image_bounds(ref_lengths, n_prefix)], 1)


# ----------------------------------------------------------------------------------------------------------------
# mask statistics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio_range", [(0.2, 0.6), (0.0, 1.0), (0.5, 0.5)])
def test_kept_fraction_within_range_and_prefix_kept(ratio_range):
    batch = 64
    mask = random_drop_mask(batch, REF_LENGTHS, N_PREFIX, ratio_range, torch.Generator().manual_seed(0))
    assert mask.shape == (batch, SEQ) and mask.dtype == torch.bool
    assert mask[:, :N_PREFIX].all()
    low, high = ratio_range
    fractions = _kept_fractions(mask, REF_LENGTHS, N_PREFIX)
    lengths = torch.tensor(REF_LENGTHS, dtype=torch.float64)
    # count = round-half-up(r·L) with r in [low, high]: the fraction is within half a token of the range
    assert (fractions >= low - 0.5 / lengths).all() and (fractions <= high + 0.5 / lengths).all()
    if low < high:
        # ratios are drawn per sample and per image: they vary along both axes
        assert fractions.std(0).min() > 0 and fractions.std(1).max() > 0


def test_ratio_distribution_is_uniform_over_the_range():
    batch, low, high = 4000, 0.1, 0.7
    lengths = [200]
    mask = random_drop_mask(batch, lengths, 0, (low, high), torch.Generator().manual_seed(1))
    fractions = mask.double().mean(1)
    # mean and spread of U[low, high] (the count rounding moves each fraction by at most 1/(2L))
    stderr = (high - low) / math.sqrt(12 * batch)
    assert abs(fractions.mean().item() - (low + high) / 2) < 5 * stderr + 0.5 / lengths[0]
    assert fractions.std().item() == pytest.approx((high - low) / math.sqrt(12), rel=0.1)


def test_ratios_from_a_list_and_shared_per_sample():
    choices = [0.25, 0.5, 1.0]
    lengths = [8, 16]
    mask = random_drop_mask(200, lengths, 3, generator=torch.Generator().manual_seed(2), ratios=choices)
    fractions = _kept_fractions(mask, lengths, 3)
    assert set(fractions.flatten().tolist()) == set(choices)  # every ratio appears, and only those
    shared = random_drop_mask(200, lengths, 3, generator=torch.Generator().manual_seed(2), ratios=choices,
                              per_image=False)
    shared_fractions = _kept_fractions(shared, lengths, 3)
    assert torch.equal(shared_fractions[:, 0], shared_fractions[:, 1])


def test_a_keep_ratio_of_zero_keeps_only_the_prefix():
    """ratios in [0, 1]: 0 drops every reference token of the image drawn it, the prefix (text + target) stays."""
    mask = random_drop_mask(2, [4, 3], 1, ratios=[0.0], generator=torch.Generator().manual_seed(0))
    assert mask.tolist() == [[True] + [False] * 7] * 2


def test_kept_subset_is_uniform_over_positions():
    # with one fixed ratio, every position of an image is kept equally often
    batch, length, ratio = 3000, 10, 0.3
    mask = random_drop_mask(batch, [length], 0, (ratio, ratio), torch.Generator().manual_seed(3))
    per_position = mask.double().mean(0)
    stderr = math.sqrt(ratio * (1 - ratio) / batch)
    assert (per_position - ratio).abs().max() < 5 * stderr


def test_images_of_a_sample_are_drawn_independently():
    """Two images of one length in each sample keep the same positions about as often as independent draws would
    (C(8,4) = 70 subsets: 1/70 of samples), not always (one image's noise reused for the next)."""
    length, batch = 8, 2000
    mask = random_drop_mask(batch, [length, length], 2, (0.5, 0.5), torch.Generator().manual_seed(4))
    first, second = mask[:, 2:2 + length], mask[:, 2 + length:]
    assert (first.sum(1) == 4).all() and (second.sum(1) == 4).all()
    same = (first == second).all(1).double().mean().item()
    assert same < 5 / 70, same


def test_deterministic_under_a_seed():
    first = random_drop_mask(4, REF_LENGTHS, N_PREFIX, (0.1, 0.9), torch.Generator().manual_seed(7))
    again = random_drop_mask(4, REF_LENGTHS, N_PREFIX, (0.1, 0.9), torch.Generator().manual_seed(7))
    other = random_drop_mask(4, REF_LENGTHS, N_PREFIX, (0.1, 0.9), torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("kwargs, error", [
    (dict(batch=-1), ValueError),
    (dict(batch=2.0), TypeError),
    (dict(ref_lengths=[4, 0]), ValueError),
    (dict(ref_lengths=[4, 3.0]), TypeError),
    (dict(ref_lengths=4), TypeError),
    (dict(n_prefix=2.0), TypeError),
    (dict(ref_lengths=[]), ValueError),
    (dict(n_prefix=-1), ValueError),
    (dict(ratio_range=(0.8, 0.2)), ValueError),
    (dict(ratio_range=(0.1, 1.5)), ValueError),
    (dict(ratio_range=0.5), ValueError),
    (dict(ratios=[]), ValueError),
    (dict(ratios=[0.5, 2.0]), ValueError),
])
def test_bad_mask_arguments(kwargs, error):
    args = dict(batch=2, ref_lengths=[4, 3], n_prefix=2, ratio_range=(0.1, 0.9))
    args.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        random_drop_mask(**args)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(ratio_range=(0.5, 0.2)), ValueError, "ratio_range"), (dict(ratios=[0.5, 1.5]), ValueError, "ratios"),
    (dict(ratios="0.5"), ValueError, "ratios"), (dict(generator="seed"), TypeError, "generator"),
    (dict(per_image=1), TypeError, "per_image"),
    # ratios replace the range: a range given with them was ignored silently
    (dict(ratio_range=(0.9, 1.0), ratios=[0.1]), ValueError, r"ratio_range \(0.9, 1.0\) and ratios \[0.1\]")])
def test_bad_random_drop_selector_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        random_drop_selector(**kwargs)


def test_ratios_with_a_range_other_than_the_default_are_refused_everywhere():
    """random_drop_mask / random_drop_attention / random_drop_selector drew from ``ratios`` and ignored the range."""
    with pytest.raises(ValueError, match="ratios replace the range"):
        random_drop_mask(2, [4], 1, (0.9, 1.0), ratios=[0.5])
    q = torch.randn(1, 5, 1, 8)
    with pytest.raises(ValueError, match="ratios replace the range"):
        random_drop_attention(q, q, q, [4], 1, (0.9, 1.0), ratios=[0.5])
    # the default range, given or not, goes with ratios: every draw is one of them
    for args in ((), ((0.05, 1.0),)):
        mask = random_drop_mask(64, [4], 0, *args, generator=torch.Generator().manual_seed(0), ratios=[0.5])
        assert bool((mask.sum(1) == 2).all())


def test_a_seed_fixes_the_mask_whatever_the_default_dtype():
    """The mask's noise followed torch's default dtype: under set_default_dtype(float64) one seed drew other
    tokens (the same counts)."""
    expected = random_drop_mask(3, [40, 24], 5, (0.2, 0.8), torch.Generator().manual_seed(4))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = random_drop_mask(3, [40, 24], 5, (0.2, 0.8), torch.Generator().manual_seed(4))
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(got, expected)


def test_numpy_numbers_count_as_python_numbers():
    """Sizes and ratios given as numpy numbers (e.g. read from a config array) give the mask of the Python numbers
    they hold (before: ValueError), as the ops' numpy budgets do; bools stay refused."""
    np = pytest.importorskip("numpy")
    want = random_drop_mask(4, [20, 12, 9], 7, (0.25, 0.75), torch.Generator().manual_seed(9))
    got = random_drop_mask(np.int64(4), [np.int64(20), np.int32(12), 9], np.int64(7),
                           (np.float32(0.25), np.float64(0.75)), torch.Generator().manual_seed(9))
    assert torch.equal(got, want)
    want = random_drop_mask(4, [20, 12, 9], 7, generator=torch.Generator().manual_seed(9), ratios=[0.5, 1.0])
    got = random_drop_mask(np.int64(4), [np.int64(20), np.int32(12), 9], np.int64(7),
                           generator=torch.Generator().manual_seed(9), ratios=[np.float64(0.5), np.float32(1.0)])
    assert torch.equal(got, want)
    # a narrow numpy float counts as the decimal written, as the ops' budgets read it (before: np.float32(0.45) is
    # 0.44999998..., which keeps 4 of 10 tokens where 0.45 keeps 5)
    for settings in (dict(ratios=[np.float32(0.45)]), dict(ratio_range=(np.float32(0.45), np.float32(0.45)))):
        mask = random_drop_mask(3, [10], 0, generator=torch.Generator().manual_seed(0), **settings)
        assert mask.sum(1).tolist() == [5, 5, 5], settings
    with pytest.raises(TypeError, match="ref_lengths"):  # a bool is no size
        random_drop_mask(2, [np.bool_(True)], 0)


# ----------------------------------------------------------------------------------------------------------------
# attention with the drop mask: values and gradients against the torch reference
# ----------------------------------------------------------------------------------------------------------------
def _qkv(batch, seq, heads=2, dim=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


def _reference_and_grads(q, k, v, keep, query_mask, grad_out, dtype):
    """The masked reference's output and q/k/v gradients, computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = masked_attention_ref(*leaves, keep, query_mask=query_mask)
    out.backward(grad_out.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def _assert_flash_criterion(name, got, same_dtype, exact, atol=1e-5):
    """Error against the fp64 reference at most twice the same-dtype reference's, plus ``atol`` (fp32)."""
    err = (got.detach().double() - exact).abs().max().item()
    baseline = (same_dtype.double() - exact).abs().max().item()
    assert err <= 2 * baseline + atol, f"{name}: error {err:.3e} > 2 x torch's {baseline:.3e} + {atol}"


@pytest.mark.parametrize("drop_queries", [True, False])
def test_drop_attention_matches_reference_and_gradients(drop_queries):
    ref_lengths, n_prefix, batch = [10, 6], 5, 2
    seq = n_prefix + sum(ref_lengths)
    q, k, v = _qkv(batch, seq)
    out, keep = random_drop_attention(q, k, v, ref_lengths, n_prefix, (0.2, 0.7),
                                      torch.Generator().manual_seed(4), drop_queries=drop_queries)
    assert keep[:, :n_prefix].all() and not keep.all()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    query_mask = keep if drop_queries else None
    (expected, exact_grads), (same_dtype, same_grads) = (
        _reference_and_grads(q, k, v, keep, query_mask, grad_out, dtype) for dtype in (torch.float64, torch.float32))
    _assert_flash_criterion("out", out, same_dtype, expected)
    out.backward(grad_out)
    for name, got, same, exact in zip("qkv", (q.grad, k.grad, v.grad), same_grads, exact_grads):
        _assert_flash_criterion(f"d{name}", got, same, exact)
    # dropped tokens get no key/value gradient: they were never attended to
    dropped = ~keep[:, :, None, None]
    assert (k.grad.masked_select(dropped) == 0).all() and (v.grad.masked_select(dropped) == 0).all()
    assert k.grad[keep].abs().sum() > 0


def test_drop_attention_reuses_a_given_mask():
    ref_lengths, n_prefix = [6, 4], 3
    q, k, v = _qkv(1, n_prefix + sum(ref_lengths), seed=1)
    keep = random_drop_mask(1, ref_lengths, n_prefix, (0.3, 0.3), torch.Generator().manual_seed(0))
    out, used = random_drop_attention(q, k, v, ref_lengths, n_prefix, keep_mask=keep, drop_queries=False)
    assert used is keep
    expected = masked_attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), keep)
    _assert_flash_criterion("out", out, masked_attention_ref(q.detach(), k.detach(), v.detach(), keep), expected)


def test_an_empty_batch_gets_an_empty_mask_and_output():
    """B=0 (e.g. a data-parallel rank's empty split): an empty mask and output, as masked_attention gives (before:
    "batch must be a positive int, got 0", naming an argument random_drop_attention's caller never passed)."""
    mask = random_drop_mask(0, [4, 3], 2)
    assert mask.shape == (0, 9) and mask.dtype == torch.bool
    q, k, v = _qkv(0, 9)
    out, keep = random_drop_attention(q, k, v, [4, 3], 2)
    assert out.shape == q.shape and keep.shape == (0, 9)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_a_keep_mask_on_another_device_is_refused_by_its_name():
    """(a surviving mutant dropped the device clause: the mask was then refused by masked_attention, naming its
    key_mask, an argument the caller never passed)"""
    q = torch.randn(1, 10, 1, 16)
    with pytest.raises(ValueError, match=r"keep_mask must be a bool \[B=1, S=10\] tensor on cpu, got .* on meta"):
        random_drop_attention(q, q, q, [6], n_prefix=4, keep_mask=torch.ones(1, 10, dtype=torch.bool, device="meta"))


def test_bad_attention_arguments():
    q, k, v = _qkv(1, 10)
    with pytest.raises(ValueError, match="sequence length"):
        random_drop_attention(q, k, v, [4, 4], 3)
    with pytest.raises(ValueError, match="q must be"):
        random_drop_attention(q[0], k, v, [4, 4], 2)
    with pytest.raises(TypeError, match="q must be a .B, S, H, D. tensor, got list"):  # (as masked_attention's)
        random_drop_attention(q.tolist(), k, v, [4, 4], 2)
    # the mask is named as the caller passed it (masked_attention's message named its own key_mask)
    with pytest.raises(ValueError, match=r"keep_mask must be a bool \[B=1, S=10\] tensor.*\(1, 9\)"):
        random_drop_attention(q, k, v, [4, 4], 2, keep_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep_mask must be a bool .*torch.float32"):
        random_drop_attention(q, k, v, [4, 4], 2, keep_mask=torch.ones(1, 10))
    with pytest.raises(TypeError, match="keep_mask must be None or a bool"):
        random_drop_attention(q, k, v, [4, 4], 2, keep_mask=[[True] * 10])
    # a switch given as a string ("no" was read as True), and the draw's settings beside a keep_mask (which they do
    # not draw: accepted silently before, refused without one)
    keep = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(TypeError, match="drop_queries must be a bool"):
        random_drop_attention(q, k, v, [4, 4], 2, drop_queries="no")
    for bad, error, words in (({"ratio_range": (2, 3)}, ValueError, "ratio_range"),
                              ({"generator": "g"}, TypeError, "generator"),
                              ({"ratios": [7]}, ValueError, "ratios"),
                              ({"per_image": "x"}, TypeError, "per_image")):
        with pytest.raises(error, match=words):
            random_drop_attention(q, k, v, [4, 4], 2, keep_mask=keep, **bad)


@pytest.mark.gpu
def test_drop_attention_bf16_on_gpu():
    _check_drop_attention_bf16("cuda", ref_lengths=[256, 128], n_prefix=192)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the test above runs")
@pytest.mark.bf16_kernels
def test_drop_attention_bf16_through_the_interpreter():
    """The GPU test above at interpreter sizes, bf16 computed as a GPU does (tests/bf16_interpreter.py)."""
    _check_drop_attention_bf16("cpu", ref_lengths=[64, 32], n_prefix=48)


def _check_drop_attention_bf16(device, ref_lengths, n_prefix):
    """Flash-attention criterion in bf16: error vs float64 at most 2x that of the same masked attention computed by
    torch in bf16 (+ a small atol), for the output and every gradient."""
    batch = 2
    seq = n_prefix + sum(ref_lengths)
    q, k, v = (t.detach().to(device).requires_grad_()
               for t in _qkv(batch, seq, heads=4, dim=64, dtype=torch.bfloat16))
    gen = torch.Generator(device).manual_seed(0)
    out, keep = random_drop_attention(q, k, v, ref_lengths, n_prefix, (0.05, 0.5), gen)
    assert keep.device.type == device and keep[:, :n_prefix].all() and not keep.all()
    grad_out = torch.randn(out.shape, device=device, generator=gen)
    out.backward(grad_out.bfloat16())
    results = {}
    for dtype in (torch.float64, torch.bfloat16):  # exact, and torch's own error in the same dtype
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        expected = masked_attention_ref(*leaves, keep, query_mask=keep)
        expected.backward(grad_out.to(dtype))
        results[dtype] = [expected] + [t.grad for t in leaves]
    for name, got, exact, same in zip(("out", "dq", "dk", "dv"), [out, q.grad, k.grad, v.grad],
                                      results[torch.float64], results[torch.bfloat16]):
        err = (got.double() - exact.detach()).abs().max().item()
        baseline = (same.detach().double() - exact.detach()).abs().max().item()
        assert math.isfinite(err) and err <= 2 * baseline + 2e-3, f"{name}: {err:.3e} > 2 x {baseline:.3e} + 2e-3"


def test_generator_state_resumes_the_drop_masks_through_accelerate(tmp_path):
    """accelerate refuses a bare generator for checkpointing; wrapped in GeneratorState it is saved and restored
    with the run, so a resumed run draws the masks the uninterrupted run draws (a re-seeded generator replays the
    first steps' masks instead)."""
    accelerate = pytest.importorskip("accelerate")
    from sparsectx import GeneratorState

    def draw(generator):
        return random_drop_mask(2, [8, 8], 3, (0.2, 0.6), generator)

    generator = torch.Generator().manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True)
    with pytest.raises(ValueError, match="state_dict"):
        accelerator.register_for_checkpointing(generator)
    accelerator.register_for_checkpointing(GeneratorState(generator))
    first = draw(generator)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    uninterrupted = [draw(generator) for _ in range(2)]

    assert torch.equal(draw(torch.Generator().manual_seed(0)), first)  # re-seeded alone: the first mask again
    resumed_generator = torch.Generator().manual_seed(0)  # the restarted script seeds as the first run did
    resumed_accelerator = accelerate.Accelerator(cpu=True)
    resumed_accelerator.register_for_checkpointing(GeneratorState(resumed_generator))
    resumed_accelerator.load_state(str(tmp_path / "checkpoint"))
    for expected in uninterrupted:
        assert torch.equal(draw(resumed_generator), expected)
    assert not torch.equal(uninterrupted[0], first)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        GeneratorState(0)


def test_drop_mask_settings_are_checked_naming_them():
    """A generator that is not one, a per_image that is not a bool, a bad ratio_range given beside ratios, and a
    GeneratorState given another state: errors naming the argument (an AttributeError, acceptance, a KeyError)."""
    from sparsectx.training import GeneratorState, random_drop_mask

    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_drop_mask(2, [4], 1, generator=0)
    with pytest.raises(TypeError, match="per_image must be a Python bool, got str"):
        random_drop_mask(2, [4], 1, per_image="x")
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"per_image must be a Python bool, got numpy\.bool"):  # (was "got bool")
        random_drop_mask(2, [4], 1, per_image=np.bool_(True))
    with pytest.raises(ValueError, match="ratio_range must be"):
        random_drop_mask(2, [4], 1, (5, 1), ratios=[0.5])
    with pytest.raises(ValueError, match="device 'nonsense' is not a torch device"):  # (torch's RuntimeError)
        random_drop_mask(2, [4], 1, device="nonsense")
    with pytest.raises(TypeError, match="device must be a torch.device"):
        random_drop_mask(2, [4], 1, device=0.5)
    with pytest.raises(ValueError, match="state_dict must be what GeneratorState.state_dict"):
        GeneratorState(torch.Generator()).load_state_dict({})
    with pytest.raises(ValueError, match=r"state_dict\['generator_state'\] is not a state"):  # (torch's RuntimeError)
        GeneratorState(torch.Generator()).load_state_dict({"generator_state": torch.zeros(3)})
    state = GeneratorState(torch.Generator().manual_seed(3))
    expected = torch.rand(3, generator=state.generator)
    restored = GeneratorState(torch.Generator())
    state.generator.manual_seed(3)
    restored.load_state_dict(state.state_dict())
    assert torch.equal(torch.rand(3, generator=restored.generator), expected)


def test_random_drop_selector_per_image_false_draws_one_ratio_per_sample():
    """TR2: per_image=False is handed on: each sample keeps one ratio of every image (as random_drop_mask)."""
    lengths = [16, 16, 16]
    ctx = SelectionContext(3, lengths)
    got = random_drop_selector((0.05, 1.0), torch.Generator().manual_seed(3), per_image=False)(
        torch.zeros(6, sum(lengths), 4), ctx)
    expected = random_drop_mask(6, lengths, 0, (0.05, 1.0), torch.Generator().manual_seed(3), per_image=False)
    assert torch.equal(got, expected)
    counts = torch.stack([part.sum(1) for part in got.split(lengths, dim=1)], dim=1)
    assert bool((counts == counts[:, :1]).all())  # equal images keep equal counts in each sample
