#!/usr/bin/env bash
# `arbiter bench gpu` on a fresh CUDA machine, in one command. Run from the repository root.
#
#   bash arbiter/bench/gpu_setup.sh wheels      on a machine that reaches PyPI, before the GPU machine has to:
#                                               fills .arbiter/wheels with what a CUDA image that already has
#                                               torch + transformers lacks (CPython 3.12, x86-64; ~30 MB).
#   bash arbiter/bench/gpu_setup.sh run [ARGS]  on the GPU machine: makes the Python environment, then runs
#                                               `arbiter bench gpu ARGS` (e.g. --quick), writing gpu.json,
#                                               gpu.md, the console log and the workers' logs under $OUT
#                                               if set (else .arbiter/bench-gpu).
# The environment, in order of preference:
#   1. python3 already imports a CUDA torch and .arbiter/wheels exists (an image with no network): the
#      wheels go to a private --target directory on PYTHONPATH; the image's torch/transformers are used.
#   2. PyPI is reachable: a venv in $VENV (default /tmp/arbiter-venv) with torch from PyPI (a CUDA build on
#      Linux x86-64) and this package with its llm and diffusion extras.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=.arbiter/wheels
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
# What the bench needs beyond torch, transformers and tokenizers (pyproject.toml's core dependencies and
# the diffusion extra), read from pyproject.toml so that this list cannot drift.
reqs() {
  "$PY" - <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = ("torch", "transformers", "tokenizers")
for r in p["dependencies"] + p["optional-dependencies"]["diffusion"]:
    if not r.startswith(skip):
        print("diffusers==0.42.1" if r.startswith("diffusers") else r)
EOF
}
# Packages that torch and transformers themselves require: an image that has both has these too.
IMAGE_HAS="numpy huggingface_hub hf_xet safetensors regex requests urllib3 idna certifi charset_normalizer pyyaml
tqdm filelock fsspec packaging typing_extensions setuptools tokenizers sympy mpmath networkx jinja2 markupsafe"
# Only the plots of the other benches use matplotlib (imported when one is drawn): not carried (-15 MB).
PLOTS_ONLY="matplotlib contourpy fonttools kiwisolver cycler pyparsing"

case "${1:-}" in
wheels)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" $(reqs)
  for name in $IMAGE_HAS $PLOTS_ONLY; do rm -f "$WHEELS"/"$name"-[0-9]*.whl; done
  echo "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS (carry this folder to the GPU machine)"
  ;;
run)
  shift
  RESULTS=${OUT:-.arbiter}/bench-gpu
  mkdir -p "$RESULTS"
  if "$PY" -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null && [ -d "$WHEELS" ]; then
    SITE=${SITE:-/tmp/arbiter-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    RUN="$PY"
  elif "$PY" -m pip download -q --no-deps --timeout 5 --retries 0 -d /tmp/arbiter-pypi-check six >/dev/null 2>&1; then
    VENV=${VENV:-/tmp/arbiter-venv}
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q torch
    "$VENV/bin/python" -m pip install -q -e '.[llm,diffusion]'
    RUN="$VENV/bin/python"
  else
    echo "gpu_setup.sh: no CUDA torch with $WHEELS here, and PyPI is unreachable: run 'gpu_setup.sh wheels' where PyPI is reachable and bring .arbiter/wheels along" >&2
    exit 2
  fi
  set +e
  PYTHONUNBUFFERED=1 COLUMNS=160 "$RUN" -m arbiter bench gpu --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS/console.log"
  rc=${PIPESTATUS[0]}
  tar czf "$RESULTS/logs.tgz" .arbiter/bench-gpu-work/logs 2>/dev/null
  exit "$rc"
  ;;
*)
  echo "usage: $0 wheels | run [--quick] [--device cuda|cpu] [--budget S]" >&2
  exit 2
  ;;
esac
