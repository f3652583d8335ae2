"""Drop-in Sparse Context for Qwen-Image 2.1 (sparsectx.qwen21, QwenImage21Transformer2DModel): tiny random-weight
models built from configs, fp32, CPU, offline. Qwen-Image 2.1 runs one joint sequence: the vision-language
encoder's sequence with each image slot expanded to its 2x2 group of latent tokens (condition images interleaved
with the text), the target appended last; attention is block-causal (q >= k, or one image block)."""
import contextlib
import importlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "QwenImage21Transformer2DModel"):
    pytest.skip(f"diffusers {diffusers.__version__} has no Qwen-Image 2.1", allow_module_level=True)
from diffusers.models.transformers import transformer_qwenimage21 as q21  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
import sparsectx  # noqa: E402
from sparsectx import integration, qwen21  # noqa: E402
from sparsectx.diagnostics import count_host_reads  # noqa: E402

HEADS, HEAD_DIM = 2, 16
TEXT_DIM, CHANNELS = 24, 8
REFS = ((1, 4, 4), (1, 2, 6))  # condition images (f, h, w): 16 and 12 tokens, 4 and 3 slots
TARGET = (1, 4, 4)
TEXT_RUNS = (3, 2, 5)  # text before the first condition image, between them, after the last
N_REFS = [math.prod(shape) for shape in REFS]
N_TARGET = math.prod(TARGET)
N_IMAGES = sum(N_REFS) + N_TARGET
N_TEXT_EMBEDS = sum(TEXT_RUNS) + sum(N_REFS) // 4  # the encoder's sequence: text and condition slots
N_FULL = sum(TEXT_RUNS) + N_IMAGES


def _build(causal_condition=True, seed=0):
    torch.manual_seed(seed)
    return diffusers.QwenImage21Transformer2DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, context_in_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
        causal_condition=causal_condition).eval()


@pytest.fixture(scope="module")
def model():
    return _build()


@pytest.fixture(autouse=True)
def _always_disabled(model):
    yield
    integration.disable(model)
    for block in model.transformer_blocks:
        block.attn.set_processor(q21.QwenImage21AttnProcessor())


