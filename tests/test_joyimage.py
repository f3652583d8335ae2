"""Drop-in Sparse Context for JoyImage-Edit-Plus (sparsectx.joyimage, JoyImageEditPlusTransformer3DModel): tiny
random-weight models built from configs, fp32, CPU, offline. The transformer takes each sample's patches
``[B, N, C, pt, ph, pw]`` (the target's, then each reference's), their grids in ``shape_list``, and builds its RoPE
tables and the padding mask inside its forward; its joint attention runs over ``[image, text]``."""
import copy
import importlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "JoyImageEditPlusTransformer3DModel"):
    pytest.skip(f"diffusers {diffusers.__version__} has no JoyImage-Edit-Plus", allow_module_level=True)
from diffusers.models.transformers import transformer_joyimage_edit_plus as jp  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
from joyimage_pipeline import with_random_modulation  # noqa: E402
import sparsectx  # noqa: E402
from pipeline_fixtures import tiny_model_fixtures, tiny_pipeline_fixtures  # noqa: E402  (tests/, on sys.path)
from sparsectx import integration, joyimage  # noqa: E402

HEADS, HEAD_DIM = 2, 16
TEXT_DIM, CHANNELS, PATCH = 24, 4, (1, 2, 2)
TARGET = (1, 3, 4)  # (t, h, w) of the target's patch grid: 12 rows
REFS = ((1, 4, 4), (1, 2, 5))  # two references of other sizes: 16 and 10 rows
N_TARGET = math.prod(TARGET)
N_REFS = [math.prod(shape) for shape in REFS]
N_IMAGES = N_TARGET + sum(N_REFS)
N_TEXT = 7


def _build(seed=0):
    torch.manual_seed(seed)
    return with_random_modulation(diffusers.JoyImageEditPlusTransformer3DModel(
        patch_size=list(PATCH), in_channels=CHANNELS, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
        text_dim=TEXT_DIM, num_layers=2, rope_dim_list=[4, 6, 6]))


model, _always_disabled = tiny_model_fixtures(_build)


