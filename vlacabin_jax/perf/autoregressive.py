"""DNFM decisions against an autoregressive action head on the same backbone (latency baseline).

    ar_model_config(model_cfg)          -> the `model` config of a causal action head of the DNFM's size
    decision_functions(cfg, steps)      -> {name: jitted fn(params, frozen, ar_params, batch) -> actions}
    init_ar_params(cfg, rng)            -> params of the autoregressive head
    time_decisions(cfg, steps, repeats) -> {name: median seconds at batch 1}

One "decision" is the action tokens of one request: the backbone (modality encoders, frozen ViT,
bridge through the frozen LM, connector: `VLACabin.encode` + `VLACabin.context`) and then either
DNFM's K Euler steps from z0 (K = 1, 2, 4, 8) plus the codebook argmax, or an autoregressive
decode of `action_len` tokens, one at a time, greedy. The head is `explain.ExplanationHead` sized
like the DNFM (width, depth, heads, MLP), over the action vocabulary, cross-attending to the
connector context; each step re-runs it on the fixed-size token buffer (no KV cache, as
`explain.greedy_decode`: at <= 16 tokens and batch 1 a step is bound by latency, not FLOPs).
Its weights are random: only its timing matters. The explanation text, the same for both, is
not part of a decision here.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import dnfm, explain
from vlacabin_jax.model.functional import build_model, merge_params
from vlacabin_jax.model.vla_cabin import VLACabin

START_ID = 0  # the action vocabulary has no <bos>; <pad> starts the buffer
NEVER = -1  # no early stop: every decision decodes all action_len tokens (a fixed latency)


def ar_model_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model` config whose `explain` section is a causal head the size of the DNFM over the
    action vocabulary, `action_len + 1` positions (start token + actions)."""
    c = ml_collections.ConfigDict(model_cfg.to_dict())
    d = model_cfg.dnfm
    c.explain = ml_collections.ConfigDict(dict(width=d.width, depth=d.depth, heads=d.heads, mlp_dim=d.mlp_dim,
                                               vocab_size=d.vocab_size))
    c.explain_len = model_cfg.action_len + 1
    return c


def _head(cfg: ml_collections.ConfigDict) -> explain.ExplanationHead:
    return explain.ExplanationHead(ar_model_config(cfg.model), dtype=jnp.dtype(cfg.model.dtype))


def init_ar_params(cfg: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Random params of the autoregressive head (unboxed)."""
    m = cfg.model
    tokens = jnp.zeros((1, m.action_len + 1), jnp.int32)
    context = jnp.zeros((1, m.bridge.n_queries, m.bridge.connector.width), jnp.dtype(m.dtype))
    return nn.unbox(_head(cfg).init(rng, tokens, context)["params"])


def _backbone(module: VLACabin, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(connector context [b, q, w], z0 mean [b, action_len, d_action]) from the latent means."""
    enc = module.encode(batch)
    context, z0, _ = module.context(batch, enc["mean"], enc["mask"])
    return context, z0


def decision_functions(cfg: ml_collections.ConfigDict, steps: tuple[int, ...] = (1, 2, 4, 8)
                       ) -> dict[str, Callable]:
    """{"backbone", "dnfm_K<k>" per k, "autoregressive"}: jitted fns (params, frozen, ar_params,
    batch) → action tokens [b, action_len] int32 (the backbone returns z0)."""
    model, head, m = build_model(cfg), _head(cfg), cfg.model

    def apply(fn):
        return lambda params, frozen, batch: model.apply({"params": merge_params(params, frozen)}, batch, method=fn)

    def dnfm_fn(k):
        def decide(module, batch):
            _, z0 = _backbone(module, batch)
            x1 = dnfm.euler_sample(module.dnfm, z0, k)
            return jnp.argmax(module.dnfm.logits(x1), axis=-1).astype(jnp.int32)
        return decide

    def backbone_only(params, frozen, ar_params, batch):
        return apply(lambda module, b: _backbone(module, b)[1])(params, frozen, batch)

    def autoregressive(params, frozen, ar_params, batch):
        context = apply(lambda module, b: _backbone(module, b)[0])(params, frozen, batch)
        logits_fn = lambda tokens: head.apply({"params": ar_params}, tokens, context)  # noqa: E731
        tokens = explain.greedy_decode(logits_fn, context.shape[0], m.action_len + 1, START_ID, NEVER, START_ID)
        return tokens[:, 1:]

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
