"""Health check of a standalone consumer container (docker-compose.scale.yml).

`python consumer_health.py MEMBER` exits 0 while the consumer started as
`f1 consume --member MEMBER` is a member of its group (CONSUMER_GROUP) as the
broker sees it, 1 otherwise. A member without partitions (more consumers than
partitions) is healthy: it is in the group and takes over on a rebalance.
"""

from __future__ import annotations

import sys

from pipeline.settings import get_settings

TIMEOUT_S = 10.0


def main(member: str) -> int:
    from confluent_kafka.admin import AdminClient

    settings = get_settings()
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0})
    group = settings.consumer_group
    try:
        description = admin.describe_consumer_groups([group])[group].result(timeout=TIMEOUT_S)
    except Exception as err:  # any failure to ask is "not healthy", with the reason
        print(f"cannot describe group {group!r}: {err}", file=sys.stderr)
        return 1
    members = sorted(m.client_id for m in description.members)
    if member in members:
        return 0
    print(f"{member!r} is not in group {group!r} (members: {members})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: consumer_health.py MEMBER")
    sys.exit(main(sys.argv[1]))
