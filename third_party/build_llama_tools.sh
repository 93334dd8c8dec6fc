#!/usr/bin/env bash
# bash third_party/build_llama_tools.sh
#
# Builds llama.cpp's own command-line tools (llama-bench, llama-perplexity, llama-quantize, llama-speculative)
# from the llama.cpp source vendored in llama-cpp-python's source distribution on PyPI
# (llama_cpp_source.sh), at the version pinned in pyproject.toml, so the tools run the same
# llama.cpp as our Python runtime. Nothing is copied into this repository. Prints the bin
# directory; reruns are free once built. ~7 minutes on 2 cores.
set -euo pipefail
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
DEST=${EDGEKIT_LLAMA_TOOLS:-$HOME/.cache/edgekit/llama-tools-$VERSION}
if [ -x "$DEST/bin/llama-speculative" ]; then echo "$DEST/bin"; exit 0; fi
src=$(bash "$(dirname "$0")/llama_cpp_source.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$work/build" -j"$(nproc)" --target llama-bench llama-perplexity llama-quantize llama-speculative >&2
mkdir -p "$DEST/bin"
cp "$work"/build/bin/llama-bench "$work"/build/bin/llama-perplexity "$work"/build/bin/llama-quantize "$work"/build/bin/llama-speculative "$DEST/bin/"
echo "$DEST/bin"
