#!/bin/sh
# A sentinel of the compose profile `ha` (docker/docker-compose.yml): writes the sentinel's
# configuration on its first start, then runs it. The file stays the sentinel's own afterwards:
# it rewrites it as it learns the current primary and the other sentinels, and a restarted
# container must resume from what it learnt, not from redis-primary again.
#
# Environment: MASTER_NAME (SMOOTHCERT_REDIS_MASTER_NAME), REDIS_PASSWORD (the servers'),
# SENTINEL_PASSWORD (the sentinels' own; empty: none), ANNOUNCE (this sentinel's service name).
# The product's timings: the primary is down after 5 s without an answer; a failover that
# stalls is tried again after 60 s.
set -eu
conf="${SENTINEL_CONF:-/data/sentinel.conf}"

quoted() {  # a value in the configuration's double quotes
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

if [ ! -f "$conf" ]; then
    {
        echo "port 26379"
        echo "sentinel resolve-hostnames yes"
        echo "sentinel announce-hostnames yes"
        echo "sentinel announce-ip $ANNOUNCE"
        echo "sentinel monitor $MASTER_NAME redis-primary 6379 2"
        # printf, not echo: a shell's echo may turn the backslashes of a password into escapes
        printf 'sentinel auth-pass %s %s\n' "$MASTER_NAME" "$(quoted "$REDIS_PASSWORD")"
        echo "sentinel down-after-milliseconds $MASTER_NAME 5000"
        echo "sentinel failover-timeout $MASTER_NAME 60000"
        echo "sentinel parallel-syncs $MASTER_NAME 1"
        if [ -n "${SENTINEL_PASSWORD:-}" ]; then
            printf 'requirepass %s\n' "$(quoted "$SENTINEL_PASSWORD")"
            printf 'sentinel sentinel-pass %s\n' "$(quoted "$SENTINEL_PASSWORD")"
        fi
    } > "$conf.new"
    mv "$conf.new" "$conf"
fi
exec redis-server "$conf" --sentinel