def _img_mask(batch, text_runs=TEXT_RUNS):
    """The encoder's sequence (text runs and the condition images' slots) and the target's slots appended."""
    row = []
    for i, run in enumerate(text_runs):
        row += [False] * run
        if i < len(REFS):
            row += [True] * (N_REFS[i] // 4)
    return torch.tensor(row + [True] * (N_TARGET // 4))[None].expand(batch, -1)


def _inputs(batch=2, seed=1, padded=False, shared=False, text_runs=TEXT_RUNS):
    """Forward kwargs; ``padded``: sample 0's prompt ends with two padding positions; ``shared``: every sample has
    the first one's condition latents (a pipeline repeats them over its batch); ``text_runs``: the text before,
    between and after the condition images."""
    g = torch.Generator().manual_seed(seed)
    n_text_embeds = sum(text_runs) + sum(N_REFS) // 4
    refs = torch.randn(1 if shared else batch, sum(N_REFS), CHANNELS, generator=g).expand(batch, -1, -1)
    kwargs = dict(hidden_states=torch.cat([refs, torch.randn(batch, N_TARGET, CHANNELS, generator=g)], 1),
                  encoder_hidden_states=torch.randn(batch, n_text_embeds, TEXT_DIM, generator=g),
                  timestep=torch.rand(batch, generator=g), img_shapes=[[*REFS, TARGET]] * batch,
                  img_mask=_img_mask(batch, text_runs), return_dict=False)
    if padded:
        mask = torch.ones(batch, n_text_embeds, dtype=torch.bool)
        mask[0, -2:] = False
        kwargs["encoder_hidden_states_mask"] = mask
    return kwargs


def _run(model, kwargs, **extra):
    with torch.no_grad():
        return model(**kwargs, **extra)[0]


def random_selector(latents, context):
    return torch.rand(latents.shape[:2], generator=context.generator)


class _KeyMasked(q21.QwenImage21AttnProcessor):
    """Test-only: diffusers' processor with the joint rows ``keys`` (bool ``[B, N_FULL]``, False = dropped) masked out
    as keys, in the prefill's segments and in the cached steps (keys: the cached prefix, then the target)."""

    def __init__(self, keys):
        self.keys = keys

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        if kv_cache_mode == "cached":
            keys = self.keys[:, None, None, :]
            attention_mask = keys if attention_mask is None else attention_mask & keys
        else:
            key_valid = self.keys if key_valid is None else key_valid & self.keys
        return super().__call__(attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                                cache_write_slice, segments, key_valid)


def _joint_keys(keep, kwargs):
    """bool ``[B, n_full]``: the joint rows each sample of the call ``kwargs`` keeps (text, the kept condition tokens
    ``keep [B, N]``, the target)."""
    rows = []
    for sample in keep.cpu():
        kept = torch.cat([torch.nonzero(sample).flatten(), torch.arange(sum(N_REFS), N_IMAGES)])
        layout = qwen21.joint_layout(kwargs["img_mask"], kwargs["img_shapes"], kwargs["encoder_hidden_states"].shape[1],
                                     N_IMAGES, kept)
        row = torch.zeros(layout.n_full, dtype=torch.bool)
        row[layout.keep] = True
        rows.append(row)
    return torch.stack(rows)


def _masked(model, keep, kwargs, **extra):
    """The unpatched model with the tokens ``keep`` drops masked out as keys in every layer."""
    with checks.attention_processors(model.transformer_blocks,
                                     _KeyMasked(_joint_keys(keep, kwargs).to(kwargs["hidden_states"].device))):
        return _run(model, kwargs, **extra)


def _assert_flash_criterion(out, masked, model, keep, kwargs, **extra):
    """``out`` (dropped rows removed) is as close to the key-masked model in fp64 (on the CPU) as the key-masked model
    ``masked`` in the same dtype is (at most twice its error, plus fp32 resolution)."""
    model64 = _build().double()
    model64.load_state_dict(model.state_dict())

    def to64(values):
        return {k: v.to("cpu", torch.float64 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
                else v for k, v in values.items()}

    kwargs64, extra64 = to64(kwargs), to64(extra)
    exact = _masked(model64, keep, kwargs64, **extra64)[:, -N_TARGET:]
    error, native_error = ((x[:, -N_TARGET:].cpu().double() - exact).abs().max() for x in (out, masked))
    assert error <= 2 * native_error + 1e-6 * exact.abs().max(), (error, native_error)


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1.0, 10**6, [1.0, 10**6]])
@pytest.mark.parametrize("padded", [False, True])
def test_keep_all_is_the_unpatched_forward(model, budget, padded):
    kwargs = _inputs(padded=padded)
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=budget, selector=random_selector, seed=0)
    assert torch.equal(_run(model, kwargs), expected)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal_condition", [True, False])
def test_the_compacted_forward_keeping_every_row_is_diffusers_forward(padded, causal_condition):
    """``qwen21.compacted_forward`` with nothing dropped gives diffusers' target rows bit for bit (zeros elsewhere),
    without a cache and through the KV cache's extract and cached steps."""
    model = _build(causal_condition=causal_condition)
    kwargs = _inputs(padded=padded)
    everything = torch.arange(N_IMAGES)
    expected = _run(model, kwargs)
    with torch.no_grad():
        out = qwen21.compacted_forward(model, everything, **kwargs)[0]
    assert out.shape == expected.shape == (2, N_FULL, CHANNELS)
    assert torch.equal(out[:, -N_TARGET:], expected[:, -N_TARGET:])
    assert not out[:, :-N_TARGET].any()
    if not causal_condition:
        return
    theirs, ours = q21.QwenImage21KVCache(2), q21.QwenImage21KVCache(2)
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    with torch.no_grad():
        for mode, step in (("extract", kwargs), ("cached", later)):
            expected = model(**step, kv_cache=theirs, kv_cache_mode=mode)[0]
            out = qwen21.compacted_forward(model, everything, **step, kv_cache=ours, kv_cache_mode=mode)[0]
            assert torch.equal(out[:, -N_TARGET:], expected[:, -N_TARGET:]), mode
            for a, b in zip(ours.layer_caches, theirs.layer_caches):
                assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@pytest.mark.parametrize("text_runs", [TEXT_RUNS, (3, 0, 5)], ids=["text between", "adjacent images"])
@pytest.mark.parametrize("selector", [random_selector, "uniform"])
@pytest.mark.parametrize("padded", [False, True])
def test_dropping_rows_equals_masking_keys(model, selector, padded, text_runs):
    """(Condition images adjacent in the sequence stay two image blocks: neither attends to the other.)"""
    kwargs = _inputs(padded=padded, text_runs=text_runs)
    seen = []
    handle = model.img_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        sparsectx.enable(model, budget=[0.5, 3], selector=selector, seed=0)
        dropped = _run(model, kwargs)
    finally:
        handle.remove()
    keep = sparsectx.last_selection(model).keep
    counts = integration.budget_counts([0.5, 3], 2, N_REFS)[0]
    assert [[int(part.sum()) for part in sample.split(N_REFS)] for sample in keep] == [counts] * 2
    # one forward per distinct keep mask, each on the kept rows only (the dropped rows never entered the model)
    assert seen == [sum(counts) + N_TARGET] * torch.unique(keep, dim=0).shape[0]
    sparsectx.disable(model)
    masked = _masked(model, keep, kwargs)
    assert dropped.shape == (2, sum(text_runs) + N_IMAGES, CHANNELS) and not dropped[:, :-N_TARGET].any()
    _assert_flash_criterion(dropped, masked, model, keep, kwargs)
    assert (dropped[:, -N_TARGET:] - _run(model, kwargs)[:, -N_TARGET:]).abs().max() > 1e-3  # dropping changed it


def _assert_the_masked_models_cached_step(cached, model, keep, extract_kwargs, cached_kwargs):
    """``cached`` (a cached step of the drop-in) meets the flash criterion against the unpatched model's cached step
    with the tokens ``keep`` drops masked as keys, its cache filled by a masked extract step."""
    theirs = q21.QwenImage21KVCache(2)
    _masked(model, keep, extract_kwargs, kv_cache=theirs, kv_cache_mode="extract")
    masked = _masked(model, keep, cached_kwargs, kv_cache=theirs, kv_cache_mode="cached")
    _assert_flash_criterion(cached, masked, model, keep, cached_kwargs)


def _check_bf16(device):
    """In bf16: the drop-in's target rows are within twice the key-masked model's bf16 error of its fp64 result."""
    checks.check_bf16_dropping_equals_masking(
        _build().to(device, torch.bfloat16), checks.cast_inputs(_inputs(padded=True, shared=True), device,
                                                                torch.bfloat16), _run, _masked, _assert_flash_criterion)


@pytest.mark.gpu
def test_gpu_bf16_dropping_rows_equals_masking_keys():
    _check_bf16("cuda")


def test_bf16_dropping_rows_equals_masking_keys_on_the_cpu():
    _check_bf16("cpu")


@pytest.mark.parametrize("padded", [False, True])
def test_the_kv_cache_holds_the_kept_prefix_and_the_cached_steps_attend_to_it(model, padded):
    """The extract step caches text + kept condition tokens only; a cached step equals the masked model's cached
    step and the same step computed without a cache (one cache for the batch: the samples share their condition
    images, as in a pipeline)."""
    kwargs = _inputs(padded=padded, shared=True)
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    cache = q21.QwenImage21KVCache(2)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")
    keep = sparsectx.last_selection(model).keep
    cached = _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    assert torch.equal(sparsectx.last_selection(model).keep, keep)  # the cached step reports the extract's
    uncached = _run(model, later)
    n_kept = int(keep[0].sum())
    assert cache.get_layer(0).k.shape == (2, sum(TEXT_RUNS) + n_kept, HEADS, HEAD_DIM)
    assert cached.shape == (2, N_TARGET, CHANNELS)
    torch.testing.assert_close(cached, uncached[:, -N_TARGET:], rtol=0, atol=1e-5)
    sparsectx.disable(model)
    _assert_the_masked_models_cached_step(cached, model, keep, kwargs, later)


def test_a_cached_step_attends_to_what_its_extract_step_kept(model):
    """The cached steps find the selection by the cache their extract step filled: another extract (another budget)
    on the same prompt tensors since, or new prompt tensors of the same values, change nothing; ``last_selection``
    reports the cache's selection. (A padded text position between the images: the mask's rows follow the
    selection's per-image counts.)"""
    kwargs = _inputs(padded=True, shared=True)
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:1].expand(2, -1, -1).contiguous()
    kwargs["encoder_hidden_states_mask"][:, TEXT_RUNS[0] + N_REFS[0] // 4] = False
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    sparsectx.enable(model, budget=[4, 2], selector="uniform")
    first, second = q21.QwenImage21KVCache(2), q21.QwenImage21KVCache(2)
    _run(model, kwargs, kv_cache=first, kv_cache_mode="extract")
    keep = sparsectx.last_selection(model).keep
    _run(model, kwargs, kv_cache=second, kv_cache_mode="extract", attention_kwargs={"sparsectx": {"budget": [2, 4]}})
    assert not torch.equal(sparsectx.last_selection(model).keep, keep)
    cached = _run(model, later, kv_cache=first, kv_cache_mode="cached")
    assert torch.equal(sparsectx.last_selection(model).keep, keep)
    new_tensors = {**later, "encoder_hidden_states": later["encoder_hidden_states"].clone(),
                   "encoder_hidden_states_mask": later["encoder_hidden_states_mask"].clone()}
    assert torch.equal(_run(model, new_tensors, kv_cache=first, kv_cache_mode="cached"), cached)
    sparsectx.enable(model, budget=0.25)  # (enabled again: new settings for the next selection, not this cache's)
    assert torch.equal(_run(model, later, kv_cache=first, kv_cache_mode="cached"), cached)
    sparsectx.disable(model)
    _assert_the_masked_models_cached_step(cached, model, keep, kwargs, later)


def test_a_cache_the_patch_did_not_fill(model):
    """A cache of every prefix token (filled before enable) serves a cached step as diffusers' forward does; one of
    the kept tokens filled under an earlier enable (disabled since) is refused by name."""
    kwargs = _inputs(padded=True, shared=True)
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    full = q21.QwenImage21KVCache(2)
    _run(model, kwargs, kv_cache=full, kv_cache_mode="extract")
    expected = _run(model, later, kv_cache=full, kv_cache_mode="cached")
    sparsectx.enable(model, budget=0.5, selector="uniform")
    assert torch.equal(_run(model, later, kv_cache=full, kv_cache_mode="cached"), expected)
    kept = q21.QwenImage21KVCache(2)
    _run(model, kwargs, kv_cache=kept, kv_cache_mode="extract")
    sparsectx.disable(model)
    sparsectx.enable(model, budget=0.5, selector="uniform")
    with pytest.raises(ValueError, match="kv_cache holds"):
        _run(model, later, kv_cache=kept, kv_cache_mode="cached")


def test_a_cache_a_grouped_extract_used_is_emptied_and_serves_again_once_refilled(model):
    """An extract step whose samples keep different tokens fills a cache per group: the pipeline's cache object is
    emptied (before: it kept what an earlier extract had put there, which a cached step read after disable without a
    word), and once diffusers' own extract fills it again with every prefix token, a cached step under a new enable
    runs as diffusers' (before: refused as "filled by an extract step whose samples kept different tokens"); a
    cached step reading it while still empty is refused by name. last_selection after a cached step on a cache this
    patch did not fill is None (it attends to every token; before: the latest selection on the same prompt)."""
    kwargs = _inputs(shared=True)
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    cache = q21.QwenImage21KVCache(2)
    _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")
    expected = _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    sparsectx.enable(model, budget=[[0.25], [0.75]], selector="uniform")
    _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")
    assert all(cache.get_layer(i).k is None and cache.get_layer(i).v is None for i in range(2))
    sparsectx.disable(model)
    with pytest.raises(RuntimeError, match="not been populated"):  # diffusers' own forward: nothing to read
        _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    sparsectx.enable(model, budget=0.5, selector="uniform")
    with pytest.raises(ValueError, match="whose samples kept different tokens"):
        _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    sparsectx.disable(model)
    _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")  # diffusers' extract: every prefix token
    sparsectx.enable(model, budget=0.5, selector="uniform")
    try:
        other = q21.QwenImage21KVCache(2)
        _run(model, kwargs, kv_cache=other, kv_cache_mode="extract")  # a selection on the same prompt tensors
        assert sparsectx.last_selection(model) is not None
        assert torch.equal(_run(model, later, kv_cache=cache, kv_cache_mode="cached"), expected)
        assert sparsectx.last_selection(model) is None
        _run(model, later, kv_cache=other, kv_cache_mode="cached")
        assert sparsectx.last_selection(model) is not None  # (its extract's)
    finally:
        sparsectx.disable(model)


def test_the_compacted_forward_refuses_a_cache_of_other_kept_rows(model):
    kwargs = _inputs(shared=True)
    n = sum(N_REFS)
    kept = torch.cat([torch.arange(0, n, 2), torch.arange(n, N_IMAGES)])
    cache = q21.QwenImage21KVCache(2)
    with torch.no_grad():
        qwen21.compacted_forward(model, kept, **{**kwargs, "hidden_states": kwargs["hidden_states"][:, kept]},
                                 kv_cache=cache, kv_cache_mode="extract")
        fewer = torch.cat([torch.arange(0, n, 4), torch.arange(n, N_IMAGES)])
        with pytest.raises(ValueError, match="the KV cache holds"):
            qwen21.compacted_forward(model, fewer, **{**kwargs, "hidden_states": kwargs["hidden_states"][:, fewer]},
                                     kv_cache=cache, kv_cache_mode="cached")


def test_kv_cache_on_a_model_without_causal_condition_is_refused_by_name():
    model = _build(causal_condition=False)
    sparsectx.enable(model, budget=[[0.25], [0.75]], selector="uniform")
    try:
        with pytest.raises(ValueError, match="causal_condition"):
            _run(model, _inputs(), kv_cache=q21.QwenImage21KVCache(2), kv_cache_mode="extract")
    finally:
        sparsectx.disable(model)


def test_later_steps_read_the_host_once_and_cached_steps_never(model):
    """The first step reads the layout and selects; a later step reads the host once (the plan's check: diffusers'
    own forward reads it several times, its joint layout and RoPE table are made once per img_mask here), a
    KV-cached step not at all. An img_mask written in place is read again."""
    kwargs = _inputs(padded=True, shared=True)
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    with count_host_reads() as plain:
        _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    with count_host_reads() as first:
        out_first = _run(model, kwargs)
    with count_host_reads() as step:
        out_later = _run(model, later)
    assert step.count == 1 < plain.count < first.count, (step.ops, plain.ops)
    kwargs["img_mask"] = kwargs["img_mask"].clone()  # another tensor of the same values
    with count_host_reads() as new_mask:
        out = _run(model, kwargs)
    assert torch.equal(out, out_first)
    with count_host_reads() as same_mask:
        _run(model, kwargs)
    kwargs["img_mask"].copy_(kwargs["img_mask"].clone())  # written in place
    with count_host_reads() as written:
        out = _run(model, kwargs)
    assert torch.equal(out, out_first)
    assert same_mask.count == 1 < new_mask.count and written.count > 1, (same_mask.ops, new_mask.ops, written.ops)
    cache, later = q21.QwenImage21KVCache(2), {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")
    with count_host_reads() as cached:
        out_cached = _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    assert cached.count == 0, cached.ops
    torch.testing.assert_close(out_cached, out_later[:, -N_TARGET:], rtol=0, atol=1e-5)


def test_mixed_budgets_equal_each_sample_alone(model):
    kwargs = _inputs(padded=True)
    sparsectx.enable(model, budget=[[0.25], [0.75]], selector="uniform")
    together = _run(model, kwargs)
    alone = []
    for b, budget in enumerate([[0.25], [0.75]]):
        sparsectx.enable(model, budget=budget, selector="uniform")
        alone.append(_run(model, {k: v[b:b + 1] if isinstance(v, (torch.Tensor, list)) else v
                                  for k, v in kwargs.items()}))
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-6)
    assert not torch.equal(alone[0][0, -N_TARGET:], alone[1][0, -N_TARGET:])


def test_mixed_budgets_under_the_kv_cache_fill_a_cache_per_group(model):
    """Samples keeping different tokens under the KV cache: the extract step runs each group with a cache of its
    own, the cached steps attend to their group's; every step equals the same step without a cache, and each sample
    its request alone."""
    kwargs = _inputs(padded=True, shared=True)
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    budget = [[0.25], [0.75]]
    sparsectx.enable(model, budget=budget, selector="uniform")
    cache = q21.QwenImage21KVCache(2)
    extract = _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")
    with count_host_reads() as reads:  # (the groups' joint layouts made at the extract step)
        cached = _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    assert reads.count == 0, reads.ops
    assert cache.get_layer(0).k is None  # (the groups' own caches hold the prefixes)
    torch.testing.assert_close(extract, _run(model, kwargs), rtol=0, atol=1e-6)
    torch.testing.assert_close(cached, _run(model, later)[:, -N_TARGET:], rtol=0, atol=1e-5)
    sparsectx.disable(model)  # (the groups' caches go with the patch: a cached step on the call's cache is refused)
    sparsectx.enable(model, budget=budget, selector="uniform")
    with pytest.raises(ValueError, match="run the extract step again"):
        _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    for b, request in enumerate(budget):
        sparsectx.enable(model, budget=request, selector="uniform")
        alone = {k: v[b:b + 1] if isinstance(v, (torch.Tensor, list)) else v for k, v in later.items()}
        torch.testing.assert_close(cached[b:b + 1], _run(model, alone)[:, -N_TARGET:], rtol=0, atol=1e-5)


def test_the_flex_processors_run_the_compacted_sequence_as_the_segment_processors():
    """With diffusers' flex processors (a ``BlockMask`` built on the compacted sequence's image blocks) the result
    equals the default processors' (one attention per causal segment)."""
    model = _build()
    kwargs = _inputs(padded=True)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    segments = _run(model, kwargs)
    for block in model.transformer_blocks:
        block.attn.set_processor(q21.QwenImage21FlexAttnProcessor())
    with pytest.warns(UserWarning):  # (diffusers' warning: uncompiled flex attention)
        flex = _run(model, kwargs)
    torch.testing.assert_close(flex, segments, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the attention probe: the first block's q and k
# ----------------------------------------------------------------------------------------------------------------
class _RecordingProcessor(q21.QwenImage21AttnProcessor):
    """Test-only: diffusers' processor, recording the q and k it computes (``_qwenimage21_prepare_qkv``)."""

    def __init__(self):
        self.qk = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        rotary_emb = kwargs.get("rotary_emb", args[1] if len(args) > 1 else None)
        query, key, _, _ = q21._qwenimage21_prepare_qkv(attn, hidden_states, rotary_emb, None, None, None)
        self.qk.append((query, key))
        return super().__call__(attn, hidden_states, *args, **kwargs)


def _first_block_qk(model, kwargs):
    with checks.attention_processors(model.transformer_blocks[:1], _RecordingProcessor()) as recorder:
        _run(model, kwargs)
    return recorder.qk[0]


def _rows(kind):
    layout = qwen21.joint_layout(_img_mask(1), [[*REFS, TARGET]], N_TEXT_EMBEDS, N_IMAGES)
    return layout.rows(kind)


@pytest.mark.parametrize("padded", [False, True])
def test_probe_tensors_are_the_first_blocks_query_and_key(model, padded):
    """Text queries (the text rows, interleaved with the condition images), target queries and reference keys are
    rows of the q and k diffusers' processor computes in the first block; the prompt's padding comes as
    ``text_mask``."""
    kwargs = _inputs(padded=padded)
    query, key = _first_block_qk(model, kwargs)
    record = {}
    sparsectx.enable(model, budget=3, selector=checks.recording_attention(record))
    _run(model, kwargs)
    close = dict(rtol=1e-5, atol=1e-6)  # the probe projects fewer rows: fp32 rounding of the same products
    torch.testing.assert_close(record["text_queries"], query[:, _rows("text")], **close)
    torch.testing.assert_close(record["target_queries"], query[:, _rows("target")], **close)
    torch.testing.assert_close(record["ref_keys"], key[:, _rows("reference")], **close)
    assert record["ref_keys"].shape == (2, sum(N_REFS), HEADS, HEAD_DIM)
    assert record["text_queries"].shape[1] == sum(TEXT_RUNS)
    if padded:
        layout = qwen21.joint_layout(_img_mask(1), [[*REFS, TARGET]], N_TEXT_EMBEDS, N_IMAGES)
        assert torch.equal(record["text_mask"], kwargs["encoder_hidden_states_mask"][:, layout.vlm_text])
        assert record["text_mask"][0, -2:].tolist() == [False, False] and record["text_mask"][1].all()
    else:
        assert "text_mask" not in record


def test_attention_selector_keeps_the_top_attention_mass(model):
    from sparsectx.reference import topk_keep_mask

    kwargs = _inputs()
    query, key = _first_block_qk(model, kwargs)
    mass = sparsectx.selection.attention_mass(query[:, _rows("target")], key[:, _rows("reference")])
    expected = torch.cat([topk_keep_mask(part, [3] * mass.shape[0]) for part in mass.split(N_REFS, 1)], dim=1)
    sparsectx.enable(model, budget=3, selector="attention")
    _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep, expected)


def test_the_probe_leaves_the_kv_cache_to_the_step(model):
    """An extract step selecting with the probe: the probe's stopped forward writes no cache; the step's forward
    caches the kept prefix, and the cached step equals the step computed without a cache."""
    kwargs = _inputs(shared=True)
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:1].expand(2, -1, -1)  # one prompt
    later = {**kwargs, "timestep": kwargs["timestep"] * 0.5}
    cache = q21.QwenImage21KVCache(2)
    sparsectx.enable(model, budget=3, selector="attention")
    _run(model, kwargs, kv_cache=cache, kv_cache_mode="extract")
    assert cache.get_layer(0).k.shape[1] == sum(TEXT_RUNS) + 3 * len(REFS)
    cached = _run(model, later, kv_cache=cache, kv_cache_mode="cached")
    torch.testing.assert_close(cached, _run(model, later)[:, -N_TARGET:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("selector", ["attention", "subject", "edit"])
def test_probe_selectors_on_a_prompt_of_image_slots_only(model, selector):
    """No text row (the prompt holds the condition images' slots only): the probe has no text queries, and the
    selection still equals masking the dropped tokens as keys."""
    kwargs = _inputs(text_runs=(0, 0, 0), shared=True)
    sparsectx.enable(model, budget=3, selector=selector)
    dropped = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    sparsectx.disable(model)
    assert [int(part.sum()) for part in keep[0].split(N_REFS)] == [3, 3]
    _assert_flash_criterion(dropped, _masked(model, keep, kwargs), model, keep, kwargs)


# ----------------------------------------------------------------------------------------------------------------
# training with random-ratio drop masks, the dropped references removed
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True, "compiled blocks"])
def test_random_drop_training_gives_the_masked_models_output_and_gradients(checkpointing):
    """``random_drop_selector`` on a train-mode transformer: a new mask at every forward, each sample its own
    forward on its kept tokens; the output and every weight's gradient equal those of the unpatched model with the
    same tokens masked out as keys (gradient checkpointing too, and with the blocks compiled as docs/fine-tuning.md
    says: ``dynamic=True``, as the samples' forwards have different lengths; without it torch's checkpointing of
    compiled blocks fails on two lengths before one backward, diffusers' model alone too, pytorch issue 166926)."""
    model = _build()
    if checkpointing:
        model.enable_gradient_checkpointing()
    kwargs = {**_inputs(padded=True), "return_dict": False}
    torch._dynamo.reset()
    try:
        if checkpointing == "compiled blocks":
            model.compile_repeated_blocks(backend="aot_eager", dynamic=True)
        checks.assert_random_drop_training_matches_masking(
            model, kwargs, lambda out: out[:, -N_TARGET:],
            lambda keep: checks.attention_processors(model.transformer_blocks, _KeyMasked(_joint_keys(keep, kwargs))))
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# refused by name
# ----------------------------------------------------------------------------------------------------------------
def test_sparsectx_attention_and_masked_drop_training_are_refused_naming_what_works(model):
    with pytest.raises(ValueError, match="attention='native'"):
        sparsectx.enable(model, attention="sparsectx")
    assert not integration.is_enabled(model)
    with pytest.raises(TypeError, match="random_drop_selector"):
        sparsectx.enable_drop_training(model)


