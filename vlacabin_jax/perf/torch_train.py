"""A training step of the PyTorch export mirror, for the JAX/PyTorch step-time ratio.

    MirrorTrainer(config)                     the mirror (`export.torch_model`) plus a training loss
    training_inputs(config, batch_size, seed) -> mirror inputs + targets + fixed flow times
    inputs_from_batch(batch)                  -> the same, from a host batch of the JAX data contract
    prepare_torch_step(config, inputs, compiled) -> (run() -> seconds of one step, info)
    measure_torch_step(config, batch_size, steps, compiled) -> {median_step_s, compile_s, ...}

The loss mirrors `model/losses.py` on the terms that carry the work of a step: DNFM velocity
regression, endpoint cross-entropy, source-alignment cross-entropy, path consistency (a second
velocity evaluation one Euler step on, its cross-entropy, velocity and endpoint-gap terms) and
the teacher-forced explanation cross-entropy, over the DNFM's positions (per setting under
`model.dnfm.layout = "per_setting"`, unweighted: `loss.keep_weight` changes no work). It leaves out what the mirror has no parameters
for (the log-variance heads, hence the reparameterisation and KL terms; the reconstruction heads)
and InfoNCE: a few small matmuls against the same encoders, ViT, LM, DNFM and decoder. As in
JAX, the frozen ViT and LM get no parameter gradients (the LM still passes gradients to its
trainable inputs), and the optimizer is AdamW with global-norm clipping.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlacabin_jax.export.torch_model import PAD_ID, VLACabinMirror, example_inputs, namespace

LOSS_TERMS = ("velocity", "endpoint_ce", "source_ce", "path", "explanation_ce")


def teacher_forced_explanation(head: nn.Module, tokens: Tensor, context: Tensor) -> Tensor:
    """`explain.ExplanationHead.__call__` on the mirror's head: tokens [b, l] int, context
    [b, q, connector width] → logits [b, l, vocab] float32 (causal self-attention, all at once)."""
    length = tokens.shape[1]
    x = (head.token_embedding(tokens) + head.position_embedding[:length]).to(head.dtype)
    ctx = head.context_proj(context)
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    for block in head.decoder.layers:
        x = x + block.self_attn(block.ln_self(x), causal, length)
        x = x + block.cross_attn(block.ln_cross(x), None, length, context=ctx, kv_length=head.n_queries)
        x = x + block.mlp(block.ln_mlp(x))
    return torch.matmul(head.ln_out(x), head.token_embedding.weight.t()).to(torch.float32)


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long())


class MirrorTrainer(nn.Module):
    """The mirror with `loss(inputs) -> (loss, {term: value})` (module docstring)."""

    def __init__(self, config: Mapping[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        self.mirror = VLACabinMirror(config, dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the mirror starts from zeros; any small random init does the same work
            for name, p in self.mirror.named_parameters():
                if p.ndim > 1 or "embedding" in name or "queries" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for module in (self.mirror.vit, self.mirror.lm):
            module.requires_grad_(False)
        # Under the per-setting layout the DNFM's targets are per setting (`setting_layout.to_settings`).
        c = namespace(config)
        self.path_of_token = (torch.tensor(c.setting_layout.path_of_token, dtype=torch.long)
                              if self.mirror.dnfm.per_setting else None)

    def dnfm_targets(self, tokens: Tensor) -> Tensor:
        """Answers [b, action_len] → the DNFM's targets [b, A]: the answer, or per setting path its
        last value in the answer and `<pad>` (keep) elsewhere (`setting_layout.to_settings`)."""
        tokens = tokens.long()
        if self.path_of_token is None:
            return tokens
        positions = torch.arange(self.mirror.dnfm.positions)
        out = torch.full((tokens.shape[0], len(positions)), PAD_ID, dtype=torch.long)
        for i in range(tokens.shape[1]):
            out = torch.where(self.path_of_token[tokens[:, i]][:, None] == positions, tokens[:, i:i + 1], out)
        return out

    def loss(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        mm = self.mirror
        model_inputs = {k: inputs[k] for k in ("text_tokens", "text_mask", "mel", "mel_mask", "frames", "frame_mask",
                                               "state_numeric", "state_categorical", "modality_mask")}
        means, mask = mm.encode(**model_inputs)
        context, z0, memory, memory_mask = mm.context(means, mask, inputs["text_tokens"], inputs["text_mask"],
                                                      inputs["constraint_tags"], inputs["history_actions"],
                                                      inputs["history_before"])
        tokens, t, dt = self.dnfm_targets(inputs["action_tokens"]), inputs["t"], inputs["dt"]
        dnfm = mm.dnfm
        # The DNFM's cross-attention (`model.dnfm.cross_attention`) reads the connector memory;
        # its keys/values are projected once for both velocity evaluations, as in `mm.sample`.
        kv = dnfm.memory_kv(memory, mm.memory_length) if dnfm.cross_attention else None
        velocity = lambda x, time: dnfm(x, time, kv, memory_mask if kv is not None else None)  # noqa: E731
        x1 = dnfm.codebook()[tokens]
        tb = t[:, None, None]
        x_t = (1.0 - tb) * z0 + tb * x1
        v = velocity(x_t, t)
        x1_hat = x_t + (1.0 - tb) * v
        x_next = x_t + dt[:, None, None] * v.detach()
        t_next = t + dt
        v_next = velocity(x_next, t_next)
        remaining = (1.0 - t_next)[:, None, None]
        x1_hat_next = x_next + remaining * v_next
        v_next_target = (x1 - x_next) / remaining.clamp_min(1e-3)
        expl = inputs["explanation_tokens"].long()
        logits = teacher_forced_explanation(mm.explanation, expl[:, :-1], context)
        expl_mask = inputs["explanation_mask"][:, 1:].float()
        expl_ce = F.cross_entropy(logits.transpose(1, 2), expl[:, 1:], reduction="none")
        terms = {
            "velocity": torch.mean((v - (x1 - z0)) ** 2),
            "endpoint_ce": _ce(dnfm.logits(x1_hat), tokens),
            "source_ce": _ce(dnfm.logits(z0), tokens),
            "path": (_ce(dnfm.logits(x1_hat_next), tokens)
                     + torch.mean((remaining * (v_next - v_next_target)) ** 2)
                     + torch.mean((x1_hat_next - x1_hat.detach()) ** 2)),
            "explanation_ce": (expl_ce * expl_mask).sum() / expl_mask.sum().clamp_min(1.0),
        }
        return sum(terms.values()), terms


def training_inputs(config: Mapping[str, Any], batch_size: int, seed: int = 0) -> dict[str, Tensor]:
    """Mirror inputs (`example_inputs`) plus action / explanation targets and the flow times the
    JAX step draws: half the batch at t = 0, the rest t ~ Beta(1, 3); dt in {1/2, 1/4, 1/8}."""
    c = namespace(config)
    m = c.model
    g = torch.Generator().manual_seed(seed + 1)
    inputs = example_inputs(config, batch_size, seed)
    u = torch.rand(batch_size, generator=g)
    t = torch.where(torch.rand(batch_size, generator=g) < 0.5, torch.zeros(batch_size), 1.0 - (1.0 - u) ** (1 / 3))
    dt = torch.tensor([0.5, 0.25, 0.125])[torch.randint(0, 3, (batch_size,), generator=g)]
    inputs.update(
        action_tokens=torch.randint(0, m.dnfm.vocab_size, (batch_size, m.action_len), generator=g),
        explanation_tokens=torch.randint(3, m.explain.vocab_size, (batch_size, m.explain_len), generator=g),
        explanation_mask=torch.ones(batch_size, m.explain_len, dtype=torch.bool),
        t=t, dt=torch.minimum(dt, 1.0 - t))
    return inputs


def inputs_from_batch(batch: Mapping[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """Torch inputs from a host batch of the JAX data contract (the same rows both frameworks
    train on) plus flow times drawn like `training_inputs`."""
    keys = ("text_tokens", "text_mask", "mel", "mel_mask", "frames", "frame_mask", "state_numeric",
            "state_categorical", "modality_mask", "constraint_tags", "history_actions", "history_before",
            "action_tokens", "explanation_tokens", "explanation_mask")
    inputs = {k: torch.as_tensor(batch[k]) for k in keys}
    b = inputs["text_tokens"].shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(b, generator=g)
    t = torch.where(torch.rand(b, generator=g) < 0.5, torch.zeros(b), 1.0 - (1.0 - u) ** (1 / 3))
    dt = torch.tensor([0.5, 0.25, 0.125])[torch.randint(0, 3, (b,), generator=g)]
    inputs.update(t=t, dt=torch.minimum(dt, 1.0 - t))
    return inputs


def prepare_torch_step(config: Mapping[str, Any], inputs: Mapping[str, Tensor], compiled: bool,
                       lr: float = 1e-4, clip: float = 1.0, device: str = "cpu") -> tuple[Callable[[], float], dict]:
    """A full training step of the mirror (forward, backward, clipping, AdamW) on `inputs`.

    `compiled`: the loss (forward and, through AOTAutograd, its backward) under `torch.compile`
    (inductor without its pattern-matcher passes, see below); the optimizer step stays eager.
    `device`: "cpu" or "cuda" (the model is built on the CPU, from a CPU generator, then moved with
    its inputs; on CUDA the tensors the mirror makes while it runs go there as the default device,
    and matmuls take TF32, as XLA does for float32). Returns (run() -> seconds of one step to its
    completion on the device, info {"last": {"loss"}}).
    """
    torch.manual_seed(0)
    model = MirrorTrainer(config).to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    # Inductor's attention-fusion patterns crash on the mirror's masked attention (torch 2.13:
    # "Attempting to broadcast a dimension of length 16" in fuse_attention's replacement); the
    # pattern passes are off, the rest of inductor (fusion, C++ codegen) stays.
    loss_fn = torch.compile(model.loss, options={"pattern_matcher": False}) if compiled else model.loss
    info: dict = {"last": {}, "threads": torch.get_num_threads(), "terms": list(LOSS_TERMS)}

    def run() -> float:
        t = time.perf_counter()
        with torch.device(device) if cuda else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        info["last"] = {"loss": float(loss.detach())}
        return seconds

    return run, info


def measure_torch_step(config: Mapping[str, Any], batch_size: int, steps: int, compiled: bool,
                       warmup: int = 2) -> dict:
    """Median seconds of `prepare_torch_step` on `training_inputs` (the first step, which
    compiles under `compiled`, is reported as compile_s)."""
    run, info = prepare_torch_step(config, training_inputs(config, batch_size), compiled)
    first = run()
    for _ in range(warmup - 1):
        run()
    times = [run() for _ in range(steps)]
    return {"median_step_s": statistics.median(times), "step_times_s": times, "compile_s": first,
            "loss": info["last"]["loss"], "threads": info["threads"], "terms": info["terms"]}
