"""Drop-in Sparse Context for Z-Image Omni (sparsectx.zimage, ZImageTransformer2DModel in omni mode): tiny
random-weight models built from configs, fp32, CPU, offline. In omni mode the transformer takes per-sample lists:
each sample's images ``x[b] = [reference, ..., target]`` (latents ``[C, F, H, W]``, sizes of their own), one caption
segment per image and SigLIP features per reference; it pads each image's patch rows to a multiple of 32 with a pad
token (attended like any row), runs a noise refiner over the images, then its main layers over ``[caption, images,
siglip]``, each sample a sequence of its own (padded to the batch's longest, masked)."""
import contextlib
import importlib
import inspect
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ZImageTransformer2DModel"):
    pytest.skip(f"diffusers {diffusers.__version__} has no Z-Image", allow_module_level=True)
from diffusers.models.transformers import transformer_z_image as zi  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
import sparsectx  # noqa: E402
from pipeline_fixtures import tiny_model_fixtures, tiny_pipeline_fixtures  # noqa: E402  (tests/, on sys.path)
from sparsectx import integration, processors, zimage  # noqa: E402
from warning_checks import warnings_as_errors  # noqa: E402  (tests/, on sys.path by pytest.ini)

CHANNELS, CAP_DIM, SIGLIP_DIM = 4, 24, 20
# latents [C, F, H, W] of two references of their own sizes and the target (last): token grids 4x3, 3x5 and 4x4
SHAPES = [(CHANNELS, 1, 8, 6), (CHANNELS, 1, 6, 10), (CHANNELS, 1, 8, 8)]
GRIDS = [(1, 4, 3), (1, 3, 5), (1, 4, 4)]
REF_LENGTHS = [12, 15]
N_REFS = sum(REF_LENGTHS)
CAPTIONS = (5, 7, 9)  # caption segment lengths (one per image)


def _build(seed=0):
    torch.manual_seed(seed)
    model = diffusers.ZImageTransformer2DModel(
        in_channels=CHANNELS, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=CAP_DIM,
        siglip_feat_dim=SIGLIP_DIM, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    with torch.no_grad():  # (diffusers initialises some layers to zero: random weights make every path count)
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.eval()


model, _always_disabled = tiny_model_fixtures(_build)


def _inputs(batch=2, seed=1, shared=True, shapes=SHAPES, captions=CAPTIONS):
    """Forward kwargs in omni mode; ``shared``: every sample has the first one's references and prompt (a pipeline
    repeats them over its batch)."""
    g = torch.Generator().manual_seed(seed)

    def refs():
        return [torch.randn(s, generator=g) for s in shapes[:-1]]

    def caption():
        return [torch.randn(n, CAP_DIM, generator=g) for n in captions]

    first_refs, first_caption = refs(), caption()
    x = [[*(first_refs if shared or b == 0 else refs()), torch.randn(shapes[-1], generator=g)] for b in range(batch)]
    cap = [first_caption if shared or b == 0 else caption() for b in range(batch)]
    siglip = [[torch.randn(3, 4, SIGLIP_DIM, generator=g) for _ in shapes[:-1]] + [None] for _ in range(batch)]
    return dict(x=x, t=torch.full((batch,), 0.3), cap_feats=cap, siglip_feats=siglip,
                image_noise_mask=[[0] * (len(shapes) - 1) + [1] for _ in range(batch)], return_dict=False)


def _run(model, kwargs):
    with torch.no_grad():
        return torch.stack(model(**kwargs)[0])


def _to(kwargs, dtype, device="cpu"):
    """``kwargs`` (nested lists too) with every tensor on ``device`` and every floating one in ``dtype``."""
    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype if value.is_floating_point() else value.dtype)
        if isinstance(value, list):
            return [cast(v) for v in value]
        return value

    return {k: cast(v) for k, v in kwargs.items()}


def random_selector(latents, context):
    return torch.rand(latents.shape[:2], generator=context.generator)


class _KeysMasked(zi.ZSingleStreamAttnProcessor):
    """diffusers' Z-Image attention with the dropped reference rows masked out as keys: ``state["dropped"][b]`` the
    rows of sample b's padded image sequence, which starts at ``state[offsets][b]`` of the sequence the layer attends
    over (``offsets``: "refiner" 0, "main" the caption's rows)."""

    def __init__(self, state, offsets):
        super().__init__()
        self.state, self.offsets = state, offsets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        batch, seq = hidden_states.shape[:2]
        allowed = torch.ones(batch, seq, dtype=torch.bool, device=hidden_states.device) if attention_mask is None \
            else attention_mask.clone()
        for b in range(batch):
            allowed[b, self.state[self.offsets][b] + self.state["dropped"][b]] = False
        return super().__call__(attn, hidden_states, encoder_hidden_states, allowed, freqs_cis)


def _caption_rows(cap_feats) -> list:
    """Each sample's caption rows in omni mode (every segment padded to a multiple of ``SEQ_MULTI_OF``)."""
    return [sum(zimage.padded_length(len(segment)) for segment in segments) for segments in cap_feats]


