#!/usr/bin/env bash
# faceclr's single entry point: set up, test, demo, and every tool the project ships.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FACECLR_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# The CUDA build of torch that this workplace keeps on disk; elsewhere pip takes torch from setup.cfg.
TORCH_SPEC="${FACECLR_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.faceclr-setup"

usage() {
    cat <<'EOF'
usage: ./launch.sh VERB [ARGS...]

  setup      create .venv if missing and install faceclr with its dev tools (idempotent)
  test       setup, then ruff check and the pytest suite (fails on no tests)
  demo       setup, then the first run end to end on a synthetic dataset
  synth ...  python -m pack.synth ...   (synthetic IMDb-WIKI download)
  pack ...   python -m pack ...         (filtered WebDataset shards)
  train ...  accelerate launch engine/train.py ...
  eval ...   python -m engine.evaluate ...
  bench ...  python -m engine.bench ...  (also: bench kernels ..., bench pack ...)
  help       this text

Environment: FACECLR_VENV (default .venv), FACECLR_TORCH_SPEC (torch to install
when the venv has none; default "torch==2.14.1 torchvision==0.29.1").
EOF
}

setup_hash() {
    cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1
}

setup() {
    if [[ ! -x "$PY" ]]; then
        echo "faceclr: creating $VENV"
        python3 -m venv "$VENV"
    fi
    local want
    want="$(setup_hash)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$PY" -c "import torch, pack, engine, kernels" 2>/dev/null; then
        echo "faceclr: environment up to date ($VENV)"
        return 0
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "faceclr: installing $TORCH_SPEC"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q $TORCH_SPEC
    fi
    echo "faceclr: installing faceclr[dev] (editable)"
    "$PY" -m pip install -q -e ".[dev]"
    echo "$want" > "$STAMP"
}

demo() {
    # Each stage reuses its output when it is already complete, so a re-run redoes nothing.
    local dir="${FACECLR_DEMO_DIR:-$ROOT/data/demo}"
    "$PY" -m pack.synth --out "$dir/raw" --identities 120 --tar "$@"
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
        # pytest exits 5 when it collects nothing: that is a failure here, as any non-zero code.
        "$PY" -m pytest "$@"
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
        exec "$VENV/bin/accelerate" launch engine/train.py "$@"
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
    help|-h|--help)
        usage
        ;;
    *)
        echo "faceclr: unknown verb '$verb'" >&2
        usage >&2
        exit 2
        ;;
esac
