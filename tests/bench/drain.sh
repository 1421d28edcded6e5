#!/bin/bash
# Drain time of 500 held messages (200 MB in all) to Postfix's smtp-sink: Matte released on boot
# (on_boot = "send") against Postfix flushing the same load from its hold queue, in one run, to
# the same sink. Needs root (a private Postfix instance under a temporary directory), postfix,
# smtp-sink and smtp-source. Run it on a quiet machine: it is a timing.
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
    matte=$(grep -c '"event":"delivery"' "$WORK/matte/audit.jsonl" 2>/dev/null || true)
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

SINK_PORT=$(free_port); MATTE_PORT=$(free_port); PF_PORT=$(free_port)
smtp-sink -u postfix -c "127.0.0.1:$SINK_PORT" 1024 > "$WORK/sink.out" 2>&1 &
pids+=($!)
wait_port "$SINK_PORT"
echo "load: $N messages of $SIZE bytes ($(( N * SIZE / 1000000 )) MB) to smtp-sink on port $SINK_PORT"

# --- Matte: hold everything, stop, start again: on_boot = "send" releases it all at once -------
cat > "$WORK/matte.toml" <<TOML
data_dir = "$WORK/matte"
[smtp]
listen = ["127.0.0.1:$MATTE_PORT"]
listen_tls = []
[web]
listen = ["127.0.0.1:0"]
[hold]
seconds = 86400
max_messages = $N
max_bytes = $(( N * SIZE * 2 ))
on_boot = "send"
[upstream]
host = "127.0.0.1"
port = $SINK_PORT
TOML
start_matte() {
    (cd "$REPO" && exec "$PYTHON" -m firmware run --config "$WORK/matte.toml") \
        >> "$WORK/matte.log" 2>&1 &
    MATTE_PID=$!
    pids+=($MATTE_PID)
}
start_matte
wait_port "$MATTE_PORT"
smtp-source -s 20 -m "$N" -l "$SIZE" -f sender@lan.example -t rcpt@ext.example \
    "127.0.0.1:$MATTE_PORT"
[ "$(sunk)" -eq 0 ] || { echo "Matte sent mail before its release" >&2; exit 1; }
kill -TERM "$MATTE_PID"; wait "$MATTE_PID" || true
held=$(grep -c '"event":"accept"' "$WORK/matte/audit.jsonl" || true)
echo "matte: $held messages held; restarting"
base=$(sunk)
t0=$(now)
start_matte
wait_sunk $(( base + N )) ${TIMEOUT:-900}
t1=$(now)
matte=$(echo "$t1 - $t0" | bc -l)
kill -TERM "$MATTE_PID"; wait "$MATTE_PID" || true

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

printf 'drain of %d held messages (%d MB): matte %.2f s (from process start), postfix %.2f s ' \
    "$N" $(( N * SIZE / 1000000 )) "$matte" "$postfix_time"
printf '(from release); matte/postfix = %.2f\n' "$(echo "$matte / $postfix_time" | bc -l)"