def test_inputs_that_do_not_describe_one_sequence_are_refused(model):
    sparsectx.enable(model, budget=0.5)
    kwargs = _inputs()
    with pytest.raises(ValueError, match="img_mask has"):
        _run(model, {**kwargs, "img_mask": kwargs["img_mask"][:, 1:]})
    with pytest.raises(ValueError, match="img_shapes differ between samples"):
        _run(model, {**kwargs, "img_shapes": [[*REFS, TARGET], [REFS[1], REFS[0], TARGET]]})
    with pytest.raises(ValueError, match="describe"):
        _run(model, {**kwargs, "hidden_states": kwargs["hidden_states"][:, 1:]})


# ----------------------------------------------------------------------------------------------------------------
# the pipeline (tests/qwen21_pipeline.py: tiny components, a stand-in for the Qwen3-VL encoder and its processor)
# ----------------------------------------------------------------------------------------------------------------
def _pipeline_helpers():
    """tests/qwen21_pipeline.py (tests/ is on sys.path by pytest.ini), imported where used: it needs a diffusers
    release that ships Qwen-Image 2.1."""
    return importlib.import_module("qwen21_pipeline")


IMAGE_SIZES = ((128, 64), (64, 128))  # condition images of 2x6 and 6x2 latent tokens; the target 6x2
PIPELINE_REFS, PIPELINE_TARGET = [12, 12], 12
MODES = {"kv cache": {}, "no cache": dict(use_kv_cache=False),
         "guided, padded prompt": dict(true_cfg_scale=4.0, negative_prompt="blurry", padded_prompt=True),
         "two images per prompt": dict(num_images_per_prompt=2)}


