#!/bin/sh
# Start one Sentinel of the StatefulSet `sentinel`. It monitors the primary that the other
# sentinels name (redis-0 on the very first start). Pods are named by their stable DNS names, not
# their addresses, which change when a pod is replaced. A quorum of 2 of the 3 sentinels declares
# the primary down and elects the one that promotes a replica.
set -eu
me="$(hostname).sentinel"
primary=""
for sentinel in $(echo "$SMOOTHCERT_REDIS_SENTINELS" | tr ',' ' '); do
    [ "${sentinel%:*}" = "$me" ] && continue
    primary=$(REDISCLI_AUTH="$SMOOTHCERT_REDIS_SENTINEL_PASSWORD" timeout 3 redis-cli \
        -h "${sentinel%:*}" -p "${sentinel##*:}" --raw \
        sentinel get-master-addr-by-name "$SMOOTHCERT_REDIS_MASTER_NAME" 2>/dev/null | head -n 1) || true
    [ -n "$primary" ] && break
done
[ -n "$primary" ] || primary="redis-0.redis"

umask 077
# Sentinel rewrites its file (the replicas and sentinels it learns, the current epoch).
cat > /config/sentinel.conf <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $me
requirepass "$SMOOTHCERT_REDIS_SENTINEL_PASSWORD"
sentinel sentinel-pass "$SMOOTHCERT_REDIS_SENTINEL_PASSWORD"
sentinel monitor $SMOOTHCERT_REDIS_MASTER_NAME $primary 6379 2
sentinel auth-pass $SMOOTHCERT_REDIS_MASTER_NAME "$SMOOTHCERT_REDIS_PASSWORD"
sentinel down-after-milliseconds $SMOOTHCERT_REDIS_MASTER_NAME 5000
sentinel failover-timeout $SMOOTHCERT_REDIS_MASTER_NAME 60000
sentinel parallel-syncs $SMOOTHCERT_REDIS_MASTER_NAME 1
CONF
exec redis-sentinel /config/sentinel.conf
