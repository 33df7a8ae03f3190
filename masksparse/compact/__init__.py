"""Turn structured masks into a smaller model that computes the same thing: plan, apply, verify.

- :mod:`~masksparse.compact.planning`: :func:`plan_compaction` decides what the masks make dead and
  returns a frozen :class:`~masksparse.compact.plan.Plan` (:mod:`~masksparse.compact.plan`);
- :mod:`~masksparse.compact.apply`: :func:`compact` carries the plan out on a copy (or in place) and
  verifies it (:mod:`~masksparse.compact.verification`);
- :mod:`~masksparse.compact.slicers`: how each layer type updates its attributes;
- :mod:`~masksparse.compact.saving`: :func:`save_compacted` and :func:`load_compacted` write a compacted
  model to one safetensors file and rebuild it from a fresh model; :mod:`~masksparse.compact.huggingface`
  keeps a Hugging Face model's config in step with its sizes;
- :mod:`~masksparse.compact.modules` and :mod:`~masksparse.compact.torchvision_attention`: the attention
  classes a module that loses heads is switched to.

``masksparse.compact`` the *function* (re-exported by the top-level package) is
:func:`masksparse.compact.apply.compact`; import this package's modules with ``from masksparse.compact
import planning`` or ``from masksparse.compact.plan import Plan``.
"""

from masksparse.compact.apply import compact
from masksparse.compact.modules import CompactMultiheadAttention
from masksparse.compact.plan import (
    AttributeUpdate,
    BiasFold,
    ConfigChange,
    NormalisationChange,
    Plan,
    TensorCut,
    compaction_plans,
)
from masksparse.compact.planning import plan_compaction
from masksparse.compact.saving import load_compacted, save_compacted
from masksparse.compact.slicers import register_slicer
from masksparse.compact.verification import relative_error, verify

__all__ = [
    "AttributeUpdate",
    "BiasFold",
    "CompactMultiheadAttention",
    "ConfigChange",
    "NormalisationChange",
    "Plan",
    "TensorCut",
    "compact",
    "compaction_plans",
    "load_compacted",
    "plan_compaction",
    "register_slicer",
    "relative_error",
    "save_compacted",
    "verify",
]
