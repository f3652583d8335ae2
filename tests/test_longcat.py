"""LongCat-Image-Edit under sparsectx.enable: whole calls of a tiny, offline LongCatImageEditPipeline
(tests/longcat_pipeline.py: random-weight components built from configs, fakes for the Qwen2.5-VL tokenizer and
model), fp32, CPU. The transformer alone runs through the generic tests of tests/test_integration.py,
test_processors.py and test_probe.py (family "longcat"); here: what only the pipeline shows (its ids, its
classifier-free guidance, its per-call settings, which its transformer's forward never receives)."""
import contextlib
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

import sparsectx  # noqa: E402
from pipeline_fixtures import tiny_pipeline_fixtures  # noqa: E402
from sparsectx import integration  # noqa: E402
from sparsectx.selection import IDS_GRID_SHAPES  # noqa: E402


import longcat_pipeline as lp  # noqa: E402  (tests/, on sys.path by pytest.ini)

STEPS = 2
BUDGET = 0.25  # of the reference's 16 tokens: 4 kept
SEED = 0
CFG_SCALE = 2.0
FP32_ATOL = 2e-5  # fp32 rounding of a different (shorter) summation order
PLAIN, CFG_BATCH = "plain", "cfg+2-images"  # one image without guidance; guidance with num_images_per_prompt=2
MODES = (PLAIN, CFG_BATCH)


pipe, _always_disabled = tiny_pipeline_fixtures(lp.tiny_longcat_pipeline)


def _mode_kwargs(mode):
    return dict(guidance_scale=CFG_SCALE, num_images_per_prompt=2) if mode == CFG_BATCH else {}


def _run(pipe, mode=PLAIN, **kwargs):
    return lp.run(pipe, num_inference_steps=STEPS, **{**_mode_kwargs(mode), **kwargs})


def _n_kept():
    kept = BUDGET * lp.tokens()
    assert kept == int(kept) and 0 < kept < lp.tokens(), "a budget keeping whole tokens, some dropped"
    return int(kept)


def _image_rows(pipe, seen):
    """A pre-hook recording the image rows that reach the blocks (the transformer's first image layer)."""
    return pipe.transformer.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
def test_the_pipeline_class_is_accepted_and_named():
    assert "LongCatImageEditPipeline" in integration.SUPPORTED_PIPELINES
    assert integration.SUPPORTED_TRANSFORMERS["LongCatImageTransformer2DModel"] == integration.LONGCAT
    with pytest.raises(TypeError, match="LongCatImageEditPipeline"):
        sparsectx.enable(object())


@pytest.mark.parametrize("mode", MODES)
def test_keep_all_equals_the_unpatched_pipeline(pipe, mode):
    expected = _run(pipe, mode)
    sparsectx.enable(pipe, budget=1.0, selector="random", seed=SEED)
    assert torch.equal(_run(pipe, mode), expected)
    sparsectx.disable(pipe)
    assert torch.equal(_run(pipe, mode), expected)


def test_disable_restores_bit_exact(pipe):
    expected = _run(pipe, CFG_BATCH)
    forward, processors = pipe.transformer.forward, dict(pipe.transformer.attn_processors)
    sparsectx.enable(pipe, budget=BUDGET, selector="uniform", attention="sparsectx")
    dropped = _run(pipe, CFG_BATCH)
    assert (dropped - expected).abs().max() > 100 * FP32_ATOL  # the references were compacted
    sparsectx.disable(pipe)
    assert type(pipe).__name__ == "LongCatImageEditPipeline" and not hasattr(type(pipe), "_sparsectx_base")
    assert pipe.transformer.forward == forward
    assert all(pipe.transformer.attn_processors[name] is p for name, p in processors.items())
    assert torch.equal(_run(pipe, CFG_BATCH), expected)


class _KeyMaskedNative:
    """Test-only: diffusers' native attention backend with the dropped reference tokens masked out as keys; the
    joint sequence is [text, target, reference], ``image_keep`` (bool [1, S_image]) shared by the batch."""

    def __init__(self, image_keep):
        self.image_keep = image_keep
        self.native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        assert attn_mask is None  # (LongCat passes none)
        batch, n_keys = key.shape[:2]
        text = torch.ones(1, n_keys - self.image_keep.shape[1], dtype=torch.bool, device=key.device)
        key_mask = torch.cat([text, self.image_keep.to(key.device)], 1).expand(batch, -1)[:, None, None, :]
        return self.native(query, key, value, attn_mask=key_mask, **kwargs)


