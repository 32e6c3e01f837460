"""The script `./launch.sh slurm` writes, run for real with stand-ins for srun, scontrol, scancel and sbatch:
SIGUSR1 to the batch script reaches the trainers, the launcher survives it, and the job requeues itself."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import wait_for
from .probe_data import checker_split

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
    return checker_split(tmp_path_factory.mktemp("slurmdata"), 96, 4, per_shard=24)


def job_id_with_a_free_port() -> str:
    """A SLURM_JOB_ID whose port (10000 + id % 20000, as the script derives it) is free here."""
    for _ in range(200):
        job = random.randrange(1, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 10000 + job))
            except OSError:
                continue
        return str(job)
    raise AssertionError("no free port in 10000-29999")


def losses(run: Path) -> int:
    f = run / "metrics.jsonl"
    return sum('"loss"' in line for line in f.read_text().splitlines()) if f.exists() else 0


def run_job(tmp_path: Path, data: Path, gpus: int) -> tuple[int, str, str, Path, str]:
    """Generate the script, run it with the stubs, send SIGUSR1 to it once training runs; returns its exit
    status, the stubs' log, its output, the run folder and the job id."""
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
    job = job_id_with_a_free_port()
    env.update(PATH=f"{stubs}:{env['PATH']}", STUB_LOG=str(log), STUB_DIR=str(tmp_path), SLURM_JOB_ID=job,
               SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1", SLURM_NODEID="0", OMP_NUM_THREADS="1")
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
    return proc.returncode, log.read_text(), out, run, job


@pytest.mark.slow
def test_usr1_reaches_the_trainer_which_checkpoints_and_the_job_requeues(data: Path, tmp_path: Path) -> None:
    """One process (no launcher): the trainer's exit status 75 reaches the script, which requeues and removes
    the RUN/requeue.json the trainer also wrote."""
    status, log, out, run, job = run_job(tmp_path, data, gpus=1)
    assert f"scancel --signal=USR1 {job}" in log, log
    assert f"scontrol requeue {job}" in log, (log, out[-3000:])
    assert status == 75, out[-3000:]
    assert "preempted" in out and "exit status 75" in out
    assert list((run / "checkpoints").glob("step-*")), "the trainer saved a checkpoint before exiting"
    assert not (run / "requeue.json").exists(), "the script consumed the marker"


@pytest.mark.slow
def test_the_launcher_survives_usr1_and_both_trainers_stop(data: Path, tmp_path: Path) -> None:
    """Two CPU processes under `accelerate launch --multi_gpu`: USR1 reaches both trainers through the
    launcher, which ignores it and reports their failure as exit status 1 (accelerate does not pass 75
    through). The requeue then rests on RUN/requeue.json, written by the trainers' rank 0."""
    status, log, out, run, job = run_job(tmp_path, data, gpus=2)
    assert f"scancel --signal=USR1 {job}" in log, log
    assert status == 1, f"the launcher exits 1 for failed workers, not by the signal: {status}\n{out[-3000:]}"
    assert out.count("preempted: checkpoint saved") >= 1 and "exitcode  : 75" in out, out[-3000:]
    steps = {p.name for p in (run / "checkpoints").glob("step-*")}
    assert len(steps) == 1, f"both ranks stopped at the same step and saved it once: {steps}"
    assert "preempted (exit status 1): requeueing" in out, out[-2000:]
    assert f"scontrol requeue {job}" in log, (log, out[-2000:])
    assert not (run / "requeue.json").exists(), "the script consumed the marker"


def dry(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch.sh"), "slurm", *flags], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})


TRAIN = ["--", "--data", "/d", "--out", "/runs/r"]


def srun(script: str) -> list[str]:
    return next(line for line in script.splitlines() if line.startswith("srun ")).split()


def test_help_exits_0_and_names_every_option() -> None:
    r = dry("--help")
    assert r.returncode == 0 and r.stderr == ""
    for opt in ("--nodes", "--gpus-per-node", "--processes-per-node", "--cpus-per-node", "--time", "--signal-margin",
                "--partition", "--sbatch", "--dry-run"):
        assert f"\n  {opt} " in r.stdout, opt


def test_a_cpu_job_runs_its_processes_with_cpu_over_one_launcher() -> None:
    multi = dry("--gpus-per-node", "0", "--processes-per-node", "2", "--cpus-per-node", "8", "--dry-run", *TRAIN)
    assert multi.returncode == 0, multi.stderr
    assert "--gpus-per-node=" not in multi.stdout and "#SBATCH --cpus-per-task=8" in multi.stdout
    assert "--num_processes $((SLURM_NNODES * 2))" in multi.stdout
    assert srun(multi.stdout)[-3:] == ["/runs/r", "--cpu", "&"]
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}" in multi.stdout, "the node's CPUs shared by its processes"
    already = dry("--gpus-per-node", "0", "--dry-run", *TRAIN, "--cpu")
    assert srun(already.stdout).count("--cpu") == 1, "--cpu is added once"
    assert "exec \"$@\"' faceclr " in already.stdout and "/bin/python engine/train.py --resume auto" in already.stdout
    gpu = dry("--gpus-per-node", "4", "--dry-run", *TRAIN)
    assert "#SBATCH --gpus-per-node=4" in gpu.stdout and "--cpu" not in srun(gpu.stdout)
    assert "OMP_NUM_THREADS" not in gpu.stdout


def test_sbatch_options_pass_through_and_the_margin_is_the_signal_time() -> None:
    r = dry("--sbatch", "account=vision", "--sbatch", "--qos=high", "--sbatch", "mem 64G", "--partition", "gpu",
            "--dry-run", *TRAIN)
    assert r.returncode == 0, r.stderr
    header = [line for line in r.stdout.splitlines() if line.startswith("#SBATCH")]
    assert header[-3:] == ["#SBATCH --account=vision", "#SBATCH --qos=high", "#SBATCH --mem 64G"], header
    assert "#SBATCH --partition=gpu" in header and "#SBATCH --signal=B:USR1@180" in header
    assert "#SBATCH --signal=B:USR1@600" in dry("--signal-margin", "600", "--dry-run", *TRAIN).stdout
    first_command = r.stdout.splitlines().index(next(x for x in r.stdout.splitlines() if x.startswith("set ")))
    assert all(not x.startswith("#SBATCH") for x in r.stdout.splitlines()[first_command:]), "sbatch stops there"


def test_the_port_comes_from_the_job_id(tmp_path: Path) -> None:
    """Two jobs sharing a node listen on different ports (29500 for every job made the second one fail)."""
    script = dry("--nodes", "2", "--gpus-per-node", "1", "--dry-run", *TRAIN).stdout
    line = next(x for x in script.splitlines() if x.startswith("MASTER_PORT="))
    ports = [subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], capture_output=True, text=True,
                            env={"SLURM_JOB_ID": job}).stdout.strip() for job in ("41", "42", "20041")]
    assert ports == ["10041", "10042", "10041"], ports


