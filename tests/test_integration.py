"""Drop-in Sparse Context for diffusers (sparsectx.integration): tiny random-weight models built from configs, fp32,
CPU, offline. Families: FLUX.2 (Flux2Transformer2DModel, 4-axis ids), FLUX.1 Kontext layout (FluxTransformer2DModel,
reference plane 1), Qwen-Image (QwenImageTransformer2DModel, RoPE from img_shapes, zero_cond_t), LongCat-Image-Edit
layout (LongCatImageTransformer2DModel: target on id plane 1, references on planes 2, 3, image ids past the text's),
Bria FIBO Edit layout (BriaFiboTransformer2DModel: FLUX.1's, per-block text layers, the prompt's padding as a key
mask in joint_attention_kwargs)."""
import contextlib
import functools
import gc
import logging
import math
import os
import re
import threading
import time
import warnings
import weakref

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

import sparsectx  # noqa: E402
from sparsectx import integration, processors  # noqa: E402
from sparsectx.diagnostics import count_cuda_syncs, count_host_reads  # noqa: E402
from sparsectx.reference import topk_keep_mask  # noqa: E402
from warning_checks import warnings_as_errors  # noqa: E402  (tests/, on sys.path by pytest.ini)

HEADS, HEAD_DIM = 2, 16
TEXT_TOKENS, TEXT_DIM = 6, 32
TARGET_HW = (4, 4)
REF_HWS = ((3, 3), (2, 4))  # two references of different sizes
FP32_ATOL = 2e-5  # fp32 rounding of a different (shorter) summation order
FAMILIES = ("flux2", "flux", "qwen", "longcat", "fibo")
# the forward's attention-kwargs argument, where per-call settings reach a bare transformer (LongCat's forward takes
# none: its pipeline's per-call settings reach the patch through the enabled pipeline's call, tests/test_longcat.py)
ATTN_KWARGS = {"flux2": "joint_attention_kwargs", "flux": "joint_attention_kwargs", "qwen": "attention_kwargs",
               "fibo": "joint_attention_kwargs"}
FIBO_TEXT_LAYER_DIM = 24  # Bria FIBO's text_encoder_dim: its per-block text layers' width


# ----------------------------------------------------------------------------------------------------------------
# tiny models and their inputs
# ----------------------------------------------------------------------------------------------------------------
def _build_model(family, zero_cond_t=True):
    torch.manual_seed(0)
    if family == "flux2":
        return diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16,
            guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    if family == "longcat":
        return diffusers.LongCatImageTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6)).eval()
    if family == "fibo":
        return diffusers.BriaFiboTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, text_encoder_dim=FIBO_TEXT_LAYER_DIM,
            axes_dims_rope=(4, 6, 6)).eval()
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t).eval()


QWEN_PLAIN = "qwen (zero_cond_t off)"  # Qwen-Image-Edit without zero_cond_t: no modulate_index to shorten


@pytest.fixture(scope="module")
def models():
    return {**{family: _build_model(family) for family in FAMILIES}, QWEN_PLAIN: _build_model("qwen", False)}


def _grid_ids(plane, hw, n_axes, start=0):
    h, w = hw
    grid = torch.cartesian_prod(torch.tensor([plane]), torch.arange(h) + start, torch.arange(w) + start)
    return torch.cat([grid, torch.zeros(h * w, 1, dtype=grid.dtype)], 1) if n_axes == 4 else grid


def _ref_hws(family):
    return REF_HWS[:1] if family == "flux" else REF_HWS  # FLUX.1 Kontext takes one reference (FIBO: several)


def _inputs(family, batch=2, seed=1):
    """Forward kwargs: target tokens first, then the references (the pipelines' layout)."""
    g = torch.Generator().manual_seed(seed)
    hws = _ref_hws(family)
    seq = TARGET_HW[0] * TARGET_HW[1] + sum(h * w for h, w in hws)
    text = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g)
    timestep = torch.full((batch,), 0.7)
    if family == "qwen":
        shapes = [[(1, *TARGET_HW), *[(1, h, w) for h, w in hws]]] * batch
        text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
        text_mask[-1, -2:] = 0  # padded prompt in the last sample
        return dict(hidden_states=torch.randn(batch, seq, 16, generator=g), encoder_hidden_states=text,
                    encoder_hidden_states_mask=text_mask, timestep=timestep, img_shapes=shapes, return_dict=False)
    if family == "flux2":
        ids = torch.cat([_grid_ids(0, TARGET_HW, 4)] + [_grid_ids(10 * (i + 1), hw, 4) for i, hw in enumerate(hws)])
        txt_ids = torch.cartesian_prod(*[torch.zeros(1, dtype=torch.long)] * 3, torch.arange(TEXT_TOKENS))
        return dict(hidden_states=torch.randn(batch, seq, 8, generator=g), encoder_hidden_states=text,
                    timestep=timestep, img_ids=ids[None].expand(batch, -1, -1),
                    txt_ids=txt_ids[None].expand(batch, -1, -1), return_dict=False)
    if family == "longcat":  # the pipeline's ids: text on plane 0 counting up, the images past the text's positions
        ids = torch.cat([_grid_ids(1, TARGET_HW, 3, TEXT_TOKENS)]
                        + [_grid_ids(2 + i, hw, 3, TEXT_TOKENS) for i, hw in enumerate(hws)]).double()
        txt_ids = torch.stack([torch.zeros(TEXT_TOKENS), torch.arange(TEXT_TOKENS), torch.arange(TEXT_TOKENS)], 1)
        return dict(hidden_states=torch.randn(batch, seq, 8, generator=g), encoder_hidden_states=text,
                    timestep=timestep, img_ids=ids, txt_ids=txt_ids, return_dict=False)
    if family == "fibo":  # its pipeline's layout: references on planes 1, 2; the prompt's padding as a key mask
        ids = torch.cat([_grid_ids(0, TARGET_HW, 3)] + [_grid_ids(1 + i, hw, 3) for i, hw in enumerate(hws)]).float()
        key_mask = torch.ones(batch, TEXT_TOKENS + seq, dtype=torch.bool)
        key_mask[-1, TEXT_TOKENS - 2:TEXT_TOKENS] = False  # padded prompt in the last sample
        return dict(hidden_states=torch.randn(batch, seq, 8, generator=g), encoder_hidden_states=text,
                    text_encoder_layers=[torch.randn(batch, TEXT_TOKENS, FIBO_TEXT_LAYER_DIM, generator=g)
                                         for _ in range(2)],
                    timestep=timestep, img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3),
                    joint_attention_kwargs={"attention_mask": key_mask[:, None, None, :]}, return_dict=False)
    ids = torch.cat([_grid_ids(0, TARGET_HW, 3), _grid_ids(1, hws[0], 3)]).float()
    return dict(hidden_states=torch.randn(batch, seq, 8, generator=g), encoder_hidden_states=text,
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=timestep, img_ids=ids,
                txt_ids=torch.zeros(TEXT_TOKENS, 3), return_dict=False)


def _planes(family):
    """(the target's id plane, the first reference's) of a family with ids."""
    return {"flux2": (0, 10), "flux": (0, 1), "longcat": (1, 2), "fibo": (0, 1)}[family]


def _n_target():
    return TARGET_HW[0] * TARGET_HW[1]


def random_selector(latents, context):
    return torch.rand(latents.shape[:2], generator=context.generator)


def norm_selector(latents, context):
    """Content scores: the same for a sample alone or in a batch."""
    return latents.norm(dim=-1)


def _counting(selector):
    """``(calls, counting)``: ``counting`` is ``selector`` recording the shape of the latents of each call."""
    calls = []

    def counting(latents, context):
        calls.append(tuple(latents.shape))
        return selector(latents, context)

    return calls, counting


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


@pytest.fixture(autouse=True)
def _always_disabled(models):
    yield
    for model in models.values():
        integration.disable(model)


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_selectors_see_the_target_grid_of_a_non_square_target(models, family):
    """A 2 x 8 target: ``context.target_shape`` is (rows, columns) = (2, 8) for a selector on every family (read
    from FLUX's ids, Qwen-Image's image shapes); the tests' 4 x 4 target could not tell the axes apart."""
    target_hw, ref_hw = (2, 8), (3, 3)
    kwargs = _inputs(family, batch=1)
    seq = target_hw[0] * target_hw[1] + ref_hw[0] * ref_hw[1]
    hidden = torch.randn(1, seq, kwargs["hidden_states"].shape[-1], generator=torch.Generator().manual_seed(2))
    kwargs["hidden_states"] = hidden
    kwargs.pop("joint_attention_kwargs", None)  # (FIBO's key mask: sized for the other sequence)
    if family == "qwen":
        kwargs["img_shapes"] = [[(1, *target_hw), (1, *ref_hw)]]
    else:
        n_axes = 4 if family == "flux2" else 3
        target_plane, ref_plane = _planes(family)
        start = TEXT_TOKENS if family == "longcat" else 0  # (the target's grid is its ids' extent, from any origin)
        ids = torch.cat([_grid_ids(target_plane, target_hw, n_axes, start),
                         _grid_ids(ref_plane, ref_hw, n_axes, start)])
        kwargs["img_ids"] = ids[None] if family == "flux2" else ids.float()
    seen = []

    def recording(latents, context):
        seen.append(context.target_shape)
        return latents.norm(dim=-1)

    integration.enable(models[family], budget=0.5, selector=recording)
    _run(models[family], kwargs)
    assert seen == [target_hw]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_matches_unpatched(models, family):
    model, kwargs = models[family], _inputs(family)
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=1.0, selector=random_selector, seed=0)
    torch.testing.assert_close(_run(model, kwargs), expected, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("budget", [1.0, 10**6, [1.0, 10**6]])
def test_keeping_every_token_draws_nothing_from_the_global_rng(models, budget):
    """A budget that keeps every token of every image runs no selector: the default ``random`` selector, unseeded
    and without a generator, drew from torch's global RNG, so a later draw (the next pipeline call's noise, a
    stochastic scheduler's step noise) differed from the unpatched run's (a reviewer measured latents off by 4.7)."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=2)
    calls = []
    sparsectx.enable(model, budget=budget, selector=lambda latents, context: calls.append(1) or torch.rand(
        latents.shape[:2]))
    torch.manual_seed(0)
    out = _run(model, kwargs)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4)) and not calls  # no selector ran, the global stream did not move
    assert bool(sparsectx.last_selection(model).keep.all())
    sparsectx.disable(model)
    torch.testing.assert_close(out, _run(model, kwargs), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_forwards_from_two_threads_on_one_transformer_run_one_at_a_time(models, family):
    """Two threads calling one enabled transformer with their own inputs at once: the second forward waits for the
    first to end, and each output equals its forward run alone (before: Qwen-Image's RoPE hooks of one forward ran in
    the other's, an IndexError every time; the patch's per-call state is one per transformer)."""
    model, inputs = models[family], [_inputs(family, batch=1, seed=seed) for seed in (1, 2)]
    first_selecting, second_selecting, overlapped = threading.Event(), threading.Event(), []

    def selector(latents, context):
        if threading.current_thread().name == "first":
            first_selecting.set()
            overlapped.append(second_selecting.wait(2.0))  # the second forward's selection would have come by now
        elif threading.current_thread().name == "second":
            second_selecting.set()
        return torch.rand(latents.shape[:2], generator=context.generator)

    sparsectx.enable(model, budget=0.5, selector=selector, seed=0)
    alone = [_run(model, kwargs) for kwargs in inputs]
    results, errors = {}, []

    def run(i, new_prompt=False):  # (a new prompt tensor: a new selection on a bare transformer)
        kwargs = {**inputs[i], "encoder_hidden_states": inputs[i]["encoder_hidden_states"].clone()} if new_prompt \
            else inputs[i]
        try:
            results[i] = _run(model, kwargs)
        except Exception as error:  # (raised in the thread: reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, True), name=name) for i, name in enumerate(("first", "second"))]
    threads[0].start()
    assert first_selecting.wait(60)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert not errors and overlapped == [False]
    assert all(torch.equal(results[i], alone[i]) for i in range(2))
    for rep in range(2):  # free-running threads
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert all(torch.equal(results[i], alone[i]) for i in range(2)), rep


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_bit_exact(models, family):
    model, kwargs = models[family], _inputs(family)
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    assert not torch.equal(_run(model, kwargs)[:, :_n_target()], expected[:, :_n_target()])
    sparsectx.disable(model)
    assert "forward" not in model.__dict__ and not integration.is_enabled(model)
    assert torch.equal(_run(model, kwargs), expected)


class _KeyMaskedNative:
    """Test-only: diffusers' native attention backend with the dropped reference tokens masked out as keys (the
    joint sequence is [text, image] in every family)."""

    def __init__(self, image_keep):
        self.image_keep = image_keep  # bool [B, S_image]
        self.native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        batch, n_image = self.image_keep.shape
        text = torch.ones(batch, key.shape[1] - n_image, dtype=torch.bool, device=key.device)
        key_mask = torch.cat([text, self.image_keep.to(key.device)], 1)[:, None, None, :]
        if attn_mask is not None and attn_mask.is_floating_point():  # an additive mask: -inf at the dropped keys too
            key_mask = attn_mask.masked_fill(~key_mask, -torch.inf)
        elif attn_mask is not None:
            key_mask = key_mask & attn_mask.bool()
        return self.native(query, key, value, attn_mask=key_mask, **kwargs)


def _assert_dropping_equals_masking(model, kwargs, monkeypatch, **settings):
    """Enabled with ``settings``, the forward drops some tokens; its target rows equal the unpatched model's with
    those tokens masked as keys (``_KeyMaskedNative``, set for the rest of the test). Returns the compacted output."""
    sparsectx.enable(model, **settings)
    dropped = _run(model, kwargs)
    keep = model._sparsectx_patch.cache.keep
    assert 0 < int(keep.sum()) < keep.numel()
    sparsectx.disable(model)
    image_keep = torch.cat([torch.ones(keep.shape[0], _n_target(), dtype=torch.bool), keep], 1)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(image_keep))
    masked = _run(model, kwargs)
    torch.testing.assert_close(dropped[:, :_n_target()], masked[:, :_n_target()], rtol=0, atol=FP32_ATOL)
    return dropped


@pytest.mark.parametrize("family", FAMILIES + (QWEN_PLAIN,))
def test_dropping_rows_equals_masking_keys(models, family, monkeypatch):
    model, kwargs = models[family], _inputs(family.split()[0])
    dropped = _assert_dropping_equals_masking(model, kwargs, monkeypatch, selector=random_selector, seed=0,
                                              budget=[0.5, 3] if family != "flux" else 0.4)
    assert torch.count_nonzero(dropped[:, _n_target():]) == 0  # reference rows of the output are zeros


@pytest.mark.parametrize("selector", ["random", "edit"])
@pytest.mark.parametrize("form", ["per-query", "additive", "additive finite", "2-D per-query"])
def test_a_mask_per_query_or_additive_loses_the_dropped_rows_and_columns(models, monkeypatch, form, selector):
    """An ``attention_mask`` of one row per query (``[B, 1, S, S]`` over the joint sequence; FIBO's processors hand it
    to diffusers' attention as it is), or an additive one (0 / -inf): the compacted forward gets its rows and columns
    of the kept tokens, and equals the unpatched model with the dropped tokens masked as keys too; a selector reading
    the probe takes its text padding from it (the keys no query may attend to)."""
    model, kwargs = models["fibo"], _inputs("fibo")
    batch, n = kwargs["hidden_states"].shape[0], TEXT_TOKENS + kwargs["hidden_states"].shape[1]
    per_query = torch.rand(batch, 1, n, n, generator=torch.Generator().manual_seed(3)) < 0.7
    per_query |= torch.eye(n, dtype=torch.bool)  # (no query without a key)
    per_query[-1, ..., TEXT_TOKENS - 2:TEXT_TOKENS] = False  # the last prompt's padding
    if form == "2-D per-query":  # ([S, S]: one mask for every sample, the last's padding with it)
        per_query = per_query[-1, 0]
    # ("additive finite": a -1e4 padding, which the probe read as attended keys)
    mask = per_query if not form.startswith("additive") else torch.zeros(per_query.shape).masked_fill(
        ~per_query, -torch.inf if form == "additive" else -1e4)
    kwargs = {**kwargs, "joint_attention_kwargs": {"attention_mask": mask}}
    probed = []

    def recording(latents, context):
        scores = sparsectx.selection.edit_scores(latents, context)
        probed.append(context.extra.get("text_mask"))
        return scores

    _assert_dropping_equals_masking(model, kwargs, monkeypatch, budget=0.5, seed=0,
                                    selector=random_selector if selector == "random" else recording)
    if selector == "edit":
        expected = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
        expected[-1 if form != "2-D per-query" else slice(None), -2:] = False
        assert len(probed) == 1 and torch.equal(probed[0], expected)
    with pytest.raises(ValueError, match=r"attention_mask .* last dim"):  # a mask of another sequence: named
        sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
        _run(model, {**kwargs, "joint_attention_kwargs": {"attention_mask": mask[..., :-1]}})


@pytest.mark.parametrize("form", ["per-query", "additive", "additive finite", "2-D per-query"])
def test_sparsectx_attention_runs_diffusers_attention_for_masks_it_does_not_take(models, form):
    """attention="sparsectx" given an additive mask or one with a row per query (which diffusers' processors and
    the drop-in with native attention take): the sparsectx processors refused it mid-forward; those layers now run
    the replaced processor, so the output is native attention's. Drop training, which masks tokens itself, refuses
    such a mask naming it. ("2-D per-query": an [S, S] mask, one row per query for every sample, was read as a
    key mask and refused, "must be a key mask [B, S]".)"""
    model, kwargs = models["fibo"], _inputs("fibo")
    batch, n = kwargs["hidden_states"].shape[0], TEXT_TOKENS + kwargs["hidden_states"].shape[1]
    keys = torch.rand(batch, 1, 1, n, generator=torch.Generator().manual_seed(3)) < 0.7
    keys[..., :1] = True
    rows = torch.rand(n, n, generator=torch.Generator().manual_seed(4)) < 0.7
    rows |= torch.eye(n, dtype=torch.bool)  # (no query without a key)
    mask = {"per-query": keys.expand(batch, 1, n, n),
            "additive": torch.zeros(keys.shape).masked_fill(~keys, -torch.inf),
            "additive finite": torch.zeros(keys.shape).masked_fill(~keys, -1e4),
            "2-D per-query": rows}[form]
    kwargs = {**kwargs, "joint_attention_kwargs": {"attention_mask": mask}}
    outputs = {}
    for attention in ("native", "sparsectx"):
        sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0, attention=attention)
        outputs[attention] = _run(model, kwargs)
    sparsectx.disable(model)
    torch.testing.assert_close(outputs["sparsectx"], outputs["native"], rtol=0, atol=0)
    model.train()
    sparsectx.enable_drop_training(model, ratio_range=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
    try:
        with pytest.raises(ValueError, match=f"takes a boolean key mask .* got {mask.dtype} of shape"):
            _run(model, kwargs)
    finally:
        sparsectx.disable_drop_training(model)
        model.eval()


def test_a_key_mask_made_anew_at_every_step_keeps_the_selection(models):
    """A bare FIBO transformer called at every step with the same prompt tensors and its key mask made anew (a new
    view, or a copy): one selection, reused (the mask is read by the probe, not a key of the kept selection)."""
    model, kwargs = models["fibo"], _inputs("fibo")
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting)
    mask = kwargs["joint_attention_kwargs"]["attention_mask"]
    keeps = []
    for step in range(3):
        _run(model, {**kwargs, "joint_attention_kwargs": {"attention_mask": mask.clone() if step else mask[:]}})
        keeps.append(model._sparsectx_patch.cache.keep)
    assert len(calls) == 1 and all(torch.equal(keep, keeps[0]) for keep in keeps)


def _with_lora_adapter(family):
    """A fresh tiny model with a peft LoRA adapter on its attention projections (random, non-zero weights: the
    adapter changes the output), added by ``add_adapter``: the peft path ``pipe.load_lora_weights`` takes too."""
    peft = pytest.importorskip("peft")
    model = _build_model(family)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj"]))
    return model


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
@pytest.mark.parametrize("family", tuple(ATTN_KWARGS))
def test_a_lora_adapter_scaled_per_call_reaches_every_forward(family, attention, monkeypatch):
    """Inference with a LoRA adapter whose scale the call gives beside the per-call sparsectx settings (the
    pipelines pass ``attention_kwargs={"scale": s}``, FLUX.1 ``joint_attention_kwargs``): keeping every token gives
    the unpatched model at that scale, and dropping rows equals masking the same keys in the unpatched model at that
    scale (the compacted forward applies the scaled adapter in every block). The scale must matter: outputs at two
    scales differ."""
    model, kwargs = _with_lora_adapter(family), _inputs(family)
    name = ATTN_KWARGS[family]

    def call(scale, **settings):
        return _run(model, {**kwargs, name: {"scale": scale, **({"sparsectx": settings} if settings else {})}})

    plain = {scale: call(scale) for scale in (0.5, 1.0)}
    assert (plain[0.5] - plain[1.0]).abs().max() > 100 * FP32_ATOL
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0, attention=attention)
    torch.testing.assert_close(call(0.5, budget=1.0), plain[0.5], rtol=0, atol=FP32_ATOL)
    dropped = call(0.5)
    keep = model._sparsectx_patch.cache.keep
    assert 0 < int(keep.sum()) < keep.numel()
    sparsectx.disable(model)
    image_keep = torch.cat([torch.ones(keep.shape[0], _n_target(), dtype=torch.bool), keep], 1)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(image_keep))
    torch.testing.assert_close(dropped[:, :_n_target()], call(0.5)[:, :_n_target()], rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("family", ("flux2", "qwen"))
def test_a_bare_transformers_probe_selection_follows_the_lora_scale_and_adapters(family):
    """A bare transformer keeps its selection across forwards on the same prompt tensors, but not across LoRA
    settings: a forward at another scale, or after disable_lora / enable_lora, probes anew (before: it kept the
    selection the first setting's q and k gave). Each selection equals that of a transformer enabled anew at that
    setting; with the adapter disabled it is the scale-0 one (the base weights)."""
    peft = pytest.importorskip("peft")
    model = _build_model(family)
    torch.manual_seed(1)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj"]))
    kwargs, name = _inputs(family), ATTN_KWARGS[family]

    def keep(scale, anew):
        if anew:  # (enabling again starts anew: no selection kept)
            sparsectx.enable(model, budget=0.5, selector="attention", seed=0)
        _run(model, {**kwargs, name: {"scale": scale}})
        return model._sparsectx_patch.cache.keep.clone()

    try:
        expected = {scale: keep(scale, anew=True) for scale in (0.0, 1.0)}
        assert not torch.equal(expected[0.0], expected[1.0])  # (the scale matters)
        assert torch.equal(keep(0.0, anew=True), expected[0.0])
        assert torch.equal(keep(1.0, anew=False), expected[1.0])
        model.disable_lora()
        assert torch.equal(keep(1.0, anew=False), expected[0.0])
        model.enable_lora()
        assert torch.equal(keep(1.0, anew=False), expected[1.0])
        assert torch.equal(keep(1.0, anew=False), expected[1.0])  # (the same setting: the selection kept)
    finally:
        sparsectx.disable(model)
    # an adapter weight and a per-call scale whose product diffusers divides back inexactly (0.8 * 0.7 / 0.7 =
    # 0.7999999999999999): the selection is still kept across forwards (before: made again at the second)
    calls = []

    def counted(latents, context):
        calls.append(1)
        return random_selector(latents, context)

    model.set_adapters(["default"], weights=[0.8])
    sparsectx.enable(model, budget=0.5, selector=counted, seed=0)
    try:
        for _ in range(3):
            _run(model, {**kwargs, name: {"scale": 0.7}})
    finally:
        sparsectx.disable(model)
    assert len(calls) == 1


def test_a_bare_transformers_lora_key_frees_unloaded_adapters_and_tells_a_new_adapter_of_the_same_name():
    """The LoRA layers a bare transformer's selection key reads are held weakly: unloading the adapter frees its
    weights (before: they stayed alive until the next LoRA forward, also after disable). An adapter loaded since
    under the same name and peft_config object (as a new peft_config taking a freed one's id: the key compared ids)
    is another adapter: the next forward selects anew, and disabling it is seen (before: the freed layers' state was
    read, and the first adapter's selection kept)."""
    import gc

    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer

    def config():
        return peft.LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                               target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj"])

    def lora_enabled(flag):
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(flag)

    model, kwargs = _build_model("flux2"), _inputs("flux2")
    torch.manual_seed(1)
    model.add_adapter(config())

    def keep(anew=False):
        if anew:
            sparsectx.enable(model, budget=0.5, selector="attention", seed=0)
        _run(model, {**kwargs, "joint_attention_kwargs": {"scale": 1.0}})
        return model._sparsectx_patch.cache.keep.clone()

    try:
        first = keep(anew=True)
        layer = weakref.ref(next(m for m in model.modules() if isinstance(m, BaseTunerLayer)))
        saved = model.peft_config
        model.unload_lora()
        gc.collect()
        assert layer() is None
        model.peft_config = saved
        torch.manual_seed(2)
        peft.inject_adapter_in_model(config(), model, "default")
        second = keep()
        lora_enabled(False)
        off = keep()
        assert torch.equal(off, keep(anew=True))
        lora_enabled(True)
        assert torch.equal(second, keep(anew=True)) and not torch.equal(second, first)
        assert not torch.equal(second, off)
    finally:
        sparsectx.disable(model)


@pytest.mark.parametrize("family", ("flux2", "qwen", QWEN_PLAIN, "longcat", "fibo"))
def test_mixed_budgets_equal_each_sample_alone(models, family):
    """(FIBO: its per-block text layers and its key mask, which pads the last sample's prompt, cut per sample.)"""
    model, kwargs = models[family], _inputs(family.split()[0], batch=3)
    budgets = [[0.25], [2, 0.75], [1.0]]
    sparsectx.enable(model, budget=budgets, selector=norm_selector)
    together = _run(model, kwargs)
    for b, budget in enumerate(budgets):
        alone = {k: (v[b:b + 1] if isinstance(v, (torch.Tensor, list)) and len(v) == 3 and k != "txt_ids"
                     else v) for k, v in kwargs.items()}
        alone["txt_ids"] = kwargs["txt_ids"][b:b + 1] if family == "flux2" else kwargs.get("txt_ids")  # ([B, T, 4])
        if family == "fibo":
            alone["text_encoder_layers"] = [layer[b:b + 1] for layer in kwargs["text_encoder_layers"]]
            alone["joint_attention_kwargs"] = {"attention_mask":
                                               kwargs["joint_attention_kwargs"]["attention_mask"][b:b + 1]}
        alone = {k: v for k, v in alone.items() if v is not None}
        sparsectx.enable(model, budget=budget, selector=norm_selector)
        torch.testing.assert_close(together[b:b + 1, :_n_target()], _run(model, alone)[:, :_n_target()],
                                   rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("family, attention", [("flux2", "native"), ("flux2", "sparsectx"), ("qwen", "native"),
                                               ("flux", "native")])  # (sparsectx attention: FLUX.2's packed run)
def test_mixed_budgets_refuse_a_prompt_batch_of_another_size(models, family, attention):
    """Requests keeping different tokens run as groups (or packed): a prompt with 2 rows for a batch of 4 (as
    FluxKontextPipeline passes a user's prompt_embeds under num_images_per_prompt=2) gave each group of 2 samples
    both prompts, silently (sample 2 on prompt 0), or, packed, an unclear reshape error. The model alone refuses
    such a batch; so does the drop-in, naming the input."""
    model, kwargs = models[family], _inputs(family, batch=4)
    for name in ("encoder_hidden_states", "encoder_hidden_states_mask", "pooled_projections"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name][:2]
    n_refs = len(_ref_hws(family))
    sparsectx.enable(model, budget=[[0.5] * n_refs, [0.25] * n_refs], attention=attention)
    try:
        with pytest.raises(ValueError, match="encoder_hidden_states has 2 rows for a batch of 4"):
            _run(model, kwargs)
    finally:
        sparsectx.disable(model)


def test_mixed_budgets_refuse_an_attention_mask_of_another_batch(models):
    """The same for a key mask [B, 1, 1, S] in the attention kwargs with 2 rows for a batch of 4 (each group of 2
    samples took both rows: sample 2 ran under sample 0's mask); a [S, S] mask, one row per query for every sample,
    still runs."""
    model, kwargs = models["fibo"], _inputs("fibo", batch=4)
    mask = kwargs["joint_attention_kwargs"]["attention_mask"]
    sparsectx.enable(model, budget=[[0.5], [0.25]], selector="uniform")
    try:
        for rows in (mask[:2], mask[:2, 0, 0]):  # ([B, S] too: a first version checked masks of 3 dims or more)
            with pytest.raises(ValueError, match=r"joint_attention_kwargs\['attention_mask'\] has 2 rows for a "
                                                 r"batch of 4"):
                _run(model, {**kwargs, "joint_attention_kwargs": {"attention_mask": rows}})
        n = mask.shape[-1]
        per_query = torch.ones(n, n, dtype=torch.bool)
        assert _run(model, {**kwargs, "joint_attention_kwargs": {"attention_mask": per_query}}).shape[0] == 4
    finally:
        sparsectx.disable(model)


def test_step_caches_refuse_a_batch_run_as_several_forwards(models):
    """diffusers' step caches (enable_cache) keep one state per denoiser call: samples that keep different tokens,
    run as separate forwards, would share it (before: a sample got another sample's cached outputs, silently). Such
    a batch is refused with what to do; a batch that keeps the same tokens runs as with the cache alone."""
    hooks = pytest.importorskip("diffusers.hooks")
    model, kwargs = models["qwen"], _inputs("qwen")
    try:
        model.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.05))
        with model.cache_context("cond"):
            cached = _run(model, kwargs)
        sparsectx.enable(model, budget=1.0, selector=norm_selector)
        with model.cache_context("cond"):
            torch.testing.assert_close(_run(model, kwargs), cached, rtol=0, atol=FP32_ATOL)
        sparsectx.enable(model, budget=[[0.25], [0.5]], selector=norm_selector)
        with pytest.raises(RuntimeError, match=r"2 separate forwards.*stateful hooks \['fbc.*disable the cache"):
            with model.cache_context("cond"):
                _run(model, kwargs)
    finally:
        model.disable_cache()


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_the_probe_leaves_step_cache_states_alone(models, family):
    """A selector that reads the attention probe under diffusers' TaylorSeer step cache: the probe's stopped forward
    advanced the cache's step count, so the step after it asked the cache for a prediction it could not make
    ("Cannot predict without prior initialization/update", even keeping every token). The probe now runs on set-aside
    cache states: keeping every token equals the cache alone over several steps."""
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "TaylorSeerCacheConfig"):
        pytest.skip("this diffusers has no TaylorSeer cache")
    model, kwargs = models[family], _inputs(family)

    def steps():
        with model.cache_context("cond"):
            return [_run(model, {**kwargs, "timestep": kwargs["timestep"] * (1.0 - 0.2 * i)}) for i in range(4)]

    try:
        model.enable_cache(hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                       taylor_factors_dtype=torch.float32))
        cached = steps()
        model.disable_cache()
        model.enable_cache(hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                       taylor_factors_dtype=torch.float32))
        sparsectx.enable(model, budget=1.0, selector="attention")
        for got, want in zip(steps(), cached):
            torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)
    finally:
        model.disable_cache()


