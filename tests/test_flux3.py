"""Drop-in Sparse Context for FLUX.3 (sparsectx.integration, Flux3Transformer2DModel): tiny random-weight models
built from configs, fp32, CPU, offline. FLUX.3 takes its references as an input of their own
(``image_cond_hidden_states [B, N, C]`` with ``image_cond_ids [N, 4]``, (t, h, w, l) with l = -1, -2, ... per
reference and h, w scaled by the pipeline's 0.5); they run through per-mode blocks, then the joint blocks, and produce
no output rows."""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "Flux3Transformer2DModel"):
    pytest.skip(f"diffusers {diffusers.__version__} has no FLUX.3", allow_module_level=True)
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
import sparsectx  # noqa: E402
from sparsectx import integration  # noqa: E402

HEADS, HEAD_DIM = 2, 16
TEXT_TOKENS, TEXT_DIM = 6, 32
CHANNELS = 8
TARGET_HW = (4, 4)
REF_HWS = ((3, 3), (2, 4))  # two references of different sizes: 17 tokens, no other sequence of that length
RoPE_SCALE = 0.5  # diffusers' FLUX.3 pipelines scale the (h, w) ids by this
FP32_ATOL = 2e-5  # fp32 rounding of a different (shorter) summation order
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # fp32 gradients through the layers computed in a different order
N_TARGET = TARGET_HW[0] * TARGET_HW[1]
N_REFS = [h * w for h, w in REF_HWS]


def _build(flow_map=False):
    torch.manual_seed(0)
    return diffusers.Flux3Transformer2DModel(
        in_channels=CHANNELS, cond_in_channels=CHANNELS, num_layers=1, num_single_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4), flow_map=flow_map).eval()


@pytest.fixture(scope="module")
def models():
    return {"flux3": _build(), "flux3 (flow map)": _build(flow_map=True)}


@pytest.fixture(autouse=True)
def _always_disabled(models):
    yield
    for model in models.values():
        integration.disable(model)


def _ids(hw, l_coord, scale=RoPE_SCALE):
    """The pipelines' ids of one image: (t, h, w, l) over its row-major grid, h and w scaled."""
    h, w = hw
    grid = torch.cartesian_prod(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                torch.tensor([float(l_coord)]))
    grid[:, 1:3] *= scale
    return grid


