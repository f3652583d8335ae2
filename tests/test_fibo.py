"""Bria FIBO Edit under sparsectx.enable: whole calls of a tiny, offline BriaFiboEditPipeline
(tests/fibo_pipeline.py: random-weight components built from configs, fakes for the SmolLM3 tokenizer and model),
fp32, CPU. The transformer alone runs through the generic tests of tests/test_integration.py, test_processors.py and
test_probe.py (family "fibo"); here: what only the pipeline shows (guidance's two branches batched in one forward,
the prompts' padding handed to the transformer as a key mask, several references on their own id planes)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
if tuple(int(part) for part in diffusers.__version__.split(".")[:2]) < (0, 41):
    pytest.skip("BriaFiboEditPipeline takes one reference image before diffusers 0.41 (these tests pass two)",
                allow_module_level=True)
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

import drop_in_checks as checks  # noqa: E402  (tests/, on sys.path by pytest.ini)
import fibo_pipeline as fp  # noqa: E402  (tests/, on sys.path by pytest.ini)
import sparsectx  # noqa: E402
from pipeline_fixtures import tiny_pipeline_fixtures  # noqa: E402
from sparsectx import integration  # noqa: E402

STEPS = 2
BUDGET = 0.25  # of each reference's tokens: 4 of the 64² image's 16, 1 of the 32x48's 6 (ceil)
FP32_ATOL = 2e-5  # fp32 rounding of a different (shorter) summation order
TWO_IMAGES = (fp.reference_image(), fp.reference_image((32, 48), 1))  # 16 + 6 reference tokens
# a negative prompt shorter than the prompt: the pipeline pads it, and hands the transformer the padding as a key mask
NEGATIVE = "bad"


pipe, _always_disabled = tiny_pipeline_fixtures(fp.tiny_fibo_pipeline)


def _run(pipe, **kwargs):
    return fp.run(pipe, **{"image": list(TWO_IMAGES), "num_inference_steps": STEPS, **kwargs})


def _forwards(pipe, seen):
    """A pre-hook recording, per transformer forward that reaches the blocks (not the attention probe's), the image
    rows and the key mask's length and whether it masks anything (the first block's attention call)."""
    def record(module, args, kwargs):
        if isinstance(module.processor, integration._QKProbeProcessor):
            return
        mask = kwargs.get("attention_mask")
        seen.append((kwargs["hidden_states"].shape[1],
                     None if mask is None else (mask.shape[-1], bool((~mask).any()))))

    return pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(record, with_kwargs=True)


class _KeyMaskedNative:
    """Test-only: diffusers' native attention with the dropped reference tokens of each sample masked out as keys
    (joined with the mask the pipeline passes); the joint sequence is [text, target, references]."""

    def __init__(self, ref_keep):
        self.ref_keep = ref_keep  # bool [B, N]
        self.native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        batch, n_refs = self.ref_keep.shape
        kept = torch.ones(batch, key.shape[1] - n_refs, dtype=torch.bool)
        key_mask = torch.cat([kept, self.ref_keep], 1)[:, None, None, :]
        if attn_mask is not None:
            key_mask = key_mask & attn_mask.bool()
        return self.native(query, key, value, attn_mask=key_mask, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
def test_the_pipeline_class_is_accepted_and_named():
    assert "BriaFiboEditPipeline" in integration.SUPPORTED_PIPELINES
    assert integration._family_of(fp.tiny_fibo_pipeline().transformer) == integration.FIBO


def test_keep_all_and_disable_are_the_unpatched_pipeline(pipe):
    """Guidance with a padded prompt and two references: keeping every token, and disabling, give the unpatched
    pipeline's latents bit for bit (the original forward runs)."""
    checks.check_keep_all_and_disable(pipe, lambda: _run(pipe, negative_prompt=NEGATIVE), budget=BUDGET,
                                      changed=lambda out, expected: not torch.equal(out, expected))


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
@pytest.mark.parametrize("selector", ["random", "attention", "edit"])
def test_dropping_rows_equals_masking_keys_over_whole_calls(pipe, selector, attention, monkeypatch):
    """Whole calls with guidance (both branches in one forward, the shorter prompt padded: a key mask reaches every
    attention layer) and two references of different sizes: the compacted call, its key mask without the dropped
    columns, equals the unpatched call with the dropped tokens masked as keys (also with sparsectx's attention)."""
    seen = []
    sparsectx.enable(pipe, budget=BUDGET, selector=selector, seed=0, attention=attention)
    handle = _forwards(pipe, seen)
    try:
        dropped = _run(pipe, negative_prompt=NEGATIVE)
    finally:
        handle.remove()
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape == (2, sum(map(fp.tokens, ((64, 64), (32, 48))))) and 0 < int(keep.sum()) < keep.numel()
    assert seen and all(mask is not None and mask[1] for _, mask in seen)  # the padding reached the compacted call
    sparsectx.disable(pipe)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(keep))
    masked = _run(pipe, negative_prompt=NEGATIVE)
    torch.testing.assert_close(dropped, masked, rtol=0, atol=FP32_ATOL)


