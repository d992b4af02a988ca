#!/usr/bin/env bash
# Builds reverse-proxy with profile-guided optimisation: an instrumented
# build serves the benchmark's load (bench/train.py), and the release build
# is then compiled with the profile it wrote.
#
#   bench/pgo.sh            -> target/pgo/reverse-proxy
#   bench/pgo.sh --check    exits 0 if llvm-profdata is installed
#
# Needs llvm-profdata matching rustc's LLVM (`rustup component add
# llvm-tools`), and what bench/train.py needs: two CPUs, python3, taskset,
# wrk, h2load and openssl (Debian: wrk, nghttp2-client, openssl). Takes two
# release builds. It sets RUSTFLAGS, so flags from a cargo config's
# `[build] rustflags` are not applied.
set -euo pipefail
cd "$(dirname "$0")/.."

profdata=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -n 1 || true)
if [[ ${1:-} == --check ]]; then
    [[ -n $profdata ]]
    exit
fi
if [[ -z $profdata ]]; then
    echo "bench/pgo.sh needs llvm-profdata: rustup component add llvm-tools" >&2
    exit 1
fi
for tool in python3 taskset wrk h2load openssl; do
    command -v "$tool" >/dev/null || { echo "bench/pgo.sh needs $tool" >&2; exit 1; }
done

# With an explicit target, RUSTFLAGS reach only what is built for it, not
# build scripts and proc-macros, which would otherwise write profiles of
# their own runs during the build.
host=$(rustc -vV | sed -n 's/^host: //p')
dir=$PWD/target/pgo
# Cargo does not rebuild dependencies when only the profile changed.
rm -rf "$dir/profiles" "$dir/merged.profdata" "$dir/use" "$dir/reverse-proxy"
unset LLVM_PROFILE_FILE
RUSTFLAGS="-Cprofile-generate=$dir/profiles" cargo build --release --locked \
    --bin reverse-proxy --target "$host" --target-dir "$dir/generate" >&2
cargo build --release --locked --example bench_upstream >&2
PYTHONDONTWRITEBYTECODE=1 python3 bench/train.py \
    --rp-bin "$dir/generate/$host/release/reverse-proxy" >&2
if ! compgen -G "$dir/profiles/*.profraw" >/dev/null; then
    echo "bench/pgo.sh: the training load wrote no profile" >&2
    exit 1
fi
"$profdata" merge -o "$dir/merged.profdata" "$dir/profiles" >&2
RUSTFLAGS="-Cprofile-use=$dir/merged.profdata" cargo build --release --locked \
    --bin reverse-proxy --target "$host" --target-dir "$dir/use" >&2
cp "$dir/use/$host/release/reverse-proxy" "$dir/reverse-proxy"
echo "target/pgo/reverse-proxy"
