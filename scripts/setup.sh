#!/usr/bin/env bash
# Create .venv and install lorakit with the exact versions it is tested with.
#   scripts/setup.sh          lorakit + the serve (fastapi, uvicorn) and quant (bitsandbytes) extras:
#                             every command of the README's Usage section runs
#   scripts/setup.sh --test   the same + test oracles (peft, trl, openai, pytest, ...) and chromium
# torch: the default pin (torch==2.13.0) is the CPU build served locally on the project's machines.
# GPU users pick their own build first, e.g.
#   LORAKIT_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[serve,quant]"
test=""
[ "${1:-}" = "--test" ] && extras="[serve,quant,test]" && test=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.lorakit-setup${test:+-test}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
   || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check ${LORAKIT_TORCH:-torch==2.13.0}
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}"
  touch "$stamp"
fi
# --test: the `lorakit report` test renders its HTML page in headless Chromium (Debian's package)
if [ -n "$test" ] && ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  ($sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium) \
    || echo "warning: could not install chromium; the report rendering test will be skipped" >&2
fi