def test_the_compacted_sequence_and_its_key_mask_hold_the_target_and_the_kept_tokens(pipe):
    seen, plain = [], []
    handle = _forwards(pipe, plain)
    try:
        _run(pipe, negative_prompt=NEGATIVE)
    finally:
        handle.remove()
    sparsectx.enable(pipe, budget=BUDGET, selector="uniform")
    handle = _forwards(pipe, seen)
    try:
        _run(pipe, negative_prompt=NEGATIVE)
    finally:
        handle.remove()
    n_target, n_refs = fp.tokens(), sum(map(fp.tokens, ((64, 64), (32, 48))))
    n_kept = int(sparsectx.last_selection(pipe).keep[0].sum())
    assert n_kept == 4 + 2  # 25% of 16 and of 6 tokens, rounded up
    (rows, (mask_length, _)), = set(plain)  # one shape for every step
    assert rows == n_target + n_refs
    n_text = mask_length - rows
    assert set(seen) == {(n_target + n_kept, (n_text + n_target + n_kept, True))}
    assert len(seen) == len(plain) == STEPS  # both branches in each step's one forward


# ----------------------------------------------------------------------------------------------------------------
# guidance's branches, batched
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [5.0, torch.tensor(5.0)], ids=["float", "tensor"])
def test_both_guidance_branches_keep_what_the_conditional_prompt_selects(pipe, guidance_scale):
    """The pipeline batches guidance's branches ([negative, positive]) in one forward: the selection is made on the
    positive prompt's samples (the ``edit`` selector reads the prompt through the probe) and the negative ones keep
    the same tokens, so it equals the selection of the same call without guidance, whose batch is the positive
    prompt alone; the selector sees one sample per request. The same with the transformer enabled alone (its
    forwards find the pipeline call they run in), and with a tensor ``guidance_scale``."""
    batches = []

    def recording(latents, context):
        batches.append(latents.shape[0])
        return sparsectx.selection.edit_scores(latents, context)

    sparsectx.enable(pipe, budget=BUDGET, selector=recording)
    _run(pipe, negative_prompt=NEGATIVE, guidance_scale=guidance_scale)
    guided = sparsectx.last_selection(pipe).keep
    _run(pipe, guidance_scale=1.0)
    alone = sparsectx.last_selection(pipe).keep
    assert batches == [1, 1]
    assert guided.shape[0] == 2 and torch.equal(guided[0], guided[1]) and torch.equal(guided[1:], alone)
    sparsectx.disable(pipe)
    sparsectx.enable(pipe.transformer, budget=BUDGET, selector=recording)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs),
                                                        with_kwargs=True)
    try:
        _run(pipe, negative_prompt=NEGATIVE, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    assert torch.equal(sparsectx.last_selection(pipe.transformer).keep, guided)
    # the negative prompt's own selection is another, so selecting on it would have been seen: the same forward
    # outside a pipeline call selects each branch on its own prompt
    with torch.no_grad():
        pipe.transformer(**calls[0])
    per_branch = sparsectx.last_selection(pipe.transformer).keep
    assert not torch.equal(per_branch[0], per_branch[1])


def test_per_request_budgets_and_generators_count_the_requests(pipe):
    """Two prompts with guidance (a batch of 4: two negatives, two positives): a per-request budget lists two
    budgets, and each request's two branches keep its budget's tokens; one generator per image seeds each request's
    random selection as that request alone with its generator."""
    prompts, negatives = [fp.edit(), fp.edit("make it red and larger")], [NEGATIVE, "worse"]
    sparsectx.enable(pipe, budget=[[0.25, 1], [0.5, 3]], selector="random")
    with torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=prompts, negative_prompt=negatives, num_inference_steps=STEPS,
             guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="latent",
             _auto_resize=False)
    keep = sparsectx.last_selection(pipe).keep
    counts = [[int(part.sum()) for part in row.split([16, 6])] for row in keep]
    assert counts == [[4, 1], [8, 3], [4, 1], [8, 3]]
    assert torch.equal(keep[:2], keep[2:])
    sparsectx.disable(pipe)  # the transformer enabled alone: its forwards find the pipeline call's guidance batch
    sparsectx.enable(pipe.transformer, budget=[[0.25, 1], [0.5, 3]], selector="random")
    with torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=prompts, negative_prompt=negatives, num_inference_steps=STEPS,
             guidance_scale=5.0, output_type="latent", _auto_resize=False)
    assert [[int(part.sum()) for part in row.split([16, 6])] for row in sparsectx.last_selection(pipe).keep] == counts
    # (a per-request budget given for the forward's batch, both branches, as a transformer's user may: the same)
    sparsectx.enable(pipe.transformer, budget=[[0.25, 1], [0.5, 3], [0.25, 1], [0.5, 3]], selector="random")
    with torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=prompts, negative_prompt=negatives, num_inference_steps=STEPS,
             guidance_scale=5.0, output_type="latent", _auto_resize=False)
    assert [[int(part.sum()) for part in row.split([16, 6])] for row in sparsectx.last_selection(pipe).keep] == counts
    # its negative half other than its positive one: refused (it read the positive half, dropping the negative's
    # entries without a word; so was a budget of two requests given to a call of one prompt)
    sparsectx.enable(pipe.transformer, budget=[[0.5, 3], [0.5, 3], [0.25, 1], [0.5, 3]], selector="random")
    with pytest.raises(ValueError, match=r"a per-request budget has 4 entries for a batch of 2 requests under "
                                         r"guidance"), torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=prompts, negative_prompt=negatives, num_inference_steps=STEPS,
             guidance_scale=5.0, output_type="latent", _auto_resize=False)
    sparsectx.enable(pipe, budget=[[0.25, 1], [0.5, 3]], selector="random")
    with pytest.raises(ValueError, match=r"a per-request budget has 2 entries for a batch of 1 requests"), \
            torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=prompts[0], negative_prompt=negatives[0], num_inference_steps=STEPS,
             guidance_scale=5.0, output_type="latent", _auto_resize=False)
    sparsectx.disable(pipe)
    for b in range(2):
        sparsectx.enable(pipe, budget=[[0.25, 1], [0.5, 3]][b], selector="random")
        with torch.no_grad():
            pipe(image=list(TWO_IMAGES), prompt=prompts[b], negative_prompt=negatives[b], num_inference_steps=STEPS,
                 guidance_scale=5.0, generator=[torch.Generator().manual_seed((3, 4)[b])], output_type="latent",
                 _auto_resize=False)
        assert torch.equal(sparsectx.last_selection(pipe).keep[1], keep[2 + b])


