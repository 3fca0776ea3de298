"""Where an export's weights come from: a training checkpoint (Orbax, `vlacabin_jax.train.checkpoint`)
or a fresh initialisation (smoke tests), checked before anything is written.

    src = from_checkpoint("runs/demo/checkpoints")          # newest complete step
    src = from_checkpoint("runs/demo/checkpoints/400")      # that step
    src = from_random_init(get_config("tiny"))

Checks with one clear `ExportInputError` each: the path exists and holds a complete checkpoint;
its config is a VLA-Cabin config (and, when the caller names one, the same model as that config)
with an exportable action head (`model.action_head = "dnfm"`: the autoregressive head is the
quality ladder's baseline and has no mirror); its action vocabulary is the one this code builds
(same version and token ids); the params have exactly the shapes the config gives.

The anchor (`vit`, `lm`) is in `frozen` (in `model.anchor_dtype`) unless `train.trainable =
"all_and_anchor"`, which keeps it in `trainable` (float32); the conversion takes the union.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_ITEMS = ("state", "config", "metadata")  # what an export reads (not the data iterator)


class ExportInputError(ValueError):
    """A checkpoint or argument the export cannot use (one line, no traceback for the CLI)."""


@dataclasses.dataclass
class ExportSource:
    """Params and everything that describes them.

    trainable, frozen: nested dicts of numpy arrays (unboxed; frozen in the anchor dtype).
    cfg: the full `ml_collections` config the params were trained with.
    vocab_json: the action vocabulary (`ActionVocabulary.to_json()` text).
    provenance: {"origin", "step", "model_version", "data_hash", "code_revision", ...}.
    """

    trainable: Any
    frozen: Any
    cfg: Any
    vocab_json: str
    provenance: dict


def resolve_step_dir(path: str | Path) -> Path:
    """A checkpoints directory (→ its newest complete step) or one step directory (must be complete)."""
    from vlacabin_jax.train import checkpoint as ckpt_lib  # the trainer owns the format

    path = Path(path)
    if not path.exists():
        raise ExportInputError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ExportInputError(f"checkpoint {path} is a file; pass a checkpoints/ directory or one of its "
                               "step directories")
    if path.name.isdecimal() and ((path / "state").exists() or (path / ckpt_lib.COMMIT_MARKER).exists()):
        missing = ckpt_lib.missing_parts(path, CHECKPOINT_ITEMS)
        if missing:
            raise ExportInputError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
        return _verified(path)
    newest = ckpt_lib.newest_complete_step(path, CHECKPOINT_ITEMS)
    if newest is None:
        steps = ckpt_lib.saved_steps(path)
        detail = f" (incomplete steps: {steps})" if steps else ""
        raise ExportInputError(f"no complete checkpoint in {path}{detail}; pass <workdir>/checkpoints of a run "
                               "that saved at least once")
    return _verified(path / str(newest))


def _verified(step_dir: Path) -> Path:
    """`step_dir` if its files match the checksums the trainer wrote (bit flips, truncation)."""
    from vlacabin_jax.train.checkpoint import checksum_problem  # the trainer owns the format

    problem = checksum_problem(step_dir)
    if problem is not None:
        raise ExportInputError(f"checkpoint {step_dir} is damaged: {problem}; export another step with "
                               f"--checkpoint {step_dir.parent}/<step>")
    return step_dir


def _read_json_item(step_dir: Path, item: str) -> dict:
    """An Orbax JSON item (`<step>/<item>/<file>`): the one JSON object file in that directory."""
    for f in sorted((step_dir / item).iterdir()):
        if f.is_file() and not f.name.startswith("_"):
            try:
                obj = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(obj, dict):
                return obj
    raise ExportInputError(f"checkpoint {step_dir}: no readable JSON in {item}/")


def check_exportable(cfg: Any) -> None:
    """Refuse, in one line, a model the mirror cannot represent (`model.action_head` other than "dnfm")."""
    from vlacabin_jax.export.torch_model import unsupported_action_head

    head = cfg.model.get("action_head", "dnfm")
    if head != "dnfm":
        raise ExportInputError(unsupported_action_head(head))


def config_from_json(saved: dict) -> Any:
    """The saved config JSON → a validated ConfigDict (its preset with the saved values; lists
    become the preset's tuples)."""
    import ml_collections

    from configs.vla_cabin import VARIANTS, get_config
    from vlacabin_jax.config import ConfigError, validate, with_legacy_defaults

    variant = saved.get("variant")
    if variant not in VARIANTS or "model" not in saved:
        raise ExportInputError(f"checkpoint config is not a VLA-Cabin config (variant {variant!r})")
    cfg = get_config(variant)

    def fill(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise ExportInputError(f"checkpoint config has field {prefix}{key}, which this code does not know "
                                       "(a newer config version?)")
            if isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    fill(cfg, with_legacy_defaults(saved), "")
    try:
        validate(cfg)
    except ConfigError as e:
        raise ExportInputError(f"checkpoint config is not valid for this code: {e}") from None
    return cfg


def check_same_model(saved_cfg: Any, cfg: Any) -> None:
    """The checkpoint's model config must equal the one the caller asked to export (fields that do
    not change the stored params excepted)."""
    from vlacabin_jax.config import config_to_json_dict

    free = {"dtype", "remat", "attention_impl", "scan_layers", "dnfm.sample_steps"}

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(config_to_json_dict(saved_cfg.model)), flat(config_to_json_dict(cfg.model))
    diffs = [f"model.{k}: checkpoint {a.get(k)!r} vs --config {b.get(k)!r}"
             for k in sorted(set(a) | set(b)) if k not in free and a.get(k) != b.get(k)]
    if diffs:
        raise ExportInputError(f"checkpoint is from another config ({saved_cfg.variant}): {diffs[0]}"
                               + (f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""))


def check_vocabulary(vocab_json: str | dict | None, where: str) -> str:
    """The saved action vocabulary must be this code's: same version, same token ids."""
    from vlacabin_jax.data.actions import ActionVocabulary

    current = ActionVocabulary()
    if vocab_json is None:
        raise ExportInputError(f"{where}: no action vocabulary saved; cannot tell which token ids it was trained on")
    text = vocab_json if isinstance(vocab_json, str) else json.dumps(vocab_json)
    try:
        saved = ActionVocabulary.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise ExportInputError(f"{where}: unreadable action vocabulary ({e})") from None
    if saved.version != current.version or not saved.compatible_with(current):
        raise ExportInputError(f"{where}: action vocabulary version {saved.version} ({saved.size} tokens) differs "
                               f"from this code's {current.version} ({current.size} tokens); export with the code "
                               "version that trained it")
    return current.to_json()


def abstract_params(cfg: Any) -> tuple[Any, Any]:
    """ShapeDtypeStructs of (trainable, frozen) for `cfg` (the anchor in its dtype); no allocation."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlacabin_jax.model import functional

    def init():
        trainable, frozen = functional.init_params(cfg, jax.random.key(0))
        return trainable, functional.cast_anchor(frozen, jnp.dtype(cfg.model.anchor_dtype))

    trainable, frozen = jax.eval_shape(init)
    return nn.unbox(trainable), nn.unbox(frozen)


def _host_device():
    """Restore onto the CPU when JAX has it (the export runs on the host), else the first device."""
    import jax

    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


def from_checkpoint(path: str | Path, cfg: Any | None = None) -> ExportSource:
    """Params, config and vocabulary of a training checkpoint.

    Args:
      path: `<workdir>/checkpoints` (newest complete step) or `<workdir>/checkpoints/<step>`.
      cfg: the config the caller means to export (`--config`); None takes the checkpoint's own.
        When given it must describe the same model.
    """
    import jax
    import orbax.checkpoint as ocp

    step_dir = resolve_step_dir(path)
    saved_cfg = config_from_json(_read_json_item(step_dir, "config"))
    check_exportable(saved_cfg)
    metadata = _read_json_item(step_dir, "metadata")
    vocab_json = check_vocabulary(metadata.get("action_vocabulary"), f"checkpoint {step_dir}")
    if cfg is not None:
        check_same_model(saved_cfg, cfg)
    trainable, frozen = abstract_params(saved_cfg)
    device = jax.sharding.SingleDeviceSharding(_host_device())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          {"trainable": trainable, "frozen": frozen})
    try:
        # Only the params: the optimizer state, step and rng of the train state are not read.
        # (`StandardCheckpointer.restore(strict=False)` refuses a target with fewer top-level keys.)
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=device, dtype=a.dtype), target)
        restored = checkpointer.restore(step_dir.absolute() / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # Orbax raises many types for unreadable or mismatching trees
        message = str(e).splitlines()[0][:300]
        raise ExportInputError(f"checkpoint {step_dir}: params do not restore onto the config's shapes "
                               f"({type(e).__name__}: {message})") from None
    to_numpy = lambda x: np.asarray(x)  # noqa: E731
    provenance = {"origin": str(step_dir.absolute()), "step": int(metadata.get("step", step_dir.name)),
                  **{k: metadata.get(k) for k in ("model_version", "data_hash", "code_revision", "stage", "saved_at")}}
    return ExportSource(jax.tree.map(to_numpy, restored["trainable"]), jax.tree.map(to_numpy, restored["frozen"]),
                        saved_cfg, vocab_json, provenance)


def from_random_init(cfg: Any, seed: int = 0) -> ExportSource:
    """Freshly initialised params (smoke tests of the export pipeline; not a model to ship)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlacabin_jax.data.actions import ActionVocabulary
    from vlacabin_jax.model import functional

    check_exportable(cfg)
    trainable, frozen = functional.init_params(cfg, jax.random.key(seed))
    frozen = jax.tree.map(np.asarray, functional.cast_anchor(nn.unbox(frozen), jnp.dtype(cfg.model.anchor_dtype)))
    return ExportSource(jax.tree.map(np.asarray, nn.unbox(trainable)), frozen, cfg, ActionVocabulary().to_json(),
                        {"origin": f"random-init(seed={seed})", "step": 0})
