"""The script `./launch.sh slurm` writes, run for real with stand-ins for srun, scontrol, scancel and sbatch:
SIGUSR1 to the batch script reaches the trainers, the launcher survives it, and the job requeues itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .probe_data import checker_image, write_split

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]
TINY = ["--cpu", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--proj-dims", "32,16",
        "--workers", "1", "--eval-every", "0", "--log-every", "1", "--precision", "fp32", "--optimizer", "adamw",
        "--lr", "0.01", "--warmup-epochs", "0.2", "--loader", "torch", "--epochs", "50", "--ckpt-every", "0"]

STUBS = {
    # the pid file lets scancel find the step's task
    "srun": """#!/usr/bin/env bash
while [[ "${1:-}" == --* ]]; do shift; done
echo "srun $*" >> "$STUB_LOG"
echo $$ > "$STUB_DIR/step.pid"
exec "$@"
""",
    # `scancel --signal=SIG JOB` signals every process of the job's steps, not the batch script. slurmstepd
    # finds them by cgroup (proctrack/cgroup), so processes in their own session, as torch elastic starts its
    # workers, are reached too: here, every descendant of the task.
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$STUB_LOG"
sig=TERM
for a in "$@"; do [[ "$a" == --signal=* ]] && sig="${a#--signal=}"; done
tree() { echo "$1"; for c in $(ps -e -o pid= -o ppid= | awk -v p="$1" '$2 == p {print $1}'); do tree "$c"; done; }
kill -s "$sig" $(tree "$(cat "$STUB_DIR/step.pid")") 2>/dev/null
exit 0
""",
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
[[ "$1 $2" == "show hostnames" ]] && echo localhost
exit 0
""",
    "sbatch": """#!/usr/bin/env bash
echo "sbatch $*" >> "$STUB_LOG"
""",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurmdata")
    write_split(root, [checker_image(32, cell=2 + i % 4, seed=i) for i in range(96)], [i % 4 for i in range(96)],
                "train", per_shard=24)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> int:
    f = run / "metrics.jsonl"
    return sum('"loss"' in line for line in f.read_text().splitlines()) if f.exists() else 0


def run_job(tmp_path: Path, data: Path, gpus: int) -> tuple[int, str, str, Path]:
    """Generate the script, run it with the stubs, send SIGUSR1 to it once training runs; returns its exit
    status, the stubs' log, its output and the run folder."""
    run = tmp_path / "run"
    env = {**os.environ, "FACECLR_VENV": str(VENV)}
    script = subprocess.run([str(ROOT / "launch.sh"), "slurm", "--nodes", "1", "--gpus-per-node", str(gpus),
                             "--dry-run", "--", "--data", str(data), "--out", str(run), *TINY],
                            capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
    (tmp_path / "job.sbatch").write_text(script)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "stubs.log"
    log.write_text("")
    run.mkdir()
    env.update(PATH=f"{stubs}:{env['PATH']}", STUB_LOG=str(log), STUB_DIR=str(tmp_path), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1", SLURM_NODEID="0", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and losses(run) < 3 and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert losses(run) >= 3, "training did not start in time"
        os.kill(proc.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` does
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text(), out, run


@pytest.mark.slow
def test_usr1_reaches_the_trainer_which_checkpoints_and_the_job_requeues(data: Path, tmp_path: Path) -> None:
    """One process (no launcher): the trainer's exit status 75 reaches the script, which requeues and removes
    the RUN/requeue.json the trainer also wrote."""
    status, log, out, run = run_job(tmp_path, data, gpus=1)
    assert "scancel --signal=USR1 4242" in log, log
    assert "scontrol requeue 4242" in log, (log, out[-3000:])
    assert status == 75, out[-3000:]
    assert "preempted" in out and "exit status 75" in out
    assert list((run / "checkpoints").glob("step-*")), "the trainer saved a checkpoint before exiting"
    assert not (run / "requeue.json").exists(), "the script consumed the marker"


@pytest.mark.slow
def test_the_launcher_survives_usr1_and_both_trainers_stop(data: Path, tmp_path: Path) -> None:
    """Two CPU processes under `accelerate launch --multi_gpu`: USR1 reaches both trainers through the
    launcher, which ignores it and reports their failure as exit status 1 (accelerate does not pass 75
    through). The requeue then rests on RUN/requeue.json, written by the trainers' rank 0."""
    status, log, out, run = run_job(tmp_path, data, gpus=2)
    assert "scancel --signal=USR1 4242" in log, log
    assert status == 1, f"the launcher exits 1 for failed workers, not by the signal: {status}\n{out[-3000:]}"
    assert out.count("preempted: checkpoint saved") >= 1 and "exitcode  : 75" in out, out[-3000:]
    steps = {p.name for p in (run / "checkpoints").glob("step-*")}
    assert len(steps) == 1, f"both ranks stopped at the same step and saved it once: {steps}"
    assert "preempted (exit status 1): requeueing" in out, out[-2000:]
    assert "scontrol requeue 4242" in log, (log, out[-2000:])
    assert not (run / "requeue.json").exists(), "the script consumed the marker"
