"""Checks shared by the tests of the drop-in's model families (tests/test_probe.py, test_flux3.py, test_qwen21.py,
test_joyimage.py, test_joyimage_edit.py). Each takes the family's own pieces as arguments: how to run its model,
which output rows are the target's, how to mask the dropped reference tokens as keys in the unpatched model."""
import contextlib
from typing import Callable

import torch

import sparsectx
from sparsectx import integration
from sparsectx.diagnostics import count_host_reads

GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # fp32 gradients through the layers computed in a different order


def recording_attention(record: dict) -> Callable:
    """The 'attention' selector, also recording the selection context's extra (the probe's tensors land there)."""

    def selector(latents, context):
        scores = sparsectx.selection.attention_scores(latents, context)
        record.update(context.extra)
        return scores

    return selector


def precompiled_norm_rope(on_call: Callable) -> Callable:
    """``sparsectx.rms_norm_rope`` that first asserts that its call's form (a text prefix, norm weights, a table
    value per pair, diffusers' rounding: each a constexpr of the kernels) is one ``sparsectx compile-check`` builds
    (``NORM_ROPE_FORMS``; the GPU check builds them ahead, and a form left out compiles at its first call), then
    hands the call's ``(args, kwargs)`` to ``on_call``. For the processors' ``rms_norm_rope``."""
    from sparsectx.compile_check import NORM_ROPE_FORMS

    def call(x, cos, sin, weight=None, *args, prefix=None, prefix_weight=None, round_before_weight=False, **kwargs):
        weights = {weight is not None} | ({prefix_weight is not None} if prefix is not None else set())
        form = (prefix is not None, weights == {True}, cos.shape[-1] != x.shape[-1], round_before_weight)
        assert len(weights) == 1 and form in [f[:4] for f in NORM_ROPE_FORMS], (form, weights)
        kwargs.update(prefix=prefix, prefix_weight=prefix_weight, round_before_weight=round_before_weight)
        on_call((x, cos, sin, weight, *args), kwargs)
        return sparsectx.rms_norm_rope(x, cos, sin, weight, *args, **kwargs)

    return call


def record_fused_norm_rope(monkeypatch) -> list:
    """The list the processors' ``rms_norm_rope`` calls append their ``x`` shape to (each call still runs the op,
    ``precompiled_norm_rope``): which q / k passes ran fused."""
    calls = []
    monkeypatch.setattr(sparsectx.processors, "rms_norm_rope",
                        precompiled_norm_rope(lambda args, kwargs: calls.append(args[0].shape)))
    return calls


@contextlib.contextmanager
def attention_processors(blocks, processor):
    """Inside the block, the attention (``block.attn``) of every block of ``blocks`` runs ``processor``; each
    original processor object is put back after."""
    originals = [block.attn.processor for block in blocks]
    for block in blocks:
        block.attn.set_processor(processor)
    try:
        yield processor
    finally:
        for block, original in zip(blocks, originals):
            block.attn.set_processor(original)


def cast_inputs(kwargs: dict, device, dtype: torch.dtype) -> dict:
    """``kwargs`` with every tensor on ``device`` and every floating one in ``dtype``."""
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v
            for k, v in kwargs.items()}


def assert_random_drop_training_matches_masking(model: torch.nn.Module, kwargs: dict, target_of: Callable,
                                                masking: Callable[[torch.Tensor], contextlib.AbstractContextManager],
                                                ratio_range=(0.2, 0.6), atol: float = 1e-5,
                                                embedding: str = "img_in.weight",
                                                grad_tolerance: tuple = (GRAD_RTOL, GRAD_ATOL)) -> torch.Tensor:
    """``random_drop_selector`` on the train-mode ``model``: a new mask at every forward; the target rows
    (``target_of(output)``) and every weight's gradient of a loss on them (the patch ``embedding``'s among them;
    within ``grad_tolerance``, (rtol, atol)) equal those of the unpatched model run inside ``masking(keep)`` (the same
    tokens masked out as keys). Returns the first forward's keep mask."""
    model.train()
    out = target_of(model(**kwargs)[0])
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        out = target_of(model(**kwargs)[0])
        ((out - target) ** 2).mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    sparsectx.enable(model, budget=None,
                     selector=sparsectx.random_drop_selector(ratio_range, torch.Generator().manual_seed(3)))
    try:
        removed_out, removed_grads = outputs_and_grads()
        keep = sparsectx.last_selection(model).keep
        outputs_and_grads()
        assert not torch.equal(sparsectx.last_selection(model).keep, keep)  # a new draw at the next forward
    finally:
        sparsectx.disable(model)
    assert not keep.all() and keep.any(dim=1).all()
    with masking(keep):
        masked_out, masked_grads = outputs_and_grads()
    torch.testing.assert_close(removed_out, masked_out, rtol=0, atol=atol)
    assert removed_grads.keys() == masked_grads.keys() and embedding in removed_grads
    rtol, grad_atol = grad_tolerance
    for name, grad in removed_grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=rtol, atol=grad_atol, msg=name)
    return keep


