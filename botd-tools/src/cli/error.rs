//! Why a `botd` command failed, and the exit code each failure gives: the codes scripts rely on,
//! defined once here and listed by `botd --help` and the READMEs.

use std::net::SocketAddr;
use std::path::PathBuf;

use botd_client::ClientError;
use botd_protocol::keyfile::KeyFileError;
use botd_protocol::keys::KeyError;
use botd_tools::conformance::{self, AssumeError};

/// The command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Any other failure: a local file (key file, payload, report) could not be read or written, a
/// conformance run found a failing case, the load generator failed.
pub const EXIT_FAILURE: u8 = 1;
/// The command line is wrong; clap exits with the same code for the arguments it rejects.
pub const EXIT_USAGE: u8 = 2;
/// No session with the relay: it cannot be resolved or reached, the handshake failed, or the
/// relay closed the session or broke the protocol.
pub const EXIT_CONNECTION: u8 = 3;
/// The relay answered a request with an `Error` frame.
pub const EXIT_REFUSED: u8 = 4;

/// The exit codes with their meaning, as `botd --help` lists them.
const EXIT_CODES: [(u8, &str); 5] = [
    (EXIT_OK, "success"),
    (
        EXIT_FAILURE,
        "other failure: a local file (key, payload, report) could not be read or written, \
         a conformance case failed, the load generator failed",
    ),
    (
        EXIT_USAGE,
        "usage: a bad or missing argument, e.g. a public key, an address, --server-key",
    ),
    (
        EXIT_CONNECTION,
        "connection: the relay cannot be resolved or reached, the handshake failed, or the \
         session ended (closed, no answer in time, a frame out of protocol)",
    ),
    (
        EXIT_REFUSED,
        "refused: the relay answered the request with an Error frame",
    ),
];

/// The `Exit codes:` section of `botd --help`.
pub fn exit_codes_help() -> String {
    let mut help = String::from("Exit codes:");
    for (code, meaning) in EXIT_CODES {
        help.push_str(&format!("\n  {code}  {meaning}"));
    }
    help
}

