"""The trainer's parts, each alone and fast: LARS, parameter groups, the run lock, preemption, the log window."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from base.signals import ignore_stop_signals, stop_signals_held
from engine.model import ModelConfig, SimCLRNet
from engine.optim import LARS, param_groups, warmup_cosine
from engine.preemption import REQUEUE_MARKER, Preemption, clear_requeue, mark_requeue
from engine.runlock import LOCK, RunLock, RunLocked
from engine.runlog import Window, trackers
from engine.trainer import summary


def test_lars_matches_the_update_written_out() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = LARS([{"params": [w]}, {"params": [b], "lars": False, "weight_decay": 0.0}], lr=0.1, momentum=0.9,
               weight_decay=0.01, eta=0.02)
    gw, gb = torch.randn(5, 4), torch.randn(5)
    w0, b0 = w.detach().clone(), b.detach().clone()
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    g1 = gw + 0.01 * w0
    u1 = 0.02 * w0.norm() / g1.norm() * g1
    w1 = w0 - 0.1 * u1
    g2 = gw + 0.01 * w1
    u2 = 0.9 * u1 + 0.02 * w1.norm() / g2.norm() * g2
    assert torch.allclose(w.detach(), w1 - 0.1 * u2, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.1 * gb - 0.1 * (0.9 * gb + gb), atol=1e-6)


def test_param_groups_keep_biases_and_norms_out_of_decay() -> None:
    net = SimCLRNet(ModelConfig(arch="resnet18", proj_dims=[32, 16]))
    decay, plain = param_groups(net)
    assert all(p.dim() > 1 for p in decay) and all(p.dim() == 1 for p in plain)
    assert len(decay) + len(plain) == len(list(net.parameters()))


def test_warmup_then_cosine_to_zero() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 4, 12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5) and lrs[-1] < 0.05


# -- the run lock -----------------------------------------------------------------------------------

def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": socket.gethostname(), "pid": sleeper.pid, "start_ticks": None, "started": "then",
                  "slurm_job_id": None}
        (tmp_path / LOCK).write_text(json.dumps(record))
        with pytest.raises(RunLocked, match=f"pid {sleeper.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == sleeper.pid, "the holder's lock is untouched"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning, match="no longer running"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_on_another_host_is_kept_unless_it_is_the_same_slurm_job(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    other = {"host": "node-that-is-not-here", "pid": 1, "started": "then", "slurm_job_id": "4242"}
    (tmp_path / LOCK).write_text(json.dumps(other))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunLocked, match="SLURM job 4242"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto this node
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning):
        lock.acquire()
    lock.release()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    """Our own pid, but recorded with another start time: the recorded process is gone."""
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": -1}))
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning):
        lock.acquire()
    lock.release()


# -- preemption -------------------------------------------------------------------------------------

def test_one_process_stops_at_the_signalled_step(tmp_path: Path) -> None:
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        p = Preemption(world=1)
        assert not p.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert p.agreed() and p.all_true(True) and not p.all_true(False)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    mark_requeue(tmp_path, 12)
    assert json.loads((tmp_path / REQUEUE_MARKER).read_text()) == {"step": 12, "exit_code": 75}
    clear_requeue(tmp_path)
    assert not (tmp_path / REQUEUE_MARKER).exists()


class Pids(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield os.getpid()


def test_a_loader_worker_leaves_stop_signals_to_its_parent_but_ends_on_its_parents_sigterm() -> None:
    """A signal to the whole group reaches the workers too: they go on serving, and only the main process acts on
    it. SIGTERM from the parent itself still ends a worker: that is how multiprocessing ends one at exit."""
    import multiprocessing

    loader = torch.utils.data.DataLoader(Pids(), batch_size=None, num_workers=1, worker_init_fn=ignore_stop_signals)
    with stop_signals_held():
        batches = iter(loader)
    worker = next(batches)
    for sig in ("TERM", "INT", "USR1"):
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)  # sent by another process, as killpg does
    for _ in range(8):  # past the prefetched batches: made after the signals
        assert next(batches) == worker, "the worker still serves"
    (process,) = [p for p in multiprocessing.active_children() if p.pid == worker]
    os.kill(worker, signal.SIGTERM)
    process.join(timeout=60)
    assert process.exitcode == 0


# -- logging --------------------------------------------------------------------------------------

def test_the_window_leaves_paused_time_out_of_views_per_second() -> None:
    w = Window(torch.device("cpu"))
    for loss in (1.0, 3.0):
        w.add(torch.tensor(loss))
    time.sleep(0.05)
    with w.paused():
        time.sleep(0.3)
    s = w.summary(views_per_step=10)
    assert s["loss"] == pytest.approx(2.0)
    assert s["views_per_s"] > 20 / 0.2, "0.3 s of pause would have held it under 20 / 0.35"
    w.add(torch.tensor(float("nan")))
    w.reset()
    assert not bool(w.finite), "a non-finite loss is remembered across windows"


def test_trackers_name_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert trackers("none") == [] and trackers("tensorboard") == ["tensorboard"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        trackers("wandb")


def test_the_summary_names_the_step_of_each_figure() -> None:
    records = [{"step": 0, "epoch": 0, "eval_precision_at_1": 0.5, "eval_map_at_r": 0.1},
               {"step": 10, "epoch": 1, "loss": 4.0, "views_per_s": 10.0, "data_wait_frac": 0.1, "max_mem_gb": 1.0},
               {"step": 10, "epoch": 1, "eval_precision_at_1": 0.6},
               {"step": 15, "epoch": 1, "loss": 3.0, "views_per_s": 30.0, "data_wait_frac": 0.3, "max_mem_gb": 2.0},
               {"step": 15, "epoch": 1, "eval_precision_at_1": 0.7, "eval_map_at_r": 0.3}]
    text = summary(records, Path("run"))
    assert "4.0000 (step 10) -> 3.0000 (step 15)" in text
    assert "0.5000 (random init) -> 0.7000 (step 15)" in text and "0.1000 (random init) -> 0.3000 (step 15)" in text
    assert "20.0" in text and "20.0%" in text and "2.00 GB" in text
