# Sourced by the gpu-steps that run a server (not a step itself: not executable).
# start_server LOG [flags...]: starts $B/ramba-server with models/ramba-tiny on
# --device ${RAMBA_DEVICE:-cuda}, a free gRPC port and a free metrics port (flags given here
# come after and win), waits for its listening line in LOG and sets SERVER_PID, SERVER (the
# host:port to dial) and METRICS_PORT. Returns 1, showing the log's tail, if it does not start.
start_server() {
  local log=$1 seen line
  shift
  touch "$log"
  seen=$(grep -c "listening on port" "$log")
  "$B/ramba-server" --device "${RAMBA_DEVICE:-cuda}" --model models/ramba-tiny --host 127.0.0.1 \
    --port 0 --metrics_port 0 "$@" >>"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do
    line=$(grep "listening on port" "$log" | sed -n "$((seen + 1))p")
    if [ -n "$line" ]; then
      SERVER=127.0.0.1:$(sed 's/.*listening on port \([0-9]*\),.*/\1/' <<<"$line")
      METRICS_PORT=$(sed 's/.*metrics on port \([0-9]*\),.*/\1/' <<<"$line")
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "server did not start"; tail -20 "$log"
  return 1
}
