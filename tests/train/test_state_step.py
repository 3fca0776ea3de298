"""Train state created sharded; the jitted step (donation, device metrics, accumulation, NaN guard)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs.vla_cabin import get_config
from tests.train import runs
from vlacabin_jax import sharding
from vlacabin_jax.data import pipeline
from vlacabin_jax.data.spec import zeros_batch
from vlacabin_jax.train import optimizer
from vlacabin_jax.train import state as state_lib
from vlacabin_jax.train import step as step_lib


def _cfg(mesh=(2, 2, 2)):
    """tiny in float32 at the loop tests' batch and schedule, on `mesh`."""
    cfg = get_config("tiny")
    cfg.model.dtype = "float32"
    cfg.train.update(steps=80, global_batch_size=16, log_every=1, eval_every=0)
    cfg.optim.warmup_steps = 10
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    return cfg


@pytest.fixture(scope="module")
def real():
    cfg = _cfg()
    cfg.train.trainable = "all"  # the frozen-anchor layout (tiny's own anchor trains by default)
    mesh = sharding.make_mesh(cfg.mesh)
    state, shardings = state_lib.create_train_state(cfg, mesh)
    return cfg, mesh, state, shardings


def test_state_is_created_sharded(real):
    cfg, mesh, state, shardings = real
    flat_state = jax.tree_util.tree_leaves_with_path(state)
    flat_shard = jax.tree.leaves(shardings)
    assert len(flat_state) == len(flat_shard)
    split = 0
    for (path, x), s in zip(flat_state, flat_shard):
        assert x.sharding == s, jax.tree_util.keystr(path)
        shard_shape = x.addressable_shards[0].data.shape
        if shard_shape != x.shape:
            split += 1
    assert split > 50  # kernels and their Adam moments are split over fsdp/tensor
    kernel = state.trainable["dnfm"]["blocks"]["layers"]["mlp"]["up"]["dense"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2] // 2)
    # Frozen anchor: anchor dtype, no optimizer state (only trainable-shaped moments exist).
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(cfg.model.anchor_dtype)}
    n_trainable = len(jax.tree.leaves(state.trainable))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * n_trainable
    assert state.step.shape == () and int(state.step) == 0 and state.rng.dtype == jnp.uint32


def test_anchor_file_is_placed_onto_the_anchor_shardings(real, tmp_path):
    """`model.anchor_weights` (a `tools/import_hf` file) replaces the stored groups leaf for leaf,
    each leaf landing on its own sharding; groups absent from the file are left as they were."""
    from safetensors.numpy import save_file

    cfg, mesh, state, shardings = real
    rng = np.random.default_rng(0)
    lm = {"/".join(str(k.key) for k in path): rng.normal(size=x.shape).astype(np.float32)
          for path, x in jax.tree_util.tree_leaves_with_path(state.frozen["lm"])}
    save_file({f"lm/{k}": v for k, v in lm.items()}, str(tmp_path / "anchor.safetensors"))
    loaded = state_lib.load_anchor(state, shardings, str(tmp_path / "anchor.safetensors"))
    for path, x in jax.tree_util.tree_leaves_with_path(loaded.frozen["lm"]):
        name = "/".join(str(k.key) for k in path)
        np.testing.assert_array_equal(np.asarray(x, np.float32), lm[name].astype(x.dtype).astype(np.float32))
    for a, b, s in zip(jax.tree.leaves(loaded.frozen), jax.tree.leaves(state.frozen),
                       jax.tree.leaves(shardings.frozen)):
        assert a.sharding == s and a.dtype == b.dtype
    assert all(a is b for a, b in zip(jax.tree.leaves(loaded.frozen["vit"]), jax.tree.leaves(state.frozen["vit"])))


def test_real_step_donates_state_and_keeps_metrics_on_device():
    # The loop tests' reference run's config (8x1x1, a frozen anchor): the same program, so the
    # compilation cache serves whichever compiles second. (Multi-axis CPU meshes can deadlock in
    # XLA:CPU, see tests/train/test_loop.py.)
    cfg = runs.config()
    mesh = sharding.make_mesh(cfg.mesh)
    state, shardings = state_lib.create_train_state(cfg, mesh)
    train_step = step_lib.make_train_step(cfg, mesh, shardings)
    it = pipeline.make_dataset(cfg, global_batch_size=16, seed=0)
    batch = step_lib.device_batch(next(it), step_lib.batch_shardings(cfg, mesh), 16)
    assert batch["frames"].sharding.spec[0] == ("data", "fsdp")
    old_kernel = state.trainable["dnfm"]["in_proj"]["dense"]["kernel"]
    # Device copies: a host view of a CPU buffer would keep it alive and block the donation.
    frozen_before, trainable_before = jax.tree.map(jnp.copy, (state.frozen, state.trainable))
    new_state, metrics = train_step(state, batch)
    assert old_kernel.is_deleted()  # donated: updated in place, no second copy of the state
    assert all(isinstance(v, jax.Array) and v.shape == () and v.sharding.is_fully_replicated
               for v in metrics.values())
    host = jax.device_get(jax.block_until_ready(metrics))  # wait first: see loop._fetch
    assert int(new_state.step) == 1 and host["finite"] == 1.0 and np.isfinite(host["loss"])
    for key in ("loss", "velocity", "endpoint_ce", "source_ce", "explanation_ce", "grad_norm", "learning_rate"):
        assert key in host
    jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail("output sharding changed"), new_state, shardings)
    # The frozen anchor comes out bit for bit as it went in, while the trainable params got
    # gradients (Adam's first moments; step 1's learning rate is 0, so the params stay).
    assert {"vit", "lm"} <= set(frozen_before)
    assert jax.tree.structure(frozen_before) == jax.tree.structure(new_state.frozen)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.frozen), jax.device_get(frozen_before))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.trainable), jax.device_get(trainable_before))
    mu = jax.tree.leaves(jax.device_get(optax.tree_utils.tree_get(new_state.opt_state, "mu")))
    assert len(mu) == len(jax.tree.leaves(trainable_before)) and sum(bool(np.any(m)) for m in mu) > 0.8 * len(mu)


