"""Stage 2: stream hook activations of an LM into bfloat16 Zarr stores, and read them back.

``harvest(bridge, blocks, out_dir, HarvestConfig(...), ...)`` writes one store per hook;
``ActivationStore(path)`` reads one as an activation source for ``train``, whose stream never
serves the store's held-out rows (``heldout.py`` says which; ``heldout_batches`` serves them).
Importing this
package registers the ``bfloat16`` zarr data type, so plain ``zarr.open`` works afterwards.
"""

from .bf16 import BFloat16, bf16_to_torch, register as register_bfloat16
from .decode import store_decoder
from .loop import DEFAULT_HOOK, HarvestConfig, HarvestError, harvest, planned_stores, store_name
from .reader import ActivationStore
from .store import StoreError, kept_rows

__all__ = [
    "ActivationStore",
    "BFloat16",
    "DEFAULT_HOOK",
    "HarvestConfig",
    "HarvestError",
    "bf16_to_torch",
    "harvest",
    "kept_rows",
    "planned_stores",
    "register_bfloat16",
    "StoreError",
    "store_decoder",
    "store_name",
]
