#!/usr/bin/env bash
# faceclr's single entry point: set up, test, demo, and every tool the project ships.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
# The environment: FACECLR_VENV if set; else the active virtualenv or conda environment when it has torch >= 2.11
# (a cluster's module torch, a conda install: used as it is, never rebuilt); else .venv here, built on first use.
TORCH_OK='import sys; from importlib.metadata import version; v = version("torch").split("+")[0].split(".")
sys.exit(tuple(map(int, v[:2])) < (2, 11))'
ACTIVE="${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
if [[ -n "${FACECLR_VENV:-}" ]]; then
    VENV="$FACECLR_VENV"
elif [[ -n "$ACTIVE" && -x "$ACTIVE/bin/python" ]] && "$ACTIVE/bin/python" -c "$TORCH_OK" 2>/dev/null; then
    VENV="$ACTIVE"
else
    VENV="$ROOT/.venv"
fi
PY="$VENV/bin/python"
# The CUDA build of torch that this workplace keeps on disk; elsewhere pip takes torch from setup.cfg.
TORCH_SPEC="${FACECLR_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.faceclr-setup"

usage() {
    cat <<'EOF'
usage: ./launch.sh VERB [ARGS...]

  setup      install faceclr with its dev tools into the environment (below; idempotent)
  test       setup, then ruff check and the pytest suite (fails on no tests); test --fast: the unit
             tier only (no training subprocesses, no multi-process runs)
  demo       setup, then the first run end to end on a synthetic dataset
  synth ...  python -m pack.synth ...   (synthetic IMDb-WIKI download)
  pack ...   python -m pack ...         (filtered WebDataset shards)
  train ...  accelerate launch [ACCELERATE_FLAGS --] engine/train.py TRAIN_FLAGS
  slurm ...  write and submit a multi-node SLURM job: slurm --nodes N --gpus-per-node G [--time T]
             [--partition P] [--dry-run] -- TRAIN_FLAGS  (requeues itself on preemption, exit code 75)
  eval ...   python -m engine.evaluate ...
  bench ...  python -m engine.bench ...  (also: bench kernels ..., bench pack ...)
  gpu-check  on a GPU machine, with its own python3 (no venv, no network): GPU tests and every
             benchmark, within 6 minutes (9 with DALI), each stage killed whole at its budget, rows in
             bench_results/gpu/ as they are measured, a short table last; --dry-run [--json PLAN] prints
             the stages, budgets and skips; --only STAGE,... reruns some
  wheelhouse DIR [--python 3.12] [--without dali] [--dry-run]
             on a machine with network: download every wheel an offline GPU node needs beyond its torch
  help       this text

Environment: FACECLR_VENV (default: the active virtualenv or conda environment if it has torch >= 2.11, else
.venv), FACECLR_TORCH_SPEC (torch to install
when the venv has none; default "torch==2.14.1 torchvision==0.29.1"), FACECLR_PYTHON (the python
gpu-check and wheelhouse run; default python3), FACECLR_WHEELHOUSE=DIR (setup and gpu-check install
what DIR holds with no index: offline; setup then reuses the node's own torch).
EOF
}

setup_hash() {
    cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1
}

setup() {
    local wheelhouse="${FACECLR_WHEELHOUSE:-}"
    if [[ -n "$ACTIVE" && "$VENV" == "$ROOT/.venv" && "$ACTIVE" != "$VENV" ]]; then
        echo "faceclr: the active environment $ACTIVE has no torch >= 2.11; using $VENV"
    elif [[ "$VENV" == "$ACTIVE" ]]; then
        echo "faceclr: using the active environment $VENV"
    fi
    if [[ ! -x "$PY" ]]; then
        echo "faceclr: creating $VENV"
        if [[ -n "$wheelhouse" ]]; then  # offline: the node's own CUDA torch stays visible in the venv
            "${FACECLR_PYTHON:-python3}" -m venv --system-site-packages "$VENV"
        else
            python3 -m venv "$VENV"
        fi
    fi
    local want
    want="$(setup_hash)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$PY" -c "import torch, pack, engine, kernels" 2>/dev/null; then
        echo "faceclr: environment up to date ($VENV)"
        return 0
    fi
    if [[ -n "$wheelhouse" ]]; then
        if ! "$PY" -c "import torch" 2>/dev/null; then
            echo "faceclr: error: $PY cannot import torch (offline setup uses the node's own torch: create the venv from a python that has it, FACECLR_PYTHON=...)" >&2
            exit 2
        fi
        echo "faceclr: installing what the wheelhouse $wheelhouse holds, then faceclr (no index)"
        "$PY" engine/bench/wheelhouse.py "$wheelhouse" --install --editable
        echo "$want" > "$STAMP"
        return 0
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "faceclr: installing $TORCH_SPEC"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q $TORCH_SPEC
    fi
    echo "faceclr: installing faceclr[dev] (editable)"
    # the environment's torch stays what it is: nothing faceclr needs may replace it (torchvision, say)
    "$PY" -m pip install -q -e ".[dev]" -c <("$PY" -c 'from importlib.metadata import version; print("torch==" + version("torch"))')
    echo "$want" > "$STAMP"
}

demo() {
    # The whole path on a synthetic download, sized for a 2-core CPU in minutes; every stage reuses its
    # finished output, so a re-run redoes nothing. FACECLR_DEMO_DIR moves it; FACECLR_DEMO_STEPS sets the
    # training length.
    local dir="${FACECLR_DEMO_DIR:-$ROOT/data/demo}" steps="${FACECLR_DEMO_STEPS:-300}"
    local device_flags=(--cpu)
    if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        device_flags=(--image-size 96 --batch-size 256 --workers 4 --precision auto)
    fi
    echo "== 1/4 synthetic IMDb-WIKI download -> $dir/raw"
    "$PY" -m pack.synth --out "$dir/raw" --identities 120 --tar --no-progress
    echo "== 2/4 pack: filter, resize to 96 px, shard -> $dir/shards"
    "$PY" -m pack --src "$dir/raw/imdb_crop" --out "$dir/shards" --size 96 --min-images 20 \
        --eval-identities 0.3 --no-progress
    echo "== 3/4 train SimCLR for $steps steps -> $dir/run"
    if [[ -f "$dir/run/backbone.safetensors" ]]; then
        echo "faceclr: reusing the trained run in $dir/run"
    else
        "$PY" engine/train.py --config configs/demo.toml --data "$dir/shards" --out "$dir/run" \
            "${device_flags[@]}" --max-steps "$steps"
    fi
    echo "== 4/4 evaluate on held-out identities -> $dir/eval"
    "$PY" -m engine.evaluate --data "$dir/shards" --checkpoint "$dir/run" --out "$dir/eval" --workers 2
}

slurm() {
    local nodes=1 gpus=8 time="24:00:00" partition="" dry=0 cpus=32
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nodes) nodes="$2"; shift 2 ;;
            --gpus-per-node) gpus="$2"; shift 2 ;;
            --cpus-per-node) cpus="$2"; shift 2 ;;
            --time) time="$2"; shift 2 ;;
            --partition) partition="$2"; shift 2 ;;
            --dry-run) dry=1; shift ;;
            --) shift; break ;;
            *) echo "faceclr: slurm: error: unknown option '$1' (training flags go after --)" >&2; exit 2 ;;
        esac
    done
    if ! [[ "$nodes" =~ ^[1-9][0-9]*$ && "$gpus" =~ ^[1-9][0-9]*$ && "$cpus" =~ ^[1-9][0-9]*$ ]]; then
        echo "faceclr: slurm: error: --nodes, --gpus-per-node and --cpus-per-node take positive integers" >&2
        exit 2
    fi
    local out=""
    local args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do
        [[ "${args[$i]}" == "--out" ]] && out="${args[$((i + 1))]:-}"
    done
    if [[ -z "$out" ]]; then
        echo "faceclr: slurm: error: pass the training flags after --, including --data and --out" >&2
        exit 2
    fi
    local train_args script launcher
    train_args="$(printf '%q ' "$@")"
    if (( nodes * gpus == 1 )); then
        # One process needs no launcher, and accelerate refuses --multi_gpu with one.
        launcher="@VENV@/bin/python engine/train.py"
    else
        launcher='@VENV@/bin/accelerate launch --multi_gpu \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * @GPUS@)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    engine/train.py'
    fi
    script="$(cat <<'EOS'
