#!/bin/sh
# Run in the Dockerfile's venv stages, after `pip check`: remove from a runtime venv what a
# function never loads. Each removal is checked first; the build fails rather than ship a venv
# that lacks something it needs.
#   - pip and setuptools: nothing installs into a running image;
#   - the packages' own test suites (numpy's alone are 27 MB);
#   - onnxruntime's C API library (libonnxruntime.so.*, 29 MB): the Python binding is linked
#     without it, and it goes only if no other shared object in the venv names it;
#   - debug information in extension modules built with it (uvloop's is 12 MB): `strip
#     --strip-debug` on the files that carry a .debug_info section, nothing else. Libraries that
#     auditwheel patched (the *.libs folders) are left as they are.
# Usage: slim-venv.sh VENV
set -eu
venv=$1
site=$(echo "$venv"/lib/python3*/site-packages)
before=$(du -sm "$venv" | cut -f1)

"$venv/bin/pip" uninstall -q -y pip setuptools
find "$site" -depth -type d -path "$site/*/tests" -exec rm -rf {} +

for lib in "$site"/onnxruntime/capi/libonnxruntime.so.*; do
    [ -e "$lib" ] || continue
    soname=$(basename "$lib" | sed 's/^\(libonnxruntime\.so\.[0-9]*\).*/\1/')
    users=$(find "$site" -name '*.so*' -type f ! -path "$lib" -exec grep -l -F "$soname" {} + || true)
    if [ -n "$users" ]; then
        echo "slim-venv: keeping $lib: named by $users"
    else
        rm -f "$lib"
    fi
done

find "$site" -name '*.so' -type f ! -path '*.libs/*' | while read -r module; do
    if readelf -S "$module" 2>/dev/null | grep -q '\.debug_info'; then
        strip --strip-debug "$module"
    fi
done

echo "slim-venv: $venv $before MB -> $(du -sm "$venv" | cut -f1) MB"
