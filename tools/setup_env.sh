#!/usr/bin/env bash
# Builds .venv/ at the repo root when it is missing or incomplete; a second run is a no-op.
# Pins live here and only here (DESIGN: "Python version and pins live in one place").
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="torch==2.14.1"
TORCHVISION_SPEC="torchvision==0.29.1"
TORCHAUDIO_SPEC="torchaudio==2.11.0"      # abi3 wheel, installed with --no-deps next to torch
DETECTRON2_FALLBACK="pb1-detectron2==0.6" # registry sdist of detectron2 0.6 without C++ sources

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.cpm_d2_setup_done"
PY="$VENV/bin/python"

if [[ -f "$STAMP" ]] && "$PY" -c "import torch, torchaudio, detectron2, cpm_d2, pytest" 2>/dev/null; then
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PYTHON=python3
fi
"$PYTHON" - <<'PYCHECK'
import sys
if sys.version_info[:2] < (3, 9):
    sys.exit(f"cpm_d2 needs Python >= 3.9, found {sys.version.split()[0]} ({sys.executable})")
PYCHECK

[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check)

echo "[setup] torch / torchvision / torchaudio"
"$PY" -c "import torch, torchvision" 2>/dev/null || "${PIP[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC"
"$PY" -c "import torchaudio" 2>/dev/null || "${PIP[@]}" --no-deps "$TORCHAUDIO_SPEC"
"${PIP[@]}" -q "setuptools<82" wheel   # detectron2's model_zoo imports pkg_resources

echo "[setup] detectron2"
if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "[setup] using the detectron2 already installed: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
    # The registry's sdist lacks detectron2/layers/csrc: build it with no C++ extension.
    # cpm_d2 uses none of those ops; cpm_d2.compat raises a clear error if something calls one.
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    # metadata of the sdist imports torch: build it in this venv, not an isolated one
    "$PY" -m pip download --no-deps --no-build-isolation --no-binary :all: -d "$TMP" "$DETECTRON2_FALLBACK"
    tar -xzf "$TMP"/*.tar.gz -C "$TMP"
    SRC="$(find "$TMP" -maxdepth 1 -mindepth 1 -type d | head -n1)"
    "$PY" - "$SRC/setup.py" <<'PYPATCH'
import re, sys
path = sys.argv[1]
text = open(path).read()
new, n = re.subn(r"ext_modules\s*=\s*get_extensions\(\)", "ext_modules=[]", text)
if n != 1:
    sys.exit(f"{path}: expected one 'ext_modules=get_extensions()' to disable, found {n}")
open(path, "w").write(new)
PYPATCH
    "${PIP[@]}" --no-build-isolation "$SRC"
fi

echo "[setup] cpm_d2 (editable) and test tools"
"${PIP[@]}" -e "$ROOT[dev]"
"$PY" -c "import torch, torchaudio, detectron2, cpm_d2, pytest"
touch "$STAMP"
echo "[setup] done: $VENV"