def _inputs(model, batch=2, seed=1, scale=RoPE_SCALE, refs=REF_HWS, shared=False):
    """Forward kwargs; ``shared``: every sample has the first one's references (as a pipeline repeats them over
    its batch), else each its own."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(hidden_states=torch.randn(batch, N_TARGET, CHANNELS, generator=g),
                  encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g),
                  timestep=torch.full((batch,), 0.7), img_ids=_ids(TARGET_HW, 0, scale),
                  txt_ids=torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1),
                                               torch.arange(TEXT_TOKENS).float()),
                  return_dict=False)
    if refs:
        references = torch.randn(1 if shared else batch, sum(h * w for h, w in refs), CHANNELS, generator=g)
        kwargs["image_cond_hidden_states"] = references.expand(batch, -1, -1).contiguous()
        kwargs["image_cond_ids"] = torch.cat([_ids(hw, -(i + 1), scale) for i, hw in enumerate(refs)])
    if model.config.flow_map:
        kwargs["target_timestep"] = torch.full((batch,), 0.5)
    return kwargs


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def random_selector(latents, context):
    return torch.rand(latents.shape[:2], generator=context.generator)


def norm_selector(latents, context):
    """Content scores: the same for a sample alone or in a batch."""
    return latents.norm(dim=-1)


class _KeyMaskedNative:
    """Test-only: diffusers' native attention with the dropped reference tokens masked out as keys, in the
    references' own blocks (a sequence of the N reference tokens) and in the joint blocks ([text, target,
    references]); the text and target blocks hold no reference."""

    def __init__(self, keep):
        self.keep = keep  # bool [B, N]
        self.native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        batch, n_refs = self.keep.shape
        keys = key.shape[1]
        if keys == n_refs:
            mask = self.keep
        elif keys == TEXT_TOKENS + N_TARGET + n_refs:
            mask = torch.cat([torch.ones(batch, TEXT_TOKENS + N_TARGET, dtype=torch.bool), self.keep], 1)
        else:
            assert keys in (TEXT_TOKENS, N_TARGET), keys
            return self.native(query, key, value, attn_mask=attn_mask, **kwargs)
        assert attn_mask is None
        return self.native(query, key, value, attn_mask=mask[:, None, None, :].to(key.device), **kwargs)


def _reference_tokens_seen(model) -> list:
    """The reference tokens each forward sends through the model (the input of its reference embedder)."""
    seen = []
    model.x_embedders["image_cond"].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1.0, 10**6, [1.0, 10**6]])
@pytest.mark.parametrize("name", ["flux3", "flux3 (flow map)"])
def test_keep_all_is_the_unpatched_forward(models, name, budget):
    model, kwargs = models[name], _inputs(models[name])
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=budget, selector=random_selector, seed=0)
    assert torch.equal(_run(model, kwargs), expected)


@pytest.mark.parametrize("name", ["flux3", "flux3 (flow map)"])
def test_dropping_rows_equals_masking_keys(models, name, monkeypatch):
    model, kwargs = models[name], _inputs(models[name])
    seen = _reference_tokens_seen(model)
    sparsectx.enable(model, budget=[0.5, 3], selector=random_selector, seed=0)
    dropped = _run(model, kwargs)
    keep = model._sparsectx_patch.cache.keep
    assert keep.shape == (2, sum(N_REFS)) and not torch.equal(keep[0], keep[1])  # each sample its own references
    counts = integration.budget_counts([0.5, 3], 2, N_REFS)
    assert counts[0][1] == 3 and 0 < counts[0][0] < N_REFS[0]
    for sample, sample_counts in zip(keep, counts):
        assert [int(part.sum()) for part in sample.split(N_REFS)] == sample_counts
    assert seen == [sum(counts[0])] * 2  # the dropped rows never entered the model (a group per sample)
    sparsectx.disable(model)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
    masked = _run(model, kwargs)
    assert dropped.shape == (2, N_TARGET, CHANNELS)
    torch.testing.assert_close(dropped, masked, rtol=0, atol=FP32_ATOL)
    monkeypatch.undo()
    assert (dropped - _run(model, kwargs)).abs().max() > 100 * FP32_ATOL  # dropping changed the output


def test_a_lora_adapter_scaled_per_call_reaches_every_forward(monkeypatch):
    """With a peft LoRA adapter scaled per call (``attention_kwargs={"scale": s}`` beside the sparsectx settings):
    keeping every token is the unpatched model at that scale, and dropping rows equals masking them as keys at that
    scale. The scale must matter: outputs at two scales differ."""
    peft = pytest.importorskip("peft")
    model = _build()
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v"]))
    kwargs = _inputs(model)

    def call(scale, **settings):
        return _run(model, {**kwargs, "attention_kwargs": {"scale": scale,
                                                           **({"sparsectx": settings} if settings else {})}})

    plain = {scale: call(scale) for scale in (0.5, 1.0)}
    assert (plain[0.5] - plain[1.0]).abs().max() > 100 * FP32_ATOL
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    assert torch.equal(call(0.5, budget=1.0), plain[0.5])
    dropped = call(0.5)
    keep = model._sparsectx_patch.cache.keep
    assert 0 < int(keep.sum()) < keep.numel()
    sparsectx.disable(model)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
    torch.testing.assert_close(dropped, call(0.5), rtol=0, atol=FP32_ATOL)


def test_disable_restores_bit_exact(models):
    model, kwargs = models["flux3"], _inputs(models["flux3"])
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    assert not torch.equal(_run(model, kwargs), expected)
    sparsectx.disable(model)
    assert "forward" not in model.__dict__ and not integration.is_enabled(model)
    assert torch.equal(_run(model, kwargs), expected)


@pytest.mark.parametrize("name", ["flux3", "flux3 (flow map)"])
def test_mixed_budgets_equal_each_sample_alone(models, name):
    """Samples that keep different tokens run as groups (one id table for the batch), each sample's rows back in
    its place (samples 0 and 2 share their references and budget: one group of two); per-sample timesteps (and the
    flow map's target timesteps) follow their samples."""
    model = models[name]
    kwargs = _inputs(model, batch=4)
    kwargs["image_cond_hidden_states"][2] = kwargs["image_cond_hidden_states"][0]
    kwargs["timestep"] = torch.tensor([0.7, 0.4, 0.9, 0.6])
    if "target_timestep" in kwargs:
        kwargs["target_timestep"] = torch.tensor([0.5, 0.2, 0.8, 0.3])
    budgets = [[0.25], [2, 0.75], [0.25], [1.0]]
    sparsectx.enable(model, budget=budgets, selector=norm_selector)
    together = _run(model, kwargs)
    assert sorted(group.rows for group in model._sparsectx_patch.cache.groups) == [[0, 2], [1], [3]]
    for b, budget in enumerate(budgets):
        alone = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids", "image_cond_ids")
                     else v) for k, v in kwargs.items()}
        sparsectx.enable(model, budget=budget, selector=norm_selector)
        torch.testing.assert_close(together[b:b + 1], _run(model, alone), rtol=0, atol=FP32_ATOL)
    sparsectx.disable(model)
    assert not torch.allclose(together, _run(model, kwargs), rtol=0, atol=100 * FP32_ATOL)


