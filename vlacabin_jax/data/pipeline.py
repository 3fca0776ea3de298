"""The grain input pipeline: mixture, shuffling, per-process slicing, features, batches, workers.

One global stream of samples, the same whatever the number of processes:

  per kind  : index-addressable source (on-the-fly synthetic world or shard records)
              -> shuffle(seed) -> repeat (reshuffled every epoch)
  mix       : MapDataset.mix with weights w_k^(1/T), normalised (T = data.mixture_temperature);
              grain interleaves the kinds deterministically in these proportions
  global    : element e of the mix; global batch g is elements [g*B, (g+1)*B)

Process p of P takes the contiguous block of rows [p*B/P, (p+1)*B/P) of every global batch
(`ProcessRows`): the processes' slices are disjoint, together they are exactly the global batch,
and `jax.make_array_from_process_local_data` reassembles it in the single-process row order. Each
process then featurizes only its own samples, batches them, and prefetches them in
`data.num_workers` worker processes (0: threads of this process).

Because the per-process stream is index-addressable, the iterator state is just the index of the
next global batch plus what fixes the stream (seed, split, batch size, mixture, data hash). It is
JSON, independent of the number of workers, and restores onto any process count that divides the
global batch.

Splits: "train" reads sample indices [0, n) of every kind; "heldout" reads indices
`HELDOUT_OFFSET + i` of the synthetic world (a disjoint index range, so no heldout sample is a
train sample), or the shards written under the "heldout" split.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import grain
import numpy as np

from vlacabin_jax.data import actions, features, preferences, records, shards, spec, world

# First world index of the heldout split; train indices stay below it.
HELDOUT_OFFSET = 1 << 31
STATE_VERSION = 1


def parse_mixture(text: str) -> dict[str, float]:
    """Parses "vla=2,image_text=2,video_text=1,speech_text=1" into {kind: weight}.

    Kinds (`spec.MIX_KINDS`) left out get weight 0. Raises ValueError for unknown kinds or
    negative/no weight.
    """
    weights = {k: 0.0 for k in spec.MIX_KINDS}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in weights:
            raise ValueError(f"data.mixture: unknown kind {name.strip()!r}; kinds are {spec.MIX_KINDS}")
        weights[name.strip()] = float(value)
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"data.mixture {text!r}: weights must be >= 0 and not all 0")
    return weights


def mixture_weights(cfg, available: dict[str, int] | None = None) -> dict[str, float]:
    """Sampling probability per kind: w_k^(1/T) normalised, T = data.mixture_temperature.

    T = 1 keeps the configured ratio, T > 1 flattens it toward uniform, T < 1 sharpens it.
    Kinds with no samples in `available` ({kind: count}) are dropped before normalising.
    """
    t = float(cfg.data.mixture_temperature)
    if t <= 0:
        raise ValueError(f"data.mixture_temperature must be > 0, got {t}")
    w = {k: v ** (1.0 / t) if v > 0 else 0.0 for k, v in parse_mixture(cfg.data.mixture).items()}
    if available is not None:
        w = {k: v if available.get(k, 0) > 0 else 0.0 for k, v in w.items()}
    total = sum(w.values())
    if total == 0:
        raise ValueError(f"no data for any kind of the mixture {cfg.data.mixture!r} "
                         f"(samples per kind: {available})")
    return {k: v / total for k, v in w.items()}


def synthetic_params(cfg) -> dict[str, Any]:
    """The generator parameters of the synthetic world for this config (also the `generator`
    block of a synthetic shard manifest)."""
    return {"source": "synthetic", "seed": int(cfg.data.world_seed),
            "image_size": int(cfg.model.vit.image_size), "num_frames": int(cfg.data.num_frames),
            "n_mels": int(cfg.model.speech.n_mels), "mel_frames": int(cfg.data.mel_frames),
            "heldout_offset": HELDOUT_OFFSET}


class SyntheticSource:
    """Index-addressable source over `world.generate`: `source[i]` is sample `offset + i` of `kind`.

    Args:
      params: `synthetic_params(cfg)`.
      kind: one of spec.KINDS.
      count: number of samples (the epoch length of this kind).
      offset: 0 for train, HELDOUT_OFFSET for heldout.
    """

    def __init__(self, params: dict[str, Any], kind: str, count: int, offset: int = 0):
        self._p, self._kind, self._count, self._offset = dict(params), kind, int(count), int(offset)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= int(index) < self._count:
            raise IndexError(f"index {index} out of range for {self._count} samples")
        p = self._p
        return world.generate(p["seed"], self._offset + int(index), self._kind, p["image_size"],
                              p["num_frames"], p["n_mels"], p["mel_frames"])

    def __repr__(self) -> str:
        return f"SyntheticSource({self._kind}, n={self._count}, offset={self._offset})"


def open_sources(cfg, split: str, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The per-kind sources of one split.

    Args:
      source: "synthetic" or a shard directory written by `tools.build_dataset`.
    Returns:
      (manifest, {kind: source}) for every kind of `spec.MIX_KINDS`; for "synthetic" the manifest
      is a description with no shards whose `data_hash` identifies the generated data. The
      preference kinds: `preference` is the synthetic world's pairs (empty for shard sources),
      `preference_sim` the pairs in `data.preference_dir` (empty when unset); when the mixture
      reads the latter, its manifest hash joins the manifest (and so the DataHash).
    Raises:
      ValueError: the shards were generated with other sizes than `cfg` asks for.
    """
    manifest, sources = _open_kinds(cfg, split, source)
    sources["preference"] = (preferences.WorldPairSource(synthetic_params(cfg), len(sources["vla"]),
                                                         HELDOUT_OFFSET if split == "heldout" else 0)
                             if source == "synthetic" else [])
    sources["preference_sim"] = []
    pair_dir = cfg.data.preference_dir
    if pair_dir and parse_mixture(cfg.data.mixture)["preference_sim"] > 0:
        pair_manifest, sources["preference_sim"] = preferences.open_pairs(pair_dir, split)
        manifest = dict(manifest, preference_pairs=shards.data_hash(pair_manifest))
    return manifest, sources


