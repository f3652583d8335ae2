"""The automatic attention probe of sparsectx.enable (sparsectx.integration): tiny random-weight FLUX.2 / FLUX.1
(Kontext layout) / LongCat-Image (its edit layout) / Bria FIBO (its edit layout, the prompt's padding as a key mask) /
Qwen-Image models built from configs, fp32, CPU, offline. The probe's q/k are checked against
``processors._joint_qkv`` (FLUX, LongCat, FIBO) / ``processors._qwen_joint_qkv`` applied by hand to the first
double-stream block's attention inputs."""
import contextlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers import transformer_bria_fibo, transformer_flux, transformer_flux2  # noqa: E402
from diffusers.models.transformers import transformer_longcat_image  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
import sparsectx  # noqa: E402
from sparsectx import integration, processors, selection  # noqa: E402
from sparsectx.reference import topk_keep_mask  # noqa: E402

HEADS, HEAD_DIM = 2, 16
TEXT_TOKENS, TEXT_DIM = 6, 32
TARGET_HW = (4, 4)
# FLUX.1 Kontext: one reference; LongCat: two (planes 2 and 3; its pipeline passes one)
REF_HWS = {"flux2": ((3, 3), (2, 4)), "flux": ((3, 3),), "qwen": ((3, 3), (2, 4)), "longcat": ((3, 3), (2, 4)),
           "fibo": ((3, 3), (2, 4))}
N_TARGET = TARGET_HW[0] * TARGET_HW[1]
DOUBLE_LAYERS = 2  # so the last double-stream block is not the probed one
BUDGET = 3  # kept tokens per reference image
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6  # fp32 rounding of a matrix product whose row count differs
FLUX_FAMILIES = ("flux2", "flux", "longcat", "fibo")  # (the families with ids)
FAMILIES = (*FLUX_FAMILIES, "qwen")
PADDED_TEXT = 2  # Qwen-Image, FIBO: the last sample's prompt ends with this many padding tokens
FIBO_TEXT_LAYER_DIM = 24
PROJECTIONS = {"flux2": transformer_flux2._get_qkv_projections, "flux": transformer_flux._get_qkv_projections,
               "longcat": transformer_longcat_image._get_qkv_projections,
               "fibo": transformer_bria_fibo._get_qkv_projections}


# ----------------------------------------------------------------------------------------------------------------
# tiny models and their inputs (target tokens first, then the references: the pipelines' layout)
# ----------------------------------------------------------------------------------------------------------------
def _build_model(family):
    torch.manual_seed(0)
    if family == "flux2":
        return diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=8, num_layers=DOUBLE_LAYERS, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=DOUBLE_LAYERS, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16,
            guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    if family == "longcat":
        return diffusers.LongCatImageTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=DOUBLE_LAYERS, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6)).eval()
    if family == "fibo":
        return diffusers.BriaFiboTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=DOUBLE_LAYERS, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, text_encoder_dim=FIBO_TEXT_LAYER_DIM,
            axes_dims_rope=(4, 6, 6)).eval()
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=DOUBLE_LAYERS, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6)).eval()


@pytest.fixture(scope="module")
def models():
    return {family: _build_model(family) for family in FAMILIES}


@pytest.fixture(autouse=True)
def _always_disabled(models):
    yield
    for model in models.values():
        integration.disable(model)


def _grid_ids(plane, hw, n_axes, start=0):
    h, w = hw
    grid = torch.cartesian_prod(torch.tensor([plane]), torch.arange(h) + start, torch.arange(w) + start)
    return torch.cat([grid, torch.zeros(h * w, 1, dtype=grid.dtype)], 1) if n_axes == 4 else grid


