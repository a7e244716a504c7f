//! Replay on subscribe (pure): what a client asks for, and where in each
//! Kafka partition the replay starts once the configured bounds apply.
//!
//! A client asks for history in one of two ways:
//! - MQTT 5: a SUBSCRIBE user property, `replay-from` = an RFC 3339 time
//!   (`2026-12-03T01:00:00Z`), epoch milliseconds, or a duration back from
//!   now (`-30s`, `-10m`, `-2h`, `-1d`), or `replay-last` = N records per
//!   Kafka partition. Properties belong to the packet, so every filter of
//!   that SUBSCRIBE is replayed.
//! - any version (the only way for MQTT 3.1.1): the filter
//!   `$replay/<spec>/<filter>`, spec `from=<time>` or `last=<N>`, e.g.
//!   `$replay/from=-10m/cars/#`. A `+` is only legal as a whole filter level
//!   [MQTT-4.7.1-2], so a time with a `+hh:mm` offset cannot be written
//!   here: use `Z`, epoch ms or a duration.
//!
//! The I/O (Kafka offsets, the read, the switch to live) is in
//! `connection/replay.rs` and `kafka/replay.rs`; this module only decides.

use lodestream_mqtt::ReasonCode;
use thiserror::Error;

/// The SUBSCRIBE user property asking for history from a time.
pub const PROP_FROM: &str = "replay-from";
/// The SUBSCRIBE user property asking for the last N records per partition.
pub const PROP_LAST: &str = "replay-last";
/// The filter prefix for clients without user properties (MQTT 3.1.1).
pub const PREFIX: &str = "$replay/";

/// Where a replay starts, as the client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// Records with a Kafka timestamp at or after this time (epoch ms).
    Since(i64),
    /// The last N records of each Kafka partition the filter reads.
    Last(u64),
}

/// Why a replay is not started; each maps to one SUBACK reason code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplayError {
    #[error("replay property {name}: {why}")]
    BadProperty { name: String, why: String },
    #[error("replay filter prefix: {0}")]
    BadPrefix(String),
    #[error("replay is disabled on this broker (mqtt.replay_max_lookback_s = 0)")]
    Disabled,
    #[error("replay of a shared subscription is not offered")]
    Shared,
    #[error("replay not authorized for this filter")]
    NotAuthorized,
    #[error("replay of {records} records exceeds mqtt.replay_max_records = {max}; ask for less")]
    TooLarge { records: u64, max: u64 },
    #[error("{max} replays already running on this connection (mqtt.replay_max_concurrent)")]
    TooMany { max: usize },
    #[error("Kafka could not be read for the replay: {0}")]
    Kafka(String),
}

impl ReplayError {
    /// The `result` label of `lodestream_replays_total` for this refusal.
    pub fn label(&self) -> &'static str {
        match self {
            ReplayError::BadProperty { .. } | ReplayError::BadPrefix(_) => "bad_request",
            ReplayError::Disabled => "disabled",
            ReplayError::Shared => "shared",
            ReplayError::NotAuthorized => "not_authorized",
            ReplayError::TooLarge { .. } => "too_large",
            ReplayError::TooMany { .. } => "too_many",
            ReplayError::Kafka(_) => "kafka_error",
        }
    }

    /// The SUBACK reason code (3.1.1 clients see 0x80 for each).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            // A property of ours, not the filter, is wrong.
            ReplayError::BadProperty { .. } | ReplayError::Disabled => {
                ReasonCode::ImplementationSpecificError
            }
            ReplayError::BadPrefix(_) => ReasonCode::TopicFilterInvalid,
            ReplayError::Shared => ReasonCode::SharedSubscriptionsNotSupported,
            ReplayError::NotAuthorized => ReasonCode::NotAuthorized,
            ReplayError::TooLarge { .. } | ReplayError::TooMany { .. } => ReasonCode::QuotaExceeded,
            ReplayError::Kafka(_) => ReasonCode::UnspecifiedError,
        }
    }
}

/// The replay a SUBSCRIBE asks for on one filter: the start, and the filter
/// without the `$replay/<spec>/` prefix (borrowed from the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub start: ReplayStart,
    pub filter: &'a str,
}

