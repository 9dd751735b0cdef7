#!/usr/bin/env bash
# Builds the Debian package of mppd (target/debian/mppd_<version>_<arch>.deb):
# the binaries, then the generated files the package ships (man pages and
# shell completions from the clap definitions, /etc/mppd/mppd.toml from
# `mppd config example` with data_dir = /var/lib/mppd), then cargo-deb
# with the metadata in Cargo.toml ([package.metadata.deb]).
#
#   packaging/build-deb.sh                # release build
#   packaging/build-deb.sh --profile dev  # from the debug build (tests)
#
# Needs cargo-deb (`cargo install cargo-deb`).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = "--profile" ]; then
    profile="${2:?--profile needs a name}"
fi
case "$profile" in
    dev) bindir=target/debug ;;
    *) bindir="target/$profile" ;;
esac

cargo build --profile "$profile" --bin mppd --bin mpp

out=target/packaging
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bindir/mppd" manpage "$out/man"
"$bindir/mpp" manpage "$out/man"
gzip -9n "$out"/man/*.1
for tool in mppd mpp; do
    "$bindir/$tool" completions bash > "$out/completions/$tool.bash"
    "$bindir/$tool" completions zsh > "$out/completions/_$tool"
    "$bindir/$tool" completions fish > "$out/completions/$tool.fish"
done
"$bindir/mppd" config example \
    | sed 's#^data_dir = .*#data_dir = "/var/lib/mppd"#' > "$out/mppd.toml"
grep -q '^data_dir = "/var/lib/mppd"$' "$out/mppd.toml"
"$bindir/mppd" config check "$out/mppd.toml" >/dev/null

# --strip: the release profile keeps debug info for perf (150 MB a binary);
# the package ships the binaries without it.
cargo deb -p mpp --no-build --strip --profile "$profile"