def _inputs(family, batch=2, shared=False, seed=1, same_prompt=None):
    """Forward kwargs; ``shared``: every sample holds the first sample's reference latents and (unless
    ``same_prompt`` is False) its prompt (text embedding, pooled embedding, padding mask), as with several images
    per prompt."""
    same_prompt = shared if same_prompt is None else same_prompt
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g)
    timestep = torch.full((batch,), 0.7)
    hws = REF_HWS[family]
    seq = N_TARGET + sum(h * w for h, w in hws)
    hidden = torch.randn(batch, seq, 16 if family == "qwen" else 8, generator=g)
    if shared:
        hidden[1:, N_TARGET:] = hidden[:1, N_TARGET:]
    if same_prompt:
        text[1:] = text[:1]
    if family == "qwen":
        shapes = [[(1, *TARGET_HW), *[(1, h, w) for h, w in hws]]] * batch
        text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
        text_mask[-1 if not same_prompt else slice(None), -PADDED_TEXT:] = 0
        return dict(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                    timestep=timestep, img_shapes=shapes, return_dict=False)
    if family == "flux2":
        ids = torch.cat([_grid_ids(0, TARGET_HW, 4)] + [_grid_ids(10 * (i + 1), hw, 4) for i, hw in enumerate(hws)])
        txt_ids = torch.cartesian_prod(*[torch.zeros(1, dtype=torch.long)] * 3, torch.arange(TEXT_TOKENS))
        return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep,
                    img_ids=ids[None].expand(batch, -1, -1), txt_ids=txt_ids[None].expand(batch, -1, -1),
                    return_dict=False)
    if family == "longcat":  # its pipeline's ids: the text on plane 0, the images past the text's positions
        ids = torch.cat([_grid_ids(1, TARGET_HW, 3, TEXT_TOKENS)]
                        + [_grid_ids(2 + i, hw, 3, TEXT_TOKENS) for i, hw in enumerate(hws)]).double()
        txt_ids = torch.stack([torch.zeros(TEXT_TOKENS), torch.arange(TEXT_TOKENS), torch.arange(TEXT_TOKENS)], 1)
        return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, img_ids=ids,
                    txt_ids=txt_ids, return_dict=False)
    if family == "fibo":  # its pipeline's ids (references on planes 1, 2); the prompt's padding as a key mask
        ids = torch.cat([_grid_ids(0, TARGET_HW, 3)] + [_grid_ids(1 + i, hw, 3) for i, hw in enumerate(hws)]).float()
        layers = [torch.randn(batch, TEXT_TOKENS, FIBO_TEXT_LAYER_DIM, generator=g) for _ in range(DOUBLE_LAYERS + 1)]
        key_mask = torch.ones(batch, TEXT_TOKENS + seq, dtype=torch.bool)
        key_mask[-1 if not same_prompt else slice(None), TEXT_TOKENS - PADDED_TEXT:TEXT_TOKENS] = False
        if same_prompt:
            for layer in layers:
                layer[1:] = layer[:1]
        return dict(hidden_states=hidden, encoder_hidden_states=text, text_encoder_layers=layers, timestep=timestep,
                    img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3),
                    joint_attention_kwargs={"attention_mask": key_mask[:, None, None, :]}, return_dict=False)
    ids = torch.cat([_grid_ids(0, TARGET_HW, 3), _grid_ids(1, hws[0], 3)]).float()
    pooled = torch.randn(batch, 16, generator=g)
    if same_prompt:
        pooled[1:] = pooled[:1]
    return dict(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3), return_dict=False)


def _first_sample(kwargs):
    """The same forward kwargs for the first sample alone (FLUX.1's 2-D ids carry no batch axis; FIBO's per-block
    text layers and key mask are cut too)."""
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
               "encoder_hidden_states_mask", "img_shapes")
    first = {name: value[:1] if name in batched or (name.endswith("_ids") and value.ndim == 3) else value
             for name, value in kwargs.items()}
    if "text_encoder_layers" in kwargs:
        first["text_encoder_layers"] = [layer[:1] for layer in kwargs["text_encoder_layers"]]
        first["joint_attention_kwargs"] = {"attention_mask": kwargs["joint_attention_kwargs"]["attention_mask"][:1]}
    return first


def _hand_qk(model, family, kwargs):
    """Joint [text, image] q, k of the first double-stream block of the unpatched model: its attention's inputs
    captured by a pre-hook, then processors._joint_qkv with diffusers' projection helper."""
    attn = model.transformer_blocks[0].attn
    seen = {}

    def capture(module, args, call_kwargs):
        seen.update(call_kwargs)

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        handle.remove()
    with torch.no_grad():
        if family == "qwen":
            query, key, _ = processors._qwen_joint_qkv(attn, seen["hidden_states"], seen["encoder_hidden_states"],
                                                       seen["image_rotary_emb"])
        else:
            query, key, _ = processors._joint_qkv(attn, seen["hidden_states"], seen["encoder_hidden_states"],
                                                  PROJECTIONS[family], seen["image_rotary_emb"])
    return query, key