def test_per_call_settings_reach_the_forwards(pipe):
    """Per-call settings through the pipeline's ``joint_attention_kwargs`` (which it also fills with the key mask)."""
    sparsectx.enable(pipe, budget=BUDGET, selector="uniform")
    _run(pipe, negative_prompt=NEGATIVE, joint_attention_kwargs={"sparsectx": {"budget": 0.5}})
    assert int(sparsectx.last_selection(pipe).keep[0].sum()) == 8 + 3
    with pytest.raises(ValueError, match=r"joint_attention_kwargs\['sparsectx'\]"):
        _run(pipe, negative_prompt=NEGATIVE, joint_attention_kwargs={"sparsectx": {"budget": 1.5}})


def test_the_seed_argument_seeds_the_selection(pipe):
    """The pipeline's own ``seed`` argument (from which it makes its generator) seeds a random selection as a
    generator of that seed does: calls with one seed repeat, bit for bit."""
    sparsectx.enable(pipe, budget=BUDGET)  # (the default random selector, unseeded: the call's seed decides)

    def call(**kwargs):
        with torch.no_grad():
            out = pipe(image=list(TWO_IMAGES), prompt=fp.edit(), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                       output_type="latent", _auto_resize=False, **kwargs).images
        return out, sparsectx.last_selection(pipe).keep

    first, again, generated, other = (call(seed=5), call(seed=5), call(generator=torch.Generator().manual_seed(5)),
                                      call(seed=6))
    for out, keep in (again, generated):
        assert torch.equal(out, first[0]) and torch.equal(keep, first[1])
    assert not torch.equal(other[1], first[1])


