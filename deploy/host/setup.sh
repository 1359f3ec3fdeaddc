#!/usr/bin/env bash
# Idempotent host set-up for aimesh: Debian packages, kernel headers for bcc, bpffs/tracefs, and the .venv.
# Run by `make setup` (and so by `make demo` / `make test`); safe to run again, it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (bcc loads BPF programs and attaches them to cgroups)"

APT_PKGS=(python3-bpfcc libbpfcc bpftool python3-venv iproute2 make prometheus openssl faketime)
need=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
# bpftool is its own package on Debian 12; on Ubuntu it comes with linux-tools.
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  if ! apt-get install -y -q "${need[@]}" >/dev/null; then
    # Ubuntu: bpftool lives in linux-tools-*.
    apt-get install -y -q python3-bpfcc libbpfcc python3-venv iproute2 make prometheus openssl faketime linux-tools-common "linux-tools-$(uname -r)" >/dev/null \
      || die "apt-get install ${need[*]} failed"
  fi
fi

# Kernel headers for bcc's runtime compile.
KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
if [ -e /sys/kernel/kheaders.tar.xz ] || [ -e "$MODDIR/build/include/linux/kconfig.h" ] || [ -e "$MODDIR/build/Makefile" ]; then
  :
else
  if ! apt-get install -y -q "linux-headers-$KREL" >/dev/null 2>&1; then
    if ! compgen -G "/usr/src/linux-headers-*-amd64" >/dev/null && ! compgen -G "/usr/src/linux-headers-*-arm64" >/dev/null; then
      log "installing linux-headers for the distribution kernel (the running kernel ships none)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -q >/dev/null
      arch=$(dpkg --print-architecture)
      apt-get install -y -q "linux-headers-$arch" >/dev/null || die "apt-get install linux-headers-$arch failed"
    fi
    build=$( (ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 2>/dev/null || true) | sort -V | tail -n1)
    ver=${build#/usr/src/linux-headers-}; ver=${ver%-*}
    common=/usr/src/linux-headers-$ver-common
    [ -d "$build" ] && [ -d "$common" ] || die "kernel headers not found under /usr/src (looked for $build and $common)"
    mkdir -p "$MODDIR"
    ln -sfn "$build" "$MODDIR/build"
    ln -sfn "$common" "$MODDIR/source"
    log "linked $MODDIR/build -> $build and source -> $common"
  fi
fi

# bpffs and tracefs.
grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || { mount -t bpf bpf /sys/fs/bpf && log "mounted bpffs"; }
grep -qs ' /sys/kernel/tracing tracefs ' /proc/mounts || grep -qs ' /sys/kernel/debug/tracing tracefs ' /proc/mounts \
  || { mount -t tracefs nodev /sys/kernel/tracing && log "mounted tracefs"; }

# Virtualenv on the distribution's python (the one Debian's bcc is built for), with bcc linked in alone.
SYSPY=/usr/bin/python3
[ -x "$SYSPY" ] || die "$SYSPY not found"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)'; then
  log "creating .venv with $SYSPY"
  rm -rf .venv
  "$SYSPY" -m venv .venv
fi
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BCC_SRC=$("$SYSPY" -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null) || die "Debian's bcc python module does not import with $SYSPY"
ln -sfn "$BCC_SRC" "$SITE/bcc"

HASH=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f .venv/.aimesh-installed ] || [ "$(cat .venv/.aimesh-installed)" != "$HASH" ]; then
  log "installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  echo "$HASH" > .venv/.aimesh-installed
fi
# Generated protobuf/gRPC code: built here, never committed.
if [ -d proto/aimesh ] && ls proto/aimesh/v1/*.proto >/dev/null 2>&1; then
  .venv/bin/python -m agent.build_proto
fi
.venv/bin/python -c 'import bcc, agent' || die ".venv cannot import bcc and agent"
[ -x .venv/bin/aimesh ] || die ".venv/bin/aimesh missing"

# A real OTLP receiver for the span tests: Arize Phoenix, in a venv of its own (it pins anthropic<2, which the dev
# tools need newer). Installed once; a failed install only leaves that one test skipped, with its reason.
if [ ! -x .venv-phoenix/bin/phoenix ]; then
  log "installing Arize Phoenix into .venv-phoenix (the OTLP receiver of tests/unit/test_otlp_phoenix.py)"
  rm -rf .venv-phoenix
  if ! { "$SYSPY" -m venv .venv-phoenix && .venv-phoenix/bin/pip install -q 'arize-phoenix>=8' >/dev/null 2>&1; }; then
    log "warning: Arize Phoenix could not be installed; tests/unit/test_otlp_phoenix.py will be skipped"
    rm -rf .venv-phoenix
  fi
fi

# A real OpenAI-compatible upstream nobody here wrote, for tests/kernel/test_gateway_endpoints.py: the LiteLLM proxy
# (its mock_response models run offline), in a venv of its own (it pins its own openai, httpx, pydantic). Installed
# once; a failed install only leaves that test skipped, with its reason.
if [ ! -x .venv-litellm/bin/litellm ]; then
  log "installing the LiteLLM proxy into .venv-litellm (the upstream of tests/kernel/test_gateway_endpoints.py)"
  rm -rf .venv-litellm
  if ! { "$SYSPY" -m venv .venv-litellm && .venv-litellm/bin/pip install -q 'litellm[proxy]==1.108.7' >/dev/null 2>&1; }; then
    log "warning: LiteLLM could not be installed; tests/kernel/test_gateway_endpoints.py will be skipped"
    rm -rf .venv-litellm
  fi
fi

# The Node openai SDK, for the n=8 budget test of tests/unit/test_gateway_limits.py (versions in tests/node/package.json).
if command -v npm >/dev/null 2>&1 && [ ! -d tests/node/node_modules/openai ]; then
  log "installing the Node openai SDK into tests/node (the client of tests/unit/test_gateway_limits.py)"
  npm install --prefix tests/node --no-audit --no-fund --silent >/dev/null 2>&1 \
    || log "warning: the Node openai SDK could not be installed; its test in tests/unit/test_gateway_limits.py will be skipped"
fi
