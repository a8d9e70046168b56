//! The typed error of the core; the binding maps each kind to a Python exception.

use std::fmt;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A [`Error::LengthMismatch`] for `what` unless `actual == expected`.
pub fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// [`check_len`] for each `(what, expected, actual)` in order: the first mismatch.
pub fn check_lengths(checks: &[(&'static str, usize, usize)]) -> Result<()> {
    checks
        .iter()
        .try_for_each(|&(what, expected, actual)| check_len(what, expected, actual))
}

/// An error naming the first non-finite scale, if any (`unit`: what one scale covers, as in
/// "scale of block 3 is not finite").
pub fn check_finite_scales(scales: &[f32], unit: &str) -> Result<()> {
    match scales.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(b) => Err(Error::invalid(
            "scales",
            format!("scale of {unit} {b} is not finite"),
        )),
    }
}

/// Everything that can go wrong in the core. No function of the crate panics on bad input.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// `block_size` is not a power of two in 16..=4096.
    InvalidBlockSize(usize),
    /// A codebook's levels are unusable (wrong count, non-finite, unsorted, outside [-1, 1]).
    InvalidCodebook(String),
    /// The input holds NaN or an infinity at this flat index.
    NonFinite { index: usize },
    /// A block scale does not fit the chosen scale storage type.
    ScaleOverflow {
        block: usize,
        value: f32,
        dtype: &'static str,
    },
    /// A buffer has the wrong length for the layout it is used with.
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// Any other invalid argument, named.
    InvalidArgument { name: &'static str, message: String },
}

impl Error {
    /// An [`Error::InvalidArgument`] naming the argument `name`.
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Error {
        Error::InvalidArgument {
            name,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidBlockSize(b) => {
                write!(f, "block_size must be a power of two in 16..4096, got {b}")
            }
            Error::InvalidCodebook(msg) => write!(f, "invalid codebook: {msg}"),
            Error::NonFinite { index } => write!(
                f,
                "tensor holds a non-finite value (NaN or inf) at flat index {index}; \
                 quantization needs finite weights"
            ),
            Error::ScaleOverflow {
                block,
                value,
                dtype,
            } => write!(
                f,
                "scale of block {block} ({value:e}) does not fit scale_dtype={dtype}; \
                 use scale_dtype='bfloat16' or 'float32'"
            ),
            Error::LengthMismatch {
                what,
                expected,
                actual,
            } => {
                write!(f, "{what} has length {actual}, expected {expected}")
            }
            Error::InvalidArgument { name, message } => write!(f, "{name}: {message}"),
        }
    }
}

impl std::error::Error for Error {}
