#!/usr/bin/env bash
# Compile-check (g++ -fsyntax-only) the AscendC backend's host code without CANN:
#   1. the host tiling code (csrc/ascendc/host/*.cpp, plain C++17);
#   2. the torch_npu binding (csrc/ascendc/npu/*.cpp, C++20 like torch 2.14) against the C++
#      headers shipped in the torch and torch_npu wheels (ATen, c10, torch_npu, ACL, HCCL), as one
#      unity translation unit so the heavy headers are parsed once;
#   3. the launchers (csrc/ascendc/npu/launch/*.cpp) with CPATTN_LAUNCH_AS_CALL against the
#      emulation's kernel_operator.h (csrc/ascendc/emu/, when present): the `<<<>>>` launch is
#      bisheng-only, so here the launch becomes a plain call and g++ checks that each launcher
#      passes the arguments its kernel's entry point takes.
# What it cannot check: bisheng compiling the kernels and launchers for real, linking against
# libtorch_npu/libascendcl, anything at run time (docs/ascendc.md).
#
# usage: check_host.sh SITE_PACKAGES   (a site-packages with torch and torch_npu installed)
set -euo pipefail
SP=${1:?usage: check_host.sh SITE_PACKAGES}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
CXX=${CXX:-g++}
ASC=$ROOT/csrc/ascendc
for d in "$SP/torch/include" "$SP/torch_npu/include"; do
  [ -d "$d" ] || { echo "check_host: $d missing (install torch and torch_npu there)" >&2; exit 2; }
done
PYINC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0

echo "check_host: host tiling (C++17)"
for f in "$ASC"/host/*.cpp; do
  "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra "$f" || { echo "FAILED: $f"; fail=1; }
done

echo "check_host: torch_npu binding (C++20, torch + torch_npu headers)"
UNITY=$TMP/npu_unity.cpp
for f in "$ASC"/npu/*.cpp; do echo "#include \"$f\""; done > "$UNITY"
"$CXX" -std=c++20 -fsyntax-only -Wall -Wno-unused-parameter \
  -I"$SP/torch/include" -I"$SP/torch/include/torch/csrc/api/include" \
  -I"$SP/torch_npu/include" -I"$SP/torch_npu/include/third_party/acl/inc" \
  -I"$SP/torch_npu/include/third_party/hccl/inc" -I"$PYINC" "$UNITY" || { echo "FAILED: torch_npu binding"; fail=1; }

if [ -f "$ASC/emu/kernel_operator.h" ]; then
  echo "check_host: launchers as plain calls against the emulation's kernel_operator.h"
  for f in "$ASC"/npu/launch/*.cpp; do
    "$CXX" -std=c++17 -fsyntax-only -DCPATTN_LAUNCH_AS_CALL -I"$ASC/emu" "$f" || { echo "FAILED: $f"; fail=1; }
  done
else
  echo "check_host: launchers skipped (no csrc/ascendc/emu/kernel_operator.h)"
fi
[ $fail -eq 0 ] && echo "check_host: all host code compiles (syntax only; see docs/ascendc.md for what this does not cover)"
exit $fail
