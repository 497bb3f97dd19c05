#!/bin/sh
# The C block after the marker "<!-- example: examples/layer.c -->" in README.md must equal
# examples/layer.c, which the example_layer test compiles and runs.
readme=$1; example=$2
block=$(awk '/<!-- example: examples\/layer.c -->/{m=1; next} m && /^```c/{f=1; next} f && /^```/{exit} f{print}' "$readme")
if [ -z "$block" ]; then echo "README.md has no example block after the marker"; exit 1; fi
if ! printf '%s\n' "$block" | diff -u "$example" - ; then
  echo "README.md's example differs from $example (diff above)"; exit 1
fi
echo "README example matches $example"
