"""Loss-side metrics on hand-made inputs with known answers."""

import jax
import numpy as np

from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID
from vlacabin_jax.model.losses import action_accuracies, cross_entropy


def _logits(predicted: np.ndarray, vocab: int = 10) -> np.ndarray:
    return np.asarray(jax.nn.one_hot(predicted, vocab))


def test_action_accuracy_ignores_padding_and_sequence_accuracy_needs_every_position():
    targets = np.array([[5, 7, EOS_ID, PAD_ID],       # two actions
                        [NOOP_ID, EOS_ID, PAD_ID, PAD_ID],  # <noop> counts as an action token
                        [4, EOS_ID, PAD_ID, PAD_ID]])     # no target: ignored entirely
    has = np.array([True, True, False])
    # Emitting nothing gets padding positions right (3 of 8), yet no action token and no sequence.
    nothing = np.array([[EOS_ID, PAD_ID, PAD_ID, PAD_ID]] * 3)
    assert (nothing == targets)[:2].mean() == 3 / 8
    action, sequence = action_accuracies(_logits(nothing), targets, has)
    assert float(action) == 0.0 and float(sequence) == 0.0
    # Right actions but a wrong <eos> in row 0: 3/3 action tokens, 1/2 sequences.
    almost = targets.copy()
    almost[0, 2] = PAD_ID
    action, sequence = action_accuracies(_logits(almost), targets, has)
    assert float(action) == 1.0 and float(sequence) == 0.5
    action, sequence = action_accuracies(_logits(targets), targets, has)
    assert float(action) == 1.0 and float(sequence) == 1.0


def test_cross_entropy_matches_the_log_softmax_pick_and_its_gradient_is_softmax_minus_one_hot():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 5, 40)) * 4).astype(np.float32)
    logits[0, 0, 7] = 80.0  # a confident, right position: logsumexp must not overflow
    labels = rng.integers(0, 40, size=(3, 5)).astype(np.int32)
    labels[0, 0] = 7
    logp = jax.nn.log_softmax(logits, axis=-1)
    expected = -np.take_along_axis(np.asarray(logp), labels[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(cross_entropy(logits, labels)), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(cross_entropy(logits, labels)[0, 0])) < 1e-5
    grad = jax.grad(lambda lg: cross_entropy(lg, labels).sum())(logits)
    one_hot = np.asarray(jax.nn.one_hot(labels, 40))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.nn.softmax(logits, -1)) - one_hot, atol=1e-6)
    # bf16 logits are computed in float32.
    assert cross_entropy(logits.astype(jax.numpy.bfloat16), labels).dtype == np.float32


# ---- every term of `loss_terms` against values worked out by hand ------------------------------
#
# Two samples. Sample 0: actions [3, <eos>], speech, text and state; sample 1: no actions, text
# and video. Values outside a term's mask are large garbage, so a mask error shows.

LN = np.log
TAU = 0.5  # InfoNCE temperature
WEIGHTS = dict(kl_weight=2.0, infonce_weight=3.0, recon_weight=5.0, velocity_weight=7.0, endpoint_weight=11.0,
               source_weight=13.0, path_weight=17.0, explanation_weight=19.0, autoregressive_weight=23.0)


def _hand_cfg():
    from configs.vla_cabin import get_config

    cfg = get_config("tiny")
    cfg.loss.update(kl_warmup_steps=10, infonce_temperature=TAU, **WEIGHTS)
    cfg.model.state.categorical_sizes = (2, 3)
    cfg.model.dnfm.layout = "sequence"  # the hand-built targets are 2-token sequences over 4 ids
    return cfg