/// The replay asked for by the packet's user properties (`None`: none).
pub fn from_properties(
    props: &[(String, String)],
    now_ms: i64,
) -> Result<Option<ReplayStart>, ReplayError> {
    let mut found: Option<ReplayStart> = None;
    for (name, value) in props {
        let start = match name.as_str() {
            PROP_FROM => parse_time(value, now_ms).map(ReplayStart::Since),
            PROP_LAST => parse_count(value).map(ReplayStart::Last),
            _ => continue,
        };
        let bad = |why: String| ReplayError::BadProperty {
            name: name.clone(),
            why,
        };
        let start = start.map_err(bad)?;
        if found.is_some() {
            return Err(bad(format!("give one of {PROP_FROM} or {PROP_LAST}, once")));
        }
        found = Some(start);
    }
    Ok(found)
}

/// Splits `$replay/<spec>/<filter>`; `Ok(None)` for any other filter.
pub fn from_prefix(filter: &str, now_ms: i64) -> Result<Option<Request<'_>>, ReplayError> {
    let Some(rest) = filter.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    let bad = |why: &str| ReplayError::BadPrefix(format!("{filter:?}: {why}"));
    let (spec, inner) = rest
        .split_once('/')
        .ok_or_else(|| bad("expected $replay/from=<time>/<filter> or $replay/last=<N>/<filter>"))?;
    if inner.is_empty() {
        return Err(bad("the filter after the spec is empty"));
    }
    if inner.starts_with(PREFIX) || inner.starts_with(lodestream_mqtt::topic::SHARE_PREFIX) {
        return Err(bad(
            "the filter after the spec may not be $replay/ or $share/",
        ));
    }
    let start = match spec.split_once('=') {
        Some(("from", v)) => parse_time(v, now_ms).map(ReplayStart::Since),
        Some(("last", v)) => parse_count(v).map(ReplayStart::Last),
        _ => Err(format!(
            "unknown spec {spec:?}: expected from=<time> or last=<N>"
        )),
    }
    .map_err(|why| bad(&why))?;
    Ok(Some(Request {
        start,
        filter: inner,
    }))
}

fn parse_count(v: &str) -> Result<u64, String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{v:?} is not a record count (decimal digits)"));
    }
    v.parse()
        .map_err(|_| format!("{v:?} is too large a record count"))
}

/// An RFC 3339 time, epoch milliseconds, or `-<n><s|m|h|d>` back from `now_ms`.
pub fn parse_time(v: &str, now_ms: i64) -> Result<i64, String> {
    if let Some(d) = v.strip_prefix('-') {
        let unit_ms: i64 = match d.as_bytes().last() {
            Some(b's') => 1_000,
            Some(b'm') => 60_000,
            Some(b'h') => 3_600_000,
            Some(b'd') => 86_400_000,
            _ => return Err(format!("{v:?}: a duration ends in s, m, h or d")),
        };
        let n = parse_count(&d[..d.len() - 1]).map_err(|_| format!("{v:?} is not a duration"))?;
        let back = i64::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(unit_ms))
            .ok_or_else(|| format!("{v:?} is too long a duration"))?;
        return Ok(now_ms.saturating_sub(back));
    }
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse()
            .map_err(|_| format!("{v:?} is too large for epoch milliseconds"));
    }
    parse_rfc3339(v).ok_or_else(|| {
        format!("{v:?} is not an RFC 3339 time, epoch milliseconds or a duration like -10m")
    })
}

/// RFC 3339 `date-time` (section 5.6) to epoch milliseconds; fractions
/// beyond milliseconds are cut, a leap second counts as :59.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    let seps = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if b.len() < 20 || seps.iter().any(|(i, c)| b[*i] != *c) || !matches!(b[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut ms = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        ms = format!("{digits:0<3}").parse().ok()?;
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            if *sign == b'-' {
                -(oh * 60 + om)
            } else {
                oh * 60 + om
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec.min(59);
    Some((secs - offset_min * 60) * 1000 + ms)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The configured limits a replay is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// How far back a replay may reach (ms); older requests are clipped.
    pub max_lookback_ms: i64,
    /// Records (of every partition it reads, matching or not) one replay may read.
    pub max_records: u64,
}