def _inputs(batch=2, seed=1, padded=False, shared=False):
    """Forward kwargs; ``padded``: sample 0's prompt ends with two padding positions (``encoder_hidden_states_mask``;
    without it the forward builds no mask); ``shared``: every sample has the first one's reference patches (a
    pipeline repeats them over its batch)."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(1 if shared else batch, sum(N_REFS), CHANNELS, *PATCH, generator=g).expand(batch, -1, -1, -1,
                                                                                                -1, -1)
    target = torch.randn(batch, N_TARGET, CHANNELS, *PATCH, generator=g)
    kwargs = dict(hidden_states=torch.cat([target, refs], 1),
                  encoder_hidden_states=torch.randn(batch, N_TEXT, TEXT_DIM, generator=g),
                  timestep=torch.rand(batch, generator=g) * 1000, shape_list=[[TARGET, *REFS]] * batch,
                  return_dict=False)
    if padded:
        mask = torch.ones(batch, N_TEXT, dtype=torch.long)
        mask[0, -2:] = 0
        kwargs["encoder_hidden_states_mask"] = mask
    return kwargs


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def random_selector(latents, context):
    return torch.rand(latents.shape[:2], generator=context.generator)


class _KeyMasked(jp.JoyImageEditPlusAttnProcessor):
    """Test-only: diffusers' processor with the image rows ``keys`` (bool ``[B, N_IMAGES]``, False = dropped) masked
    out as keys."""

    def __init__(self, keys):
        self.keys = keys

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, attention_mask=None):
        text = torch.ones(self.keys.shape[0], encoder_hidden_states.shape[1], dtype=torch.bool,
                          device=self.keys.device)
        keys = torch.cat([self.keys, text], dim=1)[:, None, None, :]
        attention_mask = keys if attention_mask is None else attention_mask & keys
        return super().__call__(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask)


def _image_keys(keep, n_target=N_TARGET):
    """bool ``[B, n_target + N]``: the target rows and the reference rows ``keep`` keeps."""
    return torch.cat([torch.ones(keep.shape[0], n_target, dtype=torch.bool, device=keep.device), keep], dim=1)


def _masked(model, keep, kwargs):
    """The unpatched model with the reference rows ``keep`` drops masked out as keys in every layer."""
    with checks.attention_processors(model.double_blocks,
                                     _KeyMasked(_image_keys(keep).to(kwargs["hidden_states"].device))):
        return _run(model, kwargs)


def _assert_flash_criterion(out, masked, model, keep, kwargs):
    """``out``'s target rows (dropped rows removed) are as close to the key-masked model in fp64 (on the CPU) as the
    key-masked model ``masked`` in the same dtype is (at most twice its error, plus fp32 resolution)."""
    model64 = _build().double()
    model64.load_state_dict(model.state_dict())
    kwargs64 = {k: v.to("cpu", torch.float64 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
                else v for k, v in kwargs.items()}
    exact = _masked(model64, keep.cpu(), kwargs64)[:, :N_TARGET]
    error, native_error = ((x[:, :N_TARGET].cpu().double() - exact).abs().max() for x in (out, masked))
    assert error <= 2 * native_error + 1e-6 * exact.abs().max(), (error, native_error)


def _rows_seen(model) -> tuple:
    """(list of patch rows per sample each forward's patch embedder gets, the hook's handle)."""
    seen = []
    handle = model.img_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    return seen, handle


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
    sparsectx.disable(model)
    assert torch.equal(_run(model, kwargs), expected)


def test_the_compacted_forward_keeping_every_row_is_diffusers_forward(model):
    """``shape_list`` rewritten for the compacted rows and the RoPE rows served by ``kept_rope_rows``, with nothing
    dropped: diffusers' output bit for bit (the tables are the model's own, the rows in order)."""
    kwargs = _inputs(padded=True)
    expected = _run(model, kwargs)
    everything = torch.arange(N_IMAGES)
    with joyimage.kept_rope_rows(model, [TARGET, *REFS], everything, N_REFS):
        out = _run(model, {**kwargs, "shape_list": joyimage.compacted_shape_list(kwargs["shape_list"], N_REFS)})
    assert torch.equal(out, expected)
    assert "_get_rotary_pos_embed_for_range" not in model.__dict__  # the model's own method again


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
@pytest.mark.parametrize("selector", [random_selector, "uniform"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_dropping_rows_equals_masking_keys(model, selector, padded, shared, attention):
    """(``attention="sparsectx"``: sparsectx's processors on the compacted sequence, the text's padding a key mask.)"""
    kwargs = _inputs(padded=padded, shared=shared)
    seen, handle = _rows_seen(model)
    try:
        sparsectx.enable(model, budget=[0.5, 3], selector=selector, seed=0, attention=attention)
        dropped = _run(model, kwargs)
    finally:
        handle.remove()
    keep = sparsectx.last_selection(model).keep
    counts = integration.budget_counts([0.5, 3], 2, N_REFS)[0]
    assert [[int(part.sum()) for part in sample.split(N_REFS)] for sample in keep] == [counts] * 2
    groups = torch.unique(keep, dim=0).shape[0]
    assert groups == (2 if selector is random_selector and not shared else 1)  # (uniform ignores the latents)
    # one forward per distinct keep mask, each on the kept rows only (the dropped rows never entered the model)
    assert seen == [(2 // groups) * (sum(counts) + N_TARGET)] * groups
    sparsectx.disable(model)
    masked = _masked(model, keep, kwargs)
    assert dropped.shape == (2, N_IMAGES, CHANNELS, *PATCH) and not dropped[:, N_TARGET:].any()
    _assert_flash_criterion(dropped, masked, model, keep, kwargs)
    assert (dropped[:, :N_TARGET] - _run(model, kwargs)[:, :N_TARGET]).abs().max() > 1e-3  # dropping changed it


def test_a_reference_keeping_nothing_and_one_keeping_everything(model):
    kwargs = _inputs(padded=True, shared=True)
    sparsectx.enable(model, budget=[0, 1.0], selector="uniform")
    dropped = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    assert not keep[:, :N_REFS[0]].any() and keep[:, N_REFS[0]:].all()
    sparsectx.disable(model)
    _assert_flash_criterion(dropped, _masked(model, keep, kwargs), model, keep, kwargs)


def test_mixed_budgets_equal_each_sample_alone(model):
    """Per-request budgets: each sample runs on its own kept rows (a group each), as it would alone."""
    kwargs = _inputs(padded=True)
    sparsectx.enable(model, budget=[[0.5, 0.5], [3, 1.0]], selector=random_selector, seed=0)
    both = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    assert [[int(part.sum()) for part in sample.split(N_REFS)] for sample in keep] == [[8, 5], [3, 10]]
    for b in range(2):
        alone = {k: v[b:b + 1] if isinstance(v, torch.Tensor) else [v[b]] if k == "shape_list" else v
                 for k, v in kwargs.items()}
        sparsectx.enable(model, budget=None, selector=_selector_keeping(keep[b:b + 1]))
        assert torch.equal(_run(model, alone), both[b:b + 1])


def _selector_keeping(mask):
    def selector(latents, context):
        return mask.clone()

    return selector


def test_later_steps_read_the_host_once(model):
    """The first step reads the host once beyond what the model reads (the keep mask), and a later step of the same
    call, which reuses the plan, once too (the check that its references are the plan's)."""
    plain, first, later = checks.host_reads_of_two_steps(model, _inputs(shared=True, padded=True), _run, budget=0.5,
                                                         selector=random_selector, seed=0)
    assert later.count == plain.count + 1, later.ops
    assert first.count == plain.count + 1, first.ops  # the keep mask (the layout is read from shape_list, on the host)


def test_a_new_grid_of_the_same_rows_selects_on_its_own_layout(model):
    """The same patches described by another ``shape_list`` (the references' grids swapped: as many rows) on the same
    prompt tensors: a new plan on the new layout, not the first call's."""
    kwargs = _inputs(padded=True, shared=True)
    swapped = {**kwargs, "shape_list": [[TARGET, (1, 2, 5), (1, 4, 4)]] * 2}
    sparsectx.enable(model, budget=[1, 2], selector="uniform")
    _run(model, kwargs)
    assert sparsectx.last_selection(model).ref_lengths == N_REFS
    out = _run(model, swapped)
    selection = sparsectx.last_selection(model)
    assert selection.ref_lengths == [10, 16] and selection.ref_shapes == [(2, 5), (4, 4)]
    sparsectx.disable(model)
    masked = _masked(model, selection.keep, swapped)
    torch.testing.assert_close(out[:, :N_TARGET], masked[:, :N_TARGET], rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_random_drop_training_gives_the_masked_models_output_and_gradients(checkpointing):
    """``random_drop_selector`` on a train-mode transformer (the way to fine-tune it with dropped references): a
    new mask at every forward; the output and every weight's gradient equal those of the unpatched model with the
    same tokens masked out as keys (gradient checkpointing too)."""
    model = _build()
    if checkpointing:
        model.enable_gradient_checkpointing()

    checks.assert_random_drop_training_matches_masking(
        model, _inputs(padded=True), lambda out: out[:, :N_TARGET],
        lambda keep: checks.attention_processors(model.double_blocks, _KeyMasked(_image_keys(keep))))


# ----------------------------------------------------------------------------------------------------------------
# the attention probe
# ----------------------------------------------------------------------------------------------------------------
class _RecordingProcessor(jp.JoyImageEditPlusAttnProcessor):
    """diffusers' processor, recording the image q and k and the text q it computes (after norms and RoPE)."""

    def __init__(self):
        self.qk = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, attention_mask=None):
        img_q, img_k, _ = attn.img_attn_qkv(hidden_states).chunk(3, dim=-1)
        txt_q = attn.txt_attn_qkv(encoder_hidden_states).chunk(3, dim=-1)[0]
        img_q = attn.img_attn_q_norm(img_q.unflatten(-1, (attn.heads, -1)))
        img_k = attn.img_attn_k_norm(img_k.unflatten(-1, (attn.heads, -1)))
        img_q, img_k = jp._apply_rotary_emb_batched(img_q, img_k, image_rotary_emb)
        self.qk.append((img_q, img_k, attn.txt_attn_q_norm(txt_q.unflatten(-1, (attn.heads, -1)))))
        return super().__call__(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask)


def _first_block_qk(model, kwargs):
    with checks.attention_processors(model.double_blocks[:1], _RecordingProcessor()) as recorder:
        _run(model, kwargs)
    return recorder.qk[0]


@pytest.mark.parametrize("padded", [False, True])
def test_probe_tensors_are_the_first_blocks_query_and_key(model, padded):
    """Target queries and reference keys are rows of the image q and k diffusers' processor computes in the first
    block, the text queries its text q; the prompt's padding comes as ``text_mask``."""
    kwargs = _inputs(padded=padded)
    query, key, text_query = _first_block_qk(model, kwargs)
    record = {}
    sparsectx.enable(model, budget=3, selector=checks.recording_attention(record))
    _run(model, kwargs)
    close = dict(rtol=1e-5, atol=1e-6)  # the probe projects fewer rows: fp32 rounding of the same products
    torch.testing.assert_close(record["text_queries"], text_query, **close)
    torch.testing.assert_close(record["target_queries"], query[:, :N_TARGET], **close)
    torch.testing.assert_close(record["ref_keys"], key[:, N_TARGET:], **close)
    assert record["ref_keys"].shape == (2, sum(N_REFS), HEADS, HEAD_DIM)
    if padded:
        assert torch.equal(record["text_mask"], kwargs["encoder_hidden_states_mask"].bool())
    else:
        assert "text_mask" not in record


def test_attention_selector_keeps_the_top_attention_mass(model):
    from sparsectx.reference import topk_keep_mask

    kwargs = _inputs(padded=True)
    query, key, _ = _first_block_qk(model, kwargs)
    mass = sparsectx.selection.attention_mass(query[:, :N_TARGET], key[:, N_TARGET:])
    expected = torch.cat([topk_keep_mask(part, [3] * mass.shape[0]) for part in mass.split(N_REFS, 1)], dim=1)
    sparsectx.enable(model, budget=3, selector="attention")
    _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep, expected)


