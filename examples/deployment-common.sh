# Shared by the deployment examples (local-federation.sh, hierarchical-federation.sh): sourced,
# never run. It checks the data root, finds or builds the binaries, stops every process started
# on exit, and waits for a server to name its address.

# require_data DIR: the MNIST data root, made absolute in $data_dir; exits with the reason if absent.
require_data() {
    data_dir=$1
    if [[ -z "$data_dir" ]]; then
        echo "no data: pass --data-dir DIR or set SHOAL_DATA=DIR, where DIR holds mnist/ (in a checkout: ../shared/data)" >&2
        exit 2
    fi
    if [[ ! -d "$data_dir/mnist" ]]; then
        echo "$data_dir/mnist is missing: the data root must hold the MNIST IDX files under mnist/" >&2
        exit 2
    fi
    data_dir=$(cd "$data_dir" && pwd)
}

# find_binaries BIN_DIR [with-sim]: $server_bin and $client_bin (and $sim_bin) from BIN_DIR, or
# built in release mode.
find_binaries() {
    local bin_dir=$1 with_sim=${2:-} repo packages=(-p shoal-server -p shoal-client)
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    [[ -z "$with_sim" ]] || packages+=(-p shoal-sim)
    if [[ -z "$bin_dir" ]]; then
        echo "building ${packages[*]//-p /} (release)…" >&2
        (cd "$repo" && cargo build --release --quiet "${packages[@]}")
        bin_dir="$repo/target/release"
    fi
    server_bin="$bin_dir/fl-server"
    client_bin="$bin_dir/fl-client"
    sim_bin="$bin_dir/fl-sim"
    local needed=("$server_bin" "$client_bin")
    [[ -z "$with_sim" ]] || needed+=("$sim_bin")
    for b in "${needed[@]}"; do
        [[ -x "$b" ]] || { echo "$b is missing (build it, or drop --bin-dir)" >&2; exit 2; }
    done
}

# Every process started is put in $pids and stopped on exit, also on Ctrl-C.
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# listening DIR PID LOG: waits for the server of data directory DIR (process PID, log LOG) to
# write its QUIC address to DIR/listening; prints it.
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

# wait_for_exit PID SECONDS LOGS: waits for PID to exit within SECONDS; exits with an error naming
# LOGS if it does not, or if it fails.
wait_for_exit() {
    local pid=$1 limit=$2 logs=$3 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "the run did not finish within ${limit} s; see $logs" >&2
            exit 1
        fi
        sleep 0.2
    done
    wait "$pid" || { echo "fl-server failed; see $logs" >&2; exit 1; }
}

# wait_for_line LOG TEXT PID SECONDS PID_LOG: waits until LOG has a line containing TEXT; exits
# with an error naming PID_LOG if process PID exits first or SECONDS pass.
wait_for_line() {
    local log=$1 text=$2 pid=$3 seconds=$4 pid_log=$5
    for _ in $(seq 1 $((seconds * 20))); do
        grep -qF -- "$text" "$log" 2>/dev/null && return
        kill -0 "$pid" 2>/dev/null || { echo "a process exited before \"$text\"; see $pid_log" >&2; tail -5 "$pid_log" >&2; exit 1; }
        sleep 0.05
    done
    echo "no \"$text\" in $log within $seconds s; see $pid_log" >&2
    exit 1
}