/// The oldest time a replay may start at: what the client asked, or
/// `now - max_lookback` when it asked for more (then `clipped`).
pub fn oldest_time(start: ReplayStart, now_ms: i64, b: Bounds) -> (i64, bool) {
    let limit = now_ms.saturating_sub(b.max_lookback_ms);
    match start {
        ReplayStart::Since(t) if t < limit => (limit, true),
        ReplayStart::Since(t) => (t, false),
        ReplayStart::Last(_) => (limit, false),
    }
}

/// One Kafka partition as the replay finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Log start and high watermark.
    pub low: i64,
    pub high: i64,
    /// First offset with a timestamp at or after the oldest allowed time
    /// (`None`: no such record, i.e. `high`).
    pub at_oldest: Option<i64>,
    /// Where this node's fan-out is on the partition: the replay reads at
    /// least from there, so nothing falls between it and live delivery.
    pub fan_out: i64,
}

/// Where a replay starts in one partition, and whether the lookback cut a
/// `Last(n)` request short.
pub fn start_offset(start: ReplayStart, w: Window) -> (i64, bool) {
    let oldest = w.at_oldest.unwrap_or(w.high).max(w.low);
    let (wanted, clipped) = match start {
        ReplayStart::Since(_) => (oldest, false),
        ReplayStart::Last(n) => {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            let from = w.high.saturating_sub(n).max(w.low);
            (from.max(oldest), from < oldest)
        }
    };
    (wanted.min(w.fan_out), clipped)
}