def test_a_call_without_references_runs_unchanged_and_selects_nothing(models):
    model = models["flux3"]
    kwargs = _inputs(model, refs=())
    expected = _run(model, kwargs)
    calls = []
    sparsectx.enable(model, budget=0.25, selector=lambda latents, context: calls.append(1) or latents[..., 0])
    assert torch.equal(_run(model, kwargs), expected)
    assert calls == [] and sparsectx.last_selection(model) is None


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_samples_keeping_no_reference_token_run_as_calls_without_references(models, attention):
    """A budget of 0 (or a ratio rounding to no token) for some or every sample: those samples run as a call without
    references (before, with native attention, diffusers failed on the empty references), which is what masking
    every reference key gives."""
    model = models["flux3"]
    kwargs = _inputs(model)
    no_references = _run(model, {k: v for k, v in kwargs.items() if not k.startswith("image_cond")})
    sparsectx.enable(model, budget=0, attention=attention)
    torch.testing.assert_close(_run(model, kwargs), no_references, rtol=0, atol=FP32_ATOL)
    sparsectx.enable(model, budget=[[0], [0.5]], selector=norm_selector, attention=attention)
    mixed = _run(model, kwargs)
    torch.testing.assert_close(mixed[:1], no_references[:1], rtol=0, atol=FP32_ATOL)
    keep = sparsectx.last_selection(model).keep
    assert not keep[0].any() and keep[1].any()
    sparsectx.disable(model)
    with pytest.MonkeyPatch.context() as patched:
        patched.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
        torch.testing.assert_close(mixed, _run(model, kwargs), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("selector", ["random", "attention", "subject"])
def test_references_of_one_sample_serve_the_whole_batch(models, selector):
    """``image_cond_hidden_states`` with a batch of 1 beside a larger batch (diffusers broadcasts it): the selection
    covers every sample (a keep mask [B, N]; per-request budgets; the probe's batch), and each sample's output is
    the one it gets with the references repeated over the batch."""
    model = models["flux3"]
    kwargs = _inputs(model, shared=True)
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:1].expand(2, -1, -1)  # one prompt
    one = {**kwargs, "image_cond_hidden_states": kwargs["image_cond_hidden_states"][:1]}
    for budget in (0.5, [[0.5], [3]]):
        sparsectx.enable(model, budget=budget, selector=selector, seed=0)
        repeated = _run(model, kwargs)
        keep = sparsectx.last_selection(model).keep
        sparsectx.enable(model, budget=budget, selector=selector, seed=0)
        torch.testing.assert_close(_run(model, one), repeated, rtol=0, atol=FP32_ATOL)
        assert torch.equal(sparsectx.last_selection(model).keep, keep) and keep.shape == (2, sum(N_REFS))


# ----------------------------------------------------------------------------------------------------------------
# layout and selection
# ----------------------------------------------------------------------------------------------------------------
def test_each_reference_is_found_with_its_grid_from_the_scaled_ids(models):
    """The references' lengths come from the l axis and each one's (h, w) grid from its scaled ids: the selectors
    see whole steps, so a spatial selector keeps the same tokens whatever the ids' scale."""
    model = models["flux3"]
    seen = {}
    for scale in (RoPE_SCALE, 1.0, 2.0):
        def recording(latents, context, scale=scale):
            seen[scale] = (list(context.ref_lengths), context.target_shape)
            return latents.norm(dim=-1)

        sparsectx.enable(model, budget=0.25, selector="uniform")
        _run(model, _inputs(model, scale=scale))
        selection = sparsectx.last_selection(model)
        assert selection.ref_lengths == N_REFS and selection.ref_shapes == list(REF_HWS)
        assert torch.equal(selection.ref_positions, torch.arange(sum(N_REFS)))
        seen[(scale, "uniform")] = selection.keep
        sparsectx.enable(model, budget=0.25, selector=recording)
        _run(model, _inputs(model, scale=scale))
    assert torch.equal(seen[(RoPE_SCALE, "uniform")], seen[(1.0, "uniform")])
    assert torch.equal(seen[(2.0, "uniform")], seen[(1.0, "uniform")])
    # uniform keeps an evenly spread subset of each image, as on FLUX.2's integer ids of the same grids
    grid = sparsectx.last_selection(model)
    assert [int(k.sum()) for k in seen[(1.0, "uniform")][0].split(N_REFS)] == [round(0.25 * n) for n in N_REFS]
    assert grid.grids()[0].shape == (2, *REF_HWS[0])
    assert seen[RoPE_SCALE] == seen[1.0] == ([9, 8], TARGET_HW)


def test_the_target_grid_follows_the_target_of_each_call(models):
    """The layout found on the references' ids is kept for later calls on ids of that shape; the target's grid
    (``context.target_shape``) is read from the call's own target ids (before: the first call's, for every later
    one on the same references)."""
    model = models["flux3"]
    seen = []

    def recording(latents, context):
        seen.append(context.target_shape)
        return latents.norm(dim=-1)

    sparsectx.enable(model, budget=0.5, selector=recording)
    selected = []
    for hw in ((4, 4), (3, 5), (2, 8)):  # (4 x 4 and 2 x 8: ids of one shape)
        kwargs = _inputs(model)
        kwargs["hidden_states"] = kwargs["hidden_states"][:, :hw[0] * hw[1]]
        kwargs["img_ids"] = _ids(hw, 0)
        _run(model, kwargs)
        selected.append(seen[-1])  # (a call on ids of a known shape may first select on the known layout)
    assert selected == [(4, 4), (3, 5), (2, 8)]


def test_references_whose_ids_are_not_a_row_major_grid_have_no_shapes(models):
    model = models["flux3"]
    kwargs = _inputs(model)
    ids = kwargs["image_cond_ids"].clone()
    ids[:N_REFS[0]] = ids[:N_REFS[0]].flip(0)  # the first image's tokens in reverse order
    kwargs["image_cond_ids"] = ids
    sparsectx.enable(model, budget=0.5, selector="random", seed=0)
    _run(model, kwargs)
    assert sparsectx.last_selection(model).ref_shapes is None