def test_step_cache_states_of_a_module_reached_twice_are_set_aside_once():
    """A hooked submodule reachable by two names (shared) is one module: its stateful hook is listed once, and the
    states set aside for the probe come back (set aside twice, the second save would have kept the emptied ones)."""
    class Manager:
        def __init__(self):
            self._state_cache = {"cond": "state"}

        def get_state(self):
            return self._state_cache

    class Hook:
        _is_stateful = True

        def __init__(self):
            self.state_manager = Manager()

    class Registry:
        def __init__(self, hooks):
            self.hooks = hooks

    shared, hook = torch.nn.Linear(2, 2), Hook()
    shared._diffusers_hook = Registry({"step_cache": hook, "stateless": type("Plain", (), {})()})
    root = torch.nn.Sequential(shared, torch.nn.Sequential(shared))
    assert integration._stateful_hooks(root) == [("step_cache", hook)]
    with integration._step_cache_states_set_aside(root):
        assert hook.state_manager._state_cache == {}
    assert hook.state_manager._state_cache == {"cond": "state"}


def test_groups_take_their_rows_of_per_sample_attention_kwargs(models):
    """A group (or the probe's first sample) gets its rows of per-sample tensors in the attention kwargs, e.g. FLUX.1's
    ``ip_adapter_image_embeds`` (one [B, ...] tensor per IP adapter); other entries and the caller's dict stay."""
    model, kwargs = models["flux"], _inputs("flux", batch=3)
    sparsectx.enable(model, budget=0.5)
    embeds = [torch.randn(3, 4, 8), torch.randn(3, 2)]
    attn_kwargs = {"ip_adapter_image_embeds": embeds, "scale": 0.5, "shared": torch.randn(1, 5)}
    group = model._sparsectx_patch._slice_batch({**kwargs, "joint_attention_kwargs": attn_kwargs}, [2, 0])
    got = group["joint_attention_kwargs"]
    assert torch.equal(got["ip_adapter_image_embeds"][0], embeds[0][[2, 0]])
    assert torch.equal(got["ip_adapter_image_embeds"][1], embeds[1][[2, 0]])
    assert got["scale"] == 0.5 and got["shared"] is attn_kwargs["shared"]
    assert attn_kwargs["ip_adapter_image_embeds"] is embeds and got is not attn_kwargs


def test_mixed_budgets_with_ids_shared_by_the_batch(models):
    """FLUX.2 ids given once ([1, S, 4]) for a batch of 3 samples that run as groups: same output as batched ids."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=3)
    sparsectx.enable(model, budget=[[0.25], [2, 0.75], [1.0]], selector=norm_selector)
    batched = _run(model, kwargs)
    shared = _run(model, {**kwargs, "img_ids": kwargs["img_ids"][:1], "txt_ids": kwargs["txt_ids"][:1]})
    assert torch.equal(shared, batched)


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_samples_with_other_ids_run_on_the_first_samples_ids_as_diffusers_does(models, attention):
    """FLUX.2's batched ids ([B, S, 4]) whose samples differ: diffusers reads sample 0's for the whole batch, and so
    does every group of a batch whose samples keep different tokens (before: a group of later samples ran on its
    own ids, and one group of all samples on sample 0's): the sample keeping every token gets the unpatched batch's
    output, the other what it gets alone."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=2)
    ids = kwargs["img_ids"].clone()
    ids[1, _n_target():, 1] += 1  # sample 1's references one row lower
    kwargs["img_ids"] = ids
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=[[0.5], [1.0]], selector=norm_selector, attention=attention)
    together = _run(model, kwargs)
    assert len(model._sparsectx_patch.cache.groups) == 2
    torch.testing.assert_close(together[1, :_n_target()], expected[1, :_n_target()], rtol=0, atol=FP32_ATOL)
    first = {**kwargs, "img_ids": ids[:1], "txt_ids": kwargs["txt_ids"][:1]}
    first.update({name: kwargs[name][:1] for name in ("hidden_states", "encoder_hidden_states", "timestep")})
    sparsectx.enable(model, budget=[0.5], selector=norm_selector, attention=attention)
    torch.testing.assert_close(together[:1, :_n_target()], _run(model, first)[:, :_n_target()], rtol=0,
                               atol=FP32_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_later_steps_synchronise_once_on_cuda(attention):
    """On CUDA, a later step of a pipeline call synchronises with the host once (the plan's check) beyond what the
    model itself does; the first step selects (several)."""
    model = _build_model("flux2").cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _same_references(_inputs("flux2")).items()}
    plain = count_cuda_syncs(lambda: _run(model, kwargs))
    try:
        sparsectx.enable(model, budget=0.5, selector="random", seed=0, attention=attention)
        first = count_cuda_syncs(lambda: _run(model, kwargs))
        later = count_cuda_syncs(lambda: _run(model, kwargs))
    finally:
        sparsectx.disable(model)
    assert later == plain + 1 and first > later, (plain, first, later)


def test_packed_attention_forward_and_gradients_equal_each_sample_alone():
    """``processors.packed_attention`` (the drop-in's packed FLUX.2 batch: every sample's text rows first, then
    every sample's image rows): each sample's rows attend to themselves only, forward and backward, against a plain
    softmax per sample; the image segments are longer than the text ones and than a kernel block (an image bound
    mistaken for the text one left the key gradients of the longer segments wrong, the forward right)."""
    heads, dim, n_text, images = 2, 16, 2, [70, 90]
    batch, offset = len(images), len(images) * n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, offset + sum(images), heads, dim, generator=gen, requires_grad=True) for _ in range(3))
    packed = processors.PackedBatch(cu_text=torch.tensor([0, 2, 4], dtype=torch.int32),
                                    cu_image=torch.tensor([0, 70, 160], dtype=torch.int32), n_text=offset,
                                    max_text=n_text, max_image=max(images))
    out = processors.packed_attention(q, k, v, packed)
    grad = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.zeros_like(out)
    for b in range(batch):
        rows = torch.tensor(list(range(b * n_text, (b + 1) * n_text))
                            + list(range(offset + sum(images[:b]), offset + sum(images[:b + 1]))))
        qs, ks, vs = (t[0, rows].transpose(0, 1) for t in (q, k, v))
        attended = torch.softmax(qs @ ks.transpose(-1, -2) / dim ** 0.5, -1) @ vs
        expected = expected.index_put((torch.zeros_like(rows), rows), attended.transpose(0, 1))
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=FP32_ATOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)


def test_flux2_mixed_budgets_run_packed_with_an_empty_prompt(models):
    """A packed batch whose prompt has no token (no text rows in the packed sequence) equals each sample alone."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=2)
    kwargs = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:, :0],
              "txt_ids": kwargs["txt_ids"][:, :0]}
    budgets = [[0.25], [2, 0.75]]
    sparsectx.enable(model, budget=budgets, selector=norm_selector, attention="sparsectx")
    together = _run(model, kwargs)
    assert getattr(model, integration.PATCH_ATTR).cache.packing is not None  # it ran packed
    for b, budget in enumerate(budgets):
        alone = {name: (value[b:b + 1] if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
        sparsectx.enable(model, budget=budget, selector=norm_selector, attention="native")
        torch.testing.assert_close(together[b:b + 1, :_n_target()], _run(model, alone)[:, :_n_target()],
                                   rtol=0, atol=FP32_ATOL)


def test_flux2_mixed_budgets_run_packed_with_sparsectx_attention(models):
    """FLUX.2 + attention="sparsectx": samples that keep different tokens run as one packed sequence (one forward,
    batch of 1, no padding), equal to each sample run alone; with per-sample timesteps, as exact groups."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=3)
    budgets = [[0.25], [2, 0.75], [1.0]]
    seen = []
    handle = model.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[:2])))
    try:
        sparsectx.enable(model, budget=budgets, selector=norm_selector, attention="sparsectx")
        together = _run(model, kwargs)
        kept = getattr(model, integration.PATCH_ATTR).cache.keep.sum(1).tolist()
        assert seen == [(1, 3 * _n_target() + sum(kept))]  # one forward, every sample's rows in one sequence
        with count_host_reads() as later:  # a later step: the plan's check and the shared-timestep check, one read
            again = _run(model, kwargs)
        assert later.count == 1, later.ops
        assert torch.equal(again, together)
        for b, budget in enumerate(budgets):
            alone = {**kwargs, "hidden_states": kwargs["hidden_states"][b:b + 1],
                     "encoder_hidden_states": kwargs["encoder_hidden_states"][b:b + 1],
                     "timestep": kwargs["timestep"][b:b + 1], "img_ids": kwargs["img_ids"][b:b + 1],
                     "txt_ids": kwargs["txt_ids"][b:b + 1]}
            sparsectx.enable(model, budget=budget, selector=norm_selector, attention="native")
            torch.testing.assert_close(together[b:b + 1, :_n_target()], _run(model, alone)[:, :_n_target()],
                                       rtol=0, atol=FP32_ATOL)
        assert not together[:, _n_target():].any()  # reference rows of the output stay zero
        # samples at different timesteps do not share a modulation: exact groups, one forward per group
        sparsectx.enable(model, budget=budgets, selector=norm_selector, attention="sparsectx")
        seen.clear()
        steps = {**kwargs, "timestep": torch.tensor([0.7, 0.5, 0.7])}
        grouped = _run(model, steps)
        assert len(seen) == 3 and all(n == 1 for n, _ in seen)
        sparsectx.enable(model, budget=budgets[1], selector=norm_selector)
        second = {name: (value[1:2] if name not in ("return_dict",) else value) for name, value in steps.items()}
        torch.testing.assert_close(grouped[1:2, :_n_target()], _run(model, second)[:, :_n_target()], rtol=0,
                                   atol=FP32_ATOL)
    finally:
        handle.remove()


def test_flux2_mixed_budgets_with_a_key_mask_run_as_groups(models, monkeypatch):
    """A key mask in the attention kwargs (one sequence can not carry it): FLUX.2 samples keeping different tokens run
    as exact groups, each with its mask's kept columns, under sparsectx attention too, and equal the unpatched model
    with the dropped tokens masked as keys."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=2)
    n = TEXT_TOKENS + kwargs["hidden_states"].shape[1]
    key_mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    key_mask[1, ..., TEXT_TOKENS - 2:TEXT_TOKENS] = False  # the second prompt padded
    kwargs = {**kwargs, "joint_attention_kwargs": {"attention_mask": key_mask}}
    seen = []
    handle = model.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[:2])))
    try:
        _assert_dropping_equals_masking(model, kwargs, monkeypatch, budget=[[0.25], [0.75]], selector=norm_selector,
                                        attention="sparsectx")
    finally:
        handle.remove()
    # the compacted call: one forward per sample, not one packed sequence (then the unpatched one, whole)
    assert len(seen) == 3 and all(rows == 1 for rows, _ in seen[:2]) and seen[2][0] == 2


@pytest.mark.parametrize("later", ["diffusers' processors", "a user's processors"])
def test_a_packed_batch_runs_only_through_sparsectx_attention(models, later):
    """FLUX.2 + attention="sparsectx", samples that keep different tokens (one packed sequence, whose samples only
    sparsectx's processors keep apart): processors set on the layers after enable would attend across the samples.
    diffusers' own, set between two forwards that reuse the plan, are replaced before the packed forward; a user's
    subclass, which sparsectx can not replace, makes the batch run one forward per sample instead. Each sample's
    output equals native attention's on its own kept tokens (before: off by 1e-2, without an error)."""
    from diffusers.models.transformers import transformer_flux2

    model, kwargs = models["flux2"], _inputs("flux2", batch=3)
    budgets = [[0.25], [2, 0.75], [1.0]]
    originals = dict(model.attn_processors)
    user = (type("UserDouble", (transformer_flux2.Flux2AttnProcessor,), {}),
            type("UserSingle", (transformer_flux2.Flux2ParallelSelfAttnProcessor,), {}))
    own = (transformer_flux2.Flux2AttnProcessor, transformer_flux2.Flux2ParallelSelfAttnProcessor)
    classes = own if later == "diffusers' processors" else user
    forwards = []
    handle = model.x_embedder.register_forward_pre_hook(lambda mod, args: forwards.append(args[0].shape[0]))
    try:
        sparsectx.enable(model, budget=budgets, selector=norm_selector, attention="native")
        expected = _run(model, kwargs)
        sparsectx.enable(model, budget=budgets, selector=norm_selector, attention="sparsectx")
        torch.testing.assert_close(_run(model, kwargs), expected, rtol=0, atol=FP32_ATOL)
        forwards.clear()
        model.set_attn_processor({name: classes["single" in name]() for name in originals})
        if later == "diffusers' processors":  # the same inputs: the plan is reused, and runs packed
            got = _run(model, kwargs)
            assert forwards == [1]
            assert all(isinstance(p, processors.SPARSECTX_PROCESSORS) for p in model.attn_processors.values())
        else:
            with pytest.warns(RuntimeWarning, match="can not replace them"):
                got = _run(model, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].clone()})
            assert forwards == [1, 1, 1]  # one forward per sample
        torch.testing.assert_close(got, expected, rtol=0, atol=FP32_ATOL)
    finally:
        handle.remove()
        sparsectx.disable(model)
        model.set_attn_processor(originals)


def _same_references(kwargs):
    """The pipelines' batch: every sample carries the same reference latents."""
    hidden = kwargs["hidden_states"].clone()
    hidden[:, _n_target():] = hidden[:1, _n_target():]
    return {**kwargs, "hidden_states": hidden}


def test_kontext_layout_keeps_budget_tokens(models):
    """FLUX.1 Kontext ids (2-D, reference plane 1); shared references: one selection, the batch runs once."""
    model, kwargs = models["flux"], _same_references(_inputs("flux"))
    seen = []
    handle = model.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        sparsectx.enable(model, budget=4, selector=random_selector, seed=0)
        _run(model, kwargs)
    finally:
        handle.remove()
    assert seen == [_n_target() + 4]


# ----------------------------------------------------------------------------------------------------------------
# selection: per image budgets, caching, overrides
# ----------------------------------------------------------------------------------------------------------------
def test_budget_counts_per_image_and_request():
    lengths = [9, 8]
    assert integration.budget_counts(0.5, 2, lengths) == [[5, 4], [5, 4]]  # round half up, per image
    assert integration.budget_counts([3, 1.0], 1, lengths) == [[3, 8]]
    assert integration.budget_counts(20, 1, lengths) == [[9, 8]]  # counts above an image's size keep it whole
    assert integration.budget_counts([[0.25], [2, 3]], 4, lengths) == [[2, 2], [2, 2], [2, 3], [2, 3]]
    # the README's rule: floor(ratio * n + 0.5) in floating point (0.29 * 50 = 14.499999999999998)
    assert integration.budget_counts(0.29, 1, [50]) == [[14]] and integration.budget_counts(0.3, 1, [45]) == [[14]]


def test_keep_mask_of_an_empty_batch_is_empty():
    """No sample: a [0, N] mask, for images of one length or of several (the batched top-k raised IndexError on
    the latter, its counts arriving as a 1-d tensor)."""
    for lengths in ([4, 4], [5, 3]):
        keep = integration.keep_mask_from_scores(torch.zeros(0, 8), [], lengths)
        assert keep.shape == (0, 8) and keep.dtype == torch.bool


def test_keep_mask_is_top_k_per_image():
    g = torch.Generator().manual_seed(3)
    lengths = [9, 8]
    scores = torch.randint(0, 4, (2, 17), generator=g).float()  # many ties: lower index wins
    counts = [[2, 5], [9, 0]]
    keep = integration.keep_mask_from_scores(scores, counts, lengths)
    for i, (lo, hi) in enumerate(((0, 9), (9, 17))):
        expected = topk_keep_mask(scores[:, lo:hi], [c[i] for c in counts])
        assert torch.equal(keep[:, lo:hi], expected)


def test_selection_is_cached_per_call(models):
    model, kwargs = models["flux2"], _inputs("flux2")
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting, seed=0)
    _run(model, kwargs)
    _run(model, {**kwargs, "timestep": torch.full((2,), 0.3)})  # next step: same references
    assert len(calls) == 1
    _run(model, {**kwargs, "hidden_states": torch.randn_like(kwargs["hidden_states"])})  # other references
    assert len(calls) == 2
    model._sparsectx_patch.new_call()  # what a new pipeline call does
    _run(model, kwargs)
    assert len(calls) == 3
    ids = kwargs["img_ids"].clone()
    ids[:, -1, 1] += 1  # same shapes and references, other positions: the layout is found and selected again
    _run(model, {**kwargs, "img_ids": ids})
    # (a new plan on ids of a seen shape selects on the layout found before reading them; they differ: that
    # selection is dropped and the call selects on its own layout)
    assert len(calls) == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_later_steps_read_the_host_once(models, family):
    """The first step finds the layout and selects (host reads); a later step of the same call reuses that plan and
    reads the host once (the check that its references and ids are the plan's), beyond what the model reads."""
    model, kwargs = models[family], _same_references(_inputs(family))
    with count_host_reads() as plain:
        _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    with count_host_reads() as first:
        out_first = _run(model, kwargs)
    with count_host_reads() as later:
        out_later = _run(model, {**kwargs, "timestep": kwargs["timestep"] * 0.5})
    assert later.count == plain.count + 1, later.ops
    assert first.count > later.count
    assert torch.equal(_run(model, kwargs), out_first)  # the reused plan keeps the same tokens
    assert not torch.equal(out_later, out_first)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_nan_check_of_a_selectors_scores_is_read_with_the_keep_mask(models, family):
    """Under fixed budgets the first step reads the selector's NaN check together with the keep mask: scores cost
    no host read more than a keep mask does (one more before, its own ``isnan().any()``)."""
    model, kwargs = models[family], _same_references(_inputs(family))
    mask_selector = lambda latents, context: norm_selector(latents, context) > 0  # noqa: E731  (every token)
    device_data = [model, *(t for t in kwargs.values() if isinstance(t, torch.Tensor))]
    reads = {}
    for name, selector in (("scores", norm_selector), ("mask", mask_selector)):
        sparsectx.enable(model, budget=0.5, selector=selector)
        with count_host_reads(device_data) as first:  # (reads of the model's data: the host work is not counted)
            _run(model, kwargs)
        reads[name] = first.count
        integration.disable(model)
    assert reads["scores"] == reads["mask"], reads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["ratio", "count", "per-image", "per-request", "adaptive"])
def test_a_selector_returning_nan_is_refused_by_name_before_the_model_runs(models, family, budget):
    """NaN scores from a selector are refused with a ``ValueError`` naming it, under every kind of budget (fixed
    ones read the check with the keep mask, an adaptive one in its read of the scores' range), before any block
    runs; the next call with sane scores runs."""
    model, kwargs = models[family], _same_references(_inputs(family))
    per_image = [0.5, 0.25, 0.75][:len(_ref_hws(family))]
    budget = {"ratio": 0.5, "count": 2, "per-image": per_image, "per-request": [per_image, per_image[::-1]],
              "adaptive": sparsectx.selection.adaptive(0.9)}[budget]
    partly_nan = lambda latents, context: norm_selector(latents, context).index_fill(1, torch.tensor([1]), math.nan)  # noqa: E731,E501
    blocks = []
    handle = model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: blocks.append(1))
    try:
        sparsectx.enable(model, budget=budget, selector=partly_nan)
        with pytest.raises(ValueError, match="selector '<lambda>' returned NaN scores"):
            _run(model, kwargs)
        assert not blocks
        sparsectx.enable(model, budget=budget, selector=norm_selector)
        _run(model, kwargs)
        assert blocks
    finally:
        handle.remove()


def _counting_layouts(monkeypatch, family) -> list:
    """Records each call whose layout is found (for FLUX, a host read of its ids)."""
    found, real = [], integration._LAYOUTS[family]

    def counting(call):
        found.append(call["hidden_states"].shape)
        return real(call)

    monkeypatch.setitem(integration._LAYOUTS, family, counting)
    return found


def _fresh_output(model, kwargs, **settings):
    """The output of ``model`` enabled anew (no layout seen before) on ``kwargs``."""
    integration.disable(model)
    sparsectx.enable(model, **settings)
    return _run(model, kwargs)


@pytest.mark.parametrize("family", ["flux2", "flux"])
def test_a_new_call_on_ids_seen_before_selects_before_reading_them(models, family, monkeypatch):
    """A new call (new references) on the ids of an earlier call selects on the layout found then: its ids are not
    read before the selection, their check is read with the keep mask (one read fewer than the first call), and it
    keeps the tokens a model enabled anew keeps."""
    model, kwargs = models[family], _inputs(family)
    settings = dict(budget=0.5, selector=norm_selector)
    later = {**kwargs, "hidden_states": torch.randn_like(kwargs["hidden_states"])}
    found = _counting_layouts(monkeypatch, family)
    sparsectx.enable(model, **settings)
    patch = getattr(model, integration.PATCH_ATTR)
    device_data = [model, *(t for t in (*kwargs.values(), later["hidden_states"]) if isinstance(t, torch.Tensor))]
    with count_host_reads(device_data) as first:
        _run(model, kwargs)
    patch.new_call()
    with count_host_reads(device_data) as second:
        out = _run(model, later)
    assert len(found) == 1
    assert second.count == first.count - 1, (first.ops, second.ops)
    assert torch.equal(out, _fresh_output(model, later, **settings))


@pytest.mark.gpu
def test_a_new_call_on_ids_seen_before_synchronises_less_on_cuda():
    """On CUDA, a new call on ids of a shape seen before synchronises with the host less than the first call (no read
    of its ids before the selection) and keeps the tokens a model enabled anew keeps."""
    model = _build_model("flux2").cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _inputs("flux2").items()}
    later = {**kwargs, "hidden_states": torch.randn_like(kwargs["hidden_states"])}
    settings = dict(budget=0.5, selector=norm_selector)
    outputs = []
    try:
        sparsectx.enable(model, **settings)
        first = count_cuda_syncs(lambda: _run(model, kwargs))
        getattr(model, integration.PATCH_ATTR).new_call()
        second = count_cuda_syncs(lambda: outputs.append(_run(model, later)))
        fresh = _fresh_output(model, later, **settings)
    finally:
        sparsectx.disable(model)
    assert second < first, (first, second)
    assert torch.equal(outputs[0], fresh)


@pytest.mark.parametrize("family", ["flux2", "flux"])
@pytest.mark.parametrize("wrong_layout_raises", [False, True])
def test_a_new_call_on_other_ids_of_a_seen_shape_selects_on_its_own_layout(models, family, monkeypatch,
                                                                            wrong_layout_raises):
    """Ids of the same shape with another layout (target and first reference of swapped sizes): the selection made
    on the earlier layout is dropped once its check is read, or when it raises, and the call selects on its own
    layout, as a model enabled anew does."""
    model, kwargs = models[family], _inputs(family)
    n_axes, hws = (4 if family == "flux2" else 3), _ref_hws(family)
    swapped = [hws[0], TARGET_HW, *hws[1:]]
    ids = torch.cat([_grid_ids(0 if i == 0 else (10 * i if family == "flux2" else 1), hw, n_axes)
                     for i, hw in enumerate(swapped)])
    other = {**kwargs, "img_ids": ids[None].expand(2, -1, -1) if family == "flux2" else ids.float()}
    assert other["img_ids"].shape == kwargs["img_ids"].shape
    other_lengths = [h * w for h, w in swapped[1:]]
    seen = []

    def selector(latents, context):
        seen.append(list(context.ref_lengths))
        if wrong_layout_raises and context.ref_lengths != other_lengths and len(seen) > 1:
            raise ValueError("not this call's layout")
        return latents.norm(dim=-1)

    settings = dict(budget=3, selector=selector)
    found = _counting_layouts(monkeypatch, family)
    sparsectx.enable(model, **settings)
    _run(model, kwargs)
    getattr(model, integration.PATCH_ATTR).new_call()
    out = _run(model, other)
    assert len(found) == 2
    assert seen[1:] == [seen[0], other_lengths] and seen[0] != other_lengths  # the earlier layout's, then its own
    assert torch.equal(out, _fresh_output(model, other, **settings))