def check_bf16_dropping_equals_masking(model: torch.nn.Module, kwargs: dict, run: Callable, masked: Callable,
                                       assert_criterion: Callable, budget=0.5, attention: str = "native") -> None:
    """In bf16 (``model`` and ``kwargs`` already cast): the drop-in's output at ``budget`` (uniform selection, the
    given ``attention``) meets ``assert_criterion(dropped, masked(model, keep, kwargs), model, keep, kwargs)`` (the
    family's flash criterion against its key-masked model). With ``attention="sparsectx"``, also that sparsectx's
    attention ops ran, on the kernels (on the CPU: only in a test marked ``bf16_kernels``; otherwise bf16 takes the
    torch reference there, and the check would say nothing of the kernels)."""
    from sparsectx import ops, processors

    device = next(model.parameters()).device
    if attention == "sparsectx":
        assert ops.backend_for(device, torch.bfloat16) != ops.TORCH_REFERENCE, "bf16 runs the torch reference here"
    calls, originals = [], {name: getattr(processors, name) for name in ("sparse_attention", "masked_attention")}
    for name, op in originals.items():
        setattr(processors, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    sparsectx.enable(model, budget=budget, selector="uniform", attention=attention)
    try:
        dropped = run(model, kwargs)
        keep = sparsectx.last_selection(model).keep
    finally:
        sparsectx.disable(model)
        for name, op in originals.items():
            setattr(processors, name, op)
    assert bool(calls) == (attention == "sparsectx")
    assert dropped.dtype == torch.bfloat16 and not keep.all()
    assert_criterion(dropped, masked(model, keep, kwargs), model, keep, kwargs)


def host_reads_of_two_steps(model: torch.nn.Module, kwargs: dict, run: Callable, timestep: str = "timestep",
                            **settings) -> tuple:
    """``(plain, first, later)``: the host reads (``count_host_reads`` told the model's and the inputs' tensors, those
    in per-sample lists too) of the unpatched model, of the drop-in's first step (``sparsectx.enable(model,
    **settings)``) and of a later step of the same call (its ``timestep`` argument halved). Asserts that the later step
    reused the plan (the first step's inputs give its output again; the later step's output differs)."""
    device_data = [model, *(t for v in kwargs.values() for t in integration._nested_tensors(v))]
    with count_host_reads(device_data) as plain:
        run(model, kwargs)
    sparsectx.enable(model, **settings)
    with count_host_reads(device_data) as first:
        out_first = run(model, kwargs)
    later_kwargs = {**kwargs, timestep: kwargs[timestep] * 0.5}
    with count_host_reads([*device_data, later_kwargs[timestep]]) as later:
        out_later = run(model, later_kwargs)
    assert torch.equal(run(model, kwargs), out_first) and not torch.equal(out_later, out_first)
    return plain, first, later


def check_keep_all_and_disable(pipe, call: Callable[[], torch.Tensor], budget=0.5,
                               changed: Callable = lambda out, expected: (out - expected).abs().max() > 1e-4) -> None:
    """An enabled pipeline keeping every token, and the pipeline disabled again, give the unpatched pipeline's
    ``call()`` output bit for bit (the original forward runs); a ``budget`` dropping tokens ``changed`` it."""
    expected = call()
    sparsectx.enable(pipe, budget=1.0, selector="random", seed=0)
    assert torch.equal(call(), expected)
    sparsectx.enable(pipe, budget=budget, selector="random", seed=0)
    assert changed(call(), expected)
    sparsectx.disable(pipe)
    assert torch.equal(call(), expected)


def check_generator_seeds_selection(pipe, call: Callable[[int], object]) -> None:
    """Without a seed, the random selector draws from the pipeline call's generator (``call(seed)``): the same seed
    keeps the same tokens, another seed others."""
    sparsectx.enable(pipe, budget=0.25, selector="random")
    call(3)
    first = sparsectx.last_selection(pipe).keep
    call(3)
    assert torch.equal(sparsectx.last_selection(pipe).keep, first)
    call(4)
    assert not torch.equal(sparsectx.last_selection(pipe).keep, first)
