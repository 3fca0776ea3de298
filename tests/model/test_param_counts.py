"""Parameter counts of every variant, from shapes alone (jax.eval_shape allocates nothing)."""
import jax
import pytest

from configs.vla_cabin import VARIANTS, get_config
from vlacabin_jax.model import functional as F

# (min, max) of (the model without its anchor, the anchor: vit + lm) in millions: tiny is a CPU
# toy, base about 1B in total with the anchor, a100x128 carries a multi-billion anchor.
RANGES = {
    "tiny": ((0.1, 4.0), (0.05, 1.0)),
    "small": ((5, 40), (2, 20)),
    "base": ((200, 500), (450, 700)),
    "a100x128": ((1000, 4000), (5000, 10000)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts(variant):
    cfg = get_config(variant)
    trainable, frozen = jax.eval_shape(lambda: F.init_params(cfg, jax.random.key(0)))
    n_train, n_frozen = F.param_count(trainable) / 1e6, F.param_count(frozen) / 1e6
    per_module = {k: round(F.param_count(v) / 1e6, 2) for k, v in {**trainable, **frozen}.items()}
    print(f"{variant}: trainable {n_train:.2f}M, frozen {n_frozen:.2f}M, total {n_train + n_frozen:.2f}M; {per_module}")
    n_anchor = sum(F.param_count(g.get(k, {})) for g in (trainable, frozen) for k in ("vit", "lm")) / 1e6
    (lo_t, hi_t), (lo_f, hi_f) = RANGES[variant]
    assert lo_t <= n_train + n_frozen - n_anchor <= hi_t and lo_f <= n_anchor <= hi_f
    # The anchor is frozen unless it trains (tiny: no imported anchor, train.trainable = all_and_anchor).
    in_frozen = all(k in frozen for k in ("vit", "lm"))
    assert in_frozen == (cfg.train.trainable != "all_and_anchor")
    if variant == "tiny":
        assert n_train + n_frozen < 5.0