@pytest.mark.parametrize("selector", ["edit", "subject"])
def test_task_aware_selectors_run_on_the_probe(model, selector):
    kwargs = _inputs(padded=True, shared=True)
    sparsectx.enable(model, budget=0.25, selector=selector)
    out = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    counts = integration.budget_counts(0.25, 1, N_REFS)[0]
    assert [[int(part.sum()) for part in sample.split(N_REFS)] for sample in keep] == [counts] * 2
    assert not out[:, N_TARGET:].any() and out[:, :N_TARGET].abs().sum() > 0


def test_the_grid_selectors_see_each_references_grid(model):
    sparsectx.enable(model, budget=0.25, selector="uniform")
    _run(model, _inputs(shared=True))
    selection = sparsectx.last_selection(model)
    assert selection.ref_shapes == [(4, 4), (2, 5)]
    assert [tuple(grid.shape[1:]) for grid in selection.grids()] == [(4, 4), (2, 5)]


# ----------------------------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
def test_masked_drop_training_gives_the_key_masked_models_output_and_gradients(checkpointing):
    """``enable_drop_training``: every token stays in the sequence, sparsectx's processors mask the drawn tokens as
    keys; the output and every weight's gradient equal the unpatched model's with the same tokens masked."""
    model = _build().train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    kwargs = _inputs(padded=True)
    target = torch.randn(2, N_TARGET, CHANNELS, *PATCH, generator=torch.Generator().manual_seed(4))

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)[0][:, :N_TARGET]
        ((out - target) ** 2).mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    sparsectx.enable_drop_training(model, ratio_range=(0.2, 0.6), generator=torch.Generator().manual_seed(0))
    try:
        dropped_out, dropped_grads = outputs_and_grads()
        keep = sparsectx.last_drop_mask(model)
    finally:
        sparsectx.disable_drop_training(model)
    assert keep.shape == (2, N_IMAGES) and keep[:, :N_TARGET].all() and not keep.all()
    with checks.attention_processors(model.double_blocks, _KeyMasked(keep)):
        masked_out, masked_grads = outputs_and_grads()
    torch.testing.assert_close(dropped_out, masked_out, rtol=0, atol=1e-5)
    assert dropped_grads.keys() == masked_grads.keys()
    for name, grad in dropped_grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=checks.GRAD_RTOL, atol=checks.GRAD_ATOL, msg=name)


