"""The built-in dictionary methods, one module each, trained or fitted.

A trained family (an SAE architecture) is a ``StackedGroup`` subclass (its codes and its extra
loss), the dictionary class its trained dictionaries are saved and loaded as, and its record
(``train.registry.Family``: knob, options, SAELens mapping, source); a module ``<name>_fast.py``
may add a hand-written step, which registers itself as the family's fast path. A fitted family
(a baseline the research compares SAEs with: the neuron basis, PCA, ICA, sparse coding, random
directions) has no group: its ``fit(data, config, n)`` builds the dictionaries of one size, one
per knob value, from the training rows (``fitted.FitData``).

Every module of this package is imported here, so adding an architecture is adding its module:
each registers what it defines when it is imported, and nothing lists them. An architecture
defined elsewhere registers the same way (tests/test_new_architecture.py).
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
