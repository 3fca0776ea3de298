"""Weight layout: every mirror tensor comes from the right Flax param, in the right layout.

Each Flax param is filled with structured values (pass 1: the param's own id everywhere; pass 2: its
flat element index), converted, and every torch tensor is compared with what this test derives on
its own: the source param from the torch name (Hugging Face names for the anchor, Flax names for
the rest), and the element mapping from index arithmetic (a Linear weight's [o, i] is the kernel
at (unravel(i, in_axes), unravel(o, out_axes)); a conv weight's [o, c, h, w] is the kernel at
[h, w, c, o]). A transposed, reshaped-wrong or swapped tensor fails.
"""
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.export import convert
from vlacabin_jax.model import functional

# Anchor: HF name pieces → Flax path pieces (written out here, independently of hf_import's table).
VIT = {"layer_norm1.weight": ("ln_attn", "ln", "scale"), "layer_norm1.bias": ("ln_attn", "ln", "bias"),
       "layer_norm2.weight": ("ln_mlp", "ln", "scale"), "layer_norm2.bias": ("ln_mlp", "ln", "bias"),
       "mlp.fc1": ("mlp", "up", "dense"), "mlp.fc2": ("mlp", "down", "dense"),
       "self_attn.q_proj": ("attn", "query", "dense"), "self_attn.k_proj": ("attn", "key", "dense"),
       "self_attn.v_proj": ("attn", "value", "dense"), "self_attn.out_proj": ("attn", "out", "dense")}
LM = {"input_layernorm.weight": ("ln_attn", "scale"), "post_attention_layernorm.weight": ("ln_mlp", "scale"),
      "mlp.gate_proj": ("mlp", "gate", "dense"), "mlp.up_proj": ("mlp", "up", "dense"),
      "mlp.down_proj": ("mlp", "down", "dense"), "self_attn.q_proj": ("attn", "query", "dense"),
      "self_attn.k_proj": ("attn", "key", "dense"), "self_attn.v_proj": ("attn", "value", "dense"),
      "self_attn.o_proj": ("attn", "out", "dense")}
ANCHOR_TOP = {"vit.embeddings.patch_embedding.weight": (("vit", "patch_embed", "kernel"), "conv2d"),
              "vit.embeddings.patch_embedding.bias": (("vit", "patch_embed", "bias"), "same"),
              "vit.embeddings.position_embedding.weight": (("vit", "pos_embed"), "same"),
              "vit.post_layernorm.weight": (("vit", "post_ln", "ln", "scale"), "same"),
              "vit.post_layernorm.bias": (("vit", "post_ln", "ln", "bias"), "same"),
              "lm.model.embed_tokens.weight": (("lm", "embedding"), "same"),
              "lm.model.norm.weight": (("lm", "final_norm", "scale"), "same")}


def source_of(name: str, flat: dict) -> tuple[tuple, int | None, str]:
    """(Flax path as stored, layer index or None, layout kind) of a mirror tensor, derived here."""
    if name in ANCHOR_TOP:
        path, kind = ANCHOR_TOP[name]
        return path, None, kind
    m = re.fullmatch(r"(vit)\.encoder\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?", name) or \
        re.fullmatch(r"(lm)\.model\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?", name)
    if m:
        group, layer, rest, suffix = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
        table = VIT if group == "vit" else LM
        if rest + suffix in table:
            inner = table[rest + suffix]
        else:
            inner = table[rest] + ({".weight": ("kernel",), ".bias": ("bias",)}[suffix])
        stack = ("encoder",) if group == "vit" else ("decoder",)
        return _stacked((group,) + stack + ("layers_%d" % layer,) + inner, layer, flat, suffix)
    # Trainable modules: the Flax path with the `dense` / `ln` wrappers dropped, weight for kernel /
    # scale / embedding. Try every wrapper; exactly one must exist.
    parts = name.split(".")
    layer = None
    if "layers" in parts:
        i = parts.index("layers")
        layer = int(parts[i + 1])
        parts = parts[:i] + [f"layers_{layer}"] + parts[i + 2:]
    *head, last = parts
    candidates = {"weight": [("dense", "kernel"), ("ln", "scale"), ("kernel",), ("embedding",), ("scale",)],
                  "bias": [("dense", "bias"), ("ln", "bias"), ("bias",)]}.get(last, [(last,)])
    found = []
    for tail in candidates:
        try:
            found.append(_stacked(tuple(head) + tail, layer, flat, "." + last))
        except KeyError:
            pass
    assert len(found) == 1, f"{name}: {len(found)} Flax params fit ({found})"
    return found[0]


