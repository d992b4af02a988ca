#!/usr/bin/env bash
# Builds reverse-proxy with profile-guided optimisation: an instrumented
# build serves the benchmark's load (bench/train.py), and the release build
# is then compiled with the profile it wrote.
#
#   bench/pgo.sh            -> target/pgo/reverse-proxy
#
# Needs llvm-profdata matching rustc's LLVM (`rustup component add
# llvm-tools`), and what bench/train.py needs: wrk, h2load and openssl
# (Debian: wrk, nghttp2-client, openssl). Takes two release builds.
set -euo pipefail
cd "$(dirname "$0")/.."

profdata=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -1)
if [[ -z $profdata ]]; then
    echo "bench/pgo.sh needs llvm-profdata: rustup component add llvm-tools" >&2
    exit 1
fi
for tool in wrk h2load openssl taskset; do
    command -v "$tool" >/dev/null || { echo "bench/pgo.sh needs $tool" >&2; exit 1; }
done

dir=$PWD/target/pgo
rm -rf "$dir/profiles" "$dir/merged.profdata"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$dir/profiles" \
    cargo build --release --locked --bin reverse-proxy --target-dir "$dir/generate" >&2
cargo build --release --locked --example bench_upstream >&2
PYTHONDONTWRITEBYTECODE=1 python3 bench/train.py --rp-bin "$dir/generate/release/reverse-proxy" >&2
"$profdata" merge -o "$dir/merged.profdata" "$dir/profiles"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$dir/merged.profdata" \
    cargo build --release --locked --bin reverse-proxy --target-dir "$dir/use" >&2
cp "$dir/use/release/reverse-proxy" "$dir/reverse-proxy"
echo "target/pgo/reverse-proxy"
