#!/usr/bin/env bash
# libFuzzer on the stable toolchain, for fedrun's fuzz crates (crates/fedrun-fobs/fuzz,
# crates/fedrun-wire/fuzz). `cargo fuzz` itself needs a nightly compiler (-Zsanitizer), which this
# project does not use; libFuzzer only needs the coverage instrumentation, and that is a stable
# codegen pass (sancov-module). So this builds the targets with the flags `cargo fuzz build -s none`
# would use, and runs the binaries directly (they are libFuzzer executables: every libFuzzer flag
# works). Address sanitizing is left out (stable cannot), which costs little here: the crates
# forbid unsafe code, so what the fuzzer looks for is panics, aborts, hangs and memory blow-ups.
#
#   stable-fuzz.sh build <fuzz-dir>                      build every target of that fuzz crate
#   stable-fuzz.sh seed  <fuzz-dir>                      write seed corpora from tests/data
#   stable-fuzz.sh run   <fuzz-dir> <target> [flags]     build, seed, run (libFuzzer flags after)
#
# e.g.  crates/fedrun-fobs/fuzz/stable-fuzz.sh run crates/fedrun-wire/fuzz frame -runs=1000000
set -euo pipefail

usage() { sed -n '9,13p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(cd "$2" && pwd)
shift 2
root=$(cd "$(dirname "$0")/../../.." && pwd)
triple=$(rustc -vV | sed -n 's/^host: //p')

build() {
    # only the fuzz crate's own code and the crates under test need coverage, but instrumenting
    # every dependency is what cargo-fuzz does too; RUSTFLAGS with an explicit --target leaves
    # build scripts and proc macros uninstrumented (they run on the host)
    RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
        cargo build --manifest-path "$dir/Cargo.toml" --release --target "$triple" --bins
}

seed() {
    python3 - "$root/tests/data/nvflare-2.9" "$dir/corpus" "$dir"/fuzz_targets/*.rs <<'PY'
import hashlib, json, os, sys
data, out = sys.argv[1], sys.argv[2]
targets = {os.path.basename(p)[:-3] for p in sys.argv[3:]}
def put(target, blob):
    if target not in targets:
        return
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(blob).hexdigest()), "wb") as f:
        f.write(blob)
for line in open(os.path.join(data, "fobs_vectors.jsonl")):
    if line.strip():
        put("decode", bytes.fromhex(json.loads(line)["lobs_hex"]))
for name in sorted(os.listdir(data)):
    if not name.endswith("_frames.jsonl"):
        continue
    hello = {}
    for line in open(os.path.join(data, name)):
        f = json.loads(line)
        if "hex" not in f:
            continue
        blob = bytes.fromhex(f["hex"])
        if len(blob) > 65536:
            continue
        put("frame", blob)
        key = (f["conn"], f["dir"])
        if blob[6:7] == b"\x04":  # HELLO
            hello[key] = blob
            put("handshake", blob)
        elif key in hello:
            put("handshake", hello[key] + blob)
PY
}

case $cmd in
    build) build ;;
    seed) seed ;;
    run)
        [ $# -ge 1 ] || usage
        target=$1
        shift
        build
        seed
        mkdir -p "$dir/corpus/$target" "$dir/artifacts/$target"
        "$dir/target/$triple/release/$target" -artifact_prefix="$dir/artifacts/$target/" \
            "$@" "$dir/corpus/$target"
        ;;
    *) usage ;;
esac