def test_inputs_that_do_not_describe_one_sequence_are_refused(model):
    sparsectx.enable(model, budget=0.5)
    kwargs = _inputs()
    with pytest.raises(ValueError, match="shape_list differ between samples"):
        _run(model, {**kwargs, "shape_list": [[TARGET, *REFS], [TARGET, REFS[1], REFS[0]]]})
    # a sample without references, first or last (the batch padded to the longest sample)
    for shapes in ([[TARGET], [TARGET, *REFS]], [[TARGET, *REFS], [TARGET]]):
        with pytest.raises(ValueError, match="shape_list differ between samples"):
            _run(model, {**kwargs, "shape_list": shapes})
    with pytest.raises(ValueError, match="describe"):
        _run(model, {**kwargs, "hidden_states": kwargs["hidden_states"][:, 1:]})
    with pytest.raises(ValueError, match="shape_list must"):
        _run(model, {**kwargs, "shape_list": [[TARGET, *REFS, (1, 2)]] * 2})


def test_a_call_without_references_runs_the_original_forward(model):
    kwargs = _inputs(padded=True)
    target_only = {**kwargs, "hidden_states": kwargs["hidden_states"][:, :N_TARGET], "shape_list": [[TARGET]] * 2}
    sparsectx.enable(model, budget=0.5)
    out = _run(model, target_only)
    assert sparsectx.last_selection(model) is None
    sparsectx.disable(model)
    assert torch.equal(out, _run(model, target_only))


def _padded_batch():
    """Sample 0 with both references, sample 1 with the first only (its rows padded, as the pipeline pads them)."""
    kwargs = _inputs(padded=True)
    hidden = kwargs["hidden_states"].clone()
    hidden[1, N_TARGET + N_REFS[0]:] = 0
    return {**kwargs, "hidden_states": hidden, "shape_list": [[TARGET, *REFS], [TARGET, REFS[0]]]}


def test_samples_with_other_references_run_diffusers_forward_when_every_token_is_kept(model):
    """diffusers' forward runs a batch whose samples hold other references right (each sample its RoPE, the padding
    masked): keeping every token runs it unchanged; a budget that drops tokens is refused (one layout a batch)."""
    kwargs = _padded_batch()
    expected = _run(model, kwargs)
    for budget in (1.0, 10**6, [[1.0, 1.0], [1.0]]):
        sparsectx.enable(model, budget=budget)
        assert torch.equal(_run(model, kwargs), expected), budget
        assert sparsectx.last_selection(model) is None
    sparsectx.enable(model, budget=0.5)
    with pytest.raises(ValueError, match="shape_list differ between samples"):
        _run(model, kwargs)