@pytest.mark.parametrize("selector", ["random", "attention"])
@pytest.mark.parametrize("mode", MODES)
def test_dropping_rows_equals_masking_their_keys_over_the_call(pipe, mode, selector, monkeypatch):
    """The compacted call == the unpatched call with the dropped reference tokens masked as keys in every attention
    (their ids, RoPE rows and the target's rows are right at every step and in both guidance branches)."""
    sparsectx.enable(pipe, budget=BUDGET, selector=selector, seed=SEED)
    sparse = _run(pipe, mode)
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape[1] == lp.tokens() and keep.sum(1).tolist() == [_n_kept()] * keep.shape[0]
    assert torch.equal(keep, keep[:1].expand_as(keep))  # one selection for the images of the call
    sparsectx.disable(pipe)
    image_keep = torch.cat([torch.ones(1, lp.tokens(), dtype=torch.bool), keep[:1].cpu()], 1)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE,
                        _KeyMaskedNative(image_keep))
    torch.testing.assert_close(sparse, _run(pipe, mode), rtol=0, atol=FP32_ATOL)


# ----------------------------------------------------------------------------------------------------------------
# what reaches the transformer
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_the_blocks_see_target_plus_kept_tokens_and_one_selection_per_call(pipe, mode):
    selections, seen = [], []

    def counting_random(latents, context):
        selections.append((tuple(latents.shape[:2]), list(context.ref_lengths), context.target_shape))
        return torch.rand(latents.shape[:2], generator=context.generator)

    images, branches = (2, 2) if mode == CFG_BATCH else (1, 1)
    sparsectx.enable(pipe, budget=BUDGET, selector=counting_random, seed=SEED)
    handle = _image_rows(pipe, seen)
    try:
        latents = [_run(pipe, mode) for _ in range(2)]  # a second call selects again
    finally:
        handle.remove()
    n = lp.tokens()
    assert seen == [(images, n + _n_kept(), 4 * lp.LATENT_CHANNELS)] * (2 * STEPS * branches)
    side = int(n ** 0.5)  # (a square reference: a square target)
    assert selections == [((1, n), [n], (side, side))] * 2  # the target's grid from its ids, past the text's
    assert all(out.shape == (images, n, 4 * lp.LATENT_CHANNELS) for out in latents)


