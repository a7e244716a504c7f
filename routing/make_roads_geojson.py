#!/usr/bin/env python3
"""Extract the roads OSRM routes on into a small GeoJSON the map draws under the trucks.

Reads the same OSM input that osrm-extract reads (.osm XML of the synthetic
Italy graph, or an .osm.pbf such as Monaco or a Geofabrik extract) with
pyosmium, keeps the ways whose `highway` class is in --classes (plus ferry
routes), simplifies each line within --tolerance-m metres (shapely,
Douglas-Peucker) and writes one LineString feature per way with property
`c` = class rank (0 = motorway .. 5 = residential/other, 6 = ferry).
Coordinates are rounded to 5 decimals (about 1 m).

Default classes are the through roads (motorway to tertiary, with links).
For a city-sized extract (Monaco) pass --classes all so streets show too.

Usage:
  make_roads_geojson.py INPUT --out roads.geojson [--classes all|motorway,trunk,...] [--tolerance-m 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import osmium
import shapely

RANK = {
    "motorway": 0, "motorway_link": 0,
    "trunk": 1, "trunk_link": 1,
    "primary": 2, "primary_link": 2,
    "secondary": 3, "secondary_link": 3,
    "tertiary": 4, "tertiary_link": 4,
}
OTHER_RANK = 5
FERRY_RANK = 6
DEFAULT_CLASSES = ",".join(RANK)
# Metres per degree of latitude; longitude is scaled by cos(lat) per line.
M_PER_DEG = 111_320.0


def way_rank(tags, classes: set[str] | None) -> int | None:
    """Rank of a way to draw, or None to leave it out."""
    if tags.get("route") == "ferry":
        return FERRY_RANK
    hw = tags.get("highway")
    if hw is None:
        return None
    if classes is not None and hw not in classes:
        return None
    return RANK.get(hw, OTHER_RANK)


def simplify(coords: list[tuple[float, float]], tolerance_m: float) -> list[list[float]]:
    """Douglas-Peucker in degrees, with the tolerance converted at the line's latitude."""
    if tolerance_m > 0 and len(coords) > 2:
        import math

        lat = coords[0][1]
        tol_deg = tolerance_m / (M_PER_DEG * max(0.2, math.cos(math.radians(lat))))
        coords = list(shapely.simplify(shapely.LineString(coords), tol_deg).coords)
    return [[round(x, 5), round(y, 5)] for x, y in coords]


def extract(path: Path, classes: set[str] | None, tolerance_m: float) -> tuple[list[dict], int]:
    features: list[dict] = []
    points = 0
    fp = osmium.FileProcessor(str(path), osmium.osm.NODE | osmium.osm.WAY).with_locations()
    for obj in fp:
        if not obj.is_way():
            continue
        rank = way_rank(obj.tags, classes)
        if rank is None:
            continue
        try:
            coords = [(n.lon, n.lat) for n in obj.nodes]
        except osmium.InvalidLocationError:
            continue  # a node outside the extract: skip the way
        if len(coords) < 2:
            continue
        line = simplify(coords, tolerance_m)
        points += len(line)
        features.append({"type": "Feature", "properties": {"c": rank},
                         "geometry": {"type": "LineString", "coordinates": line}})
    # Minor roads first, so motorways are drawn on top.
    features.sort(key=lambda f: -f["properties"]["c"])
    return features, points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--classes", default=DEFAULT_CLASSES,
                    help="comma-separated highway classes, or 'all' (default: %(default)s)")
    ap.add_argument("--tolerance-m", type=float, default=25.0)
    a = ap.parse_args()
    classes = None if a.classes == "all" else {c.strip() for c in a.classes.split(",") if c.strip()}
    t0 = time.monotonic()
    features, points = extract(a.input, classes, a.tolerance_m)
    if not features:
        print(f"make_roads_geojson: no roads found in {a.input}", file=sys.stderr)
        return 1
    tmp = a.out.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f, separators=(",", ":"))
    tmp.replace(a.out)
    print(f"make_roads_geojson: {len(features)} roads, {points} points, "
          f"{a.out.stat().st_size / 1e6:.1f} MB -> {a.out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
