"""Kafka checks of the compose run (scripts/compose_check.py), read with the project's own kcat
service (`docker compose run kcat`, profile tools) on the compose network."""

import json

TRUCKS_TOPIC = "trucks"


def read_trucks_topic(compose):
    """Every record of Kafka `trucks`: (key, timestamp ms, partition, offset, value)."""
    res = compose("--profile", "tools", "run", "--rm", "--no-deps", "-T", "kcat",
                  "-C", "-t", TRUCKS_TOPIC, "-o", "beginning", "-e", "-q", "-f", r"%k\t%T\t%p\t%o\t%s\n")
    if res.returncode != 0:
        raise SystemExit(f"kcat failed: {res.stderr[-2000:]}")
    records = []
    for line in res.stdout.splitlines():
        parts = line.split("\t", 4)
        if len(parts) == 5:
            records.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4]))
    return records


def is_position(key):
    """trucks/<plate>: a position. truck-sim also publishes each truck's route ahead, retained,
    on trucks/<plate>/route, which the brokers' mapping (trucks/#) puts into the same topic."""
    return key.startswith("trucks/") and key.count("/") == 1


def check_kafka_keys(compose, check, trucks):
    """Positions arrive keyed per truck: key trucks/<plate>, one partition per key, plate in the
    payload; the routes (trucks/<plate>/route) likewise name their truck."""
    records = read_trucks_topic(compose)
    partitions, bad, routes = {}, [], 0
    for key, _ts, part, _off, value in records:
        partitions.setdefault(key, set()).add(part)
        route = key.startswith("trucks/") and key.endswith("/route") and key.count("/") == 2
        if route and value == "":
            continue    # a retained route cleared
        try:
            plate = json.loads(value)["plate"]
        except (ValueError, KeyError, TypeError):
            plate = None
        routes += route
        if key != (f"trucks/{plate}/route" if route else f"trucks/{plate}"):
            bad.append(key)
    keys = [k for k in partitions if is_position(k)]
    split = [k for k, p in partitions.items() if len(p) > 1]
    check("truck positions arrive in Kafka `trucks`", len(keys) >= trucks,
          f"{len(records)} records, {len(keys)} trucks (fleet {trucks}), {routes} of them routes")
    check("each record is keyed by its truck (trucks/<plate>, trucks/<plate>/route; the payload's plate)",
          records and not bad, f"{len(bad)} records otherwise: {bad[:3]}")
    check("each truck's records stay in one partition (ordered per truck)", keys and not split, f"{split[:3]}")