def test_a_non_square_reference(pipe):
    """A reference of another aspect ratio (the pipeline sizes the target alike): the selectors get the grid of
    each from their ids, and the call equals masking the dropped keys."""
    image = lp.reference_image((96, 48), seed=3)
    seen = []

    def recording(latents, context):
        seen.append((context.target_shape, context.extra.get(IDS_GRID_SHAPES)))
        return latents.norm(dim=-1)

    sparsectx.enable(pipe, budget=0.5, selector=recording)
    _run(pipe, image=image)
    (target_shape, grids), = seen
    w, h = lp._CALCULATE_DIMENSIONS(lp.AREA, 2.0)
    assert target_shape == (h // lp.PX_PER_TOKEN, w // lp.PX_PER_TOKEN) and target_shape[0] != target_shape[1]
    assert grids == [target_shape]


# ----------------------------------------------------------------------------------------------------------------
# per-call settings: through the pipeline's joint_attention_kwargs, which its transformer's forward does not take
# ----------------------------------------------------------------------------------------------------------------
def test_per_call_settings_through_joint_attention_kwargs(pipe):
    sparsectx.enable(pipe, budget=BUDGET, selector="random", seed=SEED)
    seen = []
    handle = _image_rows(pipe, seen)
    try:
        _run(pipe, CFG_BATCH, joint_attention_kwargs={"sparsectx": {"budget": 0.5}})
        per_call = list(seen)
        seen.clear()
        _run(pipe, CFG_BATCH)
    finally:
        handle.remove()
    n = lp.tokens()
    assert per_call == [(2, n + n // 2, 4 * lp.LATENT_CHANNELS)] * (2 * STEPS)  # every step, both branches
    assert seen == [(2, n + _n_kept(), 4 * lp.LATENT_CHANNELS)] * (2 * STEPS)  # enable's budget on the next call


def test_a_per_call_budget_equals_enabling_it(pipe):
    sparsectx.enable(pipe, budget=BUDGET, selector="uniform")
    per_call = _run(pipe, CFG_BATCH, joint_attention_kwargs={"sparsectx": {"budget": 0.5, "selector": "random"}})
    sparsectx.enable(pipe, budget=0.5, selector="random")
    torch.testing.assert_close(per_call, _run(pipe, CFG_BATCH), rtol=0, atol=0)


@pytest.mark.parametrize("settings, error, words", [({"budget": 2.0}, ValueError, r"budget ratio must be in \[0, 1\]"),
                                                   ({"selector": "nope"}, ValueError, "nope"),
                                                   ([0.5], TypeError, "must be a dict")])
def test_bad_per_call_settings_fail_before_the_encoders(pipe, settings, error, words):
    sparsectx.enable(pipe, budget=BUDGET, selector="random", seed=SEED)
    ran = []
    handles = [module.register_forward_pre_hook(lambda *_: ran.append(1))
               for module in (pipe.text_encoder, pipe.vae.encoder)]
    try:
        with pytest.raises(error, match=rf"^joint_attention_kwargs\['sparsectx'\].*{words}") as raised:
            _run(pipe, joint_attention_kwargs={"sparsectx": settings})
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []
    assert "transformer's" not in str(raised.value)  # (the keyword the user gave: the pipeline's own)


@pytest.mark.parametrize("budget, words", [([[0.5], [0.5], [0.5]], "3 entries, which does not divide the batch of 2"),
                                           ([0.5, 0.5], "2 entries")])
def test_a_per_call_budget_that_does_not_fit_the_batch_names_its_keyword(pipe, budget, words):
    """A per-call budget checked against the batch or the references at the first forward (3 requests for a batch
    of 2; two per-image ratios for one reference) names the keyword it came through."""
    sparsectx.enable(pipe, budget=BUDGET, selector="random", seed=SEED)
    with pytest.raises(ValueError, match=rf"^joint_attention_kwargs\['sparsectx'\]: .*{words}"):
        _run(pipe, CFG_BATCH, joint_attention_kwargs={"sparsectx": {"budget": budget}})


def test_per_call_settings_with_the_transformer_enabled_alone_are_refused(pipe):
    """With the transformer enabled alone, the pipeline's joint_attention_kwargs reach nobody (LongCat's pipeline does
    not hand them on, and no enabled pipeline call takes them): a ValueError saying to enable the pipeline, not a call
    that silently runs enable's settings. A call without them runs as enabled."""
    sparsectx.enable(pipe.transformer, budget=BUDGET, selector="uniform")
    with pytest.raises(ValueError, match=r"LongCatImageEditPipeline's joint_attention_kwargs\['sparsectx'\] reaches "
                                         r"no transformer forward .*enable the pipeline"):
        _run(pipe, joint_attention_kwargs={"sparsectx": {"budget": 1.0}})
    seen = []
    handle = _image_rows(pipe, seen)
    try:
        _run(pipe, joint_attention_kwargs={"other": 1})
    finally:
        handle.remove()
    assert seen == [(1, lp.tokens() + _n_kept(), 4 * lp.LATENT_CHANNELS)] * STEPS


def test_per_call_settings_of_a_pipeline_not_enabled_inside_an_enabled_call_are_refused(pipe):
    """The same inside an enabled call: a pipeline sharing the transformer, not enabled, given per-call settings, is
    refused (before: it ran enable's settings silently there)."""
    sparsectx.enable(pipe, budget=BUDGET, selector="random", seed=SEED)
    other = type(pipe)._sparsectx_base.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))  # (enabled)
    other.set_progress_bar_config(disable=True)
    other.tokenizer_max_length = pipe.tokenizer_max_length  # (an instance setting: from_pipe does not copy it)

    def inner():
        with pytest.raises(ValueError, match=r"joint_attention_kwargs\['sparsectx'\] reaches no transformer forward"):
            _run(other, joint_attention_kwargs={"sparsectx": {"budget": 1.0}})
        return True

    with _inside_the_first_step(pipe, inner) as ran:
        _run(pipe)
    assert ran == [True]


def test_a_ref_shapes_signal_is_unused_on_ids(pipe):
    """The selectors read each image's grid from LongCat's ids: a ``ref_shapes`` signal (for models without ids)
    is warned about, not silently taken."""
    with pytest.warns(UserWarning, match=r"signals\['ref_shapes'\] is unused .*LongCat-Image.*\(img_ids\)"):
        sparsectx.enable(pipe, budget=BUDGET, selector="uniform", signals={"ref_shapes": [(4, 4)]})


@contextlib.contextmanager
def _inside_the_first_step(pipe, run):
    """``run()`` is called from the pipeline's first scheduler step (LongCat's pipeline takes no step callback)."""
    step, ran = pipe.scheduler.step, []

    def step_then_run(*args, **kwargs):
        if not ran:
            ran.append(run())
        return step(*args, **kwargs)

    pipe.scheduler.step = step_then_run
    try:
        yield ran
    finally:
        pipe.scheduler.step = step


def test_a_pipeline_not_enabled_called_inside_a_call_with_per_call_settings_runs_enables(pipe):
    """A pipeline sharing the transformer but not enabled itself (``from_pipe``), called inside an enabled call given
    per-call settings: its forwards run enable's settings (no forward of a LongCat call gets the settings in its
    arguments: the patch tells the calls apart by the innermost pipeline call on the stack; before, the inner
    pipeline's forwards ran the outer call's settings), the outer call's its own."""
    sparsectx.enable(pipe, budget=BUDGET, selector="random", seed=SEED)
    other = type(pipe)._sparsectx_base.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))  # (enabled)
    other.set_progress_bar_config(disable=True)
    other.tokenizer_max_length = pipe.tokenizer_max_length  # (an instance setting: from_pipe does not copy it)
    seen = []
    handle = _image_rows(pipe, seen)

    def inner():
        start = len(seen)
        _run(other)
        rows = seen[start:]
        del seen[start:]
        return rows

    try:
        with _inside_the_first_step(pipe, inner) as ran:
            _run(pipe, joint_attention_kwargs={"sparsectx": {"budget": 1.0}})
    finally:
        handle.remove()
    n = lp.tokens()
    assert ran == [[(1, n + _n_kept(), 4 * lp.LATENT_CHANNELS)] * STEPS]
    assert seen == [(1, 2 * n, 4 * lp.LATENT_CHANNELS)] * STEPS


