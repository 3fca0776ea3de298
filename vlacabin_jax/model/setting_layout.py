"""The DNFM's per-setting layout (`model.dnfm.layout = "per_setting"`): one position per device
setting instead of one per step of the answer.

A sequence layout asks position k for "the k-th action", which depends on how many earlier steps
a scene still needs: decoded all at once, the positions must count (scenes fail). Here position p
always means setting path p and names its new value, or `<pad>` for "keep": nothing to count.
The cabin is judged by where it ends up, so the sequence is rebuilt at decode time in an order
that honours `cabin.ORDER_RULES` (a token-level topological rank).

    layout_tables()                    -> LayoutTables (numpy, static)
    to_settings(tokens, tables)        -> [b, n_paths] per-setting targets (jnp)
    dnfm_targets(tokens, model_cfg)    -> [b, positions] the DNFM's targets under the config's layout
    to_sequence(settings, length, t)   -> [b, length] action ids under the action grammar (jnp)
"""

from __future__ import annotations

import functools
import heapq
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID, ActionVocabulary, split_token


class LayoutTables(NamedTuple):
    """Static tables of the per-setting layout (numpy, so the PyTorch mirror reads the same).

    paths: the setting paths, sorted (position p is paths[p]).
    path_of_token: [vocab] int32, the position a token sets; -1 for the special tokens.
    value_mask: [n_paths, vocab] bool, the path's own values and `<pad>` ("keep").
    decode_rank: [vocab] int32, the order in which changed settings are emitted: every
      `ORDER_RULES` pair (before, after) has rank[before] < rank[after]; ties by id.
    """

    paths: tuple[str, ...]
    path_of_token: np.ndarray
    value_mask: np.ndarray
    decode_rank: np.ndarray


@functools.lru_cache(maxsize=1)
def layout_tables() -> LayoutTables:
    """The tables of the current action vocabulary (`ActionVocabulary()`; the config's
    `model.dnfm.vocab_size` is checked against it on load)."""
    tokens = ActionVocabulary().tokens
    paths = tuple(sorted({split_token(t)[0] for t in tokens[3:]}))
    index = {p: i for i, p in enumerate(paths)}
    path_of_token = np.full((len(tokens),), -1, np.int32)
    for i, t in enumerate(tokens[3:], start=3):
        path_of_token[i] = index[split_token(t)[0]]
    value_mask = np.zeros((len(paths), len(tokens)), bool)
    value_mask[path_of_token[3:], np.arange(3, len(tokens))] = True
    value_mask[:, PAD_ID] = True
    return LayoutTables(paths, path_of_token, value_mask, _order_rank(tokens))


def _order_rank(tokens: tuple[str, ...]) -> np.ndarray:
    """Kahn's topological sort of the tokens under `cabin.ORDER_RULES`, smallest id first: i comes
    before j when j first, then i, is an inversion (`cabin.inversions`)."""
    devices = range(3, len(tokens))  # the special tokens take part in no rule
    edges: dict[int, list[int]] = {i: [] for i in range(len(tokens))}
    indegree = [0] * len(tokens)
    for i in devices:
        for j in devices:
            if i != j and cabin.inversions([tokens[j], tokens[i]]):
                edges[i].append(j)
                indegree[j] += 1
    ready = [i for i in range(len(tokens)) if indegree[i] == 0]
    heapq.heapify(ready)
    rank = np.full((len(tokens),), -1, np.int32)
    n = 0
    while ready:
        i = heapq.heappop(ready)
        rank[i], n = n, n + 1
        for j in edges[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, j)
    if n != len(tokens):
        raise ValueError("cabin.ORDER_RULES contain a cycle: no emission order honours them all")
    return rank


def to_settings(tokens: jax.Array, tables: LayoutTables) -> jax.Array:
    """Action sequences [b, length] → per-setting targets [b, n_paths] int32: each path's last
    value in the sequence, `<pad>` ("keep") where the sequence does not set it (`<noop>`,
    `<eos>` and `<pad>` set nothing)."""
    path_of_token = jnp.asarray(tables.path_of_token)
    out = jnp.full((tokens.shape[0], len(tables.paths)), PAD_ID, jnp.int32)
    positions = jnp.arange(len(tables.paths))
    for i in range(tokens.shape[1]):  # later positions overwrite earlier ones
        hit = path_of_token[tokens[:, i]][:, None] == positions[None, :]
        out = jnp.where(hit, tokens[:, i:i + 1].astype(jnp.int32), out)
    return out


def dnfm_targets(tokens: jax.Array, model_cfg: ml_collections.ConfigDict) -> jax.Array:
    """Action sequences [b, action_len] → the DNFM's token targets [b, positions]: the sequence
    itself, or under `model.dnfm.layout = "per_setting"` `to_settings`."""
    if model_cfg.dnfm.layout == "per_setting":
        return to_settings(tokens, layout_tables())
    return tokens


def to_sequence(settings: jax.Array, length: int, tables: LayoutTables) -> jax.Array:
    """Per-setting ids [b, n_paths] (`<pad>` = keep) → action ids [b, length] int32.

    The changed settings in `decode_rank` order, then `<eos>`, then `<pad>`; `[<noop>, <eos>]`
    when nothing changes. More than `length - 1` changes keep the first `length - 1` in that order
    (the vocabulary's grammar has no room for more). Always well formed.
    """
    rank = jnp.asarray(tables.decode_rank)
    changed = settings != PAD_ID
    count = jnp.minimum(changed.sum(-1), length - 1)
    # Unchanged positions sort last; stable sort keeps ties (none: ranks are distinct) by position.
    key = jnp.where(changed, rank[settings], rank.shape[0] + jnp.arange(settings.shape[1])[None])
    order = jnp.argsort(key, axis=-1)[:, :length - 1]
    emitted = jnp.take_along_axis(settings, order, axis=-1)
    emitted = jnp.concatenate([emitted, jnp.zeros_like(emitted[:, :1])], axis=-1)
    slot = jnp.arange(length)[None]
    out = jnp.where(slot < count[:, None], emitted, jnp.where(slot == count[:, None], EOS_ID, PAD_ID))
    noop = (count == 0)[:, None]
    return jnp.where(noop, jnp.where(slot == 0, NOOP_ID, jnp.where(slot == 1, EOS_ID, PAD_ID)), out).astype(jnp.int32)


def num_positions(model_cfg: ml_collections.ConfigDict) -> int:
    """DNFM positions under `model.dnfm.layout`: `action_len` ("sequence") or one per setting path."""
    return len(layout_tables().paths) if model_cfg.dnfm.layout == "per_setting" else model_cfg.action_len