def test_the_selection_is_made_once_and_made_again_for_new_references(models):
    """A bare transformer: the selection is kept for the prompt tensor and the references it was made on; other
    reference values (a new image) select again."""
    model = models["flux3"]
    kwargs = _inputs(model, shared=True)
    calls = []

    def counting(latents, context):
        calls.append(tuple(latents.shape))
        return torch.rand(latents.shape[:2], generator=context.generator)

    sparsectx.enable(model, budget=0.5, selector=counting, seed=0)
    first = [_run(model, {**kwargs, "hidden_states": torch.randn_like(kwargs["hidden_states"])}) for _ in range(3)]
    assert calls == [(1, sum(N_REFS), CHANNELS)]  # once, on the first sample (the batch shares its references)
    assert not torch.equal(first[0], first[1])
    other = {**kwargs, "image_cond_hidden_states": kwargs["image_cond_hidden_states"] + 1}
    _run(model, other)
    assert len(calls) == 2


def test_per_call_settings_through_attention_kwargs(models):
    model, kwargs = models["flux3"], _inputs(models["flux3"])
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=0.25, selector=random_selector, seed=0)
    assert torch.equal(_run(model, {**kwargs, "attention_kwargs": {"sparsectx": {"budget": 1.0}}}), expected)
    _run(model, {**kwargs, "attention_kwargs": {"sparsectx": {"budget": 2}}})
    assert sparsectx.last_selection(model).keep.sum(1).tolist() == [4, 4]
    with pytest.raises(ValueError, match=r"attention_kwargs\['sparsectx'\]"):
        _run(model, {**kwargs, "attention_kwargs": {"sparsectx": {"budget": -1}}})


def test_a_training_forward_draws_a_new_selection_and_its_gradients_reach_the_kept_references(models):
    model = _build()
    model.train()
    kwargs = _inputs(model)
    references = kwargs["image_cond_hidden_states"].requires_grad_()
    sparsectx.enable(model, budget=0.5, selector="random")
    keeps = []
    for _ in range(2):
        references.grad = None
        model(**kwargs)[0].square().sum().backward()
        keep = sparsectx.last_selection(model).keep
        keeps.append(keep)
        touched = references.grad.abs().sum(-1) > 0
        assert torch.equal(touched, keep)  # the dropped rows get no gradient, every kept one some
    assert not torch.equal(keeps[0], keeps[1])  # a new draw at each training step


# ----------------------------------------------------------------------------------------------------------------
# attention="sparsectx": sparsectx's processor on every FLUX.3 attention layer
# ----------------------------------------------------------------------------------------------------------------
def _counting_ops(monkeypatch) -> dict:
    """Counts the calls of sparsectx's attention op and fused QK norm + RoPE made by the processors (each norm +
    RoPE call in a form compile-check builds: ``checks.precompiled_norm_rope``)."""
    from sparsectx import processors

    calls = {"sparse_attention": 0, "rms_norm_rope": 0}
    ops = {"sparse_attention": processors.sparse_attention,
           "rms_norm_rope": checks.precompiled_norm_rope(lambda args, kwargs: None)}
    for name in calls:
        def counted(*args, _op=ops[name], _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(processors, name, counted)
    return calls


@pytest.mark.parametrize("fused", [False, True])
def test_sparsectx_attention_equals_native(monkeypatch, fused):
    """Every attention layer (per-mode and joint blocks) runs sparsectx's kernel and its fused QK norm + RoPE: the
    output equals native attention's within fp32 rounding, keeping every token or dropping some (the same
    selection), also with fused QKV projections; disable puts diffusers' processor objects back."""
    model = _build()
    if fused:
        model.fuse_qkv_projections()
    kwargs = _inputs(model)
    originals = dict(model.attn_processors)
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    native_dropped = _run(model, kwargs)
    calls = _counting_ops(monkeypatch)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0, attention="sparsectx")
    layers = 3 * model.config.num_layers + model.config.num_single_layers
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"SparsectxFlux3AttnProcessor"}
    torch.testing.assert_close(_run(model, kwargs), native_dropped, rtol=0, atol=FP32_ATOL)
    assert calls == {"sparse_attention": 2 * layers, "rms_norm_rope": 2 * 2 * layers}  # a group per sample; q and k
    torch.testing.assert_close(_run(model, {**kwargs, "attention_kwargs": {"sparsectx": {"budget": 1.0}}}),
                               expected, rtol=0, atol=FP32_ATOL)
    sparsectx.disable(model)
    assert all(model.attn_processors[name] is processor for name, processor in originals.items())
    assert torch.equal(_run(model, kwargs), expected)


def test_sparsectx_attention_under_hooked_norms_runs_diffusers_norms(monkeypatch):
    """A QK norm with a hook is not computed by the fused pass (the hook must run): diffusers' module and RoPE run,
    and the output still equals native attention's."""
    model = _build()
    kwargs = _inputs(model)
    seen = []
    model.single_transformer_blocks[0].attn.norm_q.register_forward_hook(lambda *args: seen.append(1))
    expected = _run(model, kwargs)
    seen.clear()
    calls = _counting_ops(monkeypatch)
    sparsectx.enable(model, budget=1.0, attention="sparsectx")
    torch.testing.assert_close(_run(model, kwargs), expected, rtol=0, atol=FP32_ATOL)
    layers = 3 * model.config.num_layers + model.config.num_single_layers
    assert seen == [1] and calls["rms_norm_rope"] == 2 * layers - 1


