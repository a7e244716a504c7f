"""Kafka checks of the compose run (scripts/compose_check.py), read with the project's own kcat
service (`docker compose run kcat`, profile tools) on the compose network."""

import json
import subprocess

TRUCKS_TOPIC = "trucks"
# Bound of the read of `trucks` (normally a few seconds; see read_trucks_topic).
READ_S = 60


def read_trucks_topic(compose):
    """Every record of Kafka `trucks`: (MQTT topic, timestamp ms, partition, offset, value, key).
    The brokers key positions by plate (rule `trucks:trucks/{plate}:{plate}`) with the MQTT topic
    in the `mqtt.topic` header; other records (the routes) are keyed by their MQTT topic."""
    try:
        res = compose("--profile", "tools", "run", "--rm", "--no-deps", "-T", "kcat",
                      "-C", "-t", TRUCKS_TOPIC, "-o", "beginning", "-e", "-q",
                      "-f", r"%k\t%T\t%p\t%o\t%h\t%s\n", timeout=READ_S)
    except subprocess.TimeoutExpired as e:
        # kcat -e exits once every partition is at its end at the same moment;
        # while the trucks keep writing that can take forever (a CI run hung
        # here). What was read by then is checked, up to its last whole line.
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return parse_records(out[:out.rfind("\n") + 1])
    if res.returncode != 0:
        raise SystemExit(f"kcat failed: {res.stderr[-2000:]}")
    return parse_records(res.stdout)


def parse_records(text):
    """kcat lines `key TAB ts TAB partition TAB offset TAB headers TAB value` (headers as
    `name=value,...`) as read_trucks_topic returns them."""
    records = []
    for line in text.splitlines():
        parts = line.split("\t", 5)
        if len(parts) != 6:
            continue
        key, ts, part, off, headers, value = parts
        named = dict(h.split("=", 1) for h in headers.split(",") if "=" in h)
        records.append((named.get("mqtt.topic", key), int(ts), int(part), int(off), value, key))
    return records


def is_position(topic):
    """trucks/<plate>: a position. truck-sim also publishes each truck's route ahead, retained,
    on trucks/<plate>/route, which the brokers' mapping (trucks/#) puts into the same topic."""
    return topic.startswith("trucks/") and topic.count("/") == 1


def expected_key(topic, plate, route):
    """The record key the brokers' rules give: the bare plate for a position, the MQTT topic
    (trucks/<plate>/route) for a route; None when the topic does not name the payload's plate."""
    if route:
        return topic if topic == f"trucks/{plate}/route" else None
    return plate if topic == f"trucks/{plate}" else None


def check_kafka_keys(compose, check, trucks):
    """Positions arrive keyed per truck: key <plate> (a key template), the MQTT topic
    trucks/<plate> in the mqtt.topic header, one partition per key, plate in the payload; the
    routes (trucks/<plate>/route) keep their topic as key."""
    records = read_trucks_topic(compose)
    partitions, bad, routes = {}, [], 0
    for topic, _ts, part, _off, value, key in records:
        partitions.setdefault(topic, set()).add(part)
        route = topic.startswith("trucks/") and topic.endswith("/route") and topic.count("/") == 2
        if route and value == "":
            continue    # a retained route cleared
        try:
            plate = json.loads(value)["plate"]
        except (ValueError, KeyError, TypeError):
            plate = None
        routes += route
        if key != expected_key(topic, plate, route):
            bad.append(f"{key} ({topic})")
    keys = [k for k in partitions if is_position(k)]
    split = [k for k, p in partitions.items() if len(p) > 1]
    check("truck positions arrive in Kafka `trucks`", len(keys) >= trucks,
          f"{len(records)} records, {len(keys)} trucks (fleet {trucks}), {routes} of them routes")
    check("each record is keyed by its truck (positions by plate with mqtt.topic trucks/<plate>, "
          "routes by trucks/<plate>/route; the payload's plate)",
          records and not bad, f"{len(bad)} records otherwise: {bad[:3]}")
    check("each truck's records stay in one partition (ordered per truck)", keys and not split, f"{split[:3]}")
