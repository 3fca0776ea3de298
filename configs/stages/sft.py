"""Stage `sft`: actions + explanations on VLA turns (DESIGN §3).

`--config configs/stages/sft.py:tiny --config.train.init_from=runs/pretrain/checkpoints` starts
from the pretrain stage's params (fresh optimizer, step 0; the loaded / new / dropped params are
printed and logged to events.jsonl). The DNFM terms and the explanation head train; the latent KL
stays on as a regulariser, InfoNCE and reconstruction are off. Everything trains but the anchor,
which is frozen from here on. tiny imports no anchor and keeps training its own (`all_and_anchor`,
as the quality ladder's `full` rung): the ladder puts every learner behind a frozen random anchor
at the `<noop>` floor, and the pretrain stage's 400 steps are its only other training.
"""

from __future__ import annotations

import ml_collections

from configs.vla_cabin import get_config as base_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config(variant)
    c.train.stage = "sft"
    c.train.init_from = ""  # the pretrain run's checkpoints/ (set on the command line)
    c.train.trainable = "all_and_anchor" if variant == "tiny" else "all"
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