def test_an_error_on_the_layout_of_equal_ids_is_raised(models, monkeypatch):
    """A selector's error on a layout found on earlier ids is raised once the ids read equal: it is the call's own
    error (their layout is not found again)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    fail = []

    def selector(latents, context):
        if fail:
            raise ValueError("the selector's own error")
        return latents.norm(dim=-1)

    found = _counting_layouts(monkeypatch, "flux2")
    sparsectx.enable(model, budget=0.5, selector=selector)
    _run(model, kwargs)
    getattr(model, integration.PATCH_ATTR).new_call()
    fail.append(True)
    with pytest.raises(ValueError, match="the selector's own error"):
        _run(model, kwargs)
    assert len(found) == 1


def test_bare_transformer_selects_again_for_a_new_prompt_tensor(models):
    """Outside a pipeline call nothing marks where a call starts: the same prompt tensor reuses the selection, a new
    one (a new call's prompt) selects again, even with the same references."""
    model, kwargs = models["flux2"], _inputs("flux2")
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting, seed=0)
    _run(model, kwargs)
    _run(model, {**kwargs, "timestep": torch.full((2,), 0.3)})
    assert len(calls) == 1
    _run(model, {**kwargs, "encoder_hidden_states": torch.randn_like(kwargs["encoder_hidden_states"])})
    assert len(calls) == 2
    # the plans do not keep a call's prompt or per-call signals alive
    prompt, user_mask = torch.randn_like(kwargs["encoder_hidden_states"]), torch.ones(1, 17, dtype=torch.bool)
    alive = [weakref.ref(prompt), weakref.ref(user_mask)]
    _run(model, {**kwargs, "encoder_hidden_states": prompt,
                 "joint_attention_kwargs": {"sparsectx": {"signals": {"user_mask": user_mask}}}})
    assert len(calls) == 3
    del prompt, user_mask
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


def test_bare_transformer_requests_interleaved_step_by_step_keep_their_selections(models):
    """Requests whose steps interleave on a bare transformer (a server batching step by step; threads with plain
    ``from_pipe`` pipelines) each keep their selection while their prompt tensors live: 2 steps of 6 requests under
    guidance, each branch its own prompt (12 prompts here), select 12 times (before: plans were kept for 4 prompts,
    so each request selected again at every step, and a random selector's kept tokens changed mid-loop). Prompts that
    are gone free their plans; past MAX_PROMPT_PLANS live prompts the least recently used selects again."""
    from sparsectx import integration

    model, kwargs = models["flux2"], _inputs("flux2")
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting)
    try:
        prompts = [torch.randn_like(kwargs["encoder_hidden_states"]) for _ in range(12)]
        keeps = {}
        for step in range(2):
            for i, prompt in enumerate(prompts):
                _run(model, {**kwargs, "encoder_hidden_states": prompt, "timestep": torch.full((2,), 0.9 - step / 4)})
                keeps.setdefault(i, []).append(sparsectx.last_selection(model).keep.clone())
        assert len(calls) == 12
        assert all(torch.equal(first, second) for first, second in keeps.values())
        del prompts, prompt  # gone: their plans are freed at the next new plan
        gc.collect()
        live = [torch.randn_like(kwargs["encoder_hidden_states"])
                for _ in range(integration.MAX_PROMPT_PLANS + 1)]
        _run(model, {**kwargs, "encoder_hidden_states": live[0]})
        assert len(model._sparsectx_patch.plans) == 1
        for prompt in live[1:]:
            _run(model, {**kwargs, "encoder_hidden_states": prompt})
        assert len(model._sparsectx_patch.plans) == integration.MAX_PROMPT_PLANS
        _run(model, {**kwargs, "encoder_hidden_states": live[-1]})  # the most recent: kept
        assert len(calls) == 12 + len(live)
        _run(model, {**kwargs, "encoder_hidden_states": live[0]})  # the least recently used: evicted
        assert len(calls) == 12 + len(live) + 1
    finally:
        sparsectx.disable(model)


def test_bare_transformer_selects_again_for_a_prompt_written_in_place(models):
    """A prompt buffer rewritten in place (a server's preallocated tensor) selects again, as a new tensor does
    (before: the plan was keyed by the tensor alone, and the old prompt's selection was reused); under
    torch.inference_mode, where tensors have no version counter, a tensor budget works (before: RuntimeError)."""
    from sparsectx.selection import fixed_ratio

    model, kwargs = models["flux2"], _inputs("flux2")
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting, seed=0)
    prompt = kwargs["encoder_hidden_states"].clone()
    _run(model, {**kwargs, "encoder_hidden_states": prompt})
    _run(model, {**kwargs, "encoder_hidden_states": prompt})
    assert len(calls) == 1
    prompt.copy_(torch.randn_like(prompt))
    _run(model, {**kwargs, "encoder_hidden_states": prompt})
    assert len(calls) == 2
    with torch.inference_mode():
        budget = fixed_ratio(torch.tensor([0.5, 0.25]))
        sparsectx.enable(model, budget=budget, selector=counting, seed=0)
        _run(model, kwargs)
        _run(model, kwargs)
    assert len(calls) == 3
    sparsectx.disable(model)


@pytest.mark.parametrize("form", ["drop-in", "drop-in, sparsectx attention", "drop training"])
def test_a_disabled_transformer_is_freed_when_deleted(form):
    """After disable, deleting the last reference frees the transformer at once, as for a model never enabled
    (before: the forward sparsectx had installed referred to itself, a cycle holding the model until the garbage
    collector ran: a server's ``del model; torch.cuda.empty_cache()`` kept its weights)."""
    model = _build_model("flux2")
    kwargs = _inputs("flux2")
    if form == "drop training":
        sparsectx.enable_drop_training(model, ratio_range=(0.3, 0.6), generator=torch.Generator().manual_seed(0))
        model.train()
        model(**{**kwargs, "return_dict": False})[0].sum().backward()
        sparsectx.disable_drop_training(model)
    else:
        sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0,
                         attention="sparsectx" if form.endswith("attention") else "native")
        _run(model, kwargs)
        sparsectx.disable(model)
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_an_enabled_copy_holds_nothing_of_the_original_and_pickles_to_the_clear_refusal():
    """A deep copy of an enabled transformer (an EMA model) keeps no reference to the original: the original, disabled
    and deleted, is freed while the copy stays enabled (before: the installed forward's closure held the original's
    bound forward). cloudpickle (Ray, loky) of an enabled transformer gives sparsectx's own refusal (not "cannot
    pickle 'weakref.ReferenceType'")."""
    import copy

    model, kwargs = _build_model("flux2"), _inputs("flux2")
    sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
    sparse = _run(model, kwargs)
    clone = copy.deepcopy(model)
    sparsectx.disable(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert torch.equal(_run(clone, kwargs), sparse)
    cloudpickle = pytest.importorskip("cloudpickle")
    with pytest.raises(TypeError, match="can not be pickled"):
        cloudpickle.dumps(clone)
    sparsectx.disable(clone)


def test_a_forward_that_waited_for_a_sparse_context_block_runs_as_the_block_left_the_model(models):
    """A forward called while another thread's sparse_context block holds a transformer not enabled before it
    waits for the block, which disables the model at its exit: the forward then runs the model's own (it ran the
    removed patch: the block's sparse output)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    dense = _run(model, kwargs)
    with sparsectx.sparse_context(model, budget=0.25, selector="uniform"):
        sparse = _run(model, kwargs)
    assert not torch.allclose(sparse, dense, rtol=0, atol=FP32_ATOL)
    entered, waiting = threading.Event(), threading.Event()

    def block():
        with sparsectx.sparse_context(model, budget=0.25, selector="uniform"):
            entered.set()
            waiting.wait(10)
            time.sleep(0.5)  # (the forward below waits for the transformer meanwhile)

    thread = threading.Thread(target=block)
    thread.start()
    entered.wait(10)
    waiting.set()
    out = _run(model, kwargs)
    thread.join()
    assert not integration.is_enabled(model)
    torch.testing.assert_close(out, dense, rtol=0, atol=FP32_ATOL)


def test_sparse_context_blocks_of_two_threads_on_a_transformer_never_enabled_run_one_after_the_other(models,
                                                                                                  monkeypatch):
    """Two threads' sparse_context blocks on a transformer no patch was made for yet, the second entered while the
    first is setting up (after it read the state to restore, before its enable made a patch): the second waits for
    the first to exit (the transformer's lock outlives its patches; before, no lock existed until the first enable,
    and the blocks overlapped), so each block's call runs its own budget and the model ends disabled."""
    model, kwargs = models["flux2"], _inputs("flux2")
    assert not integration.is_enabled(model)
    expected = {}
    for budget in (2, 6):
        with sparsectx.sparse_context(model, budget=budget, selector="uniform"):
            expected[budget] = _run(model, kwargs)
    assert not torch.allclose(expected[2], expected[6], rtol=0, atol=FP32_ATOL)
    events, outputs = [], {}
    entered = threading.Event()
    restored_state = integration.restored_state

    @contextlib.contextmanager
    def slow_restored_state(target):
        with restored_state(target):
            if threading.current_thread() is thread:
                entered.set()
                time.sleep(0.5)  # (the other thread's block starts meanwhile)
            yield

    monkeypatch.setattr(integration, "restored_state", slow_restored_state)

    def block():
        with sparsectx.sparse_context(model, budget=2, selector="uniform"):
            events.append("first entered")
            time.sleep(0.2)
            outputs[2] = _run(model, kwargs)
            events.append("first exits")

    thread = threading.Thread(target=block)
    thread.start()
    assert entered.wait(10)
    with sparsectx.sparse_context(model, budget=6, selector="uniform"):
        events.append("second entered")
        outputs[6] = _run(model, kwargs)
    thread.join()
    assert events == ["first entered", "first exits", "second entered"]
    for budget in (2, 6):
        torch.testing.assert_close(outputs[budget], expected[budget], rtol=0, atol=0)
    assert not integration.is_enabled(model)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
@pytest.mark.parametrize("held", ["launch locks", "the transformer's lock", "a sparse_context block"])
def test_a_child_forked_while_another_thread_holds_sparsectx_locks(models, held):
    """A process forked while another thread holds sparsectx's locks: the child gets new ones (before: its forward
    waited forever for locks no thread of the child would release). The interpreter's launch lock or the
    autotuner's guard no state: the child's forward runs. The transformer's lock is held through a forward whose
    per-call state (processors' state, Qwen's RoPE hooks) stays half set up in the child: its forward refuses to
    run, saying so (a Qwen-Image child raised IndexError, others could compute wrong). A sparse_context block that
    holds the lock with no call or forward running in it set nothing up: the child's forward runs (it was
    refused)."""
    import signal

    from sparsectx.kernels import _launch, attention as attention_kernels

    model, kwargs = models["flux2"], _inputs("flux2", batch=1)
    sparsectx.enable(model, budget=2, selector=random_selector, seed=0, attention="sparsectx")
    try:
        expected = _run(model, kwargs)
        locks = [_launch._INTERPRETER_LOCK, attention_kernels._TUNER_LOCK]
        patch = getattr(model, integration.PATCH_ATTR)
        if held == "the transformer's lock":
            locks.insert(0, patch.lock)
        holding, release = threading.Event(), threading.Event()

        def hold():
            if held == "a sparse_context block":
                with sparsectx.sparse_context(model, budget=2, selector=random_selector, seed=0, attention="sparsectx"):
                    holding.set()
                    release.wait()
                return
            for lock in locks:
                lock.acquire()
            running = held == "the transformer's lock"  # (held as a forward holds it: running)
            patch.forwards_running += running
            holding.set()
            release.wait()
            patch.forwards_running -= running
            for lock in reversed(locks):
                lock.release()

        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # (fork of a process with threads)
                pid = os.fork()
            if pid == 0:  # the child: its result is its exit status
                code = 3
                try:
                    signal.alarm(120)
                    torch.set_num_threads(1)  # (the parent's OpenMP threads are gone: torch's CPU ops alone)
                    try:
                        # (one thread sums in another order than the parent's: fp32 rounding apart, the same output)
                        code = 0 if torch.allclose(_run(model, kwargs), expected, rtol=0, atol=FP32_ATOL) else 1
                    except RuntimeError as error:
                        code = 4 if "forked while another thread" in str(error) else 5
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
        finally:
            release.set()
            holder.join()
        assert os.waitstatus_to_exitcode(status) == (4 if held == "the transformer's lock" else 0)
    finally:
        sparsectx.disable(model)


@pytest.mark.parametrize("family,argument", [("qwen", "encoder_hidden_states_mask"), ("flux", "pooled_projections")])
def test_bare_transformer_selects_again_for_a_new_prompt_mask_or_pooled_projection(models, family, argument):
    """The prompt's other tensors key the selection as its embedding does (the probe reads them: Qwen's text mask
    says which text tokens vote, FLUX.1's pooled projection modulates the probed block): the same embedding with a
    new one selects again, the same tensors given again reuse the selection."""
    model, kwargs = models[family], _inputs(family)
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting, seed=0)
    _run(model, kwargs)
    _run(model, kwargs)
    assert len(calls) == 1
    _run(model, {**kwargs, argument: kwargs[argument].clone()})
    assert len(calls) == 2


def test_last_selection_follows_the_plan_used_last(models):
    """Two prompts on a bare transformer (e.g. the two guidance branches) keep two plans; last_selection reports
    the one the latest call used."""
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=0.5, selector=random_selector)  # unseeded: each selection differs
    other = {**kwargs, "encoder_hidden_states": torch.randn_like(kwargs["encoder_hidden_states"])}
    _run(model, kwargs)
    first = sparsectx.last_selection(model).keep.clone()
    _run(model, other)
    second = sparsectx.last_selection(model).keep.clone()
    assert not torch.equal(first, second)
    _run(model, kwargs)  # reuses the first plan
    assert torch.equal(sparsectx.last_selection(model).keep, first)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_last_selection_is_none_after_a_call_that_selected_nothing(models, mode):
    """A text-to-image call (no reference rows) on a bare transformer after a call with references, in eval mode or
    as a training forward (a text-to-image sample among edit samples): last_selection says nothing was selected
    instead of reporting the earlier call's selection."""
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=0.5, selector="uniform")
    model.train(mode == "train")
    try:
        _run(model, kwargs)
        assert sparsectx.last_selection(model) is not None
        n_target = _n_target()
        text_to_image = {**kwargs, "hidden_states": kwargs["hidden_states"][:, :n_target],
                         "img_ids": kwargs["img_ids"][:, :n_target],
                         "encoder_hidden_states": torch.randn_like(kwargs["encoder_hidden_states"])}
        _run(model, text_to_image)
        assert sparsectx.last_selection(model) is None
        _run(model, kwargs)  # the first prompt again: its plan and selection (in train mode: a new one)
        assert sparsectx.last_selection(model) is not None
    finally:
        model.eval()


def test_training_step_after_an_inference_mode_pass_on_the_same_inputs(models):
    """A validation pass under torch.inference_mode, then a training step on the same prompt embedding and
    references (a bare transformer reuses its plan for them): the step's backward works and its gradients equal
    those of a model that never ran under inference mode."""
    kwargs = _inputs("flux2")

    def gradients(inference_first: bool):
        model = _build_model("flux2").train()
        sparsectx.enable(model, budget=0.5, selector="uniform")
        if inference_first:
            with torch.inference_mode():
                model(**kwargs)
        model(**kwargs)[0][:, :_n_target()].pow(2).mean().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    expected, got = gradients(False), gradients(True)
    assert got.keys() == expected.keys() and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_fresh_per_call_selectors_and_signals_are_never_mistaken_for_earlier_ones(models):
    """Per-call overrides made anew at each call (a new function, a new mask tensor) select anew, even when an
    earlier override object was freed and its id reused."""
    model, kwargs = models["flux2"], _same_references(_inputs("flux2"))
    n_ref = sum(h * w for h, w in REF_HWS)
    keep_all = lambda latents, context: torch.ones(latents.shape[:2], dtype=torch.bool)  # noqa: E731
    sparsectx.enable(model, budget=None, selector=keep_all)  # the masks as given
    for wanted in ([0, 1, 2], [10, 11], [3, 12], [5, 6, 7]):
        mask = torch.zeros(1, n_ref, dtype=torch.bool)
        mask[:, wanted] = True
        selector = lambda latents, context, mask=mask: mask.expand(latents.shape[0], -1)  # noqa: E731
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"selector": selector}}})
        assert sparsectx.last_selection(model).keep[0].nonzero().flatten().tolist() == wanted
        del selector, mask
    sparsectx.enable(model, budget=[2, 2], selector="edit", seed=0)
    for wanted in ([0, 1, 9, 10], [5, 6, 15, 16], [2, 3, 11, 12]):
        user_mask = torch.zeros(1, n_ref, dtype=torch.bool)
        user_mask[:, wanted] = True
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"signals": {"user_mask": user_mask}}}})
        assert sparsectx.last_selection(model).keep[0].nonzero().flatten().tolist() == wanted
        del user_mask


def test_per_sample_signals_are_honoured_when_references_are_shared(models):
    model, kwargs = models["flux2"], _same_references(_inputs("flux2"))
    wanted = torch.zeros(2, 17, dtype=torch.bool)
    wanted[0, [0, 1, 2, 9, 10]] = True
    wanted[1, [6, 7, 8, 15, 16]] = True
    sparsectx.enable(model, budget=[3, 2], selector="edit", signals={"user_mask": wanted})
    _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep, wanted)
    # the same mask for every sample: one selection for the batch (one group)
    sparsectx.enable(model, budget=[3, 2], selector="edit", signals={"user_mask": wanted[:1].expand(2, -1)})
    _run(model, kwargs)
    plan = model._sparsectx_patch.cache
    assert torch.equal(plan.keep, wanted[:1].expand(2, -1)) and len(plan.groups) == 1


def test_per_call_override_through_attention_kwargs(models):
    model, kwargs = models["flux2"], _same_references(_inputs("flux2"))
    seen = []
    handle = model.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    attn_kwargs = {"sparsectx": {"budget": 2}}
    try:
        sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
        _run(model, {**kwargs, "joint_attention_kwargs": attn_kwargs})
    finally:
        handle.remove()
    assert seen == [_n_target() + 2 * len(REF_HWS)]
    assert attn_kwargs == {"sparsectx": {"budget": 2}}  # the caller's dict is left alone


@pytest.mark.parametrize("override, error, words", [
    (0.1, TypeError, r"must be a dict with keys from \('budget', 'selector', 'signals'\).*got float"),
    ("attention", TypeError, "must be a dict.*got str"),
    ([("budget", 0.1)], TypeError, "must be a dict.*got list"),
    ({"Budget": 0.1}, ValueError, r"accepts \('budget', 'selector', 'signals'\), got unknown keys \['Budget'\]"),
])
def test_per_call_override_that_is_not_the_documented_dict_is_refused(models, override, error, words):
    """attention_kwargs={"sparsectx": 0.1} failed with "'float' object is not iterable", a string with "dictionary
    update sequence element", and a list of pairs was taken silently. The messages name the pipeline's keyword
    (FLUX.2 pipelines take attention_kwargs; the transformer's is joint_attention_kwargs)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    with pytest.raises(error, match=r"^attention_kwargs\['sparsectx'\] \(the transformer's joint_attention_kwargs"
                                    r"\['sparsectx'\]\) " + words):
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": override}})


@pytest.mark.parametrize("user_mask, words", [
    (torch.ones(1, 3, dtype=torch.bool), r"extra\['user_mask'\] must be bool"),
    ("x", r"extra\['user_mask'\] must be bool .* got str"),
    (torch.ones(3, 9 + 8, dtype=torch.bool), r"signal 'user_mask' has shape \(3, 17\)"),
])
def test_a_bad_per_call_signal_is_refused_naming_the_keyword_it_came_through(models, user_mask, words):
    """A per-call signal the selection refuses: the message says it came per call, through which keyword, as a bad
    per-call budget's does (before: only the selector's words, as if enable had been given it)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=0.5, selector="edit")
    with pytest.raises(ValueError, match=r"^attention_kwargs\['sparsectx'\] \(the transformer's joint_attention_kwargs"
                                         r"\['sparsectx'\]\): signals: " + words):
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"signals": {"user_mask": user_mask}}}})


def test_per_call_selector_override_is_cached_across_steps(models):
    model, kwargs = models["flux2"], _inputs("flux2")
    calls, counting = _counting(norm_selector)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    step = {**kwargs, "joint_attention_kwargs": {"sparsectx": {"selector": counting}}}
    _run(model, step)
    _run(model, {**step, "timestep": torch.full((2,), 0.2)})
    assert len(calls) == 1

    class Selector:  # a bound method is a new object at each attribute access: still the same selector
        def select(self, latents, context):
            return counting(latents, context)

    user = Selector()
    for t in (0.5, 0.3):
        _run(model, {**kwargs, "timestep": torch.full((2,), t),
                     "joint_attention_kwargs": {"sparsectx": {"selector": user.select}}})
    assert len(calls) == 2


@pytest.mark.parametrize("change", ["another tensor", "the same tensor changed in place"])
def test_per_call_budgets_that_print_alike_select_anew(models, change):
    """Per-call budgets whose tensor settings differ past the 4 decimals a tensor prints (a plan was keyed by the
    budget's repr: the second call reused the first call's selection, keeping 1 of the 9 tokens of the first
    reference where 0.1667 keeps 2), or whose tensor changed in place, select anew; equal ones reuse the plan."""
    from sparsectx.selection import fixed_ratio

    model, kwargs = models["flux2"], _same_references(_inputs("flux2", batch=1))
    calls, counting = _counting(norm_selector)
    sparsectx.enable(model, budget=0.5, selector=counting)

    def kept(budget) -> list:
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"budget": budget}}})
        return [int(mask.sum()) for mask in sparsectx.last_selection(model).per_image()]

    ratios = torch.tensor([[0.16666, 0.16666]], dtype=torch.float64)  # 9 x 0.16666 = 1.49994: 1 token
    first = fixed_ratio(ratios)
    assert kept(first) == [1, 1] and kept(first) == [1, 1] and len(calls) == 1  # the same budget: one selection
    if change == "another tensor":
        second = fixed_ratio(torch.tensor([[0.16670, 0.16670]], dtype=torch.float64))
        assert repr(second) == repr(first)  # both print 0.1667
    else:
        ratios.fill_(0.16670)
        second = first
    assert kept(second) == [2, 1] and len(calls) == 2  # 9 x 0.1667 = 1.5003: 2 tokens


def test_named_selector_is_deterministic_under_seed(models):
    model, kwargs = models["flux2"], _inputs("flux2")
    masks = []
    for _ in range(2):
        sparsectx.enable(model, budget=0.5, selector="random", seed=7)
        _run(model, kwargs)
        masks.append(model._sparsectx_patch.cache.keep)
        sparsectx.disable(model)
    assert torch.equal(masks[0], masks[1])
    assert masks[0].sum(1).tolist() == [5 + 4] * 2


def test_seeded_random_selection_does_not_depend_on_batch_position(models):
    """Seeded, ``random`` keeps the same tokens for a request alone or at any position of a batch whose samples
    differ (own references, mixed budgets), so a served request is reproducible whatever it is batched with."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=3)
    budgets = [[0.5], [0.25], [0.5]]
    sparsectx.enable(model, budget=budgets, selector="random", seed=7)
    _run(model, kwargs)
    batched = sparsectx.last_selection(model).keep
    assert batched.shape[0] == 3 and not torch.equal(batched[0], batched[1])  # different budgets, one selection
    for i in (2, 1):
        alone = {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 3 else v
                 for k, v in kwargs.items()}
        sparsectx.enable(model, budget=budgets[i], selector="random", seed=7)
        _run(model, alone)
        assert torch.equal(sparsectx.last_selection(model).keep[0], batched[i]), i
    assert torch.equal(batched[0] & batched[1], batched[1])  # the same scores: a smaller budget keeps a subset


def test_selector_mask_is_kept_as_given_without_a_budget_and_sized_by_one(models):
    """A selector's keep mask: as given with budget=None; with a budget, capped or padded to it per image, the same
    keep as ``sparsectx.selection.select`` (one rule for both public paths, no budget silently ignored)."""
    from sparsectx.selection import select

    model, kwargs = models["flux2"], _inputs("flux2")
    wanted = torch.zeros(2, 17, dtype=torch.bool)
    wanted[:, [0, 4, 10]] = True  # image 0 (9 tokens): 0 and 4; image 1 (8 tokens): its second token
    seen = {}

    def mask_selector(latents, context):
        seen["args"] = (latents, context)
        return wanted[:latents.shape[0]]

    sparsectx.enable(model, budget=None, selector=mask_selector)
    _run(model, kwargs)
    assert torch.equal(model._sparsectx_patch.cache.keep, wanted)

    # 0.5: 5 of 9 and 4 of 8 tokens, the mask's first; a count of 1: one of the mask's tokens per image
    for budget, counts in ((0.5, [5, 4]), (1, [1, 1])):
        sparsectx.enable(model, budget=budget, selector=mask_selector)
        _run(model, kwargs)
        keep = model._sparsectx_patch.cache.keep
        assert [int(keep[0, :9].sum()), int(keep[0, 9:].sum())] == counts
        assert torch.equal(keep[0], keep[1])
        covered = keep & wanted
        assert torch.equal(covered, wanted) if budget == 0.5 else torch.equal(keep, covered)
        latents, context = seen["args"]
        assert torch.equal(keep, select(latents, context, mask_selector, budget=budget))
    # per request: the first request's mask padded to half its tokens, the second's capped at one per image
    sparsectx.enable(model, budget=[[0.5], [1]], selector=mask_selector)
    _run(model, kwargs)
    keep = model._sparsectx_patch.cache.keep
    assert keep.sum(dim=1).tolist() == [9, 2] and bool((keep[0] >= wanted[0]).all())
    assert bool((keep[1] <= wanted[1]).all())

    sparsectx.enable(model, budget=None, selector=norm_selector)  # scores need a budget
    with pytest.raises(ValueError, match="budget is required"):
        _run(model, kwargs)


# ----------------------------------------------------------------------------------------------------------------
# API: errors, idempotence, context manager
# ----------------------------------------------------------------------------------------------------------------
def test_unsupported_class_names_supported_ones():
    for bad in (object(), torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="Flux2KleinPipeline.*QwenImageTransformer2DModel"):
            sparsectx.enable(bad)
    # a supported pipeline without its transformer: the message listed its class as supported and said no more
    pipe = diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                        text_encoder=None, tokenizer=None, transformer=None)
    with pytest.raises(TypeError, match="got Flux2KleinPipeline whose transformer is None$"):
        sparsectx.enable(pipe)


@pytest.mark.parametrize("family", ["flux2", "flux", "qwen"])
def test_forward_arguments_bind_as_signature_bind_does(family):
    """The drop-in binds each forward's keywords without Signature.bind (host time per forward): the same names, in
    the signature's order, the same objects, and the same TypeErrors for an unknown or a missing argument."""
    model, kwargs = _build_model(family), _inputs(family, batch=1)
    kind = {"flux2": integration.FLUX2, "flux": integration.FLUX, "qwen": integration.QWEN}[family]
    patch = integration._SparsePatch(model, kind, integration._make_settings(0.25, "random", 0))
    cases = [kwargs, dict(reversed(list(kwargs.items()))), {k: v for k, v in kwargs.items() if k != "return_dict"},
             {**kwargs, "bogus": 1}, {k: v for k, v in kwargs.items() if k != "hidden_states"}, {}]
    for call in cases:
        try:
            expected = list(patch.signature.bind(**call).arguments.items())
        except TypeError as error:
            with pytest.raises(TypeError, match=re.escape(str(error))):
                patch.bind((), call)
            continue
        got = list(patch.bind((), call).items())
        assert [name for name, _ in got] == [name for name, _ in expected]
        assert all(a is b for (_, a), (_, b) in zip(got, expected, strict=True))
    positional = (kwargs["hidden_states"],)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    assert list(patch.bind(positional, rest)) == list(patch.signature.bind(*positional, **rest).arguments)


