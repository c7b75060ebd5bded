#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this). Works on a fresh Debian 12
# machine with the Rust toolchain: installs what the tests need when it is missing.
#
# The engine tests run every scenario as uid 65534 without capabilities (via setpriv) and,
# when this runs as root, as root too. As a normal user they run unprivileged only and say so.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
[ -x /usr/bin/python3 ] || need+=(python3)
# Runtimes the engine breadth tests checkpoint (tests/breadth.rs).
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
command -v perl >/dev/null 2>&1 || need+=(perl)
command -v ruby >/dev/null 2>&1 || need+=(ruby)
command -v php >/dev/null 2>&1 || need+=(php-cli)
/usr/bin/python3 -c 'import numpy' >/dev/null 2>&1 || need+=(python3-numpy)
[ -e /usr/lib/x86_64-linux-gnu/openblas-pthread ] || need+=(libopenblas0-pthread)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing test dependencies: ${need[*]}"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
fi

# A real S3 server for the S3 store tests (tests/s3.rs): s3s-fs, which enforces
# If-None-Match like AWS S3. About 2.5 minutes to build the first time.
s3s="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
if ! [ -x "$s3s" ] || ! "$s3s" --version 2>/dev/null | grep -q '0\.14\.1'; then
    echo "installing s3s-fs 0.14.1 (the S3 server the tests use)"
    cargo install s3s-fs@0.14.1 --features binary --locked --quiet
fi

make -s -C examples
cargo fmt --all --check
# The agent and the restorer are no_std with their own panic handler: lint them as built
# (profile `engine`), without test targets.
cargo clippy --workspace --all-targets --locked --exclude limitless-agent --exclude limitless-restorer -- -D warnings
cargo clippy -p limitless-agent -p limitless-restorer --profile engine --locked -- -D warnings
cargo test --workspace --locked
