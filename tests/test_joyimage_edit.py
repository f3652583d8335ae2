"""Drop-in Sparse Context for JoyImage-Edit (sparsectx.joyimage.compacted_edit_forward,
JoyImageEditTransformer3DModel): tiny random-weight models built from configs, fp32, CPU, offline. The transformer
takes latents ``[B, items, C, T, H, W]`` (the references first, the target last, one size), moves the target first,
patchifies the items as frames of one video grid with one RoPE table over it, and attends over ``[image, text]``
(no mask)."""
import contextlib
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "JoyImageEditTransformer3DModel"):
    pytest.skip(f"diffusers {diffusers.__version__} has no JoyImage-Edit", allow_module_level=True)
from diffusers.models.transformers import transformer_joyimage as je  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
from joyimage_pipeline import with_random_modulation  # noqa: E402
import sparsectx  # noqa: E402
from pipeline_fixtures import tiny_model_fixtures, tiny_pipeline_fixtures  # noqa: E402  (tests/, on sys.path)
from sparsectx import integration, joyimage  # noqa: E402

HEADS, HEAD_DIM = 2, 16
TEXT_DIM, CHANNELS, PATCH = 24, 4, (1, 2, 2)
LATENT_HW = (6, 8)  # each item's latent size: a 3 x 4 patch grid
PER_ITEM = (LATENT_HW[0] // PATCH[1]) * (LATENT_HW[1] // PATCH[2])
N_TEXT = 7


def _build(seed=0, rope_type="rope"):
    torch.manual_seed(seed)
    return with_random_modulation(diffusers.JoyImageEditTransformer3DModel(
        patch_size=list(PATCH), in_channels=CHANNELS, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
        text_dim=TEXT_DIM, num_layers=2, rope_dim_list=[4, 6, 6], rope_type=rope_type))


model, _always_disabled = tiny_model_fixtures(_build)


def _inputs(batch=2, seed=1, shared=False, items=2):
    """Forward kwargs: latents of ``items - 1`` references and the target (last); ``shared``: every sample has the
    first one's references (a pipeline repeats them over its batch)."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(1 if shared else batch, items - 1, CHANNELS, 1, *LATENT_HW, generator=g)
    target = torch.randn(batch, 1, CHANNELS, 1, *LATENT_HW, generator=g)
    return dict(hidden_states=torch.cat([refs.expand(batch, -1, -1, -1, -1, -1), target], 1),
                timestep=torch.rand(batch, generator=g) * 1000,
                encoder_hidden_states=torch.randn(batch, N_TEXT, TEXT_DIM, generator=g), return_dict=False)


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def random_selector(latents, context):
    return torch.rand(latents.shape[:2], generator=context.generator)


def _selector_keeping(mask):
    def selector(latents, context):
        return mask.clone()

    return selector


@contextlib.contextmanager
def _keys_masked(keys):
    """diffusers' JoyImage attention with the image rows ``keys`` (bool ``[B, S]`` in the patch sequence's order,
    False = dropped; or a callable of the batch size giving them) masked out as keys (its processor passes no mask:
    the dispatch it calls gets one)."""
    dispatch = je.dispatch_attention_fn

    def masked(query, key, value, attn_mask=None, **kwargs):
        rows = keys(query.shape[0]) if callable(keys) else keys
        text = torch.ones(rows.shape[0], key.shape[1] - rows.shape[1], dtype=torch.bool, device=rows.device)
        return dispatch(query, key, value, attn_mask=torch.cat([rows, text], 1)[:, None, None, :], **kwargs)

    je.dispatch_attention_fn = masked
    try:
        yield
    finally:
        je.dispatch_attention_fn = dispatch


def _image_keys(keep):
    """bool ``[B, S]``: the target's rows (first in the patch sequence) and the reference rows ``keep`` keeps."""
    return torch.cat([torch.ones(keep.shape[0], PER_ITEM, dtype=torch.bool, device=keep.device), keep], dim=1)


def _masked(model, keep, kwargs):
    with _keys_masked(_image_keys(keep.to(kwargs["hidden_states"].device))):
        return _run(model, kwargs)


