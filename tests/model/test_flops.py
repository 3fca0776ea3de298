"""The analytic training FLOPs agree with XLA's count of the compiled loss + gradient."""
import flax.linen as nn
import jax

from configs.vla_cabin import get_config
from vlacabin_jax.data.spec import zeros_batch
from vlacabin_jax.model import functional as F
from vlacabin_jax.model.flops import model_flops_per_sample


def test_model_flops_match_xla_cost_analysis():
    cfg = get_config("tiny")
    # Unrolled layers: XLA's cost analysis does not multiply a scanned body by its trip count.
    cfg.model.scan_layers = False
    cfg.model.dtype = "float32"
    batch_size = 8
    trainable, frozen = jax.eval_shape(lambda: F.init_params(cfg, jax.random.key(0)))
    trainable, frozen = nn.unbox(trainable), nn.unbox(frozen)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), zeros_batch(cfg, batch_size))
    rngs = {"latent": jax.random.key(1), "flow": jax.random.key(2)}
    grad_fn = jax.jit(jax.grad(lambda p, f, b, r: F.loss_fn(p, f, b, r, cfg, 0)[0]))
    cost = grad_fn.lower(trainable, frozen, batch, rngs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = cost["flops"] / batch_size
    analytic = model_flops_per_sample(cfg)
    print(f"training FLOPs per sample: analytic {analytic:.4g}, XLA {xla:.4g}, ratio {xla / analytic:.3f}")
    assert 0.85 <= xla / analytic <= 1.15
