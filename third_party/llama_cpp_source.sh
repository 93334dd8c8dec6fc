#!/usr/bin/env bash
# bash third_party/llama_cpp_source.sh
#
# Prints a directory holding llama.cpp's source at the version our runtime runs: the
# llama.cpp vendored in llama-cpp-python's source distribution on PyPI, at the version
# pinned in pyproject.toml. Downloaded and unpacked once into
# ~/.cache/edgekit/llama.cpp-src-<version> ($EDGEKIT_LLAMA_SRC to move); nothing is copied
# into this repository. Used to build llama.cpp's tools (build_llama_tools.sh) and to run
# its convert_hf_to_gguf.py in the converter cross-check test.
set -euo pipefail
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
DEST=${EDGEKIT_LLAMA_SRC:-$HOME/.cache/edgekit/llama.cpp-src-$VERSION}
if [ -f "$DEST/convert_hf_to_gguf.py" ]; then echo "$DEST"; exit 0; fi
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "downloading llama-cpp-python==$VERSION's source distribution (~75 MB) from PyPI" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work" "llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.partial"
mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST.partial"
mv "$DEST.partial" "$DEST"  # complete or absent: an interrupted run leaves no half tree
echo "$DEST"
