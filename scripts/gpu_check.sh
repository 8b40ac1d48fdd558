#!/usr/bin/env bash
# GPU check: build ladimo with a GPU backend, then on a machine with an NVIDIA GPU run the tiny
# models' parity tests on that backend, the backend comparison (GPU vs CPU) and `bench backends`.
# Called by `cargo xtask gpu-check [all|build|run]`; every stage is under `timeout`, and the whole
# run is meant to finish in under 10 minutes once built.
#
#   all    (default) check for a GPU first, then build here and run here.
#   build  build only (any machine with cargo; no GPU needed) into .gpu-check/: stripped,
#          xz-packed test and xtask binaries (about 40 MB), plus the Vulkan loader packages, so
#          a GPU machine without Rust can run them (copy .gpu-check/ there, next to the repo).
#   run    run only, from .gpu-check/ when it holds binaries, else with cargo. Fails at once,
#          saying so, when there is no NVIDIA GPU.
#
# Backend: `cuda` when burn's CUDA backend can be built here, that is when the tracel LLVM bundle
# that its build script would download is already installed (see README "Backends"); otherwise
# `wgpu`, which reaches the GPU through the NVIDIA driver's Vulkan ICD. LADIMO_GPU_BACKEND=cuda|wgpu
# forces one.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
out=.gpu-check
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ladimo/target}"

say() { echo "gpu-check: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

llvm_bundle="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4/.tracel-llvm-installed"
pick_backend() {
  if [[ -n "${LADIMO_GPU_BACKEND:-}" ]]; then
    echo "$LADIMO_GPU_BACKEND"
  elif [[ -f "$out/backend" ]] && [[ "$stage" == run ]]; then
    cat "$out/backend"
  elif [[ -e "$llvm_bundle" ]]; then
    echo cuda
  else
    say "the tracel LLVM bundle ($llvm_bundle) is not installed, so burn's cuda backend cannot be built offline: using wgpu (Vulkan on the NVIDIA driver)"
    echo wgpu
  fi
}

require_gpu() {
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    die "no NVIDIA GPU here (nvidia-smi -L finds none). Run 'cargo xtask gpu-check build' on a build machine and 'scripts/gpu_check.sh run' on the GPU machine."
  fi
  nvidia-smi -L | sed 's/^/gpu-check: /' >&2
}

# Test binaries of the last `cargo test --no-run` (from cargo's JSON messages).
test_binary() { # $1 = test target name
  grep -F "\"name\":\"$1\"" "$out/cargo-messages.json" | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4
}

build() {
  local b; b="$(pick_backend)"
  command -v cargo >/dev/null || die "cargo not found: build on a machine with Rust ($0 build), then copy $out/ here"
  mkdir -p "$out"
  say "building with --features $b (tests and xtask, release)"
  timeout 3600 cargo test --release -p ladimo-tests --features "$b" --test parity --test backends --no-run \
    --message-format=json-render-diagnostics >"$out/cargo-messages.json"
  timeout 3600 cargo build --release -p xtask --features "$b"
  rm -f "$out"/*.xz
  for t in parity backends; do
    local exe; exe="$(test_binary "$t")"
    [[ -x "$exe" ]] || die "no test binary for $t"
    strip -o "$out/$t" "$exe" && xz -T0 -6 -f "$out/$t"
  done
  strip -o "$out/xtask" "$CARGO_TARGET_DIR/release/xtask" && xz -T0 -6 -f "$out/xtask"
  echo "$b" >"$out/backend"
  # The Vulkan loader, for GPU machines that lack it (wgpu needs libvulkan.so.1).
  if [[ "$b" == wgpu ]] && command -v apt-get >/dev/null; then
    (cd "$out" && apt-get download libvulkan1 >/dev/null 2>&1) || say "could not download libvulkan1 (apt-get); the GPU machine must have a Vulkan loader"
  fi
  du -sh "$out" >&2
}

run_checks() {
  require_gpu
  local b; b="$(pick_backend)"
  local parity backends xtask
  if [[ -f "$out/parity.xz" ]]; then
    say "using the prebuilt binaries in $out ($(cat "$out/backend" 2>/dev/null))"
    mkdir -p /tmp/ladimo-gpu-check
    for f in parity backends xtask; do xz -dc "$out/$f.xz" >/tmp/ladimo-gpu-check/$f; chmod +x /tmp/ladimo-gpu-check/$f; done
    parity=/tmp/ladimo-gpu-check/parity backends=/tmp/ladimo-gpu-check/backends xtask=/tmp/ladimo-gpu-check/xtask
  else
    [[ -f "$out/cargo-messages.json" ]] || build
    parity="$(test_binary parity)" backends="$(test_binary backends)" xtask="$CARGO_TARGET_DIR/release/xtask"
  fi
  if [[ "$b" == wgpu ]]; then
    if ! ldconfig -p | grep -q libvulkan.so.1; then
      ls "$out"/libvulkan1_*.deb >/dev/null 2>&1 || die "no Vulkan loader (libvulkan.so.1) and no $out/libvulkan1_*.deb to unpack"
      for f in "$out"/libvulkan1_*.deb; do dpkg -x "$f" /; done
      ldconfig
    fi
    for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
      if [[ -f "$icd" && -z "${VK_DRIVER_FILES:-}" ]]; then export VK_DRIVER_FILES="$icd"; fi
    done
    [[ -n "${VK_DRIVER_FILES:-}" ]] || say "no nvidia_icd.json found; Vulkan may pick another driver"
  fi
  export LADIMO_BACKEND="$b" RUST_BACKTRACE=1 LADIMO_FIXTURES="$PWD/tests/fixtures"
  # Tests read fixtures relative to the crate (compiled-in path); run from the repo root.
  say "1/3 tiny-model parity with transformers on $b"
  timeout 240 "$parity" --test-threads 1 tiny_ || die "parity tests on $b"
  say "2/3 backend comparison ($b vs cpu)"
  timeout 240 "$backends" --test-threads 1 --nocapture || die "backend comparison on $b"
  say "3/3 bench backends"
  local fwd=()
  [[ -d "${LADIMO_CACHE:-$HOME/.cache/ladimo}/models/smollm2-135m" ]] || { fwd=(--no-forward); say "SmolLM2 is not in the cache here: no forward benchmark"; }
  timeout 300 "$xtask" bench backends --backends "$b,cpu" --prompt-len 512 --decode-tokens 64 --moe-tokens 2048 \
    --train-tokens 512 --repeats 5 "${fwd[@]}" || die "bench backends"
  say "passed on $b"
}

case "$stage" in
  all) require_gpu; build; run_checks ;;
  build) build ;;
  run) run_checks ;;
  *) die "unknown stage '$stage' (all, build, run)" ;;
esac