def test_a_drop_mask_reaching_the_flux3_processor_is_refused():
    from sparsectx import processors

    model = _build()
    sparsectx.enable(model, budget=1.0, attention="sparsectx")
    state = model.single_transformer_blocks[0].attn.processor.state
    state.image_keep = torch.ones(2, N_TARGET + sum(N_REFS), dtype=torch.bool)
    try:
        with pytest.raises(ValueError, match="SparsectxFlux3AttnProcessor takes no drop mask"):
            _run(model, _inputs(model))
    finally:
        state.image_keep = None
    assert isinstance(model.single_transformer_blocks[0].attn.processor, processors.SparsectxFlux3AttnProcessor)


def _processor_test_helpers():
    """tests/test_processors.py's flash-attention criterion and input mover (one definition for both files)."""
    spec = importlib.util.spec_from_file_location("_processor_helpers", Path(__file__).with_name("test_processors.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_dtype(model, dtype):
    """``model`` in ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` loads it: the QK norms stay in fp32
    (``Flux3Transformer2DModel._keep_in_fp32_modules``)."""
    model.to(dtype)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in model._keep_in_fp32_modules:
            module.float()
    return model


def _check_bf16_sparsectx_attention(device, monkeypatch):
    """In bf16 on ``device``: sparsectx attention's output (per-mode and joint blocks, references dropped) within
    twice native attention's error against the fp32 native run, with sparsectx's ops counted so a silent fallback
    to native can not pass; then random drop training's output and input gradient (the references removed) within
    twice the error of native attention with the same tokens masked as keys."""
    helpers = _processor_test_helpers()
    model = _build().to(device)
    kwargs = _inputs(model, shared=True)
    calls = _counting_ops(monkeypatch)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        _in_dtype(model, dtype)
        for attention in ("native", "sparsectx"):
            sparsectx.enable(model, budget=0.5, selector="random", seed=0, attention=attention)
            calls.update(sparse_attention=0, rms_norm_rope=0)
            runs[dtype, attention] = _run(model, helpers._to(kwargs, device, dtype))
            assert (calls["sparse_attention"] > 0 and calls["rms_norm_rope"] > 0) == (attention == "sparsectx")
        sparsectx.disable(model)
    helpers._assert_within_twice_native_error(runs[torch.bfloat16, "sparsectx"], runs[torch.bfloat16, "native"],
                                              runs[torch.float32, "native"], "sparsectx attention's output")

    def forward_and_input_grad(dtype):
        inputs = helpers._to(kwargs, device, dtype)
        references = inputs["image_cond_hidden_states"].detach().requires_grad_(True)
        out = model(**{**inputs, "image_cond_hidden_states": references})[0]
        out.float().square().sum().backward()
        return out.detach(), references.grad

    _in_dtype(model, torch.bfloat16).train()
    sparsectx.enable(model, budget=None, attention="sparsectx",
                     selector=sparsectx.random_drop_selector((0.2, 0.6), torch.Generator(device).manual_seed(1)))
    dropped = forward_and_input_grad(torch.bfloat16)
    keep = sparsectx.last_selection(model).keep
    sparsectx.disable(model)
    assert not bool(keep.all())
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
    masked = {}
    for dtype in (torch.bfloat16, torch.float32):
        _in_dtype(model, dtype)
        masked[dtype] = forward_and_input_grad(dtype)
    for part, what in enumerate(("random drop training's output", "random drop training's input gradient")):
        helpers._assert_within_twice_native_error(dropped[part], masked[torch.bfloat16][part],
                                                  masked[torch.float32][part], what)


@pytest.mark.gpu
def test_gpu_bf16_sparsectx_attention_and_random_drop_training(monkeypatch):
    _check_bf16_sparsectx_attention("cuda", monkeypatch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the test above runs")
@pytest.mark.bf16_kernels
def test_bf16_sparsectx_attention_and_random_drop_training_through_the_interpreter(monkeypatch):
    """The GPU check above on the CPU, its bf16 kernels run by the interpreter patched to compute bf16 as a GPU does
    (tests/bf16_interpreter.py)."""
    _check_bf16_sparsectx_attention("cpu", monkeypatch)


# ----------------------------------------------------------------------------------------------------------------
# training with random-ratio drop masks, the dropped references removed
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_random_drop_training_removes_the_dropped_references_and_gives_the_masked_models_gradients(attention,
                                                                                                  monkeypatch):
    """``random_drop_selector`` on a train-mode transformer: a new mask at every forward, each image keeping a ratio
    drawn from the range, each sample its own forward on its kept references only; the output and every weight's
    gradient equal those of the unpatched model with the same tokens masked out as keys."""
    model = _build().train()
    kwargs = _inputs(model)
    target = torch.randn(2, N_TARGET, CHANNELS, generator=torch.Generator().manual_seed(4))

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)[0]
        ((out - target) ** 2).mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    seen = _reference_tokens_seen(model)
    sparsectx.enable(model, budget=None, attention=attention,
                     selector=sparsectx.random_drop_selector((0.2, 0.6), torch.Generator().manual_seed(3)))
    removed_out, removed_grads = outputs_and_grads()
    keep = sparsectx.last_selection(model).keep
    outputs_and_grads()
    assert not torch.equal(sparsectx.last_selection(model).keep, keep)  # a new draw at the next forward
    sparsectx.disable(model)
    for sample in keep:
        for part, n in zip(sample.split(N_REFS), N_REFS):
            assert 0.2 * n - 0.5 <= int(part.sum()) <= 0.6 * n + 0.5
    assert seen[:2] == [int(row.sum()) for row in keep]  # one forward per sample, its kept references only
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
    masked_out, masked_grads = outputs_and_grads()
    torch.testing.assert_close(removed_out, masked_out, rtol=0, atol=FP32_ATOL)
    assert removed_grads.keys() == masked_grads.keys()
    for name, grad in removed_grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_random_drop_selector_in_eval_mode_keeps_every_token_and_draws_nothing():
    """A validation pass in eval mode between training steps (as docs/fine-tuning.md says) keeps every reference
    token and leaves the selector's generator alone, as drop training does (before: it dropped tokens at a random
    ratio and moved the generator, so every later training mask differed from those of the run without the pass);
    a forward with gradients in eval mode warns once that it drops nothing (before: training in eval mode kept one
    mask at every step without a word)."""
    model = _build()
    kwargs = _inputs(model)
    unpatched = _run(model.eval(), kwargs)

    def training_masks(validate: bool) -> list:
        generator = torch.Generator().manual_seed(3)
        sparsectx.enable(model, budget=None, selector=sparsectx.random_drop_selector((0.2, 0.6), generator))
        masks = []
        try:
            for step in range(3):
                model.train()
                model(**kwargs)
                masks.append(sparsectx.last_selection(model).keep.clone())
                if validate and step == 0:
                    state = generator.get_state()
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")  # (no_grad: nothing to warn about)
                        validation = _run(model.eval(), kwargs)
                    assert torch.equal(validation, unpatched) and torch.equal(generator.get_state(), state)
                    assert sparsectx.last_selection(model).keep.all()
        finally:
            sparsectx.disable(model)
        return masks

    masks = training_masks(validate=True)
    assert all(torch.equal(a, b) for a, b in zip(masks, training_masks(validate=False)))
    assert not all(torch.equal(masks[0], mask) for mask in masks[1:])  # (a new draw at each training forward)
    sparsectx.enable(model.eval(), budget=None,
                     selector=sparsectx.random_drop_selector((0.2, 0.6), torch.Generator().manual_seed(3)))
    try:
        with pytest.warns(UserWarning, match="ran in eval mode with random_drop_selector and dropped no reference"):
            model(**kwargs)[0].sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (once)
            model(**kwargs)[0].sum().backward()
    finally:
        sparsectx.disable(model)


# ----------------------------------------------------------------------------------------------------------------
# the attention probe: FLUX.3's first joint block
# ----------------------------------------------------------------------------------------------------------------
class _RecordingNative:
    """Test-only: diffusers' native attention, recording the query and key of each joint attention (the sequence
    [text, target, references]) as diffusers' FLUX.3 processor hands them to the attention backend."""

    def __init__(self, n_refs):
        self.n_refs, self.joint = n_refs, []
        self.native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def __call__(self, query, key, value, **kwargs):
        if key.shape[1] == TEXT_TOKENS + N_TARGET + self.n_refs:
            self.joint.append((query, key))
        return self.native(query, key, value, **kwargs)


def _first_joint_qk(model, kwargs, monkeypatch):
    recorder = _RecordingNative(sum(N_REFS))
    with monkeypatch.context() as patched:
        patched.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, recorder)
        _run(model, kwargs)
    return recorder.joint[0]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_probe_tensors_are_the_first_joint_blocks_query_and_key(models, shared, fused, monkeypatch):
    """The probe's text queries, target queries and reference keys are the rows of the q and k that diffusers'
    processor gives the first joint block's attention (fused QKV projections too); a batch sharing its references
    and prompt is probed on its first sample."""
    model = _build() if fused else models["flux3"]
    if fused:
        model.fuse_qkv_projections()
        assert model.single_transformer_blocks[0].attn.fused_projections
    kwargs = _inputs(model, shared=shared)
    if shared:
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:1].expand(2, -1, -1).contiguous()
    probed = {k: (v[:1] if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids", "image_cond_ids")
                  else v) for k, v in kwargs.items()} if shared else kwargs
    query, key = _first_joint_qk(model, probed, monkeypatch)
    record = {}
    sparsectx.enable(model, budget=3, selector=checks.recording_attention(record))
    _run(model, kwargs)
    close = dict(rtol=1e-5, atol=1e-6)  # the probe projects fewer rows: fp32 rounding of the same products
    torch.testing.assert_close(record["text_queries"], query[:, :TEXT_TOKENS], **close)
    torch.testing.assert_close(record["target_queries"], query[:, TEXT_TOKENS:TEXT_TOKENS + N_TARGET], **close)
    torch.testing.assert_close(record["ref_keys"], key[:, TEXT_TOKENS + N_TARGET:], **close)
    assert record["ref_keys"].shape == (1 if shared else 2, sum(N_REFS), HEADS, HEAD_DIM)
    integration.disable(model)


