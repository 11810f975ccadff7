#!/usr/bin/env bash
# Hierarchical aggregation across processes on this machine: one top fl-server and two leaf
# fl-servers on 127.0.0.1, N fl-client processes split across the leaves, FedAvg on MNIST
# partitions (IID), R rounds. Each leaf runs every round among its own clients on its aggregation
# runtime and forwards the partial aggregate (f64 sums and total weight, never an average) to the
# top over mutual-TLS QUIC; the top merges the two partials and applies FedAvg once.
#
#   examples/hierarchical-federation.sh [--clients N | --leaf-clients A,B,...] [--rounds R]
#                                       [--out DIR] [--data-dir DATA] [--bin-dir DIR]
#                                       [--partition iid|shards|dirichlet:ALPHA]
#
# --leaf-clients gives each leaf its number of clients (one leaf per entry) instead of N split
# evenly over two leaves. Defaults: 6 clients (3 per leaf), 3 rounds, runs/hierarchical-federation, data from $SHOAL_DATA
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
# final_accuracy, bytes_up, bytes_down, wall_time_s, deployment_wall_s, clients, the top's runtime
# figures — plus leaves and flat_max_abs_diff), DIR/top/ and DIR/leaf-*/ (data directories), DIR/logs/ (with
# audit-VERSION.json, the audit of each version).
set -euo pipefail

clients=6
rounds=3
out=runs/hierarchical-federation
data_dir=${SHOAL_DATA:-}
partition=iid
bin_dir=
timeout_s=600
leaves=2

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
leaf_clients=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --clients) clients=$2; shift 2 ;;
        --leaf-clients) leaf_clients=$2; shift 2 ;;
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

shares=()
if [[ -n "$leaf_clients" ]]; then
    [[ "$leaf_clients" =~ ^[1-9][0-9]*(,[1-9][0-9]*)+$ ]] || { echo "--leaf-clients takes two or more positive counts, e.g. 2,3" >&2; exit 2; }
    IFS=, read -r -a shares <<< "$leaf_clients"
    leaves=${#shares[@]}
    clients=0
    for n in "${shares[@]}"; do clients=$((clients + n)); done
else
    [[ "$clients" =~ ^[1-9][0-9]*$ ]] && ((clients >= leaves)) || { echo "--clients must be an integer >= $leaves" >&2; exit 2; }
    for ((l = 0; l < leaves; l++)); do shares+=($(( clients / leaves + (l < clients % leaves ? 1 : 0) ))); done
fi
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
source "$(dirname "$0")/deployment-common.sh"
require_data "$data_dir"

find_binaries "$bin_dir"

mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/top" "$out"/leaf-* "$out/logs" "$out/summary.json"
mkdir -p "$out/logs"

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
    share=${shares[$l]}
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

wait_for_exit "$top_pid" "$timeout_s" "$out/logs/"
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
printf '  "deployment_wall_s": %s,\n  "clients": %s,\n  "leaves": %s,\n  "flat_max_abs_diff": %s\n}\n' \
    "$wall" "$clients" "$leaves" "$worst" >> "$out/summary.json"
cat "$out/summary.json"