def _open_kinds(cfg, split: str, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`open_sources` for the four data kinds of `spec.KINDS`."""
    if split not in shards.SPLITS:
        raise ValueError(f"split {split!r}; choose one of {shards.SPLITS}")
    if source == "synthetic":
        params = synthetic_params(cfg)
        counts = {"train": shards.split_counts(int(cfg.data.synthetic_size)),
                  "heldout": shards.split_counts(int(cfg.data.heldout_size))}
        if max(counts["train"].values()) > HELDOUT_OFFSET:
            raise ValueError(f"data.synthetic_size must stay below {len(spec.KINDS)} * "
                             f"{HELDOUT_OFFSET} so train and heldout indices do not overlap")
        offset = HELDOUT_OFFSET if split == "heldout" else 0
        manifest = {"format": "vlacabin-synthetic", "schema_version": records.SCHEMA_VERSION,
                    "vocab_version": actions.VERSION, "generator": params, "counts": counts,
                    "shards": []}
        return manifest, {k: SyntheticSource(params, k, counts[split][k], offset)
                          for k in spec.KINDS}
    manifest, sources = shards.open_split(source, split, verify_hashes=bool(cfg.data.verify_hashes))
    if manifest["vocab_version"] != actions.VERSION:
        raise ValueError(f"{source}: built with action vocabulary {manifest['vocab_version']}, "
                         f"this code has {actions.VERSION}; rebuild the shards")
    gen, want = manifest["generator"], synthetic_params(cfg)
    for key in ("image_size", "num_frames", "n_mels", "mel_frames"):
        if key in gen and gen[key] != want[key]:
            raise ValueError(f"{source}: shards have {key}={gen[key]}, the config wants {want[key]}; "
                             f"rebuild with this config")
    return manifest, sources


class _Featurize:
    """Picklable `sample -> features` (no batch dim); the tokenizer and action vocabulary are
    built once in whichever process runs it (grain ships this object to its workers), under a lock
    because grain's reader threads call it concurrently and `transformers` imports lazily."""

    def __init__(self, cfg):
        self._cfg = cfg
        self._tok = self._vocab = None
        self._lock = threading.Lock()

    def setup(self) -> "_Featurize":
        with self._lock:
            if self._vocab is None:
                self._tok = features.load_tokenizer(self._cfg.data.get("tokenizer") or None)
                self._vocab = actions.ActionVocabulary()
        return self

    def __call__(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        if self._vocab is None:
            self.setup()
        return features.featurize(sample, self._cfg, self._tok, self._vocab)

    def __getstate__(self) -> dict[str, Any]:
        return {"_cfg": self._cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_cfg"])


def _kind_seed(seed: int, split: str, k: int) -> int:
    """An independent shuffle seed per (seed, split, kind)."""
    return int(np.random.SeedSequence([seed, shards.SPLITS.index(split), k]).generate_state(1)[0])


def sample_stream(cfg, sources: dict[str, Any], split: str, seed: int) -> grain.MapDataset:
    """The global, infinite, index-addressable stream of mixed samples (before slicing).

    Returns:
      MapDataset whose element e is a sample dict; global batch g is elements [g*B, (g+1)*B).
    """
    weights = mixture_weights(cfg, {k: len(s) for k, s in sources.items()})
    kinds = [k for k in spec.MIX_KINDS if weights[k] > 0]
    # Seeds by position in MIX_KINDS, so a kind's order does not depend on which others are mixed in.
    parts = [grain.MapDataset.source(sources[k])
             .shuffle(seed=_kind_seed(seed, split, spec.MIX_KINDS.index(k))).repeat() for k in kinds]
    return grain.MapDataset.mix(parts, [weights[k] for k in kinds])


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch: element j is stream element
    `(j // local) * global + process_index * local + j % local`.

    Process p holds the contiguous block [p·local, (p+1)·local) of each global batch, which is
    where `jax.make_array_from_process_local_data` puts its rows in the global array; so the
    global batch is row for row the one a single process would read, and so are the per-row
    random draws of the step (a strided split would permute the rows and change the losses).
    """

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global, self._local = global_batch_size, global_batch_size // process_count
        self._offset = process_index * self._local
        self._length = len(parent) // global_batch_size * self._local

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(index, self._local)
        return batch * self._global + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows[{self._offset}:+{self._local} of {self._global}]"


class DataIterator(grain.DatasetIterator):
    """Per-process batch iterator with a small JSON state.

    `next(it)` gives a dict of numpy arrays exactly per `spec.batch_spec(cfg, global_batch //
    process_count)`. `get_state()` -> {"version", "next_batch", "stream"}; `set_state` checks that
    the stream (seed, split, global batch, mixture, data hash) is the same and jumps to the batch.
    Works with grain's Orbax handler (`grain.checkpoint.CheckpointSave(it)`).
    """

    def __init__(self, inner: grain.DatasetIterator, stream: dict[str, Any]):
        super().__init__(inner)
        self._inner, self._stream, self._next = inner, stream, 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._inner)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_batch": self._next, "stream": dict(self._stream)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        saved = state.get("stream") or {}
        if saved != self._stream:
            diff = {k: (saved.get(k), v) for k, v in self._stream.items() if saved.get(k) != v}
            raise ValueError(f"data iterator state is for another stream (saved, now): {diff}")
        grain.experimental.set_next_index(self._inner, int(state["next_batch"]))
        self._next = int(state["next_batch"])

    def _get_next_index(self) -> int:
        return self._next

    def _set_next_index(self, index: int) -> None:
        grain.experimental.set_next_index(self._inner, index)
        self._next = index


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(cfg, *, split: str = "train", process_index: int = 0, process_count: int = 1,
                 global_batch_size: int, seed: int, source: str | None = None,
                 num_workers: int | None = None) -> DataIterator:
    """The batch iterator of one process.

    Args:
      cfg: full config (`cfg.data`, `cfg.model` sizes).
      split: "train" or "heldout".
      process_index, process_count: this JAX process and how many there are
        (`jax.process_index()`, `jax.process_count()`).
      global_batch_size: B over all processes; each process gets B // process_count rows.
      seed: shuffle seed (the sample content is fixed by `data.world_seed` or the shards).
      source: "synthetic" or a shard directory; defaults to `cfg.data.source`.
      num_workers: worker processes; defaults to `cfg.data.num_workers` (0: in-process threads).
    Returns:
      DataIterator of batches {name: array[B // process_count, ...]} per `spec.batch_spec`.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} must be a positive multiple of "
                         f"the process count {process_count}")
    source = str(source or cfg.data.source)
    num_workers = int(cfg.data.num_workers if num_workers is None else num_workers)
    manifest, sources = open_sources(cfg, split, source)
    weights = mixture_weights(cfg, {k: len(s) for k, s in sources.items()})
    stream = {"seed": int(seed), "split": split, "global_batch_size": int(global_batch_size),
              # The preference kinds only when mixed in: iterator states of other runs stay valid.
              "mixture": {k: round(w, 12) for k, w in weights.items() if k in spec.KINDS or w > 0},
              "data_hash": shards.data_hash(manifest)}
    local = global_batch_size // process_count
    ds = (ProcessRows(sample_stream(cfg, sources, split, seed), global_batch_size, process_index, process_count)
          .map(_Featurize(cfg).setup())
          .batch(local, drop_remainder=True))
    prefetch = int(cfg.data.prefetch)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg.data.read_threads),
                                                 prefetch_buffer_size=prefetch))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=prefetch))
    return DataIterator(iter(it_ds), stream)


def dataset_hash(cfg, source: str | None = None) -> str:
    """The DataHash of what `make_dataset` would read (shard manifest, or synthetic params)."""
    manifest, _ = open_sources(cfg, "train", str(source or cfg.data.source))
    return shards.data_hash(manifest)


def save_state(it: DataIterator, path: str | os.PathLike) -> None:
    """Writes `it.get_state()` as JSON, atomically (temp file + rename)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(it.get_state(), sort_keys=True))
    os.replace(tmp, path)


def restore_state(it: DataIterator, path: str | os.PathLike) -> DataIterator:
    """Sets `it` to the state saved at `path`; the next batch is the one after the saved point."""
    it.set_state(json.loads(Path(path).read_text()))
    return it