def _hand_inputs(with_ar: bool = True):
    """(out, batch) of two samples, 2 latent tokens, action_len 2, vocab 4, width 2."""
    f = np.float32
    garbage = 50.0
    speech, text, video, state = range(4)  # spec.MODALITIES
    batch = {
        "modality_mask": np.array([[1, 1, 0, 1], [0, 1, 1, 0]], bool),
        "has_actions": np.array([True, False]),
        "state_numeric": np.array([[1, 2], [0, 0]], f),
        "state_categorical": np.array([[0, 2], [1, 1]], np.int32),
        "mel": np.array([[[2, 4], [garbage, garbage]], [[0, 0], [0, 0]]], f),
        "mel_mask": np.array([[1, 0], [1, 1]], bool),
        "action_tokens": np.array([[3, EOS_ID], [3, 3]], np.int32),
        "explanation_tokens": np.array([[0, 1, 2], [0, 3, 1]], np.int32),
        "explanation_mask": np.array([[1, 1, 1], [1, 1, 0]], bool),
    }
    pooled = np.zeros((2, 4, 2), f)
    pooled[0, speech] = pooled[0, text] = pooled[0, state] = [1, 0]
    pooled[1, text] = pooled[1, state] = [0, 3]  # norm 3: InfoNCE normalises
    pooled[1, video] = [garbage, 0]  # no valid video token in sample 1 (latent_present): no row
    present = np.array([[1, 1, 0, 1], [0, 1, 0, 1]], bool)

    def logits_with(target_logit, shape, tokens):
        lg = np.zeros(shape, f)
        np.put_along_axis(lg, tokens[..., None], target_logit, axis=-1)
        return lg

    tokens = batch["action_tokens"]
    source = logits_with(LN(3.0), (2, 2, 4), tokens)  # p(target) = 3 / (3 + 3) = 1/2 everywhere
    expl_targets = batch["explanation_tokens"][:, 1:]
    expl = logits_with(0.0, (2, 2, 4), expl_targets)
    expl[1, 0, 3] = LN(3.0)  # sample 1, first target (3): p = 1/2; its second target is masked
    ar = np.zeros((2, 2, 4), f)
    ar[0, 0, 3] = LN(6.0)  # p(3) = 6 / 9 = 2/3 right; position 1 all zeros: argmax 0 ≠ <eos>
    out = {
        "latent_mean": np.array([[[1, 2], [0, 0]], [[0, 0], [garbage, garbage]]], f),
        "latent_logvar": np.array([[[0, LN(2.0)], [0, 0]], [[0, 0], [0, 0]]], f),
        "latent_mask": np.array([[1, 1], [1, 0]], bool),
        "latent_present": present,
        "pooled": pooled,
        "z0_mean": np.array([np.ones((2, 2)), np.full((2, 2), garbage)], f),
        "z0_logvar": np.zeros((2, 2, 2), f),
        "recon": {"state_numeric": np.array([[2, 5], [garbage, garbage]], f),  # errors 1, 3
                  "state_categorical": np.zeros((2, 5), f),  # CE ln 2 and ln 3
                  "mel": np.array([[0, 0], [garbage, garbage]], f),  # target (2, 4): the masked frame is out
                  "visual": np.array([[garbage, garbage], [1, 1]], f)},
        "visual_target": np.zeros((2, 2), f),
        "velocity": np.array([[[1, 1], [3, 3]], [[garbage] * 2] * 2], f),
        "velocity_target": np.zeros((2, 2, 2), f),
        "endpoint_logits": np.zeros((2, 2, 4), f),  # CE ln 4, argmax 0 (wrong)
        "source_logits": source,
        "path_logits": np.zeros((2, 2, 4), f),
        "t_next": np.array([0.5, 0.0], f),
        "velocity_next": np.array([[[2, 2], [2, 2]], [[garbage] * 2] * 2], f),
        "velocity_next_target": np.zeros((2, 2, 2), f),
        "path_endpoint_gap": np.array([0.25, garbage], f),
        "explanation_logits": expl,
        "codebook": np.array([[0, 0], [3, 4], [0, 1], [6, 8]], f),
    }
    if with_ar:
        out["ar_logits"] = ar
    return out, batch


def _hand_terms():
    """Each term of `_hand_inputs` worked out on paper."""
    nce_row = LN(1 + np.exp(-1 / TAU))  # one positive at cosine 1, one negative at cosine 0
    t = {
        # KL(N(m, e^lv) || N(0, I)) = ½ Σ (e^lv + m² - 1 - lv): token (1, 2 | 0, ln 2) gives
        # ½ (1 + 5 - ln 2); the two other valid tokens 0; the masked one is out.
        "kl_latent": (0.5 * (6 - LN(2.0))) / 3,
        "kl_z0": 0.5 * 2 * 1.0,  # mean 1 in both dims of each position: ½ · 2 · 1 per position
        # (text, state) in both samples and both directions: 4 rows of nce_row; (speech, text) and
        # (speech, state) in sample 0: speech→x has both negatives (nce_row), x→speech only itself (0).
        "infonce": (4 * nce_row + 2 * nce_row + 2 * 0.0) / 8, "infonce_rows": 8.0,
        "recon_state_numeric": (1 + 9) / 2,
        "recon_state_categorical": (LN(2.0) + LN(3.0)) / 2,
        "recon_mel": (4 + 16) / 2,
        "recon_visual": 1.0,
        "velocity": (1 + 9) / 2,
        "endpoint_ce": LN(4.0),
        "source_ce": LN(2.0),
        "path": LN(4.0) + (0.5 * 2) ** 2 + 0.25,  # CE, ((1 - t') · error)², endpoint gap
        "explanation_ce": (LN(4.0) + LN(4.0) + LN(2.0)) / 3,
        "ar_ce": (LN(1.5) + LN(4.0)) / 2,
        "endpoint_acc": 0.0, "source_acc": 1.0, "path_acc": 0.0, "explanation_acc": 1 / 3,
        "endpoint_action_acc": 0.0, "endpoint_sequence_acc": 0.0,
        "ar_action_acc": 1.0, "ar_sequence_acc": 0.0,
        "kl_scale": WEIGHTS["kl_weight"] * 5 / 10,  # step 5 of a 10-step warm-up
        "codebook_min_distance": 1.0,
    }
    w = WEIGHTS
    t["loss"] = (t["kl_scale"] * (t["kl_latent"] + t["kl_z0"]) + w["infonce_weight"] * t["infonce"]
                 + w["recon_weight"] * (t["recon_state_numeric"] + t["recon_state_categorical"]
                                        + t["recon_mel"] + t["recon_visual"])
                 + w["velocity_weight"] * t["velocity"] + w["endpoint_weight"] * t["endpoint_ce"]
                 + w["source_weight"] * t["source_ce"] + w["path_weight"] * t["path"]
                 + w["explanation_weight"] * t["explanation_ce"] + w["autoregressive_weight"] * t["ar_ce"])
    return t