def test_sparsectx_attention_masks_the_padded_rows_of_a_shorter_sample(model):
    """Keeping every token of samples with other references, sparsectx's processors take the forward's key mask
    whole: the padded image rows of the shorter sample are masked as diffusers masks them."""
    kwargs = _padded_batch()
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=1.0, attention="sparsectx")
    out = _run(model, kwargs)
    sparsectx.disable(model)
    everything = torch.ones(2, sum(N_REFS), dtype=torch.bool)
    _assert_flash_criterion(out, expected, model, everything, kwargs)
    # the padding mattered: attending to the padded rows gives another output
    padding_seen = _masked(model, everything, {**kwargs, "encoder_hidden_states_mask": None})
    assert (padding_seen[1, :N_TARGET] - expected[1, :N_TARGET]).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["tensors", "tensor", "array"])
def test_shape_list_as_tensors_or_arrays_is_read_as_the_tuples(model, form):
    """diffusers' forward takes the grids as tensors or arrays too (e.g. from a data loader's collate)."""
    kwargs = _inputs(padded=True, shared=True)
    grids = torch.tensor([[TARGET, *REFS]] * 2)
    shape_list = {"tensors": list(grids), "tensor": grids, "array": grids.numpy()}[form]
    sparsectx.enable(model, budget=0.5, selector="uniform")
    expected = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    assert torch.equal(_run(model, {**kwargs, "shape_list": shape_list}), expected)
    assert torch.equal(sparsectx.last_selection(model).keep, keep)


def test_a_stateful_hook_refuses_samples_keeping_other_tokens_naming_how_to_remove_it():
    """A step cache hook (pyramid attention broadcast) keeps one state per denoiser call: samples that keep other
    tokens run as separate forwards and are refused; the model has no ``disable_cache`` (no cache mixin), so the
    message names diffusers' ``remove_hook``."""
    hooks = pytest.importorskip("diffusers.hooks")
    model = _build()
    hooks.apply_pyramid_attention_broadcast(model, hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_block_identifiers=("double_blocks",),
        current_timestep_callback=lambda: 500))
    sparsectx.enable(model, budget=[[0.25], [0.5]], selector="uniform")
    with pytest.raises(RuntimeError, match=r"2 separate forwards.*remove_hook") as refused:
        _run(model, _inputs(shared=True))
    assert "disable_cache" not in str(refused.value) and not hasattr(model, "disable_cache")
    sparsectx.disable(model)


@pytest.mark.parametrize("form", ["[B,1,1,S] bool", "[B,S] bool", "[1,1,1,S] bool", "[B,1,1,S] additive"])
def test_the_plus_processor_takes_the_key_masks_diffusers_dispatch_takes(form):
    """Called directly (not only through the forward's ``[B, 1, 1, S]`` boolean mask): a boolean key mask broadcast
    over the batch or without its singleton dims meets the flash criterion against diffusers' processor in fp64;
    an additive mask, or one with a row per query, runs diffusers' processor (an additive mask's finite negatives
    were read as keys kept; a per-query mask was refused)."""
    from sparsectx import processors

    torch.manual_seed(0)
    attn = jp.JoyImageEditPlusAttention(HEADS * HEAD_DIM, HEADS, HEAD_DIM)
    batch, n_image = 2, 20
    hidden, text = torch.randn(batch, n_image, HEADS * HEAD_DIM), torch.randn(batch, N_TEXT, HEADS * HEAD_DIM)
    tables = (torch.randn(batch, n_image, HEAD_DIM), torch.randn(batch, n_image, HEAD_DIM))
    keys = torch.ones(batch, n_image + N_TEXT, dtype=torch.bool)
    keys[0, -2:] = False
    keys[1, 15:n_image] = False
    if form.startswith("[1"):
        keys[1] = keys[0]
    mask = {"[B,1,1,S] bool": keys[:, None, None], "[B,S] bool": keys, "[1,1,1,S] bool": keys[:1, None, None],
            "[B,1,1,S] additive": torch.where(keys, 0.0, float("-inf"))[:, None, None]}[form]
    ours = processors.SparsectxJoyImagePlusAttnProcessor()(attn, hidden, text, tables, mask)
    theirs = jp.JoyImageEditPlusAttnProcessor()(attn, hidden, text, tables, mask)
    exact = jp.JoyImageEditPlusAttnProcessor()(copy.deepcopy(attn).double(), hidden.double(), text.double(),
                                               tuple(t.double() for t in tables), mask)
    for mine, native, reference in zip(ours, theirs, exact):
        error, native_error = ((x.double() - reference).abs().max() for x in (mine, native))
        assert error <= 2 * native_error + 1e-6 * reference.abs().max(), (error, native_error)
    if form.endswith("additive"):  # diffusers' processor itself, for any values (here a finite -1e4 too)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        finite = torch.where(keys, 0.0, -1e4)[:, None, None]
        assert all(torch.equal(a, b) for a, b in zip(
            processors.SparsectxJoyImagePlusAttnProcessor()(attn, hidden, text, tables, finite),
            jp.JoyImageEditPlusAttnProcessor()(attn, hidden, text, tables, finite)))
    per_query = keys[:, None, None].expand(batch, 1, n_image + N_TEXT, n_image + N_TEXT)
    assert all(torch.equal(a, b) for a, b in zip(
        processors.SparsectxJoyImagePlusAttnProcessor()(attn, hidden, text, tables, per_query),
        jp.JoyImageEditPlusAttnProcessor()(attn, hidden, text, tables, per_query)))


