#!/bin/sh
# A compiler launcher: keep_stderr.sh DIR COMPILER ARGS... runs the compile and keeps its
# standard error (ptxas's resource report, with --ptxas-options=-v) in DIR/<object>.log,
# still passing it on to the build's own output.
dir=$1
shift
out=unknown
prev=
for a in "$@"; do
  [ "$prev" = "-o" ] && out=$a
  prev=$a
done
log="$dir/$(basename "$out").log"
"$@" 2>"$log"
rc=$?
cat "$log" >&2
exit $rc
