"""DNFM decisions against an autoregressive action head on the same backbone (latency baseline).

    ar_model_config(model_cfg)          -> the `model` config of a causal action head of the DNFM's size
    decision_functions(cfg, steps)      -> {name: jitted fn(params, frozen, ar_params, batch) -> actions}
    init_ar_params(cfg, rng)            -> params of the autoregressive head
    time_decisions(cfg, steps, repeats) -> {name: median seconds at batch 1}

One "decision" is the action tokens of one request: the backbone (modality encoders, frozen ViT,
bridge through the frozen LM, connector: `VLACabin.encode` + `VLACabin.context`) and then either
DNFM's K Euler steps from z0 (K = 1, 2, 4, 8) plus the codebook argmax, or an autoregressive
decode of `action_len` tokens, one at a time, greedy under the action grammar: the head of
`model/ar_head.py` (sized like the DNFM, cross-attending to the connector memory the DNFM reads;
each step re-runs it on the fixed-size token buffer, no KV cache). Its weights are random here:
only its timing matters (the quality ladder trains it: `tools.quality_ladder`). The explanation text, the same for both, is
not part of a decision here.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import ar_head, dnfm
from vlacabin_jax.model.ar_head import ar_model_config  # noqa: F401  (re-exported: the head's config)
from vlacabin_jax.model.functional import build_model, merge_params
from vlacabin_jax.model.vla_cabin import VLACabin

def init_ar_params(cfg: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Random params of the autoregressive head (unboxed); they do not depend on the memory length."""
    m = cfg.model
    tokens = jnp.zeros((1, m.action_len), jnp.int32)
    memory = jnp.zeros((1, 1, m.bridge.connector.width), jnp.dtype(m.dtype))
    head = ar_head.ActionDecoder(m, dtype=jnp.dtype(m.dtype))
    return nn.unbox(head.init(rng, tokens, memory, jnp.ones((1, 1), jnp.bool_))["params"])


def _backbone(module: VLACabin, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z0 mean [b, positions, d_action], connector memory [b, l, w], its mask [b, l])."""
    enc = module.encode(batch)
    _, z0, _, memory, memory_mask = module.context(batch, enc["mean"], enc["mask"])
    return z0, memory, memory_mask


def decision_functions(cfg: ml_collections.ConfigDict, steps: tuple[int, ...] = (1, 2, 4, 8)
                       ) -> dict[str, Callable]:
    """{"backbone", "dnfm_K<k>" per k, "autoregressive"}: jitted fns (params, frozen, ar_params,
    batch) → action tokens [b, action_len] int32 (the backbone returns z0)."""
    model, m = build_model(cfg), cfg.model
    head = ar_head.ActionDecoder(m, dtype=jnp.dtype(m.dtype))

    def apply(fn):
        return lambda params, frozen, batch: model.apply({"params": merge_params(params, frozen)}, batch, method=fn)

    def dnfm_fn(k):
        def decide(module, batch):
            z0, memory, memory_mask = _backbone(module, batch)
            x1 = dnfm.euler_sample(functools.partial(module.dnfm, memory=memory, memory_mask=memory_mask), z0, k)
            return dnfm.decode_actions(module.dnfm.logits(x1), m)
        return decide

    def backbone_only(params, frozen, ar_params, batch):
        return apply(lambda module, b: _backbone(module, b)[0])(params, frozen, batch)

    def autoregressive(params, frozen, ar_params, batch):
        _, memory, memory_mask = apply(_backbone)(params, frozen, batch)
        logits_fn = lambda tokens: head.apply({"params": ar_params}, tokens, memory, memory_mask)  # noqa: E731
        return ar_head.greedy_actions(logits_fn, memory.shape[0], m.action_len)

    def dnfm_decision(k):
        decide = apply(dnfm_fn(k))
        return lambda params, frozen, ar_params, batch: decide(params, frozen, batch)

    fns = {"backbone": backbone_only, **{f"dnfm_K{k}": dnfm_decision(k) for k in steps}}
    fns["autoregressive"] = autoregressive
    return {name: jax.jit(fn) for name, fn in fns.items()}


def time_decisions(cfg: ml_collections.ConfigDict, params: dict, frozen: dict, batch: dict,
                   steps: tuple[int, ...] = (1, 2, 4, 8), repeats: int = 20) -> dict[str, dict]:
    """{name: {"median_s", "compile_s"}} of every decision function on `batch` (batch 1 in the
    bench), measured round-robin so that a load change on the machine touches all alike."""
    ar_params = init_ar_params(cfg, jax.random.key(1))
    fns = decision_functions(cfg, steps)
    out: dict[str, dict] = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(params, frozen, ar_params, batch))
        out[name] = {"compile_s": time.perf_counter() - t, "times_s": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(params, frozen, ar_params, batch))
            out[name]["times_s"].append(time.perf_counter() - t)
    for row in out.values():
        row["median_s"] = statistics.median(row["times_s"])
    return out