def test_subclass_forwards_returning_a_bare_tensor_or_renaming_the_layout_arguments():
    """A forward returning the output tensor itself failed at every forward that dropped tokens ('Tensor' object
    has no attribute 'sample'); one taking img_ids under another name ran every token, or trained without drops,
    without a word: refused at enable and enable_drop_training."""
    import diffusers

    class BareFlux2(diffusers.Flux2Transformer2DModel):
        def forward(self, **kwargs):
            return super().forward(**{**kwargs, "return_dict": False})[0]

    class RenamedFlux2(diffusers.Flux2Transformer2DModel):
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, image_ids=None, txt_ids=None,
                    guidance=None, joint_attention_kwargs=None, return_dict=True):
            return super().forward(hidden_states, encoder_hidden_states, timestep, image_ids, txt_ids, guidance,
                                   joint_attention_kwargs, return_dict)

    base, kwargs = _build_model("flux2"), _inputs("flux2")
    bare = BareFlux2.from_config(base.config).eval()
    bare.load_state_dict(base.state_dict())
    with torch.no_grad():
        for model in (base, bare):
            sparsectx.enable(model, budget=0.5, selector="uniform")
        try:
            assert torch.equal(bare(**kwargs), base(**kwargs)[0])
        finally:
            sparsectx.disable(base)
            sparsectx.disable(bare)
    renamed = RenamedFlux2.from_config(base.config)
    with pytest.raises(TypeError, match=r"RenamedFlux2.forward takes no \['img_ids'\]"):
        sparsectx.enable(renamed, budget=0.5)
    with pytest.raises(TypeError, match=r"RenamedFlux2.forward takes no \['img_ids'\]"):
        sparsectx.enable_drop_training(renamed)
    assert not integration.is_enabled(renamed) and not sparsectx.is_drop_training_enabled(renamed)


@pytest.mark.parametrize("family", ["flux2", "qwen"])
@pytest.mark.parametrize("by_keyword", [False, True])
def test_a_subclass_argument_per_sample_follows_its_sample_when_samples_keep_different_tokens(family, by_keyword):
    """A subclass's own per-sample argument (here a bias ``[B, 1, C]``, in its signature or through ``**kwargs``):
    samples keeping different tokens run as groups, or FLUX.2 as one packed sequence, and the argument kept the
    whole batch (a size mismatch inside the model). Its rows now follow their samples (no packing then): each
    sample's output equals that sample run alone."""
    import diffusers

    base_class = {"flux2": diffusers.Flux2Transformer2DModel, "qwen": diffusers.QwenImageTransformer2DModel}[family]
    if by_keyword:
        class Biased(base_class):
            def forward(self, hidden_states, **kwargs):
                return super().forward(hidden_states + kwargs.pop("bias"), **kwargs)
    else:
        class Biased(base_class):
            def forward(self, hidden_states, bias=None, **kwargs):
                return super().forward(hidden_states + bias, **kwargs)

    base = _build_model(family)
    model = Biased.from_config(base.config).eval()
    model.load_state_dict(base.state_dict())
    kwargs = _inputs(family, batch=2)
    kwargs["bias"] = torch.randn(2, 1, kwargs["hidden_states"].shape[-1], generator=torch.Generator().manual_seed(3))
    budgets = [[0.25], [0.75]]
    attention = "sparsectx" if family == "flux2" else "native"  # FLUX.2 with sparsectx's attention: packed before
    try:
        sparsectx.enable(model, budget=budgets, selector=norm_selector, attention=attention)
        together = _run(model, kwargs)
        for b, budget in enumerate(budgets):
            alone = {k: (v[b:b + 1] if isinstance(v, (torch.Tensor, list)) and len(v) == 2 and k != "txt_ids"
                         else v) for k, v in kwargs.items()}
            if "txt_ids" in kwargs:
                alone["txt_ids"] = kwargs["txt_ids"][b:b + 1] if kwargs["txt_ids"].ndim == 3 else kwargs["txt_ids"]
            sparsectx.enable(model, budget=budget, selector=norm_selector, attention=attention)
            torch.testing.assert_close(together[b:b + 1, :_n_target()], _run(model, alone)[:, :_n_target()],
                                       rtol=0, atol=FP32_ATOL)
    finally:
        sparsectx.disable(model)


def test_a_forward_taking_kwargs_runs_and_one_taking_positions_only_is_refused():
    """A transformer subclass whose forward takes **kwargs failed at its first enabled forward (its keywords were
    handed on nested under "kwargs"); one whose forward takes *args can not be called by keyword: refused at enable."""
    import diffusers

    class KeywordsFlux(diffusers.FluxTransformer2DModel):
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs)

    class PositionsFlux(diffusers.FluxTransformer2DModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    base, kwargs = _build_model("flux"), _inputs("flux", batch=1)
    model = KeywordsFlux.from_config(base.config).eval()
    model.load_state_dict(base.state_dict())
    seen = []
    model.x_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        expected = model(**kwargs)[0]
        sparsectx.enable(model, budget=1.0)
        assert torch.equal(model(**kwargs)[0], expected)
        sparsectx.enable(model, budget=0.5, selector="uniform")
        try:
            model(**kwargs)
        finally:
            sparsectx.disable(model)
    assert seen[-1] < seen[0]  # the kept reference tokens only
    positions = PositionsFlux.from_config(base.config)
    with pytest.raises(TypeError, match=r"PositionsFlux.forward takes \['args'\] by position only"):
        sparsectx.enable(positions, budget=0.5)
    assert not integration.is_enabled(positions)


@pytest.mark.parametrize("old", ["0.38.0", "0.35.2", "0.9.1"])
def test_older_diffusers_is_refused_by_name(models, monkeypatch, old):
    """A diffusers installed below setup.py's floor (e.g. with --no-deps) gets a clear error before anything
    changes, from the drop-in and from drop training (0.38 would silently hand the probe no text mask)."""
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", old)
    for enable in (sparsectx.enable, sparsectx.enable_drop_training):
        with pytest.raises(ImportError, match=f"diffusers >= 0.39, found {old}"):
            enable(models["qwen"])
    assert not integration.is_enabled(models["qwen"])
    for current in ("0.39.0", "0.40.0.dev0", "0.42.7"):
        monkeypatch.setattr(diffusers, "__version__", current)
        with warnings_as_errors():
            sparsectx.enable(models["qwen"], budget=0.5, selector=random_selector)
        sparsectx.disable(models["qwen"])


def test_a_diffusers_newer_than_tested_is_warned_about_once(models, monkeypatch):
    """A newer release runs, with one warning per version (from enable; drop training's own checks do not repeat
    it) that the processors follow the tested releases' code."""
    import diffusers

    integration._warn_untested_diffusers.cache_clear()
    for newer in ("0.43.0", "1.0.0"):
        monkeypatch.setattr(diffusers, "__version__", newer)
        for enable, disable in ((sparsectx.enable, sparsectx.disable),
                                (sparsectx.enable_drop_training, sparsectx.disable_drop_training)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                enable(models["qwen"])
            disable(models["qwen"])
            said = [str(w.message) for w in caught if f"diffusers {newer} is newer than the releases" in str(w.message)]
            assert len(said) == (enable is sparsectx.enable), said


def test_numpy_budgets_count_as_their_kind(models):
    """numpy integers are token counts and numpy floats ratios, as Python's; numpy bools are refused."""
    import numpy as np

    model, kwargs = models["flux2"], _inputs("flux2")
    per_request = [[np.float16(0.5)], [np.int32(4)]]
    for python, numpy_budget in ((0.5, np.float32(0.5)), (3, np.int64(3)), ([[0.5], [4]], per_request)):
        sparsectx.enable(model, budget=python, selector=random_selector, seed=0)
        expected, kept = _run(model, kwargs), sparsectx.last_selection(model).keep
        sparsectx.enable(model, budget=numpy_budget, selector=random_selector, seed=0)
        assert torch.equal(_run(model, kwargs), expected) and torch.equal(sparsectx.last_selection(model).keep, kept)
    with pytest.raises(TypeError, match="budget entries"):
        sparsectx.enable(model, budget=np.bool_(True))


@pytest.mark.parametrize("budget, error", [(-0.5, ValueError), (1.5, ValueError), (-1, ValueError),
                                           ([[0.5], 0.5], ValueError), ([], ValueError),
                                           (True, TypeError), ("half", TypeError), ([0.5, "x"], TypeError)])
def test_bad_budget_raises(models, budget, error):
    """A wrong value is a ValueError, an entry that is not a number a TypeError (as in compact_tokens), each naming
    the budget, before anything is enabled."""
    with pytest.raises(error, match="budget"):
        sparsectx.enable(models["flux2"], budget=budget, selector=random_selector)
    assert not integration.is_enabled(models["flux2"])


def test_a_ratio_of_zero_budget_drops_the_images_as_a_count_of_zero(models):
    """Budget ratios lie in [0, 1], as in compact_tokens and fixed_ratio: 0.0 keeps no reference token, the same
    output as the count 0 (0.0 was refused while 0 and fixed_ratio(0.0) were taken)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    outputs = []
    for budget in (0.0, 0, [0.0, 0]):
        sparsectx.enable(model, budget=budget, selector=random_selector, seed=0)
        outputs.append(_run(model, kwargs))
        assert not sparsectx.last_selection(model).keep.any()
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


@pytest.mark.parametrize("selector, error", [("no-such-selector", ValueError), (3, TypeError)])
def test_bad_selector_raises(models, selector, error):
    with pytest.raises(error, match="selector"):
        sparsectx.enable(models["flux2"], budget=0.5, selector=selector)


@pytest.mark.parametrize("selector", ["random", "uniform", "edit", "subject", "attention"])
def test_no_budget_with_a_scoring_selector_is_refused_at_once(models, selector):
    """budget=None keeps a selector's mask as given; the built-in selectors return scores, so enable (and a per-call
    override) refuse it before any call instead of failing at the first step."""
    model, kwargs = models["flux2"], _inputs("flux2")
    with pytest.raises(ValueError, match=f"budget=None.*selector '{selector}' returns scores"):
        sparsectx.enable(model, budget=None, selector=selector)
    assert not integration.is_enabled(model)
    sparsectx.enable(model, budget=0.5, selector=selector)
    with pytest.raises(ValueError, match=f"budget=None.*selector '{selector}' returns scores"):
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"budget": None}}})


def test_misspelt_signal_names_of_a_built_in_selector_are_refused(models):
    """A built-in selector reads known signal names: another name (a typo of user_mask) would be ignored and the
    selection silently made without it, so enable and the per-call override refuse it; a user callable's signals
    are its own business."""
    model, kwargs = models["flux2"], _inputs("flux2")
    mask = torch.ones(1, 17, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"selector 'edit' reads no signal named \['usr_mask'\]"):
        sparsectx.enable(model, budget=4, selector="edit", signals={"usr_mask": mask})
    assert not integration.is_enabled(model)
    sparsectx.enable(model, budget=4, selector="edit", signals={"user_mask": mask})
    with pytest.raises(ValueError, match="reads no signal named"):
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"signals": {"usermask": mask}}}})
    sparsectx.enable(model, budget=4, selector=norm_selector, signals={"anything": mask})  # a user callable


def test_signals_the_chosen_built_in_does_not_read_are_warned_about(models):
    """Every built-in selector accepts every built-in signal name (one set of signals serves a selector switched
    per call), but a signal the chosen one does not read is unused: a user_mask given with the default 'random'
    selector (where 'edit' was meant) kept other tokens than the mask's, silently. enable and the per-call
    override now warn, naming the selectors that read it; signals the selector reads raise no warning."""
    model, kwargs = models["flux2"], _inputs("flux2")
    mask = torch.ones(1, 17, dtype=torch.bool)
    for selector in ("random", "uniform", "subject", "attention"):
        with pytest.warns(UserWarning, match=rf"selector '{selector}' does not read the signals \['user_mask'\] "
                                             r"it was given: they are unused \(the selectors that read them: "
                                             r"\['edit'\]\)"):
            sparsectx.enable(model, budget=4, selector=selector, signals={"user_mask": mask})
    with pytest.warns(UserWarning, match=r"selector 'uniform' does not read the signals \['ref_keys'\].*"
                                         r"\['attention', 'edit', 'subject'\]"):
        sparsectx.enable(model, budget=4, selector="uniform", signals={"ref_keys": mask})
    with warnings_as_errors():
        sparsectx.enable(model, budget=4, selector=norm_selector, signals={"anything": mask})  # a user callable
        sparsectx.enable(model, budget=4, selector="edit", signals={"user_mask": mask})
    with pytest.warns(UserWarning, match="selector 'random' does not read the signals"):
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"selector": "random"}}})


def test_ref_shapes_on_a_model_with_reference_ids_is_warned_about(models):
    """FLUX.1 / FLUX.2 selectors read each reference's grid from the ids: signals={"ref_shapes": ...} (the grid of
    a model without ids) was accepted and ignored without a word, even a wrong one; Qwen-Image reads it."""
    model, kwargs = models["flux2"], _inputs("flux2")
    for shapes in ([(3, 3), (2, 4)], [(7, 7)]):
        with pytest.warns(UserWarning, match=r"signals\['ref_shapes'\] is unused on FLUX.1 / FLUX.2"):
            sparsectx.enable(model, budget=4, selector="uniform", signals={"ref_shapes": shapes})
    # a selector of the user's may read it: not warned
    from sparsectx.selection import Selector

    reads_ref_shapes = Selector(lambda latents, context: torch.zeros(latents.shape[:2]), "reads_ref_shapes",
                                signals=frozenset({"ref_shapes"}))
    with warnings_as_errors():
        sparsectx.enable(model, budget=4, selector=reads_ref_shapes, signals={"ref_shapes": [(7, 7)]})
        sparsectx.enable(model, budget=4, selector=lambda latents, context: torch.zeros(latents.shape[:2]),
                         signals={"ref_shapes": [(7, 7)]})
    sparsectx.enable(model, budget=4, selector="uniform")
    try:
        step = {**kwargs, "joint_attention_kwargs": {"sparsectx": {"signals": {"ref_shapes": [(7, 7)]}}}}
        with pytest.warns(UserWarning, match=r"signals\['ref_shapes'\] is unused"):
            _run(model, step)
        with warnings_as_errors():  # once per enabled transformer
            _run(model, step)
    finally:
        sparsectx.disable(model)
    # enable's ref_shapes, given for a user's selector, warned about once a call switches to a built-in
    sparsectx.enable(model, budget=4, selector=reads_ref_shapes, signals={"ref_shapes": [(7, 7)]})
    try:
        with pytest.warns(UserWarning, match=r"signals\['ref_shapes'\] is unused"):
            _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"selector": "uniform"}}})
    finally:
        sparsectx.disable(model)


def test_warnings_point_at_the_users_line(models):
    """A warning names the user's line whichever path noticed it (enable, a sparse_context block, a per-call override
    through the patched forward): before, a fixed stacklevel named sparsectx's or torch's lines on the last two."""
    model, kwargs = models["flux2"], _inputs("flux2")
    signals = {"user_mask": torch.ones(1, 17, dtype=torch.bool)}
    with pytest.warns(UserWarning, match="does not read the signals") as enabled:
        sparsectx.enable(model, budget=4, selector="random", signals=signals)
    with pytest.warns(UserWarning, match="does not read the signals") as in_context:
        with sparsectx.sparse_context(model, budget=4, selector="uniform", signals=signals):
            pass
    with pytest.warns(UserWarning, match="does not read the signals") as per_call:
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"selector": "random"}}})
    for record in (enabled, in_context, per_call):
        assert [w.filename for w in record] == [__file__], [(w.filename, w.lineno) for w in record]
    with warnings_as_errors():  # a per-call override is checked at every forward, and warned about once
        _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"selector": "random"}}})
    sparsectx.disable(model)


@pytest.mark.parametrize("seed, error", [(2 ** 70, ValueError), (-2 ** 64, ValueError), (1.0, TypeError),
                                         ("1", TypeError)])
def test_bad_seed_raises(models, seed, error):
    with pytest.raises(error, match="seed"):
        sparsectx.enable(models["flux2"], budget=0.5, selector="random", seed=seed)
    assert not integration.is_enabled(models["flux2"])


def test_numpy_seed_is_accepted(models):
    np = pytest.importorskip("numpy")
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=0.5, selector="random", seed=np.int64(7))
    _run(model, kwargs)
    kept = sparsectx.last_selection(model).keep
    sparsectx.enable(model, budget=0.5, selector="random", seed=7)
    _run(model, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].clone()})
    assert torch.equal(sparsectx.last_selection(model).keep, kept)


def test_budget_list_must_match_references(models):
    sparsectx.enable(models["flux2"], budget=[0.5, 0.5, 0.5], selector=random_selector, seed=0)
    with pytest.raises(ValueError, match="3 entries.*2 reference images"):
        _run(models["flux2"], _inputs("flux2"))


@pytest.mark.parametrize("hook_first", [True, False], ids=["hook_then_enable", "enable_then_hook"])
def test_accelerate_hooks_around_enable(models, hook_first):
    """accelerate's module hooks (what enable_model_cpu_offload installs), added before or after enable: the hook
    runs at every call, sparsectx compacts, and disable gives the hooked original back, bit-exact; removing the hook
    then leaves the unpatched model."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    model, kwargs = models["flux2"], _inputs("flux2")
    expected = _run(model, kwargs)
    calls = []

    class Counting(accelerate_hooks.ModelHook):
        def pre_forward(self, module, *args, **kw):
            calls.append(kw["hidden_states"].shape[1])
            return args, kw

    seq = kwargs["hidden_states"].shape[1]
    try:
        if hook_first:
            accelerate_hooks.add_hook_to_module(model, Counting())
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        if not hook_first:
            accelerate_hooks.add_hook_to_module(model, Counting())
        sparse = _run(model, kwargs)
        assert getattr(model, integration.PATCH_ATTR).cache.keep.sum(1).tolist() == [4, 4]  # 2 per reference image
        assert not torch.equal(sparse[:, :_n_target()], expected[:, :_n_target()])
        sparsectx.disable(model)
        assert not integration.is_enabled(model)
        assert torch.equal(_run(model, kwargs), expected)
        # the hook is above the patch in either order (sparsectx goes beneath a hook that was there first, where
        # the pipeline's maybe_free_model_hooks keeps it): it sees the full input, once per call
        assert calls == [seq, seq]
    finally:
        accelerate_hooks.remove_hook_from_module(model)
    assert torch.equal(_run(model, kwargs), expected)


def _plain_and_sparse(model, kwargs) -> tuple:
    """The model's output, and its output enabled with ``budget=2`` and the seeded random selector (then disabled)."""
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
    sparse = _run(model, kwargs)
    sparsectx.disable(model)
    return expected, sparse


def _counting_hook(calls: list):
    """A diffusers ModelHook recording the length of each call's hidden_states in ``calls``."""
    from diffusers.hooks import ModelHook

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kw):
            calls.append(kw["hidden_states"].shape[1])
            return args, kw

    return Counting()


def test_diffusers_hook_registered_after_enable(models):
    """A diffusers ModelHook (HookRegistry: group offloading, caches) registered on the transformer after enable:
    disable unhooks sparsectx beneath it; the hook keeps running, and removing it gives the model back."""
    from diffusers.hooks import HookRegistry

    model, kwargs = models["flux2"], _inputs("flux2")
    expected = _run(model, kwargs)
    calls = []

    registry = HookRegistry.check_if_exists_or_initialize(model)
    try:
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        registry.register_hook(_counting_hook(calls), "counting")
        sparse = _run(model, kwargs)
        assert not torch.equal(sparse[:, :_n_target()], expected[:, :_n_target()])
        sparsectx.disable(model)
        assert torch.equal(_run(model, kwargs), expected)
        assert calls == [kwargs["hidden_states"].shape[1]] * 2
    finally:
        registry.remove_hook("counting")
    assert torch.equal(_run(model, kwargs), expected)