def test_every_loss_term_matches_its_hand_computed_value():
    from vlacabin_jax.model.losses import loss_terms

    out, batch = _hand_inputs()
    loss, metrics = loss_terms(out, batch, _hand_cfg(), 5)
    want = _hand_terms()
    assert set(metrics) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)


def test_without_the_autoregressive_head_its_terms_are_absent():
    from vlacabin_jax.model.losses import loss_terms

    out, batch = _hand_inputs(with_ar=False)
    loss, metrics = loss_terms(out, batch, _hand_cfg(), 5)
    want = _hand_terms()
    assert not {"ar_ce", "ar_action_acc", "ar_sequence_acc"} & set(metrics)
    np.testing.assert_allclose(float(loss), want["loss"] - WEIGHTS["autoregressive_weight"] * want["ar_ce"], rtol=1e-5)


def test_kl_warm_up_is_linear_then_flat():
    from vlacabin_jax.model.losses import loss_terms

    out, batch = _hand_inputs()
    for step, scale in ((0, 0.0), (5, 0.5), (10, 1.0), (400, 1.0)):
        _, metrics = loss_terms(out, batch, _hand_cfg(), step)
        assert float(metrics["kl_scale"]) == WEIGHTS["kl_weight"] * scale


def test_microbatch_terms_over_batch_totals_add_up_to_the_batch():
    """Split row by row with the whole batch's counts as `totals`: every loss term, accuracy and
    the total add up to the batch's (the gradient too, it is linear in the loss); InfoNCE
    contrasts within each microbatch; `PER_STEP_METRICS` are the same in each."""
    from vlacabin_jax.model.losses import PER_STEP_METRICS, loss_counts, loss_terms

    cfg = _hand_cfg()
    out, batch = _hand_inputs()
    totals = loss_counts(out, batch, cfg)
    _, whole = loss_terms(out, batch, cfg, 5)
    row = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1] if x.shape[0] == 2 else x, tree)  # noqa: E731
    parts = [loss_terms(row(out, i), row(batch, i), cfg, 5, totals)[1] for i in range(2)]
    # The mean of the two rows' own means is not the batch's mean (the bug accumulation had).
    alone = [loss_terms(row(out, i), row(batch, i), cfg, 5)[1] for i in range(2)]
    assert abs((alone[0]["explanation_ce"] + alone[1]["explanation_ce"]) / 2 - whole["explanation_ce"]) > 0.1
    # Within one row there is no negative: sample 0's rows give 0 and 2·nce_row over 6 rows.
    nce_row = LN(1 + np.exp(-1 / TAU))
    infonce = (0.0 + 2 * 0.0) / 8  # every row of a one-sample microbatch has only itself: CE 0
    for name in whole:
        got = [float(p[name]) for p in parts]
        if name in PER_STEP_METRICS:
            assert got[0] == got[1] == float(whole[name]), name
        elif name == "infonce":
            np.testing.assert_allclose(sum(got), infonce, atol=1e-6)
            assert float(whole[name]) > 0.5 * nce_row
        elif name == "loss":
            nce_part = WEIGHTS["infonce_weight"] * (float(whole["infonce"]) - infonce)
            np.testing.assert_allclose(sum(got), float(whole[name]) - nce_part, rtol=1e-5)
        else:
            np.testing.assert_allclose(sum(got), float(whole[name]), rtol=1e-5, atol=1e-6, err_msg=name)


def test_per_setting_keep_positions_weigh_keep_weight_and_rows_without_actions_nothing():
    from vlacabin_jax.model.losses import dnfm_position_weights

    targets = np.array([[0, 17, 0], [0, 0, 0], [40, 0, 9]], np.int32)  # <pad> = keep
    has_actions = np.array([True, True, False])
    got = np.asarray(dnfm_position_weights(targets, has_actions, "per_setting", 0.3))
    np.testing.assert_allclose(got, [[0.3, 1.0, 0.3], [0.3, 0.3, 0.3], [0.0, 0.0, 0.0]], rtol=1e-6)
    got = np.asarray(dnfm_position_weights(targets, has_actions, "sequence", 0.3))
    np.testing.assert_array_equal(got, [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
