//! Byte sizes as people and Kubernetes write them, parsed in one place: the CRD's quantities
//! (`64Gi`), the command lines' flags (`--dram 64GiB`, `--slot 512KiB`) and the chart's
//! values all mean the same bytes.
//!
//! A number (integer, or with a fraction: `1.5Gi`), an optional space, then a unit: none or
//! `B` (bytes); binary `Ki` `Mi` `Gi` `Ti` `Pi` `Ei`, also with a trailing `B` (`GiB`);
//! decimal `k` `M` `G` `T` `P` `E` (Kubernetes' meaning: `G` is 10⁹), also with a trailing `B`
//! (`GB`, `kB`, `KB`); an exponent (`5e9`); or Kubernetes' milli (`m`). A fraction of a byte
//! rounds up.

/// Parses a byte size (see the module's documentation).
///
/// # Errors
/// When the text is not a size, names an unknown unit, or is past `u64`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a byte size like 64GiB, 64Gi or 512KiB");
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    if num.is_empty() || num.matches('.').count() > 1 || num.ends_with('.') {
        return Err(bad());
    }
    let unit = unit.trim_start();
    let binary = |p: i32| Mult::Int(1u64 << (10 * p));
    let mult = match unit {
        "" | "B" => Mult::Int(1),
        "Ki" | "KiB" => binary(1),
        "Mi" | "MiB" => binary(2),
        "Gi" | "GiB" => binary(3),
        "Ti" | "TiB" => binary(4),
        "Pi" | "PiB" => binary(5),
        "Ei" | "EiB" => binary(6),
        "k" | "K" | "kB" | "KB" => Mult::Int(1_000),
        "M" | "MB" => Mult::Int(1_000_000),
        "G" | "GB" => Mult::Int(1_000_000_000),
        "T" | "TB" => Mult::Int(1_000_000_000_000),
        "P" | "PB" => Mult::Int(1_000_000_000_000_000),
        "E" | "EB" => Mult::Int(1_000_000_000_000_000_000),
        "m" => Mult::Float(1e-3),
        e if e.starts_with(['e', 'E']) && e.len() > 1 => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            Mult::Float(10f64.powi(exp))
        }
        other => {
            return Err(format!(
                "{s:?}: unknown byte unit {other:?} (B, KiB/Ki, MiB/Mi, GiB/Gi, TiB/Ti, or \
                 decimal kB/k, MB/M, GB/G, TB/T)"
            ))
        }
    };
    let too_large = || format!("{s:?} is too large");
    match (num.parse::<u64>(), mult) {
        (Ok(n), Mult::Int(m)) => n.checked_mul(m).ok_or_else(too_large),
        _ => {
            let value: f64 = num.parse().map_err(|_| bad())?;
            let m = match mult {
                #[allow(clippy::cast_precision_loss)]
                Mult::Int(m) => m as f64,
                Mult::Float(m) => m,
            };
            let bytes = (value * m).ceil();
            if !bytes.is_finite() || bytes >= u64::MAX as f64 {
                return Err(too_large());
            }
            // In range and non-negative by construction (no sign is accepted).
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(bytes as u64)
        }
    }
}

#[derive(Clone, Copy)]
enum Mult {
    Int(u64),
    Float(f64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_mean_the_same_bytes() {
        for (a, b) in [("64GiB", "64Gi"), ("512KiB", "512Ki"), ("2MiB", "2Mi"), ("1TiB", "1Ti")] {
            assert_eq!(parse_bytes(a), parse_bytes(b), "{a} vs {b}");
        }
        assert_eq!(parse_bytes("64Gi"), Ok(64 << 30));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("4096B"), Ok(4096));
        assert_eq!(parse_bytes("100KB"), Ok(100_000));
        assert_eq!(parse_bytes("100k"), Ok(100_000));
        assert_eq!(parse_bytes("5G"), Ok(5_000_000_000), "decimal, as Kubernetes");
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("5e9"), Ok(5_000_000_000));
        assert_eq!(parse_bytes("1500m"), Ok(2), "a fraction of a byte rounds up");
        for bad in ["lots", "1XB", "", "Gi", "1..5Gi", "1.Gi", "-1Gi", "99999999999999999999GiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(parse_bytes("16EiB").is_err(), "past u64");
    }
}
