#!/usr/bin/env bash
# Set up the project's virtual environment in ./.venv (idempotent).
#
# Finds a Python >= 3.12 (python3.12, python3.13, python3 on PATH, or a pyenv-installed one),
# creates .venv with it, and installs the project with its dev extra. A second run with an
# unchanged pyproject.toml does nothing. Set DIFFPOST_PYTHON to force an interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

good_python() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidates=()
    [ -n "${DIFFPOST_PYTHON:-}" ] && candidates+=("$DIFFPOST_PYTHON")
    candidates+=(python3.12 python3.13 python3.14 python3)
    local root
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for dir in "$root"/versions/3.1[2-9]*; do
        [ -x "$dir/bin/python3" ] && candidates+=("$dir/bin/python3")
    done
    for candidate in "${candidates[@]}"; do
        if command -v "$candidate" >/dev/null 2>&1 && good_python "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ] || ! good_python .venv/bin/python; then
    if ! python=$(find_python); then
        echo "error: this project needs Python >= 3.12 (ArviZ 1.x requires it)." >&2
        echo "Install one (e.g. 'pyenv install 3.12') or set DIFFPOST_PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
    echo "bootstrap: creating .venv with $python ($("$python" --version))"
    rm -rf .venv
    "$python" -m venv .venv
fi

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "bootstrap: installing the project and its dev extra into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # the project was distributed as "posterior" before it became diffpost: drop that install
    .venv/bin/python -m pip uninstall --quiet --yes posterior >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