# ---- accumulation and the non-finite guard, on the real step code with a cheap stand-in loss
# (the real loss_fn under accumulation: tests/train/test_accumulation.py)
def _toy(monkeypatch, accum: int, batch_size: int = 32):
    # A mean over the rows, as (sum, count) like every term of the real loss: divided by the
    # whole batch's count when the batch is a microbatch (`totals`, see step._grads_and_metrics).
    def toy_loss(params, frozen, batch, rngs, cfg, step, reference=None, totals=None):
        x = batch["state_numeric"]
        err = x @ params["w"] + params["b"] - x.sum(-1)
        n = err.shape[0] if totals is None else totals["rows"]
        loss = jnp.sum(err ** 2) / n
        return loss, {"loss": loss, "err": jnp.sum(err) / n}

    def toy_counts(params, frozen, batch, rngs, cfg, reference=None):
        return {"rows": jnp.float32(batch["state_numeric"].shape[0])}

    monkeypatch.setattr(step_lib.functional, "loss_fn", toy_loss)
    monkeypatch.setattr(step_lib.functional, "loss_counts", toy_counts)
    cfg = _cfg((8, 1, 1))
    cfg.train.update(grad_accum_steps=accum, global_batch_size=batch_size)
    mesh = sharding.make_mesh(cfg.mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    tx = optimizer.make_optimizer(cfg)
    trainable = {"w": jnp.zeros((cfg.model.state.numeric_dim,)), "b": jnp.zeros(())}
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen={},
                                 opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(0)))
    shardings = jax.tree.map(lambda _: rep, state)
    state = jax.device_put(state, shardings)
    host = zeros_batch(cfg, batch_size)
    host["state_numeric"] = np.random.default_rng(0).normal(size=host["state_numeric"].shape).astype(np.float32)
    host.pop("sample_id")
    batch = step_lib.device_batch(host, step_lib.batch_shardings(cfg, mesh), batch_size)
    return step_lib.make_train_step(cfg, mesh, shardings), state, batch, host


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_full_batch(monkeypatch, accum):
    full_step, state, batch, _ = _toy(monkeypatch, 1)
    want_state, want = full_step(jax.tree.map(jnp.copy, state), batch)
    acc_step, state, batch, _ = _toy(monkeypatch, accum)
    got_state, got = acc_step(state, batch)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(got_state.trainable["w"], want_state.trainable["w"], rtol=1e-5, atol=1e-8)


def test_non_finite_update_is_refused(monkeypatch):
    train_step, state, _, host = _toy(monkeypatch, 1)
    host["state_numeric"][3, 0] = np.nan
    cfg = _cfg((8, 1, 1))
    batch = step_lib.device_batch(host, step_lib.batch_shardings(cfg, sharding.make_mesh(cfg.mesh)), 32)
    before = jax.device_get(state)
    after, metrics = train_step(state, batch)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(after)
    assert int(after.step) == 0
    jax.tree.map(np.testing.assert_array_equal, after.trainable, before.trainable)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)


def test_lora_and_heads_state_trains_adapters_and_heads_only():
    """train.trainable = "lora_and_heads": moments only for adapters and heads; the frozen encoder
    weights keep param_dtype, the anchor anchor_dtype; adapters shard and take weight decay."""
    cfg = _cfg()
    cfg.model.lora.rank = 4
    cfg.train.trainable = "lora_and_heads"
    abstract, shardings = state_lib.state_shardings(cfg, sharding.make_mesh(cfg.mesh))
    assert set(abstract.trainable) == {"connector", "dnfm", "explanation", "speech_encoder", "text_encoder",
                                       "video_encoder", "state_encoder"}
    assert set(abstract.trainable["text_encoder"]["encoder"]["layers"]["attn"]["query"]) == {"lora_a", "lora_b"}
    assert abstract.frozen["text_encoder"]["encoder"]["layers"]["attn"]["query"]["dense"]["kernel"].dtype == jnp.float32
    assert abstract.frozen["lm"]["embedding"].dtype == jnp.dtype(cfg.model.anchor_dtype)
    moments = [x for x in jax.tree.leaves(abstract.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(abstract.trainable))
    lora_a = shardings.trainable["text_encoder"]["encoder"]["layers"]["mlp"]["up"]["lora_a"]
    assert lora_a.spec == PartitionSpec(None, "fsdp", None)  # [layers, embed, rank]
    mask = optimizer.decay_mask(abstract.trainable)
    assert mask["text_encoder"]["encoder"]["layers"]["mlp"]["up"]["lora_b"] is True
