#!/usr/bin/env bash
# ramba-loadtest against a real ramba-server process (byte-level fixture model, CPU, port 0):
# every request completes, the counts match what was asked, the latency figures are ordered, and
# the sessions are deleted afterwards (closed loop over sessions, then open loop, stateless); and the client CLI's --logprobs on the same server. The
# server writes its commits on committer threads (--commit_threads), which the other server
# process tests leave off.
# Usage: loadtest_test.sh RAMBA_SERVER RAMBA_LOADTEST RAMBA_CLIENT MODEL_DIR
set -euo pipefail
server_bin=$1 loadtest_bin=$2 client_bin=$3 model=$4
dir=$(mktemp -d)
: > "$dir/server.out"  # the background job opens it only once it runs
"$server_bin" --model "$model" --data_dir "$dir/data" --port 0 --metrics_port -1 --device cpu \
  --threads 1 --commit_threads 2 > "$dir/server.out" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
port=
for _ in $(seq 100); do
  port=$(sed -n 's/^ramba-server listening on port \([0-9]*\),.*/\1/p' "$dir/server.out")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { cat "$dir/server.out"; exit 1; }
"$loadtest_bin" --server "127.0.0.1:$port" --sessions 3 --requests_per_session 2 \
  --prompt_tokens 100 --turn_tokens 5 --max_tokens 7 --temperature 0.8 --top_p 0.9 --min_p 0.05 \
  --repetition_penalty 1.2 --frequency_penalty 0.5 --json "$dir/r.json"
python3 - "$dir/r.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["requests_ok"] == 6 and r["requests_failed"] == 0, r
assert r["top_k"] == 0 and abs(r["top_p"] - 0.9) < 1e-6 and abs(r["min_p"] - 0.05) < 1e-6, r
assert abs(r["repetition_penalty"] - 1.2) < 1e-6 and r["frequency_penalty"] == 0.5, r
assert r["presence_penalty"] == 0, r
assert r["output_tokens"] == 6 * 7 and r["input_tokens"] == 6 * 5, r
for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
    s = r[k]
    assert s["count"] == 6, (k, s)
    assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (k, s)
assert r["ttft_ms"]["max"] <= r["e2e_ms"]["max"], r
assert r["itl_ms"]["count"] >= 1, r
print("loadtest report ok")
PY
# Prompts from a text file (multi-byte characters, so that stretches must be cut at character
# boundaries for the server to accept them as UTF-8).
python3 -c "import sys; open(sys.argv[1], 'w').write('héllo wörld ✓ ' * 40)" "$dir/prompt.txt"
"$loadtest_bin" --server "127.0.0.1:$port" --sessions 3 --requests_per_session 2 \
  --prompt_file "$dir/prompt.txt" --prompt_tokens 51 --turn_tokens 5 --max_tokens 7 \
  --json "$dir/text.json"
python3 - "$dir/text.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["requests_ok"] == 6 and r["requests_failed"] == 0, r
print("text-prompt report ok")
PY
# Open loop: stateless requests arriving at 50 per second.
"$loadtest_bin" --server "127.0.0.1:$port" --sessions 2 --requests_per_session 3 \
  --prompt_tokens 100 --turn_tokens 5 --max_tokens 7 --request_rate 50 --json "$dir/open.json"
python3 - "$dir/open.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["request_rate"] == 50 and r["requests_ok"] == 6 and r["requests_failed"] == 0, r
assert r["output_tokens"] == 6 * 7 and r["input_tokens"] == 6 * 105, r
assert r["ttft_ms"]["count"] == 6 and 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["max"], r
# Six arrivals at 50/s take ~0.1 s of Poisson gaps: the run cannot be instantaneous.
assert r["wall_seconds"] > 0.01, r
print("open-loop report ok")
PY
# The client CLI's --logprobs against the same server: a sum and a mean, both negative.
"$client_bin" --server "127.0.0.1:$port" create --id lp --text "Once upon a time" > /dev/null
"$client_bin" --server "127.0.0.1:$port" generate lp --max_tokens 5 --ignore_eos --logprobs \
  > /dev/null 2> "$dir/gen.err"
grep -E "logprob -[0-9.]+, mean -[0-9.]+ per token" "$dir/gen.err" ||
  { cat "$dir/gen.err"; exit 1; }
"$client_bin" --server "127.0.0.1:$port" delete lp > /dev/null
# The sessions were deleted: the server lists none.
listed=$("$client_bin" --server "127.0.0.1:$port" list)
if echo "$listed" | grep -q loadtest; then
  echo "sessions left behind: $listed"
  exit 1
fi