def _stacked(path: tuple, layer, flat: dict, suffix: str):
    """The path as stored (scanned trees keep block i at index i under `layers`) and the layout kind."""
    if path[-2:] == ("dense", "kernel"):
        kind = "linear"
    elif path[-1] == "kernel" and path[0] == "speech_encoder":
        kind = "conv1d"
    else:
        kind = "flatten" if path[-2:] == ("dense", "bias") else "same"
    if path in flat:
        return path, None, kind
    scanned = tuple("layers" if p == f"layers_{layer}" else p for p in path)
    if scanned in flat:
        return scanned, layer, kind
    raise KeyError(path)


def expected_tensor(kind: str, source: np.ndarray, torch_shape: tuple) -> np.ndarray:
    """What the mirror tensor must hold, by index arithmetic (not by the converter's reshapes)."""
    if kind == "linear":
        out, inp = torch_shape
        split = next(s for s in range(1, source.ndim) if np.prod(source.shape[:s]) == inp)
        o, i = np.meshgrid(np.arange(out), np.arange(inp), indexing="ij")
        index = np.unravel_index(i, source.shape[:split]) + np.unravel_index(o, source.shape[split:])
        return source[index]
    if kind == "conv1d":
        return np.einsum("tco->oct", source)
    if kind == "conv2d":
        return np.einsum("hwco->ochw", source)
    if kind == "flatten":
        return source.reshape(-1)
    return source


def layout_errors(state: dict, trainable: dict, frozen: dict) -> list[str]:
    """Every mismatch between a converted state dict and the expectations above."""
    flat = convert.flat_paths({**trainable, **frozen})
    errors = []
    for name, tensor in state.items():
        path, layer, kind = source_of(name, flat)
        source = np.asarray(flat[path])
        if layer is not None:
            source = source[layer]
        want = expected_tensor(kind, source, tensor.shape)
        if want.shape != tensor.shape or not np.array_equal(want, tensor):
            errors.append(f"{name} <- {'/'.join(path)}[{layer}] ({kind})")
    return errors


def filled(trainable: dict, frozen: dict, mode: str) -> tuple[dict, dict]:
    """Every leaf of both groups replaced: "id" → a number unique to the leaf, everywhere;
    "index" → its flat element index."""
    leaves, treedef = jax.tree.flatten((trainable, frozen))
    if mode == "id":
        new = [np.full(x.shape, i + 1, np.float32) for i, x in enumerate(leaves)]
    else:
        new = [np.arange(int(np.prod(x.shape)), dtype=np.float32).reshape(x.shape) for x in leaves]
    return jax.tree.unflatten(treedef, new)


def abstract(cfg):
    trainable, frozen = jax.eval_shape(lambda: functional.init_params(cfg, jax.random.key(0)))
    return nn.unbox(trainable), nn.unbox(frozen)


# Route switches of the tiny defaults turned off (what small / base run), and the anchor that trains
# (train.trainable = "all_and_anchor": vit and lm sit in the trainable tree).
ROUTES_OFF = {"model.state.field_tokens": False, "model.state.numeric_fourier": 0, "model.video.patch_tokens": False,
              "model.bridge.connector_skip": False, "model.dnfm.cross_attention": False}
TREES = {"scanned": ("scanned", {}), "unrolled": ("unrolled", {}), "scanned-routes-off": ("scanned", ROUTES_OFF),
         "unrolled-anchor-trains": ("unrolled", {"train.trainable": "all_and_anchor"})}


@pytest.fixture(scope="module", params=list(TREES))
def tiny_trees(request):
    from tests.export.conftest import variant_config

    layout, overrides = TREES[request.param]
    cfg = variant_config("tiny", overrides)
    cfg.model.scan_layers = layout == "scanned"
    return cfg, *abstract(cfg)


