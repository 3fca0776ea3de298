"""VLA-Cabin configs: `get_config("tiny" | "small" | "base" | "a100x128")`.

Use on the command line as `--config configs/vla_cabin.py:tiny`; any field is overridable as
`--config.model.dnfm.depth=4`. Every field is documented here and validated by
`vlacabin_jax.config.validate`.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "small", "base", "a100x128")

# Sizes fixed by the data package's schemas (action vocabulary, cabin state, tags, tokenizer).
# `vlacabin_jax.config.validate` checks them against the live schemas.
from vlacabin_jax.data import schema_sizes  # noqa: E402

_SIZES = schema_sizes()


def _anchor(variant: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """Frozen perception anchor: SigLIP-style ViT and Qwen2/Llama-style LM."""
    vit = ml_collections.ConfigDict()
    lm = ml_collections.ConfigDict()
    # vit: image_size (pixels, square), patch_size, width, depth, heads, mlp_dim, layernorm_eps.
    # lm: vocab_size, width, depth, heads, kv_heads (GQA), head_dim, mlp_dim (SwiGLU),
    #     rope_theta, rms_eps, qkv_bias (True for Qwen2, False for Llama), tie_embeddings.
    table = {
        "tiny": (dict(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128),
                 dict(width=64, depth=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128)),
        "small": (dict(image_size=64, patch_size=8, width=192, depth=4, heads=4, mlp_dim=768),
                  dict(width=256, depth=4, heads=8, kv_heads=2, head_dim=32, mlp_dim=768)),
        # SigLIP-base/16 at 224 and a Qwen2-0.5B-shaped LM.
        "base": (dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
                 dict(width=896, depth=24, heads=14, kv_heads=2, head_dim=64, mlp_dim=4864)),
        # SigLIP-so400m/14 at 384 and a Qwen2-7B-shaped LM.
        "a100x128": (dict(image_size=384, patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304),
                     dict(width=3584, depth=28, heads=28, kv_heads=4, head_dim=128, mlp_dim=18944)),
    }
    vit_fields, lm_fields = table[variant]
    vit.update(vit_fields, layernorm_eps=1e-6)
    large_vocab = {"base": 151936, "a100x128": 152064}
    lm.update(lm_fields, vocab_size=large_vocab.get(variant, _SIZES["text_vocab"]),
              rope_theta=1_000_000.0 if variant in large_vocab else 10_000.0,
              rms_eps=1e-6, qkv_bias=True, tie_embeddings=variant in ("tiny", "small", "base"))
    return vit, lm


def _trainable(variant: str) -> dict[str, dict]:
    """Widths of the trainable modules: (width, depth, heads, mlp_dim) per stack."""
    w = {"tiny": 64, "small": 256, "base": 768, "a100x128": 1536}[variant]
    deep = {"tiny": 1, "small": 2, "base": 4, "a100x128": 8}[variant]
    heads = {"tiny": 4, "small": 4, "base": 12, "a100x128": 16}[variant]
    return dict(width=w, depth=deep, heads=heads, mlp_dim=4 * w)


# Every data kind, VLA turns and image captions weighted 2, video and speech pairs 1: the pretrain
# stage's mixture and the joint default of every variant but tiny.
BALANCED_MIXTURE = "vla=2,image_text=2,video_text=1,speech_text=1"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.variant = variant  # which preset these numbers came from (informational, checked on restore)

    m = c.model = ml_collections.ConfigDict()
    m.dtype = "bfloat16"  # compute dtype of every module (float32 for parity tests)
    m.param_dtype = "float32"  # storage dtype of trainable params (fp32 master weights)
    m.anchor_dtype = "bfloat16"  # storage dtype of the frozen anchor params
    # Pretrained anchor: a safetensors file from `python -m tools.import_hf` (vit/ and/or lm/
    # params, matching model.vit / model.lm); read when a run starts fresh. "" = random anchor.
    m.anchor_weights = ""
    # Rematerialise transformer blocks in the backward pass. Off for base: on 8 H100 (32 samples
    # per GPU, mesh 8x1x1) the train step needs 17.6 GiB of 59.3 usable without it, and remat
    # "full" costs 1.167x the model's FLOPs (`python -m tools.mesh_bench --aot h100:1x1x8 --config
    # configs/vla_cabin.py:base --search`, docs/performance.md; on fewer GPUs raise
    # train.grad_accum_steps or turn remat on). On for a100x128 (its policy below).
    m.remat = variant == "a100x128"
    # What a rematerialised block keeps (vlacabin_jax/model/layers.py REMAT_POLICIES): "full"
    # (nothing: least memory, most recompute) or "dots" (weight matmul outputs: less recompute).
    # a100x128: "dots", the fastest that fits an 80 GB A100 with 10% headroom at mesh 128x1x1
    # (`python -m tools.mesh_bench --aot a100:16x1x8 --config configs/vla_cabin.py:a100x128 --search`,
    # docs/performance.md): 50.3 GiB of 59.4 usable, 1.005x the model's FLOPs (full: 1.142x),
    # projected 1718 ms per step at 200 Gb/s IB against 1874 ms with "full"; remat off needs 62.2 GiB.
    m.remat_policy = {"a100x128": "dots"}.get(variant, "full")
    m.scan_layers = True  # scan over layers (fast compile); False unrolls (exact XLA FLOP counts)
    # jax.nn.dot_product_attention implementation: "" (JAX's default, which is XLA's attention as
    # of JAX 0.10), "xla", or "cudnn" (cuDNN fused attention; GPU with bf16/fp16 compute only).
    m.attention_impl = ""
    m.action_len = {"tiny": 8, "small": 12, "base": 16, "a100x128": 16}[variant]  # action tokens
    m.explain_len = {"tiny": 24, "small": 32, "base": 48, "a100x128": 64}[variant]  # explanation tokens
    m.vit, m.lm = _anchor(variant)
    t = _trainable(variant)

    # Modality encoders (speech, text, video, state) share these transformer sizes.
    m.encoder = ml_collections.ConfigDict(dict(t, depth=max(1, t["depth"] // 2) if variant != "tiny" else 1))
    m.latent = ml_collections.ConfigDict()
    m.latent.d_latent = {"tiny": 32, "small": 64, "base": 256, "a100x128": 512}[variant]  # latent width
    m.latent.tokens_per_modality = {"tiny": 8, "small": 4, "base": 8, "a100x128": 16}[variant]
    # Initial log-variance of every Gaussian head (modality latents and z0). 0 (sigma = 1) makes
    # the sampled latents as loud as their means at the start; a quieter start lets the routes
    # carry their content while the KL term decides how much noise each token keeps.
    m.latent.init_logvar = 0.0
    m.speech = ml_collections.ConfigDict()
    m.speech.n_mels = {"tiny": 32, "small": 64, "base": 80, "a100x128": 128}[variant]  # mel bins
    m.state = ml_collections.ConfigDict()
    m.state.numeric_dim = _SIZES["state_numeric"]  # number of numeric state fields
    m.state.categorical_sizes = _SIZES["state_categorical"]  # cardinality of each categorical field
    # One Gaussian latent token per state field (numeric and categorical) instead of
    # tokens_per_modality attention-pooled ones: answers need exact device levels field by field.
    m.state.field_tokens = variant == "tiny"
    # Fourier features sin/cos(pi 2^k x), k < this, of each numeric field before its per-field map
    # (0: the value alone): they set integer device levels apart.
    m.state.numeric_fourier = 6 if variant == "tiny" else 0
    m.video = ml_collections.ConfigDict()
    # Keep ViT patch features apart through the temporal encoder (which seat holds a child or a
    # sleeper is where the patch is); False averages each frame's patches first.
    m.video.patch_tokens = variant == "tiny"

    # MetaQuery bridge: queries read by the frozen LM, then the connector and variational head.
    m.bridge = ml_collections.ConfigDict()
    m.bridge.n_queries = {"tiny": 8, "small": 16, "base": 32, "a100x128": 64}[variant]
    m.bridge.n_constraint_tags = _SIZES["constraint_tags"]  # size of the constraint-tag vocabulary
    m.bridge.connector = ml_collections.ConfigDict(t)  # connector transformer sizes
    # What the connector attends over: "queries" (the query outputs only, MetaQuery's interface to
    # a pretrained LM) or "all" (every valid LM position; the residual stream keeps each input
    # token, which a random anchor's near-uniform attention averages away at the queries).
    m.bridge.connector_reads = "all" if variant == "tiny" else "queries"
    # The connector also reads each position's LM *input* (RMS-normalised, one more projection):
    # a skip around the frozen LM, whose random mixing otherwise buries the small token embeddings.
    m.bridge.connector_skip = variant == "tiny"

    # The action head: "dnfm" (the model) or "autoregressive" (a causal head of the DNFM's size on
    # the same backbone, model/ar_head.py: the quality ladder's baseline; not exported).
    m.action_head = "dnfm"

    # DNFM action generator.
    m.dnfm = ml_collections.ConfigDict(dict(t, depth=2 * t["depth"]))
    m.dnfm.vocab_size = _SIZES["action_vocab"]  # action-token vocabulary (incl. <pad>, <eos>, <noop>)
    m.dnfm.d_action = {"tiny": 32, "small": 64, "base": 128, "a100x128": 256}[variant]  # codebook width
    m.dnfm.temperature = 0.1  # tau of the codebook logits x . E^T / tau (codebook rows unit-norm)
    m.dnfm.sample_steps = 4  # default K of the Euler sampler (1..8)
    # Each velocity block cross-attends to the connector's outputs (every position it read), so
    # the context reaches each action position directly rather than only through z0.
    m.dnfm.cross_attention = variant == "tiny"
    # Decode greedily under the action grammar (<noop> alone; actions, one <eos>, then <pad>), so
    # every sampled sequence is well formed; False: independent per-position argmax.
    m.dnfm.constrained_decode = True
    # What a DNFM position means: "sequence" (position k is the answer's k-th token, action_len
    # positions) or "per_setting" (one position per device setting path, naming its new value or
    # <pad> for keep; decoded as the changed settings in cabin order, model/setting_layout.py:
    # nothing to count, so scenes do not fall apart; constrained_decode does not apply).
    # tiny at 1500 x 32: 44.2 % heldout success against 36.6 % (docs/evaluation.md).
    m.dnfm.layout = "per_setting"

    # Explanation head: causal decoder over the text vocabulary, cross-attending the connector.
    m.explain = ml_collections.ConfigDict(t)
    m.explain.vocab_size = m.lm.vocab_size

    # Token ids the model relies on (fixed by the tokenizer and action vocabulary).
    m.text_pad_id, m.text_bos_id, m.text_eos_id = 0, 1, 2
    m.action_pad_id, m.action_eos_id, m.action_noop_id = 0, 1, 2

    # LoRA on the modality encoders' Dense layers (vlacabin_jax/model/lora.py): each targeted layer
    # computes x W + (alpha / rank) (x A) B, B zero at init; `tools.export` folds A B into W.
    m.lora = ml_collections.ConfigDict()
    m.lora.rank = 0  # adapter rank; 0: no adapters
    m.lora.alpha = 16.0  # the adapter update is scaled by alpha / rank
    # Comma-separated names of the encoders' Dense layers that get adapters: query, key, value, out
    # (attention, pooling included), up, down (MLPs), proj (text/video input projections), mean,
    # logvar (Gaussian heads).
    m.lora.targets = "query,key,value,out,up,down"

    lo = c.loss = ml_collections.ConfigDict()
    lo.kl_weight = 1e-3  # KL of every Gaussian latent to N(0, I), after warm-up
    lo.kl_warmup_steps = 500  # linear warm-up of the KL weight from 0
    lo.infonce_weight = 0.1  # cross-modal InfoNCE between pooled latents of present modalities
    lo.infonce_temperature = 0.1
    lo.recon_weight = 0.1  # state / mel / visual-feature reconstruction heads
    lo.velocity_weight = 1.0  # DNFM velocity regression (x1 - z0)
    lo.endpoint_weight = 1.0  # cross-entropy of the endpoint decoded from x_t
    lo.source_weight = 1.0  # cross-entropy of z0 itself against the targets (source alignment)
    lo.path_weight = 1.0  # consistency on the model's own path (one model step, then decode)
    lo.explanation_weight = 1.0  # teacher-forced explanation cross-entropy
    lo.autoregressive_weight = 1.0  # teacher-forced CE of the autoregressive action head (if model.action_head is it)
    # Under model.dnfm.layout = "per_setting": the weight of "keep" positions in the DNFM terms
    # (the changed settings weigh 1; most of the 43 positions are keep in any answer, and at
    # weight 1 they teach the model to change nothing: 34.6 % against 44.6 % at 0.3, K = 4).
    lo.keep_weight = 0.3
    lo.t_source_fraction = 0.5  # fraction of the batch trained at t = 0
    lo.t_beta = 3.0  # the rest draws t ~ Beta(1, t_beta), weighted toward the source end
    # Preference alignment (stage `align`, vlacabin_jax/model/dpo.py): Diffusion-DPO on the DNFM
    # velocity errors of chosen vs rejected action sequences against a frozen copy of the
    # init_from DNFM. 0 in every other stage (they have no reference).
    lo.dpo_weight = 0.0
    lo.dpo_beta = 10.0  # DPO temperature on the per-sequence velocity errors (summed over positions)

    d = c.data = ml_collections.ConfigDict()
    d.text_len = {"tiny": 24, "small": 32, "base": 64, "a100x128": 96}[variant]  # text tokens
    d.mel_frames = {"tiny": 32, "small": 64, "base": 200, "a100x128": 300}[variant]  # mel frames
    d.num_frames = {"tiny": 4, "small": 4, "base": 8, "a100x128": 16}[variant]  # video frames
    # Input pipeline (vlacabin_jax/data/pipeline.py; shards from `python -m tools.build_dataset`,
    # vlacabin_jax/data/build.py).
    d.source = "synthetic"  # "synthetic" (cabin world rendered on the fly) or a shard directory
    d.world_seed = 0  # seed of the synthetic world: fixes the sample content (part of the DataHash)
    d.synthetic_size = 1_000_000  # train samples per epoch of the on-the-fly world (even over kinds)
    d.heldout_size = 2048  # heldout samples of the on-the-fly world (disjoint world indices)
    # Sampling weight per data kind; stage `align` also reads the preference kinds `preference`
    # (the synthetic world's pairs) and `preference_sim` (pairs in data.preference_dir). tiny's
    # joint run (the README's first command) leans on VLA turns: with a third of its batches VLA
    # it still answered only <noop> after 400 steps.
    d.mixture = "vla=6,image_text=2,video_text=1,speech_text=1" if variant == "tiny" else BALANCED_MIXTURE
    d.mixture_temperature = 1.0  # weights become w^(1/T), normalised; T > 1 flattens toward uniform
    d.num_workers = {"tiny": 0, "small": 0, "base": 8, "a100x128": 8}[variant]  # grain workers (0: threads)
    d.read_threads = 2  # threads per process (or per worker) reading and featurizing batches
    d.prefetch = {"tiny": 4, "small": 4, "base": 2, "a100x128": 1}[variant]  # batches buffered ahead
    d.verify_hashes = False  # sha256 every shard against the manifest on open (reads every byte)
    # Simulator-scored preference pairs (`python -m tools.make_preferences`), the `preference_sim`
    # kind of the mixture; "" = none.
    d.preference_dir = ""
    # Text tokenizer directory (the anchor LM's, for imported anchors); "" = the packaged tiny one.
    d.tokenizer = ""

    c.mesh = ml_collections.ConfigDict()
    # base and a100x128 included: pure data parallelism is the fastest layout that fits their
    # targets (8 H100: 8x1x1; 16 x 8 A100: 128x1x1, 1718 ms projected per step against 1796 for
    # 64x2x1 and 1823 for 64x1x2), by `python -m tools.mesh_bench --aot ... --search`
    # (docs/performance.md, "Search").
    c.mesh.data = -1  # data-parallel axis size; -1 takes the devices left over
    c.mesh.fsdp = 1  # fully-sharded data-parallel axis (params sharded over embed)
    c.mesh.tensor = 1  # tensor-parallel axis (mlp, heads, vocab)
    # Overrides of the logical-axis rules in vlacabin_jax/sharding.py, e.g. "mlp=fsdp,vocab=".
    c.mesh.rules_override = ""

    # Training loop (vlacabin_jax/train/loop.py).
    tr = c.train = ml_collections.ConfigDict()
    tr.stage = "joint"  # joint (all terms, full mixture) | pretrain | sft | align; see configs/stages/
    # optimizer steps; tiny's fits the README's first command in 7.5 min of a 2-core CPU
    # (heldout success 29.8 % on 1000 turns against 23.4 % after 400 steps; docs/limitations.md)
    tr.steps = {"tiny": 1400, "small": 20_000, "base": 100_000, "a100x128": 200_000}[variant]
    tr.global_batch_size = {"tiny": 16, "small": 64, "base": 256, "a100x128": 1024}[variant]  # all devices
    # Microbatches per step (lax.scan); must divide the per-device batch. 1 for base and a100x128
    # too: each microbatch reduces its gradients again (a100x128 at 128x1x1: 5.2 GiB of all-reduce
    # per microbatch), so accumulation only pays where memory forces it (docs/performance.md).
    tr.grad_accum_steps = 1
    tr.seed = 0  # params init, per-step rngs (folded with the step) and data shuffling
    tr.log_every = {"tiny": 20, "small": 50, "base": 100, "a100x128": 100}[variant]  # steps per host sync
    tr.eval_every = {"tiny": 700, "small": 1000, "base": 2000, "a100x128": 2000}[variant]  # 0: no eval
    tr.eval_batches = {"tiny": 4, "small": 16, "base": 32, "a100x128": 32}[variant]  # heldout batches
    # Heldout VLA turns run through the sampler and the cabin simulator at each eval (success,
    # violations, ...; vlacabin_jax/eval/); a quarter as many video/speech-text pairs for retrieval.
    tr.eval_cabin_samples = {"tiny": 128, "small": 512, "base": 1024, "a100x128": 2048}[variant]  # 0: off
    tr.max_rollbacks = 3  # non-finite losses tolerated (each restores the last good checkpoint)
    tr.profile_steps = 0  # > 0: write a jax.profiler trace of that many steps to <workdir>/profile
    tr.profile_start = 10  # first step of the profiled window (after compilation)
    tr.init_from = ""  # checkpoint dir of an earlier stage: take its params (fresh optimizer, step 0)
    # Which params train (the rest are frozen: no gradient, no optimizer state). "all": everything
    # but the anchor (vit, lm). "all_and_anchor": the anchor too -- a random anchor is no anchor, it
    # must learn before it is frozen (refused with model.anchor_weights: imported anchors stay
    # frozen). "lora_and_heads": the LoRA adapters (model.lora.rank > 0) and the
    # heads after the LM -- connector with the z0 variational head, DNFM, explanation head; the
    # encoders' base weights, bridge inputs, queries and reconstruction heads stay frozen (`align`).
    # tiny has no imported anchor, so its anchor learns (quality ladder: 41 % heldout success against
    # ~25 % with the frozen random one, 2000 steps of 32; docs/evaluation.md, "Quality ladder").
    tr.trainable = "all_and_anchor" if variant == "tiny" else "all"
    # Write each process's sample ids per step to <workdir>/sample_ids/p<i>.jsonl (audits that
    # processes read disjoint slices of every global batch; small, but one row per step).
    tr.log_sample_ids = False
    tr.inject_nan_batch = -1  # TEST ONLY: poison this data batch index with NaN (-1: off)

    # AdamW on the trainable params (vlacabin_jax/train/optimizer.py).
    o = c.optim = ml_collections.ConfigDict()
    o.lr = {"tiny": 2e-3, "small": 5e-4, "base": 3e-4, "a100x128": 2e-4}[variant]  # peak learning rate
    o.warmup_steps = {"tiny": 40, "small": 1000, "base": 2000, "a100x128": 2000}[variant]  # linear warm-up
    o.end_lr_factor = 0.1  # cosine decays to lr * end_lr_factor at train.steps
    o.weight_decay = 0.05  # decoupled decay on kernels only (not norms, biases, embeddings, queries)
    o.b1 = 0.9  # Adam first-moment decay
    o.b2 = 0.95  # Adam second-moment decay
    o.eps = 1e-8  # Adam epsilon
    o.clip_norm = 1.0  # global-norm gradient clipping (0: off)

    # Orbax checkpoints in <workdir>/checkpoints (vlacabin_jax/train/checkpoint.py).
    ck = c.checkpoint = ml_collections.ConfigDict()
    ck.interval_minutes = 120.0  # save when this much time has passed since the last save
    ck.every_steps = 0  # also save every N steps (0: off)
    ck.keep = 3  # newest checkpoints kept on disk
    # sha256 of every checkpoint file (hashed in the background after each save); a restore skips
    # and moves aside a checkpoint whose files no longer match (bit flips, truncation).
    ck.checksums = True
    ck.async_save = True  # write in a background thread; the loop blocks only for device->host copy
    return c
