#!/usr/bin/env bash
# The main job, until `pagewire demo` exists: generate a 256 MiB guest memory
# file (random pages, zero pages and a sparse hole), serve it with
# `pagewire serve` to a client process that restores it exactly as Firecracker
# does (regions mapped, userfaultfd registered, fd + JSON sent over the
# socket), check every byte, and print what happened on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p pagewire
bin=target/release/pagewire
work=$(mktemp -d /tmp/pagewire-demo.XXXXXX)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== generating a 256 MiB memory file in $work"
mem=$work/mem
python3 - "$mem" <<'PY'
import os, random, sys
random.seed(7)
with open(sys.argv[1], "wb") as f:
    for mib in range(192):             # 192 MiB of data ...
        chunk = bytearray(os.urandom(1 << 20))
        for page in range(0, 256, 4):  # ... with every 4th page zero
            chunk[page * 4096:(page + 1) * 4096] = bytes(4096)
        f.write(chunk)
    f.truncate(256 << 20)              # ... and a 64 MiB hole at the end
PY

echo "== starting: pagewire serve --socket $work/uffd.sock --mem-file $mem"
PAGEWIRE_LOG=info "$bin" serve --socket "$work/uffd.sock" --mem-file "$mem" \
  --stats-json "$work/stats.jsonl" --exit-after 1 &
server=$!
for _ in $(seq 200); do [ -S "$work/uffd.sock" ] && break; sleep 0.05; done

echo "== a client restores the VM's memory (2 regions, 2 threads touching every page)"
"$bin" fc-client --socket "$work/uffd.sock" --mem-file "$mem" --regions 2 --threads 2 \
  > "$work/client.json"
wait "$server"
python3 - "$work/client.json" "$work/stats.jsonl" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
s = json.loads(open(sys.argv[2]).readline())
st = s["stats"]
print(f"client: {c['pages_verified']} of {c['pages_total']} pages verified against the file, "
      f"{c['mismatched_pages']} mismatched; touched at {c.get('touch_mib_per_s', 0):.0f} MiB/s")
print(f"server: VM pid {s['pid']} ended ({s['reason']}); {st['faults']} faults, "
      f"{st['pages_copied']} pages copied, {st['pages_zeroed']} zero pages mapped without a copy, "
      f"{st['pages_fault_around']} served around faults, errors {st['errors']}")
lat = st["first_touch_latency"]
print(f"server: fault-to-mapped latency p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us, max {lat['max_us']:.0f} us")
sys.exit(0 if c["mismatched_pages"] == 0 and st["errors"] == 0 else 1)
PY