@pytest.mark.parametrize("replaces_forward", [False, True], ids=["pre_forward hook", "new_forward hook"])
def test_diffusers_hook_registered_before_enable_and_removed_after(models, replaces_forward):
    """A diffusers hook on the transformer itself registered before enable (block-level group offloading, a root
    cache hook) and removed after it (disable_cache; diffusers' LoRA loading and unloading remove and re-apply
    group offloading): sparsectx goes beneath the innermost hook, so the removal keeps it and a re-applied hook
    wraps it (before: remove_hook wrote the forward it had wrapped over the patch: every token ran while
    is_enabled said True, and disable raised). Disable gives the model back, also once the hooks are gone."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, kwargs = models["flux2"], _inputs("flux2")
    n_tokens = kwargs["hidden_states"].shape[1]
    expected, sparse = _plain_and_sparse(model, kwargs)
    assert not torch.equal(sparse, expected)
    calls = []

    class Replacing(ModelHook):  # (a hook with new_forward: diffusers keeps the inner forward as original_forward)
        def new_forward(self, module, *args, **kw):
            calls.append(kw["hidden_states"].shape[1])
            return self.fn_ref.original_forward(*args, **kw)

    registry = HookRegistry.check_if_exists_or_initialize(model)
    hook = Replacing if replaces_forward else functools.partial(_counting_hook, calls)
    registry.register_hook(hook(), "root_hook")
    try:
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        assert torch.equal(_run(model, kwargs), sparse)
        registry.remove_hook("root_hook")
        assert integration.is_enabled(model) and torch.equal(_run(model, kwargs), sparse)
        registry.register_hook(hook(), "root_hook")  # re-applied
        assert torch.equal(_run(model, kwargs), sparse)
        sparsectx.disable(model)
        assert torch.equal(_run(model, kwargs), expected)
        assert calls == [n_tokens] * 3  # the hook ran outside sparsectx, on the whole call
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        registry.remove_hook("root_hook")
        sparsectx.disable(model)  # enabled beneath a hook removed since: the model's own forward comes back
        assert "forward" not in model.__dict__ and torch.equal(_run(model, kwargs), expected)
    finally:
        registry.remove_hook("root_hook")
        sparsectx.disable(model)


@pytest.mark.parametrize("user_forward", [False, True], ids=["model's forward", "a user's instance forward"])
def test_diffusers_hook_then_accelerate_hook_before_enable(models, user_forward):
    """A diffusers hook on the transformer, then accelerate's over it (enable_model_cpu_offload after group
    offloading or a cache), then enable: sparsectx goes beneath the diffusers hook, the innermost one (before: in
    accelerate's _old_forward, over the diffusers hook, which then ran on the compacted call; once both hooks were
    removed every token ran, and disable raised). Also when the diffusers hook wraps a user's instance forward (it
    went over it then)."""
    from accelerate.hooks import ModelHook as AccelerateHook, add_hook_to_module, remove_hook_from_module
    from diffusers.hooks import HookRegistry

    model, kwargs = models["flux2"], _inputs("flux2")
    n_tokens = kwargs["hidden_states"].shape[1]
    expected, sparse = _plain_and_sparse(model, kwargs)
    calls = []
    if user_forward:
        own = model.forward
        model.forward = functools.wraps(own)(lambda *args, **kw: own(*args, **kw))
        user_wrapper = model.forward

    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_counting_hook(calls), "root_hook")
    add_hook_to_module(model, AccelerateHook())
    try:
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        assert torch.equal(_run(model, kwargs), sparse) and calls == [n_tokens]  # the hook saw the whole call
        remove_hook_from_module(model)
        registry.remove_hook("root_hook")
        assert integration.is_enabled(model) and torch.equal(_run(model, kwargs), sparse)
        sparsectx.disable(model)
        assert model.__dict__.get("forward") is (user_wrapper if user_forward else None)
        assert torch.equal(_run(model, kwargs), expected)
    finally:
        if hasattr(model, "_hf_hook"):
            remove_hook_from_module(model)
        registry.remove_hook("root_hook")
        sparsectx.disable(model)
        model.__dict__.pop("forward", None)


def test_diffusers_and_accelerate_hooks_added_after_enable_and_removed(models):
    """Enable, then a diffusers hook and accelerate's over it; diffusers' remove_hook writes the forward it wrapped
    (sparsectx's) over accelerate's wrapper, and accelerate's removal puts the removed diffusers hook's wrapper
    back: disable still finds sparsectx there and gives the model back (before: RuntimeError, "wrapped again ...
    by something other than an accelerate or diffusers hook")."""
    from accelerate.hooks import ModelHook as AccelerateHook, add_hook_to_module, remove_hook_from_module
    from diffusers.hooks import HookRegistry

    model, kwargs = models["flux2"], _inputs("flux2")
    expected, sparse = _plain_and_sparse(model, kwargs)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    try:
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        registry.register_hook(_counting_hook([]), "root_hook")
        add_hook_to_module(model, AccelerateHook())
        registry.remove_hook("root_hook")
        remove_hook_from_module(model)
        assert integration.is_enabled(model) and torch.equal(_run(model, kwargs), sparse)
        sparsectx.disable(model)
        assert not integration.is_enabled(model) and torch.equal(_run(model, kwargs), expected)
    finally:
        if hasattr(model, "_hf_hook"):
            remove_hook_from_module(model)
        registry.remove_hook("root_hook")
        sparsectx.disable(model)
        model.__dict__.pop("forward", None)  # (the removed diffusers hook's wrapper, as without sparsectx)


@pytest.mark.parametrize("form", ["drop-in", "drop training"])
def test_enable_beneath_a_hook_chain_diffusers_broke_before(models, form):
    """diffusers' remove_hook of a hook beneath one with new_forward (group offloading removed and re-applied under
    a FasterCache denoiser hook by load_lora_weights) leaves the upper hook skipped and its original_forward called
    by nothing: enable goes into the forward that does run (before: into original_forward, so is_enabled said True
    while every token ran, and drop training drew no mask)."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, kwargs = models["flux2"], _inputs("flux2")
    expected, sparse = _plain_and_sparse(model, kwargs)

    class Replacing(ModelHook):
        def new_forward(self, module, *args, **kw):
            return self.fn_ref.original_forward(*args, **kw)

    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(ModelHook(), "x")
    registry.register_hook(Replacing(), "z")
    registry.remove_hook("x")
    generator = torch.Generator().manual_seed(0)
    try:
        if form == "drop-in":
            sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
            assert torch.equal(_run(model, kwargs), sparse)
            sparsectx.disable(model)
        else:
            sparsectx.enable_drop_training(model, ratio_range=(0.3, 0.6), generator=generator)
            model.train()
            before = generator.get_state()
            _run(model, kwargs)
            assert not torch.equal(generator.get_state(), before)  # a mask was drawn
            assert not sparsectx.last_drop_mask(model).all()
            sparsectx.disable_drop_training(model)
            model.eval()
        assert torch.equal(_run(model, kwargs), expected)
    finally:
        model.eval()
        registry.remove_hook("z")
        sparsectx.disable(model)
        sparsectx.disable_drop_training(model)
        model.__dict__.pop("forward", None)


def test_disable_beneath_a_hook_chain_diffusers_left_broken(models):
    """diffusers' remove_hook of a hook that is not the last, followed by one with new_forward, leaves that hook
    calling the removed hook's wrapper, and so sparsectx's forward beneath it: disable still succeeds, and that
    forward, left behind, runs the forward it replaced (before: disable raised, or a later call raised
    AttributeError), as the same chain does without sparsectx."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, kwargs = models["flux2"], _inputs("flux2")
    expected = _run(model, kwargs)

    class Replacing(ModelHook):
        def new_forward(self, module, *args, **kw):
            return self.fn_ref.original_forward(*args, **kw)

    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(ModelHook(), "x")
    try:
        sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
        registry.register_hook(ModelHook(), "y")
        registry.register_hook(Replacing(), "z")
        registry.remove_hook("x")
        registry.remove_hook("y")
        sparsectx.disable(model)
        assert not integration.is_enabled(model) and torch.equal(_run(model, kwargs), expected)
        registry.remove_hook("z")
        assert torch.equal(_run(model, kwargs), expected)
    finally:
        for name in ("x", "y", "z"):
            registry.remove_hook(name)
        sparsectx.disable(model)
        model.__dict__.pop("forward", None)  # (what diffusers' broken chain may leave there)


def test_last_drop_mask_is_a_copy_the_recomputation_does_not_read():
    """``last_drop_mask`` gave the forward's own mask, which a gradient-checkpointed block recomputed during backward
    reads again: changed in place before backward (building a loss weight, say), the gradients were computed with
    another mask (0.64 relative difference measured). It is a copy now: the gradients do not depend on it."""
    model, kwargs, n = _build_model("flux2"), _inputs("flux2"), _n_target()
    model.enable_gradient_checkpointing()
    model.train()

    def step(change_the_mask):
        sparsectx.enable_drop_training(model, ratio_range=(0.2, 0.6), generator=torch.Generator().manual_seed(1))
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)[0]
        mask = sparsectx.last_drop_mask(model)
        assert not mask.all()  # (tokens were dropped)
        if change_the_mask:
            mask.fill_(True)
        out[:, :n].square().sum().backward()
        sparsectx.disable_drop_training(model)
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    try:
        untouched, changed = step(False), step(True)
    finally:
        model.eval()
        sparsectx.disable_drop_training(model)
    assert untouched.keys() == changed.keys() and untouched
    for name, grad in untouched.items():
        torch.testing.assert_close(changed[name], grad, rtol=0, atol=0, msg=name)


def test_drop_training_beneath_a_diffusers_hook_removed_after(models):
    """Drop training enabled under a diffusers hook on the transformer (group offloading) keeps drawing masks after
    diffusers removes the hook (delete_adapters re-applying group offloading; before: it was silently dropped,
    last_drop_mask still gave the previous mask, and disable_drop_training raised)."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, kwargs = models["flux2"], _inputs("flux2")
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(ModelHook(), "root_hook")
    generator = torch.Generator().manual_seed(0)
    try:
        sparsectx.enable_drop_training(model, ratio_range=(0.3, 0.6), generator=generator)
        model.train()
        registry.remove_hook("root_hook")
        before = generator.get_state()
        _run(model, kwargs)
        assert not torch.equal(generator.get_state(), before)  # a mask was drawn
        assert not sparsectx.last_drop_mask(model).all()
        sparsectx.disable_drop_training(model)
        assert "forward" not in model.__dict__
    finally:
        model.eval()
        registry.remove_hook("root_hook")
        sparsectx.disable_drop_training(model)


def test_enable_on_a_compiled_transformer(models):
    """torch.compile(transformer) (an OptimizedModule): enable patches the module inside; the compiled call gives
    the eager sparse result, and disable the original one."""
    model, kwargs = models["flux2"], _inputs("flux2")
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
    eager_sparse = _run(model, kwargs)
    sparsectx.disable(model)
    compiled = torch.compile(model, backend="eager")
    sparsectx.enable(compiled, budget=2, selector=random_selector, seed=0)
    assert integration.is_enabled(model) and integration.is_enabled(compiled)
    torch.testing.assert_close(_run(compiled, kwargs), eager_sparse, rtol=0, atol=FP32_ATOL)
    sparsectx.disable(compiled)
    assert not integration.is_enabled(model)
    torch.testing.assert_close(_run(compiled, kwargs), expected, rtol=0, atol=FP32_ATOL)


def test_whole_model_fullgraph_compile_says_to_compile_the_blocks(models):
    """torch.compile(transformer, fullgraph=True) can not trace the per-call selection (host decisions): the error
    names the ways that work (before: dynamo's "Encountered torch.is_inference_mode_enabled during tracing");
    compile_repeated_blocks(fullgraph=True) gives the eager sparse result."""
    model, kwargs = _build_model("flux2"), _inputs("flux2")
    sparsectx.enable(model, budget=2, selector=random_selector, seed=0)
    eager_sparse = _run(model, kwargs)
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError, match=r"compile_repeated_blocks\(fullgraph=True\)\) or compile without"):
            _run(torch.compile(model, backend="eager", fullgraph=True), kwargs)
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        torch.testing.assert_close(_run(model, kwargs), eager_sparse, rtol=0, atol=FP32_ATOL)
    finally:
        torch._dynamo.reset()


def test_a_compiled_model_serves_new_compositions_of_groups_without_recompiling_each():
    """Whole-model torch.compile, requests keeping different tokens (per-request budgets: exact groups): dynamo
    compiled the frame looping over the groups and guarded the plan's structure (group count, samples per group),
    so each new composition of a batch recompiled the model and, past the recompile limit (8), ran eagerly; the
    host-work wrapper of the selection recompiled at each new argument too. Each group's forward is compiled on its
    own now: 18 batches of 2-4 requests give the eager results with a few frames."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _build_model("flux2")
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    requests = [[[1], [2]], [[1], [3]], [[1], [2], [2]], [[1], [1], [2]], [[2], [1], [3]], [[1], [2], [3]],
                [[1], [2], [2], [2]], [[1], [1], [2], [2]], [[1], [1], [1], [2]], [[2], [2], [3], [3]],
                [[4], [2]], [[1], [5]], [[3], [3], [1], [1]], [[1], [2], [3], [4]], [[2], [2], [2], [1]],
                [[5], [1], [1], [1]], [[1], [6], [6]], [[2], [7], [2], [7]]]
    cases = []
    for i, budget in enumerate(requests):
        kwargs = _inputs("flux2", batch=len(budget), seed=i)
        kwargs["joint_attention_kwargs"] = {"sparsectx": {"budget": budget}}
        cases.append((kwargs, _run(model, kwargs)))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    try:
        for kwargs, expected in cases:
            torch.testing.assert_close(_run(compiled, kwargs), expected, rtol=0, atol=FP32_ATOL)
        # 3 frames on torch 2.13 (each group's forward; new samples per group made the batch dim dynamic); before,
        # one whole-model frame per new composition: 7 here, then the recompile limit
        assert counter.frame_count <= 4, counter.frame_count
        # neither the loop's frame nor the selection's host-work wrapper (shared by every such function) was compiled
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        for function in (integration._SparsePatch._run_plan, integration._SparsePatch._plan):
            assert _debug_get_cache_entry_list(function.__code__) == [], function
    finally:
        sparsectx.disable(model)
        torch._dynamo.reset()


def test_compiled_blocks_serve_new_packings_without_recompiling_each():
    """FLUX.2 with sparsectx attention packs samples keeping different tokens into one sequence; compiled blocks
    (compile_repeated_blocks(fullgraph=True)) read the packing's counts. Held as Python ints, dynamo guarded each as
    a constant: every new packing recompiled both blocks, and the 9th failed the call (FailOnRecompileLimitHit).
    Read as tensor sizes, they become symbols after one recompile: 9 packings (8 kept counts, then another batch
    size) give the eager results, the kept counts past the second without a new frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _build_model("flux2")
    cases = [(_inputs("flux2", batch=2, seed=k), [[1], [k]]) for k in range(1, 9)]
    cases.append((_inputs("flux2", batch=3, seed=9), [[1], [2], [8]]))
    for kwargs, budget in cases:
        kwargs["joint_attention_kwargs"] = {"sparsectx": {"budget": budget}}
    sparsectx.enable(model, budget=0.5, selector=norm_selector, attention="sparsectx")
    eager = [_run(model, kwargs) for kwargs, _ in cases]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    try:
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
        frames = []
        for (kwargs, _), expected in zip(cases, eager):
            torch.testing.assert_close(_run(model, kwargs), expected, rtol=0, atol=FP32_ATOL)
            frames.append(counter.frame_count)
        # after the second kept count no batch of 2 compiles a frame (the batch of 3, a new text length, may)
        assert frames[1:8] == [frames[1]] * 7 and frames[-1] <= 2 * frames[1], frames
    finally:
        sparsectx.disable(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_probe_runs_the_first_block_eagerly_under_compiled_blocks(family):
    """compile_repeated_blocks(fullgraph=True) with a probe selector: the probe's stopped forward runs the first
    block eagerly (before: dynamo traced the probe processor's host work on the layout inside the compiled block and
    refused it, "Data dependent operator aten.equal"; FLUX.1 hit its recompile limit on the probe's full-length
    shapes). The result equals the eager sparse one and the block stays compiled for the steps."""
    model, kwargs = _build_model(family), _inputs(family)
    if not model._repeated_blocks:
        pytest.skip(f"{type(model).__name__} names no repeated blocks in this diffusers release")
    sparsectx.enable(model, budget=2, selector="attention")
    eager_sparse = _run(model, kwargs)
    sparsectx.disable(model)
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = model.transformer_blocks[0]._compiled_call_impl
        assert compiled is not None
        sparsectx.enable(model, budget=2, selector="attention")
        torch.testing.assert_close(_run(model, kwargs), eager_sparse, rtol=0, atol=FP32_ATOL)
        assert model.transformer_blocks[0]._compiled_call_impl is compiled
    finally:
        sparsectx.disable(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["flux2", "flux"])
def test_a_pos_embed_forward_other_than_the_tested_one_is_kept(family, monkeypatch):
    """The drop-in computes FLUX's RoPE tables with its copy of diffusers' pos_embed on every forward, also when it
    keeps every token: a diffusers release (or a patch) whose forward computes them otherwise (here: the angles in
    float32, a position scale) changed the outputs of a keep-all call silently. The copy is now checked against the
    module's forward once per module: on a mismatch the module's own forward is kept, with a warning."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    def in_float32(self, ids):
        pos = ids.float()
        tables = [get_1d_rotary_pos_embed(self.axes_dim[i], pos[..., i], theta=self.theta, repeat_interleave_real=True,
                                          use_real=True, freqs_dtype=torch.float32) for i in range(pos.shape[-1])]
        return tuple(torch.cat(parts, -1) for parts in zip(*tables))

    original = type(_build_model(family).pos_embed).forward
    for forward in (in_float32, lambda self, ids: original(self, ids * getattr(self, "pos_scale", 1.0))):
        monkeypatch.setattr(type(_build_model(family).pos_embed), "forward", forward)
        model, kwargs = _build_model(family), _inputs(family)
        model.pos_embed.pos_scale = 0.5
        expected = _run(model, kwargs)
        with pytest.warns(RuntimeWarning, match="computes other RoPE tables than sparsectx's copy of it"):
            sparsectx.enable(model, budget=1.0)
            got = _run(model, kwargs)
        sparsectx.disable(model)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["flux2", "flux"])
def test_the_rope_shortcut_check_runs_on_the_cpu_under_a_default_device(family):
    """The check made its ids on torch's default device: under ``with torch.device("meta")`` it failed, warned that
    the tables differ and kept the shortcut off for the module (on a GPU default device: device work and a read)."""
    model = _build_model(family)
    with warnings_as_errors():
        with torch.device("meta"):
            assert processors._tables_match(model.pos_embed)


def test_the_rope_shortcut_is_off_for_a_module_giving_the_same_values_in_another_dtype():
    """A pos_embed whose forward gives the shortcut's values in float64 (torch.equal promotes: the values compare
    equal) keeps its own forward, with a warning: the tables' dtype would change the model's rotation."""
    class Float64PosEmbed(diffusers.models.transformers.transformer_flux.FluxPosEmbed):
        def forward(self, ids):
            return tuple(t.double() for t in super().forward(ids))

    with pytest.warns(RuntimeWarning, match="other RoPE tables"):
        assert not processors._tables_match(Float64PosEmbed(theta=10000, axes_dim=[4, 6, 6]))


@pytest.mark.parametrize("family", ["flux2", "flux"])
def test_torch_func_grad_runs_through_an_enabled_flux_model(family):
    """torch.func.grad over an enabled FLUX model (every token kept) raised from the drop-in's RoPE tables, which
    refuse torch.func's tensors; the module's own forward serves them now: the gradients of the unpatched model."""
    from torch.func import functional_call, grad

    model, kwargs = _build_model(family), _inputs(family)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (), kwargs)[0].square().mean()

    expected = grad(loss)(params)
    sparsectx.enable(model, budget=1.0)
    try:
        with warnings_as_errors():  # (the shortcut's check waits for an eager forward: no false alarm)
            got = grad(loss)(params)
        _run(model, kwargs)  # an eager forward: the shortcut checked and in use, then torch.func again
        assert processors._tables_match(model.pos_embed)
        got_after = grad(loss)(params)
    finally:
        sparsectx.disable(model)
    for name in expected:
        assert torch.equal(got[name], expected[name]) and torch.equal(got_after[name], expected[name]), name


@pytest.mark.parametrize("family", ["flux2", "flux", "longcat", "fibo"])
def test_later_steps_reuse_the_kept_image_rows_rope_tables(family, monkeypatch):
    """A step that reuses the plan passes the kept image rows' ids made at its first step, and FLUX.2's image RoPE
    table made then (FLUX.1, LongCat and FIBO join text and image ids inside their forward: a new table every step, in
    ``flux_rope_tables``' few ops): the same output, bit for bit, as the first step and as the forward with
    diffusers' own ``pos_embed``. A step with gradients after inference-mode steps remakes the tables (inference
    tensors can not be saved for a backward); a new selection makes new ones."""
    from sparsectx import processors

    model, kwargs = _build_model(family), _inputs(family)
    assert processors._tables_match(model.pos_embed)  # (its one check of the shortcut, made before the count)
    made = []
    real = processors.flux_rope_tables
    monkeypatch.setattr(processors, "flux_rope_tables", lambda module, ids: made.append(len(ids)) or real(module, ids))
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    n_text = TEXT_TOKENS
    with torch.inference_mode():
        first = _run(model, kwargs)
        first_made, made[:] = list(made), []
        later = _run(model, kwargs)
    assert torch.equal(later, first)
    assert first_made and all(n > n_text for n in first_made if family != "flux2")
    if family == "flux2":  # per group: the image table once, the text table every step
        assert sorted(first_made) == sorted(made + [n for n in first_made if n != n_text]), (first_made, made)
        assert made and set(made) == {n_text}
    else:
        assert made == first_made
    made.clear()
    hidden = kwargs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**kwargs, "hidden_states": hidden})[0][:, :_n_target()]
    out.sum().backward()
    assert torch.equal(out.detach(), first[:, :_n_target()]) and hidden.grad is not None
    assert sorted(made) == sorted(first_made)
    monkeypatch.setattr(model.pos_embed, "_forward_hooks", {0: lambda module, args, output: None})  # diffusers' own
    made.clear()
    with torch.inference_mode():
        assert torch.equal(_run(model, kwargs), first)
    assert made == []
    monkeypatch.undo()


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_sparse_forward_does_not_trace_the_selection(family):
    """torch.compile (without fullgraph) of an enabled transformer: the per-call host work (layout, selection,
    groups) runs eagerly beside the compiled model instead of being split into graphs (before: 21 graphs on FLUX,
    17 on Qwen-Image, against 1 for the model); the result equals eager."""
    model, kwargs = _build_model(family), _inputs(family)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    eager = _run(model, kwargs)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(**kwargs)
        compiled = _run(torch.compile(model, backend="eager"), kwargs)
    finally:
        torch._dynamo.reset()
    # FLUX: the model's graph and the patch's compaction; Qwen-Image: also its pos_embed hooks, set per forward
    assert explained.graph_count <= 2 + 2 * (family == "qwen")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selector", ["attention", "subject"])
def test_a_compiled_transformer_probes_and_selects_as_eager(family, selector):
    """torch.compile (without fullgraph) of a transformer enabled with a selector that reads the automatic probe:
    the probe's stopped forward and the selection run beside the compiled model and keep what eager keeps, and the
    output equals eager's (untested before: the compile tests used a random selector)."""
    model, kwargs = _build_model(family), _inputs(family)
    sparsectx.enable(model, budget=0.5, selector=selector)
    eager = _run(model, kwargs)
    eager_keep = sparsectx.last_selection(model).keep
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        out = _run(compiled, kwargs)
        keep = sparsectx.last_selection(model).keep
    finally:
        torch._dynamo.reset()
    assert torch.equal(keep, eager_keep) and not bool(keep.all())
    torch.testing.assert_close(out, eager, rtol=0, atol=FP32_ATOL)


def test_last_selection_reports_the_kept_tokens(models):
    model, kwargs = models["flux2"], _same_references(_inputs("flux2"))
    sparsectx.enable(model, budget=[2, 0.5], selector=random_selector, seed=0)
    assert sparsectx.last_selection(model) is None  # nothing selected yet
    _run(model, kwargs)
    selection = sparsectx.last_selection(model)
    lengths = [h * w for h, w in REF_HWS]
    assert selection.ref_lengths == lengths
    assert [part.sum(1).tolist() for part in selection.per_image()] == [[2, 2], [4, 4]]  # 2 tokens, half of 8
    assert torch.equal(selection.ref_positions, torch.arange(_n_target(), _n_target() + sum(lengths)))
    # copies: edited in place by the caller, the next report (and the selection the model runs) is unchanged
    out, keep, positions = _run(model, kwargs), selection.keep.clone(), selection.ref_positions.clone()
    selection.keep.logical_not_()
    selection.ref_positions.zero_()
    again = sparsectx.last_selection(model)
    assert torch.equal(again.keep, keep) and torch.equal(again.ref_positions, positions)
    torch.testing.assert_close(_run(model, kwargs), out, rtol=0, atol=0)
    sparsectx.disable(model)
    assert sparsectx.last_selection(model) is None


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_deep_copy_of_an_enabled_transformer_runs_its_own_weights(models, attention):
    """copy.deepcopy of an enabled transformer (e.g. an EMA model): the copy runs its own weights through its own
    patch, and each can be disabled on its own; pickling (torch.save of the module) asks to disable first."""
    import copy
    import pickle

    model, kwargs = models["flux2"], _inputs("flux2")
    plain = _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0, attention=attention)
    expected = _run(model, kwargs)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_run(clone, kwargs), expected, rtol=0, atol=0)
    with torch.no_grad():
        for parameter in clone.proj_out.parameters():
            parameter.zero_()
    assert _run(clone, kwargs).abs().max() == 0 and torch.equal(_run(model, kwargs), expected)
    with pytest.raises(TypeError, match="sparsectx.disable"):
        pickle.dumps(model)
    sparsectx.disable(clone)
    assert integration.is_enabled(model) and not integration.is_enabled(clone)
    assert torch.equal(_run(model, kwargs), expected)
    sparsectx.disable(model)
    assert torch.equal(_run(model, kwargs), plain)
    pickle.dumps(model)  # a disabled transformer pickles as usual


def test_enable_twice_is_idempotent(models):
    model, kwargs = models["flux2"], _inputs("flux2")
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    once = _run(model, kwargs)
    forward = model.forward
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    assert model.forward is forward
    assert torch.equal(_run(model, kwargs), once)
    sparsectx.disable(model)
    assert torch.equal(_run(model, kwargs), expected)


def test_sparse_context_manager(models):
    model = models["qwen"]
    with sparsectx.sparse_context(model, budget=0.25, selector=random_selector, seed=0):
        assert model._sparsectx_patch.settings.budget == 0.25
        with sparsectx.sparse_context(model, budget=0.5, selector=random_selector):
            assert model._sparsectx_patch.settings.budget == 0.5
        assert model._sparsectx_patch.settings.budget == 0.25
    assert not integration.is_enabled(model)


def test_sparse_context_exit_after_disable_inside_the_block(models):
    """disable() inside a context whose transformer was enabled before it: on exit the settings enabled before come
    back (before, the exit raised AttributeError); without an enable before it, the model stays disabled."""
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=0.25, selector="uniform", attention="sparsectx")
    expected = _run(model, kwargs)
    settings = model._sparsectx_patch.settings
    with sparsectx.sparse_context(model, budget=0.5, selector="random"):
        sparsectx.disable(model)
    assert model._sparsectx_patch.settings is settings and model._sparsectx_patch.attention == "sparsectx"
    torch.testing.assert_close(_run(model, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] + 0}),
                               expected, rtol=0, atol=0)
    sparsectx.disable(model)
    with sparsectx.sparse_context(model, budget=0.5):
        sparsectx.disable(model)
    assert not integration.is_enabled(model)


def test_failed_enable_keeps_the_previous_settings(models):
    """Switching to sparsectx attention fails on a processor sparsectx can not replace: nothing changes."""
    model = models["flux2"]
    sparsectx.enable(model, budget=0.25, selector=random_selector, seed=0)
    attn = model.single_transformer_blocks[0].attn
    original = attn.processor
    attn.set_processor(lambda *args, **kwargs: original(*args, **kwargs))  # e.g. a user's wrapper
    try:
        with pytest.raises(TypeError, match="can not replace"):
            with sparsectx.sparse_context(model, budget=0.9, attention="sparsectx"):
                pass
        with pytest.raises(TypeError, match="can not replace"):
            sparsectx.enable(model, budget=0.9, attention="sparsectx")
        settings = model._sparsectx_patch.settings
        assert (settings.budget, settings.seed, model._sparsectx_patch.attention) == (0.25, 0, "native")
    finally:
        attn.set_processor(original)


def test_qwen_targets_only_img_shapes_run_unchanged(models):
    """The flat ``img_shapes=[(1, h, w)] * B`` of Qwen-Image's ControlNet pipelines: no reference, plain forward."""
    model = diffusers.QwenImageTransformer2DModel(  # a text-to-image model (no zero_cond_t)
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6)).eval()
    kwargs = _inputs("qwen")
    n_target = _n_target()
    kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"][:, :n_target],
              "img_shapes": [(1, *TARGET_HW)] * 2}
    expected = _run(model, kwargs)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    try:
        assert torch.equal(_run(model, kwargs), expected)
    finally:
        sparsectx.disable(model)


def test_qwen_image_layered_is_rejected():
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), use_layer3d_rope=True)
    with pytest.raises(TypeError, match="Qwen-Image-Layered"):
        sparsectx.enable(model, budget=0.5)
    assert not integration.is_enabled(model)
    # drop training too (before: accepted, it took target layers 1..N for references and dropped their tokens)
    with pytest.raises(TypeError, match="Qwen-Image-Layered"):
        sparsectx.enable_drop_training(model)
    assert not sparsectx.is_drop_training_enabled(model)


def test_parallelism_is_rejected_by_its_name(models):
    """diffusers records tensor parallelism in _parallel_config too: the refusal said "context parallelism" for it."""
    from diffusers.models._modeling_parallel import ParallelConfig

    model = models["flux2"]
    for config, words in ((ParallelConfig(context_parallel_config=object()), "context parallelism"),
                          (ParallelConfig(tensor_parallel_config=object()), "tensor parallelism"),
                          (object(), "parallelism")):
        model._parallel_config = config
        try:
            with pytest.raises(RuntimeError, match=f"does not support diffusers {words} "):
                sparsectx.enable(model, budget=0.5, selector=random_selector)
        finally:
            model._parallel_config = None


# ----------------------------------------------------------------------------------------------------------------
# whole pipelines (FLUX.2 klein, klein + reference KV cache): tiny VAE, prompt_embeds instead of a text encoder
# ----------------------------------------------------------------------------------------------------------------
IMAGE_PX = 64  # the Flux2 image processor's minimum side; with a 3-level VAE and 2x2 patches: 16 px per token
REF_SIZES = ((IMAGE_PX, IMAGE_PX), (2 * IMAGE_PX, IMAGE_PX))  # (width, height): 16 and 32 reference tokens


def _tiny_pipeline(cls):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=2, norm_num_groups=4, sample_size=IMAGE_PX, mid_block_add_attention=False).eval()
    return cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
               transformer=_build_model("flux2"))


def _reference_images():
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    return [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in REF_SIZES]


def _count_tokens(transformer):
    seen = []
    return seen, transformer.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))


def _klein_call(steps=2, **extra):
    """A tiny klein pipeline call: the references, a random prompt and classifier-free guidance, latent output."""
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    return dict(image=_reference_images(), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                guidance_scale=2.0, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=steps,
                output_type="latent", **extra)


def test_klein_pipeline_call_sends_target_plus_kept_tokens():
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    selections, counting = _counting(random_selector)

    call = _klein_call(num_images_per_prompt=2)
    sparsectx.enable(pipe, budget=0.25, selector=counting, seed=0)
    seen, handle = _count_tokens(pipe.transformer)
    try:
        pipe(**call)
        pipe(**call)
    finally:
        handle.remove()
    n_target = (IMAGE_PX // 16) ** 2
    kept = 4 + 8  # 25% of 16 and of 32 reference tokens
    assert seen == [n_target + kept] * 8  # 2 calls x 2 steps x (cond + uncond)
    # one selection per pipeline call, shared by the batch of 2 images
    assert [shape[:2] for shape in selections] == [(1, 48)] * 2
    sparsectx.disable(pipe)
    assert type(pipe) is diffusers.Flux2KleinPipeline and "forward" not in pipe.transformer.__dict__


def test_a_signal_given_per_request_serves_each_requests_images():
    """Two prompts x num_images_per_prompt=2 (a batch of 4): a user_mask with one row per request is repeated over
    each request's images, as a per-request budget is (it was refused: only 1 or the batch size), and gives the
    selection the same mask given per sample does."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    embeds = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[0, [0, 1, 2, 3, 16, 17, 18, 19]] = True
    mask[1, [4, 6, 8, 10, 30, 31, 40, 41]] = True
    call = dict(image=_reference_images(), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                guidance_scale=2.0, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=1, output_type="latent",
                num_images_per_prompt=2)
    keeps = []
    for user_mask in (mask, mask.repeat_interleave(2, dim=0)):
        sparsectx.enable(pipe, budget=[4, 4], selector="edit", signals={"user_mask": user_mask})
        try:
            pipe(**call)
            keeps.append(sparsectx.last_selection(pipe).keep.clone())
        finally:
            sparsectx.disable(pipe)
    assert torch.equal(keeps[0], mask.repeat_interleave(2, dim=0)), keeps[0]
    assert torch.equal(keeps[0], keeps[1])
    sparsectx.enable(pipe, budget=[4, 4], selector="edit", signals={"user_mask": mask[[0, 1, 1]]})
    try:  # 3 rows divide no batch of 4: refused, naming the shapes it takes
        with pytest.raises(ValueError, match=r"'user_mask' has shape \(3, 48\).*a number of requests dividing it"):
            pipe(**call)
    finally:
        sparsectx.disable(pipe)


def test_klein_pipeline_calls_on_references_in_another_order(monkeypatch):
    """Pipeline calls on the same enabled klein pipeline: the references in another order (ids of the first call's
    shape, another layout) select on their own layout, and the same references again reuse the layout found before
    (its ids are not read first): each call's output equals that of a pipeline enabled anew for it."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(7))
    images = _reference_images()
    settings = dict(budget=0.25, selector=norm_selector)

    def call(refs):
        return pipe(image=refs, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                    guidance_scale=2.0, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(3)).images

    def fresh(refs):
        sparsectx.disable(pipe)
        sparsectx.enable(pipe, **settings)
        return call(refs)

    orders = [images, images[::-1], images[::-1]]
    found = _counting_layouts(monkeypatch, "flux2")
    try:
        sparsectx.enable(pipe, **settings)
        outputs = [call(refs) for refs in orders]
        assert len(found) == 2  # the first call's and the second's (other ids): the third reuses the second's
        expected = [fresh(refs) for refs in orders]
    finally:
        sparsectx.disable(pipe)
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)
    assert not torch.equal(outputs[0], outputs[1])


