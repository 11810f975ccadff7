#!/usr/bin/env bash
# Hierarchical aggregation across processes on this machine: one top fl-server and two leaf
# fl-servers on 127.0.0.1, N fl-client processes split across the leaves, FedAvg on MNIST
# partitions (IID), R rounds. Each leaf runs every round among its own clients on its aggregation
# runtime and forwards the partial aggregate (f64 sums and total weight, never an average) to the
# top over mutual-TLS QUIC; the top merges the two partials and applies FedAvg once.
#
#   examples/hierarchical-federation.sh [--clients N] [--rounds R] [--out DIR] [--data-dir DATA]
#                                       [--partition iid|shards|dirichlet:ALPHA] [--bin-dir DIR]
#
# Defaults: 6 clients (3 per leaf), 3 rounds, runs/hierarchical-federation, data from $SHOAL_DATA
# (a folder holding mnist/, e.g. ../shared/data). Binaries are built in release mode unless
# --bin-dir names a folder holding fl-server and fl-client. Everything started is stopped on exit.
#
# Every server keeps the updates it folds ([storage] keep_updates). After the run,
# `fl-server audit` folds, for every version, all the clients' updates kept by the two leaves flat
# in one accumulator, applies FedAvg to the top's version before, and compares with the version
# the top committed: summary.json's `flat_max_abs_diff` is the largest difference over all
# versions (the run fails if it exceeds 1e-6).
#
# Writes DIR/summary.json (the fields of local-federation.sh's summary — rounds, initial_accuracy,
# final_accuracy, bytes_up, bytes_down, wall_time_s, clients, the top's runtime figures — plus
# leaves and flat_max_abs_diff), DIR/top/ and DIR/leaf-{0,1}/ (data directories) and DIR/logs/.
set -euo pipefail

clients=6
rounds=3
out=runs/hierarchical-federation
data_dir=${SHOAL_DATA:-}
partition=iid
bin_dir=
timeout_s=600
leaves=2

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --clients) clients=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

[[ "$clients" =~ ^[1-9][0-9]*$ ]] && ((clients >= leaves)) || { echo "--clients must be an integer >= $leaves" >&2; exit 2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
if [[ -z "$data_dir" ]]; then
    echo "no data: pass --data-dir DIR or set SHOAL_DATA=DIR, where DIR holds mnist/ (in a checkout: ../shared/data)" >&2
    exit 2
fi
if [[ ! -d "$data_dir/mnist" ]]; then
    echo "$data_dir/mnist is missing: the data root must hold the MNIST IDX files under mnist/" >&2
    exit 2
fi
data_dir=$(cd "$data_dir" && pwd)

repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "$bin_dir" ]]; then
    echo "building fl-server and fl-client (release)…" >&2
    (cd "$repo" && cargo build --release --quiet -p shoal-server -p shoal-client)
    bin_dir="$repo/target/release"
fi
server_bin="$bin_dir/fl-server"
client_bin="$bin_dir/fl-client"
for b in "$server_bin" "$client_bin"; do
    [[ -x "$b" ]] || { echo "$b is missing (build it, or drop --bin-dir)" >&2; exit 2; }
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/top" "$out"/leaf-* "$out/logs" "$out/summary.json"
mkdir -p "$out/logs"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits for a server's data directory to name its QUIC address; prints it.
listening() {
    local dir=$1 pid=$2 log=$3
    for _ in $(seq 1 300); do
        [[ -s "$dir/listening" ]] && { cat "$dir/listening"; return; }
        kill -0 "$pid" 2>/dev/null || { echo "fl-server exited; see $log" >&2; tail -5 "$log" >&2; exit 1; }
        sleep 0.1
    done
    echo "fl-server did not start listening; see $log" >&2
    exit 1
}

# The top: its clients are the leaves (a round is one partial from each), it evaluates every version.
"$server_bin" init "$out/top" --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out/logs/init.log"
leaf_names=$(seq -f '"leaf-%g"' 0 $((leaves - 1)) | paste -sd, -)
sed -i \
    -e "s/^rounds = .*/rounds = $rounds/" \
    -e "s/^clients_per_round = .*/clients_per_round = $leaves/" \
    -e "s/^keep_updates = .*/keep_updates = true/" \
    "$out/top/server.toml"
printf '\n[federation]\nrole = "top"\nleaves = [%s]\n' "$leaf_names" >> "$out/top/server.toml"
for ((l = 0; l < leaves; l++)); do
    "$server_bin" issue-client "$out/top" "leaf-$l" >> "$out/logs/init.log"
done

