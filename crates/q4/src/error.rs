//! Errors of the candle layer.

/// Everything that can go wrong in `q4`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Format(#[from] q4_formats::FormatError),
    #[error("{0}")]
    Msg(String),
    /// An error with the file / tensor it concerns in front.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// An error from a message.
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
}

/// Result alias of `q4`.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds "file / tensor" context to errors.
pub trait Context<T> {
    fn context(self, ctx: impl std::fmt::Display) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, ctx: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: ctx.to_string(),
            source: Box::new(e.into()),
        })
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f(),
            source: Box::new(e.into()),
        })
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}

/// Builds an `Error::Msg` with `format!` syntax.
#[macro_export]
macro_rules! q4_bail {
    ($($arg:tt)*) => { return Err($crate::Error::Msg(format!($($arg)*))) };
}
