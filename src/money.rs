//! Amounts of money as integers in a currency's minor unit.
//!
//! The trip system sends amounts as floating-point minor units (`4523.78` cents) and the
//! gateway wants floating-point major units (`45.23` dollars). Inside the program an amount is
//! always an integer count of minor units; floats exist only at those two edges.

use std::fmt;
use std::str::FromStr;

/// The largest amount Stripe accepts for one Checkout Session line item: eight digits of
/// minor units (999,999.99 in a two-decimal currency).
pub const STRIPE_MAX_AMOUNT: i64 = 99_999_999;

/// Why a value is not an amount or a currency we can charge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount is not a finite number")]
    NotFinite,
    #[error("amount {0} is not greater than zero")]
    NotPositive(String),
    #[error("amount {0} exceeds Stripe's limit of {STRIPE_MAX_AMOUNT} minor units")]
    TooLarge(String),
    #[error("currency {0:?} is not a three-letter ISO 4217 code that Stripe supports")]
    UnknownCurrency(String),
}

/// A positive amount in minor units (cents for USD, yen for JPY), within Stripe's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MinorUnits(i64);

impl MinorUnits {
    /// Converts the trip system's floating-point minor units. A fractional amount is rounded
    /// to the nearest minor unit, half away from zero (`4523.5` becomes `4524`).
    ///
    /// # Errors
    /// When the value is not finite, rounds to zero or less, or exceeds [`STRIPE_MAX_AMOUNT`].
    pub fn from_wire(value: f64) -> Result<Self, MoneyError> {
        if !value.is_finite() {
            return Err(MoneyError::NotFinite);
        }
        let rounded = value.round();
        if rounded < 1.0 {
            return Err(MoneyError::NotPositive(value.to_string()));
        }
        if rounded > STRIPE_MAX_AMOUNT as f64 {
            return Err(MoneyError::TooLarge(value.to_string()));
        }
        // In range 1..=STRIPE_MAX_AMOUNT, so the conversion is exact.
        Ok(Self(rounded as i64))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// A currency Stripe can charge in, remembered as the trip system spelled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    /// Exactly as received (`"USD"`): the session-created event echoes it unchanged.
    as_received: String,
    /// Stripe's lower-case code.
    stripe: stripe_types::Currency,
}

/// Currencies whose minor unit is the major unit (Stripe's zero-decimal list).
const ZERO_DECIMAL: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];
/// Currencies with three decimals (Stripe's three-decimal list).
const THREE_DECIMAL: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];

impl Currency {
    /// The received spelling, for echoing back to the trip system.
    pub fn as_received(&self) -> &str {
        &self.as_received
    }

    /// Stripe's code, for the Checkout Session.
    pub fn stripe(&self) -> &stripe_types::Currency {
        &self.stripe
    }

    /// Lower-case ISO code, as Stripe writes it.
    pub fn code(&self) -> String {
        self.stripe.to_string()
    }

    /// How many decimal places the currency's major unit has.
    pub fn exponent(&self) -> u32 {
        let code = self.code();
        if ZERO_DECIMAL.contains(&code.as_str()) {
            0
        } else if THREE_DECIMAL.contains(&code.as_str()) {
            3
        } else {
            2
        }
    }

    /// The amount in major units as the gateway's JSON number: `45.23` for 4523 USD cents,
    /// `1500` for 1500 JPY, `1.5` for 1500 KWD fils. Integral values are written without a
    /// fraction, as Go writes a float64.
    pub fn major_units(&self, amount: MinorUnits) -> serde_json::Number {
        let scale = 10_i64.pow(self.exponent());
        if amount.get() % scale == 0 {
            serde_json::Number::from(amount.get() / scale)
        } else {
            // Both operands are exact in f64 and the quotient is correctly rounded, so the
            // shortest representation printed is the decimal value itself.
            let value = amount.get() as f64 / scale as f64;
            serde_json::Number::from_f64(value).expect("a quotient of finite numbers is finite")
        }
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || MoneyError::UnknownCurrency(s.to_owned());
        if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(unknown());
        }
        let lower = s.to_ascii_lowercase();
        // async-stripe's list lacks Stripe's three-decimal currencies; they pass through as
        // `Unknown`, which serializes as the plain code.
        match stripe_types::Currency::from_str(&lower) {
            Ok(stripe_types::Currency::Unknown(code)) if THREE_DECIMAL.contains(&code.as_str()) => {
                Ok(Self {
                    as_received: s.to_owned(),
                    stripe: stripe_types::Currency::Unknown(code),
                })
            }
            Ok(stripe_types::Currency::Unknown(_)) | Err(_) => Err(unknown()),
            Ok(stripe) => Ok(Self { as_received: s.to_owned(), stripe }),
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn major(code: &str, minor: i64) -> String {
        let currency: Currency = code.parse().unwrap();
        currency.major_units(MinorUnits::from_wire(minor as f64).unwrap()).to_string()
    }

    #[test]
    fn rounds_half_away_from_zero() {
        assert_eq!(MinorUnits::from_wire(4523.78).unwrap().get(), 4524);
        assert_eq!(MinorUnits::from_wire(4523.5).unwrap().get(), 4524);
        assert_eq!(MinorUnits::from_wire(4523.49).unwrap().get(), 4523);
        assert_eq!(MinorUnits::from_wire(0.5).unwrap().get(), 1);
    }

    #[test]
    fn rejects_what_cannot_be_charged() {
        assert_eq!(MinorUnits::from_wire(f64::NAN), Err(MoneyError::NotFinite));
        assert_eq!(MinorUnits::from_wire(f64::INFINITY), Err(MoneyError::NotFinite));
        assert!(matches!(MinorUnits::from_wire(-5.0), Err(MoneyError::NotPositive(_))));
        assert!(matches!(MinorUnits::from_wire(0.49), Err(MoneyError::NotPositive(_))));
        assert!(matches!(MinorUnits::from_wire(1e8), Err(MoneyError::TooLarge(_))));
        assert!(MinorUnits::from_wire(99_999_999.0).is_ok());
        assert!(MinorUnits::from_wire(0.0).is_err());
        assert!(MinorUnits::from_wire(100_000_000.0).is_err());
    }

    #[test]
    fn major_units_use_the_currency_exponent() {
        assert_eq!(major("USD", 4523), "45.23");
        assert_eq!(major("USD", 4500), "45");
        assert_eq!(major("usd", 4520), "45.2");
        assert_eq!(major("USD", 1), "0.01");
        assert_eq!(major("JPY", 1500), "1500");
        assert_eq!(major("KWD", 1500), "1.5");
        assert_eq!(major("KWD", 1234), "1.234");
        assert_eq!(major("USD", 99_999_999), "999999.99");
    }

    #[test]
    fn currency_must_be_a_stripe_iso_code() {
        let usd: Currency = "USD".parse().unwrap();
        assert_eq!(usd.as_received(), "USD");
        assert_eq!(usd.code(), "usd");
        for bad in ["", "US", "USDD", "U$D", "XYZ", "123"] {
            assert!(bad.parse::<Currency>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_two_decimal_amount_prints_as_its_decimal() {
        for minor in (1..100_000).step_by(7) {
            let expected = format!("{}.{:02}", minor / 100, minor % 100);
            let expected = expected.trim_end_matches('0').trim_end_matches('.').to_owned();
            assert_eq!(major("USD", minor), expected);
        }
    }
}