@pytest.fixture
def pipe():
    pipe = _pipeline_helpers().tiny_qwen21_pipeline()
    yield pipe
    sparsectx.disable(pipe)


def _call(pipe, mode, **kwargs):
    helpers = _pipeline_helpers()
    with torch.no_grad():
        return helpers.run(pipe, helpers.ref_images(IMAGE_SIZES), **MODES[mode], **kwargs)


def _image_rows_seen(transformer) -> list:
    """(kv mode, image rows) of each transformer forward: the rows its image embedder gets."""
    seen, mode = [], {}
    transformer.register_forward_pre_hook(lambda module, args, kwargs: mode.update(now=kwargs.get("kv_cache_mode")),
                                          with_kwargs=True)
    transformer.img_in.register_forward_pre_hook(lambda module, args: seen.append((mode["now"], args[0].shape[1])))
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_keep_all_is_the_unpatched_pipeline_and_disable_restores_it(pipe, mode):
    expected = _call(pipe, mode)
    sparsectx.enable(pipe, budget=1.0)
    assert torch.equal(_call(pipe, mode), expected)
    sparsectx.enable(pipe, budget=0.25)
    assert not torch.equal(_call(pipe, mode), expected)
    sparsectx.disable(pipe)
    assert torch.equal(_call(pipe, mode), expected)