def test_attention_selector_keeps_the_top_attention_mass(models, monkeypatch):
    from sparsectx.reference import topk_keep_mask

    model, kwargs = models["flux3"], _inputs(models["flux3"])
    query, key = _first_joint_qk(model, kwargs, monkeypatch)
    mass = sparsectx.selection.attention_mass(query[:, TEXT_TOKENS:TEXT_TOKENS + N_TARGET],
                                              key[:, TEXT_TOKENS + N_TARGET:])
    expected = torch.cat([topk_keep_mask(part, [3] * mass.shape[0]) for part in mass.split(N_REFS, 1)], dim=1)
    sparsectx.enable(model, budget=3, selector="attention")
    _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep, expected)


def test_the_probe_stops_at_the_first_joint_block_and_restores_its_processor(models):
    model, kwargs = models["flux3"], _inputs(models["flux3"], shared=True)
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:1].expand(2, -1, -1)  # one prompt: one group
    attn = model.single_transformer_blocks[0].attn
    original = attn.processor
    calls, during = {"last joint block": 0}, {}
    model.single_transformer_blocks[-1].register_forward_hook(
        lambda module, args, output: calls.update({"last joint block": calls["last joint block"] + 1}))

    def selector(latents, context):
        before = calls["last joint block"]
        scores = sparsectx.selection.attention_scores(latents, context)  # runs the probe
        during.update(runs=calls["last joint block"] - before, restored=attn.processor is original)
        return scores

    try:
        sparsectx.enable(model, budget=3, selector=selector)
        _run(model, kwargs)
    finally:
        model.single_transformer_blocks[-1]._forward_hooks.clear()
    assert during == {"runs": 0, "restored": True}
    assert calls == {"last joint block": 1}  # the compacted forward itself
    assert attn.processor is original


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------
def test_a_compiled_transformer_probes_and_selects_as_eager():
    """torch.compile (without fullgraph): the probe's stopped forward and the selection run beside the compiled
    model, keep what eager keeps, and the output equals eager's."""
    model, kwargs = _build(), _inputs(_build())
    sparsectx.enable(model, budget=0.5, selector="attention")
    eager = _run(model, kwargs)
    eager_keep = sparsectx.last_selection(model).keep
    torch._dynamo.reset()
    try:
        out = _run(torch.compile(model, backend="eager"), kwargs)
        keep = sparsectx.last_selection(model).keep
    finally:
        torch._dynamo.reset()
    assert torch.equal(keep, eager_keep) and not bool(keep.all())
    torch.testing.assert_close(out, eager, rtol=0, atol=FP32_ATOL)


