//! Italian licence plates in the current (1994-) format `AB123CD`.
//!
//! Letters exclude I, O, Q and U, as on real Italian plates (they are too easy
//! to confuse with 1, 0 and V). Plates are unique within one [`PlateIssuer`]
//! and fully determined by the RNG it is given, so a fixed `--seed` gives the
//! same fleet on every run.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The fleet seed when none is given: the same plates on every start, so a
/// restarted simulator continues the same trucks (same MQTT client ids, same
/// retained topics) instead of adding 15,000 new ones to the map.
pub const DEFAULT_FLEET_SEED: u64 = 16;

/// Mixed into the fleet seed for the plate stream, so that plates do not
/// depend on how many random numbers the rest of the fleet set-up draws.
const PLATE_STREAM: u64 = 0x706c_6174_6573; // "plates"

/// The 22 letters used on Italian plates.
pub const PLATE_LETTERS: &[u8; 22] = b"ABCDEFGHJKLMNPRSTVWXYZ";

/// Number of distinct plates: 22^4 letter combinations times 1000 numbers.
pub const PLATE_SPACE: u64 = 22 * 22 * 22 * 22 * 1000;

/// Issues unique plates from an RNG.
pub struct PlateIssuer<R: Rng> {
    rng: R,
    issued: HashSet<[u8; 7]>,
}

impl PlateIssuer<StdRng> {
    /// The issuer of a fleet: its plates depend only on `seed`.
    pub fn for_fleet(seed: u64) -> Self {
        Self::new(StdRng::seed_from_u64(seed ^ PLATE_STREAM))
    }
}

impl<R: Rng> PlateIssuer<R> {
    pub fn new(rng: R) -> Self {
        Self {
            rng,
            issued: HashSet::new(),
        }
    }

    /// A plate not issued before by this issuer, or `None` once a quarter of
    /// the plate space is used (far beyond any fleet this simulator runs).
    pub fn issue(&mut self) -> Option<String> {
        if self.issued.len() as u64 >= PLATE_SPACE / 4 {
            return None;
        }
        loop {
            let plate = random_plate(&mut self.rng);
            if self.issued.insert(plate) {
                return Some(plate.iter().map(|&b| b as char).collect());
            }
        }
    }
}

fn random_plate<R: Rng>(rng: &mut R) -> [u8; 7] {
    let mut letter = || PLATE_LETTERS[rng.gen_range(0..PLATE_LETTERS.len())];
    let (a, b, c, d) = (letter(), letter(), letter(), letter());
    let n: u16 = rng.gen_range(0..1000);
    let digits = [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ];
    [a, b, digits[0], digits[1], digits[2], c, d]
}

/// True if `s` has the `AB123CD` shape with only the allowed letters.
pub fn is_valid_plate(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && [0, 1, 5, 6].iter().all(|&i| PLATE_LETTERS.contains(&b[i]))
        && b[2..5].iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue_n(seed: u64, n: usize) -> Vec<String> {
        let mut issuer = PlateIssuer::new(StdRng::seed_from_u64(seed));
        (0..n).map(|_| issuer.issue().unwrap()).collect()
    }

    #[test]
    fn plates_have_two_letters_three_digits_two_letters() {
        for p in issue_n(1, 1000) {
            assert!(is_valid_plate(&p), "{p}");
        }
    }

    #[test]
    fn plates_never_use_i_o_q_u() {
        for p in issue_n(2, 5000) {
            assert!(!p.contains(['I', 'O', 'Q', 'U']), "{p}");
        }
    }

    #[test]
    fn plates_are_unique_within_a_run() {
        let plates = issue_n(3, 50_000);
        let set: HashSet<_> = plates.iter().collect();
        assert_eq!(set.len(), plates.len());
    }

    #[test]
    fn same_seed_gives_same_plates() {
        assert_eq!(issue_n(42, 100), issue_n(42, 100));
        assert_ne!(issue_n(42, 100), issue_n(43, 100));
    }

    #[test]
    fn a_restarted_fleet_has_the_same_plates() {
        let start = |seed| {
            let mut issuer = PlateIssuer::for_fleet(seed);
            (0..15_000)
                .map(|_| issuer.issue().unwrap())
                .collect::<Vec<_>>()
        };
        let first = start(DEFAULT_FLEET_SEED);
        assert_eq!(first, start(DEFAULT_FLEET_SEED));
        assert_ne!(first, start(DEFAULT_FLEET_SEED + 1));
    }

    #[test]
    fn validator_rejects_malformed_plates() {
        assert!(is_valid_plate("AB123CD"));
        assert!(!is_valid_plate("AB123C"));
        assert!(!is_valid_plate("AI123CD"));
        assert!(!is_valid_plate("AB12XCD"));
        assert!(!is_valid_plate("ab123cd"));
    }
}
