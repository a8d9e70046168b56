//! Fixed names for fieldless enums: the strings the Python API and the file manifests use.

/// `"'a'"`, `"'a' or 'b'"`, `"'a', 'b' or 'c'"`: the accepted names for an error message.
pub fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Gives a fieldless enum `name(self)` (its fixed name) and `parse(name)` (the inverse, with an
/// [`Error::InvalidArgument`](crate::error::Error::InvalidArgument) naming the argument `$arg`
/// and the accepted names, in the order listed here):
/// `named_enum!(Metric, "metric", { Mse => "mse", Mae => "mae" });`
macro_rules! named_enum {
    ($ty:ident, $arg:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Parses a name from [`Self::name`].
            pub fn parse(name: &str) -> $crate::error::Result<Self> {
                match name {
                    $($name => Ok(Self::$variant),)+
                    other => Err($crate::error::Error::invalid($arg, format!(
                            "expected {}, got {other:?}",
                            $crate::names::one_of(&[$($name),+])
                        ))),
                }
            }

            /// The name [`Self::parse`] accepts.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }
    };
}
pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    use super::one_of;

    #[test]
    fn lists_read_as_prose() {
        assert_eq!(one_of(&["a"]), "'a'");
        assert_eq!(one_of(&["a", "b"]), "'a' or 'b'");
        assert_eq!(one_of(&["a", "b", "c"]), "'a', 'b' or 'c'");
        assert_eq!(one_of(&[]), "");
    }
}
