#!/usr/bin/env bash
# Prints the directory of a Debian package of another suite unpacked under target/runtimes/
# (downloading it first through tests/apt/suite.sh: its own apt state, derived from this
# machine's sources; nothing is installed over the machine's packages). The package's version
# is in <dir>/.version.
#
#   tests/runtimes/fetch.sh SUITE PACKAGE
set -euo pipefail
cd "$(dirname "$0")/../.."
suite=$1 pkg=$2
dir=$PWD/target/runtimes/$suite-$pkg
mkdir -p target/runtimes
# Tests call this concurrently: one fetches, the others wait for it.
exec 9>"$dir.lock"
flock 9
if [ ! -e "$dir/.unpacked" ]; then
  [ -e "target/apt/$suite/lists/lock" ] || bash tests/apt/suite.sh "$suite" update
  rm -rf "$dir" "$dir.debs" && mkdir -p "$dir"
  bash tests/apt/suite.sh "$suite" download "$dir.debs" "$pkg" >&2
  deb=$(ls "$dir.debs/${pkg}"_*.deb)
  dpkg-deb -x "$deb" "$dir"
  dpkg-deb -f "$deb" Version >"$dir/.version"
  touch "$dir/.unpacked"
fi
echo "$dir"