@pytest.mark.parametrize("mode", ["id", "index"])
def test_every_tensor_comes_from_its_param_in_its_layout(tiny_trees, mode):
    cfg, trainable, frozen = tiny_trees
    trainable, frozen = filled(trainable, frozen, mode)
    state = convert.flax_to_torch(trainable, frozen, convert.mirror_config(cfg, 4))
    assert set(state) == set(convert.mirror_shapes(convert.mirror_config(cfg, 4)))
    assert layout_errors(state, trainable, frozen) == []
    if mode == "id":  # every Flax param is used once, or listed as training-only
        flat = convert.flat_paths({**trainable, **frozen})
        used = {float(np.asarray(t).flat[0]) for t in state.values()}
        ids = {tuple(p): float(np.asarray(v).flat[0]) for p, v in flat.items()}
        unused = sorted("/".join(p) for p, i in ids.items() if i not in used)
        assert unused == convert.training_only(trainable, frozen)
        assert unused and all("logvar" in u or u.startswith("reconstruction/") for u in unused)


def test_the_check_catches_a_transposed_or_swapped_tensor(tiny_trees):
    cfg, trainable, frozen = tiny_trees
    trainable, frozen = filled(trainable, frozen, "index")
    state = convert.flax_to_torch(trainable, frozen, convert.mirror_config(cfg, 4))
    square = "connector.encoder.layers.0.attn.query.weight"  # [64, 64]: a transpose keeps the shape
    transposed = dict(state, **{square: state[square].T.copy()})
    assert layout_errors(transposed, trainable, frozen) == [
        f"{square} <- connector/encoder/layers/attn/query/dense/kernel[0] (linear)"
        if cfg.model.scan_layers else f"{square} <- connector/encoder/layers_0/attn/query/dense/kernel[None] (linear)"]
    trainable_id, frozen_id = filled(trainable, frozen, "id")
    state_id = convert.flax_to_torch(trainable_id, frozen_id, convert.mirror_config(cfg, 4))
    a, b = "dnfm.blocks.layers.0.attn.key.weight", "dnfm.blocks.layers.0.attn.value.weight"
    swapped = dict(state_id, **{a: state_id[b], b: state_id[a]})
    assert len(layout_errors(swapped, trainable_id, frozen_id)) == 2


def test_missing_or_unknown_params_are_one_clear_error(tiny_trees):
    cfg, trainable, frozen = tiny_trees
    trainable, frozen = filled(trainable, frozen, "index")
    config = convert.mirror_config(cfg, 4)
    broken = dict(trainable, dnfm={k: v for k, v in trainable["dnfm"].items() if k != "action_codebook"})
    with pytest.raises(convert.ConversionError, match="missing Flax param dnfm/action_codebook"):
        convert.flax_to_torch(broken, frozen, config)
    extra = dict(trainable, stray={"kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(convert.ConversionError, match="no place in the mirror: \\['stray/kernel'\\]"):
        convert.flax_to_torch(extra, frozen, config)
    wrong = dict(trainable, queries={"queries": np.zeros((3, 64), np.float32)})
    with pytest.raises(convert.ConversionError, match="queries.queries"):
        convert.flax_to_torch(wrong, frozen, config)


def test_bfloat16_anchor_is_widened_exactly(tiny_trees):
    import jax.numpy as jnp

    cfg, trainable, frozen = tiny_trees
    rng = np.random.default_rng(0)
    anchor = lambda x: np.asarray(jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16))  # noqa: E731
    frozen = jax.tree.map(anchor, frozen)
    trainable = {k: jax.tree.map(anchor, v) if k in ("vit", "lm")  # an anchor that trains, stored in bf16
                 else jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), v)
                 for k, v in trainable.items()}
    state = convert.flax_to_torch(trainable, frozen, convert.mirror_config(cfg, 4))
    emb = np.asarray({**trainable, **frozen}["lm"]["embedding"]).astype(np.float32)
    np.testing.assert_array_equal(state["lm.model.embed_tokens.weight"], emb)
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