@contextlib.contextmanager
def _keys_masked(model, keep, grids=GRIDS):
    """The unpatched model with the reference tokens ``keep`` drops (bool ``[B, N]``; a forward of another batch
    size: row ``b % B`` for its sample b) masked out as keys in its noise refiner and in every main layer (the
    caption refiner and the SigLIP refiner never see them); each forward's caption rows read from its call."""
    dropped = [zimage.padded_positions(grids, torch.nonzero(~k.cpu()).flatten()) for k in keep]
    state = {}

    def read_call(module, args, kwargs):
        n = len(kwargs["x"])
        state.update(dropped=[dropped[b % len(dropped)] for b in range(n)], refiner=[0] * n,
                     main=_caption_rows(kwargs["cap_feats"]))

    layers = [(model.noise_refiner, "refiner"), (model.layers, "main")]
    originals = [[layer.attention.processor for layer in stack] for stack, _ in layers]
    for stack, offsets in layers:
        for layer in stack:
            layer.attention.set_processor(_KeysMasked(state, offsets))
    handle = model.register_forward_pre_hook(read_call, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for (stack, _), originals_of_stack in zip(layers, originals):
            for layer, processor in zip(stack, originals_of_stack):
                layer.attention.set_processor(processor)


def _masked(model, keep, kwargs):
    with _keys_masked(model, keep):
        return _run(model, kwargs)


def _assert_flash_criterion(out, masked, model, keep, kwargs):
    """``out`` is as close to the key-masked model in fp64 as the key-masked model ``masked`` in the same dtype is
    (at most twice its error, plus fp32 resolution)."""
    model64 = _build().double()
    model64.load_state_dict(model.state_dict())
    exact = _masked(model64, keep.cpu(), _to(kwargs, torch.float64))
    error, native_error = ((x.cpu().double() - exact).abs().max() for x in (out, masked))
    assert error <= 2 * native_error + 1e-6 * exact.abs().max(), (error, native_error)


def _noise_refiner_rows(model) -> tuple:
    """(the rows of each forward's noise refiner input, the hook's handle)."""
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["x"]).shape[1])

    return seen, model.noise_refiner[0].register_forward_pre_hook(record, with_kwargs=True)


# ----------------------------------------------------------------------------------------------------------------
# the layout
# ----------------------------------------------------------------------------------------------------------------
def test_patch_rows_are_the_rows_the_model_patchifies(model):
    kwargs = _inputs()
    rows = zimage.patch_rows(kwargs["x"], 2, 1)
    own = torch.cat([model._patchify_image(image, 2, 1)[0] for image in kwargs["x"][1]])
    assert rows.shape == (2, N_REFS + 16, 4 * CHANNELS)
    assert torch.equal(rows[1], own)


def test_the_layout_and_the_padded_rows():
    kwargs = _inputs()
    kwargs["hidden_states"] = zimage.patch_rows(kwargs["x"], 2, 1)
    layout = integration.reference_layout(integration.ZIMAGE, kwargs)
    assert layout.ref_lengths == REF_LENGTHS and layout.target_host.tolist() == list(range(N_REFS, N_REFS + 16))
    assert layout.extra["ref_shapes"] == [(4, 3), (3, 5)] and layout.target_shape == (4, 4)
    # each image's rows padded to 32: the second reference starts at 32, the target at 64
    assert zimage.padded_positions(GRIDS, torch.tensor([0, 11, 12, 26, 27])).tolist() == [0, 11, 32, 46, 64]
    kept = zimage.kept_x_rows(GRIDS, torch.tensor([3, 12, *range(N_REFS, N_REFS + 16)]))
    assert kept.tolist() == [3, *range(12, 32), 32, *range(47, 64), *range(64, 96)]


def test_samples_with_other_references_are_refused_unless_every_token_is_kept(model):
    kwargs = _inputs()
    kwargs["x"][1] = [kwargs["x"][1][1], kwargs["x"][1][0], kwargs["x"][1][2]]  # the references swapped
    sparsectx.enable(model, budget=0.5)
    with pytest.raises(ValueError, match="x's images differ between samples"):
        _run(model, kwargs)
    sparsectx.enable(model, budget=1.0)
    kept = _run(model, kwargs)
    sparsectx.disable(model)
    assert torch.equal(kept, _run(model, kwargs))


def test_a_missing_image_is_refused_by_name_unless_every_token_is_kept():
    """(diffusers gives a ``None`` image pad rows only, of its real models' patch width: 16 channels; its pipeline
    passes none.)"""
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(
        in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=CAP_DIM,
        siglip_feat_dim=SIGLIP_DIM, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]).eval()
    kwargs = _inputs(shapes=[(16, *shape[1:]) for shape in SHAPES])
    kwargs["x"][0][1] = None
    try:
        sparsectx.enable(model, budget=0.5)
        with pytest.raises(ValueError, match=r"x\[0\]\[1\] is None"):
            _run(model, kwargs)
        sparsectx.enable(model, budget=1.0)
        kept = _run(model, kwargs)
    finally:
        sparsectx.disable(model)
    assert torch.equal(kept, _run(model, kwargs))


def test_an_image_that_is_no_latents_is_refused_by_name(model):
    kwargs = _inputs()
    kwargs["x"][1][0] = kwargs["x"][1][0][0]
    sparsectx.enable(model, budget=0.5)
    with pytest.raises(ValueError, match=r"x\[1\]\[0\] must be an image's latents \[C, F, H, W\], got \(1, 8, 6\)"):
        _run(model, kwargs)


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1.0, 10**6])
def test_keep_all_is_the_unpatched_forward(model, budget):
    kwargs = _inputs()
    sparsectx.enable(model, budget=budget)
    kept = _run(model, kwargs)
    sparsectx.disable(model)
    assert torch.equal(kept, _run(model, kwargs))


