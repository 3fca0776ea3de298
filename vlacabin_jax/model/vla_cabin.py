"""The VLA-Cabin model: anchor (ViT + LM), modality VAE, MetaQuery bridge, DNFM action generator
(or the ladder's autoregressive head) and explanation head, as one Flax module with a training and
an inference method.

Params split in two groups (`functional.split_params`, by `train.trainable`): `vit` and `lm` are
the anchor, frozen (no gradient, no optimizer state, stored in `anchor_dtype`) except under
"all_and_anchor", where a random anchor trains with everything else; with "all" everything else
trains, with "lora_and_heads" only the LoRA adapters and `HEAD_KEYS` do.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.data.actions import PAD_ID
from vlacabin_jax.data.spec import MODALITIES, frames_unit
from vlacabin_jax.model import ar_head, bridge, dnfm, encoders, explain, setting_layout
from vlacabin_jax.model.lm import DecoderLM
from vlacabin_jax.model.vit import VisionTransformer

ANCHOR_KEYS = ("vit", "lm")  # the perception anchor: frozen (in model.anchor_dtype) unless all_and_anchor
# The heads that train beside the adapters under train.trainable = "lora_and_heads": everything
# after the frozen LM (connector with the z0 variational head, DNFM, explanation head). The
# preference objective acts on the DNFM's flow errors from z0, so these must adapt; the modules that
# feed the LM (encoders, bridge inputs, queries) move only through the encoders' adapters, and the
# reconstruction heads (no loss after pretrain) stay put rather than drift under weight decay.
HEAD_KEYS = ("connector", "dnfm", "explanation")


def _dtype(name: str):
    return jnp.dtype(name)


class VLACabin(nn.Module):
    """See module docstring. Methods take the batch dict of `vlacabin_jax.data.spec`."""

    cfg: ml_collections.ConfigDict  # the `model` config

    def setup(self):
        c = self.cfg
        kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        anchor = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.anchor_dtype), scan=c.scan_layers,
                      remat=c.remat and c.remat_policy, attention_impl=c.attention_impl or None)
        self.vit = VisionTransformer(c.vit, **anchor)
        self.lm = DecoderLM(c.lm, **anchor)
        self.speech_encoder = encoders.SpeechEncoder(c, **kw)
        self.text_encoder = encoders.TextEncoder(c, **kw)
        self.video_encoder = encoders.VideoEncoder(c, **kw)
        self.state_encoder = encoders.StateEncoder(c, **kw)
        self.reconstruction = encoders.ReconstructionHeads(c, **kw)
        self.bridge_inputs = bridge.BridgeInputs(c, len(MODALITIES), **kw)
        self.queries = bridge.Queries(c, param_dtype=_dtype(c.param_dtype))
        self.connector = bridge.Connector(c, **kw)
        self.dnfm = dnfm.DNFM(c, **kw)
        self.explanation = explain.ExplanationHead(c, **kw)
        if c.action_head == "autoregressive":
            self.action_decoder = ar_head.ActionDecoder(c, **kw)

    # ----------------------------------------------------------------------------- perception
    def frame_features(self, frames: jax.Array) -> jax.Array:
        """frames uint8 [b, f, h, w, 3] (RGB in [0, 255], the batch contract) → ViT features
        [b, f, patches, d_vit].

        The one place frames are scaled: x / 255 in float32 (`spec.frames_unit`), then to the
        compute dtype and to [-1, 1] (SigLIP's normalisation), so bf16 rounds what float32 frames
        in [0, 1] rounded before. No stop_gradient here: a frozen anchor gets none through
        `functional.loss_fn` (its tree enters under stop_gradient), an anchor that trains
        (`train.trainable = "all_and_anchor"`) needs them."""
        b, f = frames.shape[:2]
        unit = frames_unit(frames.reshape((b * f,) + frames.shape[2:]))
        pixels = unit.astype(_dtype(self.cfg.dtype)) * 2.0 - 1.0
        feats = self.vit(pixels)
        return feats.reshape((b, f) + feats.shape[1:])

    def encode(self, batch: dict) -> dict:
        """Gaussian latent tokens of every modality, on one token axis in `MODALITIES` order
        (`latent_layout` says which modality and slot each token is).

        Returns {"mean", "logvar": [b, n_latent, d_latent] float32,
                 "mask": [b, n_latent] bool (present modality and valid segment),
                 "present": [b, n_modalities] bool (the modality has a valid token),
                 "visual_target": [b, d_vit] float32 (mean ViT feature, for reconstruction)}.
        """
        text_emb = self.lm.embed(batch["text_tokens"])
        patch_feats = self.frame_features(batch["frames"])
        per_frame = patch_feats.mean(axis=2)
        outs = {
            "speech": self.speech_encoder(batch["mel"], batch["mel_mask"]),
            "text": self.text_encoder(text_emb, batch["text_mask"]),
            "video": self.video_encoder(patch_feats if self.cfg.video.patch_tokens else per_frame,
                                        batch["frame_mask"]),
            "state": self.state_encoder(batch["state_numeric"], batch["state_categorical"]),
        }
        modality_ids, _ = latent_layout(self.cfg)
        mean = jnp.concatenate([outs[m][0] for m in MODALITIES], axis=1)
        logvar = jnp.concatenate([outs[m][1] for m in MODALITIES], axis=1)
        mask = jnp.concatenate([outs[m][2] for m in MODALITIES], axis=1) & batch["modality_mask"][:, modality_ids]
        fm = batch["frame_mask"].astype(jnp.float32)[:, :, None]
        visual_target = (per_frame.astype(jnp.float32) * fm).sum(1) / jnp.maximum(fm.sum(1), 1.0)
        present = jnp.stack([mask[:, lo:hi].any(-1) for lo, hi in _spans(self.cfg)], axis=1)
        return {"mean": mean, "logvar": logvar, "mask": mask, "present": present,
                "visual_target": jax.lax.stop_gradient(visual_target)}

    # ----------------------------------------------------------------------------- bridge
    def context(self, batch: dict, latents: jax.Array, latent_mask: jax.Array):
        """Run the MetaQuery bridge.

        Args:
          latents: [b, n_latent, d_latent]; latent_mask: [b, n_latent].
        Returns:
          (context [b, n_queries, width], z0 mean, z0 logvar [b, action_len, d_action],
           memory [b, l, width] and memory_mask [b, l]: every connector output the DNFM's
           cross-attention reads (`model.dnfm.cross_attention`)).
        """
        b = latents.shape[0]
        modality_ids, slots = (jnp.asarray(x, jnp.int32) for x in latent_layout(self.cfg))
        latent_tokens, tag_tokens, log_tokens = self.bridge_inputs(
            latents, modality_ids, slots, batch["constraint_tags"], batch["history_actions"], batch["history_before"])
        text = self.lm.embed(batch["text_tokens"])
        queries = self.queries(b, text.dtype)
        seq = jnp.concatenate([x.astype(text.dtype) for x in (latent_tokens, tag_tokens, log_tokens)] + [text, queries], 1)
        mask = jnp.concatenate([latent_mask, batch["constraint_tags"], batch["history_actions"] != PAD_ID,
                                batch["text_mask"], jnp.ones(queries.shape[:2], jnp.bool_)], axis=1)
        # Masked slots take no position, so the queries sit right after the last real token.
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        hidden = self.lm(seq, mask, positions)
        if self.cfg.bridge.connector_reads == "queries":
            n = queries.shape[1]
            hidden, mask, seq = hidden[:, -n:], mask[:, -n:], seq[:, -n:]
        context, z0_mean, z0_logvar, memory = self.connector(hidden, mask, seq)
        return context, z0_mean, z0_logvar, memory, mask

    # ----------------------------------------------------------------------------- training
    def train_outputs(self, batch: dict, t_source_fraction: float, t_beta: float,
                      with_rejected: bool = False) -> dict:
        """Everything the training losses need (`vlacabin_jax.model.losses`); uses rngs
        `latent` (reparameterisation) and `flow` (time and step sampling).

        `with_rejected` (static) adds the velocity on the path to `batch["rejected_tokens"]` from
        the same z0 and t (`velocity_rejected`, `x1_rejected` [b, positions, d_action]) for the
        preference loss (`vlacabin_jax.model.dpo`)."""
        enc = self.encode(batch)
        eps = jax.random.normal(self.make_rng("latent"), enc["mean"].shape)
        latents = enc["mean"] + jnp.exp(0.5 * enc["logvar"]) * eps
        pooled = pooled_means(self.cfg, enc["mean"], enc["mask"])
        recon = self.reconstruction({m: pooled[:, i] for i, m in enumerate(MODALITIES)})
        context, z0_mean, z0_logvar, memory, memory_mask = self.context(batch, latents, enc["mask"])
        velocity = functools.partial(self.dnfm, memory=memory, memory_mask=memory_mask)
        z0 = z0_mean + jnp.exp(0.5 * z0_logvar) * jax.random.normal(self.make_rng("latent"), z0_mean.shape)

        codebook = self.dnfm.codebook()
        targets = setting_layout.dnfm_targets(batch["action_tokens"], self.cfg)
        x1 = codebook[targets]
        b = x1.shape[0]
        k_src, k_beta, k_step = jax.random.split(self.make_rng("flow"), 3)
        # Half the batch at t = 0 (where the sampler starts), the rest weighted toward the source.
        # Beta(1, b) by its inverse CDF, 1 - (1 - u)^(1/b): exact, and no rejection-sampling loop
        # (jax.random.beta's gamma sampler) to compile.
        t_beta_draw = 1.0 - jnp.power(1.0 - jax.random.uniform(k_beta, (b,)), 1.0 / t_beta)
        t = jnp.where(jax.random.uniform(k_src, (b,)) < t_source_fraction, 0.0, t_beta_draw)
        tb = t[:, None, None]
        x_t = (1.0 - tb) * z0 + tb * x1
        v = velocity(x_t, t)
        x1_hat = x_t + (1.0 - tb) * v
        # Path consistency on the model's own path: one Euler step of a K-step sampler
        # (K in {2, 4, 8}) from x_t, then decode the endpoint from where the model landed.
        dt = jnp.minimum(jnp.array([0.5, 0.25, 0.125])[jax.random.randint(k_step, (b,), 0, 3)], 1.0 - t)
        x_next = x_t + dt[:, None, None] * jax.lax.stop_gradient(v)
        t_next = t + dt
        v_next = velocity(x_next, t_next)
        x1_hat_next = x_next + (1.0 - t_next)[:, None, None] * v_next
        # Velocity from the model's own point straight to the target; undefined at t = 1.
        remaining = (1.0 - t_next)[:, None, None]
        v_next_target = (x1 - x_next) / jnp.maximum(remaining, 1e-3)

        expl = batch["explanation_tokens"]
        extra = {}
        if with_rejected:
            x1_l = codebook[setting_layout.dnfm_targets(batch["rejected_tokens"], self.cfg)]
            extra = {"x1_rejected": x1_l, "velocity_rejected": velocity((1.0 - tb) * z0 + tb * x1_l, t)}
        return extra | {
            "latent_mean": enc["mean"], "latent_logvar": enc["logvar"], "latent_mask": enc["mask"],
            "latent_present": enc["present"],
            "pooled": pooled, "recon": recon, "visual_target": enc["visual_target"],
            "z0_mean": z0_mean, "z0_logvar": z0_logvar,
            "z0": z0, "t": t, "x1": x1, "memory": memory, "memory_mask": memory_mask,
            "velocity": v, "velocity_target": x1 - z0,
            "velocity_next": v_next, "velocity_next_target": v_next_target, "t_next": t_next,
            "endpoint_logits": self.dnfm.logits(x1_hat),
            "source_logits": self.dnfm.logits(z0),
            "path_logits": self.dnfm.logits(x1_hat_next),
            "path_endpoint_gap": jnp.mean(jnp.square(x1_hat_next - jax.lax.stop_gradient(x1_hat)), axis=(1, 2)),
            "codebook": codebook,
            "explanation_logits": self.explanation(expl[:, :-1], context),
        } | ({"ar_logits": self.action_decoder(ar_head.teacher_inputs(batch["action_tokens"]), memory, memory_mask)}
             if self.cfg.action_head == "autoregressive" else {})

    # ----------------------------------------------------------------------------- inference
    def infer(self, batch: dict, steps: int) -> tuple[jax.Array, jax.Array]:
        """Deterministic inference (latent and z0 means): (action tokens [b, action_len],
        explanation tokens [b, explain_len]) int32."""
        enc = self.encode(batch)
        context, z0_mean, _, memory, memory_mask = self.context(batch, enc["mean"], enc["mask"])
        c = self.cfg
        if c.action_head == "autoregressive":
            actions = ar_head.greedy_actions(lambda tok: self.action_decoder(tok, memory, memory_mask),
                                             z0_mean.shape[0], c.action_len)
        else:
            velocity = functools.partial(self.dnfm, memory=memory, memory_mask=memory_mask)
            x1 = dnfm.euler_sample(velocity, z0_mean, steps)
            actions = dnfm.decode_actions(self.dnfm.logits(x1), c)
        expl = explain.greedy_decode(lambda tok: self.explanation(tok, context), z0_mean.shape[0],
                                     c.explain_len, c.text_bos_id, c.text_eos_id, c.text_pad_id)
        return actions, expl

    def sample_actions(self, batch: dict, steps: int, noise_scale: float) -> jax.Array:
        """Stochastic action sampling for preference data: action tokens [b, action_len] int32.

        The DNFM sampler is deterministic given z0, so a draw is a draw of the variational noise:
        latents and z0 are `mean + noise_scale · σ · ε` (rng `latent`); `noise_scale = 0` gives
        `infer`'s actions.
        """
        enc = self.encode(batch)
        k_lat, k_z0 = jax.random.split(self.make_rng("latent"))
        latents = enc["mean"] + noise_scale * jnp.exp(0.5 * enc["logvar"]) * jax.random.normal(k_lat, enc["mean"].shape)
        _, z0_mean, z0_logvar, memory, memory_mask = self.context(batch, latents, enc["mask"])
        z0 = z0_mean + noise_scale * jnp.exp(0.5 * z0_logvar) * jax.random.normal(k_z0, z0_mean.shape)
        velocity = functools.partial(self.dnfm, memory=memory, memory_mask=memory_mask)
        x1 = dnfm.euler_sample(velocity, z0, steps)
        return dnfm.decode_actions(self.dnfm.logits(x1), self.cfg)

    def __call__(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Initialisation entry point: the training path touches every submodule. Not `infer`:
        its decode loops (`lax.fori_loop`) would trace a rematerialised block's init inside the
        loop, and the lifted params leak out of it (UnexpectedTracerError with `model.remat`)."""
        out = self.train_outputs(batch, 0.5, 3.0)
        return out["endpoint_logits"], out["explanation_logits"]


def latent_counts(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Latent tokens per modality, in `MODALITIES` order (`cfg` is the `model` config)."""
    n = cfg.latent.tokens_per_modality
    state = cfg.state.numeric_dim + len(cfg.state.categorical_sizes) if cfg.state.field_tokens else n
    counts = {"speech": n, "text": n, "video": n, "state": state}
    return tuple(counts[m] for m in MODALITIES)


def latent_layout(cfg: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(modality id, slot within the modality) of every latent token, as static tuples."""
    counts = latent_counts(cfg)
    ids = tuple(i for i, n in enumerate(counts) for _ in range(n))
    slots = tuple(j for n in counts for j in range(n))
    return ids, slots


def _spans(cfg: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """[lo, hi) of each modality's tokens on the latent axis."""
    counts = latent_counts(cfg)
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]
    return [(e - n, e) for e, n in zip(ends, counts)]


def pooled_means(cfg: ml_collections.ConfigDict, mean: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean of each modality's latent tokens: [b, n_latent, d], [b, n_latent] → [b, n_modalities, d]."""
    out = []
    for lo, hi in _spans(cfg):
        w = mask[:, lo:hi].astype(jnp.float32)[..., None]
        out.append((mean[:, lo:hi] * w).sum(1) / jnp.maximum(w.sum(1), 1.0))
    return jnp.stack(out, axis=1)
