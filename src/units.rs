//! Sizes as people write and read them: "1.5Gi" in, "1.5 GiB" out.

const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// Bytes in binary units with one decimal ("10.0 GiB"); plain bytes below 1 KiB.
pub fn format_bytes(bytes: u64) -> String {
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A size with a unit: "10Gi", "1.5Gi", "512Mi", "2GiB", "1G" (powers of
/// ten), "4096B". A number without a unit is refused: it is too easy to
/// mean GiB and get bytes. Fractions are rounded up to a whole byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| format!("{s:?} is not a size; write a number and a unit, like 10Gi, 1.5Gi or 512Mi"))?;
    let mult: u64 = match unit {
        "" => return Err(format!("{s:?} has no unit; write {s}Gi, {s}Mi or {s}B (bytes) so there is no doubt")),
        "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "K" | "k" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use Ki, Mi, Gi, Ti (powers of 1024), K, M, G, T (powers of 1000) or B")),
    };
    let bytes = (n * mult as f64).ceil();
    if bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_a_unit_only() {
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("0Gi").unwrap(), 0);
        assert!(parse_size("1").unwrap_err().contains("no unit"));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1Qi").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999Ti").is_err());
        assert!(parse_size("1..5Gi").is_err());
    }

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(20 << 40), "20.0 TiB");
    }
}