/// Records a replay will read past its start offsets, up to the high
/// watermarks; refused when over the bound.
pub fn check_size(starts: &[(i64, Window)], b: Bounds) -> Result<u64, ReplayError> {
    let records: u64 = starts
        .iter()
        .map(|(s, w)| u64::try_from(w.high.saturating_sub(*s)).unwrap_or(0))
        .sum();
    if records > b.max_records {
        return Err(ReplayError::TooLarge {
            records,
            max: b.max_records,
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_727_200_000; // 2025-12-03T02:00:00Z

    fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rfc3339_times_epoch_ms_and_durations_parse() {
        assert_eq!(parse_time("2025-12-03T02:00:00Z", 0), Ok(NOW));
        assert_eq!(parse_time("2025-12-03t02:00:00.5z", 0), Ok(NOW + 500));
        assert_eq!(
            parse_time("2025-12-03T03:00:00.123456+01:00", 0),
            Ok(NOW + 123)
        );
        assert_eq!(parse_time("2025-12-02T23:30:00-02:30", 0), Ok(NOW));
        assert_eq!(parse_time("1970-01-01T00:00:00Z", 0), Ok(0));
        assert_eq!(parse_time("2024-02-29T00:00:00Z", 0), Ok(1_709_164_800_000));
        assert_eq!(parse_time("1764727200000", 0), Ok(NOW));
        assert_eq!(parse_time("-90s", NOW), Ok(NOW - 90_000));
        assert_eq!(parse_time("-10m", NOW), Ok(NOW - 600_000));
        assert_eq!(parse_time("-2h", NOW), Ok(NOW - 7_200_000));
        assert_eq!(parse_time("-1d", NOW), Ok(NOW - 86_400_000));
    }

    #[test]
    fn malformed_times_are_refused_not_guessed() {
        for bad in [
            "",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-12-03T24:00:00Z",
            "2025-12-03T02:00:00",
            "2025-12-03T02:00:00.Z",
            "2025-12-03T02:00:00+0100",
            "2025-12-03",
            "-10",
            "-m",
            "-10w",
            "99999999999999999999",
            "-99999999999999999d",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_properties_ask_for_one_replay() {
        assert_eq!(from_properties(&props(&[("a", "b")]), NOW), Ok(None));
        assert_eq!(
            from_properties(&props(&[("replay-last", "10")]), NOW),
            Ok(Some(ReplayStart::Last(10)))
        );
        assert_eq!(
            from_properties(&props(&[("x", "y"), ("replay-from", "-1m")]), NOW),
            Ok(Some(ReplayStart::Since(NOW - 60_000)))
        );
        let both = from_properties(&props(&[("replay-last", "1"), ("replay-from", "-1m")]), NOW);
        assert!(matches!(both, Err(ReplayError::BadProperty { .. })));
        let bad = from_properties(&props(&[("replay-last", "-1")]), NOW);
        assert_eq!(
            bad.map_err(|e| e.reason_code()),
            Err(ReasonCode::ImplementationSpecificError)
        );
    }

    #[test]
    fn prefix_names_the_spec_and_the_filter() {
        assert_eq!(from_prefix("cars/#", NOW), Ok(None));
        assert_eq!(
            from_prefix("$replay/last=5/cars/#", NOW),
            Ok(Some(Request {
                start: ReplayStart::Last(5),
                filter: "cars/#"
            }))
        );
        assert_eq!(
            from_prefix("$replay/from=2025-12-03T02:00:00Z/+/speed", NOW),
            Ok(Some(Request {
                start: ReplayStart::Since(NOW),
                filter: "+/speed"
            }))
        );
        for bad in [
            "$replay/last=5",
            "$replay/last=5/",
            "$replay/first=5/a",
            "$replay/last=x/a",
            "$replay/from=soon/a",
            "$replay/last=1/$replay/last=1/a",
            "$replay/last=1/$share/g/a",
        ] {
            let e = from_prefix(bad, NOW).expect_err(bad);
            assert_eq!(e.reason_code(), ReasonCode::TopicFilterInvalid, "{bad}");
        }
    }

    const B: Bounds = Bounds {
        max_lookback_ms: 3_600_000,
        max_records: 100,
    };

    #[test]
    fn lookback_clips_an_older_start_time() {
        assert_eq!(
            oldest_time(ReplayStart::Since(NOW - 60_000), NOW, B),
            (NOW - 60_000, false)
        );
        assert_eq!(
            oldest_time(ReplayStart::Since(0), NOW, B),
            (NOW - 3_600_000, true)
        );
        assert_eq!(
            oldest_time(ReplayStart::Last(5), NOW, B),
            (NOW - 3_600_000, false)
        );
    }

    fn w(low: i64, high: i64, at_oldest: Option<i64>, fan_out: i64) -> Window {
        Window {
            low,
            high,
            at_oldest,
            fan_out,
        }
    }

    #[test]
    fn start_offsets_per_partition() {
        let since = ReplayStart::Since(0);
        // From the first record at the time; none that new: nothing to replay.
        assert_eq!(start_offset(since, w(0, 50, Some(20), 50)), (20, false));
        assert_eq!(start_offset(since, w(0, 50, None, 50)), (50, false));
        // Retention removed the start: from the log start.
        assert_eq!(start_offset(since, w(30, 50, Some(10), 50)), (30, false));
        // Last N, within the lookback; more than the partition holds.
        assert_eq!(
            start_offset(ReplayStart::Last(5), w(0, 50, Some(0), 50)),
            (45, false)
        );
        assert_eq!(
            start_offset(ReplayStart::Last(500), w(7, 50, Some(0), 50)),
            (7, false)
        );
        // Last N reaching behind the lookback: clipped to it.
        assert_eq!(
            start_offset(ReplayStart::Last(40), w(0, 50, Some(30), 50)),
            (30, true)
        );
        // Fan-out behind the high watermark: read from fan-out's position,
        // so no record falls between the replay and live delivery.
        assert_eq!(
            start_offset(ReplayStart::Last(0), w(0, 50, Some(0), 44)),
            (44, false)
        );
    }

    #[test]
    fn a_replay_over_max_records_is_refused_with_quota_exceeded() {
        let ok = [(0, w(0, 60, None, 60)), (20, w(0, 60, None, 60))];
        assert_eq!(check_size(&ok, B), Ok(100));
        let over = [(0, w(0, 60, None, 60)), (19, w(0, 60, None, 60))];
        let e = check_size(&over, B).expect_err("over");
        assert_eq!(
            e,
            ReplayError::TooLarge {
                records: 101,
                max: 100
            }
        );
        assert_eq!(e.reason_code(), ReasonCode::QuotaExceeded);
    }
}
