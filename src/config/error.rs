//! Configuration errors. A config is checked completely before it is used,
//! so problems are collected rather than returned one at a time: an operator
//! fixing a file sees every mistake in one run of `--validate`.

use std::fmt;
use std::path::PathBuf;

/// One problem with one field, named by its path in the file
/// (`sites[1].upstream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML parser's message, which names line and column.
    #[error("{0}")]
    Syntax(String),
    #[error("{}", join_lines(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// Every problem as its own line, for `--validate` and reload logs.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string().trim_end().to_owned()],
        }
    }
}

fn join_lines(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
