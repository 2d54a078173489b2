#!/usr/bin/env bash
# Install what the scale-out tests need (OpenAI client, Ray, llama-cpp-python's server), then run them.
#
#   bash scripts/ci_server.sh                 # install what is missing, run the scale-out tests
#   bash scripts/ci_server.sh --install-only  # only install (e.g. before 'make test')
#
# llama-cpp-python is built from source by pip (llama.cpp, CPU only: several minutes on 2 cores).
# pip keeps the built wheel in its cache (~/.cache/pip, or $PIP_CACHE_DIR), so a later install on
# the same machine takes seconds. DISTILL_DETECT_REQUIRE_SERVER=1 makes the real-server tests fail,
# not skip, when the server cannot be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "ci_server.sh: $PY not found; run 'make setup' first" >&2
  exit 2
fi

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! have openai || ! have tenacity; then
  echo "ci_server.sh: installing the openai client" >&2
  "$PY" -m pip install -q "openai>=1.40" "tenacity>=8"
fi
if ! have ray; then
  echo "ci_server.sh: installing ray" >&2
  "$PY" -m pip install -q "ray>=2.30"
fi
# 'import llama_cpp.server' succeeds without the server's own dependencies (its __init__ is empty),
# so check the modules the server really imports when it starts.
SERVER_MODULES="llama_cpp.server.app uvicorn fastapi sse_starlette starlette_context pydantic_settings"
have_server() { "$PY" -c "import ${SERVER_MODULES// /, }" >/dev/null 2>&1; }

if ! have llama_cpp; then
  echo "ci_server.sh: building llama-cpp-python (CPU; minutes the first time, cached by pip afterwards)" >&2
  command -v cmake >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake build-essential >/dev/null; }
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF"} \
    "$PY" -m pip install -q "llama-cpp-python[server]>=0.3"
fi
if ! have_server; then
  # Pin the installed version so pip adds only the extras and never rebuilds llama.cpp.
  LLAMA_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
  echo "ci_server.sh: installing llama-cpp-python $LLAMA_VERSION's server extras" >&2
  "$PY" -m pip install -q "llama-cpp-python[server]==$LLAMA_VERSION"
fi
if ! have_server; then
  echo "ci_server.sh: the llama-cpp-python server still cannot be imported:" >&2
  "$PY" -c "import ${SERVER_MODULES// /, }" >&2 || true
  exit 2
fi
"$PY" - <<'EOF'
import importlib.metadata as m
print("openai", m.version("openai"), "| ray", m.version("ray"), "| llama-cpp-python", m.version("llama_cpp_python"))
EOF

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
export DISTILL_DETECT_REQUIRE_SERVER=1
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_openai_backend.py tests/test_ray.py tests/test_shards.py tests/test_vllm_translation.py
