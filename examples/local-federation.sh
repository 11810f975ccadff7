#!/usr/bin/env bash
# A real deployment on this machine: one fl-server and N fl-client processes on 127.0.0.1, mutual
# TLS with certificates issued for the run, FedAvg on MNIST partitions (IID), R rounds.
#
#   examples/local-federation.sh [--clients N] [--rounds R] [--out DIR] [--data-dir DATA]
#                                [--partition iid|shards|dirichlet:ALPHA] [--bin-dir DIR]
#                                [--split [--pipeline P] [--local-steps K]] [--config FILE]
#
# --config FILE deploys an fl-sim experiment instead: the server takes FILE's seed, codec,
# feedback, [data], [model] and [algorithm] (`fl-sim deployment FILE`), and client i trains share
# i of FILE's [data] partition. N defaults to the clients a synchronous round of FILE needs.
#
# --split runs split learning instead (SplitFed V1): the clients run the head of the FedAvg CNN
# up to its first conv block plus a 4-channel bottleneck and send 8-bit activations; the server
# runs the tail. P minibatches of 32 stay in flight per client (default 4), K per round (40).
#
# Defaults: 5 clients, 3 rounds, runs/local-federation, data from $SHOAL_DATA (a folder holding
# mnist/, e.g. ../shared/data). Binaries are built in release mode unless --bin-dir names a folder
# holding fl-server and fl-client. Everything started is stopped on exit, also on Ctrl-C.
#
# Writes DIR/summary.json (the server's summary — rounds, initial_accuracy, final_accuracy,
# bytes_up, bytes_down, wall_time_s, … as README's metrics table says — plus deployment_wall_s,
# the whole deployment's wall time, and clients; with --split also the clients' mean training
# throughput split_samples_per_s and the pipeline depth), DIR/server/ (the server's data directory:
# server.toml, certificates, state/, metrics.jsonl) and DIR/logs/.
set -euo pipefail

clients=5
rounds=3
out=runs/local-federation
data_dir=${SHOAL_DATA:-}
partition=iid
bin_dir=
timeout_s=600

split=0
config=
clients_given=0
pipeline=4
local_steps=40

usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --clients) clients=$2; clients_given=1; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --split) split=1; shift ;;
        --pipeline) pipeline=$2; shift 2 ;;
        --local-steps) local_steps=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

[[ "$clients" =~ ^[1-9][0-9]*$ ]] || { echo "--clients must be a positive integer" >&2; exit 2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
[[ "$pipeline" =~ ^[1-9][0-9]*$ ]] || { echo "--pipeline must be a positive integer" >&2; exit 2; }
[[ "$local_steps" =~ ^[1-9][0-9]*$ ]] || { echo "--local-steps must be a positive integer" >&2; exit 2; }
[[ -z "$config" || ! "$split" == 1 ]] || { echo "--config and --split do not go together" >&2; exit 2; }
[[ -z "$config" || -f "$config" ]] || { echo "--config $config: no such file" >&2; exit 2; }
source "$(dirname "$0")/deployment-common.sh"
require_data "$data_dir"

find_binaries "$bin_dir" "$([[ -n "$config" ]] && echo with-sim)"

mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/server" "$out/logs" "$out/deployment" "$out/summary.json"
mkdir -p "$out/logs"

# The server listens on free ports the kernel picks; it writes the addresses to server/listening
# and server/admin-listening (`fl-server status DIR/server` asks the latter while it runs).
init_flags=()
dataset=mnist
partition_seed=0
if [[ -n "$config" ]]; then
    # The experiment's run-defining tables for the server, its partition for the clients.
    "$sim_bin" deployment "$config" --out "$out/deployment" > "$out/logs/deployment.log"
    # shellcheck disable=SC1091
    source "$out/deployment/deployment.env"
    ((clients_given)) || clients=$clients_per_round
    ((clients <= num_clients)) || { echo "--clients $clients: the partition has $num_clients" >&2; exit 2; }
    init_flags=(--tables "$out/deployment/server-tables.toml")
fi
"$server_bin" init "$out/server" --listen 127.0.0.1:0 --admin 127.0.0.1:0 "${init_flags[@]}" \
    > "$out/logs/init.log"
sed -i -e "s/^rounds = .*/rounds = $rounds/" "$out/server/server.toml"
if [[ -z "$config" ]]; then
    sed -i -e "s/^clients_per_round = .*/clients_per_round = $clients/" "$out/server/server.toml"
    num_clients=$clients
fi
client_flags=()
if ((split)); then
    # The CNN cut after its first conv block with the template's [split] table, uncommented.
    sed -i \
        -e 's/^name = "mlp"/name = "cnn"/' \
        -e 's/^batch_size = .*/batch_size = 32/' \
        -e "s/^local_steps = .*/local_steps = $local_steps/" \
        -e 's/^local_lr = .*/local_lr = 0.01/' \
        -e 's/^# test_samples = .*/test_samples = 2000/' \
        -e '/^# \[split\]/,$ s/^# //' \
        "$out/server/server.toml"
    client_flags=(--pipeline "$pipeline")
fi
for ((i = 0; i < clients; i++)); do
    "$server_bin" issue-client "$out/server" "device-$i" >> "$out/logs/init.log"
done

start=$(date +%s.%N)
SHOAL_DATA="$data_dir" "$server_bin" run "$out/server" > "$out/logs/server.json" 2> "$out/logs/server.log" &
server_pid=$!
pids+=("$server_pid")
address=$(listening "$out/server" "$server_pid" "$out/logs/server.log")
echo "fl-server on $address; starting $clients clients" >&2

# Each client joins before the next starts, so device-i is the server's client i — as client i
# is in fl-sim, which gives it the same task seeds.
for ((i = 0; i < clients; i++)); do
    "$client_bin" run --server "$address" --server-name localhost \
        --identity "$out/server/clients/device-$i" \
        --data-dir "$data_dir" --dataset "$dataset" --partition "$partition" \
        --partition-seed "$partition_seed" --num-clients "$num_clients" --index "$i" \
        "${client_flags[@]}" > "$out/logs/client-$i.json" 2> "$out/logs/client-$i.log" &
    pids+=("$!")
    wait_for_line "$out/logs/server.log" "joined client=client-$i name=\"device-$i\"" "$!" 120 \
        "$out/logs/client-$i.log"
done

wait_for_exit "$server_pid" "$timeout_s" "$out/logs/server.log"
failed=0
for pid in "${pids[@]:1}"; do
    wait "$pid" || failed=$((failed + 1))
done
end=$(date +%s.%N)
((failed == 0)) || echo "warning: $failed client(s) exited with an error; see $out/logs/" >&2

summary="$out/server/summary.json"
[[ -s "$summary" ]] || { echo "the server wrote no summary; see $out/logs/server.log" >&2; exit 1; }
wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
# The server's summary, plus the wall time of the whole deployment.
sed -e '$d' "$summary" | sed -e '$s/$/,/' > "$out/summary.json"
if ((split)); then
    # The clients' training throughput through the server's tail (each client prints its report).
    rate=$(cat "$out"/logs/client-*.json | grep -o '"split_samples_per_s": *[0-9.e+-]*' \
        | awk -F: '{ s += $2; n++ } END { if (n) printf "%.1f", s / n; else print "null" }')
    printf '  "pipeline": %s,\n  "split_samples_per_s": %s,\n' "$pipeline" "$rate" >> "$out/summary.json"
fi
printf '  "deployment_wall_s": %s,\n  "clients": %s\n}\n' "$wall" "$clients" >> "$out/summary.json"
cat "$out/summary.json"
