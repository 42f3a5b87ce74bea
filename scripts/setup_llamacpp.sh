#!/usr/bin/env bash
# Install llama-cpp-python into .venv, compiled from its PyPI source (there is no prebuilt CPU wheel), for the
# GGUF check of `make test-gguf` (tests/test_gguf_llamacpp.py). Once: skipped when llama_cpp already imports.
# Only the library is built (no tests, examples, tools, server, llava): about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  exit 0
fi
echo "compiling llama-cpp-python from source (about 10 minutes on 2 cores) ..." >&2
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# GGML_NATIVE=OFF: a portable build (no -march=native), so a .venv copied to another x86-64 machine still runs it
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_RPC=OFF}"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python \
  -c constraints.txt llama-cpp-python
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
