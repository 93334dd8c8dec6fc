#!/usr/bin/env bash
# bash third_party/build_llama_aarch64.sh MARCH
#
# Cross-builds llama.cpp's llama-perplexity for aarch64 (Linux, statically linked) with
# Debian's cross toolchain, for one ARM architecture level, e.g.
#   armv8.2-a+dotprod            Raspberry Pi 5 (Cortex-A76)
#   armv8.6-a+dotprod+i8mm       a current phone SoC (Snapdragon 8 Gen 3: Cortex-X4/A720/A520)
# from the same llama.cpp source our runtime runs (llama_cpp_source.sh), so the ARM kernels
# (NEON, dotprod, i8mm, Q4_0 repacked for ARM) are the pinned version's. The binary runs here
# under Debian's qemu-user (`qemu-aarch64 -cpu <model>`); edgekit.bench.emulate drives it.
# Installs the toolchain and qemu with apt when missing (root + apt); nothing is vendored.
# Prints the bin directory; reruns are free once built. ~6 minutes per level on 2 cores.
set -euo pipefail
MARCH=${1:?usage: build_llama_aarch64.sh MARCH (e.g. armv8.2-a+dotprod)}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
DEST=${EDGEKIT_LLAMA_AARCH64:-$HOME/.cache/edgekit/llama-aarch64-$VERSION}/$(echo "$MARCH" | tr '+.' '__')
if [ -x "$DEST/bin/llama-perplexity" ]; then echo "$DEST/bin"; exit 0; fi
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >&2
    else
        echo "needs Debian's g++-aarch64-linux-gnu and qemu-user: apt-get install g++-aarch64-linux-gnu qemu-user (as root)" >&2
        exit 3
    fi
fi
src=$(bash "$(dirname "$0")/llama_cpp_source.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
      -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
      -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
      -DCMAKE_EXE_LINKER_FLAGS=-static -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$MARCH" -DGGML_OPENMP=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$work/build" -j"$(nproc)" --target llama-perplexity >&2
mkdir -p "$DEST/bin"
cp "$work"/build/bin/llama-perplexity "$DEST/bin/"
echo "$DEST/bin"
