# Helpers the scripts of tuning/runs/ share. Source it:
#   source "$(dirname "$0")/lib.sh"
# It defines functions only (no traps, no temporary files).

# A loopback port nobody holds now: free_port udp|tcp
free_port() {
    python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}

# Waits until the mppd of PID answers /healthz on 127.0.0.1:PORT:
# wait_healthz PORT PID. Fails, saying why on stderr, when PID exits first
# or 10 s pass.
wait_healthz() {
    local port="$1" pid="$2"
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "mppd (pid $pid) exited before it answered /healthz on port $port" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "mppd (pid $pid) did not answer /healthz on port $port within 10 s" >&2
    return 1
}
