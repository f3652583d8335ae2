"""sparsectx: Sparse Context for reference-conditioned diffusion transformers.

Public ops (``sparsectx.ops``): ``sparse_attention``, ``masked_attention``, ``compact_tokens``, ``scatter_tokens``,
``attention_key_mass``, ``rms_norm_rope``, ``rope_tables``.
"""
from .ops import (  # noqa: F401
    Compacted,
    attention_key_mass,
    backend_for,
    compact_tokens,
    masked_attention,
    rms_norm_rope,
    rope_tables,
    scatter_tokens,
    sparse_attention,
)
# the integration imports diffusers only when used
from .integration import disable, enable, is_enabled, last_selection, sparse_context  # noqa: F401
from .budget_sweep import Sweep, SweepRow, sweep  # noqa: F401
from .selection import (  # noqa: F401
    SelectionContext,
    available_selectors,
    get_selector,
    register_selector,
    select,
)
from .training import (  # noqa: F401
    GeneratorState,
    disable_drop_training,
    enable_drop_training,
    is_drop_training_enabled,
    last_drop_mask,
    random_drop_mask,
    random_drop_selector,
)

__version__ = "0.1.0"

# what ``from sparsectx import *`` binds: the API, not the submodules (``kernels`` among them, a name Hugging Face's
# ``kernels`` package owns at the top level)
__all__ = [
    "Compacted", "attention_key_mass", "backend_for", "compact_tokens", "masked_attention", "rms_norm_rope",
    "rope_tables", "scatter_tokens", "sparse_attention",
    "disable", "enable", "is_enabled", "last_selection", "sparse_context", "Sweep", "SweepRow", "sweep",
    "SelectionContext", "available_selectors", "get_selector", "register_selector", "select",
    "GeneratorState", "disable_drop_training", "enable_drop_training", "is_drop_training_enabled", "last_drop_mask",
    "random_drop_mask", "random_drop_selector",
]
