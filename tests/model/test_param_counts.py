"""Parameter counts of every variant, from shapes alone (jax.eval_shape allocates nothing), pinned
to the "Variants" table of docs/model.md and, for the fixed-size presets, to the exact count."""
from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

from configs.vla_cabin import VARIANTS, get_config
from vlacabin_jax.model import functional as F

MODEL_DOC = Path(__file__).resolve().parents[2] / "docs" / "model.md"

# (trainable, frozen) exactly. tiny is left to the table's figure: its model is being tuned.
EXACT = {
    "small": (13_583_099, 5_371_968),
    "base": (329_533_883, 579_829_888),
    "a100x128": (1_863_394_379, 8_028_603_760),
}
_UNITS = {"M": 1e6, "B": 1e9}


def documented_table() -> dict[str, dict[str, str]]:
    """The Variants table of docs/model.md: {variant: {"trainable", "frozen", "total", "anchor"}}
    as printed ("13.6 M", "0"); "anchor" only where the trainable cell names the anchor it holds."""
    lines = MODEL_DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"#+ Variants", line.strip()))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] not in VARIANTS:
            continue
        trainable, frozen, total = (re.match(r"[\d.]+(?: [MB])?", c).group(0) for c in cells[1:])
        rows[cells[0]] = {"trainable": trainable, "frozen": frozen, "total": total}
        anchor = re.search(r"its ([\d.]+ [MB]) anchor", cells[1])
        if anchor:
            rows[cells[0]]["anchor"] = anchor.group(1)
    return rows


def as_printed(n: int, figure: str) -> str:
    """`n` written with the unit and decimals of `figure` ("0.91 B", "13.6 M", "0")."""
    if " " not in figure:
        return str(n)
    number, unit = figure.split()
    decimals = len(number.split(".")[1]) if "." in number else 0
    return f"{n / _UNITS[unit]:.{decimals}f} {unit}"


def _counts(variant: str) -> dict[str, int]:
    cfg = get_config(variant)
    trainable, frozen = jax.eval_shape(lambda: F.init_params(cfg, jax.random.key(0)))
    n_train, n_frozen = F.param_count(trainable), F.param_count(frozen)
    per_module = {k: round(F.param_count(v) / 1e6, 2) for k, v in {**trainable, **frozen}.items()}
    print(f"{variant}: trainable {n_train / 1e6:.2f}M, frozen {n_frozen / 1e6:.2f}M, "
          f"total {(n_train + n_frozen) / 1e6:.2f}M; {per_module}")
    anchor = sum(F.param_count(g.get(k, {})) for g in (trainable, frozen) for k in ("vit", "lm"))
    # The anchor is frozen unless it trains (tiny: no imported anchor, train.trainable = all_and_anchor).
    assert all(k in frozen for k in ("vit", "lm")) == (cfg.train.trainable != "all_and_anchor")
    return {"trainable": n_train, "frozen": n_frozen, "total": n_train + n_frozen, "anchor": anchor}


def test_documented_table_lists_every_variant():
    assert set(documented_table()) == set(VARIANTS)
    assert as_printed(18_938_699, "18.9 M") == "18.9 M" and as_printed(909_321_435, "0.91 B") == "0.91 B"
    assert as_printed(0, "0") == "0" and as_printed(1, "0") == "1"


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts_are_the_documented_figures(variant):
    counts = _counts(variant)
    for column, figure in documented_table()[variant].items():
        assert as_printed(counts[column], figure) == figure, (variant, column, counts[column])
    if variant in EXACT:
        assert (counts["trainable"], counts["frozen"]) == EXACT[variant]
        assert counts["frozen"] == counts["anchor"]  # the frozen group is the anchor
