#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix, llama-quantize and llama-perplexity from the llama-cpp-python 0.3.36 sdist
# (its vendor/llama.cpp is the exact llama.cpp our oracle wheel uses), once, into the cache; its Python converter
# (convert_hf_to_gguf.py with conversion/ and gguf-py/) is kept beside bin/ for the two-step benchmark baseline.
#
#   scripts/build_llamacpp_tools.sh            -> prints the bin directory on the last line of stdout
#   NATIVE=1 scripts/build_llamacpp_tools.sh   -> the same tools built with -DGGML_NATIVE=ON (what users build:
#                                                 the speed baseline of every benchmark); the tests keep the
#                                                 portable build (a native build's AMX matmul segfaults on
#                                                 some VMs, and the byte checks do not depend on it)
#
# Idempotent: a finished build is reused. Atomic: everything happens in a temp dir next to the target, which is
# renamed into place only when all three binaries exist; a lock keeps concurrent callers from building twice.
# Env: QCONVERT_CACHE (default ~/.cache/qconvert), JOBS (default 2), PYTHON (default python3 on PATH).
set -euo pipefail

VERSION=0.3.36
CACHE="${QCONVERT_CACHE:-$HOME/.cache/qconvert}"
# the portable build keeps its old path, so existing caches stay valid
if [[ "${NATIVE:-0}" == 1 ]]; then
    BUILD=native; GGML_NATIVE=ON; DEST="$CACHE/llama.cpp/$VERSION-native"
else
    BUILD=portable; GGML_NATIVE=OFF; DEST="$CACHE/llama.cpp/$VERSION"
fi
TOOLS=(llama-imatrix llama-quantize llama-perplexity)
PY="${PYTHON:-python3}"

complete() {
    for t in "${TOOLS[@]}"; do [[ -x "$DEST/bin/$t" ]] || return 1; done
    [[ -f "$DEST/converter/convert_hf_to_gguf.py" ]]
}

if complete; then echo "$DEST/bin"; exit 0; fi

mkdir -p "$CACHE/llama.cpp"
exec 9>"$CACHE/llama.cpp/.build.lock"
flock 9
if complete; then echo "$DEST/bin"; exit 0; fi   # another caller finished while we waited

WORK="$(mktemp -d "$CACHE/llama.cpp/.tmp-$VERSION-$BUILD.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "downloading llama-cpp-python==$VERSION sdist" >&2
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/sdist" >&2
tar -xzf "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

echo "building ${TOOLS[*]} ($BUILD: -DGGML_NATIVE=$GGML_NATIVE; several minutes on 2 cores)" >&2
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="$GGML_NATIVE" -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$WORK/build" -j"${JOBS:-2}" --target "${TOOLS[@]}" >&2

mkdir -p "$WORK/out/bin"
for t in "${TOOLS[@]}"; do cp "$WORK/build/bin/$t" "$WORK/out/bin/"; done
mkdir -p "$WORK/out/converter"
cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py" "$WORK/out/converter/"
echo "$VERSION" >"$WORK/out/VERSION"
echo "$BUILD" >"$WORK/out/BUILD"
rm -rf "$DEST"
mv "$WORK/out" "$DEST"
echo "$DEST/bin"
