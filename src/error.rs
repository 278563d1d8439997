//! The library's error type. Every variant says what was being read or done.

use std::path::PathBuf;

/// Errors from every part of lcc. User input never panics; it ends up here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
            source,
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