# ----------------------------------------------------------------------------------------------------------------
# (1) the probe's tensors are the first block's q/k
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared, same_prompt", [(False, False), (True, True), (True, False)],
                         ids=["per-sample", "shared", "shared-references-own-prompts"])
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_tensors_equal_first_block_qk(models, family, shared, same_prompt):
    """A batch sharing references and prompt is probed (and selected) once, on its first sample; samples that
    share their references but not their prompt are probed each with its own prompt."""
    kwargs = _inputs(family, shared=shared, same_prompt=same_prompt)
    model, shared = models[family], shared and same_prompt
    # a shared batch is probed on its first sample alone (bit-exact only against a batch-1 computation)
    query, key = _hand_qk(model, family, _first_sample(kwargs) if shared else kwargs)
    n_refs = sum(h * w for h, w in REF_HWS[family])
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    with torch.no_grad():
        model(**kwargs)
    image_query, image_key = query[:, TEXT_TOKENS:], key[:, TEXT_TOKENS:]
    # the probe projects only the rows it returns: the same products over fewer rows, equal to fp32 rounding
    close = dict(rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(record["text_queries"], query[:, :TEXT_TOKENS], **close)
    torch.testing.assert_close(record["target_queries"], image_query[:, :N_TARGET], **close)
    torch.testing.assert_close(record["queries"], image_query[:, :N_TARGET], **close)
    torch.testing.assert_close(record["ref_keys"], image_key[:, N_TARGET:N_TARGET + n_refs], **close)
    probed = _first_sample(kwargs) if shared else kwargs
    if family == "qwen":  # the prompt padding comes along, for the probe's own batch
        assert torch.equal(record["text_mask"], probed["encoder_hidden_states_mask"].bool())
    elif family == "fibo":  # (from the key mask's text columns)
        text_mask = probed["joint_attention_kwargs"]["attention_mask"][:, 0, 0, :TEXT_TOKENS]
        assert torch.equal(record["text_mask"], text_mask) and not text_mask.all()
    else:
        assert "text_mask" not in record


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
@pytest.mark.parametrize("family", [f for f in FLUX_FAMILIES if f != "fibo"])  # (FIBO's model fuses nothing)
def test_probe_of_fused_projections_equals_the_separate_ones(family, attention):
    """After diffusers' ``fuse_qkv_projections()`` (one ``to_qkv`` / ``to_added_qkv`` matrix per block, a common
    speed-up) the probe projects its rows through the fused matrices: the same text queries, target queries and
    reference keys as the separate projections give, and the drop-in then keeps the same tokens and returns the
    same output (sparsectx's processors read q, k and v from the fused matrices too)."""
    kwargs = _inputs(family)
    records, outputs, keeps = [], [], []
    for fused in (False, True):
        model = _build_model(family)
        if fused:
            model.fuse_qkv_projections()
            assert model.transformer_blocks[0].attn.fused_projections
        record = {}
        sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record), attention=attention)
        with torch.no_grad():
            outputs.append(model(**kwargs)[0])
        keeps.append(getattr(model, integration.PATCH_ATTR).cache.keep)
        records.append(record)
        integration.disable(model)
    close = dict(rtol=FP32_RTOL, atol=FP32_ATOL)
    for name in ("text_queries", "target_queries", "ref_keys"):
        torch.testing.assert_close(records[1][name], records[0][name], **close, msg=name)
    assert torch.equal(keeps[1], keeps[0])
    torch.testing.assert_close(outputs[1], outputs[0], **close)


def test_fibo_samples_whose_text_layers_differ_are_probed_each_on_its_own(models):
    """FIBO's first block reads the prompt through its per-block text layers too: samples with one prompt embedding
    but other text layers are probed (and selected) each on its own, their text queries those of the whole batch."""
    model, kwargs = models["fibo"], _inputs("fibo", shared=True)
    layers = [layer.clone() for layer in kwargs["text_encoder_layers"]]
    layers[0][1] += 1.0
    kwargs = {**kwargs, "text_encoder_layers": layers}
    query, _ = _hand_qk(model, "fibo", kwargs)
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    with torch.no_grad():
        model(**kwargs)
    assert record["text_queries"].shape[0] == 2
    torch.testing.assert_close(record["text_queries"], query[:, :TEXT_TOKENS], rtol=FP32_RTOL, atol=FP32_ATOL)
    assert not torch.allclose(record["text_queries"][0], record["text_queries"][1])