def test_a_forward_building_its_tables_otherwise_is_refused():
    """``kept_rope_rows`` checks each grid the forward asks for against the compacted one it expects next."""
    model = _build()
    with joyimage.kept_rope_rows(model, [TARGET, *REFS], torch.arange(N_IMAGES), N_REFS):
        cos, _ = model._get_rotary_pos_embed_for_range((0, 0, 0), TARGET)
        assert cos.shape[0] == N_TARGET
        with pytest.raises(RuntimeError, match="builds the components. tables otherwise"):
            model._get_rotary_pos_embed_for_range((1, 0, 0), (2, 4, 4))  # the true grid, not (1, 1, 16)


# ----------------------------------------------------------------------------------------------------------------
# bf16
# ----------------------------------------------------------------------------------------------------------------
def _check_bf16(device, attention):
    """In bf16: the drop-in's target rows are within twice the key-masked model's bf16 error of its fp64 result."""
    kwargs = checks.cast_inputs(_inputs(padded=True, shared=True), device, torch.bfloat16)
    checks.check_bf16_dropping_equals_masking(_build().to(device, torch.bfloat16), kwargs, _run, _masked,
                                              _assert_flash_criterion, attention=attention)


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
    """tests/joyimage_pipeline.py (tests/ is on sys.path by pytest.ini), imported where used."""
    return importlib.import_module("joyimage_pipeline")


# ----------------------------------------------------------------------------------------------------------------
# the pipeline (tests/joyimage_pipeline.py: tiny components, stand-ins for the Qwen3-VL encoder and its processor)
# ----------------------------------------------------------------------------------------------------------------
PIPE_SIZES = ((64, 64), (48, 80))  # (width, height) of the two references: 16 and 15 tokens; the target the last's
PIPE_REFS, PIPE_TARGET = [16, 15], 15
NEGATIVE = "blurry, low quality, bad anatomy"  # longer than the default negative prompt: the prompt is padded


pipe, _pipe_disabled = tiny_pipeline_fixtures(lambda: _pipeline_helpers().tiny_joyimage_pipeline())


def _images():
    helpers = _pipeline_helpers()
    return [[helpers.reference_image(size, seed) for seed, size in enumerate(PIPE_SIZES)]]


def _call(pipe, **kwargs):
    return _pipeline_helpers().run(pipe, images=kwargs.pop("images", None) or _images(), **kwargs)


def _patch_rows(transformer) -> tuple:
    """(patch rows each transformer forward's embedder gets, the hook's handle): the attention probe's stopped
    forward included."""
    seen = []
    return seen, transformer.img_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))


def _kept(budget) -> int:
    return sum(integration.budget_counts(budget, 1, PIPE_REFS)[0])


