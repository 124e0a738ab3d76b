#!/bin/sh
# Start one Redis of the StatefulSet `redis` (pods redis-0, redis-1, ...) as the primary or as a
# replica of it. The sentinels know which pod is the primary now (after a failover it is no longer
# redis-0); on the very first start none answers and redis-0 is the primary. The configuration is
# written to a memory-backed folder, so the password never appears on a command line.
set -eu
me="$(hostname).redis"
primary=""
for sentinel in $(echo "$SMOOTHCERT_REDIS_SENTINELS" | tr ',' ' '); do
    primary=$(REDISCLI_AUTH="$SMOOTHCERT_REDIS_SENTINEL_PASSWORD" timeout 3 redis-cli \
        -h "${sentinel%:*}" -p "${sentinel##*:}" --raw \
        sentinel get-master-addr-by-name "$SMOOTHCERT_REDIS_MASTER_NAME" 2>/dev/null | head -n 1) || true
    [ -n "$primary" ] && break
done
[ -n "$primary" ] || primary="redis-0.redis"

umask 077
cat > /config/redis.conf <<CONF
port 6379
dir /data
appendonly yes
appendfsync everysec
maxmemory $SMOOTHCERT_REDIS_MAXMEMORY
maxmemory-policy noeviction
requirepass "$SMOOTHCERT_REDIS_PASSWORD"
masterauth "$SMOOTHCERT_REDIS_PASSWORD"
replica-announce-ip $me
CONF
if [ "$primary" != "$me" ]; then
    echo "replicaof $primary 6379" >> /config/redis.conf
fi
echo "redis-start: $me starts as $([ "$primary" = "$me" ] && echo primary || echo "replica of $primary")" >&2
exec redis-server /config/redis.conf
