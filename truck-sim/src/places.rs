//! Where trucks start and where they drive to.
//!
//! By default trucks start at one of the Italian cities below (depots) and
//! drive to another one, both moved by a random offset of up to `jitter_km`
//! so that the fleet spreads over each area; OSRM snaps the point to the
//! nearest road. With `--area` they pick uniformly random points in a
//! bounding box instead (for small extracts such as Monaco).

use std::fmt;
use std::str::FromStr;

use geo::{Destination, Haversine, Point};
use rand::Rng;

/// A position in WGS84 degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LonLat {
    pub lon: f64,
    pub lat: f64,
}

impl LonLat {
    pub const fn new(lon: f64, lat: f64) -> Self {
        Self { lon, lat }
    }

    pub fn point(self) -> Point<f64> {
        Point::new(self.lon, self.lat)
    }

    pub fn from_point(p: Point<f64>) -> Self {
        Self::new(p.x(), p.y())
    }
}

/// A depot city: name and coordinates (city centre, on land).
#[derive(Debug, Clone, Copy)]
pub struct City {
    pub name: &'static str,
    pub at: LonLat,
}

const fn city(name: &'static str, lat: f64, lon: f64) -> City {
    City {
        name,
        at: LonLat::new(lon, lat),
    }
}

/// Italian cities used as depots and destinations (every region is covered;
/// Sardinia is reached by the Civitavecchia - Olbia ferry).
pub const ITALIAN_CITIES: &[City] = &[
    city("Aosta", 45.7370, 7.3201),
    city("Torino", 45.0703, 7.6869),
    city("Novara", 45.4469, 8.6220),
    city("Milano", 45.4642, 9.1900),
    city("Bergamo", 45.6983, 9.6773),
    city("Brescia", 45.5416, 10.2118),
    city("Piacenza", 45.0526, 9.6930),
    city("Genova", 44.4056, 8.9463),
    city("La Spezia", 44.1025, 9.8241),
    city("Trento", 46.0748, 11.1217),
    city("Bolzano", 46.4983, 11.3548),
    city("Verona", 45.4384, 10.9916),
    city("Padova", 45.4064, 11.8768),
    city("Venezia Mestre", 45.4847, 12.2366),
    city("Udine", 46.0711, 13.2346),
    city("Trieste", 45.6495, 13.7768),
    city("Parma", 44.8015, 10.3279),
    city("Modena", 44.6471, 10.9252),
    city("Bologna", 44.4949, 11.3426),
    city("Ravenna", 44.4184, 12.2035),
    city("Rimini", 44.0678, 12.5695),
    city("Firenze", 43.7696, 11.2558),
    city("Pisa", 43.7228, 10.4017),
    city("Livorno", 43.5485, 10.3106),
    city("Perugia", 43.1107, 12.3908),
    city("Ancona", 43.6158, 13.5189),
    city("Pescara", 42.4618, 14.2161),
    city("L'Aquila", 42.3498, 13.3995),
    city("Roma", 41.9028, 12.4964),
    city("Civitavecchia", 42.0924, 11.7966),
    city("Campobasso", 41.5603, 14.6627),
    city("Napoli", 40.8518, 14.2681),
    city("Salerno", 40.6824, 14.7681),
    city("Foggia", 41.4622, 15.5446),
    city("Bari", 41.1171, 16.8719),
    city("Taranto", 40.4644, 17.2470),
    city("Brindisi", 40.6327, 17.9418),
    city("Lecce", 40.3515, 18.1750),
    city("Potenza", 40.6404, 15.8056),
    city("Cosenza", 39.2983, 16.2538),
    city("Catanzaro", 38.9098, 16.5877),
    city("Reggio Calabria", 38.1113, 15.6473),
    city("Messina", 38.1938, 15.5540),
    city("Catania", 37.5079, 15.0830),
    city("Siracusa", 37.0755, 15.2866),
    city("Palermo", 38.1157, 13.3615),
    city("Olbia", 40.9230, 9.4980),
    city("Sassari", 40.7259, 8.5557),
    city("Cagliari", 39.2238, 9.1217),
];

/// A `lon_min,lat_min,lon_max,lat_max` bounding box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Area {
    pub lon_min: f64,
    pub lat_min: f64,
    pub lon_max: f64,
    pub lat_max: f64,
}

#[derive(Debug, PartialEq, Eq)]
pub struct AreaParseError(String);

impl fmt::Display for AreaParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid area {:?}: expected lon_min,lat_min,lon_max,lat_max in degrees",
            self.0
        )
    }
}

impl std::error::Error for AreaParseError {}

impl FromStr for Area {
    type Err = AreaParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AreaParseError(s.to_string());
        let v: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| err())?;
        let [lon_min, lat_min, lon_max, lat_max] = v[..] else {
            return Err(err());
        };
        let ok = v.iter().all(|x| x.is_finite())
            && (-180.0..=180.0).contains(&lon_min)
            && (-180.0..=180.0).contains(&lon_max)
            && (-90.0..=90.0).contains(&lat_min)
            && (-90.0..=90.0).contains(&lat_max)
            && lon_min < lon_max
            && lat_min < lat_max;
        if !ok {
            return Err(err());
        }
        Ok(Self {
            lon_min,
            lat_min,
            lon_max,
            lat_max,
        })
    }
}

