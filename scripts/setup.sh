#!/usr/bin/env bash
# Set up prisma-ext for development in .venv at the repository root, from nothing.
#
#   bash scripts/setup.sh            # creates .venv if missing, installs torch + prisma-ext[dev]
#   bash scripts/setup.sh --test     # the same, plus Debian's chromium for the report test
#   SETUP_FORCE=1 bash scripts/setup.sh   # reinstall even if nothing changed
#
# Idempotent: the heavy install is skipped while .venv/.setup-stamp is newer than pyproject.toml.
# Needs python3 >= 3.10 with the venv module (Debian/Ubuntu: apt-get install python3-venv).
# --test installs chromium with apt-get when it is missing (as root; otherwise it says what to run).
set -euo pipefail

want_test=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) printf 'setup: error: unknown option %s (known: --test)\n' "$arg" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.setup-stamp"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

log() { printf 'setup: %s\n' "$*" >&2; }

# The report test opens the HTML report in headless Chromium (Debian's package).
install_chromium() {
    if command -v chromium >/dev/null 2>&1; then
        log "chromium: $(command -v chromium)"
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then
        log "error: chromium is missing; install it as root: apt-get update && apt-get install -y chromium"
        return 1
    fi
    log "installing chromium (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    command -v chromium >/dev/null 2>&1 || { log "error: chromium did not install"; return 1; }
}

if [[ "$want_test" == 1 ]]; then
    install_chromium
fi

if [[ -x "$venv/bin/python" && -x "$venv/bin/prisma-ext" && -f "$stamp" \
      && "$stamp" -nt pyproject.toml && "${SETUP_FORCE:-0}" != 1 ]]; then
    log "up to date ($venv)"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    command -v "$python" >/dev/null 2>&1 || { log "error: $python not found"; exit 1; }
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        log "error: prisma-ext needs Python >= 3.10, $python is $("$python" -V 2>&1)"
        exit 1
    fi
    log "creating $venv with $("$python" -V 2>&1)"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv"; then
        log "error: '$python -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
        exit 1
    fi
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
export PIP_NO_INPUT=1

log "upgrading pip"
"${pip[@]}" install -q --upgrade pip

# torch first and pinned, so that resolving prisma-ext's dependencies keeps this torch.
log "installing ${TORCH_PINS[*]}"
"${pip[@]}" install -q "${TORCH_PINS[@]}"

log "installing prisma-ext (editable) with the dev extra"
"${pip[@]}" install -q -e '.[dev]'

"$venv/bin/python" -c 'import prisma_ext' || { log "error: prisma_ext does not import"; exit 1; }
touch "$stamp"
log "done: $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
