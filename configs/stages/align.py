"""Stage `align`: preference alignment (Diffusion-DPO on flow-matching errors, DESIGN §3).

Not implemented in this version: validation rejects `train.stage = "align"` with a clear message
instead of silently training SFT. The weights below are the SFT ones the objective will start from.
"""

from __future__ import annotations

import ml_collections

from configs.stages.sft import get_config as sft_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = sft_config(variant)
    c.train.stage = "align"
    return c