impl Area {
    pub fn contains(&self, p: LonLat) -> bool {
        (self.lon_min..=self.lon_max).contains(&p.lon)
            && (self.lat_min..=self.lat_max).contains(&p.lat)
    }

    pub fn random_point<R: Rng>(&self, rng: &mut R) -> LonLat {
        LonLat::new(
            rng.gen_range(self.lon_min..=self.lon_max),
            rng.gen_range(self.lat_min..=self.lat_max),
        )
    }
}

/// How trucks choose their start point and destinations.
#[derive(Debug, Clone)]
pub enum Places {
    /// Depot cities, each point moved by up to `jitter_km` in a random direction.
    Cities {
        cities: &'static [City],
        jitter_km: f64,
    },
    /// Uniform random points in a bounding box.
    Area(Area),
}

impl Places {
    /// A start point for a new truck.
    pub fn start<R: Rng>(&self, rng: &mut R) -> LonLat {
        match self {
            Places::Cities { cities, jitter_km } => {
                let c = cities[rng.gen_range(0..cities.len())];
                jitter(c.at, *jitter_km, rng)
            }
            Places::Area(a) => a.random_point(rng),
        }
    }

    /// A destination for a truck now at `from`: another city (never the
    /// nearest one, which is where the truck is) or another point in the area.
    pub fn destination<R: Rng>(&self, from: LonLat, rng: &mut R) -> LonLat {
        match self {
            Places::Cities { cities, jitter_km } => {
                let here = nearest_city(cities, from);
                let mut i = rng.gen_range(0..cities.len());
                if cities.len() > 1 && Some(i) == here {
                    i = (i + 1 + rng.gen_range(0..cities.len() - 1)) % cities.len();
                }
                jitter(cities[i].at, *jitter_km, rng)
            }
            Places::Area(a) => a.random_point(rng),
        }
    }
}

fn nearest_city(cities: &[City], p: LonLat) -> Option<usize> {
    use geo::Distance;
    cities
        .iter()
        .enumerate()
        .map(|(i, c)| (i, Haversine.distance(c.at.point(), p.point())))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// `at` moved by a uniformly random distance in `[0, max_km]` in a random direction.
fn jitter<R: Rng>(at: LonLat, max_km: f64, rng: &mut R) -> LonLat {
    if max_km <= 0.0 {
        return at;
    }
    let bearing = rng.gen_range(0.0..360.0);
    let dist_m = rng.gen_range(0.0..=max_km * 1000.0);
    LonLat::from_point(Haversine.destination(at.point(), bearing, dist_m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use geo::Distance;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn area_parses_four_comma_separated_degrees() {
        let a: Area = "7.40,43.72,7.44,43.75".parse().unwrap();
        assert_eq!(
            a,
            Area {
                lon_min: 7.40,
                lat_min: 43.72,
                lon_max: 7.44,
                lat_max: 43.75
            }
        );
        assert!(" 7.4, 43.72 ,7.44,43.75".parse::<Area>().is_ok());
    }

    #[test]
    fn area_rejects_wrong_count_order_or_range() {
        for bad in [
            "",
            "1,2,3",
            "1,2,3,4,5",
            "7.44,43.72,7.40,43.75",
            "7.40,43.75,7.44,43.72",
            "7,95,8,96",
            "a,b,c,d",
            "NaN,1,2,3",
        ] {
            assert!(bad.parse::<Area>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn area_points_stay_inside_the_box() {
        let a: Area = "7.40,43.72,7.44,43.75".parse().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let places = Places::Area(a);
        for _ in 0..1000 {
            assert!(a.contains(places.start(&mut rng)));
            assert!(a.contains(places.destination(a.random_point(&mut rng), &mut rng)));
        }
    }

    #[test]
    fn city_points_lie_within_jitter_of_a_city() {
        let places = Places::Cities {
            cities: ITALIAN_CITIES,
            jitter_km: 5.0,
        };
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..1000 {
            let p = places.start(&mut rng);
            let d = ITALIAN_CITIES
                .iter()
                .map(|c| Haversine.distance(c.at.point(), p.point()))
                .fold(f64::INFINITY, f64::min);
            assert!(d <= 5_000.0 + 1.0, "{p:?} is {d} m from the nearest city");
        }
    }

    #[test]
    fn destination_is_never_the_city_the_truck_is_in() {
        let places = Places::Cities {
            cities: ITALIAN_CITIES,
            jitter_km: 0.0,
        };
        let mut rng = StdRng::seed_from_u64(11);
        let milano = ITALIAN_CITIES[3].at;
        for _ in 0..2000 {
            assert_ne!(places.destination(milano, &mut rng), milano);
        }
    }

    #[test]
    fn city_list_is_in_italy_and_has_at_least_forty_cities() {
        assert!(ITALIAN_CITIES.len() >= 40);
        for c in ITALIAN_CITIES {
            assert!((6.6..=18.6).contains(&c.at.lon), "{}", c.name);
            assert!((36.6..=47.1).contains(&c.at.lat), "{}", c.name);
        }
    }
}
