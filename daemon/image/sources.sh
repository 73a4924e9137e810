#!/usr/bin/env bash
# `make image-sources`: downloads the Debian source packages of the libraries the image
# carries (SOURCES: the `name version` lines `make image` wrote beside the image tar) into DIR,
# through an isolated apt state with deb-src entries derived from this machine's apt sources
# (tests/apt/suite.sh): what the GPL/LGPL libraries' licenses ask to make available with it.
#
#   daemon/image/sources.sh SOURCES DIR
set -euo pipefail
sources=$1 dir=$2
cd "$(dirname "$0")/../.."
release=$(. /etc/os-release && echo "$VERSION_CODENAME")
specs=()
while read -r name version; do
  [ -n "$name" ] && specs+=("$name=$version")
done <"$sources"
bash tests/apt/suite.sh "$release+$release-security+$release-updates" source "$dir" "${specs[@]}"
echo "sources of ${#specs[@]} packages in $dir"
