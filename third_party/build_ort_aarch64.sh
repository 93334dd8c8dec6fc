#!/usr/bin/env bash
# bash third_party/build_ort_aarch64.sh
#
# An aarch64 Python with ONNX Runtime's own aarch64 wheel from PyPI, for running an int4 ONNX
# folder on ARM's kernels (MLAS NEON/dotprod/i8mm, MatMulNBits' int8 paths) under Debian's
# qemu-user, as edgekit.bench.emulate does for `edgekit bench --emulate` with ONNX folders:
#   sysroot/  Debian's arm64 python3.X and the libraries it and the wheels load, unpacked with
#             `apt-get download` + `dpkg -x` (nothing is installed for arm64: the host's packages
#             are untouched; arm64 is added to dpkg's foreign architectures so apt can fetch them)
#   site/     onnxruntime and numpy at the versions of this project's environment (.venv),
#             as their manylinux aarch64 wheels, installed with pip's --platform
# The Python minor version is the host's Debian python3's (the same source package on every
# architecture). Prints the directory; reruns are free once built. ~1 min, ~60 MB.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIP=${PIP:-$ROOT/.venv/bin/pip}
ORT=$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))')
NUMPY=$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("numpy"))')
DEST=${EDGEKIT_ORT_AARCH64:-$HOME/.cache/edgekit/ort-aarch64-$ORT}
if [ -f "$DEST/.complete" ]; then echo "$DEST"; exit 0; fi
PYV=$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || true)
if [ -z "$PYV" ] || ! command -v apt-get >/dev/null; then
    echo "needs a Debian-like system with apt and python3 (for Debian's arm64 python3.X packages)" >&2
    exit 3
fi
PKGS="python$PYV-minimal libpython$PYV-minimal libpython$PYV-stdlib libc6 libexpat1 zlib1g libffi8 libbz2-1.0
      liblzma5 libssl3 libstdc++6 libgcc-s1 libuuid1 libcrypt1"
if ! command -v qemu-aarch64 >/dev/null || ! apt-cache show "python$PYV-minimal:arm64" >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "needs qemu-user and apt's arm64 package lists: as root, dpkg --add-architecture arm64 && apt-get update" \
             "&& apt-get install qemu-user" >&2
        exit 3
    fi
    dpkg --add-architecture arm64
    apt-get update -qq >&2
    command -v qemu-aarch64 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 777 "$work"  # apt fetches as its _apt user
(cd "$work" && apt-get download -qq $(for p in $PKGS; do echo "$p:arm64"; done) >&2)
mkdir -p "$work/out/sysroot"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/out/sysroot"; done
"$PIP" download -q --only-binary=:all: --no-deps --implementation cp --python-version "${PYV/./}" --abi "cp${PYV/./}" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
    -d "$work/wheels" "onnxruntime==$ORT" "numpy==$NUMPY" >&2
"$PIP" install -q --no-index --no-deps --only-binary=:all: --target "$work/out/site" --implementation cp \
    --python-version "${PYV/./}" --abi "cp${PYV/./}" --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux2014_aarch64 "$work"/wheels/*.whl >&2
echo "python$PYV onnxruntime==$ORT numpy==$NUMPY" > "$work/out/versions"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$work/out" "$DEST"
touch "$DEST/.complete"
echo "$DEST"
