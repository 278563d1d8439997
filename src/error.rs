//! The library's error type. Every variant says what was being read or done.

use std::path::PathBuf;

/// Errors from every part of lcc. User input never panics; it ends up here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write. The OS error is part
    /// of the message and deliberately not a `source`, so that printing the
    /// chain (`{:#}`) does not say it twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A file was read but its contents are not what its format promises.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// An operator lcc does not implement.
    #[error(
        "node '{node}': operator '{op_type}' (domain '{domain}', opset {opset}) is not supported by lcc"
    )]
    UnsupportedOp {
        node: String,
        op_type: String,
        domain: String,
        opset: i64,
    },
    /// The graph breaks an invariant (`ir::verify`).
    #[error("invalid graph: {0}")]
    Verify(String),
    /// Running a node failed (shape mismatch, bad input value, …).
    #[error("node '{node}' ({op}): {msg}")]
    Exec {
        node: String,
        op: String,
        msg: String,
    },
    /// Anything else the user asked for that cannot be done, with the reason.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// The same error with a path under `tmp` (a temporary file or staging
    /// dir) named by where it was going, `out`: users know the output they
    /// typed, not lcc's temporary names.
    pub fn naming_output(self, tmp: &std::path::Path, out: &std::path::Path) -> Self {
        let rename = |p: PathBuf| match p.strip_prefix(tmp) {
            Ok(rest) if rest.as_os_str().is_empty() => out.to_path_buf(),
            Ok(rest) => out.join(rest),
            Err(_) => p,
        };
        match self {
            Error::Io { path, err } => Error::Io {
                path: rename(path),
                err,
            },
            Error::Format { path, msg } => Error::Format {
                path: rename(path),
                msg,
            },
            other => other,
        }
    }

    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    pub fn exec(node: impl Into<String>, op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Exec {
            node: node.into(),
            op: op.into(),
            msg: msg.into(),
        }
    }
}
