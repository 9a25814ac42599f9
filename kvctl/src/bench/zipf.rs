//! Key choosers: uniform, and zipfian after YCSB (Gray et al., "Quickly
//! generating billion-record synthetic databases"), with popular keys scattered
//! over the key space by a fixed permutation so that the hot keys are not
//! neighbours (and do not all land in one bucket).

use super::rng::Rng;

/// Zipf exponent of `--distribution zipfian` (YCSB's default).
pub const DEFAULT_THETA: f64 = 0.99;

/// Invalid sampler parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ZipfError {
    #[error("the key space must hold at least one key")]
    Empty,
    #[error("the zipf exponent must be in (0, 1), not {0}")]
    Theta(f64),
}

/// `sum_{i=1..=n} 1 / i^theta`.
pub fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

/// Draws ranks `0..n` with `P(rank = k) ∝ 1 / (k+1)^theta` (rank 0 most popular).
#[derive(Clone, Debug)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    zetan: f64,
    alpha: f64,
    eta: f64,
    half_pow_theta: f64,
}

impl Zipfian {
    pub fn new(n: u64, theta: f64) -> Result<Zipfian, ZipfError> {
        if n == 0 {
            return Err(ZipfError::Empty);
        }
        if !(theta > 0.0 && theta < 1.0) {
            return Err(ZipfError::Theta(theta));
        }
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2.min(n), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = if n > 2 {
            (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan)
        } else {
            0.0
        };
        Ok(Zipfian {
            n,
            theta,
            zetan,
            alpha,
            eta,
            half_pow_theta: 0.5f64.powf(theta),
        })
    }

    pub fn n(&self) -> u64 {
        self.n
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The exact probability of `rank` under this distribution.
    pub fn probability(&self, rank: u64) -> f64 {
        if rank >= self.n {
            return 0.0;
        }
        1.0 / ((rank + 1) as f64).powf(self.theta) / self.zetan
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if self.n >= 2 && uz < 1.0 + self.half_pow_theta {
            return 1;
        }
        if self.n <= 2 {
            return self.n - 1;
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

/// `--distribution`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipfian,
}

/// Picks key indexes `0..n`.
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform { n: u64 },
    Zipfian { z: Zipfian, mult: u64, offset: u64 },
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl KeyChooser {
    pub fn new(dist: Distribution, n: u64) -> Result<KeyChooser, ZipfError> {
        if n == 0 {
            return Err(ZipfError::Empty);
        }
        Ok(match dist {
            Distribution::Uniform => KeyChooser::Uniform { n },
            Distribution::Zipfian => {
                // rank -> (rank * mult + offset) mod n is a bijection when
                // gcd(mult, n) = 1: a fixed scatter of the hot ranks.
                let mut mult = (2_654_435_761 % n).max(1);
                while gcd(mult, n) != 1 {
                    mult += 1;
                }
                KeyChooser::Zipfian {
                    z: Zipfian::new(n, DEFAULT_THETA)?,
                    mult,
                    offset: 0x9E37_79B9 % n,
                }
            }
        })
    }

    /// The key index of a zipfian `rank` (identity for uniform).
    pub fn index_of_rank(&self, rank: u64) -> u64 {
        match self {
            KeyChooser::Uniform { .. } => rank,
            KeyChooser::Zipfian { z, mult, offset } => {
                ((u128::from(rank) * u128::from(*mult) + u128::from(*offset)) % u128::from(z.n()))
                    as u64
            }
        }
    }

    pub fn next(&self, rng: &mut Rng) -> u64 {
        match self {
            KeyChooser::Uniform { n } => rng.below(*n),
            KeyChooser::Zipfian { z, .. } => self.index_of_rank(z.sample(rng)),
        }
    }
}
