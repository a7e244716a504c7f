//! A route's points in 4 bytes each: 16-bit steps between neighbours (in
//! 1e-6 degree), with an absolute point every [`KEY_EVERY`] so that one point
//! costs at most `KEY_EVERY - 1` additions to decode.
//!
//! Why our own: the fleet's 2,352 shared routes on OSM-dense roads are the
//! largest single cost of truck-sim's memory, and geometry crates store `f64`
//! pairs (16 bytes a point). A step that does not fit 16 bits (about 3.6 km of
//! latitude) is split into equal parts on the straight line between the two
//! points, which keeps every position on the segment the driver follows.

/// Distance in points between two absolute points.
const KEY_EVERY: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedPoints {
    /// Point `j * KEY_EVERY`, absolute.
    keys: Vec<[i32; 2]>,
    /// `steps[i]` = point `i` minus point `i - 1`; `steps[0]` is `[0, 0]`.
    steps: Vec<[i16; 2]>,
}

impl PackedPoints {
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Appends `p`, and before it as many points on the straight line from the
    /// last point as the step needs to fit 16 bits. Returns how many points
    /// were appended (1 unless the step was split).
    pub fn push(&mut self, p: [i32; 2]) -> usize {
        let Some(last) = self.last() else {
            self.append(p, [0, 0]);
            return 1;
        };
        let d = [
            i64::from(p[0]) - i64::from(last[0]),
            i64::from(p[1]) - i64::from(last[1]),
        ];
        let longest = d[0].unsigned_abs().max(d[1].unsigned_abs());
        let parts = longest.div_ceil(i16::MAX as u64).max(1) as i64;
        let mut prev = last;
        for k in 1..=parts {
            // Rounded on the line from `last`, so the parts add up to `p` exactly.
            let at = [
                i64::from(last[0]) + d[0] * k / parts,
                i64::from(last[1]) + d[1] * k / parts,
            ];
            let at = [at[0] as i32, at[1] as i32];
            self.append(at, [(at[0] - prev[0]) as i16, (at[1] - prev[1]) as i16]);
            prev = at;
        }
        parts as usize
    }

    fn append(&mut self, p: [i32; 2], step: [i16; 2]) {
        if self.steps.len() % KEY_EVERY == 0 {
            self.keys.push(p);
        }
        self.steps.push(step);
    }

    /// Point `i`; `i < len()`.
    pub fn get(&self, i: usize) -> [i32; 2] {
        let key = i / KEY_EVERY;
        let mut p = self.keys[key];
        for s in &self.steps[key * KEY_EVERY + 1..=i] {
            p = [p[0] + i32::from(s[0]), p[1] + i32::from(s[1])];
        }
        p
    }

    pub fn last(&self) -> Option<[i32; 2]> {
        (!self.is_empty()).then(|| self.get(self.len() - 1))
    }

    /// The points from `first` on, decoded one step at a time.
    pub fn iter_from(&self, first: usize) -> impl Iterator<Item = [i32; 2]> + '_ {
        let mut p = (first < self.len()).then(|| self.get(first));
        let mut i = first;
        std::iter::from_fn(move || {
            let here = p?;
            i += 1;
            p = self
                .steps
                .get(i)
                .map(|s| [here[0] + i32::from(s[0]), here[1] + i32::from(s[1])]);
            Some(here)
        })
    }

    /// Forgets the first `k` points and gives back the memory.
    pub fn drop_front(&mut self, k: usize) {
        let rest: Vec<[i32; 2]> = self.iter_from(k).collect();
        let mut packed = PackedPoints {
            keys: Vec::with_capacity(rest.len().div_ceil(KEY_EVERY)),
            steps: Vec::with_capacity(rest.len()),
        };
        for p in rest {
            // Neighbours were within 16 bits already: nothing is split.
            packed.push(p);
        }
        *self = packed;
    }

    pub fn heap_bytes(&self) -> usize {
        self.keys.capacity() * std::mem::size_of::<[i32; 2]>()
            + self.steps.capacity() * std::mem::size_of::<[i16; 2]>()
    }

    pub fn shrink_to_fit(&mut self) {
        self.keys.shrink_to_fit();
        self.steps.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(points: &[[i32; 2]]) -> PackedPoints {
        let mut p = PackedPoints::default();
        for &q in points {
            p.push(q);
        }
        p
    }

    #[test]
    fn every_point_decodes_to_what_was_pushed() {
        let points: Vec<[i32; 2]> = (0..200)
            .map(|i| [9_000_000 + i * 1_234 - (i % 7) * 999, 45_000_000 - i * 321])
            .collect();
        let p = packed(&points);
        assert_eq!(p.len(), points.len());
        for (i, q) in points.iter().enumerate() {
            assert_eq!(p.get(i), *q, "point {i}");
        }
        assert_eq!(p.iter_from(0).collect::<Vec<_>>(), points);
        assert_eq!(p.iter_from(70).collect::<Vec<_>>(), points[70..]);
        assert_eq!(p.iter_from(200).count(), 0);
        assert_eq!(p.last(), points.last().copied());
    }

    #[test]
    fn a_long_step_is_split_on_the_straight_line() {
        let (a, b) = ([12_000_000, 41_000_000], [12_100_000, 41_050_000]);
        let mut p = packed(&[a]);
        assert_eq!(p.push(b), 4, "100,000 units need 4 parts of at most 32,767");
        assert_eq!(p.last(), Some(b));
        for i in 1..p.len() {
            let q = p.get(i);
            // On the line from a to b: the cross product is 0 up to rounding.
            let cross = i64::from(q[0] - a[0]) * i64::from(b[1] - a[1])
                - i64::from(q[1] - a[1]) * i64::from(b[0] - a[0]);
            assert!(cross.abs() <= 100_000, "point {i} off the line: {cross}");
        }
    }

    #[test]
    fn dropping_the_front_keeps_the_rest_and_its_memory_shrinks() {
        let points: Vec<[i32; 2]> = (0..100).map(|i| [i * 30_000, -i * 17]).collect();
        let mut p = packed(&points);
        let before = p.heap_bytes();
        p.drop_front(60);
        assert_eq!(p.iter_from(0).collect::<Vec<_>>(), points[60..]);
        assert!(p.heap_bytes() < before);
    }

    #[test]
    fn four_bytes_a_point() {
        let points: Vec<[i32; 2]> = (0..3_200).map(|i| [i * 100, i * 50]).collect();
        let mut p = packed(&points);
        p.shrink_to_fit();
        assert_eq!(p.heap_bytes(), 3_200 * 4 + 100 * 8);
    }
}
