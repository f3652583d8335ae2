"""Drop-in Sparse Context for GLM-Image (sparsectx.glmimage, GlmImageTransformer2DModel and GlmImagePipeline): tiny
random-weight models built from configs, CPU, offline. GLM-Image writes each reference image into a KV cache in a
forward of its own (``kv_caches`` in "write" mode: the image's latents alone, no text), before the denoising loop;
every step then reads the cache (its text and target queries attend to the cached keys first). The drop-in runs each
write forward on the image's kept rows, so the cache holds the kept tokens only.

The reference: diffusers' own model with the dropped rows masked as keys in every attention of the write forwards
and of the steps (``masked_keys``: diffusers' attention dispatch given a boolean key mask)."""
import contextlib
import functools

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "GlmImageTransformer2DModel"):
    pytest.skip(f"diffusers {diffusers.__version__} has no GLM-Image", allow_module_level=True)
from diffusers.models.transformers import transformer_glm_image as glm  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
import sparsectx  # noqa: E402
from pipeline_fixtures import tiny_model_fixtures, tiny_pipeline_fixtures  # noqa: E402  (tests/, on sys.path)
from sparsectx import glmimage, integration  # noqa: E402

CHANNELS, TEXT_DIM, CODEBOOK, LAYERS, HEADS, HEAD_DIM = 4, 12, 32, 2, 2, 8
# reference latents [C, H, W] of their own sizes: patch grids 4x4 (16 rows) and 3x5 (15 rows); the target's 4x4
REF_SHAPES = [(CHANNELS, 8, 8), (CHANNELS, 6, 10)]
REF_LENGTHS = [16, 15]
TARGET = (CHANNELS, 8, 8)
N_TEXT = 5


def _build(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=CHANNELS, out_channels=CHANNELS, num_layers=LAYERS, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=CODEBOOK)
    with torch.no_grad():  # (random weights everywhere: every path counts)
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.to(dtype).eval()


model, _always_disabled = tiny_model_fixtures(_build)