def test_fibo_samples_whose_prompt_padding_differs_are_probed_each_on_its_own(models):
    """The key mask holds FIBO's prompt padding: samples with one prompt embedding and text layers but another padding
    are probed (and selected) each on its own, each with its own text mask."""
    model, kwargs = models["fibo"], _inputs("fibo", shared=True)
    mask = kwargs["joint_attention_kwargs"]["attention_mask"].clone()
    mask[0, ..., TEXT_TOKENS - PADDED_TEXT:TEXT_TOKENS] = True  # the first sample unpadded
    kwargs = {**kwargs, "joint_attention_kwargs": {"attention_mask": mask}}
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    with torch.no_grad():
        model(**kwargs)
    assert torch.equal(record["text_mask"], mask[:, 0, 0, :TEXT_TOKENS])


def test_per_sample_prompts_are_found_even_if_the_selector_catches_exceptions(models):
    """A selector guarding its probe call with ``except Exception`` still gets one probe per sample's prompt."""
    model, kwargs = models["flux2"], _inputs("flux2", shared=True, same_prompt=False)
    batches = []

    def guarded(latents, context):
        try:
            probed = context.extra["attention_probe"](latents, context)
        except Exception:  # noqa: BLE001 - the pattern under test
            return torch.zeros(latents.shape[:2])
        batches.append(probed["ref_keys"].shape[0])
        return probed["ref_keys"].norm(dim=(2, 3))

    sparsectx.enable(model, budget=BUDGET, selector=guarded)
    with torch.no_grad():
        model(**kwargs)
    assert batches == [2]


