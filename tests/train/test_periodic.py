"""The train loop's periodic actions alone, without a model or a compile: schedules, goodput
accounting, the metrics window, logging (with a stand-in evaluation), saving and profiling."""

import jax.numpy as jnp
import pytest

from vlacabin_jax.train import periodic


class _Writer:
    """MetricsWriter's interface, rows kept in memory."""

    def __init__(self):
        self.rows, self.events = [], []

    def write(self, step, scalars, console_keys=()):
        self.rows.append({"step": step, **scalars})

    def event(self, step, text, **fields):
        self.events.append((step, text, fields))


def _window(losses, finite=None):
    window = periodic.Window()
    for i, loss in enumerate(losses):
        ok = True if finite is None else finite[i]
        window.add(i + 1, 100 + i, {"loss": jnp.float32(loss), "finite": jnp.bool_(ok)})
    return window


def test_schedules():
    assert [s for s in range(1, 11) if periodic.log_due(s, every=4, total=10)] == [1, 4, 8, 10]
    assert [s for s in range(1, 11) if periodic.eval_due(s, every=4, total=10)] == [4, 8, 10]
    assert not any(periodic.eval_due(s, every=0, total=10) for s in range(1, 11))


def test_goodput_parts_add_up_and_unknown_parts_are_refused():
    goodput = periodic.Goodput(start=0.0)
    goodput.charge("eval_s", 1.5)
    goodput.charge("eval_s", 0.5)
    goodput.charge("checkpoint_s", 1.0)
    report = goodput.report()
    assert report["eval_s"] == 2.0 and report["checkpoint_s"] == 1.0
    lost = sum(report[p] for p in periodic.Goodput.PARTS)
    assert report["productive_s"] + lost == pytest.approx(report["total_s"])
    text, fields = goodput.event()
    assert text.startswith("goodput ") and "eval 2 s" in text and fields.keys() == report.keys()
    with pytest.raises(KeyError, match="unknown goodput part 'eval'"):
        goodput.charge("eval", 1.0)


def test_window_finds_the_first_refused_update():
    assert periodic.Window().first_non_finite() is None
    assert _window([1.0, 2.0]).first_non_finite() is None
    assert _window([1.0, 2.0, 3.0], finite=[True, False, False]).first_non_finite() == (2, 101)


def test_log_writes_the_window_mean_and_the_evaluation_then_starts_a_new_window():
    class Evaluate:  # `periodic.Evaluate`'s interface
        def due(self, step):
            return step == 4

        def __call__(self, step, state, example_batch):
            return {"loss": 0.25}, 0.125

    writer, window = _Writer(), _window([1.0, 3.0])
    window.excluded_s, window.save_s = 0.5, 0.2  # 0.3 s compile + 0.2 s save: not step time
    log = periodic.Log(writer, window, batch_size=16, flops=1.0, devices=[], evaluate=Evaluate())
    row = log(2, state=None, example_batch=None)
    assert row["loss"] == 2.0 and "finite" not in row and "eval/loss" not in row
    assert row["compile_s"] == pytest.approx(0.3) and row["checkpoint_blocked_s"] == 0.2
    assert writer.rows == [{"step": 2, **row}] and not window.entries and window.excluded_s == 0.0
    assert log.first_loss == log.last_loss == 2.0 and log.rate == (row["step_time_s"], row["samples_per_s"])

    window.add(3, 102, {"loss": jnp.float32(5.0), "finite": jnp.bool_(True)})
    row = log(4, state=None, example_batch=None)
    assert row["eval/loss"] == 0.25 and list(row)[-1] == "eval_time_s" and row["eval_time_s"] == 0.125
    assert (log.first_loss, log.last_loss, log.last_eval) == (2.0, 5.0, {"loss": 0.25})


def test_save_charges_its_blocking_time_to_the_window_and_goodput():
    class Checkpointer:
        def __init__(self):
            self.saved, self.waits = [], 0

        def save(self, step, state, data_state, loop, force=False):
            self.saved.append((step, data_state, loop, force))
            return True

        def wait(self):
            self.waits += 1

    ckpt, window, goodput = Checkpointer(), periodic.Window(), periodic.Goodput()
    save = periodic.Save(ckpt, window, goodput)
    assert save(8, jnp.ones(3), {"next_batch": 8}, {"rollbacks": 0, "skipped_batches": []})
    save.wait()
    assert ckpt.saved == [(8, {"next_batch": 8}, {"rollbacks": 0, "skipped_batches": []}, True)] and ckpt.waits == 1
    assert window.save_s == window.excluded_s > 0.0 and goodput.checkpoint_s >= window.save_s


def test_profile_traces_the_configured_steps_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(periodic.jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
    monkeypatch.setattr(periodic.jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
    profile = periodic.Profile(tmp_path, start=2, steps=2)
    for step in range(6):  # `step` is the state's step before the update
        profile.before_step(step)
        profile.after_step(step + 1, jnp.zeros(()))
        calls.append(step + 1)
    profile.stop()
    assert calls == [1, 2, ("start", str(tmp_path)), 3, ("stop",), 4, 5, 6]
    off = periodic.Profile(tmp_path, start=0, steps=2, enabled=False)
    off.before_step(0)
    off.stop()
    assert not off.active and len(calls) == 8