@pytest.mark.parametrize("mode", MODES)
def test_the_transformer_sees_the_kept_tokens_and_the_cached_steps_the_target(pipe, mode):
    seen = _image_rows_seen(pipe.transformer)
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    _call(pipe, mode)
    kept = sum(PIPELINE_REFS) // 2 + PIPELINE_TARGET
    branches = 2 if "guided" in mode else 1
    if mode == "no cache":
        assert seen == [(None, kept)] * 2
    else:  # the extract step (each guidance branch), then the cached steps' target rows only
        assert seen == [("extract", kept)] * branches + [("cached", PIPELINE_TARGET)] * branches
    assert sparsectx.last_selection(pipe).keep.sum(dim=1).tolist() == \
        [sum(PIPELINE_REFS) // 2] * (2 if "two images" in mode else 1)


@contextlib.contextmanager
def _masking_keys(transformer, keep):
    """The unpatched ``transformer``'s every attention masks the condition tokens ``keep`` (bool ``[N]``) drops, as
    keys, at each forward on that forward's joint layout (the guidance branches' prompts differ in length)."""
    processor = _KeyMasked(None)

    def keys_of_the_call(module, args, kwargs):
        kept = torch.cat([torch.nonzero(keep).flatten(), torch.arange(keep.numel(), kwargs["hidden_states"].shape[1])])
        layout = qwen21.joint_layout(kwargs["img_mask"], kwargs["img_shapes"], kwargs["encoder_hidden_states"].shape[1],
                                     kwargs["hidden_states"].shape[1], kept)
        keys = torch.zeros(layout.n_full, dtype=torch.bool)
        keys[layout.keep] = True
        processor.keys = keys[None].expand(kwargs["hidden_states"].shape[0], -1)

    handle = transformer.register_forward_pre_hook(keys_of_the_call, with_kwargs=True)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(processor)
    try:
        yield
    finally:
        handle.remove()
        for block in transformer.transformer_blocks:
            block.attn.set_processor(q21.QwenImage21AttnProcessor())


@pytest.mark.parametrize("mode", ["kv cache", "guided, padded prompt"])
def test_the_sparse_pipeline_equals_masking_the_dropped_keys(pipe, mode):
    """The pipeline with a budget equals the unpatched pipeline whose every attention masks the same tokens as keys
    (each forward's joint layout: the guidance branches' prompts differ in length)."""
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    dropped = _call(pipe, mode)
    keep = sparsectx.last_selection(pipe).keep[0]
    sparsectx.disable(pipe)
    with _masking_keys(pipe.transformer, keep):
        masked = _call(pipe, mode)
    torch.testing.assert_close(dropped, masked, rtol=0, atol=1e-5)
    assert (dropped - _call(pipe, mode)).abs().max() > 1e-3


def test_requests_with_their_own_budgets_under_the_kv_cache(pipe):
    """Two prompts, each request its own budget, the pipeline's default KV cache: each image equals its request
    run alone (same noise), and the call equals the same call without the cache."""
    helpers = _pipeline_helpers()
    images, prompts, budget = helpers.ref_images(IMAGE_SIZES), ["a cat", "a red dog"], [[0.25], [0.75]]
    noise = torch.randn(2, PIPELINE_TARGET, helpers.Z_DIM, generator=torch.Generator().manual_seed(5))
    sparsectx.enable(pipe, budget=budget, selector="uniform")
    with torch.no_grad():
        together = helpers.run(pipe, images, prompt=prompts, latents=noise)
        uncached = helpers.run(pipe, images, prompt=prompts, latents=noise, use_kv_cache=False)
    torch.testing.assert_close(together, uncached, rtol=0, atol=1e-5)
    # the second request alone (the longer prompt: in the batch the shorter one is padded, which moves its RoPE
    # positions in diffusers' pipeline, unpatched too)
    sparsectx.enable(pipe, budget=budget[1], selector="uniform")
    with torch.no_grad():
        alone = helpers.run(pipe, images, prompt=prompts[1], latents=noise[1:])
    torch.testing.assert_close(together[1:], alone, rtol=0, atol=1e-5)
    assert not torch.equal(together[0], together[1])


def test_per_call_settings_through_the_pipelines_attention_kwargs(pipe):
    seen = _image_rows_seen(pipe.transformer)
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    _call(pipe, "no cache", attention_kwargs={"sparsectx": {"budget": 3}})
    assert seen == [(None, 3 * len(PIPELINE_REFS) + PIPELINE_TARGET)] * 2
    seen.clear()
    _call(pipe, "no cache")
    assert seen == [(None, sum(PIPELINE_REFS) // 2 + PIPELINE_TARGET)] * 2


@pytest.mark.parametrize("selector", ["attention", "subject", "edit"])
def test_the_probe_selectors_run_in_the_pipeline(pipe, selector):
    seen = _image_rows_seen(pipe.transformer)
    sparsectx.enable(pipe, budget=4, selector=selector)
    _call(pipe, "guided, padded prompt")
    assert sparsectx.last_selection(pipe).keep.sum().item() == 4 * len(PIPELINE_REFS)
    # the probe's stopped forward (every token), then each branch's extract step and cached step
    assert seen == [("extract", sum(PIPELINE_REFS) + PIPELINE_TARGET)] + \
        [("extract", 8 + PIPELINE_TARGET)] * 2 + [("cached", PIPELINE_TARGET)] * 2


def test_enabling_again_inside_a_pipeline_call_keeps_the_caches_selection(pipe):
    """A step-end callback enabling the pipeline again (another budget) after the KV extract step: the cached steps
    still attend to the tokens the extract step kept (padded prompt: their mask follows that selection)."""
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    expected = _call(pipe, "guided, padded prompt", num_inference_steps=3)

    def enable_again(pipeline, step, timestep, tensors):
        if step == 0:
            sparsectx.enable(pipe, budget=0.25, selector="uniform")
        return {}

    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    out = _call(pipe, "guided, padded prompt", num_inference_steps=3, callback_on_step_end=enable_again)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("enabled", ["pipeline", "transformer"])
def test_the_modular_pipeline(enabled):
    """diffusers' modular Qwen-Image 2.1 pipeline (``QwenImage21AutoBlocks``, a negative prompt: two forwards a
    step, KV cache): keeping every token is the unpatched pipeline; a budget sends the kept tokens through the model
    (the extract steps; the cached steps the target) and equals masking the dropped ones as keys; disable is bit-exact
    and restores the pipeline's class."""
    modular = pytest.importorskip("diffusers.modular_pipelines")
    helpers = _pipeline_helpers()
    components = helpers.tiny_qwen21_pipeline()
    pipe = modular.QwenImage21AutoBlocks().init_pipeline()
    pipe.update_components(guider=diffusers.ClassifierFreeGuidance(guidance_scale=4.0),  # (its default: disabled)
                           **{name: getattr(components, name)
                              for name in ("transformer", "vae", "text_encoder", "processor", "scheduler")})
    model, images = components.transformer, helpers.ref_images(IMAGE_SIZES)
    seen = _image_rows_seen(model)

    def run():
        seen.clear()
        with torch.no_grad():
            return pipe(prompt="a cat", negative_prompt="blurry", image=images, output_resolution=64,
                        num_inference_steps=2, generator=torch.Generator().manual_seed(0), output="latents")

    original_class = type(pipe)
    expected = run()
    full = sum(PIPELINE_REFS) + PIPELINE_TARGET
    assert seen == [("extract", full)] * 2 + [("cached", full)] * 2  # diffusers embeds every row at each step
    target = pipe if enabled == "pipeline" else model
    sparsectx.enable(target, budget=1.0)
    assert torch.equal(run(), expected)
    sparsectx.enable(target, budget=0.5, selector="uniform")
    try:
        sparse = run()
        keep = sparsectx.last_selection(target).keep[0]
    finally:
        sparsectx.disable(target)
    kept = sum(PIPELINE_REFS) // 2 + PIPELINE_TARGET
    assert seen == [("extract", kept)] * 2 + [("cached", PIPELINE_TARGET)] * 2
    assert type(pipe) is original_class and "forward" not in model.__dict__
    assert torch.equal(run(), expected)
    with _masking_keys(model, keep):
        torch.testing.assert_close(run(), sparse, rtol=0, atol=1e-5)
    assert (sparse - expected).abs().max() > 1e-3