#!/usr/bin/env bash
#SBATCH --job-name=faceclr
#SBATCH --nodes=@NODES@
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=@GPUS@
#SBATCH --cpus-per-task=@CPUS@
#SBATCH --time=@TIME@
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --output=@OUT_RAW@/slurm-%j.out
@PARTITION@
# Written by ./launch.sh slurm. One task per node starts @GPUS@ training processes.
# 180 s before the time limit SLURM sends SIGUSR1 to this script only (B:); the trap passes it to every
# process of the job step (scancel signals the step's processes, not this script). The launcher ignores
# it (trap '' USR1 before exec): torch elastic handles TERM, INT, HUP and QUIT but not USR1, whose default
# action would kill it. The trainers catch it, save a checkpoint and exit with 75; as accelerate reports
# any failed worker as exit status 1, the trainers' rank 0 also writes RUN/requeue.json. Either one
# requeues the job, which resumes from the checkpoint (--resume auto).
set -uo pipefail
cd @ROOT@
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
trap 'scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec @LAUNCHER@ --resume auto @ARGS@' &
pid=$!
wait "$pid"
status=$?
while kill -0 "$pid" 2>/dev/null; do  # woken by the trap while the step saves its checkpoint: wait again
    wait "$pid"
    status=$?
done
if [[ $status -gt 128 ]]; then  # the step ended as the trap woke us: its own status, which bash kept
    wait "$pid"
    status=$?
