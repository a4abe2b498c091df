//! Durations (`"500ms"`, `"3s"`) and byte sizes (`"16MB"`) as they appear in the config file.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written with a unit: `us`, `ms`, `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

/// A size in bytes, written bare or with `B`, `kB`, `MB`, `GB`, `TB` (powers of 1024, as in
/// PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\""))?;
    let secs = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        "" => {
            return Err(format!(
                "duration \"{s}\" needs a unit (us, ms, s, m, h, d)"
            ));
        }
        _ => return Err(format!("unknown unit \"{unit}\" in duration \"{s}\"")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration \"{s}\" is out of range"))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_millis() == 0 && ms >= 1000 {
        format!("{}s", d.as_secs())
    } else if Duration::from_millis(ms as u64) == d {
        format!("{ms}ms")
    } else {
        format!("{}us", d.as_micros())
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let value: u64 = num.parse().map_err(|_| format!("invalid size \"{s}\""))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" | "k" => 1 << 10,
        "MB" | "M" => 1 << 20,
        "GB" | "G" => 1 << 30,
        "TB" | "T" => 1 << 40,
        _ => return Err(format!("unknown unit \"{unit}\" in size \"{s}\"")),
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("size \"{s}\" is out of range"))
}

pub fn format_size(n: u64) -> String {
    for (unit, mult) in [
        ("TB", 1u64 << 40),
        ("GB", 1 << 30),
        ("MB", 1 << 20),
        ("kB", 1 << 10),
    ] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    format!("{n}B")
}

struct StrOrInt<F>(&'static str, F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for StrOrInt<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.1)(&v.to_string()).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.1)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            "a duration like \"500ms\" or \"3s\"",
            |s: &str| parse_duration(s).map(Dur),
        ))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            "a size like \"16MB\" or a number of bytes",
            |s: &str| parse_size(s).map(ByteSize),
        ))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

impl Dur {
    pub const fn ms(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("3").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size("8kB").unwrap(), 8192);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999TB").is_err());
        assert_eq!(format_size(1 << 20), "1MB");
        assert_eq!(format_size(1000), "1000B");
    }
}