def test_compiled_blocks_run_the_probed_block_eagerly_and_give_the_eager_result():
    """compile_repeated_blocks(fullgraph=True): the probe's stopped forward runs the first joint block eagerly (its
    processor's host work can not be traced); the result equals the eager sparse one and the block stays compiled."""
    model, kwargs = _build(), _inputs(_build())
    sparsectx.enable(model, budget=0.5, selector="attention")
    eager_sparse = _run(model, kwargs)
    sparsectx.disable(model)
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = model.single_transformer_blocks[0]._compiled_call_impl
        assert compiled is not None
        sparsectx.enable(model, budget=0.5, selector="attention")
        torch.testing.assert_close(_run(model, kwargs), eager_sparse, rtol=0, atol=FP32_ATOL)
        assert model.single_transformer_blocks[0]._compiled_call_impl is compiled
    finally:
        sparsectx.disable(model)
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# diffusers' modular FLUX.3 pipeline (its only pipeline), with classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------
STEPS, SEED = 2, 0
PIPE_PX = 64  # the target: (64 / 16)^2 = 16 tokens
LATENT_HWS = ((3, 3), (2, 4))  # the references' packed latents, (h, w) in tokens


BLOCKS = {"Flux3AutoBlocks": 2, "Flux3DistilledAutoBlocks": 1}  # -> transformer forwards per step


def _pipeline(blocks_name="Flux3AutoBlocks"):
    """``(model, pipeline, call arguments)``: the FLUX.3 auto blocks (the step-distilled ones: a flow-map model, no
    guidance) without the prompt upsampler, text encoder and decoder (the prompts come as embeddings, the
    references as packed latents, the output as latents); with guidance, a negative prompt (two forwards a step)."""
    modular = pytest.importorskip("diffusers.modular_pipelines")
    model = _build(flow_map=blocks_name == "Flux3DistilledAutoBlocks")
    blocks = getattr(modular, blocks_name)()
    for name in ("prompt_upsampler", "text_encoder", "decode"):
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    g = torch.Generator().manual_seed(SEED + 1)
    kwargs = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
                  image_cond_latents=[torch.randn(1, CHANNELS, h, w, generator=g) for h, w in LATENT_HWS],
                  height=PIPE_PX, width=PIPE_PX, num_inference_steps=STEPS, output="latents")
    if BLOCKS[blocks_name] == 2:
        kwargs["negative_prompt_embeds"] = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    return model, pipe, kwargs