fi
if [[ $status -eq 75 || -f @OUT@/requeue.json ]]; then
    rm -f @OUT@/requeue.json
    echo "faceclr: preempted (exit status $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
EOS
)"
    script="${script//@LAUNCHER@/$launcher}"
    script="${script//@NODES@/$nodes}"
    script="${script//@GPUS@/$gpus}"
    script="${script//@CPUS@/$cpus}"
    script="${script//@TIME@/$time}"
    script="${script//@OUT_RAW@/$out}"
    script="${script//@OUT@/$(printf '%q' "$out")}"
    script="${script//@ROOT@/$(printf '%q' "$ROOT")}"
    script="${script//@VENV@/$(printf '%q' "$VENV")}"
    script="${script//@ARGS@/$train_args}"
    script="${script//@PARTITION@/${partition:+#SBATCH --partition=$partition}}"
    if [[ $dry -eq 1 ]]; then
        echo "$script"
        return 0
    fi
    mkdir -p "$out"
    echo "$script" > "$out/job.sbatch"
    sbatch "$out/job.sbatch"
}

run_module() {
    local module="$1"; shift
    if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null; then
        echo "faceclr: '$module' is not part of this checkout yet" >&2
        exit 2
    fi
    exec "$PY" -m "$module" "$@"
}

verb="${1:-help}"
[[ $# -gt 0 ]] && shift

case "$verb" in
    setup)
        setup
        ;;
    test)
        setup
        "$VENV/bin/ruff" check .
        # --fast: the unit tier only (no subprocess training, no multi-process runs; under 5 minutes).
        # pytest exits 5 when it collects nothing: that is a failure here, as any non-zero code.
        pytest_args=()
        for arg in "$@"; do
            if [[ "$arg" == "--fast" ]]; then pytest_args+=(-m "not slow"); else pytest_args+=("$arg"); fi
        done
        "$PY" -m pytest ${pytest_args[@]+"${pytest_args[@]}"}
        ;;
    demo)
        setup
        demo "$@"
        ;;
    synth)
        setup
        run_module pack.synth "$@"
        ;;
    pack)
        setup
        run_module pack "$@"
        ;;
    train)
        setup
        # ./launch.sh train [ACCELERATE_FLAGS --] TRAIN_FLAGS
        launch_args=()
        if [[ " $* " == *" -- "* ]]; then
            while [[ $# -gt 0 && "$1" != "--" ]]; do launch_args+=("$1"); shift; done
            shift
        fi
        exec "$VENV/bin/accelerate" launch "${launch_args[@]}" engine/train.py "$@"
        ;;
    slurm)
        slurm "$@"
        ;;
    eval)
        setup
        run_module engine.evaluate "$@"
        ;;
    bench)
        setup
        case "${1:-}" in
            kernels) shift; run_module kernels.bench "$@" ;;
            pack) shift; run_module pack.bench "$@" ;;
            *) run_module engine.bench "$@" ;;
        esac
        ;;
    gpu-check)
        PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${FACECLR_PYTHON:-python3}" -m engine.bench.gpu_check "$@"
        ;;
    wheelhouse)
        # A script, not a module: the login node's python may have no torch (engine/__init__ imports it).
        exec "${FACECLR_PYTHON:-python3}" engine/bench/wheelhouse.py "$@"
        ;;
    help|-h|--help)
        usage
        ;;
    *)
        echo "faceclr: unknown verb '$verb'" >&2
        usage >&2
        exit 2
        ;;
esac