def test_an_enabled_pipeline_called_inside_an_enabled_call_leaves_the_outer_selection(pipe):
    """Two enabled pipelines sharing the transformer, the second called inside the first's call with another prompt
    and seed: the outer call keeps its own selection for its later steps (before: the inner call dropped it, and the
    outer selected again on a later step's latents): one selection per call, and the outer equals its call alone."""
    other = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    other.set_progress_bar_config(disable=True)
    other.tokenizer_max_length = pipe.tokenizer_max_length  # (an instance setting: from_pipe does not copy it)
    selections = []

    def counting_attention(latents, context):
        selections.append(tuple(latents.shape))
        return sparsectx.selection.attention_scores(latents, context)

    sparsectx.enable(other, budget=BUDGET, selector=counting_attention)
    sparsectx.enable(pipe, budget=BUDGET, selector=counting_attention)
    alone = _run(pipe, CFG_BATCH)
    alone_keep = sparsectx.last_selection(pipe).keep.clone()
    with _inside_the_first_step(pipe, lambda: _run(other, prompt="a dog", generator_seed=5)) as ran:
        nested = _run(pipe, CFG_BATCH)
    assert len(ran) == 1 and len(selections) == 3  # the call alone, then the outer call's and the inner call's
    assert torch.equal(sparsectx.last_selection(pipe).keep, alone_keep)
    assert torch.equal(nested, alone)


def test_per_image_generators_select_each_image_as_it_would_alone(pipe):
    sparsectx.enable(pipe, budget=BUDGET, selector="random")
    seeds = (SEED, SEED + 7)
    with lp.small_area(), torch.no_grad():
        batched = pipe(image=lp.reference_image(), prompt="a cat", num_inference_steps=STEPS, guidance_scale=1.0,
                       num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in seeds],
                       output_type="latent").images
    keep = sparsectx.last_selection(pipe).keep.clone()
    assert keep.shape[0] == 2 and not torch.equal(keep[0], keep[1])
    for b, seed in enumerate(seeds):
        alone = _run(pipe, generator_seed=seed)
        assert torch.equal(sparsectx.last_selection(pipe).keep[0], keep[b])
        torch.testing.assert_close(alone[0], batched[b], rtol=0, atol=FP32_ATOL)