def test_the_compacted_forward_keeping_every_row_is_diffusers_forward(model):
    kwargs = _inputs(shared=False)
    every = torch.arange(N_REFS + 16)
    rows = [(zimage.kept_x_rows(GRIDS, every),) * 2] * 2
    with zimage.compacted(model, rows):
        out = _run(model, kwargs)
    assert "unpatchify" not in model.__dict__ and "patchify_and_embed_omni" not in model.__dict__
    assert torch.equal(out, _run(model, kwargs))


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
@pytest.mark.parametrize("selector", [random_selector, "uniform"])
@pytest.mark.parametrize("shared", [False, True])
def test_dropping_rows_equals_masking_keys(model, selector, shared, attention):
    """(``attention="sparsectx"``: sparsectx's processors on the compacted sequence; samples keeping different tokens
    run padded to the longer one, their padding a key mask.)"""
    kwargs = _inputs(shared=shared)
    seen, handle = _noise_refiner_rows(model)
    try:
        sparsectx.enable(model, budget=0.5, selector=selector, seed=0, attention=attention)
        dropped = _run(model, kwargs)
    finally:
        handle.remove()
    keep = sparsectx.last_selection(model).keep
    assert [[int(part.sum()) for part in k.split(REF_LENGTHS)] for k in keep] == [[6, 8]] * 2
    # one forward for the batch, each sample on its kept rows and every pad row (2 x 32 reference rows, less the
    # dropped 13), padded to the batch's longest
    assert seen == [96 - 13]
    assert torch.unique(keep, dim=0).shape[0] == (2 if selector is random_selector and not shared else 1)
    sparsectx.disable(model)
    masked = _masked(model, keep, kwargs)
    _assert_flash_criterion(dropped, masked, model, keep, kwargs)
    assert (dropped - _run(model, kwargs)).abs().max() > 1e-3  # dropping changed it


def test_mixed_budgets_equal_each_sample_alone(model):
    """Samples keeping different numbers of tokens run as one batch (padded to the longer, masked): in fp64, each
    sample's output is its forward alone."""
    model64 = _build().double()
    kwargs = _to(_inputs(shared=False), torch.float64)
    sparsectx.enable(model64, budget=[[0.25, 0.5], [1.0, 0.2]], selector=random_selector, seed=0)
    both = _run(model64, kwargs)
    keep = sparsectx.last_selection(model64).keep
    assert [[int(part.sum()) for part in k.split(REF_LENGTHS)] for k in keep] == [[3, 8], [12, 3]]
    for b in range(2):
        alone = {k: v[b:b + 1] if isinstance(v, (list, torch.Tensor)) else v for k, v in kwargs.items()}
        sparsectx.enable(model64, budget=None, selector=lambda latents, context, k=keep[b:b + 1]: k.clone())
        torch.testing.assert_close(_run(model64, alone), both[b:b + 1], rtol=0, atol=1e-12)
    sparsectx.disable(model64)


def test_later_steps_reuse_the_selection_and_read_the_host_once(model):
    def step(model, kwargs):  # (a new target latent at each step, as in a pipeline)
        return _run(model, {**kwargs, "x": [[*images[:-1], images[-1] * 1] for images in kwargs["x"]]})

    plain, first, later = checks.host_reads_of_two_steps(model, _inputs(), step, timestep="t", budget=0.5,
                                                         selector=random_selector, seed=0)
    assert later.count == plain.count + 1, later.ops  # the check that its references are the plan's
    assert first.count == plain.count + 1, first.ops  # the keep mask (the layout is the latents' shapes)


def test_a_new_reference_selects_again(model):
    kwargs = _inputs()
    sparsectx.enable(model, budget=0.5, selector=random_selector)
    _run(model, kwargs)
    first = sparsectx.last_selection(model).keep
    kwargs["x"] = [[image + 1 if j == 0 else image for j, image in enumerate(images)] for images in kwargs["x"]]
    _run(model, kwargs)
    assert not torch.equal(sparsectx.last_selection(model).keep, first)


def test_a_reference_written_in_place_selects_again(model):
    kwargs = _inputs()
    sparsectx.enable(model, budget=0.5, selector=random_selector)
    _run(model, kwargs)
    first = sparsectx.last_selection(model).keep
    kwargs["x"][0][0].add_(1)  # (every sample holds this tensor)
    _run(model, kwargs)
    assert not torch.equal(sparsectx.last_selection(model).keep, first)


def test_a_reference_written_in_place_under_inference_mode_selects_again(model):
    """(A tensor made under ``torch.inference_mode`` has no version counter: its patch rows are made anew at every
    call, and the step's check against the plan sees the write.)"""
    with torch.inference_mode():
        kwargs = _inputs()
    sparsectx.enable(model, budget=0.5, selector=random_selector)
    with torch.inference_mode():
        _run(model, kwargs)
        first = sparsectx.last_selection(model).keep
        kwargs["x"][0][0].add_(1)
        _run(model, kwargs)
    assert not torch.equal(sparsectx.last_selection(model).keep, first)