def test_paths_with_spaces_and_shell_characters_stay_one_word(tmp_path: Path) -> None:
    out = str(tmp_path / "a b&c$d'e%f")
    r = dry("--dry-run", "--", "--data", "/d", "--out", out)
    assert r.returncode == 0, r.stderr
    assert f'#SBATCH --output="{out.replace("%", "%%")}/slurm-%j.out"' in r.stdout, "SLURM's %% is a literal %"
    (tmp_path / "job.sh").write_text(r.stdout)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    # the marker test of the script, run as it is written, finds the file in the folder with that name
    Path(out).mkdir()
    (Path(out) / "requeue.json").write_text("{}")
    check = next(x for x in r.stdout.splitlines() if "requeue.json ]]" in x)
    assert subprocess.run(["bash", "-c", f"status=1; {check} echo found; fi"], capture_output=True,
                          text=True).stdout == "found\n"


def test_a_missing_environment_is_a_warning_here_and_an_error_in_the_job(tmp_path: Path) -> None:
    venv = tmp_path / "no venv"
    r = dry("--dry-run", *TRAIN, env={"FACECLR_VENV": str(venv)})
    assert r.returncode == 0 and r.stdout.startswith("#!/usr/bin/env bash")
    assert r.stderr.startswith("faceclr: slurm: warning: ") and f"{venv}/bin/accelerate is missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    job = tmp_path / "job.sh"
    job.write_text(r.stdout)
    ran = subprocess.run(["bash", str(job)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert ran.returncode == 2 and "bin/accelerate is missing on" in ran.stderr, ran.stderr


@pytest.mark.parametrize("flags", [
    ["--gpus-per-node", "-1"], ["--gpus-per-node", "8", "--processes-per-node", "2"], ["--processes-per-node", "0"],
    ["--time", "1:2:3:4"], ["--time", "soon"], ["--signal-margin", "0"], ["--time", "5", "--signal-margin", "300"],
    ["--sbatch", "time=5"], ["--sbatch", "-o x"], ["--sbatch", "="], ["--frobnicate"],
])
def test_bad_options_are_one_line_and_exit_2(flags: list[str]) -> None:
    r = dry(*flags, "--dry-run", *TRAIN)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("faceclr: slurm: error: "), r.stderr


def test_bad_values_at_the_end_are_one_line_and_exit_2() -> None:
    for flags in (["--nodes"], ["--dry-run", "--", "--data", "/d", "--out", 'a"b']):
        r = dry(*flags)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, (flags, r)


def test_a_loader_worker_outlives_a_sigterm_from_outside_and_ends_on_its_trainers(data: Path) -> None:
    """SLURM's preemption signals every process of the job step, the DataLoader's workers too; torch's worker
    dies of a SIGTERM that its trainer did not send, and the trainer then fails on its next batch instead of
    saving its checkpoint. A SIGTERM from the trainer (torch's last resort when a worker does not stop) still
    ends it, or the trainer could wait on it for ever."""
    from engine.data.augment import AugmentConfig
    from engine.data.loader import LoaderConfig, TrainLoader

    loader = TrainLoader(data, AugmentConfig(size=16), LoaderConfig(backend="torch", batch_size=4, workers=2,
                                                                    initial_fill=8))
    earlier = set(children(os.getpid()))  # what earlier tests in this process left running is not ours
    batches = iter(loader)
    next(batches)
    workers = [pid for pid in children(os.getpid()) if pid not in earlier]
    assert len(workers) == 2, workers
    deadline = time.monotonic() + 60
    for pid in workers:  # once set up (worker_init_fn), each takes SIGTERM on a thread of its own
        wait_for(lambda pid=pid: blocks(pid, signal.SIGTERM), deadline - time.monotonic(),
                 f"worker {pid} to block SIGTERM", every=0.05)
        subprocess.run(["kill", "-TERM", str(pid)], check=True)  # from another process, as slurmstepd's
    assert len(list(batches)) == len(loader) - 1

    earlier = set(children(os.getpid()))
    batches = iter(loader)
    next(batches)
    workers = [pid for pid in children(os.getpid()) if pid not in earlier]
    for pid in workers:
        wait_for(lambda pid=pid: blocks(pid, signal.SIGTERM), deadline - time.monotonic(),
                 f"worker {pid} to block SIGTERM", every=0.05)
        os.kill(pid, signal.SIGTERM)
    for pid in workers:
        wait_for(lambda pid=pid: ended(pid), deadline - time.monotonic(),
                 f"worker {pid} to end after its trainer's SIGTERM", every=0.05)
    del batches


def ended(pid: int) -> bool:
    """Gone, or a zombie (exited, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def in_mask(pid: int, field: str, sig: int) -> bool:
    """`sig` is in the process's signal set `field` of /proc/PID/status (SigBlk: blocked, SigCgt: caught)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1], 16)
    return bool(mask >> (sig - 1) & 1)


def blocks(pid: int, sig: int) -> bool:
    return in_mask(pid, "SigBlk", sig)


def catches(pid: int, sig: int) -> bool:
    """A handler is set: the SGE script sets its trap only after it starts the trainer, and a warning before that
    would end the script (bash's default for SIGUSR1)."""
    return in_mask(pid, "SigCgt", sig)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def sge_block() -> str:
    """The SGE script docs/training.md gives ("Running on SGE"), as a user copies it."""
    page = (ROOT / "docs" / "training.md").read_text()
    return re.search(r"The SGE equivalent.*?```bash\n(.*?)```", page, re.DOTALL).group(1)


def test_the_documented_sge_script_parses_and_asks_for_what_the_trainer_catches(tmp_path: Path) -> None:
    """No SGE here: bash's syntax check, qsub's option shapes, and the limits it asks for (s_rt, whose warning
    is SIGUSR1, below h_rt)."""
    script = tmp_path / "job.sh"
    script.write_text(sge_block())
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    words = [w for line in sge_block().splitlines() if line.startswith("#$ ") for w in line[3:].split()]
    options = [w for w in words if w.startswith("-")]
    assert set(options) <= {"-N", "-cwd", "-l", "-pe", "-r", "-j", "-o", "-e"}, options
    limits = dict(kv.split("=") for w in words if "h_rt=" in w for kv in w.split(","))
    assert seconds(limits["s_rt"]) < seconds(limits["h_rt"]), limits
    assert "--resume auto" in sge_block() and "-eq 75 ] && exit 99" in sge_block()


def seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return (h * 60 + m) * 60 + s


STAND_IN_TRAINER = """#!/usr/bin/env bash
# a trainer that saves for a moment on SIGUSR1 and exits 75, or exits with $EXIT_CODE when told to finish
trap 'sleep 0.5; exit 75' USR1
echo "$$" > started
while [[ ! -e finish ]]; do sleep 0.05; done
exit "${EXIT_CODE:-0}"
"""


@pytest.mark.parametrize("to_group", [False, True], ids=["script", "process group"])
def test_the_documented_sge_script_requeues_on_the_warning(tmp_path: Path, to_group: bool) -> None:
    """SGE's s_rt warning, to the job script or to its whole process group: the trainer gets one SIGUSR1 or
    two, saves, exits 75, and the script exits 99 (requeue)."""
    proc = run_sge(tmp_path)
    try:
        wait_for(lambda: (tmp_path / "started").exists() and catches(proc.pid, signal.SIGUSR1), 60,
                 "the script's trainer to start and its USR1 trap", every=0.05)
        if to_group:
            os.killpg(proc.pid, signal.SIGUSR1)
        else:
            os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(60) == 99
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("code", [0, 3])
def test_the_documented_sge_script_passes_other_exit_codes_through(tmp_path: Path, code: int) -> None:
    proc = run_sge(tmp_path, EXIT_CODE=str(code))
    try:
        wait_for(lambda: (tmp_path / "started").exists(), 60, "the script's trainer to start", every=0.05)
        (tmp_path / "finish").touch()
        assert proc.wait(60) == code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_sge(tmp_path: Path, **env: str) -> subprocess.Popen:
    """The documented SGE script in a folder whose .venv/bin/python is a stand-in trainer."""
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    trainer = tmp_path / ".venv" / "bin" / "python"
    trainer.write_text(STAND_IN_TRAINER)
    trainer.chmod(0o755)
    (tmp_path / "job.sh").write_text(sge_block())
    return subprocess.Popen(["bash", "job.sh"], cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path), **env},
                            start_new_session=True)


