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
  slurm ...  write and submit a SLURM job: slurm [--nodes N] [--gpus-per-node G] [--time T] [--sbatch OPT]
             [--dry-run] -- TRAIN_FLAGS  (requeues itself on preemption; slurm --help for every option)
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
        PYTHONPATH="$ROOT" "$PY" -m engine.bench.wheelhouse "$wheelhouse" --install --editable
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

slurm_usage() {
    cat <<'EOF'
usage: ./launch.sh slurm [OPTIONS] -- TRAIN_FLAGS

Writes RUN/job.sbatch (RUN: the --out among TRAIN_FLAGS) from launch/slurm.sbatch and submits it with
sbatch. The job checkpoints and requeues itself before its time limit (SIGUSR1) and on preemption
(SIGTERM to its processes), and resumes where it stopped (--resume auto).

  --nodes N               nodes (default 1)
  --gpus-per-node G       GPUs per node, one training process each (default 8); 0: a CPU job, whose
                          trainers run --cpu and talk over gloo
  --processes-per-node P  training processes per node of a CPU job (default 1)
  --cpus-per-node C       CPUs per node (default 32)
  --time T                time limit in any of SLURM's forms: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN,
                          D-H:MIN:SEC (default 24:00:00)
  --signal-margin S       seconds before the limit at which SLURM signals the job (default 180: time
                          for a checkpoint)
  --partition P           partition
  --sbatch OPT            any other #SBATCH option, repeatable: --sbatch account=x --sbatch qos=high
                          --sbatch mem=64G
  --dry-run               print the script; submit nothing
  -h, --help              this text

example: ./launch.sh slurm --nodes 4 --gpus-per-node 8 --time 24:00:00 --sbatch account=vision -- \
             --config configs/simclr-r50-224.toml --data /data/shards --out /scratch/run
EOF
}