def test_the_same_images_at_another_patch_size_are_another_layout():
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2, 1), all_f_patch_size=(1, 1), in_channels=CHANNELS, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=CAP_DIM, siglip_feat_dim=SIGLIP_DIM, axes_dims=[4, 6, 6],
        axes_lens=[256, 64, 64]).eval()
    kwargs = _inputs()
    sparsectx.enable(model, budget=0.5, selector="uniform")
    try:
        lengths = []
        for patch in (2, 1):
            out = _run(model, {**kwargs, "patch_size": patch})
            lengths.append(sparsectx.last_selection(model).ref_lengths)
            assert out.shape == (2, CHANNELS, 1, 8, 8)
    finally:
        sparsectx.disable(model)
    assert lengths == [REF_LENGTHS, [48, 60]]


def test_other_grids_of_equal_patch_rows_select_on_their_own_layout(model):
    """References whose patch rows are equal but whose grids differ (4x3 and 3x4 tokens) are other layouts: the
    second call does not reuse the first call's selection."""
    rows = torch.randn(12, 4 * CHANNELS, generator=torch.Generator().manual_seed(5))

    def image(h, w):  # the latents whose patch rows (2x2 patches, row-major) are ``rows``
        return rows.reshape(1, h, w, 2, 2, CHANNELS).permute(5, 0, 1, 3, 2, 4).reshape(CHANNELS, 1, 2 * h, 2 * w)

    sparsectx.enable(model, budget=0.5, selector="uniform")
    kwargs = _inputs(shapes=[(CHANNELS, 1, 8, 6), SHAPES[-1]], captions=CAPTIONS[:2])  # (the same prompt tensors)
    target = kwargs["x"][0][-1]
    shapes = []
    for h, w in ((4, 3), (3, 4)):
        kwargs["x"] = [[image(h, w), target] for _ in range(2)]
        assert torch.equal(zimage.patch_rows(kwargs["x"], 2, 1)[0, :12], rows)
        _run(model, kwargs)
        shapes.append(sparsectx.last_selection(model).ref_shapes)
    assert shapes == [[(4, 3)], [(3, 4)]]


def test_samples_with_other_prompts_are_probed_each_on_its_own(model):
    """A batch sharing its references but not its prompt: the probe selectors select each sample on its own
    prompt (what it would keep alone)."""
    kwargs = _inputs()
    kwargs["cap_feats"][1] = [torch.randn(n, CAP_DIM, generator=torch.Generator().manual_seed(6)) for n in CAPTIONS]
    sparsectx.enable(model, budget=0.25, selector="attention")
    _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    alone = []
    for b in range(2):
        _run(model, {k: v[b:b + 1] if isinstance(v, (list, torch.Tensor)) else v for k, v in kwargs.items()})
        alone.append(sparsectx.last_selection(model).keep[0])
    assert torch.equal(keep, torch.stack(alone)) and not torch.equal(alone[0], alone[1])


def test_a_call_without_references_runs_the_original_forward(model):
    kwargs = _inputs()
    target_only = {**kwargs, "x": [[images[-1]] for images in kwargs["x"]],
                   "cap_feats": [[segments[-1]] for segments in kwargs["cap_feats"]],
                   "siglip_feats": [None, None], "image_noise_mask": [[1], [1]]}
    basic = {"x": [images[-1] for images in kwargs["x"]], "t": kwargs["t"],
             "cap_feats": [segments[-1] for segments in kwargs["cap_feats"]], "return_dict": False}
    sparsectx.enable(model, budget=0.5)
    outs = [_run(model, target_only), _run(model, basic)]
    assert sparsectx.last_selection(model) is None
    sparsectx.disable(model)
    assert torch.equal(outs[0], _run(model, target_only)) and torch.equal(outs[1], _run(model, basic))


def test_per_call_settings_through_the_forwards_joint_attention_kwargs(model):
    if "joint_attention_kwargs" not in inspect.signature(type(model).forward).parameters:
        pytest.skip(f"diffusers {diffusers.__version__}'s Z-Image forward takes no joint_attention_kwargs")
    kwargs = _inputs()
    sparsectx.enable(model, budget=0.5, selector="uniform")
    _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"budget": 0.25}}})
    keep = sparsectx.last_selection(model).keep
    assert [int(part.sum()) for part in keep[0].split(REF_LENGTHS)] == [3, 4]
    with pytest.raises(ValueError, match="joint_attention_kwargs\\['sparsectx'\\]"):
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"budget": -1}}})


def test_training_forwards_give_the_masked_models_output_and_gradients():
    """``random_drop_selector`` on a train-mode transformer: a new mask at each forward; the output and every
    weight's gradient equal those of the unpatched model with the same tokens masked out as keys (in fp64)."""
    model = _build().double()
    checks.assert_random_drop_training_matches_masking(
        model, _to(_inputs(shared=False), torch.float64), torch.stack, lambda keep: _keys_masked(model, keep),
        atol=1e-12, embedding="all_x_embedder.2-1.weight", grad_tolerance=(1e-9, 1e-12))