def test_probe_follows_the_kv_extract_layout(models):
    """FLUX.2 klein KV extract step (references first): ref_keys / target_queries are taken at their rows."""
    model, kwargs = models["flux2"], _inputs("flux2", shared=True)
    n_refs = sum(h * w for h, w in REF_HWS["flux2"])
    refs_first = {name: torch.cat([kwargs[name][:, N_TARGET:], kwargs[name][:, :N_TARGET]], 1)
                  for name in ("hidden_states", "img_ids")}
    kwargs = {**kwargs, **refs_first, "kv_cache_mode": "extract", "num_ref_tokens": n_refs}
    query, key = _hand_qk(model, "flux2", _first_sample(kwargs))
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    with torch.no_grad():
        model(**kwargs)
    close = dict(rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(record["ref_keys"], key[:, TEXT_TOKENS:TEXT_TOKENS + n_refs], **close)
    torch.testing.assert_close(record["target_queries"], query[:, TEXT_TOKENS + n_refs:], **close)


@pytest.mark.parametrize("family", FLUX_FAMILIES)
def test_probe_takes_rows_that_are_not_consecutive(models, family):
    """Target rows split by the references (not one run of rows: gathered by index, where consecutive rows are taken
    as slices, views of the rows and of their RoPE table rows): the same tensors at those rows."""
    model, kwargs = models[family], _inputs(family, shared=True)
    n_refs = sum(h * w for h, w in REF_HWS[family])
    half = N_TARGET // 2
    order = torch.cat([torch.arange(half), torch.arange(N_TARGET, N_TARGET + n_refs), torch.arange(half, N_TARGET)])
    split = {"hidden_states": kwargs["hidden_states"][:, order],
             "img_ids": kwargs["img_ids"][..., order, :]}
    kwargs = {**kwargs, **split}
    query, key = _hand_qk(model, family, _first_sample(kwargs))
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    with torch.no_grad():
        model(**kwargs)
    image_query, image_key = query[:, TEXT_TOKENS:], key[:, TEXT_TOKENS:]
    target = torch.cat([torch.arange(half), torch.arange(half + n_refs, N_TARGET + n_refs)])
    close = dict(rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(record["target_queries"], image_query[:, target], **close)
    torch.testing.assert_close(record["ref_keys"], image_key[:, half:half + n_refs], **close)


def test_consecutive_positions_become_a_slice():
    assert integration._consecutive(torch.arange(3, 9)) == slice(3, 9)
    assert integration._consecutive(torch.tensor([4])) == slice(4, 5)
    assert integration._consecutive(torch.tensor([0, 1, 3])) is None
    assert integration._consecutive(torch.tensor([2, 1])) is None
    assert integration._consecutive(torch.zeros(0, dtype=torch.long)) is None


# ----------------------------------------------------------------------------------------------------------------
# (2) the probe stops after the first block's projections and puts the processor back
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_stops_early_and_restores_processor(models, family):
    model, kwargs = models[family], _inputs(family, shared=True)
    attn = model.transformer_blocks[0].attn
    original = attn.processor
    last_blocks = {"last_double": model.transformer_blocks[-1]}
    if family != "qwen":  # Qwen-Image has double-stream blocks only
        last_blocks["last_single"] = model.single_transformer_blocks[-1]
    calls = {name: 0 for name in last_blocks}
    during_probe = {}

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    def selector(latents, context):
        before = dict(calls)
        scores = selection.attention_scores(latents, context)  # runs the probe
        during_probe.update({name: calls[name] - before[name] for name in calls})
        during_probe["processor_restored"] = attn.processor is original
        return scores

    handles = [block.register_forward_hook(counter(name)) for name, block in last_blocks.items()]
    try:
        sparsectx.enable(model, budget=BUDGET, selector=selector)
        with torch.no_grad():
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert during_probe == {**{name: 0 for name in last_blocks}, "processor_restored": True}
    assert calls == {name: 1 for name in last_blocks}  # the compacted forward itself, one group
    assert attn.processor is original


# ----------------------------------------------------------------------------------------------------------------
# (3) selector="attention" keeps the top attention mass of the hand-computed q/k
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_selector_keeps_top_mass(models, family):
    model, kwargs = models[family], _inputs(family)
    query, key = _hand_qk(model, family, kwargs)
    lengths = [h * w for h, w in REF_HWS[family]]
    image_query, image_key = query[:, TEXT_TOKENS:], key[:, TEXT_TOKENS:]
    mass = selection.attention_mass(image_query[:, :N_TARGET], image_key[:, N_TARGET:N_TARGET + sum(lengths)])
    expected = torch.cat([topk_keep_mask(segment, [BUDGET] * mass.shape[0]) for segment in mass.split(lengths, 1)],
                         dim=1)
    sparsectx.enable(model, budget=BUDGET, selector="attention")
    with torch.no_grad():
        model(**kwargs)
    keep = getattr(model, integration.PATCH_ATTR).cache.keep
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "longcat"])  # (LongCat's forward takes no scale)
def test_probe_sees_a_lora_adapter_at_the_calls_scale(family):
    """With a peft LoRA adapter scaled per call (``scale`` in the attention kwargs, beside the per-call sparsectx
    settings), the probe's tensors are the first block's q/k with the adapter at that scale, and so is the
    ``attention`` selection (the probe's forward takes the call's kwargs as they are)."""
    peft = pytest.importorskip("peft")
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    model = _build_model(family)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "add_q_proj", "add_k_proj"]))
    kwargs = _inputs(family)
    name = "attention_kwargs" if family == "qwen" else "joint_attention_kwargs"
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    probed = {}
    for scale in (0.0, 0.5):
        getattr(model, integration.PATCH_ATTR).new_call()
        with torch.no_grad():
            model(**{**kwargs, name: {"scale": scale, "sparsectx": {"budget": BUDGET}}})
        probed[scale] = record.pop("ref_keys"), getattr(model, integration.PATCH_ATTR).cache.keep
    integration.disable(model)
    n_refs = sum(h * w for h, w in REF_HWS[family])
    for scale, (ref_keys, keep) in probed.items():
        scale_lora_layers(model, scale)
        try:
            query, key = _hand_qk(model, family, kwargs)
        finally:
            unscale_lora_layers(model, scale)
        image_key = key[:, TEXT_TOKENS + N_TARGET:TEXT_TOKENS + N_TARGET + n_refs]
        torch.testing.assert_close(ref_keys, image_key, rtol=FP32_RTOL, atol=FP32_ATOL)
        mass = selection.attention_mass(query[:, TEXT_TOKENS:TEXT_TOKENS + N_TARGET], image_key)
        lengths = [h * w for h, w in REF_HWS[family]]
        expected = torch.cat([topk_keep_mask(part, [BUDGET] * mass.shape[0]) for part in mass.split(lengths, 1)], 1)
        assert torch.equal(keep, expected)
    assert (probed[0.0][0] - probed[0.5][0]).abs().max() > 1e-2  # the scale matters


