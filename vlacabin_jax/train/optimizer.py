"""The optimizer of the trainable params: AdamW, warm-up + cosine, global-norm clipping, decay mask.

    make_optimizer(cfg)      -> optax.GradientTransformation over the `trainable` tree only
    learning_rate_fn(cfg)    -> step -> learning rate (the schedule, also logged)
    decay_mask(params)       -> bool tree: which leaves get weight decay

The frozen anchor never reaches the optimizer (see `train/state.py`), so it has no Adam moments.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import ml_collections
import optax

# Leaves that get no weight decay: norm scales/offsets, biases, and every kind of embedding table or
# learned vector (token/position/modality/tag embeddings, MetaQuery and pooling queries, the action
# codebook, per-field numeric maps, the ViT's position table when the anchor trains). Decaying those pulls learned lookups toward zero for no
# regularisation benefit; decay is for the matmul kernels.
_NO_DECAY_LEAVES = ("bias", "scale", "embedding", "queries", "action_codebook", "numeric_shift",
                    "numeric_scale", "pos_embed")


def _path_name(path) -> str:
    """'a/b/c' from a tree path (dict keys; box attributes such as `.value` are skipped)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params) -> object:
    """Bool tree (same structure as `params`, boxed or not): True where weight decay applies."""
    def leaf(path, _):
        name = _path_name(path).rsplit("/", 1)[-1]
        return not (name in _NO_DECAY_LEAVES or name.endswith("_embedding"))
    return jax.tree_util.tree_map_with_path(leaf, params)


def learning_rate_fn(cfg: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up from 0 to `optim.lr` over `optim.warmup_steps`, then cosine to
    `optim.lr * optim.end_lr_factor` at `train.steps`."""
    o = cfg.optim
    warmup = min(int(o.warmup_steps), max(int(cfg.train.steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(o.lr), warmup_steps=warmup,
        decay_steps=max(int(cfg.train.steps), warmup + 1), end_value=float(o.lr) * float(o.end_lr_factor))


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip_by_global_norm(optim.clip_norm) -> AdamW(schedule, b1, b2, eps, weight_decay, mask).

    Works on plain or boxed (`nn.LogicallyPartitioned`) trees: `init` on a boxed tree gives a
    boxed optimizer state whose leaves carry the params' logical axes (used for sharding).
    """
    o = cfg.optim
    clip = optax.clip_by_global_norm(float(o.clip_norm)) if o.clip_norm > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(learning_rate_fn(cfg), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                    weight_decay=float(o.weight_decay), mask=lambda p: decay_mask(nn.unbox(p))))