def test_a_reused_settings_dict_is_not_written_by_the_pipeline(pipe):
    """The pipeline writes its prompt mask into the ``joint_attention_kwargs`` dict it is given: an enabled pipeline
    hands it a copy, so a settings dict reused for another call (another prompt length) carries no stale mask."""
    sparsectx.enable(pipe, budget=BUDGET, selector="uniform")
    settings = {"sparsectx": {"budget": 0.5}}
    _run(pipe, negative_prompt=NEGATIVE, joint_attention_kwargs=settings)
    assert settings == {"sparsectx": {"budget": 0.5}}
    reused = _run(pipe, negative_prompt="much worse, bad and ugly", joint_attention_kwargs=settings)
    fresh = _run(pipe, negative_prompt="much worse, bad and ugly",
                 joint_attention_kwargs={"sparsectx": {"budget": 0.5}})
    assert torch.equal(reused, fresh)


def test_a_call_without_references_is_the_unpatched_pipeline(pipe):
    def call():
        with torch.no_grad():
            return pipe(prompt=fp.edit(), negative_prompt=NEGATIVE, height=64, width=64,
                        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images

    expected = call()
    sparsectx.enable(pipe, budget=BUDGET)
    assert torch.equal(call(), expected)


N_REFS = 16 + 6


def _user_mask_selector(latents, context):
    return context.extra["user_mask"].float().expand(latents.shape[0], -1)


def test_a_signal_given_for_both_branches_is_read_on_the_positive_half(pipe):
    """A per-sample signal given for the forward's whole batch of guidance's branches ([negative, positive]) is read
    on its positive half (docs/drop-in.md), as a per-request budget is; a negative half other than the positive one
    is refused (it was dropped without a word)."""
    negative_rows, positive_rows = [0, 1, 2, 3, 16], [8, 9, 10, 11, 20]
    user_mask = torch.zeros(2, N_REFS, dtype=torch.bool)  # row 0: the negative branch's sample, row 1: the positive's
    user_mask[:, positive_rows] = True
    sparsectx.enable(pipe.transformer, budget=[4, 1], selector=_user_mask_selector, signals={"user_mask": user_mask})
    with torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=fp.edit(), negative_prompt=NEGATIVE, num_inference_steps=2,
             guidance_scale=5.0, output_type="latent", _auto_resize=False)
    keep = sparsectx.last_selection(pipe).keep
    assert keep.shape == (2, N_REFS)
    assert torch.nonzero(keep[1]).flatten().tolist() == positive_rows
    assert torch.equal(keep[0], keep[1])
    user_mask[0] = False
    user_mask[0, negative_rows] = True
    sparsectx.enable(pipe.transformer, budget=[4, 1], selector=_user_mask_selector, signals={"user_mask": user_mask})
    with pytest.raises(ValueError, match=r"signal 'user_mask' has 2 rows for a batch of 1 requests under guidance"), \
            torch.no_grad():
        pipe(image=list(TWO_IMAGES), prompt=fp.edit(), negative_prompt=NEGATIVE, num_inference_steps=2,
             guidance_scale=5.0, output_type="latent", _auto_resize=False)