@pytest.mark.parametrize("given", ["user_mask", "ref_keys"])
def test_signals_a_selector_does_not_replace_leave_the_probe_on(models, given):
    """A signal that does not give the selector's probe tensors (an edit mask for 'attention', or the reference keys
    without queries) switched the automatic probe off: 'attention' raised "needs context.extra['queries']" and
    'subject' silently lost its attention half. Now the probe supplies what is missing: same keep mask as without
    signals. 'edit' given a user mask still runs no probe (the user said where the edit is)."""
    model, kwargs = models["flux2"], _inputs("flux2")
    query, key = _hand_qk(model, "flux2", kwargs)
    lengths = [h * w for h, w in REF_HWS["flux2"]]
    image_key = key[:, TEXT_TOKENS:]
    ref_keys = image_key[:, N_TARGET:N_TARGET + sum(lengths)]
    mass = selection.attention_mass(query[:, TEXT_TOKENS:][:, :N_TARGET], ref_keys)
    expected = torch.cat([topk_keep_mask(segment, [BUDGET] * mass.shape[0]) for segment in mass.split(lengths, 1)],
                         dim=1)
    user_mask = torch.zeros(2, sum(lengths), dtype=torch.bool)
    user_mask[:, [0, 2, 4, lengths[0] + 1, lengths[0] + 3, lengths[0] + 7]] = True  # BUDGET tokens per image
    signal = {"user_mask": user_mask, "ref_keys": ref_keys}[given]
    calls = []
    handle = model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        counts = []
        for signals in (None, {given: signal}):
            calls.clear()
            # ('attention' reads no user_mask: enable says so, and the selection goes on without it)
            with (pytest.warns(UserWarning, match=r"'attention' does not read the signals \['user_mask'\]")
                  if signals is not None and given == "user_mask" else contextlib.nullcontext()):
                sparsectx.enable(model, budget=BUDGET, selector="attention", signals=signals)
            with torch.no_grad():
                model(**kwargs)
            keep = getattr(model, integration.PATCH_ATTR).cache.keep
            torch.testing.assert_close(keep, expected, rtol=0, atol=0)
            counts.append(len(calls))
        assert counts[0] == counts[1]  # the probe's stopped forward and the step's (one per group of samples)
        if given == "user_mask":
            calls.clear()
            sparsectx.enable(model, budget=BUDGET, selector="edit", signals={given: signal})
            with torch.no_grad():
                model(**kwargs)
            assert torch.equal(getattr(model, integration.PATCH_ATTR).cache.keep, user_mask)
            assert len(calls) == 1  # no probe
    finally:
        handle.remove()


def test_user_probe_tensors_skip_the_automatic_probe(models):
    """Probe tensors given in ``signals`` are used as they are: planted keys that every query attends to most."""
    model, kwargs = models["flux2"], _inputs("flux2", shared=True)
    lengths = [h * w for h, w in REF_HWS["flux2"]]
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(1, N_TARGET, HEADS, HEAD_DIM, generator=g)
    keys = torch.zeros(1, sum(lengths), HEADS, HEAD_DIM)
    planted = torch.zeros(1, sum(lengths), dtype=torch.bool)
    planted[0, [1, 4, 8, lengths[0] + 0, lengths[0] + 5, lengths[0] + 6]] = True  # BUDGET tokens per image
    keys[planted] = queries.mean(dim=1).expand(int(planted.sum()), -1, -1) * 4.0  # aligned with the mean query
    sparsectx.enable(model, budget=BUDGET, selector="attention", signals={"queries": queries, "ref_keys": keys})
    with torch.no_grad():
        model(**kwargs)
    keep = getattr(model, integration.PATCH_ATTR).cache.keep
    assert torch.equal(keep, planted.expand_as(keep))


