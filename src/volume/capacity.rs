//! Capacity in Cinder's terms: the CapacityFilter's pass/fail rule and the
//! capacity weigher's "virtual free" figure, for thin and thick volumes.
//!
//! Reserved space is `floor(total * reserved_percentage / 100)`. A thick
//! request fits when `free - reserved >= size`. A thin request, with an
//! over-subscription ratio of at least 1, fits when
//! `(provisioned + size) / total <= ratio` and `(free - reserved) * ratio >= size`;
//! with a ratio below 1 thin behaves like thick.

use serde::{Deserialize, Serialize};

/// The figures a pool reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PoolCapacity {
    pub total: u64,
    pub free: u64,
    pub provisioned: u64,
    pub max_over_subscription_ratio: f64,
    pub reserved_percentage: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    #[default]
    Thin,
    Thick,
}

impl Provisioning {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "thin" => Some(Provisioning::Thin),
            "thick" => Some(Provisioning::Thick),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Provisioning::Thin => "thin",
            Provisioning::Thick => "thick",
        }
    }
}

/// Why a request does not fit, worded for the person who made it.
#[derive(Debug, Clone, PartialEq)]
pub enum Shortfall {
    /// The pool reports no usable capacity at all.
    NoCapacity,
    /// Thin: provisioning this would exceed the over-subscription ratio.
    OverSubscribed { ratio_after: f64, max_ratio: f64 },
    /// Not enough free space once the reserve is kept back.
    NotEnoughFree { requested: u64, available: u64 },
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::NoCapacity => write!(f, "the pool reports no capacity"),
            Shortfall::OverSubscribed { ratio_after, max_ratio } => {
                write!(f, "provisioned/total would be {ratio_after:.2}, above the max over-subscription ratio {max_ratio:.2}")
            }
            Shortfall::NotEnoughFree { requested, available } => {
                write!(f, "{requested} bytes requested but only {available} bytes usable after the reserve")
            }
        }
    }
}

impl PoolCapacity {
    /// Bytes held back by reserved_percentage, floored as Cinder does. In
    /// integers: the exact floor, with no floating-point division for
    /// every node of every decision (a float product loses the last bits
    /// of a total over 2^53 bytes, and its rounding could lift the floor
    /// by one only for a reserve over about 2^45 bytes).
    pub fn reserved(&self) -> u64 {
        let percent = u64::from(self.reserved_percentage.min(100));
        match self.total.checked_mul(percent) {
            Some(product) => product / 100,
            None => (u128::from(self.total) * u128::from(percent) / 100) as u64,
        }
    }

    fn thin_overcommits(&self) -> bool {
        self.max_over_subscription_ratio >= 1.0
    }

    /// Cinder's CapacityFilter: does a volume of `size` bytes fit?
    pub fn fits(&self, size: u64, provisioning: Provisioning) -> Result<(), Shortfall> {
        if self.total == 0 {
            return Err(Shortfall::NoCapacity);
        }
        let usable = self.free.saturating_sub(self.reserved());
        if provisioning == Provisioning::Thin && self.thin_overcommits() {
            let ratio_after = (self.provisioned as f64 + size as f64) / self.total as f64;
            if ratio_after > self.max_over_subscription_ratio {
                return Err(Shortfall::OverSubscribed { ratio_after, max_ratio: self.max_over_subscription_ratio });
            }
            let virtual_free = usable as f64 * self.max_over_subscription_ratio;
            if virtual_free >= size as f64 {
                return Ok(());
            }
            return Err(Shortfall::NotEnoughFree { requested: size, available: virtual_free as u64 });
        }
        if usable >= size {
            Ok(())
        } else {
            Err(Shortfall::NotEnoughFree { requested: size, available: usable })
        }
    }

    /// Cinder's capacity weigher figure: virtual free capacity.
    /// Thin: `total * ratio - provisioned - reserved`; thick: `free - reserved`.
    /// May be negative for an over-committed pool.
    pub fn virtual_free(&self, provisioning: Provisioning) -> f64 {
        let reserved = self.reserved() as f64;
        if provisioning == Provisioning::Thin && self.thin_overcommits() {
            self.total as f64 * self.max_over_subscription_ratio - self.provisioned as f64 - reserved
        } else {
            self.free as f64 - reserved
        }
    }