def test_a_checkpoint_around_two_forwards_recomputes_each_with_its_own_selection():
    """``torch.utils.checkpoint`` around the whole enabled transformer, two forwards (other inputs) before one
    backward: each recomputation finds its forward's selection (by the images it took: the transformer's
    ``hidden_states`` is sparsectx's stand-in, made anew at each call), so no mask is drawn again and the gradients
    are the key-masked model's with each forward's mask (fp64)."""
    model = _build().double().train()
    batches = [_to(_inputs(shared=False, seed=seed), torch.float64) for seed in (1, 2)]
    target = torch.randn(2, CHANNELS, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    draw = sparsectx.random_drop_selector((0.2, 0.6), torch.Generator().manual_seed(3))
    masks = []

    def recording(latents, context):
        masks.append(draw(latents, context))
        return masks[-1]

    def loss(kwargs):
        return ((torch.stack(model(**kwargs)[0]) - target) ** 2).mean()

    sparsectx.enable(model, budget=None, selector=recording)
    try:
        with warnings_as_errors():
            sum(checkpoint(loss, kwargs, use_reentrant=False) for kwargs in batches).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        sparsectx.disable(model)
    assert len(masks) == 2  # (a draw per forward, none at the recomputations)
    model.zero_grad(set_to_none=True)
    for kwargs, keep in zip(batches, masks):
        with _keys_masked(model, keep):
            loss(kwargs).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_masked_drop_training_is_refused_naming_what_works(model):
    with pytest.raises(TypeError, match="Z-Image Omni and GLM-Image, train with the dropped references removed"):
        sparsectx.enable_drop_training(model)


# ----------------------------------------------------------------------------------------------------------------
# the attention probe
# ----------------------------------------------------------------------------------------------------------------
class _RecordingProcessor(zi.ZSingleStreamAttnProcessor):
    """diffusers' processor, recording the q and k it computes (after norms and RoPE) at the first call."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if not self.record:
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)))

            def rotate(x):
                x = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
                return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)

            self.record.update(q=rotate(q), k=rotate(k))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)


@pytest.mark.parametrize("shared", [False, True])
def test_probe_tensors_are_the_first_main_layers_query_and_key(model, shared):
    kwargs = _inputs(shared=shared, captions=(5, 7, 9) if shared else (5, 7, 9))
    if not shared:  # the second sample's caption of other lengths: its rows start elsewhere
        kwargs["cap_feats"][1] = [torch.randn(n, CAP_DIM) for n in (40, 3, 9)]
    record, probe = {}, {}
    original = model.layers[0].attention.processor
    model.layers[0].attention.set_processor(_RecordingProcessor(record))
    try:
        _run(model, kwargs)
    finally:
        model.layers[0].attention.set_processor(original)
    sparsectx.enable(model, budget=0.5, selector=checks.recording_attention(probe))
    _run(model, kwargs)
    caption = _caption_rows(kwargs["cap_feats"])
    for b in range(1 if shared else 2):
        text = torch.cat([torch.arange(start, start + n) for start, n in zip(
            [0, *torch.tensor([zimage.padded_length(len(s)) for s in kwargs["cap_feats"][b]]).cumsum(0).tolist()],
            [len(s) for s in kwargs["cap_feats"][b]])])
        refs = caption[b] + zimage.padded_positions(GRIDS, torch.arange(N_REFS))
        target = caption[b] + zimage.padded_positions(GRIDS, torch.arange(N_REFS, N_REFS + 16))
        n_text = len(text)
        torch.testing.assert_close(probe["text_queries"][b, :n_text], record["q"][b, text], rtol=1e-5, atol=1e-5)
        assert probe["text_mask"][b, :n_text].all() and not probe["text_mask"][b, n_text:].any()
        torch.testing.assert_close(probe["ref_keys"][b], record["k"][b, refs], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probe["target_queries"][b], record["q"][b, target], rtol=1e-5, atol=1e-5)
    assert probe["ref_keys"].shape[:2] == ((1 if shared else 2), N_REFS)


def test_attention_selector_keeps_the_top_attention_mass(model):
    kwargs = _inputs()
    probe = {}
    sparsectx.enable(model, budget=0.25, selector=checks.recording_attention(probe))
    _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep[0]
    scores = sparsectx.selection.attention_scores(torch.zeros(1, N_REFS, 1), sparsectx.selection.SelectionContext(
        num_references=2, ref_lengths=REF_LENGTHS, extra={k: v for k, v in probe.items() if k != "attention_probe"}))
    for part, image_scores in zip(keep.split(REF_LENGTHS), scores[0].split(REF_LENGTHS)):
        top = image_scores.topk(int(part.sum())).indices
        assert part[top].all()


@pytest.mark.parametrize("selector", ["edit", "subject", "attention"])
def test_task_aware_selectors_run_on_the_probe(model, selector):
    kwargs = _inputs()
    sparsectx.enable(model, budget=0.5, selector=selector)
    dropped = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    assert [int(part.sum()) for part in keep[0].split(REF_LENGTHS)] == [6, 8]
    sparsectx.disable(model)
    _assert_flash_criterion(dropped, _masked(model, keep, kwargs), model, keep, kwargs)


# ----------------------------------------------------------------------------------------------------------------
# bf16 (GPU, and the CPU where bf16 matmuls run)
# ----------------------------------------------------------------------------------------------------------------
def _bf16_check(device, attention):
    model = _build().to(device, torch.bfloat16)
    kwargs = _to(_inputs(shared=False), torch.bfloat16, device)
    kwargs["cap_feats"][1][1] = torch.randn(40, CAP_DIM, device=device, dtype=torch.bfloat16)  # (a padding mask)
    checks.check_bf16_dropping_equals_masking(model, kwargs, _run, _masked, _assert_flash_criterion,
                                              budget=[[0.5, 0.5], [0.25, 1.0]], attention=attention)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_gpu_bf16_dropping_rows_equals_masking_keys(attention):
    _bf16_check("cuda", attention)


# (sparsectx's attention in bf16 on the CPU: the kernels through the interpreter patched to compute bf16 as a GPU
# does, as the mark asks; unmarked, bf16 took the torch reference there)
@pytest.mark.parametrize("attention", ["native", pytest.param("sparsectx", marks=pytest.mark.bf16_kernels)])
def test_bf16_dropping_rows_equals_masking_keys_on_the_cpu(attention):
    _bf16_check("cpu", attention)


def test_the_key_mask_checks_trace_with_a_dynamic_batch():
    """Under ``torch.compile`` (``compile_repeated_blocks(fullgraph=True)`` recompiles the blocks with a dynamic
    batch once a batch of another size came): a key mask of the batch's size passes the processors' checks (a
    tuple holding the batch's SymInt made ``2 not in (1, batch)`` true there), and one of another size is refused."""
    def dynamic_batch(batch):  # (the queries' batch a SymInt, the mask's a constant)
        query = torch.ones(batch, 5)
        torch._dynamo.maybe_mark_dynamic(query, 0)
        return query

    mask = torch.rand(2, 5) > 0.5
    for check in (lambda mask, batch: processors._key_mask(mask, batch, mask.shape[-1], "processor"),
                  lambda mask, batch: processors._key_mask_from_attention_mask(mask, batch, mask.shape[-1])):
        torch._dynamo.reset()
        keys = torch.compile(lambda mask, query: check(mask, query.shape[0]), fullgraph=True, backend="eager")
        assert torch.equal(keys(mask, dynamic_batch(2)), mask)
        with pytest.raises(Exception, match="key mask"):
            keys(mask, dynamic_batch(3))


@pytest.mark.parametrize("masked", [False, True])
def test_the_sparsectx_processor_is_diffusers_attention(model, masked):
    """Every token kept, ``attention="sparsectx"`` against diffusers' processor, in fp64 where the op runs in fp32:
    with ``masked`` a caption of other lengths pads the first sample (a key mask in every main layer)."""
    kwargs = _inputs(shared=False)
    if masked:
        kwargs["cap_feats"][1][1] = torch.randn(40, CAP_DIM)
    sparsectx.enable(model, budget=1.0, attention="sparsectx")
    out = _run(model, kwargs)
    assert all(isinstance(layer.attention.processor, processors.SparsectxZImageAttnProcessor)
               for layer in [*model.noise_refiner, *model.context_refiner, *model.siglip_refiner, *model.layers])
    sparsectx.disable(model)
    _assert_flash_criterion(out, _run(model, kwargs), model, torch.ones(2, N_REFS, dtype=torch.bool), kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_processors_norm_and_rope_run_fused_per_sample_and_round_as_diffusers(dtype, monkeypatch):
    """The sparsectx processor's per-head norm (diffusers' ``RMSNorm``, which rounds to its weight's dtype before the
    weight) and complex RoPE of q or k: one ``rms_norm_rope`` pass per sample on that sample's frequency rows,
    equal bit for bit to diffusers' module and complex product in half precision (in fp32 within its rounding: the
    complex product's order of operations is torch's); a norm with a hook, or autocast, runs diffusers' code (no
    call)."""

    def same(actual, expected):
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected)  # (fp32's default tolerances: rounding)
            return True
        return torch.equal(actual, expected)

    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 2, 16, generator=g).to(dtype)
    norm = RMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g) * 0.5 + 1)
    angles = torch.rand(2, 12, 8, generator=g) * 6  # each sample its own positions
    freqs = torch.polar(torch.ones_like(angles), angles)
    calls = checks.record_fused_norm_rope(monkeypatch)
    with torch.no_grad():
        expected = zimage.rotated(norm(x), freqs)
        assert same(processors._zimage_norm_rope(x, norm, freqs), expected)
        assert calls == [(1, 12, 2, 16)] * 2
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            processors._zimage_norm_rope(x, norm, freqs)
        handle = norm.register_forward_hook(lambda module, args, out: out)
        assert torch.equal(processors._zimage_norm_rope(x, norm, freqs), expected)
        handle.remove()
    assert calls == []


