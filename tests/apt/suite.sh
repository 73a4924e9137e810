#!/usr/bin/env bash
# apt for another Debian suite (bullseye's kernel, trixie's or sid's containerd, ...) in an
# isolated state under target/apt/<suite>/: its own sources file, package lists and cache.
# The host's apt state and packages are never touched, and nothing is installed: packages are
# downloaded, for the caller to unpack with dpkg-deb -x.
#
# The archive addresses come from this machine's own apt sources: the entry that serves the
# host's release (e.g. bookworm) gives the main archive, the one serving <release>-security
# the security archive; only the suite names change. No mirror is written here.
#
#   tests/apt/suite.sh SUITE update                 fetch SUITE's package lists
#   tests/apt/suite.sh SUITE search REGEX           package names matching REGEX (--names-only)
#   tests/apt/suite.sh SUITE download DIR PKG...    download PKGs into DIR
#   tests/apt/suite.sh SUITE source DIR SRC=VER...  download source packages into DIR (a state
#                                                   of its own, with deb-src entries)
#
# SUITE: a Debian suite (bullseye, bullseye-security, trixie, sid, ...); several may be given
# joined with '+' (bullseye+bullseye-security) to share one state.
set -euo pipefail
cd "$(dirname "$0")/../.."
suites=$1 verb=$2
shift 2
kind=deb
state=$PWD/target/apt/$suites
if [ "$verb" = source ]; then
  kind=deb-src
  state=$state-src
fi
mkdir -p "$state/lists/partial" "$state/cache/archives/partial"

if [ ! -s "$state/sources.list" ]; then
  python3 - "$suites" "$kind" >"$state/sources.list" <<'EOF'
import glob, os, re, sys

wanted = sys.argv[1].split("+")
kind = sys.argv[2]
release = ""
for line in open("/etc/os-release"):
    if line.startswith("VERSION_CODENAME="):
        release = line.split("=", 1)[1].strip().strip('"')
entries = []  # (uris, suites, signed_by)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields, key = {}, None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0].isspace() and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            entries.append((fields.get("uris", "").split(), fields.get("suites", "").split(),
                            fields.get("signed-by", "")))
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    if not os.path.exists(path):
        continue
    for raw in open(path):
        words = raw.split("#", 1)[0].split()
        if len(words) >= 3 and words[0] == "deb":
            opts = ""
            if words[1].startswith("["):
                opts = words[1]
                words = [words[0]] + words[2:]
            m = re.search(r"signed-by=([^\] ]+)", opts)
            entries.append(([words[1]], [words[2]], m.group(1) if m else ""))

def archive(security):
    want = f"{release}-security" if security else release
    for uris, suites, signed in entries:
        if want in suites:
            return uris[0], signed
    sys.exit(f"no apt source of this machine serves {want}: cannot derive the archive")

for suite in wanted:
    uri, signed = archive(suite.endswith("-security"))
    # bullseye-security and later live at <release>-security; the keyring the host trusts
    # for Debian signs every supported suite.
    opt = f" [signed-by={signed}]" if signed else ""
    print(f"{kind}{opt} {uri} {suite} main")
EOF
fi

apt_opts=(
  -o "Dir::Etc::SourceList=$state/sources.list"
  -o "Dir::Etc::SourceParts=/nonexistent"
  -o "Dir::State::Lists=$state/lists"
  -o "Dir::State::status=/dev/null"
  -o "Dir::Cache=$state/cache"
  -o "Dir::Cache::archives=$state/cache/archives"
  -o "APT::Get::List-Cleanup=0"
)
case $verb in
  update)
    # One update of a suite's state at a time (tests fetch concurrently).
    exec 8>"$state/update.lock"
    flock 8
    apt-get "${apt_opts[@]}" -q update >"$state/update.log" 2>&1 ||
      { cat "$state/update.log" >&2; exit 1; }
    ;;
  search)
    apt-cache "${apt_opts[@]}" search --names-only "$1" | awk '{print $1}' | sort -V
    ;;
  download)
    dir=$1
    shift
    mkdir -p "$dir"
    (cd "$dir" && apt-get "${apt_opts[@]}" -q download "$@" 2>&1 |
      grep -v '^W: Download is performed unsandboxed' || true)
    for p in "$@"; do
      ls "$dir/${p%%=*}"_*.deb >/dev/null 2>&1 || { echo "download of $p failed" >&2; exit 1; }
    done
    ;;
  source)
    dir=$1
    shift
    mkdir -p "$dir"
    exec 8>"$state/update.lock"
    flock 8
    [ -e "$state/lists/lock" ] || apt-get "${apt_opts[@]}" -q update >"$state/update.log" 2>&1 ||
      { cat "$state/update.log" >&2; exit 1; }
    (cd "$dir" && apt-get "${apt_opts[@]}" -q source --download-only "$@" 2>&1 |
      grep -v '^W: Download is performed unsandboxed' || true)
    # Every file the .dsc names (orig tarball, Debian changes) must be there, not only the .dsc.
    for p in "$@"; do
      dsc=$(ls "$dir/${p%%=*}"_*.dsc 2>/dev/null | head -n1)
      [ -n "$dsc" ] || { echo "download of the source of $p failed" >&2; exit 1; }
      for f in $(awk '/^Files:/ { on = 1; next } /^[^ ]/ { on = 0 } on { print $3 }' "$dsc"); do
        [ -s "$dir/$f" ] || { echo "source of $p: $f is missing (the archive did not serve it)" >&2; exit 1; }
      done
    done
    ;;
  *)
    echo "unknown verb $verb" >&2
    exit 2
    ;;
esac
