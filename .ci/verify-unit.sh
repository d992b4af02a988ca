#!/usr/bin/env bash
# Check deploy/reverse-proxy.service with `systemd-analyze verify`.
#
# Usage: .ci/verify-unit.sh PATH/TO/reverse-proxy [UNIT-FILE]
#
# The unit runs /usr/local/bin/reverse-proxy, and `systemd-analyze verify`
# reports an error when an Exec*= binary does not exist. So that the check
# works without installing anything to /usr/local/bin, the unit is copied to
# a temporary directory (keeping its name, reverse-proxy.service) with that
# path rewritten to a link to the given binary. Nothing else in the unit is
# changed.
#
# `systemd-analyze verify` exits 0 on many problems in a unit (an unknown or
# misspelt directive, a bad value: it says "ignoring" and carries on), so any
# output at all counts as a failure, not just the exit status.
set -euo pipefail

usage() {
    echo "usage: $0 PATH/TO/reverse-proxy [UNIT-FILE]" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
binary=$1
unit=${2:-$repo_root/deploy/reverse-proxy.service}
installed_path=/usr/local/bin/reverse-proxy

[[ -f $binary && -x $binary ]] || { echo "error: $binary is not an executable file" >&2; exit 2; }
[[ -f $unit ]] || { echo "error: unit file $unit not found" >&2; exit 2; }
binary=$(realpath "$binary")

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}
apt_install() {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-analyze not found, installing the systemd package" >&2
    apt_install systemd
    command -v systemd-analyze >/dev/null 2>&1 || { echo "error: systemd-analyze still not found" >&2; exit 1; }
fi
# ExecReload= uses /bin/kill (Debian package procps). verify checks that it
# exists, and so does systemd at run time.
if [[ ! -x /bin/kill ]]; then
    echo "/bin/kill not found, installing the procps package" >&2
    apt_install procps
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The temporary path goes into Exec*= lines unquoted: keep it free of spaces
# and of characters systemd treats specially (%, $, quotes).
[[ $tmp =~ ^[A-Za-z0-9/._-]+$ ]] || { echo "error: unusable temporary directory $tmp" >&2; exit 1; }
ln -s "$binary" "$tmp/reverse-proxy"

# The unit must start the binary at the installed path; otherwise the
# rewrite below would silently check something else.
for key in ExecStartPre ExecStart; do
    if ! grep -q "^$key=$installed_path " "$unit"; then
        echo "error: $unit has no '$key=$installed_path ...' line" >&2
        exit 1
    fi
done

checked=$tmp/reverse-proxy.service
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line == Exec*=* ]]; then
        line=${line//"$installed_path"/"$tmp/reverse-proxy"}
    fi
    printf '%s\n' "$line"
done <"$unit" >"$checked"

status=0
output=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$checked" 2>&1) || status=$?

if [[ $status -ne 0 || -n $output ]]; then
    echo "FAIL: systemd-analyze verify $unit (exit status $status):" >&2
    # Show the paths of the repository's unit and of the installed binary,
    # not those of the temporary copy.
    output=${output//"$checked"/"$unit"}
    printf '%s\n' "${output//"$tmp/reverse-proxy"/"$installed_path"}" >&2
    exit 1
fi
echo "OK: systemd-analyze verify $unit"
