"""Drop-in replacement for ``torch.nn.utils.prune``: ``from masksparse import prune``.

Same names, signatures and reparametrisation (``<name>_orig``, ``<name>_mask``, torch's state_dict keys);
masks are stored as bool, ``module.<name>`` is computed on read (never stale, no copy at rest), and
``global_unstructured`` never concatenates the model. Extras: :func:`remove_all`, :func:`nm_structured`.
"""

from masksparse.prune.functional import (
    custom_from_mask,
    global_unstructured,
    identity,
    is_pruned,
    l1_unstructured,
    ln_structured,
    nm_structured,
    random_structured,
    random_unstructured,
    remove,
    remove_all,
)
from masksparse.prune.methods import (
    BasePruningMethod,
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    NMStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
)

__all__ = [
    "BasePruningMethod",
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "NMStructured",
    "PruningContainer",
    "RandomStructured",
    "RandomUnstructured",
    "custom_from_mask",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "nm_structured",
    "random_structured",
    "random_unstructured",
    "remove",
    "remove_all",
]