@pytest.mark.parametrize("enabled", ["pipeline", "transformer"])
@pytest.mark.parametrize("blocks_name", BLOCKS)
def test_the_modular_pipelines(blocks_name, enabled, monkeypatch):
    """Keeping every token is the unpatched pipeline; a budget sends the kept reference tokens through the model at
    every forward (a pipeline selects once per call, its guidance branches sharing the selection; a transformer
    once per prompt tensor) and equals masking the dropped tokens as keys; disable is bit-exact and restores the
    pipeline's class."""
    model, pipe, kwargs = _pipeline(blocks_name)
    per_step = BLOCKS[blocks_name]
    seen, selections = _reference_tokens_seen(model), []

    def counting(latents, context):
        selections.append(list(context.ref_lengths))
        return torch.rand(latents.shape[:2], generator=context.generator)

    def run():
        seen.clear()
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(SEED))

    original_class = type(pipe)
    expected = run()
    assert seen == [sum(N_REFS)] * (per_step * STEPS)  # with guidance, two branches a step
    target = pipe if enabled == "pipeline" else model
    sparsectx.enable(target, budget=1.0)
    assert torch.equal(run(), expected)
    sparsectx.enable(target, budget=[1 / 3, 0.5], selector=counting, seed=SEED)
    try:
        sparse = run()
        keep = model._sparsectx_patch.cache.keep
        assert sparsectx.last_selection(target).ref_shapes == list(LATENT_HWS)
    finally:
        sparsectx.disable(target)
    assert seen == [3 + 4] * (per_step * STEPS)
    assert selections == [N_REFS] * (1 if enabled == "pipeline" else per_step)
    assert torch.isfinite(sparse).all() and (sparse - expected).abs().max() > 100 * FP32_ATOL
    assert type(pipe) is original_class and "forward" not in model.__dict__
    assert torch.equal(run(), expected)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
    torch.testing.assert_close(run(), sparse, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("blocks_name", BLOCKS)
def test_the_modular_pipelines_take_per_call_settings_through_attention_kwargs(blocks_name):
    """A per-call budget reaches every forward of the call, also through the step-distilled blocks, which do not
    hand ``attention_kwargs`` to the transformer (before: checked, then ignored), and a bad one is refused before
    the pipeline's first forward."""
    model, pipe, kwargs = _pipeline(blocks_name)
    forwards = BLOCKS[blocks_name] * STEPS
    seen = _reference_tokens_seen(model)
    sparsectx.enable(pipe, budget=0.5, seed=SEED)
    with torch.no_grad():
        pipe(**kwargs, attention_kwargs={"sparsectx": {"budget": 1.0}})
        assert seen == [sum(N_REFS)] * forwards
        seen.clear()
        pipe(**kwargs, attention_kwargs={"sparsectx": {"budget": 2}})
        assert seen == [2 * len(N_REFS)] * forwards
        seen.clear()
        pipe(**kwargs)  # the enabled settings again
        assert seen == [sum(integration.budget_counts(0.5, 1, N_REFS)[0])] * forwards
        seen.clear()
        with pytest.raises(ValueError, match=r"attention_kwargs\['sparsectx'\]: budget"):
            pipe(**kwargs, attention_kwargs={"sparsectx": {"budget": -1.0}})
    assert seen == []


def test_a_budget_sweep_of_the_modular_pipeline():
    _, pipe, kwargs = _pipeline()
    result = sparsectx.sweep(pipe, [{"budget": 1.0}, {"budget": 0.5, "selector": "uniform"}], warmup=0,
                             progress=False, **kwargs)
    baseline, keep_all, half = result.rows
    assert baseline.settings is None and keep_all.max_abs_diff == 0 and keep_all.kept == 1.0
    assert half.kept == pytest.approx(sum(integration.budget_counts(0.5, 1, N_REFS)[0]) / sum(N_REFS))
    assert half.max_abs_diff > 100 * FP32_ATOL and not integration.is_enabled(pipe)


# ----------------------------------------------------------------------------------------------------------------
# what FLUX.3 does not support, refused clearly
# ----------------------------------------------------------------------------------------------------------------
def test_drop_training_is_refused_naming_the_drop_in(models):
    with pytest.raises(TypeError, match=r"FLUX.3.*sparsectx.enable\(transformer, budget=None, "
                                        r"selector=sparsectx.random_drop_selector"):
        sparsectx.enable_drop_training(models["flux3"])
    assert not integration.is_enabled(models["flux3"]) and "forward" not in models["flux3"].__dict__


def test_references_and_ids_of_other_lengths_are_refused_after_a_call_on_those_ids(models):
    """The layout found on ids is kept for later calls on ids of that shape: references of another length than
    those ids are still refused, not cut to them."""
    model = models["flux3"]
    kwargs = _inputs(model)
    sparsectx.enable(model, budget=0.5)
    _run(model, kwargs)
    longer = torch.cat([kwargs["image_cond_hidden_states"], kwargs["image_cond_hidden_states"][:, :3]], 1)
    with pytest.raises(ValueError, match="image_cond_hidden_states holds 20 reference tokens but image_cond_ids 17"):
        _run(model, {**kwargs, "image_cond_hidden_states": longer})


@pytest.mark.parametrize("ids, words", [
    (lambda ids: ids[1:], "image_cond_ids must be \\[N, 4\\] with N = image_cond_hidden_states.shape\\[1\\] = 17"),
    (lambda ids: ids[None], "image_cond_ids must be \\[N, 4\\]"),
])
def test_reference_ids_of_the_wrong_shape_are_refused(models, ids, words):
    model = models["flux3"]
    kwargs = _inputs(model)
    kwargs["image_cond_ids"] = ids(kwargs["image_cond_ids"])
    sparsectx.enable(model, budget=0.5)
    with pytest.raises(ValueError, match=words):
        _run(model, kwargs)