slurm_seconds() {
    # SLURM's --time forms as seconds; fails on anything else.
    local t="$1" d=0 h=0 m=0 s=0
    if [[ "$t" =~ ^([0-9]+)-([0-9]+)(:([0-9]+)(:([0-9]+))?)?$ ]]; then
        d="${BASH_REMATCH[1]}" h="${BASH_REMATCH[2]}" m="${BASH_REMATCH[4]:-0}" s="${BASH_REMATCH[6]:-0}"
    elif [[ "$t" =~ ^([0-9]+)$ ]]; then
        m="${BASH_REMATCH[1]}"
    elif [[ "$t" =~ ^([0-9]+):([0-9]+)$ ]]; then
        m="${BASH_REMATCH[1]}" s="${BASH_REMATCH[2]}"
    elif [[ "$t" =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        h="${BASH_REMATCH[1]}" m="${BASH_REMATCH[2]}" s="${BASH_REMATCH[3]}"
    else
        return 1
    fi
    echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

slurm() {
    local nodes=1 gpus=8 procs="" cpus=32 time="24:00:00" margin=180 partition="" dry=0
    local extra=() opt name
    local fail="faceclr: slurm: error:"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h|--help) slurm_usage; return 0 ;;
            --dry-run) dry=1; shift; continue ;;
            --) shift; break ;;
            --nodes|--gpus-per-node|--processes-per-node|--cpus-per-node|--time|--signal-margin|--partition|--sbatch)
                if [[ $# -lt 2 ]]; then echo "$fail $1 needs a value (./launch.sh slurm --help)" >&2; exit 2; fi ;;
            *) echo "$fail unknown option '$1' (training flags go after --; ./launch.sh slurm --help)" >&2; exit 2 ;;
        esac
        case "$1" in
            --nodes) nodes="$2" ;;
            --gpus-per-node) gpus="$2" ;;
            --processes-per-node) procs="$2" ;;
            --cpus-per-node) cpus="$2" ;;
            --time) time="$2" ;;
            --signal-margin) margin="$2" ;;
            --partition) partition="$2" ;;
            --sbatch)
                opt="$2"
                [[ "$opt" == -* ]] || opt="--$opt"
                name="${opt#--}"
                name="${name%%[= ]*}"
                case "$name" in
                    nodes|N|-N|ntasks-per-node|gpus-per-node|cpus-per-task|c|-c|time|t|-t|signal|requeue|no-requeue|\
                    open-mode|output|o|-o|partition|p|-p)
                        echo "$fail --sbatch $2: launch.sh sets that one (use its own option; ./launch.sh slurm --help)" >&2
                        exit 2 ;;
                esac
                if [[ -z "$name" || "$opt" == *$'\n'* ]]; then
                    echo "$fail --sbatch '$2' is not an sbatch option (e.g. --sbatch account=x)" >&2
                    exit 2
                fi
                extra+=("#SBATCH $opt") ;;
        esac
        shift 2
    done
    if ! [[ "$nodes" =~ ^[1-9][0-9]*$ && "$gpus" =~ ^[0-9]+$ && "$cpus" =~ ^[1-9][0-9]*$ ]]; then
        echo "$fail --nodes and --cpus-per-node take positive integers, --gpus-per-node a count (0: CPU job)" >&2
        exit 2
    fi
    if [[ -n "$procs" ]] && ! [[ "$procs" =~ ^[1-9][0-9]*$ ]]; then
        echo "$fail --processes-per-node takes a positive integer, got '$procs'" >&2
        exit 2
    fi
    if [[ -n "$procs" && "$gpus" -gt 0 && "$procs" != "$gpus" ]]; then
        echo "$fail --processes-per-node is for CPU jobs (a GPU job runs one process per GPU; --gpus-per-node 0 for CPUs)" >&2
        exit 2
    fi
    procs="${procs:-$(( gpus > 0 ? gpus : 1 ))}"
    local limit
    if ! limit="$(slurm_seconds "$time")"; then
        echo "$fail --time '$time' is not a SLURM time (MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN or D-H:MIN:SEC)" >&2
        exit 2
    fi
    if ! [[ "$margin" =~ ^[0-9]+$ ]] || (( margin < 1 || margin >= limit )); then
        echo "$fail --signal-margin takes whole seconds below the time limit ($limit s), got '$margin'" >&2
        exit 2
    fi
    local out="" cpu_flag=0 args=("$@") i
    for ((i = 0; i < ${#args[@]}; i++)); do
        case "${args[$i]}" in
            --out) out="${args[$((i + 1))]:-}" ;;
            --out=*) out="${args[$i]#--out=}" ;;
            --cpu) cpu_flag=1 ;;
        esac
    done
    if [[ -z "$out" ]]; then
        echo "$fail pass the training flags after --, including --data and --out" >&2
        exit 2
    fi
    if [[ "$out" == *[\"$'\n']* ]]; then
        echo "$fail --out '$out': SLURM cannot take a double quote or a newline in the log path (rename it)" >&2
        exit 2
    fi
    if (( gpus == 0 && cpu_flag == 0 )); then
        args+=(--cpu)
    fi
    [[ -n "$partition" ]] && extra=("#SBATCH --partition=$partition" "${extra[@]}")
    (( gpus > 0 )) && extra=("#SBATCH --gpus-per-node=$gpus" "${extra[@]}")
    local bin program exports=""
    if (( nodes * procs == 1 )); then
        # One process needs no launcher, and accelerate refuses --multi_gpu with one.
        bin="$VENV/bin/python"
        program='trap "" USR1 TERM; exec "$@"'
    else
        bin="$VENV/bin/accelerate"
        program='trap "" USR1 TERM; PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT exec "$1" launch --multi_gpu'
        program+=' --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * '"$procs"'))'
        program+=' --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"'
        program+=' "${@:2}"'
    fi
    if (( gpus == 0 )); then
        exports=" OMP_NUM_THREADS=\${OMP_NUM_THREADS:-$(( cpus / procs > 0 ? cpus / procs : 1 ))}"
    fi
    if [[ ! -x "$bin" ]]; then
        echo "faceclr: slurm: warning: $bin is missing here; the job needs it on its nodes (./launch.sh setup, or FACECLR_VENV=... naming an environment the nodes see)" >&2
    fi
    local more=""
    (( ${#extra[@]} )) && more="$(printf '%s\n' "${extra[@]}")"$'\n'
    local log="${out//%/%%}/slurm-%j.out" script
    script="$(cat "$ROOT/launch/slurm.sbatch")"
    local -A fill=(
        [NODES]="$nodes" [CPUS]="$cpus" [TIME]="$time" [MARGIN]="$margin"
        [PROCS]="$procs training process$( (( procs > 1 )) && echo es)"
        [OUTPUT]="\"$log\"" [ROOT]="$(printf '%q' "$ROOT")" [BIN]="$(printf '%q' "$bin")"
        [OUT]="$(printf '%q' "$out")" [PROGRAM]="'$program'" [EXPORTS]="$exports"
        [COMMAND]="engine/train.py --resume auto$(printf ' %q' "${args[@]}")"
    )
    script="${script//"{{MORE_SBATCH}}"$'\n'/"$more"}"
    for name in NODES CPUS TIME MARGIN PROCS OUTPUT ROOT BIN OUT PROGRAM EXPORTS COMMAND; do  # flags last
        script="${script//"{{$name}}"/"${fill[$name]}"}"
    done
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
        # The login node's python, which may have no torch: the module needs only the standard library.
        PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${FACECLR_PYTHON:-python3}" -m engine.bench.wheelhouse "$@"
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
