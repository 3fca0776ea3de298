"""Stage `pretrain`: align the modality latents on all four data kinds (DESIGN §3).

`--config configs/stages/pretrain.py:tiny`. The multimodal VAE terms (KL, cross-modal InfoNCE,
reconstruction) and the explanation/caption head train; the DNFM action terms are off. Everything
trains; on tiny (no imported anchor) the anchor too: a random anchor must learn before the later
stages freeze it (with `model.anchor_weights`, set `train.trainable=all`: imported anchors stay
frozen).
"""

from __future__ import annotations

import ml_collections

from configs.vla_cabin import BALANCED_MIXTURE, get_config as base_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config(variant)
    c.train.stage = "pretrain"
    c.train.init_from = ""  # a fresh start (or an earlier pretrain run's checkpoints/)
    c.train.trainable = "all_and_anchor" if variant == "tiny" else "all"
    c.data.mixture = BALANCED_MIXTURE
    c.loss.infonce_weight = 1.0
    c.loss.recon_weight = 1.0
    c.loss.explanation_weight = 1.0
    for term in ("velocity", "endpoint", "source", "path"):
        c.loss[f"{term}_weight"] = 0.0
    if variant == "tiny":
        # The recipe's pretrain budget (docs/recipe.md), not the longer joint demo's.
        c.train.steps, c.train.eval_every = 400, 200
    return c