    /// The largest volume `fits` accepts now (what GetCapacity reports).
    pub fn max_volume(&self, provisioning: Provisioning) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let usable = self.free.saturating_sub(self.reserved()) as f64;
        if provisioning == Provisioning::Thin && self.thin_overcommits() {
            let by_ratio = self.total as f64 * self.max_over_subscription_ratio - self.provisioned as f64;
            let by_free = usable * self.max_over_subscription_ratio;
            by_ratio.min(by_free).max(0.0) as u64 // truncation: the floor of a figure >= 0
        } else {
            usable as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn pool(total: u64, free: u64, provisioned: u64, ratio: f64, reserved: u32) -> PoolCapacity {
        PoolCapacity {
            total: total * GB,
            free: free * GB,
            provisioned: provisioned * GB,
            max_over_subscription_ratio: ratio,
            reserved_percentage: reserved,
        }
    }

    // The cases below follow the scenarios Cinder documents for its capacity
    // filter (thin with over-subscription, thick, reserved percentage); the
    // expected outcomes are worked out by hand from the formula above.

    #[test]
    fn the_reserve_is_the_exact_floor_for_any_total() {
        let reserve = |total: u64, percent: u32| {
            PoolCapacity { total, free: 0, provisioned: 0, max_over_subscription_ratio: 1.0, reserved_percentage: percent }.reserved()
        };
        assert_eq!(reserve(999, 10), 99);
        assert_eq!(reserve(1000, 10), 100);
        assert_eq!(reserve(500 * GB, 5), 25 * GB);
        assert_eq!(reserve(12345, 0), 0);
        assert_eq!(reserve(12345, 100), 12345);
        assert_eq!(reserve(12345, 250), 12345, "above 100% counts as 100%");
        // Where total * percent overflows 64 bits.
        assert_eq!(reserve(u64::MAX, 100), u64::MAX);
        assert_eq!(reserve(u64::MAX, 50), u64::MAX / 2);
        assert_eq!(reserve(u64::MAX / 3, 99), ((u128::from(u64::MAX / 3) * 99) / 100) as u64);
    }

    #[test]
    fn thick_passes_when_free_minus_reserve_covers_size() {
        // total 500, free 200, reserve 10% = 50: usable 150.
        let p = pool(500, 200, 0, 1.0, 10);
        assert!(p.fits(150 * GB, Provisioning::Thick).is_ok());
        assert!(matches!(p.fits(151 * GB, Provisioning::Thick), Err(Shortfall::NotEnoughFree { .. })));
    }

    #[test]
    fn thin_passes_within_over_subscription() {
        // total 500, free 200, provisioned 500, ratio 2.0, reserve 5% = 25.
        // (500 + 100) / 500 = 1.2 <= 2.0 and (200 - 25) * 2 = 350 >= 100.
        let p = pool(500, 200, 500, 2.0, 5);
        assert!(p.fits(100 * GB, Provisioning::Thin).is_ok());
    }

    #[test]
    fn thin_fails_above_over_subscription_ratio() {
        // (400 + 200) / 500 = 1.2 > 1.0
        let p = pool(500, 200, 400, 1.0, 0);
        assert!(matches!(p.fits(200 * GB, Provisioning::Thin), Err(Shortfall::OverSubscribed { .. })));
    }

    #[test]
    fn thin_fails_when_virtual_free_too_small() {
        // ratio 20: (1000 + 100)/500 = 2.2 fine, but free 10 - reserve 5% (25) < 0.
        let p = pool(500, 10, 1000, 20.0, 5);
        assert!(matches!(p.fits(100 * GB, Provisioning::Thin), Err(Shortfall::NotEnoughFree { .. })));
    }

    #[test]
    fn thin_can_exceed_free_space_by_the_ratio() {
        // free 100, ratio 3: a 250 GB thin volume fits, a thick one does not.
        let p = pool(500, 100, 0, 3.0, 0);
        assert!(p.fits(250 * GB, Provisioning::Thin).is_ok());
        assert!(p.fits(250 * GB, Provisioning::Thick).is_err());
    }

    #[test]
    fn ratio_below_one_makes_thin_behave_like_thick() {
        let p = pool(500, 100, 5000, 0.8, 0);
        assert!(p.fits(100 * GB, Provisioning::Thin).is_ok());
        assert!(p.fits(101 * GB, Provisioning::Thin).is_err());
    }

    #[test]
    fn full_reserve_refuses_everything() {
        let p = pool(500, 500, 0, 2.0, 100);
        assert_eq!(p.max_volume(Provisioning::Thick), 0);
        assert!(p.fits(1, Provisioning::Thin).is_err());
    }

    #[test]
    fn empty_pool_is_no_capacity() {
        let p = pool(0, 0, 0, 1.0, 0);
        assert_eq!(p.fits(1, Provisioning::Thin), Err(Shortfall::NoCapacity));
    }

    #[test]
    fn virtual_free_matches_cinder_weigher() {
        // thin: 500 * 2 - 300 - floor(500 * 0.1) = 650
        let p = pool(500, 200, 300, 2.0, 10);
        assert_eq!(p.virtual_free(Provisioning::Thin), (650 * GB) as f64);
        // thick: 200 - 50 = 150
        assert_eq!(p.virtual_free(Provisioning::Thick), (150 * GB) as f64);
    }

    #[test]
    fn max_volume_is_the_boundary_of_fits() {
        for p in [pool(500, 200, 300, 2.0, 10), pool(100, 7, 0, 20.0, 3), pool(64, 64, 63, 1.0, 0)] {
            for prov in [Provisioning::Thin, Provisioning::Thick] {
                let m = p.max_volume(prov);
                if m > 0 {
                    assert!(p.fits(m, prov).is_ok(), "{p:?} {prov:?} {m}");
                }
                assert!(p.fits(m + GB, prov).is_err(), "{p:?} {prov:?} {m}");
            }
        }
    }
}
