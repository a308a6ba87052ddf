"""unsuperpose: take features out of superposition with sparse autoencoders.

The stages live in sibling packages: ``unsuperpose.lm``, ``unsuperpose.harvest``,
``unsuperpose.toy``, ``unsuperpose.train`` and ``unsuperpose.analyze``; this package holds only
the version and the command layer that wires them together.
"""

__version__ = "0.1.0"
