"""The toy grid's defaults: the knob values, sizes and budget that bracket the truth on the
default data (what ``unsuperpose toy`` sweeps unless told otherwise; benchmarks start from them).
"""

from __future__ import annotations

from unsuperpose.toy.config import ToyConfig
from unsuperpose.toy.source import ToySource

# The default grid brackets the truth on both axes: sizes 1/4x..4x of G; L1 (sum convention)
# from too low (3.2e-5: 1x recovers 0.65 MMCS) through the Goldilocks zone (1e-4..3.2e-4) to too
# high (3.2e-3: codes collapse), half decades. 5,000 steps: at 2,000 the dead-neuron and MMCS-
# with-larger pointers were still moving (README). No resampling (the dead-neuron diagnostic
# reads deaths). About 8 minutes on the 2-core machine (7.7 measured, quiet).
DEFAULT_L1 = [round(10 ** (e / 2), 8) for e in range(-9, -4)]  # 3.2e-5 .. 3.2e-3
DEFAULT_DICT = "1/4x,1/2x,1x,2x,4x"
# The default data has 5 active features per sample on average: k around it.
DEFAULT_TOPK = [3, 5, 8]
DEFAULT_L0_COEF = [3e-3, 1e-2, 3e-2]

DEFAULT_STEPS = 5000

# The report's full grid: 17 L1 values 10^(e/4), e = -8..8, in its per-latent convention;
# dictionaries 1/8x..32x of G; 20,000 steps of 256. Meant for a GPU.
PAPER_L1 = [10 ** (e / 4) for e in range(-8, 9)]
PAPER_DICT = "1/8x,1/4x,1/2x,1x,2x,4x,8x,16x,32x"

# The dead window of the default data and batch (183 batches of 256): derived from the data's
# firing rates (ToySource.dead_window), so that a latent which learnt the rarest feature (on in
# ~0.03% of samples) is counted dead by chance with probability below 1e-3. A run on other data
# (--k, --decay, --G, --batch-size) derives its own unless --dead-window is given.
TOY_DEAD_WINDOW = ToySource(ToyConfig()).dead_window(256)