def _inputs(seed=1, batch=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n_target = (TARGET[1] // 2) * (TARGET[2] // 2)
    return dict(
        refs=[torch.randn(1, *shape, generator=g, dtype=dtype) for shape in REF_SHAPES],
        ref_prior=[torch.randint(0, CODEBOOK, (n,), generator=g) for n in REF_LENGTHS],
        latents=torch.randn(batch, *TARGET, generator=g, dtype=dtype),
        text=torch.randn(batch, N_TEXT, TEXT_DIM, generator=g, dtype=dtype),
        prior=torch.randint(0, CODEBOOK, (batch, n_target), generator=g))


def _write(model, kv, ref, prior, **kwargs):
    """One write forward (as GlmImagePipeline runs it): the image's latents alone, timestep 0."""
    device = ref.device
    return model(hidden_states=ref, encoder_hidden_states=ref.new_zeros((1, 0, TEXT_DIM)), prior_token_id=prior,
                 prior_token_drop=torch.zeros_like(prior, dtype=torch.bool), timestep=torch.zeros(1, device=device),
                 target_size=torch.tensor([[16.0, 16.0]], device=device), crop_coords=torch.zeros(1, 2, device=device),
                 kv_caches=kv, return_dict=False, **kwargs)[0]


def _step(model, kv, x, text, prior, timestep=500.0, **kwargs):
    batch, device = x.shape[0], x.device
    kv.set_mode("read")
    return model(hidden_states=x, encoder_hidden_states=text, prior_token_id=prior,
                 prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
                 timestep=torch.full((batch,), timestep, device=device),
                 target_size=torch.tensor([[16.0, 16.0]] * batch, device=device),
                 crop_coords=torch.zeros(batch, 2, device=device), kv_caches=kv, return_dict=False, **kwargs)[0]


def _run(model, inputs, refs=None, **kwargs):
    """Writes the references into a new cache (one sample slot), then one step: ``(output, cache)``."""
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    for ref, prior in zip(inputs["refs"] if refs is None else refs, inputs["ref_prior"]):
        _write(model, kv, ref, prior)
    kv.next_sample()
    return _step(model, kv, inputs["latents"], inputs["text"], inputs["prior"], **kwargs), kv


@contextlib.contextmanager
def masked_keys(model, keeps):
    """diffusers' model with the dropped rows masked as keys: the write forward of image i attends to its kept rows
    only (``keeps[i]``, bool [N_i]), a read step to every image's kept cached rows and all its own rows."""
    original = glm.dispatch_attention_fn
    written = []

    def dispatch(query, key, value, attn_mask=None, **kwargs):
        assert attn_mask is None  # (no text padding mask in these calls)
        n_cached = key.shape[1] - query.shape[1]
        if n_cached == 0:  # a write forward: this image's rows (each block stores them, then attends)
            mask = keeps[len(written) // LAYERS]
            written.append(1)
        else:
            mask = torch.cat([*keeps, torch.ones(query.shape[1], dtype=torch.bool)])
        assert mask.numel() == key.shape[1]
        return original(query, key, value, attn_mask=mask.view(1, 1, 1, -1).to(query.device), **kwargs)

    glm.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        glm.dispatch_attention_fn = original


def _keeps_of(seed=7):
    g = torch.Generator().manual_seed(seed)
    keeps = [torch.rand(n, generator=g) < 0.4 for n in REF_LENGTHS]
    for keep in keeps:
        keep[0] = True  # (at least one row kept per image)
    return keeps


def _mask_selector(keeps):
    return lambda latents, context: keeps[REF_LENGTHS.index(latents.shape[1])].expand(latents.shape[0], -1)


def test_supported_names():
    assert integration.SUPPORTED_TRANSFORMERS["GlmImageTransformer2DModel"] == integration.GLM
    assert "GlmImagePipeline" in integration.SUPPORTED_PIPELINES


def test_patch_rows_are_the_image_projectors_rows(model):
    latents = torch.randn(2, CHANNELS, 6, 10, dtype=torch.float64)
    rows = glmimage.patch_rows(latents, 2)
    assert rows.shape == (2, 15, CHANNELS * 4)
    projector = model.image_projector
    assert torch.allclose(projector.proj(rows), projector(latents), rtol=0, atol=1e-12)


def test_dropping_rows_equals_masking_them_as_keys(model):
    """The compacted write forwards store the masked model's keys and values of the kept rows, and a step on that
    cache equals the masked model's step (fp64)."""
    inputs, keeps = _inputs(), _keeps_of()
    with torch.no_grad(), masked_keys(model, keeps):
        expected, full_cache = _run(model, inputs)
    sparsectx.enable(model, budget=None, selector=_mask_selector(keeps))
    with torch.no_grad():
        out, cache = _run(model, inputs)
    kept = torch.cat(keeps)
    for layer, full in zip(cache.caches, full_cache.caches):
        assert layer.k_caches[0].shape[1] == int(kept.sum())
        assert torch.allclose(layer.k_caches[0], full.k_caches[0][:, kept], rtol=0, atol=1e-10)
        assert torch.allclose(layer.v_caches[0], full.v_caches[0][:, kept], rtol=0, atol=1e-10)
    assert torch.allclose(out, expected, rtol=0, atol=1e-10)
    with torch.no_grad():
        plain, _ = _run(_build(), inputs)  # (the same weights, nothing dropped: dropping changed the output)
    assert (plain - out).abs().max() > 1e-3


def test_a_write_forward_dropping_prior_tokens_equals_masking_keys(model):
    """A write forward's ``prior_token_drop`` (diffusers zeroes the dropped rows' prior embedding) is taken at the
    kept rows, as ``prior_token_id`` is: the cache and the step equal the key-masked model's (every other test
    passes an all-False drop, under which any columns of it pass)."""
    inputs, keeps = _inputs(), _keeps_of()
    g = torch.Generator().manual_seed(11)
    drops = [torch.rand(p.shape, generator=g) < 0.5 for p in inputs["ref_prior"]]

    def run():
        kv = glm.GlmImageKVCache(LAYERS)
        kv.set_mode("write")
        for ref, prior, drop in zip(inputs["refs"], inputs["ref_prior"], drops):
            model(hidden_states=ref, encoder_hidden_states=ref.new_zeros((1, 0, TEXT_DIM)), prior_token_id=prior,
                  prior_token_drop=drop, timestep=torch.zeros(1), target_size=torch.tensor([[16.0, 16.0]]),
                  crop_coords=torch.zeros(1, 2), kv_caches=kv, return_dict=False)
        kv.next_sample()
        return _step(model, kv, inputs["latents"], inputs["text"], inputs["prior"]), kv

    with torch.no_grad(), masked_keys(model, keeps):
        expected, full_cache = run()
    sparsectx.enable(model, budget=None, selector=_mask_selector(keeps))
    with torch.no_grad():
        out, cache = run()
    kept = torch.cat(keeps)
    for layer, full in zip(cache.caches, full_cache.caches):
        assert torch.allclose(layer.k_caches[0], full.k_caches[0][:, kept], rtol=0, atol=1e-10)
    assert torch.allclose(out, expected, rtol=0, atol=1e-10)


def test_a_write_forwards_output_rows_are_at_their_positions(model):
    """A compacted write forward returns its output rows at their positions of the image, zeros elsewhere (the
    pipeline discards that output and no test read it: rows written at the first positions passed the suite)."""
    inputs, keeps = _inputs(), _keeps_of()
    outs = {}
    for name in ("masked", "sparse"):
        if name == "sparse":
            sparsectx.enable(model, budget=None, selector=_mask_selector(keeps))
        kv = glm.GlmImageKVCache(LAYERS)
        kv.set_mode("write")
        with torch.no_grad(), (masked_keys(model, keeps) if name == "masked" else contextlib.nullcontext()):
            outs[name] = [glmimage.patch_rows(_write(model, kv, ref, prior), 2)
                          for ref, prior in zip(inputs["refs"], inputs["ref_prior"])]
    for masked, sparse, keep in zip(outs["masked"], outs["sparse"], keeps):
        assert 0 < int(keep.sum()) < keep.numel()
        assert torch.allclose(sparse[:, keep], masked[:, keep], rtol=0, atol=1e-10)
        assert not sparse[:, ~keep].any()


def _to(inputs, device, dtype):
    return {name: [t.to(device, dtype if t.is_floating_point() else t.dtype) for t in value]
            if isinstance(value, list) else value.to(device, dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()}


def _bf16_check(device):
    """In bf16 the drop-in (compacted writes, then a step) is as close to the key-masked model in fp64 as the
    key-masked model in bf16 is (the flash criterion: at most twice its error, plus fp32 resolution)."""
    keeps = _keeps_of()
    model64 = _build()
    model = _build().to(device, torch.bfloat16)
    inputs = _inputs()
    with torch.no_grad():
        with masked_keys(model64, keeps):
            exact, _ = _run(model64, inputs)
        bf16 = _to(inputs, device, torch.bfloat16)
        with masked_keys(model, keeps):
            masked, _ = _run(model, bf16)
        sparsectx.enable(model, budget=None, selector=_mask_selector([k.to(device) for k in keeps]))
        try:
            dropped, cache = _run(model, bf16)
        finally:
            sparsectx.disable(model)
    assert dropped.dtype == torch.bfloat16 and cache.caches[0].k_caches[0].shape[1] == int(torch.cat(keeps).sum())
    error, native_error = ((x.cpu().double() - exact).abs().max() for x in (dropped, masked))
    assert error <= 2 * native_error + 1e-6 * exact.abs().max(), (error, native_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_dropping_rows_equals_masking_keys():
    _bf16_check("cuda")


def test_bf16_dropping_rows_equals_masking_keys_on_the_cpu():
    _bf16_check("cpu")


def test_keep_all_runs_diffusers_forward_and_disable_restores(model):
    inputs = _inputs()
    with torch.no_grad():
        expected, _ = _run(model, inputs)
        sparsectx.enable(model, budget=1.0)
        assert torch.equal(_run(model, inputs)[0], expected)
        sparsectx.enable(model, budget=0.5, selector="uniform")
        assert (_run(model, inputs)[0] - expected).abs().max() > 1e-3
        sparsectx.disable(model)
        assert torch.equal(_run(model, inputs)[0], expected)
    assert "forward" not in model.__dict__


def test_per_image_budget_and_counts(model):
    """A per-image budget: each write forward stores its image's entry (a ratio and a count here)."""
    sparsectx.enable(model, budget=[0.5, 3], selector="uniform")
    with torch.no_grad():
        _, cache = _run(model, _inputs())
    assert cache.caches[0].k_caches[0].shape[1] == 8 + 3
    # a third entry for a request of two images: refused at the first read step, once the cache's images are known
    # (a write forward can not know how many follow it), as the other families refuse it (applied silently before)
    sparsectx.enable(model, budget=[0.5, 3, 0.1], selector="uniform")
    with torch.no_grad(), pytest.raises(ValueError, match=r"budget has 3 per-image entries for request 1, but its "
                                                          r"KV-cache write forwards stored 2 reference images"):
        _run(model, _inputs())
    sparsectx.enable(model, budget=[[0.5, 3]], selector="uniform")  # (one request's list: its images' entries)
    with torch.no_grad():
        _, cache = _run(model, _inputs())
    assert cache.caches[0].k_caches[0].shape[1] == 8 + 3
    sparsectx.enable(model, budget=[0.5], selector="uniform")
    with torch.no_grad():
        _, cache = _run(model, _inputs())
    assert cache.caches[0].k_caches[0].shape[1] == 8 + 8  # (round half up: 7.5 -> 8)


def test_a_write_beyond_the_per_image_budget_is_refused(model):
    inputs = _inputs()
    sparsectx.enable(model, budget=[0.5, 0.5], selector="uniform")
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with torch.no_grad():
        for ref, prior in zip(inputs["refs"], inputs["ref_prior"]):
            _write(model, kv, ref, prior)
        with pytest.raises(ValueError, match="2 per-image entries, but request 1 writes a reference image 3"):
            _write(model, kv, inputs["refs"][0], inputs["ref_prior"][0])


def test_slot_written_while_disabled_refuses_a_per_image_budget(model):
    inputs = _inputs()
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with torch.no_grad():
        _write(model, kv, inputs["refs"][0], inputs["ref_prior"][0])  # (not enabled)
        sparsectx.enable(model, budget=[0.5, 0.25], selector="uniform")
        with pytest.raises(ValueError, match="per-image budget needs to know which reference image"):
            _write(model, kv, inputs["refs"][1], inputs["ref_prior"][1])
        sparsectx.enable(model, budget=0.25, selector="uniform")  # (one value for every image: no need to know)
        _write(model, kv, inputs["refs"][1], inputs["ref_prior"][1])
    assert kv.caches[0].k_caches[0].shape[1] == 16 + 4


def test_budget_zero_stores_an_empty_slot_of_the_keys_dtype(model):
    """No row kept: the sample's slot is made (the next sample's is the next one), empty, of the keys' dtype; the
    step equals a step on a cache holding nothing of that sample."""
    inputs = _inputs()
    sparsectx.enable(model, budget=0)
    other = glm.GlmImageKVCache(LAYERS)
    other.set_mode("write")
    with torch.no_grad():
        out, cache = _run(model, inputs)
        written = _write(model, other, inputs["refs"][0], inputs["ref_prior"][0])
    assert all(layer.k_caches[0].shape == (1, 0, HEADS, HEAD_DIM) and layer.k_caches[0].dtype == torch.float64
               for layer in cache.caches)
    assert written.shape == inputs["refs"][0].shape and not written.any()  # (no row kept: a zero output)
    sparsectx.disable(model)
    empty = glm.GlmImageKVCache(LAYERS)
    for layer in empty.caches:
        layer.k_caches = [torch.zeros(1, 0, HEADS, HEAD_DIM, dtype=torch.float64)]
        layer.v_caches = [torch.zeros(1, 0, HEADS, HEAD_DIM, dtype=torch.float64)]
    with torch.no_grad():
        expected = _step(model, empty, inputs["latents"], inputs["text"], inputs["prior"])
    assert torch.equal(out, expected)


def test_random_selector_with_a_seed_draws_each_image_its_own(model):
    """``seed`` makes the draws repeatable; the references of a request, selected one write forward each, draw
    apart (two images of one size keep different positions)."""
    inputs = _inputs()
    same_size = [inputs["refs"][0], inputs["refs"][0] + 1.0]
    kept = []
    sparsectx.enable(model, budget=0.25, selector="random", seed=3)
    for _ in range(2):
        kv = glm.GlmImageKVCache(LAYERS)
        kv.set_mode("write")
        with torch.no_grad():
            for ref in same_size:
                _write(model, kv, ref, inputs["ref_prior"][0])
                kept.append(sparsectx.last_selection(model).keep)
    assert torch.equal(kept[0], kept[2]) and torch.equal(kept[1], kept[3])
    assert not torch.equal(kept[0], kept[1])


def test_selectors_needing_the_probe_are_refused_by_name(model):
    inputs = _inputs()
    for selector, match in (("attention", "selector 'attention' on GLM-Image needs signals"),
                            ("edit", "selector 'edit' on GLM-Image needs signals")):
        sparsectx.enable(model, budget=0.25, selector=selector)
        with pytest.raises(ValueError, match=match), torch.no_grad():
            _run(model, inputs)
    # 'edit' given the user's region keeps it
    region = torch.zeros(1, REF_LENGTHS[0], dtype=torch.bool)
    region[0, 5:9] = True
    sparsectx.enable(model, budget=4, selector="edit", signals={"user_mask": region})
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with torch.no_grad():
        _write(model, kv, inputs["refs"][0], inputs["ref_prior"][0])
    assert torch.equal(sparsectx.last_selection(model).keep, region)


def test_subject_keeps_a_planted_subject_by_saliency(model):
    """'subject' runs on its saliency signal alone (no probe): a subject planted in the middle of the image is
    what it keeps."""
    ref = torch.zeros(1, CHANNELS, 8, 8, dtype=torch.float64) + 0.01 * torch.randn(1, CHANNELS, 8, 8,
                                                                                   dtype=torch.float64)
    ref[..., 2:6, 2:6] += 3.0  # patches (1..2, 1..2) of the 4x4 grid
    subject = torch.zeros(4, 4, dtype=torch.bool)
    subject[1:3, 1:3] = True
    sparsectx.enable(model, budget=4, selector="subject")
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with torch.no_grad():
        _write(model, kv, ref, _inputs()["ref_prior"][0])
    assert torch.equal(sparsectx.last_selection(model).keep[0], subject.flatten())


def test_a_write_batch_keeping_different_tokens_is_refused(model):
    inputs = _inputs()
    refs = torch.cat([inputs["refs"][0], inputs["refs"][0] + 1.0])
    prior = inputs["ref_prior"][0]
    keep = torch.zeros(2, REF_LENGTHS[0], dtype=torch.bool)
    keep[0, :4], keep[1, 4:8] = True, True
    sparsectx.enable(model, budget=None, selector=lambda latents, context: keep)
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with pytest.raises(ValueError, match="keep different tokens, but a write stores one set of rows"), \
            torch.no_grad():
        model(hidden_states=refs, encoder_hidden_states=refs.new_zeros((2, 0, TEXT_DIM)), prior_token_id=prior,
              prior_token_drop=torch.zeros_like(prior, dtype=torch.bool), timestep=torch.zeros(2),
              target_size=torch.tensor([[16.0, 16.0]] * 2), crop_coords=torch.zeros(2, 2), kv_caches=kv)


def test_budget_object_with_per_image_settings_is_refused(model):
    sparsectx.enable(model, budget=sparsectx.selection.fixed_ratio([0.25, 0.5]), selector="uniform")
    with pytest.raises(ValueError, match="a budget object takes one value per setting there"), torch.no_grad():
        _run(model, _inputs())
    sparsectx.enable(model, budget=sparsectx.selection.fixed_ratio(0.25), selector="uniform")
    with torch.no_grad():
        _, cache = _run(model, _inputs())
    assert cache.caches[0].k_caches[0].shape[1] == 4 + 4


def test_sparsectx_attention_and_masked_drop_training_are_refused(model):
    with pytest.raises(ValueError, match="attention='sparsectx' is not available for GLM-Image"):
        sparsectx.enable(model, budget=0.5, attention="sparsectx")
    assert integration.PATCH_ATTR not in model.__dict__ and "forward" not in model.__dict__
    with pytest.raises(TypeError, match="GLM-Image, train with the dropped references removed"):
        sparsectx.enable_drop_training(model)


def test_random_drop_training_gradients_equal_the_masked_model(model):
    """Removal-based drop training (``random_drop_selector`` on a train-mode transformer): each write forward draws
    its mask, and the gradients of a loss on the step's output equal the masked model's (fp64)."""
    inputs = _inputs()
    trained = _build()
    trained.train()
    generator = torch.Generator().manual_seed(11)
    sparsectx.enable(trained, budget=None, selector=sparsectx.random_drop_selector((0.2, 0.6), generator))
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    keeps = []  # the masks the write forwards drew
    for ref, prior in zip(inputs["refs"], inputs["ref_prior"]):
        _write(trained, kv, ref, prior)
        keeps.append(sparsectx.last_selection(trained).keep[0])
    kv.next_sample()
    out = _step(trained, kv, inputs["latents"], inputs["text"], inputs["prior"])
    assert all(0 < int(keep.sum()) < keep.numel() for keep in keeps)
    (out ** 2).sum().backward()
    grads = {name: p.grad.clone() for name, p in trained.named_parameters() if p.grad is not None}
    sparsectx.disable(trained)
    trained.zero_grad()
    with masked_keys(trained, keeps):
        expected, _ = _run(trained, inputs)
    assert torch.allclose(out, expected, rtol=0, atol=1e-10)
    (expected ** 2).sum().backward()
    assert len(grads) == len([p for p in trained.parameters() if p.grad is not None])
    for name, p in trained.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-9, atol=1e-9), name


# -- the pipeline ----------------------------------------------------------------------------------------------------
VAE_CHANNELS = (8, 16)  # two levels: the VAE downsamples 2x; a transformer token is 4x4 pixels (patch 2)
IMAGES = [(32, 32), (24, 40)]  # (h, w) pixels: latent patch grids 8x8 (64 rows) and 6x10 (60 rows)
IMAGE_ROWS = [64, 60]
HEIGHT = WIDTH = 32


def _make_pipe():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=list(VAE_CHANNELS), latent_channels=CHANNELS,
        norm_num_groups=4, layers_per_block=1, latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.0, 0.8, 1.2, 0.9])
    pipe = diffusers.GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None,
                                      vision_language_encoder=None, vae=vae.eval(), transformer=_build(),
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    return pipe.to(torch.float64)


pipe, _always_disabled_pipe = tiny_pipeline_fixtures(_make_pipe)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in IMAGES]


def _requests(count=2):
    """Per request (prompt): its embeddings, its AR tokens, its reference images and their AR tokens and grids, its
    initial noise (given: no text encoder or AR model here)."""
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor([[1, h // 4, w // 4] for h, w in IMAGES])
    return [dict(embeds=torch.randn(1, N_TEXT, TEXT_DIM, generator=g, dtype=torch.float64),
                 prior=torch.randint(0, CODEBOOK, (1, (HEIGHT // 4) * (WIDTH // 4)), generator=g),
                 images=_images(r), ref_prior=torch.randint(0, CODEBOOK, (sum(IMAGE_ROWS),), generator=g), grid=grid,
                 latents=torch.randn(1, CHANNELS, HEIGHT // 2, WIDTH // 2, generator=g, dtype=torch.float64))
            for r in range(count)]


def _call(pipe, requests=None, seed=None, **kwargs):
    """A pipeline call on ``requests`` (default: the first of ``_requests``), output latents; ``seed``: a generator
    of that seed, else the requests' own noise."""
    requests = requests or _requests(1)
    embeds = torch.cat([r["embeds"] for r in requests])
    noise = {} if seed is not None else {"latents": torch.cat([r["latents"] for r in requests])}
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                image=[r["images"] for r in requests], height=HEIGHT, width=WIDTH, num_inference_steps=2,
                prior_token_ids=torch.cat([r["prior"] for r in requests]),
                prior_token_image_ids=[r["ref_prior"] for r in requests],
                source_image_grid_thw=[r["grid"] for r in requests], output_type="latent",
                **{"generator": None if seed is None else torch.Generator().manual_seed(seed), **noise,
                   **kwargs}).images


def test_pipeline_keep_all_and_disable(pipe):
    checks.check_keep_all_and_disable(pipe, functools.partial(_call, pipe))


def test_pipeline_tokens_reaching_the_blocks(pipe):
    """Each write forward runs its image's kept rows through the blocks and stores them; every step's target rows
    attend to the kept cached rows (the per-image budget: a ratio and a count), then the text and target."""
    seen = []

    def record(block, args, kwargs):
        seen.append((kwargs["kv_cache"].mode, args[0].shape[1], sum(k.shape[1] for k in kwargs["kv_cache"].k_caches)))

    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        sparsectx.enable(pipe, budget=[0.25, 7], selector="uniform")
        _call(pipe, guidance_scale=1.0)
    finally:
        handle.remove()
    assert seen == [("write", 16, 0), ("write", 7, 16), ("read", 64, 23), ("read", 64, 23)]


def test_pipeline_mixed_budgets_equal_each_request_alone(pipe):
    """Two prompts whose budgets differ: their cache slots differ in length (diffusers' read concatenates slots:
    the drop-in reads each slot in a forward of its own); each sample equals its prompt run alone."""
    requests = _requests(2)
    sparsectx.enable(pipe, budget=[[0.25], [0.5]], selector="uniform")
    both = _call(pipe, requests)
    sparsectx.enable(pipe, budget=0.25, selector="uniform")
    first = _call(pipe, requests[:1])
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    second = _call(pipe, requests[1:])
    assert torch.allclose(both, torch.cat([first, second]), rtol=0, atol=1e-12)
    sparsectx.enable(pipe, budget=0.25, selector="uniform")
    assert (_call(pipe, requests[1:]) - second).abs().max() > 1e-3  # (the budgets made a difference)


def test_pipeline_mixed_budgets_with_two_images_per_prompt_equal_each_request_alone(pipe):
    """The same with two images per prompt: a read step whose slots differ runs one forward per slot on its batch
    rows, ``batch // slots`` consecutive rows per slot as diffusers lays them out (with one image per prompt any
    assignment of rows to slots gave the same result: an interleaved one passed the suite). Without guidance:
    diffusers' GlmImagePipeline fails with it at two images per prompt, sparsectx or not."""
    requests = _requests(2)
    noise = torch.randn(4, CHANNELS, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    sparsectx.enable(pipe, budget=[[0.25], [0.5]], selector="uniform")
    both = _call(pipe, requests, num_images_per_prompt=2, latents=noise, guidance_scale=1.0)
    sparsectx.enable(pipe, budget=0.25, selector="uniform")
    first = _call(pipe, requests[:1], num_images_per_prompt=2, latents=noise[:2], guidance_scale=1.0)
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    second = _call(pipe, requests[1:], num_images_per_prompt=2, latents=noise[2:], guidance_scale=1.0)
    assert both.shape[0] == 4
    assert torch.allclose(both, torch.cat([first, second]), rtol=0, atol=1e-12), \
        (both - torch.cat([first, second])).abs().amax(dim=(1, 2, 3))


def test_pipeline_per_call_budget(pipe):
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    seen = []
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda block, args, kwargs: seen.append(args[0].shape[1]) if kwargs["kv_cache"].mode == "write" else None,
        with_kwargs=True)
    try:
        _call(pipe, attention_kwargs={"sparsectx": {"budget": [2, 0.2]}})
        _call(pipe)
    finally:
        handle.remove()
    assert seen == [2, 12, 32, 30]


def test_pipeline_generator_seeds_selection(pipe):
    checks.check_generator_seeds_selection(pipe, lambda seed: _call(pipe, seed=seed))


def _write_keeps(pipe):
    """``(keeps, handle)``: the keep mask of each write forward of the pipeline's transformer, in order."""
    keeps = []

    def record(module, args, kwargs, output):
        if kwargs["kv_caches"] is not None and kwargs["kv_caches"].caches[0].mode == "write":
            keeps.append(sparsectx.last_selection(module).keep)

    return keeps, pipe.transformer.register_forward_hook(record, with_kwargs=True)


def test_pipeline_generators_per_image_seed_each_prompt(pipe):
    """One generator per image: each prompt's references draw from its first image's generator, as that prompt
    alone with its generators draws (the images of a prompt share its cache slot)."""
    requests = _requests(2)
    keeps, handle = _write_keeps(pipe)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    try:
        sparsectx.enable(pipe, budget=0.25, selector="random")
        _call(pipe, requests, generator=[gen(1), gen(2)], guidance_scale=1.0)
        both = list(keeps)
        keeps.clear()
        _call(pipe, requests[1:], generator=[gen(2)], guidance_scale=1.0)
        alone = list(keeps)
        keeps.clear()
        _call(pipe, requests[1:], generator=gen(1), guidance_scale=1.0)
        other = list(keeps)
        keeps.clear()  # two images per prompt: the generators [g1, g9, g2, g9], prompt 2's first image's is g2
        _call(pipe, requests, generator=[gen(1), gen(9), gen(2), gen(9)], num_images_per_prompt=2,
              guidance_scale=1.0, latents=torch.zeros(4, CHANNELS, HEIGHT // 2, WIDTH // 2, dtype=torch.float64))
        per_prompt = list(keeps)
    finally:
        handle.remove()
    assert len(both) == 4 and all(torch.equal(a, b) for a, b in zip(both[2:], alone))
    assert not torch.equal(both[2], both[0]) and not torch.equal(alone[0], other[0])
    assert len(per_prompt) == 4 and all(torch.equal(a, b) for a, b in zip(per_prompt, both))


def test_pipeline_per_sample_budget_entries_are_refused(pipe):
    """GLM-Image's requests are its prompts: a per-request budget with one entry per image of a prompt's
    ``num_images_per_prompt`` (which share the prompt's cache slot) is refused, not read per prompt."""
    sparsectx.enable(pipe, budget=[[0.25], [0.5]], selector="uniform")
    with pytest.raises(ValueError, match="2 per-request entries, but the KV cache holds the references of 1 "):
        _call(pipe, num_images_per_prompt=2, guidance_scale=1.0,
              latents=torch.zeros(2, CHANNELS, HEIGHT // 2, WIDTH // 2, dtype=torch.float64))


def test_pipeline_same_image_twice_draws_twice(pipe):
    """A request whose references are one image twice: with a seed, each of its images draws its own (the second
    write does not reuse the first's selection)."""
    request = _requests(1)[0]
    request = {**request, "images": [request["images"][0]] * 2,
               "grid": torch.tensor([[1, 8, 8], [1, 8, 8]]), "ref_prior": request["ref_prior"][:64].repeat(2)}
    keeps, handle = _write_keeps(pipe)
    try:
        sparsectx.enable(pipe, budget=0.25, selector="random", seed=3)
        _call(pipe, [request], guidance_scale=1.0)
    finally:
        handle.remove()
    assert len(keeps) == 2 and not torch.equal(keeps[0], keeps[1])


def test_the_largest_seed_runs(model):
    """A seed near 2^64 (a generator seeded with -1 has 2^64 - 1) draws for each image without overflowing."""
    sparsectx.enable(model, budget=0.25, selector="random", seed=2 ** 64 - 1)
    with torch.no_grad():
        _, cache = _run(model, _inputs())
    assert cache.caches[0].k_caches[0].shape[1] == 4 + 4


def test_last_selection_of_a_transformer_enabled_alone(pipe):
    """The transformer enabled alone: the steps (their prompt is not the writes') report the cache's latest write."""
    keeps, handle = _write_keeps(pipe)
    try:
        sparsectx.enable(pipe.transformer, budget=0.25, selector="uniform")
        _call(pipe, guidance_scale=1.0)
    finally:
        handle.remove()
    selection = sparsectx.last_selection(pipe.transformer)
    assert selection is not None and torch.equal(selection.keep, keeps[-1])


def test_user_mask_over_the_requests_reference_rows(pipe):
    """'edit' with a ``user_mask`` over every reference row of the request (its images in order): each write forward
    reads its image's columns; one row per request serves each prompt."""
    mask = torch.zeros(2, sum(IMAGE_ROWS), dtype=torch.bool)
    mask[0, [3, 10, 40, 63]] = True  # image 0 of prompt 0
    mask[0, [64, 70, 100, 123]] = True  # image 1 of prompt 0
    mask[1, [0, 1, 2, 3, 64, 65, 66, 67]] = True  # prompt 1
    keeps, handle = _write_keeps(pipe)
    try:
        sparsectx.enable(pipe, budget=4, selector="edit", signals={"user_mask": mask})
        _call(pipe, _requests(2), guidance_scale=1.0)
    finally:
        handle.remove()
    expected = [mask[0, :64], mask[0, 64:], mask[1, :64], mask[1, 64:]]
    assert [k[0].nonzero().flatten().tolist() for k in keeps] == [e.nonzero().flatten().tolist() for e in expected]
    sparsectx.enable(pipe, budget=4, selector="edit", signals={"user_mask": mask[:1, :64]})
    with pytest.raises(ValueError, match=r"signals\['user_mask'\] has 64 columns"):
        _call(pipe, guidance_scale=1.0)
    # columns beyond the request's reference rows: refused at the first read step (ignored before)
    wider = torch.cat([mask[:1], torch.ones(1, 5, dtype=torch.bool)], dim=1)
    sparsectx.enable(pipe, budget=4, selector="edit", signals={"user_mask": wider})
    with pytest.raises(ValueError, match=rf"signals\['user_mask'\] has {sum(IMAGE_ROWS) + 5} columns for request 1, "
                                         rf"but its KV-cache write forwards stored 2 reference images "
                                         rf"\({sum(IMAGE_ROWS)} rows\)"):
        _call(pipe, guidance_scale=1.0)


def test_layers_in_other_modes_run_as_diffusers_runs_them(model):
    """A step whose layers read and skip the cache (no layer writes) is run by diffusers' forward as it is."""
    inputs = _inputs()
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with torch.no_grad():
        for ref, prior in zip(inputs["refs"], inputs["ref_prior"]):
            _write(model, kv, ref, prior)
        kv.set_mode("read")
        kv.caches[1].mode = "skip"
        step = lambda: model(hidden_states=inputs["latents"], encoder_hidden_states=inputs["text"],  # noqa: E731
                             prior_token_id=inputs["prior"],
                             prior_token_drop=torch.zeros_like(inputs["prior"], dtype=torch.bool),
                             timestep=torch.full((1,), 500.0), target_size=torch.tensor([[16.0, 16.0]]),
                             crop_coords=torch.zeros(1, 2), kv_caches=kv, return_dict=False)[0]
        expected = step()
        sparsectx.enable(model, budget=0.25, selector="uniform")
        assert torch.equal(step(), expected)


def test_budget_objects_of_one_value(model):
    for budget in (sparsectx.selection.fixed_ratio([0.25]), sparsectx.selection.fixed_ratio(torch.tensor([[0.25]]))):
        sparsectx.enable(model, budget=budget, selector="uniform")
        with torch.no_grad():
            _, cache = _run(model, _inputs())
        assert cache.caches[0].k_caches[0].shape[1] == 4 + 4


def test_pipeline_one_prompts_generators_draw_as_its_first(pipe):
    """One prompt, two images per prompt, generators [g1, g9]: its references draw as with g1 alone, each image its
    own draw."""
    keeps, handle = _write_keeps(pipe)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    noise = torch.zeros(2, CHANNELS, HEIGHT // 2, WIDTH // 2, dtype=torch.float64)
    try:
        sparsectx.enable(pipe, budget=0.25, selector="random")
        _call(pipe, generator=[gen(1), gen(9)], num_images_per_prompt=2, guidance_scale=1.0, latents=noise)
        pair = list(keeps)
        keeps.clear()
        _call(pipe, generator=gen(1), guidance_scale=1.0)
    finally:
        handle.remove()
    assert len(pair) == 2 and all(torch.equal(a, b) for a, b in zip(pair, keeps))
    assert pair[0][0, :15].tolist() != pair[1][0, :15].tolist()  # (not one stream cut to each image's length)


def test_user_mask_rows_must_be_one_per_prompt(pipe):
    mask = torch.zeros(3, sum(IMAGE_ROWS), dtype=torch.bool)
    mask[:, [0, 1, 64, 65]] = True
    sparsectx.enable(pipe, budget=2, selector="edit", signals={"user_mask": mask})
    with pytest.raises(ValueError, match=r"signals\['user_mask'\] has 3 per-request entries, but the KV cache holds "
                                         "the references of 2 requests"):
        _call(pipe, _requests(2), guidance_scale=1.0)
    with pytest.warns(Warning, match="does not read the signals"):  # (unread: not sliced, not refused)
        sparsectx.enable(pipe, budget=2, selector="random", seed=0, signals={"user_mask": mask[:1, :64]})
    _call(pipe, guidance_scale=1.0)


def test_the_read_check_reads_the_writes_settings(model):
    """A step is checked against the per-request budget its cache's writes took (given per call here), not against
    enable's, which no forward used."""
    inputs = _inputs()
    sparsectx.enable(model, budget=[[0.25], [0.5], [1.0]], selector="uniform")
    kv = glm.GlmImageKVCache(LAYERS)
    kv.set_mode("write")
    with torch.no_grad():
        for slot in range(2):
            for ref, prior in zip(inputs["refs"], inputs["ref_prior"]):
                _write(model, kv, ref, prior, attention_kwargs={"sparsectx": {"budget": [[0.25], [0.5]]}})
            kv.next_sample()
        latents, text, prior = (torch.cat([x, x]) for x in (inputs["latents"], inputs["text"], inputs["prior"]))
        _step(model, kv, latents, text, prior)
    assert [k.shape[1] for k in kv.caches[0].k_caches] == [4 + 4, 8 + 8]


def test_sweep_reports_the_share_kept_over_every_reference_image(pipe):
    """GLM-Image selects each reference image in a write forward of its own: the sweep's ``kept`` was the last
    image's share alone (7 / 60 for both settings below); it is now over every image of the call."""
    requests = _requests(1)
    embeds = torch.cat([r["embeds"] for r in requests])
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                  image=[r["images"] for r in requests], height=HEIGHT, width=WIDTH, num_inference_steps=2,
                  prior_token_ids=torch.cat([r["prior"] for r in requests]),
                  prior_token_image_ids=[r["ref_prior"] for r in requests],
                  source_image_grid_thw=[r["grid"] for r in requests], guidance_scale=1.0, output_type="latent")
    settings = [{"budget": [0.25, 7], "selector": "uniform"}, {"budget": [0.75, 7], "selector": "uniform"}]
    result = sparsectx.sweep(pipe, settings, warmup=0, progress=False, **kwargs)
    _, quarter, three_quarters = result.rows
    assert quarter.kept == pytest.approx((16 + 7) / sum(IMAGE_ROWS))
    assert three_quarters.kept == pytest.approx((48 + 7) / sum(IMAGE_ROWS))


def test_sweep_refuses_a_setting_enable_would_refuse_before_any_call(pipe):
    """attention='sparsectx' has no GLM-Image processor: the sweep refused it only in that row's own call, after the
    earlier rows' calls; now before the first call, naming the setting."""
    forwards = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=r"settings\[1\]: attention='sparsectx' is not available for GLM-Image"):
            sparsectx.sweep(pipe, [{"budget": 0.5}, {"budget": 0.5, "attention": "sparsectx"}], warmup=0,
                            progress=False, output_type="latent")
    finally:
        handle.remove()
    assert forwards == []
