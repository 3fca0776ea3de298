"""Stage `sft`: actions + explanations on VLA turns (DESIGN §3).

`--config configs/stages/sft.py:tiny --config.train.init_from=runs/pretrain/checkpoints` starts
from the pretrain stage's params (fresh optimizer, step 0; the loaded / new / dropped params are
printed and logged to events.jsonl). The DNFM terms and the explanation head train; the latent KL
stays on as a regulariser, InfoNCE and reconstruction are off. Everything but the anchor trains
(the anchor the pretrain stage trained, or an imported one, is frozen from here on). Run alone on
tiny (no init_from, no anchor_weights) the frozen anchor is random and the model stays at the
`<noop>` floor; add --config.train.trainable=all_and_anchor, as the quality ladder's `full` rung does.
"""

from __future__ import annotations

import ml_collections

from configs.vla_cabin import get_config as base_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config(variant)
    c.train.stage = "sft"
    c.train.init_from = ""  # the pretrain run's checkpoints/ (set on the command line)
    c.train.trainable = "all"
    c.data.mixture = "vla=1"
    c.loss.infonce_weight = 0.0
    c.loss.recon_weight = 0.0
    for term in ("velocity", "endpoint", "source", "path", "explanation"):
        c.loss[f"{term}_weight"] = 1.0
    if variant == "tiny":
        # tiny's sampler answers only <noop> for its first ~1000 steps of batch 32; by step 3000
        # it acts (500 heldout turns: success 27.0% against 23.4% for <noop> alone; docs/recipe.md).
        c.train.steps, c.train.global_batch_size = 3000, 32
        c.train.eval_every = 1000
    return c