def test_the_pipeline_class_is_accepted_and_named():
    assert "JoyImageEditPlusPipeline" in integration.SUPPORTED_PIPELINES
    assert integration._family_of(_pipeline_helpers().tiny_joyimage_pipeline().transformer) == integration.JOYPLUS


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_keep_all_and_disable_are_the_unpatched_pipeline(pipe, guidance_scale):
    checks.check_keep_all_and_disable(
        pipe, lambda: _call(pipe, guidance_scale=guidance_scale, negative_prompt=NEGATIVE),
        changed=lambda out, expected: (out[:, :PIPE_TARGET] - expected[:, :PIPE_TARGET]).abs().max() > 1e-4)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_requests_with_other_references_keep_all_by_per_request_counts_under_guidance(pipe, guidance_scale):
    """Two prompts whose references differ in size (16 and 24 tokens) run diffusers' forward when the budget keeps
    every token, here by per-request counts: under guidance (the batch [negatives, positives]) the counts were read
    for consecutive samples (the negatives took request 0's, the positives request 1's) and the call was refused as
    "shape_list differ between samples"; each request's count is its conditional sample's and its partner's."""
    helpers = _pipeline_helpers()
    images = [[helpers.reference_image((64, 64), 0)], [helpers.reference_image((96, 64), 1)]]
    assert [helpers.tokens((64, 64)), helpers.tokens((96, 64))] == [16, 24]
    kwargs = {"images": images, "prompt": ["make it blue", "make it red"], "guidance_scale": guidance_scale}
    expected = _call(pipe, **kwargs)
    sparsectx.enable(pipe, budget=[[16], [24]], selector="uniform")
    assert torch.equal(_call(pipe, **kwargs), expected)
    sparsectx.enable(pipe, budget=[[24], [16]], selector="uniform")  # (request 1 keeps 16 of its 24: refused)
    with pytest.raises(ValueError, match="shape_list differ between samples"):
        _call(pipe, **kwargs)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_the_transformer_sees_the_target_and_the_kept_tokens(pipe, guidance_scale):
    seen, handle = _patch_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=0.5, selector="uniform")
        _call(pipe, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    branches = 2 if guidance_scale > 1 else 1  # (guidance's branches are one batch: [negative, positive])
    assert seen == [branches * (PIPE_TARGET + _kept(0.5))] * 2
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape == (branches, sum(PIPE_REFS)) and keep.sum(dim=1).tolist() == [_kept(0.5)] * branches


def _masked_call(pipe, keep, **kwargs):
    """The unpatched pipeline whose every attention masks the reference rows ``keep`` (bool ``[N]``) drops, as keys."""
    masked = _KeyMasked(None)

    def keys_of_the_batch(module, args, kwargs):
        masked.keys = _image_keys(keep[None], PIPE_TARGET).expand(kwargs["hidden_states"].shape[0], -1)

    handle = pipe.transformer.register_forward_pre_hook(keys_of_the_batch, with_kwargs=True)
    try:
        with checks.attention_processors(pipe.transformer.double_blocks, masked):
            return _call(pipe, **kwargs)
    finally:
        handle.remove()


@pytest.mark.parametrize("selector", ["uniform", "attention"])
def test_the_sparse_pipeline_equals_masking_the_dropped_keys(pipe, selector):
    """Guidance with a padded prompt: the pipeline with a budget gives the target rows of the unpatched pipeline
    whose every attention masks the same reference tokens as keys."""
    sparsectx.enable(pipe, budget=0.5, selector=selector)
    dropped = _call(pipe, negative_prompt=NEGATIVE)
    keep = sparsectx.last_selection(pipe).keep
    assert torch.equal(keep[0], keep[1])  # both guidance branches see the same reference tokens
    sparsectx.disable(pipe)
    masked = _masked_call(pipe, keep[0], negative_prompt=NEGATIVE)
    torch.testing.assert_close(dropped[:, :PIPE_TARGET], masked[:, :PIPE_TARGET], rtol=0, atol=1e-5)
    assert (dropped[:, :PIPE_TARGET] - _call(pipe, negative_prompt=NEGATIVE)[:, :PIPE_TARGET]).abs().max() > 1e-4


def _prompt_selector(latents, context):
    """Random scores drawn from a generator seeded by the prompt's text queries (from the attention probe; its
    padding left out): each prompt draws its own (the tiny model's reference keys rank alike under any of its text
    queries)."""
    probe = context.extra["attention_probe"](latents, context)
    queries = probe["text_queries"]
    valid = probe.get("text_mask", torch.ones(queries.shape[:2], dtype=torch.bool))  # (not the prompt's padding)
    seeds = [int(q[v].double().abs().sum() * 1e4) for q, v in zip(queries, valid)]
    return torch.stack([torch.rand(latents.shape[1], generator=torch.Generator().manual_seed(seed)) for seed in seeds])


@pytest.mark.parametrize("enabled", ["pipeline", "transformer"])
def test_the_guidance_branches_keep_what_the_conditional_call_selects(pipe, enabled):
    """The batch ``[negative, positive]`` is selected on its positive sample (the selector reads its prompt through
    the probe's text queries) and the negative one keeps the same tokens: the selection of the call without
    guidance, whether the pipeline or its transformer alone is enabled."""
    sparsectx.enable(pipe if enabled == "pipeline" else pipe.transformer, budget=0.25, selector=_prompt_selector)
    _call(pipe, guidance_scale=1.0)
    alone = sparsectx.last_selection(pipe).keep
    _call(pipe, guidance_scale=4.0, negative_prompt=NEGATIVE)
    keep = sparsectx.last_selection(pipe).keep
    assert torch.equal(keep, torch.cat([alone, alone]))
    sparsectx.disable(pipe)
    # without the pairing, the negative prompt's probe selects otherwise here (the pairing is what the test checks)
    sparsectx.enable(pipe.transformer, budget=0.25, selector=_prompt_selector)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integration, "_BATCHED_GUIDANCE", {})
        _call(pipe, guidance_scale=4.0, negative_prompt=NEGATIVE)
    unpaired = sparsectx.last_selection(pipe).keep
    assert not torch.equal(unpaired[0], unpaired[1])