def test_klein_pipeline_call_with_an_adaptive_budget():
    """A whole pipeline call with budget=adaptive(0.5): an image whose scores put all their mass on one token keeps
    that token, an image with flat scores keeps half of its tokens."""
    from sparsectx.selection import adaptive

    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)

    def peaked_then_flat(latents, context):
        first, second = context.ref_lengths
        scores = torch.ones(latents.shape[:2], device=latents.device)
        scores[:, :first] = 0.0
        scores[:, 3] = 1.0  # image 1: all its mass on its token 3
        return scores

    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    sparsectx.enable(pipe, budget=adaptive(0.5), selector=peaked_then_flat)
    seen, handle = _count_tokens(pipe.transformer)
    try:
        pipe(image=_reference_images(), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
             guidance_scale=2.0, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=2, output_type="latent")
        keep = sparsectx.last_selection(pipe).keep[0]
    finally:
        handle.remove()
        sparsectx.disable(pipe)
    n_target = (IMAGE_PX // 16) ** 2
    assert seen == [n_target + 1 + 16] * 4  # 2 steps x (cond + uncond); references of 16 and 32 tokens
    assert keep[:16].nonzero().flatten().tolist() == [3] and int(keep[16:].sum()) == 16


@pytest.mark.parametrize("pipeline, attention", [("Flux2KleinPipeline", "native"),
                                                 ("Flux2KleinKVPipeline", "sparsectx")])
def test_klein_pipelines_keep_all_equals_unpatched_and_disable_is_bit_exact(pipeline, attention):
    """Issue 5's headline pipelines at the pipeline level (the transformer-level tests cover the identities; the
    pipeline ones covered Kontext, Qwen, FLUX.2 [dev] and the inpainting variants): every token kept equals the
    unpatched call (classifier-free guidance, 2 images per prompt, references of two sizes; the KV pipeline's
    extract and cached steps), a budget changes it, and ``disable`` gives the unpatched call bit for bit."""
    pipe = _tiny_pipeline(getattr(diffusers, pipeline))
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    guidance = {} if "KV" in pipeline else dict(negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=2.0)

    def call():
        with torch.no_grad():
            return pipe(image=_reference_images(), prompt_embeds=embeds, height=IMAGE_PX, width=IMAGE_PX,
                        num_inference_steps=2, output_type="latent", num_images_per_prompt=2,
                        generator=torch.Generator().manual_seed(0), **guidance).images

    plain = call()
    try:
        sparsectx.enable(pipe, budget=1.0, attention=attention)
        torch.testing.assert_close(call(), plain, rtol=0, atol=FP32_ATOL)
        sparsectx.enable(pipe, budget=0.25, attention=attention, seed=0)
        assert not torch.allclose(call(), plain, rtol=0, atol=FP32_ATOL)
    finally:
        sparsectx.disable(pipe)
    assert torch.equal(call(), plain)


def test_klein_kv_pipeline_caches_kept_tokens_only():
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    caches = []
    original = pipe.transformer.forward

    def record_cache(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("kv_cache_mode") == "extract":
            caches.append(out[1].get_double(0).k_ref.shape)
        return out

    pipe.transformer.forward = record_cache  # under sparsectx's wrapper: sees the compacted call
    sparsectx.enable(pipe, budget=0.25, selector=random_selector, seed=0)
    seen, handle = _count_tokens(pipe.transformer)
    try:
        pipe(image=_reference_images(), prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM), height=IMAGE_PX,
             width=IMAGE_PX, num_inference_steps=3, output_type="latent")
    finally:
        handle.remove()
        sparsectx.disable(pipe)
        del pipe.transformer.forward
    n_target = (IMAGE_PX // 16) ** 2
    assert seen == [n_target + 12, n_target, n_target]  # extract step with the kept references, then cached steps
    assert caches == [(1, 12, HEADS, HEAD_DIM)]


@pytest.mark.parametrize("kv", [False, True], ids=["klein", "klein-kv"])
def test_klein_per_image_generators(kv):
    """FLUX.2 klein called with one generator per image: each image is selected with its own generator's seed (as
    it would be alone), with and without the KV cache (there each image's kept tokens fill a cache of its own)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline if kv else diffusers.Flux2KleinPipeline)
    sparsectx.enable(pipe, budget=0.25, selector="random")

    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    guidance = {} if kv else dict(negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=2.0)

    def call(seeds):
        pipe(image=_reference_images(), prompt_embeds=embeds, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=2,
             output_type="latent", num_images_per_prompt=len(seeds),
             generator=[torch.Generator().manual_seed(s) for s in seeds], **guidance)
        return sparsectx.last_selection(pipe).keep.clone()

    try:
        batched = call([5, 6])
        alone = [call([5])[0], call([6])[0]]
    finally:
        sparsectx.disable(pipe)
    assert batched.shape[0] == 2 and not torch.equal(alone[0], alone[1])
    assert torch.equal(batched[0], alone[0]) and torch.equal(batched[1], alone[1])


@pytest.mark.parametrize("reads_generator", [False, True])
def test_per_image_generators_select_once_with_a_deterministic_selector(reads_generator):
    """With one generator per image, a selector registered as drawing no random numbers still selects once for a
    batch that shares its references (it sees one sample); one that may draw them selects every image."""
    from sparsectx import selection

    seen = []

    def strided(latents, context):
        seen.append(latents.shape[0])
        return torch.arange(latents.shape[1], 0, -1, dtype=torch.float32).expand(latents.shape[0], -1).clone()

    chosen = selection.register_selector("test_strided", strided, returns_scores=True,
                                         reads_generator=reads_generator, overwrite=True)
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    sparsectx.enable(pipe, budget=0.25, selector=chosen)
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    try:
        pipe(image=_reference_images(), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
             guidance_scale=2.0, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=2, output_type="latent",
             num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    finally:
        sparsectx.disable(pipe)
        selection._REGISTRY.pop("test_strided", None)
    assert seen == ([2] if reads_generator else [1])  # one selection per pipeline call, of the batch or one sample


def test_last_selection_after_a_kv_call_on_a_transformer_enabled_alone():
    """A KV pipeline whose transformer alone is enabled (or shared by from_pipe): after the call, last_selection
    reports the extract step's selection (before: None, the cached steps' plan being looked up by a prompt tensor the
    pipeline had freed)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    sparsectx.enable(pipe.transformer, budget=0.25, selector=random_selector, seed=0)
    seen, handle = _count_tokens(pipe.transformer)
    try:
        pipe(image=_reference_images(), prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM), height=IMAGE_PX,
             width=IMAGE_PX, num_inference_steps=3, output_type="latent")
        selection = sparsectx.last_selection(pipe.transformer)
    finally:
        handle.remove()
        sparsectx.disable(pipe.transformer)
    n_target = (IMAGE_PX // 16) ** 2
    assert seen == [n_target + 12, n_target, n_target]  # the extract step compacted, then cached steps
    assert selection is not None and selection.keep.sum(dim=1).tolist() == [12]


@pytest.mark.parametrize("second_size", ["same", "other"])
def test_last_selection_follows_each_kv_run_on_one_prompt_tensor(second_size):
    """A transformer enabled alone, driven step by step (a user loop, the bench) through two extract -> cached runs
    on one prompt tensor with other references: after the second run's cached step, last_selection reported the
    first run's selection (the cached step's plan, reused, kept pointing at the first extract plan). The second
    run's references have the first's size or another (two extract plans then live side by side)."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer  # the KV processors are set

    def grid(plane, h, w):
        cells = torch.cartesian_prod(torch.tensor([plane]), torch.arange(h), torch.arange(w))
        return torch.cat([cells, torch.zeros(h * w, 1, dtype=cells.dtype)], 1)

    g = torch.Generator().manual_seed(0)
    target_ids, ref_ids = grid(0, 4, 4)[None], torch.cat([grid(10, 3, 3), grid(20, 2, 4)])[None]
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    txt_ids = torch.zeros(1, TEXT_TOKENS, 4, dtype=torch.long)
    txt_ids[0, :, 3] = torch.arange(TEXT_TOKENS)
    target = torch.randn(1, 16, 8, generator=g)
    sparsectx.enable(transformer, budget=0.25, selector=norm_selector)

    def kv_run(ref_ids):
        refs = torch.randn(1, ref_ids.shape[1], 8, generator=g)
        common = dict(encoder_hidden_states=text, txt_ids=txt_ids, return_dict=False)
        with torch.no_grad():
            _, cache = transformer(hidden_states=torch.cat([refs, target], 1), timestep=torch.tensor([1.0]),
                                   img_ids=torch.cat([ref_ids, target_ids], 1), kv_cache_mode="extract",
                                   num_ref_tokens=refs.shape[1], **common)
            selected = sparsectx.last_selection(transformer).keep.clone()
            transformer(hidden_states=target, timestep=torch.tensor([0.5]), img_ids=target_ids, kv_cache=cache,
                        kv_cache_mode="cached", **common)
        return selected, sparsectx.last_selection(transformer).keep.clone()

    try:
        first, after_first = kv_run(ref_ids)
        second_ids = ref_ids if second_size == "same" else torch.cat([grid(10, 4, 4), grid(20, 2, 4)])[None]
        second, after_second = kv_run(second_ids)
    finally:
        sparsectx.disable(transformer)
    assert not torch.equal(first, second)  # the content selector keeps other tokens of the other references
    assert torch.equal(after_first, first) and torch.equal(after_second, second)


@pytest.mark.parametrize("budget", [0.5, [[0.5], [0.25]]], ids=["one group", "mixed budgets"])
def test_last_selection_of_a_klein_cached_step_on_another_prompt_tensor_is_its_extracts(budget):
    """A cached step attends to the tokens its cache's extract step kept, so that is what last_selection reports
    after it, also when the step runs on another prompt tensor (a user loop re-making its prompt each step): with
    samples that keep different tokens (groups, each its own cache) it reported the extract's selection, with one
    group it reported None (the step counted as a new call that selected nothing)."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer
    common, target, refs, target_ids, ref_ids = _klein_kv_extract_inputs()
    batch = 2 if isinstance(budget, list) else 1
    common = {**common, "encoder_hidden_states": common["encoder_hidden_states"].expand(batch, -1, -1)}
    target, refs = target.expand(batch, -1, -1), torch.randn(batch, *refs.shape[1:])
    with torch.no_grad():
        sparsectx.enable(transformer, budget=budget, selector=random_selector, seed=0)
        try:
            _, cache = transformer(hidden_states=torch.cat([refs, target], 1), timestep=torch.tensor([1.0] * batch),
                                   img_ids=torch.cat([ref_ids, target_ids], 1), kv_cache_mode="extract",
                                   num_ref_tokens=9, **common)
            extracted = sparsectx.last_selection(transformer).keep.clone()
            remade = {**common, "encoder_hidden_states": common["encoder_hidden_states"].clone()}
            transformer(hidden_states=target, timestep=torch.tensor([0.5] * batch), img_ids=target_ids,
                        kv_cache=cache, kv_cache_mode="cached", **remade)
            after = sparsectx.last_selection(transformer)
        finally:
            sparsectx.disable(transformer)
    assert extracted.sum(1).tolist() == ([5] if batch == 1 else [5, 2])
    assert after is not None and torch.equal(after.keep, extracted)


def test_last_selection_of_a_klein_cached_step_on_a_cache_filled_before_enable_is_none():
    """A cached step on a cache of every reference token, filled before enable, attends to every token: equal to
    diffusers' step, and last_selection is None after it (before: the selection of another extract step on the same
    prompt tensors, which filled another cache)."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer
    common, target, refs, target_ids, ref_ids = _klein_kv_extract_inputs()
    extract = dict(hidden_states=torch.cat([refs, target], 1), timestep=torch.tensor([1.0]),
                   img_ids=torch.cat([ref_ids, target_ids], 1), kv_cache_mode="extract", num_ref_tokens=9, **common)
    with torch.no_grad():
        _, full = transformer(**extract)

        def cached(cache):
            return transformer(hidden_states=target, timestep=torch.tensor([0.5]), img_ids=target_ids,
                               kv_cache=cache, kv_cache_mode="cached", **common)[0]

        expected = cached(full)
        sparsectx.enable(transformer, budget=0.25, selector="uniform")
        try:
            _, other = transformer(**extract)
            assert sparsectx.last_selection(transformer).keep.sum().item() < 9
            assert torch.equal(cached(full), expected)
            assert sparsectx.last_selection(transformer) is None
            cached(other)
            assert sparsectx.last_selection(transformer).keep.sum().item() < 9  # (its extract's)
        finally:
            sparsectx.disable(transformer)


def test_klein_disabled_and_enabled_again_inside_a_call_of_requests_keeping_different_tokens_says_what_to_do():
    """A step callback disables and enables again after the extract step of requests keeping different tokens: the
    groups' caches went with the disabled patch, and the pipeline's cache is the first group's alone: a ValueError
    saying to run the extract step again (before: a tensor size error from inside diffusers' attention)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)

    def again(pipeline, step, timestep, kwargs):
        if step == 0:
            sparsectx.disable(pipeline)
            sparsectx.enable(pipeline, budget=[[0.25], [0.75]], selector="uniform")
        return {}

    sparsectx.enable(pipe, budget=[[0.25], [0.75]], selector="uniform")
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="kv_cache holds 1 samples for a batch of 2.*run the "
                                                              "extract step again"):
            pipe(image=_reference_images(), prompt_embeds=torch.randn(2, TEXT_TOKENS, TEXT_DIM), height=IMAGE_PX,
                 width=IMAGE_PX, num_inference_steps=3, output_type="latent", callback_on_step_end=again)
    finally:
        sparsectx.disable(pipe)


def test_a_klein_cached_step_on_a_cache_of_another_batch_that_sparsectx_did_not_fill_is_left_to_diffusers():
    """The message saying a cache is one group's of an extract step (run the extract step again) is given for such a
    cache only: a cache diffusers filled for a batch of 1, read by a step of 2, fails as it does unpatched (before:
    sparsectx's message blamed a grouped extract that never ran)."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer
    common, target, refs, target_ids, ref_ids = _klein_kv_extract_inputs()
    with torch.no_grad():
        _, cache = transformer(hidden_states=torch.cat([refs, target], 1), timestep=torch.tensor([1.0]),
                               img_ids=torch.cat([ref_ids, target_ids], 1), kv_cache_mode="extract",
                               num_ref_tokens=9, **common)
        step = dict(hidden_states=target.expand(2, -1, -1), timestep=torch.tensor([0.5, 0.5]), img_ids=target_ids,
                    kv_cache=cache, kv_cache_mode="cached",
                    **{**common, "encoder_hidden_states": common["encoder_hidden_states"].expand(2, -1, -1)})
        with pytest.raises(RuntimeError) as unpatched:
            transformer(**step)
        sparsectx.enable(transformer, budget=0.25, selector="uniform")
        try:
            with pytest.raises(RuntimeError) as enabled:
                transformer(**step)
        finally:
            sparsectx.disable(transformer)
    assert str(enabled.value) == str(unpatched.value) and "kv_cache holds" not in str(enabled.value)


def _seeded_klein_call(seed=0, **extra):
    """``_klein_call`` with the prompt and the noise from ``seed``: calls that compare their outputs."""
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(100 + seed))
    return dict(image=_reference_images(), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                guidance_scale=2.0, height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **extra)


def test_an_enabled_pipelines_call_holds_its_transformer_also_when_the_transformer_was_disabled():
    """A pipeline of the enabled class whose transformer was disabled (through another pipeline sharing it) runs its
    call dense, holding the transformer: another thread's enable waits for it (before: it landed at step 0, and the
    call said it ran every token while its later steps ran sparse: equal to neither); last_selection(pipe) is None
    after that call (before: an earlier call's selection)."""
    import copy

    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    with torch.no_grad():
        dense = pipe(**_seeded_klein_call()).images
        sparsectx.enable(pipe, budget=2, selector="uniform")
        other = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
        other(**_seeded_klein_call())
        assert sparsectx.last_selection(other) is not None
        sparsectx.disable(pipe.transformer)
        in_step, enabled = threading.Event(), threading.Event()

        def enable_meanwhile():
            in_step.wait(10)
            sparsectx.enable(pipe.transformer, budget=2, selector="uniform")
            enabled.set()

        def callback(pipeline, step, timestep, kwargs):
            if step == 0:
                in_step.set()
                assert not enabled.wait(1.0)  # (the enable waits for this call)
            return kwargs

        thread = threading.Thread(target=enable_meanwhile)
        thread.start()
        try:
            with pytest.warns(RuntimeWarning, match="its transformer no longer is"):
                out = other(**_seeded_klein_call(callback_on_step_end=callback)).images
        finally:
            in_step.set()
            thread.join(30)
        try:
            assert enabled.is_set() and torch.equal(out, dense)
            assert sparsectx.last_selection(other) is None
        finally:
            sparsectx.disable(pipe)


def test_an_enabled_pipelines_call_that_waited_runs_with_the_patch_it_finds_then():
    """A call that waited for another thread's block, inside which the transformer was disabled and enabled again
    (a new patch, the same settings), runs as it runs alone, with its own per-call seed, and last_selection(pipe)
    is its selection (before: it kept the patch it read before waiting, a removed one: the new patch's forwards ran
    as a bare transformer's, another random draw, and last_selection(pipe) was None)."""
    import copy

    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    sparsectx.enable(pipe, budget=2, selector="random")
    other = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    try:
        with torch.no_grad():
            alone = other(**_seeded_klein_call()).images
            kept = sparsectx.last_selection(other).keep.clone()
            other(**_seeded_klein_call(attention_kwargs={"sparsectx": {"budget": 6}}))  # (another selection since)
            holding, result = threading.Event(), {}

            def waiting_call():
                holding.wait(10)
                with torch.no_grad():
                    result["out"] = other(**_seeded_klein_call()).images
                result["selection"] = sparsectx.last_selection(other)

            thread = threading.Thread(target=waiting_call)
            thread.start()
            with sparsectx.sparse_context(pipe.transformer, budget=2, selector="random"):
                holding.set()
                time.sleep(0.5)  # (the call waits for the transformer meanwhile)
                sparsectx.disable(pipe.transformer)
                sparsectx.enable(pipe.transformer, budget=2, selector="random")
            thread.join(60)
        assert torch.equal(result["out"], alone)
        assert result["selection"] is not None and torch.equal(result["selection"].keep, kept)
    finally:
        sparsectx.disable(pipe)


def _klein_kv_extract_inputs():
    """(common arguments but the timestep, target rows [1, 16, 8], reference rows [1, 9, 8], their ids) of a tiny
    FLUX.2 klein call."""
    g = torch.Generator().manual_seed(3)
    cells = torch.cartesian_prod(torch.tensor([0]), torch.arange(4), torch.arange(4))
    target_ids = torch.cat([cells, torch.zeros(16, 1, dtype=cells.dtype)], 1)[None]
    ref_cells = torch.cartesian_prod(torch.tensor([10]), torch.arange(3), torch.arange(3))
    ref_ids = torch.cat([ref_cells, torch.zeros(9, 1, dtype=ref_cells.dtype)], 1)[None]
    txt_ids = torch.zeros(1, TEXT_TOKENS, 4, dtype=torch.long)
    txt_ids[0, :, 3] = torch.arange(TEXT_TOKENS)
    common = dict(encoder_hidden_states=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g), txt_ids=txt_ids,
                  return_dict=False)
    return common, torch.randn(1, 16, 8, generator=g), torch.randn(1, 9, 8, generator=g), target_ids, ref_ids


def test_kv_cached_steps_read_nothing_from_the_device():
    """A KV-cached step holds no reference token: after the extract step (which selects, reading the device), its
    cached steps reuse a plan without the later-step check, so they read the host exactly as the unpatched
    transformer does; the output equals the unpatched cached step on the same cache."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer
    common, target, refs, target_ids, ref_ids = _klein_kv_extract_inputs()

    def cached_step(cache, t):
        return transformer(hidden_states=target, timestep=torch.tensor([t]), img_ids=target_ids, kv_cache=cache,
                           kv_cache_mode="cached", **common)[0]

    with torch.no_grad():
        sparsectx.enable(transformer, budget=0.5, selector=random_selector, seed=0)
        try:
            _, cache = transformer(hidden_states=torch.cat([refs, target], 1), timestep=torch.tensor([1.0]),
                                   img_ids=torch.cat([ref_ids, target_ids], 1), kv_cache_mode="extract",
                                   num_ref_tokens=9, **common)
            outs, reads = [], []
            for t in (0.75, 0.5):
                with count_host_reads() as counted:
                    outs.append(cached_step(cache, t))
                reads.append(counted.count)
        finally:
            sparsectx.disable(transformer)
        with count_host_reads() as plain:
            expected = cached_step(cache, 0.5)
    assert reads == [plain.count, plain.count], (reads, plain.count)
    assert torch.equal(outs[1], expected)
    assert cache.get_double(0).k_ref.shape[1] == 5  # the extract step cached the kept half of the 9 tokens


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_a_kv_extract_step_of_samples_keeping_different_tokens_fills_a_cache_per_group(models, attention):
    """FLUX.2 klein's KV cache with requests of their own budgets: the extract step runs each group of samples into a
    cache of its own (the first group's returned, the handle the pipeline passes back), the cached steps run each
    group against its own; each sample equals its request alone at both steps."""
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)

    model, kwargs = _build_model("flux2"), _inputs("flux2")
    for block in model.transformer_blocks:  # (as Flux2KleinKVPipeline sets them)
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    n_target, ids = _n_target(), kwargs["img_ids"]
    extract = {**kwargs, "hidden_states": torch.cat([kwargs["hidden_states"][:, n_target:],
                                                     kwargs["hidden_states"][:, :n_target]], 1),
               "img_ids": torch.cat([ids[:, n_target:], ids[:, :n_target]], 1), "kv_cache_mode": "extract",
               "num_ref_tokens": 17}
    later = {**kwargs, "hidden_states": kwargs["hidden_states"][:, :n_target], "img_ids": ids[:, :n_target],
             "timestep": kwargs["timestep"] * 0.5, "kv_cache_mode": "cached"}
    budget = [[0.25], [0.5]]

    def steps(extract_kwargs, later_kwargs):
        with torch.no_grad():
            out, cache = model(**extract_kwargs)
            return out, model(**later_kwargs, kv_cache=cache)[0], cache

    sparsectx.enable(model, budget=budget, selector=norm_selector, attention=attention)
    out, cached, cache = steps(extract, later)
    keep = sparsectx.last_selection(model).keep
    assert [int(row.sum()) for row in keep] == [sum(integration.budget_counts(b, 1, [9, 8])[0]) for b in budget]
    assert cache.get_double(0).k_ref.shape[1] == int(keep[0].sum())  # (the first group's cache)
    for b, request in enumerate(budget):
        sparsectx.enable(model, budget=request, selector=norm_selector, attention=attention)
        one = {name: value[b:b + 1] if isinstance(value, torch.Tensor) and name not in ("img_ids", "txt_ids")
               else value for name, value in extract.items()}
        one_later = {name: value[b:b + 1] if isinstance(value, torch.Tensor) and name not in ("img_ids", "txt_ids")
                     else value for name, value in later.items()}
        alone, alone_cached, _ = steps(one, one_later)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(cached[b:b + 1], alone_cached, rtol=0, atol=1e-5)


def test_klein_kv_pipeline_with_requests_of_their_own_budgets():
    """Two prompts with their own budgets through Flux2KleinKVPipeline: the extract step runs each request's kept
    tokens (a cache each), the cached steps each request's target against its own cache."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    sparsectx.enable(pipe, budget=[[0.25], [0.75]], selector=norm_selector)
    seen, handle = _count_tokens(pipe.transformer)
    try:
        with torch.no_grad():
            out = pipe(image=_reference_images(), prompt_embeds=torch.randn(2, TEXT_TOKENS, TEXT_DIM),
                       height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=3, output_type="latent").images
        kept = sparsectx.last_selection(pipe).keep.sum(dim=1).tolist()
    finally:
        handle.remove()
        sparsectx.disable(pipe)
    n_target = (IMAGE_PX // 16) ** 2
    assert kept[0] < kept[1]
    assert seen == [n_target + kept[0], n_target + kept[1]] + [n_target] * 4  # per request: extract, 2 cached steps
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize("budget", [[[0], [0.5]], [[0.5], [0]]])
def test_klein_kv_requests_one_of_which_keeps_nothing_equal_each_alone(budget):
    """A request keeping no reference token has no cache (diffusers returns None): as the group sorted first, its
    None was the cache the call was kept under (a TypeError from the weak dictionary), and handed to the pipeline,
    which ran its later steps without any cache. Each request now equals its call alone, and the groups' caches are
    freed with the call's (the entry held its own key: every mixed call's caches stayed until disable)."""
    import gc

    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    embeds = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(3))

    def call(rows):  # (each request's noise from a generator of its own: the same alone and together)
        with torch.no_grad():
            return pipe(image=_reference_images(), prompt_embeds=embeds[rows], height=IMAGE_PX, width=IMAGE_PX,
                        num_inference_steps=3, output_type="latent",
                        generator=[torch.Generator().manual_seed(10 + row) for row in rows]).images

    try:
        alone = []
        for request in range(2):
            sparsectx.enable(pipe, budget=budget[request], selector="uniform")
            alone.append(call([request]))
        sparsectx.enable(pipe, budget=budget, selector="uniform")
        both = call([0, 1])
        gc.collect()
        assert len(getattr(pipe.transformer, integration.PATCH_ATTR).extracted) == 0
    finally:
        sparsectx.disable(pipe)
    torch.testing.assert_close(both, torch.cat(alone), rtol=0, atol=FP32_ATOL)


def test_klein_kv_extract_returning_an_output_object_hands_over_the_cache():
    """The extract step called with return_dict=True, its first group keeping no token: the merged output was that
    group's, whose None kv_cache diffusers' output leaves out of its keys; the cache set as an attribute alone was
    missing from ``out[1]`` and ``to_tuple()``."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    model = pipe.transformer
    sparsectx.enable(pipe, budget=[[0], [0.5]], selector="uniform")
    outputs = []
    model.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, "return_dict": True})
                                    if kwargs.get("kv_cache_mode") == "extract" else None, with_kwargs=True)
    model.register_forward_hook(lambda m, args, kwargs, out: outputs.append(out) or (out.sample, out["kv_cache"])
                                if kwargs.get("kv_cache_mode") == "extract" else None, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(image=_reference_images(), prompt_embeds=torch.randn(2, TEXT_TOKENS, TEXT_DIM), height=IMAGE_PX,
                 width=IMAGE_PX, num_inference_steps=2, output_type="latent")
    finally:
        sparsectx.disable(pipe)
    (out,) = outputs
    assert out["kv_cache"] is not None and out.kv_cache is out["kv_cache"] and len(out.to_tuple()) == 2


def test_klein_kv_mixed_calls_free_their_groups_caches():
    import gc

    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    sparsectx.enable(pipe, budget=[[0.25], [0.75]], selector="uniform")
    try:
        for _ in range(2):
            with torch.no_grad():
                pipe(image=_reference_images(), prompt_embeds=torch.randn(2, TEXT_TOKENS, TEXT_DIM), height=IMAGE_PX,
                     width=IMAGE_PX, num_inference_steps=2, output_type="latent")
            gc.collect()
            assert len(getattr(pipe.transformer, integration.PATCH_ATTR).extracted) == 0
    finally:
        sparsectx.disable(pipe)


def test_signals_reach_task_aware_selectors(models):
    """enable(..., selector="edit", signals={"user_mask": ...}): with a budget equal to the marked count per image,
    each sample keeps exactly the tokens its user mask marks."""
    model, kwargs = models["flux2"], _inputs("flux2")
    n_refs = [h * w for h, w in REF_HWS]
    user_mask = torch.zeros(2, sum(n_refs), dtype=torch.bool)
    user_mask[0, [0, 1, 3, 9 + 2, 9 + 5]] = True  # 3 tokens of image 1, 2 of image 2
    user_mask[1, [4, 7, 8, 9 + 0, 9 + 7]] = True
    try:
        sparsectx.enable(model, budget=[3, 2], selector="edit", signals={"user_mask": user_mask})
        model(**kwargs)
        keep = getattr(model, integration.PATCH_ATTR).cache.keep
        assert torch.equal(keep, user_mask)
        with pytest.raises(TypeError, match="signals must be a dict"):
            sparsectx.enable(model, budget=0.5, signals=[user_mask])
        with pytest.raises(TypeError, match=r"signal names \(strings\).*got the key 1 \(int\)"):  # (said 'dict')
            sparsectx.enable(model, budget=0.5, selector="edit", signals={1: user_mask})
        # one sample's mask without its batch dim: the error says which shape is expected
        sparsectx.enable(model, budget=[3, 2], selector="edit", signals={"user_mask": user_mask[0]})
        with pytest.raises(ValueError, match=r"'user_mask' has shape \(17,\).*user_mask is bool \[1 or R or B, N\]"):
            model(**kwargs)
    finally:
        sparsectx.disable(model)


@pytest.mark.parametrize("family", ["flux", "flux2"])
@pytest.mark.parametrize("extra_rows", [3, -2], ids=["longer", "shorter"])
def test_hidden_states_and_img_ids_of_other_lengths_are_refused(models, family, extra_rows):
    """FLUX's layout is read from img_ids alone: hidden_states rows past them were dropped from the sequence and
    answered with zeros (a budget below 1), and a shorter sequence failed with an IndexError inside the selection;
    the unpatched model refuses both (its RoPE tables come from the ids). Now a ValueError naming both."""
    model, kwargs = models[family], dict(_inputs(family, batch=1))
    hidden = kwargs["hidden_states"]
    kwargs["hidden_states"] = (torch.cat([hidden, torch.randn(1, extra_rows, hidden.shape[2])], dim=1)
                               if extra_rows > 0 else hidden[:, :extra_rows])
    rows, ids = kwargs["hidden_states"].shape[1], kwargs["img_ids"].shape[-2]
    for budget in (0.5, 1.0):
        sparsectx.enable(model, budget=budget, seed=0)
        try:
            with torch.no_grad(), pytest.raises(ValueError, match=f"img_ids has {ids} rows but hidden_states {rows}"):
                model(**kwargs)
        finally:
            sparsectx.disable(model)
    with torch.no_grad(), pytest.raises(RuntimeError):  # (what the unpatched model says)
        model(**kwargs)


def test_batch_one_signal_serves_samples_selected_one_by_one(models):
    """A signal with a batch of 1 is used for every sample, also when the samples' references differ (each sample
    is selected on its own)."""
    model, kwargs = models["flux2"], _inputs("flux2")  # different reference latents per sample
    user_mask = torch.zeros(1, 17, dtype=torch.bool)
    user_mask[0, [0, 4, 8, 10, 12]] = True  # 3 tokens of image 1, 2 of image 2
    sparsectx.enable(model, budget=[3, 2], selector="edit", signals={"user_mask": user_mask})
    _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep, user_mask.expand(2, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_budget_through_enable(models, family):
    """enable(budget=adaptive(...)): each sample keeps the smallest top-scored set covering the coverage share of
    each image's score mass (the selection adaptive_budget makes of the selector's scores; its counts differ between
    the samples), and runs as that selection given as a selector mask; a per-call adaptive budget overrides."""
    from sparsectx.selection import adaptive, adaptive_budget

    model, kwargs = models[family], _inputs(family)
    n_refs = [h * w for h, w in _ref_hws(family)]
    seq = kwargs["hidden_states"].shape[1]
    references = kwargs["hidden_states"][:, seq - sum(n_refs):]
    expected = adaptive_budget(norm_selector(references, None), 0.6, floor=1, ref_lengths=n_refs).keep
    sparsectx.enable(model, budget=adaptive(0.6, floor=1), selector=norm_selector)
    out = _run(model, kwargs)
    keep = sparsectx.last_selection(model).keep
    assert torch.equal(keep.cpu(), expected)
    assert 0 < int(keep.sum()) < keep.numel()
    # the same selection as a fixed per-sample selector mask: the same output
    sparsectx.enable(model, budget=None, selector=lambda latents, context: expected[:latents.shape[0]])
    torch.testing.assert_close(_run(model, kwargs), out, rtol=0, atol=FP32_ATOL)
    # a per-call adaptive override (LongCat: enabled again), and a different coverage selects again
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    if family in ATTN_KWARGS:
        _run(model, {**kwargs, ATTN_KWARGS[family]: {"sparsectx": {"budget": adaptive(0.3)}}})
    else:
        sparsectx.enable(model, budget=adaptive(0.3), selector=norm_selector)
        _run(model, kwargs)
    assert torch.equal(sparsectx.last_selection(model).keep.cpu(),
                       adaptive_budget(norm_selector(references, None), 0.3, ref_lengths=n_refs).keep)


def test_budget_object_settings_per_request_map_onto_the_batch(models):
    """A budget object's [R, 1] tensor settings give one value per request; a pipeline's batch of B = R x n samples
    (num_images_per_prompt order) repeats each over its request's samples, with the references shared or not."""
    from sparsectx.selection import adaptive, adaptive_budget, fixed_ratio

    model = models["flux2"]
    n_refs = [h * w for h, w in REF_HWS]
    coverage = torch.tensor([[0.2], [0.95]])
    for kwargs in (_same_references(_inputs("flux2", batch=4)), _inputs("flux2", batch=4)):
        references = kwargs["hidden_states"][:, _n_target():]
        scores = norm_selector(references, None)
        expected = adaptive_budget(scores, coverage.repeat_interleave(2, dim=0), floor=1, ref_lengths=n_refs).keep
        sparsectx.enable(model, budget=adaptive(coverage, floor=1), selector=norm_selector)
        _run(model, kwargs)
        keep = sparsectx.last_selection(model).keep
        assert torch.equal(keep.cpu(), expected)
        assert int(keep[0].sum()) < int(keep[2].sum())  # the second request covers more of the mass
    # shared references: each request's own row, given as a tensor or as a list of lists (before, the list form was
    # cut to the first request's row, its references being shared)
    for setting in (torch.tensor([[0.25], [1.0]]), [[0.25], [1.0]]):
        sparsectx.enable(model, budget=fixed_ratio(setting), selector=norm_selector)
        _run(model, _same_references(_inputs("flux2", batch=4)))
        assert sparsectx.last_selection(model).keep.sum(dim=1).tolist() == [2 + 2, 2 + 2, 17, 17], setting
    sparsectx.enable(model, budget=adaptive(0.0, floor=[[1.0], [0.0]]), selector=norm_selector)
    _run(model, _same_references(_inputs("flux2", batch=4)))
    assert sparsectx.last_selection(model).keep.sum(dim=1).tolist() == [17, 17, 0, 0]
    # every request with the same settings and shared references: one selection for the batch
    calls, counting = _counting(norm_selector)
    sparsectx.enable(model, budget=adaptive(torch.tensor([[0.5], [0.5]])), selector=counting)
    _run(model, _same_references(_inputs("flux2", batch=4)))
    assert calls == [(1, sum(n_refs), 8)]
    sparsectx.enable(model, budget=adaptive(torch.tensor([[0.2], [0.5], [0.9]])), selector=norm_selector)
    with pytest.raises(ValueError, match="3 rows .one per request., which does not divide the batch of 4"):
        _run(model, _inputs("flux2", batch=4))