# ----------------------------------------------------------------------------------------------------------------
# (4) Qwen-Image: the prompt's padding tokens do not vote in the text-driven 'edit' selector
# ----------------------------------------------------------------------------------------------------------------
def test_qwen_edit_selector_ignores_padded_text(models):
    model, kwargs = models["qwen"], _inputs("qwen")
    query, key = _hand_qk(model, "qwen", kwargs)
    lengths = [h * w for h, w in REF_HWS["qwen"]]
    n_refs = sum(lengths)
    text_mask = kwargs["encoder_hidden_states_mask"].bool()
    context = selection.SelectionContext(
        num_references=len(lengths), ref_lengths=lengths, target_shape=TARGET_HW,
        extra={"ref_shapes": list(REF_HWS["qwen"]), "text_queries": query[:, :TEXT_TOKENS], "text_mask": text_mask,
               "ref_keys": key[:, TEXT_TOKENS + N_TARGET:TEXT_TOKENS + N_TARGET + n_refs]})
    references = kwargs["hidden_states"][:, N_TARGET:]
    scores = selection.edit_scores(references, context)
    expected = torch.cat([topk_keep_mask(part, [BUDGET] * scores.shape[0]) for part in scores.split(lengths, 1)], 1)
    unmasked = selection.edit_scores(references, context.__class__(**{**vars(context), "extra": {
        **context.extra, "text_mask": None}}))
    assert not torch.allclose(unmasked[-1], scores[-1])  # the padding would change the last sample's scores
    sparsectx.enable(model, budget=BUDGET, selector="edit")
    with torch.no_grad():
        model(**kwargs)
    assert torch.equal(getattr(model, integration.PATCH_ATTR).cache.keep, expected)


# ----------------------------------------------------------------------------------------------------------------
# (5) the probe's RoPE tables: diffusers' values from a few launches
# ----------------------------------------------------------------------------------------------------------------
LONGCAT_POS_EMBED = transformer_longcat_image.LongCatImagePosEmbed(theta=10000, axes_dim=[16, 56, 56])
FIBO_POS_EMBED = transformer_bria_fibo.BriaFiboEmbedND(theta=10000, axes_dim=[16, 56, 56])


@pytest.mark.parametrize("pos_embed", [transformer_flux2.Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32]),
                                       transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56]),
                                       LONGCAT_POS_EMBED, FIBO_POS_EMBED],
                         ids=["flux2", "flux", "longcat", "fibo"])
def test_flux_rope_tables_are_diffusers_tables(pos_embed):
    _check_flux_rope_tables_are_diffusers_tables(pos_embed, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("pos_embed", [transformer_flux2.Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32]),
                                       transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56]),
                                       LONGCAT_POS_EMBED, FIBO_POS_EMBED],
                         ids=["flux2", "flux", "longcat", "fibo"])
def test_gpu_flux_rope_tables_are_diffusers_tables(pos_embed):
    """On CUDA too (every FLUX step of the drop-in computes its tables this way): float64 angles, their cosines and
    sines by CUDA's float64 functions, rounded to float32, bit for bit diffusers' values."""
    _check_flux_rope_tables_are_diffusers_tables(pos_embed, "cuda")


def _check_flux_rope_tables_are_diffusers_tables(pos_embed, device):
    g = torch.Generator().manual_seed(0)
    n_axes = len(pos_embed.axes_dim)
    for ids in (torch.randint(0, 4096, (3000, n_axes), generator=g),  # integer positions (the pipelines')
                torch.randint(-64, 64, (500, n_axes), generator=g).float(),  # negative, as floats (FLUX.1)
                torch.rand(400, n_axes, generator=g) * 100):  # fractional
        ids = ids.to(device)
        want = pos_embed(ids)
        got = processors.flux_rope_tables(pos_embed, ids)
        assert all(t.dtype == torch.float32 and t.device == ids.device and torch.equal(a, t)
                   for a, t in zip(want, got, strict=True))


def test_flux_rope_tables_of_fewer_or_more_axes_than_the_ids_columns_are_diffusers_tables():
    """The axis bounds of the fast RoPE path: FLUX.1 ids with fewer columns than axes (diffusers uses the columns
    there are), and FLUX.2 with five axes (one per column, past the kernel's four: the reference's tables), as
    diffusers' own pos_embed computes them."""
    for pos_embed, ids in ((transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6]),
                            torch.arange(10.0).view(5, 2)),
                           (transformer_flux2.Flux2PosEmbed(theta=2000, axes_dim=[2, 2, 2, 2, 2]),
                            torch.arange(25.0).view(5, 5))):
        want = pos_embed(ids)
        got = processors.flux_rope_tables(pos_embed, ids)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_rope_tables_memo_made_under_inference_mode_serves_a_training_forward():
    """``RopeTablesMemo``: tables first made under inference mode (a pipeline call) are made again for a forward
    that records autograd on the same selection (a training step): a backward through them runs."""
    pos_embed = transformer_flux2.Flux2PosEmbed(theta=2000, axes_dim=[4, 4, 4, 4])
    memo = processors.RopeTablesMemo(torch.arange(20.0).view(5, 4))
    with torch.inference_mode():
        memo.get(pos_embed)
    cos, sin = memo.get(pos_embed)
    assert not cos.is_inference() and not sin.is_inference()
    x = torch.randn(5, 16, requires_grad=True)
    (x * cos + x * sin).sum().backward()
    assert torch.equal(x.grad, cos + sin)


