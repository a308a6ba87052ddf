"""The sparsity knobs the built-in architectures share (``registry.Knob``).

A knob is shared where its meaning is: relu's L1 and sparse coding's penalty are both written
"l1" and set by --l1; TopK, BatchTopK and Matryoshka all keep k latents per row. A family whose
values live on another scale keeps the knob and gives its own ``Family.default_values``.
"""

from __future__ import annotations

import dataclasses

from unsuperpose.train.registry import Knob

L1 = Knob(
    name="l1",
    type=float,
    flag="--l1",
    label="L1",
    defaults=(1e-3,),
    denser_when_larger=False,
    help="L1 coefficients, comma-separated, in the --l1-norm convention",
    field="l1",
    example="1e-4,3e-4,1e-3",
)
K = Knob(
    name="k",
    type=int,
    flag="--topk",
    label="k",
    defaults=(32,),
    denser_when_larger=True,
    help="active latents per row, comma-separated",
    minimum=1,
    field="top_k",
    example="8,16,32",
)
TOPK_ALL = 0  # the k of `--topk all`: a basis keeps every coefficient (no SAE has k 0)
# A basis's k: the same knob, where "all" keeps every coefficient.
K_OR_ALL = dataclasses.replace(K, all_value=TOPK_ALL)
L0_COEF = Knob(
    name="l0_coef",
    type=float,
    flag="--l0-coef",
    label="L0 coefficient",
    defaults=(1e-3,),
    denser_when_larger=False,
    help="L0 penalty coefficients, comma-separated",
    field="l0_coef",
)
