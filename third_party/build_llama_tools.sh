#!/usr/bin/env bash
# bash third_party/build_llama_tools.sh
#
# Builds llama.cpp's own command-line tools (llama-bench, llama-perplexity, llama-quantize)
# from the llama.cpp source vendored in llama-cpp-python's source distribution on PyPI, at
# the version pinned in pyproject.toml, so the tools run the same llama.cpp as our Python
# runtime. Nothing is copied into this repository. Prints the bin directory; reruns are
# free once built. ~7 minutes on 2 cores.
set -euo pipefail
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
DEST=${EDGEKIT_LLAMA_TOOLS:-$HOME/.cache/edgekit/llama-tools-$VERSION}
if [ -x "$DEST/bin/llama-bench" ]; then echo "$DEST/bin"; exit 0; fi
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$work/build" -j"$(nproc)" --target llama-bench llama-perplexity llama-quantize >&2
mkdir -p "$DEST/bin"
cp "$work"/build/bin/llama-bench "$work"/build/bin/llama-perplexity "$work"/build/bin/llama-quantize "$DEST/bin/"
echo "$DEST/bin"