def test_every_attention_layer_runs_its_q_and_k_norm_and_rope_fused(model, monkeypatch):
    """With ``attention="sparsectx"`` each attention layer's q and k go through one fused pass per sample (the
    refiners' and the main layers'), and the output is diffusers' processor's (the flash-attention criterion)."""
    kwargs = _inputs(shared=False)
    native = _run(model, kwargs)
    calls = checks.record_fused_norm_rope(monkeypatch)
    sparsectx.enable(model, budget=1.0, attention="sparsectx")
    out = _run(model, kwargs)
    layers = [*model.noise_refiner, *model.context_refiner, *model.siglip_refiner, *model.layers]
    assert len(calls) == 2 * len(layers) * len(kwargs["x"])
    sparsectx.disable(model)
    _assert_flash_criterion(out, native, model, torch.ones(2, N_REFS, dtype=torch.bool), kwargs)


def test_the_sequence_is_shorter_by_what_is_dropped(model):
    """What the drop-in is for: the main layers run on fewer rows (each dropped reference token leaves every
    layer)."""
    kwargs = _inputs()
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        _run(model, kwargs)
        sparsectx.enable(model, budget=0.25, selector="uniform")
        _run(model, kwargs)
    finally:
        handle.remove()
    kept = sum(math.ceil(0.25 * n) for n in REF_LENGTHS)
    assert seen[0] - seen[1] == N_REFS - kept


