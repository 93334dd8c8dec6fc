#!/usr/bin/env bash
# bash third_party/llama_cpp_source.sh
#
# Prints a directory holding llama.cpp's source at the version our runtime runs: the
# llama.cpp vendored in llama-cpp-python's source distribution on PyPI, at the version
# pinned in pyproject.toml, downloaded and unpacked once into
# ~/.cache/edgekit/llama.cpp-src-<version> ($EDGEKIT_LLAMA_SRC to move) by
# edgekit.export.converter (whose convert_hf_to_gguf.py every GGUF export runs); nothing is
# copied into this repository. Used to build llama.cpp's tools (build_llama_tools.sh).
set -euo pipefail
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
"$PY" -c "from edgekit.export.converter import converter_dir; print(converter_dir())"