def test_per_call_settings_through_attention_kwargs_the_pipeline_does_not_take(pipe):
    """The pipeline's ``__call__`` takes no attention kwargs: the enabled pipeline takes
    ``attention_kwargs={"sparsectx": ...}`` for it (and hands the pipeline the call without them); other keys
    there reach the pipeline, which refuses them as it does unpatched."""
    seen, handle = _patch_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=0.5, selector="uniform")
        _call(pipe, attention_kwargs={"sparsectx": {"budget": 3}})
        assert seen == [2 * (PIPE_TARGET + 3 * len(PIPE_REFS))] * 2
        seen.clear()
        _call(pipe)
        assert seen == [2 * (PIPE_TARGET + _kept(0.5))] * 2
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="budget"):
        _call(pipe, attention_kwargs={"sparsectx": {"budget": -1}})
    with pytest.raises(TypeError, match="attention_kwargs"):
        _call(pipe, attention_kwargs={"sparsectx": {"budget": 3}, "scale": 1.0})
    sparsectx.disable(pipe)
    with pytest.raises(TypeError, match="attention_kwargs"):
        _call(pipe, attention_kwargs={"sparsectx": {"budget": 3}})


def test_per_call_settings_on_a_subclass_handing_its_keywords_to_the_pipeline(pipe):
    """A subclass whose ``__call__`` takes ``**kwargs`` and hands them to the pipeline's: the enabled subclass takes
    the per-call settings too (the pipeline's own signature decides that the keyword is not the pipeline's)."""
    class Subclass(diffusers.JoyImageEditPlusPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    sub = Subclass(**pipe.components)
    sub.image_processor = pipe.image_processor
    sub.set_progress_bar_config(disable=True)
    seen, handle = _patch_rows(sub.transformer)
    try:
        sparsectx.enable(sub, budget=0.5, selector="uniform")
        _call(sub, attention_kwargs={"sparsectx": {"budget": 3}})
    finally:
        handle.remove()
        sparsectx.disable(sub)
    assert seen == [2 * (PIPE_TARGET + 3 * len(PIPE_REFS))] * 2


def test_requests_with_their_own_budgets_equal_each_request_alone(pipe):
    """Two prompts of different lengths (padded in the batch), one budget per request, guidance: each request's
    target equals the request run alone on the same noise."""
    helpers = _pipeline_helpers()
    images, prompts, budget = _images() * 2, ["a cat", "a red dog on a sofa"], [[0.25], [0.75]]
    noise = torch.randn(2, helpers.Z_DIM, 1, 10, 6, generator=torch.Generator().manual_seed(5))
    sparsectx.enable(pipe, budget=budget, selector="uniform")
    together = _call(pipe, images=images, prompt=prompts, latents=noise)
    assert sparsectx.last_selection(pipe).keep.sum(dim=1).tolist() == [_kept(0.25), _kept(0.75)] * 2
    for b in range(2):
        sparsectx.enable(pipe, budget=budget[b], selector="uniform")
        alone = _call(pipe, images=images[:1], prompt=prompts[b], latents=noise[b:b + 1])
        torch.testing.assert_close(together[b:b + 1, :PIPE_TARGET], alone[:, :PIPE_TARGET], rtol=0, atol=1e-5)
    assert not torch.equal(together[0, :PIPE_TARGET], together[1, :PIPE_TARGET])


@pytest.mark.parametrize("selector", ["attention", "subject", "edit"])
def test_the_probe_selectors_run_in_the_pipeline(pipe, selector):
    seen, handle = _patch_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=4, selector=selector)
        _call(pipe, negative_prompt=NEGATIVE)
    finally:
        handle.remove()
    assert sparsectx.last_selection(pipe).keep.sum(dim=1).tolist() == [4 * len(PIPE_REFS)] * 2
    # the probe's stopped forward on the positive sample (every token), then each step's compacted batch
    assert seen == [PIPE_TARGET + sum(PIPE_REFS)] + [2 * (PIPE_TARGET + 4 * len(PIPE_REFS))] * 2


def test_the_pipelines_generator_seeds_the_selection(pipe):
    checks.check_generator_seeds_selection(pipe, lambda seed: _call(pipe, generator_seed=seed))


def test_a_whole_model_compile_recompiles_once_for_a_new_kept_count():
    """Under torch.compile of the whole transformer, the compacted forward's RoPE method was traced: its check of the
    grid asked against the kept counts made dynamo guard on them, a new graph per kept count until the recompile
    limit (8), then eager. It runs outside the trace now: a second kept count recompiles once, a third reuses the
    graphs, and every output equals eager's."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    model, kwargs = _build(), _inputs()
    budgets = (0.3, 0.5, 0.7)
    eager = []
    for budget in budgets:
        sparsectx.enable(model, budget=budget, selector="uniform")
        eager.append(_run(model, kwargs))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    frames = []
    try:
        for budget, expected in zip(budgets, eager):
            sparsectx.enable(model, budget=budget, selector="uniform")
            assert torch.equal(_run(compiled, kwargs), expected)
            frames.append(counter.frame_count)
    finally:
        sparsectx.disable(model)
        torch._dynamo.reset()
    assert frames[2] == frames[1], frames