start=$(date +%s.%N)
SHOAL_DATA="$data_dir" "$server_bin" run "$out/top" > "$out/logs/top.json" 2> "$out/logs/top.log" &
top_pid=$!
pids+=("$top_pid")
top_address=$(listening "$out/top" "$top_pid" "$out/logs/top.log")
echo "top fl-server on $top_address" >&2

# The leaves: each accepts its share of the clients and runs their rounds from the top's models.
client=0
leaf_pids=()
for ((l = 0; l < leaves; l++)); do
    dir="$out/leaf-$l"
    share=$(( clients / leaves + (l < clients % leaves ? 1 : 0) ))
    "$server_bin" init "$dir" --listen 127.0.0.1:0 --admin 127.0.0.1:0 >> "$out/logs/init.log"
    sed -i \
        -e "s/^clients_per_round = .*/clients_per_round = $share/" \
        -e "s/^keep_updates = .*/keep_updates = true/" \
        -e '/^\[eval\]/,/^\[/ s/^enabled = true/enabled = false/' \
        "$dir/server.toml"
    printf '\n[federation]\nrole = "leaf"\ntop = "%s"\nidentity = "%s"\n' \
        "$top_address" "$out/top/clients/leaf-$l" >> "$dir/server.toml"
    SHOAL_DATA="$data_dir" "$server_bin" run "$dir" > "$out/logs/leaf-$l.json" 2> "$out/logs/leaf-$l.log" &
    pid=$!
    pids+=("$pid")
    leaf_pids+=("$pid")
    address=$(listening "$dir" "$pid" "$out/logs/leaf-$l.log")
    echo "leaf-$l fl-server on $address; starting $share clients" >&2
    for ((j = 0; j < share; j++, client++)); do
        "$server_bin" issue-client "$dir" "device-$client" >> "$out/logs/init.log"
        "$client_bin" run --server "$address" --server-name localhost \
            --identity "$dir/clients/device-$client" \
            --data-dir "$data_dir" --partition "$partition" --num-clients "$clients" --index "$client" \
            > "$out/logs/client-$client.json" 2> "$out/logs/client-$client.log" &
        pids+=("$!")
    done
done

deadline=$((SECONDS + timeout_s))
while kill -0 "$top_pid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
        echo "the run did not finish within ${timeout_s} s; see $out/logs/" >&2
        exit 1
    fi
    sleep 0.2
done
wait "$top_pid" || { echo "the top fl-server failed; see $out/logs/top.log" >&2; tail -5 "$out/logs/top.log" >&2; exit 1; }
for ((l = 0; l < leaves; l++)); do
    wait "${leaf_pids[$l]}" || { echo "leaf-$l failed; see $out/logs/leaf-$l.log" >&2; tail -5 "$out/logs/leaf-$l.log" >&2; exit 1; }
done
failed=0
for pid in "${pids[@]:$((1 + leaves))}"; do
    wait "$pid" || failed=$((failed + 1))
done
end=$(date +%s.%N)
((failed == 0)) || echo "warning: $failed client(s) exited with an error; see $out/logs/" >&2

summary="$out/top/summary.json"
[[ -s "$summary" ]] || { echo "the top wrote no summary; see $out/logs/top.log" >&2; exit 1; }

# Every version against the flat aggregation of the clients' updates the leaves kept.
leaf_flags=()
for ((l = 0; l < leaves; l++)); do leaf_flags+=(--leaf "$out/leaf-$l"); done
versions=$(grep -o '"rounds": *[0-9]*' "$summary" | grep -o '[0-9]*$')
worst=0
for ((v = 1; v <= versions; v++)); do
    "$server_bin" audit "$out/top" "${leaf_flags[@]}" --version "$v" --json > "$out/logs/audit-$v.json" \
        || { echo "version $v differs from the flat aggregation: $(cat "$out/logs/audit-$v.json")" >&2; exit 1; }
    diff=$(grep -o '"max_abs_diff": *[0-9.e+-]*' "$out/logs/audit-$v.json" | grep -o '[0-9.e+-]*$')
    worst=$(awk -v a="$worst" -v b="$diff" 'BEGIN { print (b > a ? b : a) }')
done
echo "every version equals the flat aggregation of the same $clients clients' updates (max |difference| $worst)" >&2

wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
sed -e '$d' "$summary" | sed -e '$s/$/,/' > "$out/summary.json"
printf '  "wall_time_s": %s,\n  "clients": %s,\n  "leaves": %s,\n  "flat_max_abs_diff": %s\n}\n' \
    "$wall" "$clients" "$leaves" "$worst" >> "$out/summary.json"
cat "$out/summary.json"