# ----------------------------------------------------------------------------------------------------------------
# the pipeline (tests/zimage_pipeline.py: tiny components, a stand-in for the tokenizer)
# ----------------------------------------------------------------------------------------------------------------
def _pipeline_helpers():
    """tests/zimage_pipeline.py (tests/ is on sys.path by pytest.ini), imported where used."""
    return importlib.import_module("zimage_pipeline")


PIPE_IMAGES = ((64, 64), (64, 96))  # (height, width) of the two condition images: 4x4 and 4x6 tokens
PIPE_GRIDS = [(1, 4, 4), (1, 4, 6), (1, 4, 6)]  # the target takes the last image's size
PIPE_REFS = [16, 24]


def _random_pipeline():
    pipe = _pipeline_helpers().tiny_zimage_omni_pipeline()
    with torch.no_grad():  # (diffusers initialises the final layer to zero: random weights make every path count)
        for parameter in pipe.transformer.parameters():
            parameter.normal_(0, 0.1)
    return pipe


pipe, _pipe_disabled = tiny_pipeline_fixtures(_random_pipeline)


def _call(pipe, **kwargs):
    helpers = _pipeline_helpers()
    images = [helpers.reference_image(h, w, seed=j) for j, (h, w) in enumerate(PIPE_IMAGES)]
    kwargs.setdefault("seed", kwargs.pop("generator_seed", 0))
    return helpers.run(pipe, images, **kwargs)


def _kept(budget) -> list:
    return integration.budget_counts(budget, 1, PIPE_REFS)[0]


def test_the_pipeline_class_is_accepted_and_named():
    assert "ZImageOmniPipeline" in integration.SUPPORTED_PIPELINES
    assert integration._family_of(_pipeline_helpers().tiny_zimage_omni_pipeline().transformer) == integration.ZIMAGE


@pytest.mark.parametrize("guidance_scale", [4.0, 0.0])
def test_keep_all_and_disable_are_the_unpatched_pipeline(pipe, guidance_scale):
    checks.check_keep_all_and_disable(pipe, lambda: _call(pipe, guidance_scale=guidance_scale))


@pytest.mark.parametrize("guidance_scale", [4.0, 0.0])
def test_the_noise_refiner_sees_the_target_and_the_kept_tokens(pipe, guidance_scale):
    """Every forward (both guidance branches in one batch, one selection for the call) runs on the kept reference
    rows, each image's pad rows and the target's."""
    seen, handle = _noise_refiner_rows(pipe.transformer)
    try:
        sparsectx.enable(pipe, budget=0.25, selector="uniform")
        _call(pipe, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    dropped = sum(PIPE_REFS) - sum(_kept(0.25))
    assert seen == [3 * 32 - dropped] * 2  # (2 steps)
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape == (2 if guidance_scale else 1, sum(PIPE_REFS)) and (keep == keep[:1]).all()


@pytest.mark.parametrize("selector", ["uniform", "attention"])
def test_the_sparse_pipeline_equals_masking_the_dropped_keys(pipe, selector):
    sparsectx.enable(pipe, budget=0.5, selector=selector)
    dropped = _call(pipe, negative_prompt="blurry")
    keep = sparsectx.last_selection(pipe).keep
    sparsectx.disable(pipe)
    with _keys_masked(pipe.transformer, keep, PIPE_GRIDS):
        masked = _call(pipe, negative_prompt="blurry")
    torch.testing.assert_close(dropped, masked, rtol=0, atol=1e-5)
    assert (dropped - _call(pipe, negative_prompt="blurry")).abs().max() > 1e-4


def test_guidance_branches_share_the_selection_made_on_the_prompt(pipe):
    """The pipeline batches guidance's branches, the prompt's samples first: the probe selects on the prompt (what a
    call without guidance keeps) and the negative prompt's samples keep the same tokens."""
    sparsectx.enable(pipe, budget=0.25, selector="attention")
    _call(pipe, guidance_scale=0.0)
    alone = sparsectx.last_selection(pipe).keep
    _call(pipe, guidance_scale=4.0, negative_prompt="a completely different negative prompt")
    keep = sparsectx.last_selection(pipe).keep
    assert torch.equal(keep, alone.expand(2, -1))


def test_a_per_request_budget_of_more_requests_than_the_call_is_refused_under_guidance(pipe):
    """One prompt with guidance (a batch of the prompt's branch, then the negative one): a budget of two requests
    was read as a list for the forward's batch and its first entry kept without a word (without guidance the same
    call is refused); entries that repeat for both branches are that list."""
    sparsectx.enable(pipe, budget=[[0.25], [0.75]], selector="uniform")
    with pytest.raises(ValueError, match="a per-request budget has 2 entries for a batch of 1 requests under guidance"):
        _call(pipe)
    sparsectx.enable(pipe, budget=[[0.25], [0.25]], selector="uniform")
    _call(pipe)
    assert [int(row.sum()) for row in sparsectx.last_selection(pipe).keep] == [sum(_kept(0.25))] * 2
    sparsectx.disable(pipe)


def test_steps_without_guidance_keep_the_calls_selection(pipe):
    """``cfg_truncation``: the later steps run the prompt's samples alone (a batch of half the size); they keep the
    selection the first step made on them, with a selector reading the probe too (whose new selection would see
    other latents)."""
    selections, batches = [], []

    def each_step(pipeline, i, t, kwargs):
        selections.append(sparsectx.last_selection(pipeline).keep.clone())
        return kwargs

    handle = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: batches.append(len(kwargs["x"])),
                                                        with_kwargs=True)
    try:
        sparsectx.enable(pipe, budget=0.25, selector="attention")
        _call(pipe, num_inference_steps=4, cfg_truncation=0.5, callback_on_step_end=each_step)
    finally:
        handle.remove()
    assert batches == [2, 2, 2, 1]
    assert [s.shape[0] for s in selections] == batches and all(torch.equal(s[0], selections[0][0]) for s in selections)


