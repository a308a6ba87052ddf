"""unsuperpose: take features out of superposition with sparse autoencoders.

The stages live in sibling packages: ``unsuperpose.lm``, ``unsuperpose.harvest``,
``unsuperpose.toy``, ``unsuperpose.train`` and ``unsuperpose.analyze``, and the command layer that
wires them together in ``unsuperpose.commands`` (the top-level ``commands/`` folder). This package
is the ground every one of them stands on: settings, storage, locks, processes, errors.
"""

__version__ = "0.1.0"
