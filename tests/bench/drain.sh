#!/bin/bash
# Drain time of 500 held messages (200 MB in all) to Postfix's smtp-sink, in one run, to the same
# sink. The headline figure is like for like: a running Matte holding the load releases it all
# with one request to its JSON API (POST /api/held/all/send from the address that sent it),
# against a running Postfix flushing the same load from its hold queue (postsuper -H ALL;
# postqueue -f); both timed from the release to the last message the sink accepted. A second
# figure times a restart with on_boot = "send" (Python start-up and boot included). Needs root
# (a private Postfix instance under a temporary directory), postfix, smtp-sink, smtp-source,
# curl and jq. Run it on a quiet machine: it is a timing.
#
#   tests/bench/drain.sh            # N=500 SIZE=400000 by default
#   N=100 SIZE=100000 tests/bench/drain.sh
set -euo pipefail
N=${N:-500}
SIZE=${SIZE:-400000}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/matte-drain.XXXXXX)
chmod 755 "$WORK"  # Postfix's daemons run as postfix
PF=$WORK/postfix
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    MAIL_CONFIG="$PF" postfix stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2; exit 1
}
# smtp-sink's own counter is block-buffered when not on a terminal, so completions are counted
# where each sender records the sink's 250: Matte's audit log, Postfix's mail log.
sunk() {
    local matte postfix
    matte=$(grep -c '"event":"delivery"' "$WORK/matte-audit.jsonl" 2>/dev/null || true)
    postfix=$(grep -c 'status=sent' "$WORK/postfix.log" 2>/dev/null || true)
    echo $(( ${matte:-0} + ${postfix:-0} ))
}
wait_sunk() {  # until the sink has $1 messages; at most $2 seconds
    local deadline=$(( $(date +%s) + $2 ))
    while [ "$(sunk)" -lt "$1" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || {
            echo "timed out at $(sunk) of $1" >&2; tail -20 "$WORK/matte.log" >&2; exit 1; }
        sleep 0.05
    done
}

SINK_PORT=$(free_port); MATTE_PORT=$(free_port); WEB_PORT=$(free_port); PF_PORT=$(free_port)
smtp-sink -u postfix -c "127.0.0.1:$SINK_PORT" 1024 > "$WORK/sink.out" 2>&1 &
pids+=($!)
wait_port "$SINK_PORT"
echo "load: $N messages of $SIZE bytes ($(( N * SIZE / 1000000 )) MB) to smtp-sink on port $SINK_PORT"

# --- Matte: hold everything, then release it all -----------------------------------------------
# Each mode starts from an empty store of its own; both write to one audit log, which sunk() reads.
write_config() {  # $1: the mode, which names the data directory
    cat > "$WORK/matte-$1.toml" <<TOML
data_dir = "$WORK/matte-$1"
audit_log = "$WORK/matte-audit.jsonl"
[smtp]
listen = ["127.0.0.1:$MATTE_PORT"]
listen_tls = []
[web]
listen = ["127.0.0.1:$WEB_PORT"]
[hold]
seconds = 86400
max_messages = $N
max_bytes = $(( N * SIZE * 2 ))
on_boot = "send"
[upstream]
host = "127.0.0.1"
port = $SINK_PORT
TOML
}
start_matte() {  # $1: the mode
    (cd "$REPO" && exec "$PYTHON" -m firmware run --config "$WORK/matte-$1.toml") \
        >> "$WORK/matte.log" 2>&1 &
    MATTE_PID=$!
    pids+=($MATTE_PID)
}
stop_matte() { kill -TERM "$MATTE_PID"; wait "$MATTE_PID" || true; }
load_matte() {  # the load from one client address, 127.0.0.1, held by the running gateway
    local accepted
    accepted=$(grep -c '"event":"accept"' "$WORK/matte-audit.jsonl" 2>/dev/null || true)
    base=$(sunk)
    smtp-source -s 20 -m "$N" -l "$SIZE" -f sender@lan.example -t rcpt@ext.example \
        "127.0.0.1:$MATTE_PORT"
    [ "$(sunk)" -eq "$base" ] || { echo "Matte sent mail before its release" >&2; exit 1; }
    held=$(( $(grep -c '"event":"accept"' "$WORK/matte-audit.jsonl" || true) - ${accepted:-0} ))
}

# Like for like: the gateway is running; the sender's own token, then one request sends it all.
write_config api
start_matte api
wait_port "$MATTE_PORT"; wait_port "$WEB_PORT"
load_matte
API="http://127.0.0.1:$WEB_PORT/api/held"
token=$(curl -sf -H "Host: 127.0.0.1:$WEB_PORT" "$API" | jq -r .token)
echo "matte: $held messages held; releasing through $API/all/send"
base=$(sunk)
t0=$(now)
curl -sf -X POST -H "Host: 127.0.0.1:$WEB_PORT" -H "X-Matte-Token: $token" "$API/all/send" \
    > "$WORK/release.json"
wait_sunk $(( base + N )) ${TIMEOUT:-900}
t1=$(now)
matte_api=$(echo "$t1 - $t0" | bc -l)
[ "$(jq .count "$WORK/release.json")" -eq "$N" ] || {
    echo "the API released $(cat "$WORK/release.json"), not $N" >&2; exit 1; }
stop_matte

# Boot: hold everything, stop, start again: on_boot = "send" releases it all at once.
write_config boot
start_matte boot
wait_port "$MATTE_PORT"
load_matte
stop_matte
echo "matte: $held messages held; restarting"
base=$(sunk)
t0=$(now)
start_matte boot
wait_sunk $(( base + N )) ${TIMEOUT:-900}
t1=$(now)
matte_boot=$(echo "$t1 - $t0" | bc -l)
stop_matte

# --- Postfix: a private instance, everything put on hold at end of DATA, then released --------
mkdir -p "$PF" "$WORK/postfix-queue" "$WORK/postfix-data"
chown postfix "$WORK/postfix-data"
export MAIL_CONFIG="$PF"  # every Postfix command below works on the private instance
cp /etc/postfix/main.cf /etc/postfix/master.cf "$PF/"
[ -e /etc/postfix/dynamicmaps.cf ] && cp -r /etc/postfix/dynamicmaps.cf* "$PF/"
postconf -c "$PF" -e \
    "queue_directory = $WORK/postfix-queue" "data_directory = $WORK/postfix-data" \
    "relayhost = [127.0.0.1]:$SINK_PORT" "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" \
    "mydestination =" "mynetworks = 127.0.0.0/8" "message_size_limit = 0" \
    "smtpd_end_of_data_restrictions = check_client_access static:HOLD" \
    "smtp_tls_security_level = none" "smtpd_tls_security_level = none" \
    "syslog_name = postfix-drain" "maillog_file = $WORK/postfix.log" \
    "maillog_file_prefixes = /var, /dev/stdout, $WORK" \
    "alternate_config_directories =" "multi_instance_enable = no" "compatibility_level = 3.6"
postconf -c "$PF" -MX smtp/inet
postconf -c "$PF" -M "127.0.0.1:$PF_PORT/inet=127.0.0.1:$PF_PORT inet n - n - - smtpd"
postconf -c "$PF" -F '*/*/chroot = n'
postfix start >/dev/null 2>&1 || { cat "$WORK/postfix.log" >&2; exit 1; }
wait_port "$PF_PORT"
smtp-source -s 20 -m "$N" -l "$SIZE" -f sender@lan.example -t rcpt@ext.example \
    "127.0.0.1:$PF_PORT"
for _ in $(seq 600); do
    [ "$(find "$WORK/postfix-queue/hold" -type f | wc -l)" -ge "$N" ] && break
    sleep 0.1
done
echo "postfix: $(find "$WORK/postfix-queue/hold" -type f | wc -l) messages on hold"
base=$(sunk)
t0=$(now)
postsuper -H ALL 2>/dev/null
postqueue -f
wait_sunk $(( base + N )) 900
t1=$(now)
postfix_time=$(echo "$t1 - $t0" | bc -l)

# The first line is the like-for-like figure; the second adds Matte's start-up and boot.
printf 'drain of %d held messages (%d MB): matte %.2f s (running, from POST /api/held/all/send), ' \
    "$N" $(( N * SIZE / 1000000 )) "$matte_api"
printf 'postfix %.2f s (running, from postsuper -H ALL); matte/postfix = %.2f\n' \
    "$postfix_time" "$(echo "$matte_api / $postfix_time" | bc -l)"
printf 'with boot: matte %.2f s (restart with on_boot = "send", from process start); ' "$matte_boot"
printf 'matte/postfix = %.2f\n' "$(echo "$matte_boot / $postfix_time" | bc -l)"