def _assert_flash_criterion(out, masked, model, keep, kwargs):
    """``out``'s target item (dropped rows removed) is as close to the key-masked model in fp64 (on the CPU) as the
    key-masked model ``masked`` in the same dtype is (at most twice its error, plus fp32 resolution)."""
    model64 = _build(rope_type=model.rope_type).double()
    model64.load_state_dict(model.state_dict())
    kwargs64 = {k: v.to("cpu", torch.float64 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
                else v for k, v in kwargs.items()}
    exact = _masked(model64, keep.cpu(), kwargs64)[:, -1]
    error, native_error = ((x[:, -1].cpu().double() - exact).abs().max() for x in (out, masked))
    assert error <= 2 * native_error + 1e-6 * exact.abs().max(), (error, native_error)


def _block_rows(model) -> tuple:
    """(the image rows each forward's first block gets, the hook's handle)."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[1])

    return seen, model.double_blocks[0].register_forward_pre_hook(record, with_kwargs=True)


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1.0, 10**6])
def test_keep_all_is_the_unpatched_forward(model, budget):
    kwargs = _inputs()
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=budget, selector=random_selector, seed=0)
    assert torch.equal(_run(model, kwargs), expected)
    sparsectx.disable(model)
    assert torch.equal(_run(model, kwargs), expected)


@pytest.mark.parametrize("rope_type", ["rope", "mrope"])
@pytest.mark.parametrize("items", [2, 3])
def test_the_compacted_forward_keeping_every_row_is_diffusers_forward(rope_type, items):
    """Every row kept: diffusers' target item bit for bit, the references' items zeros."""
    model = _build(rope_type=rope_type)
    kwargs = _inputs(items=items)
    expected = _run(model, kwargs)
    with torch.no_grad():
        out = joyimage.compacted_edit_forward(model, torch.arange(items * PER_ITEM), **kwargs)[0]
    assert out.shape == expected.shape == (2, items, CHANNELS, 1, *LATENT_HW)
    assert torch.equal(out[:, -1], expected[:, -1]) and not out[:, :-1].any()


def test_patch_rows_are_the_rows_the_patch_embedding_makes(model):
    """``patch_rows`` orders the patches as the forward's sequence (target first, row-major per frame): the patch
    embedding (a convolution) applied to the latents equals its weights applied to those rows."""
    hidden = _inputs(items=3)["hidden_states"]
    rows = joyimage.patch_rows(hidden, PATCH)
    b, n, c, t, h, w = hidden.shape
    frames = torch.cat([hidden[:, -1:], hidden[:, :-1]], 1).permute(0, 2, 1, 3, 4, 5).reshape(b, c, n * t, h, w)
    with torch.no_grad():
        embedded = model.img_in(frames).flatten(2).transpose(1, 2)
        by_rows = rows @ model.img_in.weight.flatten(1).T + model.img_in.bias
    assert rows.shape == (2, 3 * PER_ITEM, CHANNELS * 4)
    torch.testing.assert_close(by_rows, embedded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
@pytest.mark.parametrize("selector", [random_selector, "uniform"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("rope_type", ["rope", "mrope"])
def test_dropping_rows_equals_masking_keys(selector, shared, rope_type, attention):
    """(``attention="sparsectx"``: sparsectx's processors on the compacted sequence.)"""
    model = _build(rope_type=rope_type)
    kwargs = _inputs(shared=shared)
    seen, handle = _block_rows(model)
    try:
        sparsectx.enable(model, budget=0.5, selector=selector, seed=0, attention=attention)
        dropped = _run(model, kwargs)
    finally:
        handle.remove()
    keep = sparsectx.last_selection(model).keep
    assert keep.sum(dim=1).tolist() == [PER_ITEM // 2] * 2
    groups = torch.unique(keep, dim=0).shape[0]
    assert groups == (2 if selector is random_selector and not shared else 1)
    # one forward per distinct keep mask, its blocks on the target and the kept rows only
    assert seen == [PER_ITEM + PER_ITEM // 2] * groups
    sparsectx.disable(model)
    masked = _masked(model, keep, kwargs)
    assert dropped.shape == (2, 2, CHANNELS, 1, *LATENT_HW) and not dropped[:, 0].any()
    _assert_flash_criterion(dropped, masked, model, keep, kwargs)
    assert (dropped[:, -1] - _run(model, kwargs)[:, -1]).abs().max() > 1e-3  # dropping changed it


def test_two_references_with_their_own_budgets(model):
    kwargs = _inputs(items=3, shared=True)
    sparsectx.enable(model, budget=[0.25, 1.0], selector="uniform")
    dropped = _run(model, kwargs)
    selection = sparsectx.last_selection(model)
    assert selection.ref_lengths == [PER_ITEM] * 2 and selection.ref_shapes == [(3, 4)] * 2
    assert [int(part.sum()) for part in selection.keep[0].split(PER_ITEM)] == [3, PER_ITEM]
    sparsectx.disable(model)
    _assert_flash_criterion(dropped, _masked(model, selection.keep, kwargs), model, selection.keep, kwargs)


def test_mixed_budgets_equal_each_sample_alone(model):
    kwargs = _inputs()
    sparsectx.enable(model, budget=[[0.25], [0.75]], selector=random_selector, seed=0)
    both = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    assert keep.sum(dim=1).tolist() == [3, 9]
    for b in range(2):
        alone = {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        sparsectx.enable(model, budget=None, selector=_selector_keeping(keep[b:b + 1]))
        assert torch.equal(_run(model, alone), both[b:b + 1])


def test_later_steps_read_the_host_once(model):
    """The first step reads the host once beyond what the model reads (the keep mask), and a later step of the same
    call, which reuses the plan, once too (the check that its references are the plan's)."""
    plain, first, later = checks.host_reads_of_two_steps(model, _inputs(shared=True), _run, budget=0.5,
                                                         selector=random_selector, seed=0)
    assert later.count == plain.count + 1, later.ops
    assert first.count == plain.count + 1, first.ops  # the keep mask (the layout is the latents' shape)


def test_a_call_without_references_runs_the_original_forward(model):
    sparsectx.enable(model, budget=0.5)
    kwargs = _inputs()
    one_item = {**kwargs, "hidden_states": kwargs["hidden_states"][:, -1:]}
    five_d = {**kwargs, "hidden_states": kwargs["hidden_states"][:, -1]}
    outs = [_run(model, one_item), _run(model, five_d)]
    assert sparsectx.last_selection(model) is None
    sparsectx.disable(model)
    assert torch.equal(outs[0], _run(model, one_item)) and torch.equal(outs[1], _run(model, five_d))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_random_drop_training_gives_the_masked_models_output_and_gradients(checkpointing):
    """``random_drop_selector`` on a train-mode transformer: a new mask at every forward, each sample its own
    forward on its kept tokens (its blocks through the checkpointing function when it is on); the output and every
    weight's gradient equal those of the unpatched model with the same tokens masked out as keys."""
    model = _build()
    block_rows = []  # (the image rows of each checkpointed block call)
    if checkpointing:
        model.enable_gradient_checkpointing()
        function = model._gradient_checkpointing_func
        model._gradient_checkpointing_func = lambda block, img, *args: block_rows.append(img.shape[1]) or \
            function(block, img, *args)
    keep = checks.assert_random_drop_training_matches_masking(
        model, _inputs(), lambda out: out[:, -1], lambda keep: _keys_masked(_image_keys(keep)))
    # the drop-in's forwards checkpointed their blocks on the kept rows (each sample: its own forward)
    kept_rows = sorted({PER_ITEM + int(n) for n in keep.sum(dim=1)})
    assert (set(kept_rows) <= set(block_rows)) == checkpointing


# ----------------------------------------------------------------------------------------------------------------
# the attention probe
# ----------------------------------------------------------------------------------------------------------------
class _RecordingProcessor(je.JoyImageAttnProcessor):
    """diffusers' processor, recording the image q and k and the text q it computes (after norms and RoPE)."""

    def __init__(self):
        self.qk = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, **kwargs):
        img_q, img_k, _ = attn.img_attn_qkv(hidden_states).chunk(3, dim=-1)
        txt_q, txt_k, _ = attn.txt_attn_qkv(encoder_hidden_states).chunk(3, dim=-1)
        img_q = attn.img_attn_q_norm(img_q.unflatten(-1, (attn.heads, -1)))
        img_k = attn.img_attn_k_norm(img_k.unflatten(-1, (attn.heads, -1)))
        txt_q = attn.txt_attn_q_norm(txt_q.unflatten(-1, (attn.heads, -1)))
        txt_k = attn.txt_attn_k_norm(txt_k.unflatten(-1, (attn.heads, -1)))
        vis_freqs, txt_freqs = image_rotary_emb
        img_q, img_k = je._apply_rotary_emb(img_q, img_k, vis_freqs)
        if txt_freqs is not None:
            txt_q, txt_k = je._apply_rotary_emb(txt_q, txt_k, txt_freqs)
        self.qk.append((img_q, img_k, txt_q))
        return super().__call__(attn, hidden_states, encoder_hidden_states, image_rotary_emb, **kwargs)


def _first_block_qk(model, kwargs):
    with checks.attention_processors(model.double_blocks[:1], _RecordingProcessor()) as recorder:
        _run(model, kwargs)
    return recorder.qk[0]


@pytest.mark.parametrize("rope_type", ["rope", "mrope"])
def test_probe_tensors_are_the_first_blocks_query_and_key(rope_type):
    model = _build(rope_type=rope_type)
    kwargs = _inputs()
    query, key, text_query = _first_block_qk(model, kwargs)
    record = {}
    sparsectx.enable(model, budget=3, selector=checks.recording_attention(record))
    _run(model, kwargs)
    close = dict(rtol=1e-5, atol=1e-6)  # the probe projects fewer rows: fp32 rounding of the same products
    torch.testing.assert_close(record["text_queries"], text_query, **close)
    torch.testing.assert_close(record["target_queries"], query[:, :PER_ITEM], **close)
    torch.testing.assert_close(record["ref_keys"], key[:, PER_ITEM:], **close)
    assert record["ref_keys"].shape == (2, PER_ITEM, HEADS, HEAD_DIM) and "text_mask" not in record


def test_attention_selector_keeps_the_top_attention_mass(model):
    from sparsectx.reference import topk_keep_mask

    kwargs = _inputs()
    query, key, _ = _first_block_qk(model, kwargs)
    mass = sparsectx.selection.attention_mass(query[:, :PER_ITEM], key[:, PER_ITEM:])
    sparsectx.enable(model, budget=3, selector="attention")
    _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep, topk_keep_mask(mass, [3] * mass.shape[0]))


@pytest.mark.parametrize("selector", ["edit", "subject"])
def test_task_aware_selectors_run_on_the_probe(model, selector):
    sparsectx.enable(model, budget=0.25, selector=selector)
    out = _run(model, _inputs(shared=True))
    assert sparsectx.last_selection(model).keep.sum(dim=1).tolist() == [3, 3]
    assert not out[:, 0].any() and out[:, -1].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------------------------
def test_masked_drop_training_is_refused_naming_what_works(model):
    with pytest.raises(TypeError, match="random_drop_selector"):
        sparsectx.enable_drop_training(model)
    assert not integration.is_enabled(model)


# ----------------------------------------------------------------------------------------------------------------
# bf16
# ----------------------------------------------------------------------------------------------------------------
def _check_bf16(device, attention):
    """In bf16: the drop-in's target item is within twice the key-masked model's bf16 error of its fp64 result."""
    checks.check_bf16_dropping_equals_masking(
        _build().to(device, torch.bfloat16), checks.cast_inputs(_inputs(shared=True), device, torch.bfloat16), _run,
        _masked, _assert_flash_criterion, attention=attention)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_gpu_bf16_dropping_rows_equals_masking_keys(attention):
    _check_bf16("cuda", attention)


# (sparsectx's attention in bf16 on the CPU: the kernels through the interpreter patched to compute bf16 as a GPU
# does, as the mark asks; unmarked, bf16 took the torch reference there)
@pytest.mark.parametrize("attention", ["native", pytest.param("sparsectx", marks=pytest.mark.bf16_kernels)])
def test_bf16_dropping_rows_equals_masking_keys_on_the_cpu(attention):
    _check_bf16("cpu", attention)


def _pipeline_helpers():
    """tests/joyimage_edit_pipeline.py (tests/ is on sys.path by pytest.ini), imported where used."""
    return importlib.import_module("joyimage_edit_pipeline")


# ----------------------------------------------------------------------------------------------------------------
# the pipeline (tests/joyimage_edit_pipeline.py: tiny components, stand-ins for the Qwen3-VL encoder and processor)
# ----------------------------------------------------------------------------------------------------------------
PIPE_SIZE = (64, 48)  # (width, height) of the reference: a 6 x 8 latent, 3 x 4 patches; the target its size
PIPE_ROWS = 12  # patch rows per item


pipe, _pipe_disabled = tiny_pipeline_fixtures(lambda: _pipeline_helpers().tiny_joyimage_edit_pipeline())


def _call(pipe, **kwargs):
    helpers = _pipeline_helpers()
    image = kwargs.pop("image", None) or helpers.reference_image(PIPE_SIZE)
    return helpers.run(pipe, image=image, **kwargs)


def _kept(budget) -> int:
    return sum(integration.budget_counts(budget, 1, [PIPE_ROWS])[0])


def test_the_pipeline_class_is_accepted_and_named():
    assert "JoyImageEditPipeline" in integration.SUPPORTED_PIPELINES
    assert integration._family_of(_pipeline_helpers().tiny_joyimage_edit_pipeline().transformer) == \
        integration.JOYEDIT


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_keep_all_and_disable_are_the_unpatched_pipeline(pipe, guidance_scale):
    checks.check_keep_all_and_disable(pipe, lambda: _call(pipe, guidance_scale=guidance_scale))


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_the_blocks_see_the_target_and_the_kept_tokens(pipe, guidance_scale):
    """Every forward (both guidance branches, one selection for the call) runs its blocks on the target's rows and
    the kept reference rows."""
    seen, handle = _block_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=0.25, selector="uniform")
        _call(pipe, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    assert seen == [PIPE_ROWS + _kept(0.25)] * (4 if guidance_scale > 1 else 2)
    assert sparsectx.last_selection(pipe).keep.sum().item() == _kept(0.25)


@pytest.mark.parametrize("selector", ["uniform", "attention"])
def test_the_sparse_pipeline_equals_masking_the_dropped_keys(pipe, selector):
    sparsectx.enable(pipe, budget=0.5, selector=selector)
    dropped = _call(pipe, negative_prompt="blurry")
    keep = sparsectx.last_selection(pipe).keep
    sparsectx.disable(pipe)
    with _keys_masked(lambda batch: _image_keys(keep[:1]).expand(batch, -1)):
        masked = _call(pipe, negative_prompt="blurry")
    torch.testing.assert_close(dropped, masked, rtol=0, atol=1e-5)
    assert (dropped - _call(pipe, negative_prompt="blurry")).abs().max() > 1e-4


def test_per_call_settings_through_attention_kwargs_the_pipeline_does_not_take(pipe):
    seen, handle = _block_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=0.5, selector="uniform")
        _call(pipe, attention_kwargs={"sparsectx": {"budget": 3}})
        assert seen == [PIPE_ROWS + 3] * 4
        seen.clear()
        _call(pipe)
        assert seen == [PIPE_ROWS + _kept(0.5)] * 4
    finally:
        handle.remove()
    sparsectx.disable(pipe)
    with pytest.raises(TypeError, match="attention_kwargs"):
        _call(pipe, attention_kwargs={"sparsectx": {"budget": 3}})


@pytest.mark.parametrize("selector", ["attention", "subject", "edit"])
def test_the_probe_selectors_run_in_the_pipeline(pipe, selector):
    seen, handle = _block_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=4, selector=selector)
        _call(pipe)
    finally:
        handle.remove()
    assert sparsectx.last_selection(pipe).keep.sum().item() == 4
    # the probe's stopped forward (every row), then each step's two forwards on the kept rows
    assert seen == [2 * PIPE_ROWS] + [PIPE_ROWS + 4] * 4


def test_images_per_prompt_share_the_reference_and_its_selection(pipe):
    seen, handle = _block_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=0.5, selector="random")
        out = _call(pipe, num_images_per_prompt=2)
    finally:
        handle.remove()
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape == (2, PIPE_ROWS) and torch.equal(keep[0], keep[1])
    assert seen == [PIPE_ROWS + _kept(0.5)] * 4 and out.shape[0] == 2  # (one group: the batch of 2)


def test_the_pipelines_generator_seeds_the_selection(pipe):
    checks.check_generator_seeds_selection(pipe, lambda seed: _call(pipe, generator_seed=seed))