def test_flux_rope_tables_refuse_what_diffusers_refuses_and_keep_no_inference_tensor():
    flux2 = transformer_flux2.Flux2PosEmbed(theta=2000, axes_dim=[4, 4, 4, 4])
    flux1 = transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])
    for pos_embed, ids in ((flux2, torch.zeros(2, 5, 4)), (flux1, torch.zeros(5, 4)), (flux2, torch.zeros(5, 3))):
        with pytest.raises(Exception) as want:
            pos_embed(ids)
        with pytest.raises(type(want.value)):
            processors.flux_rope_tables(pos_embed, ids)
    odd = transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[3, 6, 6])
    ids = torch.arange(15.0).view(5, 3)
    try:
        want = odd(ids)
    except Exception as error:  # noqa: BLE001 - whatever diffusers does with an odd axis, the fast path does too
        with pytest.raises(type(error)):
            processors.flux_rope_tables(odd, ids)
    else:
        assert all(torch.equal(a, b) for a, b in zip(want, processors.flux_rope_tables(odd, ids), strict=True))
    # frequencies first made under inference mode serve a later call that records autograd
    processors._rope_frequencies.cache_clear()
    positions = torch.arange(20.0).view(5, 4)
    with torch.inference_mode():
        processors.flux_rope_tables(flux2, positions)
    positions.requires_grad_(True)
    cos, sin = processors.flux_rope_tables(flux2, positions)
    (cos.sum() + sin.sum()).backward()
    assert positions.grad is not None and positions.grad.shape == positions.shape


def _probe_record(model, kwargs):
    record = {}
    sparsectx.enable(model, budget=BUDGET, selector=checks.recording_attention(record))
    with torch.no_grad():
        model(**kwargs)
    integration.disable(model)
    return record


@pytest.mark.parametrize("family", FLUX_FAMILIES)
def test_probe_computes_flux_rope_tables_in_a_few_launches(models, family, monkeypatch):
    """The probe's forward computes FLUX's RoPE tables with ``flux_rope_tables`` (diffusers' ``pos_embed`` runs about
    thirteen ops per axis and per id tensor: most of the probe's launches), and so does the compacted forward after
    it: the same probe tensors, bit for bit, from fewer ops; ``pos_embed`` is its own module again afterwards, and
    one with a hook is left alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    model, kwargs = models[family], _inputs(family)
    pos_embed = model.pos_embed
    assert processors._tables_match(pos_embed)  # (its one check of the shortcut, made before the counts)
    seen, probing = [], []
    real, real_probe = processors.flux_rope_tables, integration._probe_qk
    monkeypatch.setattr(processors, "flux_rope_tables",
                        lambda module, ids: seen.append("probe" if probing else "step") or real(module, ids))

    def probe(*args):
        probing.append(1)
        try:
            return real_probe(*args)
        finally:
            probing.clear()

    monkeypatch.setattr(integration, "_probe_qk", probe)
    with Count():
        fast = _probe_record(model, kwargs)
    fast_ops, Count.calls = Count.calls, 0
    # FLUX.2: image and text ids; FLUX.1: both joined; then the compacted forward's own tables
    assert seen.count("probe") == (2 if family == "flux2" else 1) and "step" in seen, seen
    assert "forward" not in pos_embed.__dict__
    seen.clear()
    handle = pos_embed.register_forward_hook(lambda module, args, output: seen.append("hooked"))
    try:
        with Count():
            plain = _probe_record(model, kwargs)
    finally:
        handle.remove()
    assert seen and set(seen) == {"hooked"}  # diffusers' own module ran, in the probe too
    assert set(fast) == set(plain)
    for name, value in fast.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, plain[name]), name
    # fewer ops over the whole call (probe, selection and the compacted forward): FLUX.2's 2 x 4 axes, FLUX.1's 3
    assert Count.calls - fast_ops >= 20, (fast_ops, Count.calls)