def test_budget_callable_must_return_a_budget_result(models):
    model, kwargs = models["flux2"], _inputs("flux2")
    sparsectx.enable(model, budget=lambda scores, lengths: scores > 0, selector=norm_selector)
    with pytest.raises(ValueError, match="BudgetResult"):
        _run(model, kwargs)


def test_patched_forward_keeps_the_models_name_and_docstring(models):
    """The instance forward a patch installs reads as the model's (help(), __name__, inspect.signature), also
    through a hook added after enable that copies its attributes (accelerate's add_hook_to_module; before, such a
    hook's forward read as an unbound function with a leading ``self``)."""
    import inspect

    model = models["flux2"]
    before = model.forward
    sparsectx.enable(model, budget=0.5)
    assert model.forward.__name__ == "forward" and model.forward.__doc__ == before.__doc__
    assert model.forward.__qualname__ == before.__qualname__
    assert inspect.signature(model.forward) == inspect.signature(before)
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    accelerate_hooks.add_hook_to_module(model, accelerate_hooks.ModelHook())
    try:
        assert inspect.signature(model.forward) == inspect.signature(before)
    finally:
        accelerate_hooks.remove_hook_from_module(model)
        sparsectx.disable(model)
    assert "forward" not in model.__dict__ or model.forward == before


@pytest.mark.parametrize("family", ["flux2", "flux"])
def test_grid_shapes_found_in_the_ids_select_as_the_ids_do(models, family, monkeypatch):
    """The layout finds each reference's row-major grid in its host copy of the ids and hands the shapes to the
    selectors (``IDS_GRID_SHAPES``), which then make their grid without device work: the same kept tokens and
    outputs as reading the ids, for every selector that reads the grid; ids that are no such grid get no shapes."""
    from sparsectx import selection

    model, kwargs = models[family], _inputs(family)
    call = dict(kwargs)
    layout = integration.reference_layout(family, call)
    assert layout.extra == {selection.IDS_GRID_SHAPES: list(_ref_hws(family))}
    shuffled = dict(call, img_ids=call["img_ids"].clone())
    ids = shuffled["img_ids"][0] if shuffled["img_ids"].ndim == 3 else shuffled["img_ids"]
    ids[_n_target():_n_target() + 2] = ids[[_n_target() + 1, _n_target()]]  # two tokens out of row-major order
    assert selection.IDS_GRID_SHAPES not in integration.reference_layout(family, shuffled).extra
    five_axes = dict(call, img_ids=torch.cat([call["img_ids"], torch.zeros_like(call["img_ids"][..., :2])], -1))
    assert selection.IDS_GRID_SHAPES not in integration.reference_layout(family, five_axes).extra  # not FLUX's axes
    signals = {"user_mask": torch.rand(2, sum(h * w for h, w in _ref_hws(family)), generator=torch.Generator()
                                       .manual_seed(3)) < 0.3}
    results = {}
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(selection, "row_major_shapes", lambda hw, lengths: None)
        for name in ("uniform", "edit", "subject"):
            sparsectx.enable(model, budget=0.5, selector=name, signals=signals if name == "edit" else None)
            out = _run(model, kwargs)
            results[shortcut, name] = (integration.last_selection(model).keep, out)
            integration.disable(model)
    for name in ("uniform", "edit", "subject"):
        (keep, out), (keep_ids, out_ids) = results[True, name], results[False, name]
        assert torch.equal(keep, keep_ids) and torch.equal(out, out_ids), name


@pytest.mark.parametrize("family", FAMILIES)
def test_last_selection_gives_each_reference_on_its_token_grid(models, family):
    model, kwargs = models[family], _inputs(family)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    _run(model, kwargs)
    chosen = sparsectx.last_selection(model)
    assert chosen.ref_shapes == list(_ref_hws(family))
    grids = chosen.grids()
    assert [tuple(g.shape) for g in grids] == [(2, h, w) for h, w in _ref_hws(family)]
    for grid, flat in zip(grids, chosen.per_image()):
        assert torch.equal(grid.flatten(1), flat)
    if family == "qwen":
        return
    shuffled = dict(kwargs, img_ids=kwargs["img_ids"].clone())  # FLUX ids that are no row-major grid
    ids = shuffled["img_ids"][0] if shuffled["img_ids"].ndim == 3 else shuffled["img_ids"]
    ids[_n_target():_n_target() + 2] = ids[[_n_target() + 1, _n_target()]]
    integration.disable(model)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    _run(model, shuffled)
    assert sparsectx.last_selection(model).ref_shapes is None
    with pytest.raises(ValueError, match="no token grid"):
        sparsectx.last_selection(model).grids()


def test_a_training_forward_selects_per_prompt_and_lets_selectors_use_autograd(models):
    """Train mode without a backward (e.g. guidance branches in a validation loop without ``eval()``): one latent
    tensor with two prompts selects once per prompt (keying the training plan by its input alone shared one
    selection); a selector that takes gradients of its own runs in a training forward (planning under no_grad
    refused it)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    model.train()
    calls, counting = _counting(random_selector)

    def gradient_selector(latents, context):
        x = latents.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(x.pow(2).sum(), x)
        return grad.norm(dim=-1)

    try:
        sparsectx.enable(model, budget=0.5, selector=counting)
        with torch.no_grad():
            model(**kwargs)
            model(**{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] + 1.0})
        assert len(calls) == 2
        integration.disable(model)
        sparsectx.enable(model, budget=0.5, selector=gradient_selector)
        model(**kwargs)[0].mean().backward()
        assert sparsectx.last_selection(model).keep.sum() < sparsectx.last_selection(model).keep.numel()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


# tests from a mutation run (each failed on a mutant)
def test_a_per_call_budget_override_on_a_transformer_enabled_alone_selects_again(models):
    """OV2: the same inputs (one prompt tensor) with another per-call budget keep that budget, not the cached
    plan's."""
    model, kwargs = models["flux2"], _same_references(_inputs("flux2"))
    seen = []
    handle = model.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        sparsectx.enable(model, budget=0.5, selector=norm_selector)
        for count in (2, 3):
            _run(model, {**kwargs, "joint_attention_kwargs": {"sparsectx": {"budget": count}}})
    finally:
        handle.remove()
    n_refs = len(REF_HWS)
    assert seen == [_n_target() + 2 * n_refs, _n_target() + 3 * n_refs]


def test_last_selection_after_a_kv_call_with_one_cached_step():
    """LS1: with a single cached step (num_inference_steps=2) after the extract step, last_selection on a
    transformer enabled alone still reports the extract step's selection once the call has returned."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinKVPipeline)
    sparsectx.enable(pipe.transformer, budget=0.25, selector=random_selector, seed=0)
    try:
        pipe(image=_reference_images(), prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM),
             height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=2, output_type="latent")
        found = sparsectx.last_selection(pipe.transformer)
    finally:
        sparsectx.disable(pipe.transformer)
    assert found is not None and found.keep.sum(dim=1).tolist() == [12]


def test_qwen_samples_with_other_image_sizes_are_refused(models):
    """Qwen-Image: one layout serves the batch (img_shapes[0]); a sample whose references have other sizes (the same
    total) was cut at sample 0's image boundaries, each per-image budget counted across its images, without an
    error. Now a ValueError names img_shapes."""
    model, kwargs = models["qwen"], _inputs("qwen")
    shapes = kwargs["img_shapes"]
    swapped = [shapes[0], [shapes[1][0], *reversed(shapes[1][1:])]]
    assert swapped[1] != swapped[0]
    sparsectx.enable(model, budget=[8, 1], selector=norm_selector)
    with pytest.raises(ValueError, match=r"img_shapes differ between samples \(sample 1"):
        _run(model, {**kwargs, "img_shapes": swapped})
    _run(model, kwargs)  # the same shapes: runs


# mutation round 6: tests for the mutants that survived (each fails on its mutant)
def test_a_per_request_budget_list_that_does_not_divide_the_batch_is_refused_by_name():
    """I07 (integration.py:227 ``if batch % len(budget)`` -> ``if batch < len(budget)``): a per-request list of R
    entries over a batch that R does not divide is a ValueError saying so (the mutant raises IndexError)."""
    for batch, requests in ((3, 2), (5, 2), (4, 3)):
        budget = [[0.25]] * requests
        with pytest.raises(ValueError, match=f"does not divide the batch of {batch}"):
            integration.budget_counts(budget, batch, [9, 8])


def _output_and_grad(model, kwargs, hidden, budget, checkpointed):
    hidden.grad = None
    call = {**kwargs, "joint_attention_kwargs": {"sparsectx": {"budget": budget}}}

    def run(h):
        return model(**{**call, "hidden_states": h})[0]

    out = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False) if checkpointed else run(hidden)
    out.pow(2).sum().backward()
    return out.detach(), hidden.grad.clone()


def test_an_eval_forward_with_gradients_recomputes_with_its_own_selection_after_another_on_the_same_input():
    """I26 (integration.py:1633 ``if found is None or training or not found.training`` -> ``if found is None or
    training``): an eval-mode forward with gradients (checkpointed around the transformer) on an input tensor that
    an earlier eval forward took, with another per-call budget. Its recomputation must find its own plan key (the
    latest eval forward replaces the earlier eval one); the mutant kept the first forward's key, and the
    recomputation ran the first forward's selection (CheckpointError: other shapes)."""
    kwargs = _inputs("flux2")
    model = _build_model("flux2").eval()
    hidden = kwargs["hidden_states"].clone().requires_grad_()
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    try:
        _output_and_grad(model, kwargs, hidden, 2, checkpointed=True)  # forward and backward on `hidden`
        out, grad = _output_and_grad(model, kwargs, hidden, 5, checkpointed=True)  # another budget, same input
        expected_out, expected_grad = _output_and_grad(model, kwargs, hidden.detach().clone().requires_grad_(), 5,
                                                       checkpointed=False)
    finally:
        sparsectx.disable(model)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_qwen_img_shapes_describing_fewer_tokens_than_hidden_states_are_refused_by_name():
    """I17 (integration.py:625 ``!= seq`` -> ``> seq``): img_shapes that describe fewer tokens than hidden_states
    holds are refused with the layout's message before anything runs (the mutant took the extra rows as reference
    tokens of no image)."""
    kwargs = _inputs("qwen")
    model = _build_model("qwen")
    hidden = kwargs["hidden_states"]
    kwargs["hidden_states"] = torch.cat([hidden, hidden[:, -4:]], 1)  # 4 rows that img_shapes does not describe
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    try:
        with pytest.raises(ValueError, match=r"describe \d+ tokens but hidden_states has \d+"):
            with torch.no_grad():
                model(**kwargs)
    finally:
        sparsectx.disable(model)


def test_a_pipeline_call_with_its_transformer_in_train_mode_selects_once():
    """I27 (integration.py:1642 ``return self.transformer.training and not self.pipeline_calls`` -> without the
    ``pipeline_calls`` clause): an enabled pipeline's call is not a training loop even when the transformer is left in
    train mode (a validation call during fine-tuning): its steps reuse the call's one selection (the mutant selected
    anew at every forward, 4 selections here, each step keeping other tokens)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    selections, counting = _counting(random_selector)
    call = _klein_call(num_images_per_prompt=2)
    pipe.transformer.train()
    sparsectx.enable(pipe, budget=0.25, selector=counting, seed=0)
    try:
        pipe(**call)
    finally:
        sparsectx.disable(pipe)
    assert [shape[:2] for shape in selections] == [(1, 48)]  # one selection per pipeline call


def test_per_image_seeds_of_another_length_than_the_batch_seed_every_sample_with_the_first():
    """I30 (integration.py:1750 ``len(seed) == batch`` -> ``len(seed) > 0``): a pipeline call's per-image generator
    seeds (``patch.call_seed``, set by an enabled pipeline's __call__) of another length than the transformer's batch
    seed every sample with the first seed, as ``enable``'s docstring says (the mutant handed the selector 3
    generators for 2 samples: ValueError). White-box: the seeds are set as the pipeline's __call__ sets them."""
    from sparsectx import integration

    model, kwargs = _build_model("flux2"), _inputs("flux2")
    sparsectx.enable(model, budget=0.5, selector="random", seed=3)
    try:
        with torch.no_grad():
            model(**kwargs)
        expected = sparsectx.last_selection(model).keep.clone()
        sparsectx.enable(model, budget=0.5, selector="random")
        getattr(model, integration.PATCH_ATTR).call_seed = (3, 4, 5)
        with torch.no_grad():
            model(**kwargs)
        got = sparsectx.last_selection(model).keep
    finally:
        sparsectx.disable(model)
    assert torch.equal(got, expected)


def test_per_image_generators_of_one_seed_select_once_for_the_batch():
    """I38 (integration.py:2068 ``return seeds[0] if len(set(seeds)) == 1 else seeds`` -> ``return seeds``): one
    generator per image, all of one seed, is the seed of the whole batch: the batch, whose samples share their
    references, is selected once on its first sample (the mutant ran the selector on every sample, each with its
    own generator of that seed: the same masks at B times the selection work, a probe on every sample)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    selections, counting = _counting(random_selector)
    call = _klein_call(num_images_per_prompt=2, generator=[torch.Generator().manual_seed(7) for _ in range(2)])
    sparsectx.enable(pipe, budget=0.25, selector=counting)
    try:
        pipe(**call)
    finally:
        sparsectx.disable(pipe)
    assert [shape[:2] for shape in selections] == [(1, 48)]


def test_an_eval_forwards_recomputation_after_its_plan_was_evicted_selects_again():
    """I21 (integration.py:1484 ``... and key[-2] is not None`` dropped): only a training forward's recomputation
    refuses a plan that is no longer cached (its random draw can not be repeated). An eval-mode forward with gradients,
    checkpointed around the transformer, followed by MAX_PROMPT_PLANS forwards on other prompts before its backward,
    selects again on recomputation (a seeded selector gives the same selection) and its gradients are right; the
    mutant raised RuntimeError ("this training forward recomputes one whose selection is no longer cached")."""
    from sparsectx import integration

    kwargs = _inputs("flux2")
    model = _build_model("flux2").eval()
    calls, counting = _counting(random_selector)
    sparsectx.enable(model, budget=0.5, selector=counting, seed=0)
    try:
        hidden = kwargs["hidden_states"].clone().requires_grad_()
        expected = torch.autograd.grad(model(**{**kwargs, "hidden_states": hidden})[0].pow(2).sum(), hidden)[0]
        out = torch.utils.checkpoint.checkpoint(lambda h: model(**{**kwargs, "hidden_states": h})[0], hidden,
                                                use_reentrant=False)
        # other prompts, alive: other plans, which evict the forward's
        others = [torch.randn_like(kwargs["encoder_hidden_states"]) for _ in range(integration.MAX_PROMPT_PLANS)]
        with torch.no_grad():
            for prompt in others:
                model(**{**kwargs, "encoder_hidden_states": prompt})
        assert len(calls) == 1 + len(others)  # (the two forwards above share their prompt: one selection)
        got = torch.autograd.grad(out.pow(2).sum(), hidden)[0]
        assert len(calls) == 2 + len(others)  # the recomputation selected again
    finally:
        sparsectx.disable(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_bare_forward_after_a_pipeline_call_with_a_generator_draws_from_the_global_rng():
    """I40 (integration.py:2158 ``patch.call_seed = outer_seed`` dropped): a pipeline call's generator seeds that
    call's selection only; a forward of the transformer outside a pipeline call afterwards (no enable seed) draws
    from torch's global RNG again (the mutant kept seeding it with the finished call's generator seed)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    call = _klein_call(steps=1, generator=torch.Generator().manual_seed(7))
    kwargs = _inputs("flux2")
    sparsectx.enable(pipe, budget=0.5, selector=random_selector)
    try:
        pipe(**call)
        keeps = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                # (new prompt tensors: outside a pipeline call they key the selection, so each forward selects)
                pipe.transformer(**{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].clone()})
            keeps.append(sparsectx.last_selection(pipe.transformer).keep.clone())
    finally:
        sparsectx.disable(pipe)
    assert not torch.equal(keeps[0], keeps[1])  # each drew from the global RNG as seeded


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_generator_redraw_that_equals_a_recent_mask_by_chance_still_warns(reentrant):
    """T14 (training.py:362 ``if self.generator is None and any(...)`` -> ``if any(...)``): with a user generator,
    a recomputation whose forward can not be told redraws from that generator (not restored by the checkpoint).
    A redraw that happens to equal a recent forward's mask is not that forward's mask: here (seed 1, one reference
    token, batch 2) the forwards drew [F, F] and [F, T] and both recomputations redraw [F, T], so one of them
    recomputes with another forward's mask. It must warn; the mutant accepts the coincidence silently."""
    torch.manual_seed(0)
    kwargs = _inputs("flux2")
    model = _build_model("flux2").train()
    sparsectx.enable_drop_training(model, ratio_range=(0.0, 1.0), ref_lengths=[1],
                                   generator=torch.Generator().manual_seed(1))
    hidden = kwargs["hidden_states"].clone().requires_grad_()
    refs = hidden[:, _n_target():].detach()
    masks = []

    def run(h):
        h = torch.cat([h, refs], 1)  # made inside the checkpointed function: the recomputation can not be told
        out = model(**{**kwargs, "hidden_states": h})[0]
        masks.append(sparsectx.last_drop_mask(model))
        return out[:, :_n_target()].pow(2).mean()

    loss = sum(torch.utils.checkpoint.checkpoint(run, x, use_reentrant=reentrant)
               for x in (hidden[:, :_n_target()], hidden[:, :_n_target()] * 2))
    first, second = (None if m is None else m[:, -1].tolist() for m in masks[:2])
    assert (first, second) == ([False, False], [False, True])  # the seed's draws, as the docstring says
    with pytest.warns(RuntimeWarning, match="drop mask can not be told"):
        loss.backward()
    sparsectx.disable_drop_training(model)


def test_numpy_integer_budgets_are_checked_as_the_ints_they_hold():
    """(a mutation test's gap: numpy integers kept as they were skipped the sign check, which reads Python ints)"""
    import numpy as np

    with pytest.raises(ValueError, match="budget count must be >= 0"):
        integration.check_budget(np.int64(-3))
    with pytest.raises(ValueError):
        integration.check_budget([4, np.int32(-1)])
    assert [type(v) for v in integration.check_budget([np.int64(3), 2])] == [int, int]


# ----------------------------------------------------------------------------------------------------------------
# gaps a mutation test of the drop-in's plan machinery found (each test fails on a mutant the suite let pass before)
# ----------------------------------------------------------------------------------------------------------------
def _sample(kwargs: dict, b: int, batch: int) -> dict:
    """The call's sample ``b`` alone (per-sample tensors and lists sliced)."""
    return {k: (v[b:b + 1] if isinstance(v, (torch.Tensor, list)) and len(v) == batch and
                (not isinstance(v, torch.Tensor) or v.ndim) else v) for k, v in kwargs.items()}


def _position_selector(latents, context):
    """The same scores for every sample: equal budgets keep equal tokens (one group of samples)."""
    return torch.arange(latents.shape[1], dtype=latents.dtype).expand(latents.shape[:2]).clone()


def test_a_group_of_several_samples_writes_each_its_own_rows():
    """Samples 0 and 1 keep the same tokens (one group of two), sample 2 others: each equals its call alone."""
    model, kwargs, n = _build_model("flux2"), _inputs("flux2", batch=3), _n_target()
    budgets = [[0.5], [0.5], [0.25]]
    sparsectx.enable(model, budget=budgets, selector=_position_selector)
    together = _run(model, kwargs)
    for b in range(3):
        sparsectx.enable(model, budget=budgets[b], selector=_position_selector)
        torch.testing.assert_close(together[b:b + 1, :n], _run(model, _sample(kwargs, b, 3))[:, :n], rtol=0,
                                   atol=2e-5)
    sparsectx.disable(model)


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_samples_with_different_references_select_each_on_its_own(family):
    """One budget, a content selector, random references per sample: sample 1 keeps what it keeps alone."""
    model, kwargs, n = _build_model(family), _inputs(family, batch=2), _n_target()
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    together, keep = _run(model, kwargs), integration.last_selection(model).keep
    alone = _run(model, _sample(kwargs, 1, 2))
    assert torch.equal(keep[1:2], integration.last_selection(model).keep) and not torch.equal(keep[0], keep[1])
    torch.testing.assert_close(together[1:2, :n], alone[:, :n], rtol=0, atol=2e-5)
    sparsectx.disable(model)