def test_steps_without_guidance_keep_the_selection_of_a_transformer_enabled_alone(pipe):
    """The same with only the transformer enabled (the pipeline's call is not known as one): the unguided steps find
    the guided steps' plan by their prompt tensors, the pair's conditional half, so a random selector without a seed
    draws nothing new, and a per-request budget given for the guided batch (both branches) still serves them."""
    selections = []

    def each_step(pipeline, i, t, kwargs):
        selections.append(sparsectx.last_selection(pipeline.transformer).keep.clone())
        return kwargs

    budget = [[0.25, 0.25], [0.5, 0.5]] * 2  # (2 prompts, then their negative prompts)
    sparsectx.enable(pipe.transformer, budget=budget, selector="random")
    try:
        _call(pipe, prompt=["make it blue", "make it red"], num_inference_steps=4, cfg_truncation=0.5,
              callback_on_step_end=each_step)
    finally:
        sparsectx.disable(pipe.transformer)
    assert [s.shape[0] for s in selections] == [4, 4, 4, 2]
    assert all(torch.equal(s[:2], selections[0][:2]) for s in selections)
    assert [int(k.sum()) for k in selections[-1]] == [_kept(0.25)[0] + _kept(0.25)[1], sum(_kept(0.5))]


def test_a_later_call_without_guidance_selects_on_its_own(pipe):
    """(Only the transformer enabled: an unguided call after a guided one, on the same images, is another call: its
    prompt tensors are not the guided call's, so it does not take that call's selection.)"""
    sparsectx.enable(pipe.transformer, budget=0.25, selector="random")
    try:
        _call(pipe, guidance_scale=4.0)
        guided = sparsectx.last_selection(pipe.transformer).keep
        _call(pipe, guidance_scale=0.0, prompt="make it red")
        unguided = sparsectx.last_selection(pipe.transformer).keep
    finally:
        sparsectx.disable(pipe.transformer)
    assert guided.shape[0] == 2 and unguided.shape[0] == 1 and not torch.equal(unguided[0], guided[0])


def test_per_call_settings_through_joint_attention_kwargs(pipe):
    """(diffusers 0.42 hands them to the transformer; earlier releases' pipelines take them and hand them to nobody:
    the enabled pipeline's call holds them for its forwards.)"""
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    _call(pipe, joint_attention_kwargs={"sparsectx": {"budget": 3}})
    assert sparsectx.last_selection(pipe).keep[0].sum().item() == 6
    _call(pipe)
    assert [int(p.sum()) for p in sparsectx.last_selection(pipe).keep[0].split(PIPE_REFS)] == _kept(0.5)
    with pytest.raises(ValueError, match=r"joint_attention_kwargs\['sparsectx'\]"):
        _call(pipe, joint_attention_kwargs={"sparsectx": {"budget": -1}})


def test_settings_given_to_a_pipeline_whose_transformer_alone_is_enabled(pipe):
    """Where the transformer's forward takes them (diffusers 0.42) they apply; before, the pipeline hands them to
    nobody, and the call is refused rather than run with enable's settings."""
    sparsectx.enable(pipe.transformer, budget=0.5, selector="uniform")
    if "joint_attention_kwargs" in inspect.signature(type(pipe.transformer).forward).parameters:
        _call(pipe, joint_attention_kwargs={"sparsectx": {"budget": 3}})
        assert sparsectx.last_selection(pipe.transformer).keep[0].sum().item() == 6
    else:
        with pytest.raises(ValueError, match="reaches no transformer forward"):
            _call(pipe, joint_attention_kwargs={"sparsectx": {"budget": 3}})
    sparsectx.disable(pipe.transformer)


def test_images_per_prompt_share_the_references_and_their_selection(pipe):
    sparsectx.enable(pipe, budget=0.5, selector="random")
    out = _call(pipe, num_images_per_prompt=2)
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape == (4, sum(PIPE_REFS)) and (keep == keep[:1]).all() and out.shape[0] == 2


def test_the_pipelines_generator_seeds_the_selection(pipe):
    checks.check_generator_seeds_selection(pipe, lambda seed: _call(pipe, generator_seed=seed))