/// Everything that can make a `botd` command fail.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    // Usage.
    #[error("the relay's key is needed: --server-key HEX or BOTD_SERVER_KEY")]
    MissingServerKey,
    #[error("--server-key: {0}")]
    BadServerKey(#[source] KeyError),
    #[error("{text:?} is not a public key: {source}")]
    BadPublicKey { text: String, source: KeyError },
    #[error("{0:?} is not an address: expected HOST[:PORT]")]
    BadAddress(String),
    #[error("bad device in {0:?}")]
    BadDevice(String),
    #[error("give --text or --file")]
    NoPayload,
    #[error("--ticket must be hex")]
    BadTicket(#[source] hex::FromHexError),
    #[error("--ttl is too long")]
    TtlTooLong,
    #[error(transparent)]
    Assume(#[from] AssumeError),

    // Connection.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("connect to {socket}: {source}")]
    Connect {
        socket: SocketAddr,
        source: ClientError,
    },
    #[error("connection closed")]
    ConnectionClosed,
    /// An `Error` push (id 0: `SHUTTING_DOWN`, `REPLACED`, `SLOW_CONSUMER`, …) ends the session.
    #[error("relay: {}: {message}", conformance::probe::code_name(*code))]
    SessionEnded { code: i32, message: String },

    /// A request failed: refused by the relay, or the session broke.
    #[error("{step}: {source}")]
    Request {
        step: &'static str,
        source: ClientError,
    },

    // Other failures.
    #[error("{0} (create one with `botd keygen`)")]
    LoadKey(#[source] KeyFileError),
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("{}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {socket}: {source}")]
    Listen {
        socket: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Report(#[from] conformance::cli::WriteError),
    #[error("{0} case(s) failed")]
    ConformanceFailed(usize),
    /// The load generator reports its failures as text.
    #[error("{0}")]
    Bench(String),
}

impl CliError {
    /// The exit code of `botd` when a command fails with this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::MissingServerKey
            | CliError::BadServerKey(_)
            | CliError::BadPublicKey { .. }
            | CliError::BadAddress(_)
            | CliError::BadDevice(_)
            | CliError::NoPayload
            | CliError::BadTicket(_)
            | CliError::TtlTooLong
            | CliError::Assume(_) => EXIT_USAGE,
            CliError::Resolve { .. }
            | CliError::NoAddress(_)
            | CliError::Connect { .. }
            | CliError::ConnectionClosed
            | CliError::SessionEnded { .. } => EXIT_CONNECTION,
            CliError::Request { source, .. } => request_exit_code(source),
            CliError::LoadKey(_)
            | CliError::KeyFile(_)
            | CliError::ReadFile { .. }
            | CliError::WriteFile { .. }
            | CliError::Listen { .. }
            | CliError::Report(_)
            | CliError::ConformanceFailed(_)
            | CliError::Bench(_) => EXIT_FAILURE,
        }
    }

    /// Names the request that failed.
    pub fn request(step: &'static str) -> impl Fn(ClientError) -> CliError {
        move |source| CliError::Request { step, source }
    }
}

/// A request on an established session: refused when the relay answered it with an `Error`.
fn request_exit_code(err: &ClientError) -> u8 {
    match err {
        ClientError::Remote { .. } => EXIT_REFUSED,
        ClientError::Io(_)
        | ClientError::Codec(_)
        | ClientError::Handshake(_)
        | ClientError::Session(_)
        | ClientError::Timeout(_)
        | ClientError::Closed
        | ClientError::HandshakeRefused
        | ClientError::UnexpectedResponse(_) => EXIT_CONNECTION,
        ClientError::PingTooSoon => EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use botd_protocol::proto::ErrorCode;

    use super::*;

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    fn remote() -> ClientError {
        ClientError::Remote {
            code: ErrorCode::NotFound,
            message: "no such message".into(),
            retry_after_ms: 0,
        }
    }

    #[test]
    fn usage_errors_exit_2() {
        for err in [
            CliError::MissingServerKey,
            CliError::BadServerKey(KeyError::InvalidPublicKey),
            CliError::BadPublicKey {
                text: "zz".into(),
                source: KeyError::InvalidPublicKey,
            },
            CliError::BadAddress("a b".into()),
            CliError::BadDevice("02ab:x".into()),
            CliError::NoPayload,
            CliError::BadTicket(hex::FromHexError::OddLength),
            CliError::TtlTooLong,
            CliError::Assume(AssumeError::UnknownKey("nope".into())),
        ] {
            assert_eq!(err.exit_code(), EXIT_USAGE, "{err}");
        }
    }

    #[test]
    fn connection_errors_exit_3() {
        let socket: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut errors = vec![
            CliError::Resolve {
                addr: "relay.invalid".into(),
                source: io(),
            },
            CliError::NoAddress("relay.invalid".into()),
            CliError::ConnectionClosed,
            CliError::SessionEnded {
                code: ErrorCode::ShuttingDown as i32,
                message: "bye".into(),
            },
        ];
        // Every way of failing to connect, the relay's refusal during the handshake included.
        for source in [
            ClientError::Io(io()),
            ClientError::HandshakeRefused,
            ClientError::Closed,
            ClientError::Timeout(Duration::from_secs(1)),
            remote(),
        ] {
            errors.push(CliError::Connect { socket, source });
        }
        // A session that broke under a request.
        for source in [
            ClientError::Io(io()),
            ClientError::Closed,
            ClientError::Timeout(Duration::from_secs(1)),
            ClientError::UnexpectedResponse("expected Sent"),
        ] {
            errors.push(CliError::Request {
                step: "send",
                source,
            });
        }
        for err in errors {
            assert_eq!(err.exit_code(), EXIT_CONNECTION, "{err}");
        }
    }

    #[test]
    fn an_error_answer_exits_4() {
        let err = CliError::request("get")(remote());
        assert_eq!(err.exit_code(), EXIT_REFUSED);
        assert_eq!(
            err.to_string(),
            "get: relay answered NOT_FOUND: no such message"
        );
    }

    #[test]
    fn other_failures_exit_1() {
        let path = PathBuf::from("/nowhere/k");
        for err in [
            CliError::LoadKey(KeyFileError::Format { path: path.clone() }),
            CliError::KeyFile(KeyFileError::Exists { path: path.clone() }),
            CliError::ReadFile {
                path: path.clone(),
                source: io(),
            },
            CliError::WriteFile {
                path: path.clone(),
                source: io(),
            },
            CliError::Listen {
                socket: "127.0.0.1:9".parse().unwrap(),
                source: io(),
            },
            CliError::Report(conformance::cli::WriteError { path, source: io() }),
            CliError::ConformanceFailed(2),
            CliError::Bench("target unreachable".into()),
            CliError::request("ping")(ClientError::PingTooSoon),
        ] {
            assert_eq!(err.exit_code(), EXIT_FAILURE, "{err}");
        }
    }

    #[test]
    fn help_lists_every_code() {
        let help = exit_codes_help();
        for code in [
            EXIT_OK,
            EXIT_FAILURE,
            EXIT_USAGE,
            EXIT_CONNECTION,
            EXIT_REFUSED,
        ] {
            assert!(help.contains(&format!("\n  {code}  ")), "{help}");
        }
    }
}