def test_references_before_the_target_in_the_sequence():
    """The rows written back are the target's wherever it sits: references first gives the same target output."""
    model, kwargs, n = _build_model("flux2"), _inputs("flux2", batch=1), _n_target()
    seq = kwargs["hidden_states"].shape[1]
    order = torch.cat([torch.arange(n, seq), torch.arange(n)])
    refs_first = {**kwargs, "hidden_states": kwargs["hidden_states"][:, order], "img_ids": kwargs["img_ids"][:, order]}
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    torch.testing.assert_close(_run(model, refs_first)[:, seq - n:], _run(model, kwargs)[:, :n], rtol=0, atol=2e-5)
    sparsectx.disable(model)


def test_ids_written_in_place_between_forwards_plan_again():
    model, kwargs = _build_model("flux2"), _inputs("flux2", batch=1)
    kwargs["img_ids"] = kwargs["img_ids"].clone()  # a buffer the caller reuses
    new_ids = kwargs["img_ids"].clone()
    new_ids[0, _n_target():, 1:3] += 5  # the references' grid coordinates move (same layout, another RoPE)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    _run(model, kwargs)
    kwargs["img_ids"].copy_(new_ids)
    second = _run(model, kwargs)
    sparsectx.disable(model)
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    torch.testing.assert_close(second, _run(model, {**kwargs, "img_ids": new_ids.clone()}), rtol=0, atol=1e-5)
    sparsectx.disable(model)


def test_qwen_references_reordered_in_img_shapes_plan_again():
    model, kwargs = _build_model("qwen"), _inputs("qwen", batch=1)
    shapes = kwargs["img_shapes"][0]
    swapped = [[shapes[0], *shapes[1:][::-1]]]  # the same token total, the references in the other order
    assert swapped[0] != list(shapes)
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    _run(model, kwargs)
    second, lengths = _run(model, {**kwargs, "img_shapes": swapped}), integration.last_selection(model).ref_lengths
    sparsectx.disable(model)
    sparsectx.enable(model, budget=0.5, selector=norm_selector)
    fresh = _run(model, {**kwargs, "img_shapes": swapped})
    assert lengths == integration.last_selection(model).ref_lengths == [h * w for _, h, w in swapped[0][1:]]
    torch.testing.assert_close(second, fresh, rtol=0, atol=1e-5)
    sparsectx.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_inference_mode_forward_then_a_training_forward_on_the_same_inputs(family):
    """Index tensors made under torch.inference_mode can not be saved for backward: a plan per mode. The training
    forward after the inference-mode one gives the output and gradients of a training forward alone."""
    model, kwargs = _build_model(family), _inputs(family, batch=1)

    def train_forward():
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)[0]
        out.sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
    alone = train_forward()
    sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)  # (a new call: its selection drawn anew)
    with torch.inference_mode():
        model(**kwargs)
    after = train_forward()
    sparsectx.disable(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(after[0], alone[0], rtol=0, atol=0)
    assert after[1].keys() == alone[1].keys() and alone[1]
    for name, grad in alone[1].items():
        torch.testing.assert_close(after[1][name], grad, rtol=0, atol=0, msg=name)


def test_a_later_step_with_per_sample_timesteps_does_not_run_packed():
    """FLUX.2, sparsectx attention, mixed budgets: the first step (one timestep) runs packed; a later step reusing
    the plan with per-sample timesteps must run as groups (its samples no longer share their modulation)."""
    model, kwargs, n = _build_model("flux2"), _inputs("flux2", batch=3), _n_target()
    budgets = [[0.25], [2, 0.75], [1.0]]
    sparsectx.enable(model, budget=budgets, selector=norm_selector, attention="sparsectx")
    _run(model, kwargs)
    step = {**kwargs, "timestep": torch.tensor([0.7, 0.5, 0.7])}
    later = _run(model, step)
    sparsectx.enable(model, budget=budgets[1], selector=norm_selector)
    torch.testing.assert_close(later[1:2, :n], _run(model, _sample(step, 1, 3))[:, :n], rtol=0, atol=2e-5)
    sparsectx.disable(model)


@pytest.mark.parametrize("family", tuple(ATTN_KWARGS))
def test_a_per_call_override_does_not_reach_diffusers(family, caplog):
    model, kwargs = _build_model(family), _inputs(family, batch=1)
    name = ATTN_KWARGS[family]
    sparsectx.enable(model, budget=0.25, selector=norm_selector)
    seen = []
    for module in model.modules():  # every attention processor sees the kwargs diffusers hands it
        if hasattr(module, "set_processor"):
            module.register_forward_pre_hook(lambda mod, args, kw: seen.append(set(kw)), with_kwargs=True)
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        _run(model, {**kwargs, name: {"sparsectx": {"budget": 0.5}}})
    sparsectx.disable(model)
    assert seen and not any("sparsectx" in names for names in seen)
    assert not [r for r in caplog.records if "sparsectx" in r.getMessage()]


def test_layouts_keep_host_positions_on_the_host_and_queue_their_device_copies(monkeypatch):
    """Each layout built from host positions (Qwen-Image, Qwen-Image 2.1 / JoyImage-Edit-Plus, JoyImage-Edit, Z-Image,
    FLUX.3's ids) keeps them on the host under any default device (meta stands in for a GPU here: a default-device
    ``arange`` reached ``to_device``, which takes host values only) and makes the device copies with
    ``_device_values`` (queued from pinned memory on CUDA: the blocking ``.to(device)`` it replaced was a host sync
    per call, two per Qwen-Image drop-training forward in the 2026-12-04 GPU run)."""
    import types

    queued = []
    real = integration._device_values
    monkeypatch.setattr(integration, "_device_values", lambda *a: queued.append(real(*a)) or queued[-1])
    hidden = torch.zeros(1, 24, 8)
    joy = types.SimpleNamespace(config=types.SimpleNamespace(patch_size=(1, 2, 2)))
    x = [[torch.zeros(4, 1, 4, 6), torch.zeros(4, 1, 4, 4)]]  # Z-Image: a reference (2 x 3 patches), the target
    ids = torch.zeros(6, 4, dtype=torch.long)
    ids[:, 1], ids[:, 2], ids[:, 3] = torch.arange(6) // 3, torch.arange(6) % 3, -1
    joy_hidden, z_hidden, refs = torch.zeros(1, 2, 4, 1, 4, 4), torch.zeros(1, 10, 8), torch.zeros(1, 6, 8)
    calls = [
        ("qwen", lambda: integration._image_layout({"hidden_states": hidden, "img_shapes": [[(1, 4, 4), (1, 2, 4)]]},
                                                   True)),
        ("qwen21", lambda: integration._image_layout({"hidden_states": hidden, "img_shapes": [[(1, 2, 4), (1, 4, 4)]]},
                                                     False)),
        ("joyimage-edit", lambda: integration._items_layout({"hidden_states": joy_hidden}, joy)),
        ("z-image", lambda: integration._zimage_layout({"x": x, "hidden_states": z_hidden})),
        ("flux3", lambda: integration._cond_layout({"image_cond_hidden_states": refs, "image_cond_ids": ids})),
    ]
    torch.set_default_device("meta")
    try:
        layouts = {name: make() for name, make in calls}
    finally:
        torch.set_default_device(None)  # (not "cpu": that leaves a device mode on for the tests that follow)
    for name, layout in layouts.items():
        assert layout.target_host.device.type == layout.ref_host.device.type == "cpu", name
        assert layout.ref_positions.tolist() == layout.ref_host.tolist(), name
        copied = [t for t in (layout.target_positions, layout.ref_positions, layout.reference_ids) if t is not None
                  and t.numel() and name != "flux3"]  # (FLUX.3's positions are made on the device: no copy)
        assert all(any(t is q for q in queued) for t in copied), name
    assert [len(layouts[name].ref_host) for name in layouts] == [8, 8, 4, 6, 6]
    assert any(layouts["flux3"].reference_ids is q for q in queued)


@pytest.mark.parametrize("fill", [-torch.inf, -1e4, torch.finfo(torch.float32).min])
@pytest.mark.parametrize("form", ["key mask", "per-query outer"])
def test_the_probes_text_mask_reads_an_additive_padding_as_masked(fill, form):
    """The probe's text mask (which text keys some query may attend to) from an additive mask: a -1e4 padding was
    read as attended (only the dtype's lowest value and -inf were masked), and in a per-query mask whose padded
    queries' rows are -1e4 throughout, every key of those rows counted as attended."""
    n_text, n_image = 4, 3
    keys = torch.tensor([True, True, False, False] + [True] * n_image)
    allowed = keys[None, None, None, :] if form == "key mask" else (keys[:, None] & keys[None, :])[None, None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, fill)
    got = integration._text_keys_attended(mask, 1, n_text, n_image)
    assert got.tolist() == [[True, True, False, False]]
    soft = torch.zeros(1, 1, 1, n_text + n_image)
    soft[..., 2:] = -5.0  # (a soft bias masks nothing)
    assert integration._text_keys_attended(soft, 1, n_text, n_image).all()


def test_a_probe_selectors_request_keeps_in_a_batch_what_it_keeps_alone():
    """``selector="attention"`` (it reads the probe) with ``num_images_per_prompt=2`` and one generator per image: a
    request run alone shares its batch and is selected once, on its first image's latents; the same request beside
    another prompt's was selected image by image on each image's own latents, so its second image kept other tokens
    (and its output changed by 2.5e-3) with the batch's composition. Each sample is probed as its request's first
    sample now: both requests keep in the batch what they keep alone, and give the same images."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    embeds = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(3))

    def call(rows, seeds):
        with torch.no_grad():
            images = pipe(image=_reference_images(), prompt_embeds=embeds[rows],
                          negative_prompt_embeds=torch.zeros_like(embeds[rows]), guidance_scale=2.0,
                          num_images_per_prompt=2, height=64, width=64, num_inference_steps=2, output_type="latent",
                          generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        return images, sparsectx.last_selection(pipe).keep.clone()

    sparsectx.enable(pipe, budget=0.25, selector="attention")
    try:
        alone = [call([0], [10, 11]), call([1], [12, 13])]
        both, keep = call([0, 1], [10, 11, 12, 13])
    finally:
        sparsectx.disable(pipe)
    assert not torch.equal(alone[0][1][0], alone[1][1][0])  # the requests keep other tokens
    for request, (images, kept) in enumerate(alone):
        assert torch.equal(kept[0], kept[1])  # alone: one selection for the request's images
        rows = slice(2 * request, 2 * request + 2)
        assert torch.equal(keep[rows], kept), request
        torch.testing.assert_close(both[rows], images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_budget, alone_budget", [
    ([[0.25], [0.25]], 0.25),
    (sparsectx.selection.adaptive(coverage=torch.tensor([[0.9], [0.5]], dtype=torch.float64)),
     sparsectx.selection.adaptive(coverage=0.5))], ids=["list_rows_equal", "adaptive_rows"])
def test_a_probe_request_keeps_alone_what_it_keeps_beside_a_request_of_the_same_prompt(batch_budget, alone_budget):
    """Two requests with the same prompt and references (other noise), named by a per-request budget, with a
    selector that reads the probe: request 2 was probed on request 1's first sample (equal list rows took the
    shared batch's single probe; a budget object's per-request rows started no run of the probe), so it kept in the
    batch other tokens than alone (its output 6.7e-3 off). Each request is probed on its own first sample now."""
    model, kw = _build_model("flux2"), _inputs("flux2", batch=2)
    hidden = kw["hidden_states"].clone()
    hidden[1, _n_target():] = hidden[0, _n_target():]  # the same references
    kw = {**kw, "hidden_states": hidden,
          "encoder_hidden_states": kw["encoder_hidden_states"][:1].expand(2, -1, -1).clone()}  # the same prompt
    second = {**kw, **{k: kw[k][1:2] for k in ("hidden_states", "encoder_hidden_states", "timestep", "img_ids",
                                                "txt_ids")}}
    try:
        sparsectx.enable(model, budget=batch_budget, selector="attention")
        batched = _run(model, kw)
        in_batch = sparsectx.last_selection(model).keep
        sparsectx.enable(model, budget=alone_budget, selector="attention")
        alone = _run(model, second)
        kept_alone = sparsectx.last_selection(model).keep
    finally:
        sparsectx.disable(model)
    assert torch.equal(in_batch[1], kept_alone[0])
    torch.testing.assert_close(batched[1:, :_n_target()], alone[:, :_n_target()], rtol=0, atol=2e-5)


def test_groups_of_a_refs_first_batch_write_their_target_rows_where_the_target_sits():
    """Samples keeping different tokens (two groups) in a sequence holding the references before the target: each
    group's output rows go back where its target sits (the refs-first test above runs one group; with the target
    first, a group's output rows and their places in the sequence coincide, so writing them at the wrong ones passed
    the suite)."""
    model, kwargs, n = _build_model("flux2"), _inputs("flux2", batch=2), _n_target()
    seq = kwargs["hidden_states"].shape[1]
    order = torch.cat([torch.arange(n, seq), torch.arange(n)])  # references first, the target last
    refs_first = {**kwargs, "hidden_states": kwargs["hidden_states"][:, order].contiguous(),
                  "img_ids": kwargs["img_ids"][:, order].contiguous()}
    try:
        sparsectx.enable(model, budget=[[0.5], [0.25]], selector=norm_selector)  # two requests: two groups
        batched = _run(model, refs_first)
        for b, budget in enumerate((0.5, 0.25)):
            alone = {**refs_first, **{k: refs_first[k][b:b + 1] for k in ("hidden_states", "encoder_hidden_states",
                                                                            "timestep", "img_ids", "txt_ids")}}
            sparsectx.enable(model, budget=budget, selector=norm_selector)
            expected = _run(model, alone)
            torch.testing.assert_close(batched[b:b + 1, seq - n:], expected[:, seq - n:], rtol=0, atol=2e-5)
    finally:
        sparsectx.disable(model)


@pytest.mark.parametrize("selector", ["attention", "subject"])
def test_a_probe_selector_on_a_batch_of_one_sample(models, selector):
    """A batch of one sample (never shared) with a selector that reads the probe: each image keeps its budget (a
    first version of the probe's per-request leaders failed on it: "cannot reshape tensor of 0 elements into shape
    [0, -1]")."""
    model, kwargs = models["flux2"], _inputs("flux2", batch=1)
    sparsectx.enable(model, budget=2, selector=selector)
    try:
        out = _run(model, kwargs)
        kept = [part.sum(1).tolist() for part in sparsectx.last_selection(model).per_image()]
    finally:
        sparsectx.disable(model)
    assert out.shape[0] == 1 and kept == [[2]] * len(REF_HWS)


def test_a_training_forwards_plan_outlives_a_prompt_view_made_inside_its_checkpoint():
    """Gradient accumulation: two checkpointed training forwards whose prompt is an expanded view made inside the
    checkpointed function (gone after each forward), then one backward. Each forward's plan stays until its
    recomputation (a first version of the purge of gone prompts' plans dropped the first: "recomputes one whose
    selection is no longer cached"), and the gradients equal those of the two forwards without checkpoints."""
    model, kwargs = _build_model("flux2").train(), _inputs("flux2")
    text = kwargs["encoder_hidden_states"][:1].clone()

    def forward(hidden):
        return model(**{**kwargs, "hidden_states": hidden, "encoder_hidden_states": text.expand(2, -1, -1)})[0]

    grads = {}
    for checkpointed in (True, False):
        sparsectx.enable(model, budget=0.5, selector=random_selector, seed=0)
        try:
            hiddens = [kwargs["hidden_states"].clone().requires_grad_(), torch.randn(
                kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(5)).requires_grad_()]
            outs = [torch.utils.checkpoint.checkpoint(forward, h, use_reentrant=False) if checkpointed else forward(h)
                    for h in hiddens]
            sum(out.pow(2).sum() for out in outs).backward()
            grads[checkpointed] = [h.grad for h in hiddens]
        finally:
            sparsectx.disable(model)
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["references after the target", "num_ref_tokens short"])
def test_a_kv_extract_step_with_its_references_not_first_is_refused(case):
    """A FLUX.2 klein KV extract step whose reference tokens are not the first ``num_ref_tokens`` rows of
    hidden_states (placed after the target, or a count too short) is refused with a ValueError, not run on."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer
    common, target, refs, target_ids, ref_ids = _klein_kv_extract_inputs()
    if case == "references after the target":
        hidden, ids, n_ref = torch.cat([target, refs], 1), torch.cat([target_ids, ref_ids], 1), 9
    else:
        hidden, ids, n_ref = torch.cat([refs, target], 1), torch.cat([ref_ids, target_ids], 1), 5
    sparsectx.enable(transformer, budget=0.5, selector=random_selector, seed=0)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="first num_ref_tokens rows"):
            transformer(hidden_states=hidden, img_ids=ids, timestep=torch.tensor([1.0]), kv_cache_mode="extract",
                        num_ref_tokens=n_ref, **common)
    finally:
        sparsectx.disable(transformer)


def test_last_selection_ref_lengths_is_a_copy():
    """``last_selection``'s ``ref_lengths`` is a copy: a caller editing it does not change what the drop-in holds and
    reports next."""
    transformer = _tiny_pipeline(diffusers.Flux2KleinKVPipeline).transformer
    common, target, refs, target_ids, ref_ids = _klein_kv_extract_inputs()
    call = dict(hidden_states=torch.cat([target, refs], 1), img_ids=torch.cat([target_ids, ref_ids], 1),
                timestep=torch.tensor([1.0]), **common)
    sparsectx.enable(transformer, budget=0.5, selector=random_selector, seed=0)
    try:
        with torch.no_grad():
            transformer(**call)
        first = sparsectx.last_selection(transformer)
        first.ref_lengths.append(99)
        assert sparsectx.last_selection(transformer).ref_lengths == [9]
    finally:
        sparsectx.disable(transformer)


def _kept_after_a_call(model, kwargs):
    """The tokens a forward of ``model`` on ``kwargs`` keeps."""
    _run(model, kwargs)
    return sparsectx.last_selection(model).keep


def test_enable_again_with_another_seed_selects_with_that_seed():
    """Enabling an enabled transformer again with another seed selects anew with it on the same inputs (a bare
    transformer keys its selection by the prompt tensors, and the key holds no seed), as a freshly enabled one does."""
    model, kwargs = _build_model("flux2"), _inputs("flux2")
    try:
        sparsectx.enable(model, budget=0.5, selector="random", seed=1)
        wanted = _kept_after_a_call(model, kwargs)  # what seed 1 keeps on a freshly enabled transformer
        sparsectx.disable(model)
        sparsectx.enable(model, budget=0.5, selector="random", seed=0)
        first = _kept_after_a_call(model, kwargs)
        assert not torch.equal(first, wanted)  # (the two seeds keep other tokens)
        sparsectx.enable(model, budget=0.5, selector="random", seed=1)  # enabled again: seed 1 from now on
        assert torch.equal(_kept_after_a_call(model, kwargs), wanted)
    finally:
        sparsectx.disable(model)


@pytest.mark.parametrize("seed", [True, False])
def test_a_bool_seed_is_refused(seed):
    """A bool seed (an int subclass) is refused with a TypeError naming the seed, as a bool budget is."""
    model = _build_model("flux2")
    with pytest.raises(TypeError, match="seed"):
        sparsectx.enable(model, budget=0.5, selector="random", seed=seed)
    assert not integration.is_enabled(model)


class _ModuleHoldingATransformer(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, **kwargs):
        return self.transformer(**kwargs)


def test_a_module_holding_a_transformer_is_refused_by_name():
    """A user's module holding a supported transformer as ``.transformer`` is no pipeline: enable refuses it with the
    TypeError naming the supported classes and leaves its class alone."""
    model = _build_model("flux2")
    wrapper = _ModuleHoldingATransformer(model)
    with pytest.raises(TypeError, match="sparsectx supports the pipelines"):
        sparsectx.enable(wrapper, budget=0.5)
    assert type(wrapper) is _ModuleHoldingATransformer and not integration.is_enabled(model)


@pytest.mark.parametrize("budget, error", [([[0.5], [1.5]], ValueError), ([[0.5], [-1]], ValueError),
                                           ([[0.5], ["x"]], TypeError), ([[0.5], []], ValueError)])
def test_bad_entries_of_a_per_request_budget_are_refused_at_enable(budget, error):
    """The entries of a per-request budget are checked at enable as a scalar budget is (a ratio of 1.5 would keep
    whole images)."""
    model = _build_model("flux2")
    with pytest.raises(error, match="budget"):
        sparsectx.enable(model, budget=budget, selector="uniform")
    assert not integration.is_enabled(model)


def test_sparse_context_selects_as_enable_with_the_same_seed():
    """``sparse_context`` selects with its seed as ``enable`` does with the same seed, in each block."""
    model, kwargs = _build_model("flux2"), _inputs("flux2")
    try:
        sparsectx.enable(model, budget=0.5, selector="random", seed=7)
        wanted = _kept_after_a_call(model, kwargs)
        sparsectx.disable(model)
        for _ in range(2):  # (a seedless draw would differ between the two blocks)
            with sparsectx.sparse_context(model, budget=0.5, selector="random", seed=7):
                assert torch.equal(_kept_after_a_call(model, kwargs), wanted)
    finally:
        sparsectx.disable(model)


def test_sparse_context_hands_its_signals_to_the_selector():
    """``sparse_context`` hands its signals to the selector, as ``enable`` does."""
    model, kwargs = _build_model("flux2"), _inputs("flux2")
    user_mask = torch.zeros(1, 17, dtype=torch.bool)
    user_mask[0, [1, 2, 12]] = True
    seen = []

    def selector(latents, context):
        seen.append(context.extra.get("user_mask"))
        return torch.arange(latents.shape[1], 0, -1, dtype=torch.float32).expand(latents.shape[:2])

    try:
        with sparsectx.sparse_context(model, budget=0.5, selector=selector, signals={"user_mask": user_mask}):
            _run(model, kwargs)
        assert seen and all(isinstance(s, torch.Tensor) and bool(s[:, [1, 2, 12]].all()) for s in seen)
    finally:
        sparsectx.disable(model)


def _processor_classes(transformer) -> set:
    return {type(p).__name__ for p in transformer.attn_processors.values()}


def test_sparsectx_processors_set_back_after_their_drop_in_was_taken_off_run_the_originals():
    """Processors read from ``attn_processors`` while enabled with attention="sparsectx" and set back by hand after
    disable (or after a switch to attention="native") run the diffusers processors they replaced: before, they ran
    sparsectx's attention on a transformer is_enabled called off (not the original output bit for bit), a second
    disable left them, and enable(attention="sparsectx") raised 'already runs sparsectx processors'."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    transformer = pipe.transformer
    diffusers_classes = _processor_classes(transformer)
    with torch.no_grad():
        dense = pipe(**_seeded_klein_call()).images
        for switch_off in ("disable", "native"):
            sparsectx.enable(pipe, budget=2, selector="uniform", attention="sparsectx")
            sparse = pipe(**_seeded_klein_call()).images
            saved = dict(transformer.attn_processors)
            assert _processor_classes(transformer).isdisjoint(diffusers_classes)
            if switch_off == "native":
                sparsectx.enable(pipe, budget=2, selector="uniform", attention="native")
                native = pipe(**_seeded_klein_call()).images
                transformer.set_attn_processor(dict(saved))
                assert torch.equal(pipe(**_seeded_klein_call()).images, native)  # (they run diffusers' attention)
                sparsectx.disable(pipe)
                assert _processor_classes(transformer) == diffusers_classes
                transformer.set_attn_processor(dict(saved))
            else:
                sparsectx.disable(pipe)
                transformer.set_attn_processor(dict(saved))
            assert not sparsectx.is_enabled(pipe)
            assert torch.equal(pipe(**_seeded_klein_call()).images, dense)
            if switch_off == "disable":  # (disable when not enabled puts the diffusers processors back)
                sparsectx.disable(pipe)
                assert _processor_classes(transformer) == diffusers_classes
                assert torch.equal(pipe(**_seeded_klein_call()).images, dense)
                transformer.set_attn_processor(dict(saved))
            sparsectx.enable(pipe, budget=2, selector="uniform", attention="sparsectx")
            assert torch.equal(pipe(**_seeded_klein_call()).images, sparse)
            transformer.set_attn_processor(dict(saved))  # (over the same originals: the new install's go back on)
            assert torch.equal(pipe(**_seeded_klein_call()).images, sparse)
            sparsectx.disable(pipe)
            assert _processor_classes(transformer) == diffusers_classes
            assert torch.equal(pipe(**_seeded_klein_call()).images, dense)


def test_a_blocks_sparsectx_processors_set_back_after_it_exited_run_the_originals():
    """Processors saved inside a sparse_context(attention="sparsectx") block and set back by hand after it exited
    run the processors the block found (before: sparsectx's attention, enable(attention="sparsectx") raised 'already
    runs sparsectx processors' and disable left them); a block switching a sparsectx drop-in to native attention
    gives back its running processors on exit."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    transformer = pipe.transformer
    diffusers_classes = _processor_classes(transformer)
    with torch.no_grad():
        sparsectx.enable(pipe, budget=2, selector="uniform", attention="native")
        try:
            native = pipe(**_seeded_klein_call()).images
            with sparsectx.sparse_context(pipe, budget=2, selector="uniform", attention="sparsectx"):
                saved = dict(transformer.attn_processors)
                sparse = pipe(**_seeded_klein_call()).images
            assert _processor_classes(transformer) == diffusers_classes
            transformer.set_attn_processor(dict(saved))
            assert torch.equal(pipe(**_seeded_klein_call()).images, native)
            sparsectx.enable(pipe, budget=2, selector="uniform", attention="sparsectx")
            assert torch.equal(pipe(**_seeded_klein_call()).images, sparse)
            with sparsectx.sparse_context(pipe, budget=1.0, attention="native"):
                pipe(**_seeded_klein_call())
            assert torch.equal(pipe(**_seeded_klein_call()).images, sparse)
        finally:
            sparsectx.disable(pipe)
    assert _processor_classes(transformer) == diffusers_classes
    with sparsectx.sparse_context(pipe, budget=2, selector="uniform", attention="sparsectx"):  # from dense
        saved = dict(transformer.attn_processors)
        sparsectx.disable(pipe)
        transformer.set_attn_processor(dict(saved))
    assert _processor_classes(transformer) == diffusers_classes


def test_a_klein_budget_of_zero_equals_the_call_without_references():
    """Every token keeps its position in the full sequence, and FLUX.2's references reach the target through
    attention alone: keeping none of them is the call without reference images, bit for bit with native attention
    (docs/drop-in.md says so; Qwen-Image-Edit-Plus is the documented exception)."""
    pipe = _tiny_pipeline(diffusers.Flux2KleinPipeline)
    with torch.no_grad():
        without = pipe(**{**_seeded_klein_call(), "image": None}).images
        with_references = pipe(**_seeded_klein_call()).images
        assert not torch.equal(without, with_references)  # (the references matter)
        for budget in (0, 0.0, [0, 0]):
            sparsectx.enable(pipe, budget=budget, selector="uniform")
            try:
                assert torch.equal(pipe(**_seeded_klein_call()).images, without), budget
            finally:
                sparsectx.disable(pipe)
