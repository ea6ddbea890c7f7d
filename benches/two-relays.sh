#!/usr/bin/env bash
# What a relay on the JetStream store receives from NATS per message it delivers, alone and as
# one of two relays on the same store each serving half of the sessions (docs/SCALING.md): a
# relay subscribes to the mailboxes it delivers from only, so the second figure should not grow
# with the number of relays.
#
#   benches/two-relays.sh [--duration 5s] [--warmup 2s] [--scenario "16:16:100"] [--no-build]
#
# One nats-server (`.ci/nats-server`) and the relays pinned to CPU 1, the load generator to CPU
# 0. Prints a table; each relay's figures come from its /metrics (botd_jetstream_bytes_total,
# botd_messages_delivered_total) before and after the run.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=5s
warmup=2s
scenario="16:16:100"
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --scenario) scenario=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "two-relays.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ "$build" = 1 ]; then cargo build --release --quiet --bin botd-relay --bin botd; fi
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=${target_dir:-target}/release
nats_server=$(.ci/nats-server 2>/dev/null)
pin_server=(); pin_client=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then pin_server=(taskset -c 1); pin_client=(taskset -c 0); fi

tmp=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
await_line() { # FILE PATTERN
    for _ in $(seq 150); do
        if grep -m1 -E "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "two-relays.sh: nothing matching '$2' in $1" >&2; return 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"${pin_server[@]}" "$nats_server" -a 127.0.0.1 -p -1 -js -sd "$tmp/nats" >"$tmp/nats.log" 2>&1 &
pids+=("$!")
line=$(await_line "$tmp/nats.log" "Listening for client connections on")
nats_addr=${line##* on }
unlimited='{ per_second = 100000000.0, burst = 100000000 }'
declare -A addr_of key_of metrics_of
start_relay() { # NAME PREFIX
    local port; port=$(free_port)
    env BOTD_STORE="nats://$nats_addr" BOTD_NATS_PREFIX="$2" \
        BOTD_SEND_RATE_PER_IDENTITY="$unlimited" BOTD_SEND_RATE_PER_PAIR="$unlimited" \
        BOTD_SEND_RATE_PER_IP="$unlimited" BOTD_ACK_RATE_PER_IDENTITY="$unlimited" \
        BOTD_MAILBOX_MAX_MESSAGES=100000 BOTD_METRICS_LISTEN="127.0.0.1:$port" BOTD_LOG=warn \
        "${pin_server[@]}" "$bin/botd-relay" --listen 127.0.0.1:0 --data-dir "$tmp/$1" \
        >"$tmp/$1.out" 2>"$tmp/$1.err" &
    pids+=("$!")
    local words
    read -r -a words <<<"$(await_line "$tmp/$1.out" "^botd-relay listening on ")"
    addr_of[$1]=${words[3]}; key_of[$1]=${words[5]}; metrics_of[$1]=127.0.0.1:$port
}
# Bytes received from NATS and messages delivered, from a relay's metrics.
counters() { # NAME
    python3 - "${metrics_of[$1]}" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
bytes_in = delivered = 0.0
for line in text.splitlines():
    if line.startswith('botd_jetstream_bytes_total{direction="in"}'):
        bytes_in = float(line.split()[-1])
    elif line.startswith("botd_messages_delivered_total"):
        delivered = float(line.split()[-1])
print(f"{bytes_in:.0f} {delivered:.0f}")
PY
}
IFS=: read -r s r payload <<<"$scenario"
run() { # LABEL RELAY [ALSO]
    local also=()
    if [ -n "${3:-}" ]; then also=(--also "${addr_of[$3]}=${key_of[$3]}"); fi
    "${pin_client[@]}" "$bin/botd" bench relay "${addr_of[$2]}" --server-key "${key_of[$2]}" \
        -s "$s" -r "$r" --payload "$payload" --duration "$duration" --warmup "$warmup" \
        --quiet "${also[@]}" >"$tmp/$1.bench" 2>&1 \
        || { cat "$tmp/$1.bench" >&2; exit 1; }
}
start_relay alone p1
sleep 1
read -r b0 d0 <<<"$(counters alone)"
run alone alone
sleep 2 # the metrics are refreshed every second
read -r b1 d1 <<<"$(counters alone)"
start_relay a p2
start_relay b p2
sleep 1
read -r ab0 ad0 <<<"$(counters a)"; read -r bb0 bd0 <<<"$(counters b)"
run pair a b
sleep 2
read -r ab1 ad1 <<<"$(counters a)"; read -r bb1 bd1 <<<"$(counters b)"
python3 - "$b0" "$d0" "$b1" "$d1" "$ab0" "$ad0" "$ab1" "$ad1" "$bb0" "$bd0" "$bb1" "$bd1" "$scenario" <<'PY'
import sys
v = list(map(float, sys.argv[1:13]))
alone = (v[2] - v[0]) / max(v[3] - v[1], 1)
a = (v[6] - v[4]) / max(v[7] - v[5], 1)
b = (v[10] - v[8]) / max(v[11] - v[9], 1)
print(f"| {sys.argv[13]} | bytes from NATS per delivered message | ratio to one relay alone |")
print("| --- | ---: | ---: |")
print(f"| one relay, every session | {alone:.0f} ({v[3]-v[1]:.0f} delivered) | 1.00 |")
print(f"| relay a of two, half the sessions | {a:.0f} ({v[7]-v[5]:.0f} delivered) | {a/alone:.2f} |")
print(f"| relay b of two, half the sessions | {b:.0f} ({v[11]-v[9]:.0f} delivered) | {b/alone:.2f} |")
PY
