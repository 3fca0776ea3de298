"""Stage `align`: preference alignment, Diffusion-DPO on the DNFM flow-matching errors (DESIGN §3).

`--config configs/stages/align.py:tiny --config.train.init_from=runs/sft/checkpoints` starts from the
sft stage's params; its DNFM is also kept, frozen, as the DPO reference (`TrainState.reference`).
Data: preference pairs of the synthetic world (`preference`) by default; the recipe uses
`--config.data.preference_dir=DIR --config.data.mixture=preference_sim=1,vla=3`: pairs sampled from
the sft policy and scored in the cabin simulator, kept where the rejected answer breaks a guardrail
or over-triggers (`python -m tools.make_preferences --rejected-for=violation,over_trigger`), plus
plain VLA turns whose sft terms keep the policy's answers from drifting. What trains: LoRA
adapters on the modality encoders and the heads after the frozen LM (connector and z0 head, DNFM,
explanation head); the encoders' base weights and the anchor are frozen.
"""

from __future__ import annotations

import ml_collections

from configs.stages.sft import get_config as sft_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = sft_config(variant)
    c.train.stage = "align"
    c.train.init_from = ""  # required: the sft run's checkpoints/ (validation says so when missing)
    c.train.trainable = "lora_and_heads"
    c.model.lora.rank = 8
    c.model.lora.alpha = 16.0
    c.data.mixture = "preference=2,vla=1"  # pairs, plus sft turns as an anchor
    c.loss.dpo_weight = 1.0
    # beta 10 moved tiny's policy further than beta 2 for no fewer over-triggers (docs/recipe.md).
    c.loss.dpo_beta = 2.0
    # A short, gentle stage: the reference is one lr-step away at the start.
    c.train.steps = {"tiny": 300, "small": 2000, "base": 5000, "a100x128": 5000}[variant]
    c.optim.lr = c.optim.lr * 0.3
    c.optim.warmup_steps = min(c.optim.warmup_steps, c.train.steps // 10)
    c.loss.kl_warmup_steps = 0  # the sft stage already warmed the KL up
    return c
