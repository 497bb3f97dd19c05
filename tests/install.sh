#!/bin/sh
# `cmake --install` into a fresh prefix: the tool runs, and examples/layer.c builds with
# pkg-config's flags against the shared library and, with `--static`, against the static one
# (then it must not need libmoe.so), also after the prefix has moved (the .pc file is
# relocatable); each build runs the example.
# Usage: install.sh CMAKE BUILD_DIR SOURCE_DIR CC
set -eu
cmake=$1; build=$2; src=$3; cc=$4
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "install: $*"; exit 1; }
"$cmake" --install "$build" --prefix "$tmp/p" > "$tmp/log" || { cat "$tmp/log"; fail "cmake --install failed"; }
"$tmp/p/bin/moe" --version | grep -q "^moe " || fail "installed tool does not run"
[ -f "$tmp/p/include/moe.h" ] || fail "moe.h not installed"

# build_and_run PREFIX NAME: examples/layer.c against the shared library and the static one
build_and_run() {
    export PKG_CONFIG_PATH="$1/lib/pkgconfig:$(ls -d "$1"/lib/*/pkgconfig 2>/dev/null | tr '\n' ':')"
    libdir=$(pkg-config --variable=libdir moe) || fail "pkg-config does not find moe in $1"
    [ -f "$libdir/libmoe.a" ] && [ -f "$libdir/libmoe.so" ] || fail "libraries not in $libdir"
    # shellcheck disable=SC2046 # the flags are words
    "$cc" -o "$tmp/$2_shared" "$src/examples/layer.c" $(pkg-config --cflags --libs moe) ||
        fail "example does not build against the shared library"
    LD_LIBRARY_PATH="$libdir" "$tmp/$2_shared" | grep -q "^aux loss " || fail "shared example failed"
    # shellcheck disable=SC2046
    "$cc" -o "$tmp/$2_static" "$src/examples/layer.c" $(pkg-config --cflags moe) \
        $(pkg-config --static --libs moe | sed 's/ -lmoe / -l:libmoe.a /') ||
        fail "example does not build against the static library"
    if readelf -d "$tmp/$2_static" | grep -q "libmoe"; then fail "static example needs libmoe.so"; fi
    "$tmp/$2_static" | grep -q "^aux loss " || fail "static example failed"
}
build_and_run "$tmp/p" first
mv "$tmp/p" "$tmp/moved"
build_and_run "$tmp/moved" moved
echo "install: tool, libraries, header and pkg-config file work from the prefix and after moving it"
