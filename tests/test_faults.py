"""Faults: kill -9 and resume, a half-written checkpoint, a dead peer process, stragglers, determinism."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flagjax import train
from tests.helpers import DS, Crash, crash_at, free_port, subprocess_env, write_idx_set
from tests.helpers import small_config as _cfg


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _lines(path):
    drop = ("wall_time", "step_time")
    return [{k: v for k, v in json.loads(s).items() if k not in drop} for s in path.read_text().splitlines()]


def _cli(tmp_path, out, *extra):
    return [
        sys.executable,
        "-m",
        "flagjax.cli",
        "train",
        "model=mlp",
        "num_workers=4",
        "num_byzantine=1",
        "attack=random",
        "batch_size=4",
        "steps=40",
        "eval_every=20",
        "log_every=5",
        f"data_dir={tmp_path / 'data'}",
        f"out_dir={out}",
        *extra,
    ]


@pytest.mark.timeout(300)
def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    write_idx_set(tmp_path / "data", n_train=200, n_test=40)
    full = subprocess.run(
        _cli(tmp_path, tmp_path / "full"), env=subprocess_env(1), capture_output=True, text=True, timeout=200
    )
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "crash"
    proc = subprocess.Popen(_cli(tmp_path, out, "checkpoint_every=5"), env=subprocess_env(1), stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 150
    while time.time() < deadline:  # wait for the second checkpoint, then kill -9 mid-run
        if ckpts.exists() and len([d for d in ckpts.iterdir() if d.name.isdigit()]) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        _cli(tmp_path, out, "checkpoint_every=5", "resume=true"),
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _lines(out / "metrics.jsonl") == _lines(tmp_path / "full" / "metrics.jsonl")


def test_half_written_checkpoint_is_ignored(tmp_path):
    cfg = _cfg(tmp_path, steps=4, checkpoint_every=2, attack="random")
    full = train.run(_cfg(tmp_path / "full", steps=4, attack="random"), dataset=DS)

    with pytest.raises(Crash):
        train.run(cfg, dataset=DS, on_step=crash_at(3))
    ck = tmp_path / "run" / "checkpoints"
    # what an interrupted orbax save leaves behind: a temporary folder that was never renamed
    junk = ck / "4.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "garbage").write_bytes(b"\x00" * 10)
    resumed = train.run(dataclasses.replace(cfg, resume=True), dataset=DS)
    np.testing.assert_array_equal(_flat(full.params), _flat(resumed.params))


def test_same_seed_identical_metrics(tmp_path):
    a = train.run(_cfg(tmp_path / "a", attack="gaussian", steps=3), dataset=DS)
    b = train.run(_cfg(tmp_path / "b", attack="gaussian", steps=3), dataset=DS)
    assert _lines(a.metrics_path) == _lines(b.metrics_path)
    c = train.run(_cfg(tmp_path / "c", attack="gaussian", steps=3, seed=1), dataset=DS)
    assert _lines(a.metrics_path) != _lines(c.metrics_path)


@pytest.mark.parametrize("layout", ["server", "sharded"])
def test_stragglers_are_treated_as_byzantine(tmp_path, layout):
    """drop_prob: missing rows arrive as NaN; FA drops them (ratio 0) and training stays finite."""
    res = train.run(
        _cfg(tmp_path, layout=layout, num_devices=8, attack="none", num_byzantine=3, drop_prob=0.3, steps=6),
        dataset=DS,
    )
    hist = res.history
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(res.params))
    dropped = sum(sum(1 for v in h["ratios"] if v == 0.0) for h in hist)
    assert dropped > 0
    assert any(h["status"] == 2 for h in hist)  # NONFINITE_INPUT reported
    mean = train.run(_cfg(tmp_path / "m", rule="mean", attack="none", drop_prob=0.3, steps=6), dataset=DS)
    assert not all(np.isfinite(h["loss"]) for h in mean.history[1:]) or not np.all(np.isfinite(_flat(mean.params)))


@pytest.mark.timeout(240)
def test_dead_peer_process_fails_fast(tmp_path):
    """Kill one of two processes mid-run: the other exits non-zero within a bounded time (no hang),
    saying that a peer died (--heartbeat-timeout=5 bounds the detection)."""
    write_idx_set(tmp_path / "data", n_train=400, n_test=40)
    port = free_port()
    cmd = _cli(tmp_path, tmp_path / "mp", "num_workers=4", "steps=100000", "eval_every=0")
    procs = [
        subprocess.Popen(
            cmd
            + [f"--coordinator=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}", "--heartbeat-timeout=5"],
            env=subprocess_env(2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        metrics = tmp_path / "mp" / "metrics.jsonl"
        t_end = time.time() + 120
        while time.time() < t_end and not (tmp_path / "mp").exists():
            time.sleep(0.2)
        time.sleep(8)  # both running steps
        assert procs[0].poll() is None and procs[1].poll() is None, "the run stopped before the fault"
        os.kill(procs[1].pid, signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert elapsed < 120
    del metrics
    # JAX's coordination service terminates the survivor with its own message (heartbeat timeout,
    # "another task died"); errors raised in Python instead are reported by the CLI as a peer failure
    assert "heartbeat" in err or "another task died" in err or "peer process" in err, err[-2000:]
