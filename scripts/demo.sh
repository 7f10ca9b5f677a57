#!/usr/bin/env bash
# Starts a hearth agent on a private unix socket with a fresh secret and drives it with
# the `hearth agent` debug client: info, exec, a file round trip, a PTY. Everything it
# creates lives in one temp dir and is removed on exit; the agent is stopped by its PID.
set -euo pipefail
bin=${HEARTH_BIN:-target/release}
work=$(mktemp -d /tmp/hearth-demo.XXXXXX)
agent_pid=""
cleanup() {
  # `wait` reports the agent's SIGTERM as a failure; under `set -e` that would end the
  # trap before the directory is removed.
  if [ -n "$agent_pid" ]; then
    kill "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
"$bin/hearth-agent" --listen "unix:$work/agent.sock" --secret-file "$work/secret" &
agent_pid=$!
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.02; done

h() { "$bin/hearth" agent --endpoint "unix:$work/agent.sock" --secret-file "$work/secret" "$@"; }
say() { printf '\n\033[1m$ hearth agent %s\033[0m\n' "$*"; }

say info;                          h info
say ping;                          h ping
say exec -- uname -sr;             h exec -- uname -sr
say "exec -- sh -c 'echo to stderr >&2; exit 3'"
h exec -- sh -c 'echo to stderr >&2; exit 3' || echo "(exit code $?)"
head -c 64M /dev/urandom > "$work/in.bin"
say put in.bin /…/copy.bin;        h put "$work/in.bin" "$work/copy.bin"
say get /…/copy.bin out.bin;       h get "$work/copy.bin" "$work/out.bin"
cmp "$work/in.bin" "$work/out.bin" && echo "round trip of 64 MiB: identical"
say "exec -t -- sh -c 'stty size'"; script -qec "$bin/hearth agent --endpoint unix:$work/agent.sock --secret-file $work/secret exec -t -- stty size" /dev/null </dev/null || true
say "ls /tmp/hearth-demo.…";      h ls "$work"
echo
echo "agent endpoint: unix:$work/agent.sock (removed when this demo exits)"
echo "next: 'just bench-agent' measures the agent against this machine's floors"
