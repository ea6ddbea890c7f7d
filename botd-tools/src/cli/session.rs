//! The session with a relay that the client commands share: the relay's address and key from
//! the command line, connecting and authenticating, and `botd ping`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use botd_client::{Client, ClientOptions};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::DEFAULT_PORT;
use serde_json::json;

use super::error::CliError;
use super::output::time;
use super::{keys, Context};

/// An authenticated session with the relay, and the identity it was opened as.
pub struct Session {
    pub client: Client,
    pub identity: Arc<KeyPair>,
    pub key_path: PathBuf,
}

/// The relay's key, from `--server-key` or `BOTD_SERVER_KEY`.
pub fn relay_key(server_key: Option<&str>) -> Result<PublicKeyBytes, CliError> {
    let server_key = server_key.ok_or(CliError::MissingServerKey)?;
    PublicKeyBytes::from_hex(server_key).map_err(CliError::BadServerKey)
}

/// `HOST[:PORT]` with the default port added when none is given. A host that is neither a name
/// nor an IP address is a usage error, found before any lookup.
fn with_port(addr: &str) -> Result<String, CliError> {
    let (host, with_port) = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (host, addr.to_owned()),
        _ => (addr, format!("{addr}:{DEFAULT_PORT}")),
    };
    let valid = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => ip.parse::<Ipv6Addr>().is_ok(),
        None => {
            host.parse::<IpAddr>().is_ok()
                || (!host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        }
    };
    if valid {
        Ok(with_port)
    } else {
        Err(CliError::BadAddress(addr.to_owned()))
    }
}

/// The first socket address of `HOST[:PORT]`.
pub async fn resolve(addr: &str) -> Result<SocketAddr, CliError> {
    let mut addrs = tokio::net::lookup_host(with_port(addr)?)
        .await
        .map_err(|source| CliError::Resolve {
            addr: addr.to_owned(),
            source,
        })?;
    addrs
        .next()
        .ok_or_else(|| CliError::NoAddress(addr.to_owned()))
}

/// Connects to the relay at `relay` and authenticates with the identity key file.
pub async fn connect(ctx: &Context, relay: &str) -> Result<Session, CliError> {
    let relay_key = relay_key(ctx.server_key.as_deref())?;
    let identity = Arc::new(keys::load_key(&ctx.key_path)?);
    let socket = resolve(relay).await?;
    let client = Client::connect(
        socket,
        identity.clone(),
        relay_key,
        ClientOptions::default(),
    )
    .await
    .map_err(|source| CliError::Connect { socket, source })?;
    Ok(Session {
        client,
        identity,
        key_path: ctx.key_path.clone(),
    })
}

/// `botd ping`: the relay's `Welcome` and one ping round trip.
pub async fn ping(ctx: &Context, addr: Option<String>) -> Result<(), CliError> {
    let relay_addr = addr.unwrap_or_else(|| ctx.relay.clone());
    let s = connect(ctx, &relay_addr).await?;
    let welcome = s.client.welcome().clone();
    let rtt = s.client.ping().await.map_err(CliError::request("ping"))?;
    let rtt_ms = rtt.as_secs_f64() * 1000.0;
    ctx.out.emit(
        format!(
            "connected to {relay_addr} ({} {}), relay key {}, relay time {}\npong in {rtt_ms:.3} ms",
            welcome.protocol,
            welcome.server_version,
            s.client.relay_key(),
            time(welcome.server_time_ms),
        ),
        json!({
            "relay": relay_addr,
            "protocol": welcome.protocol,
            "server_version": welcome.server_version,
            "relay_key": s.client.relay_key().to_hex(),
            "server_time": time(welcome.server_time_ms),
            "server_time_ms": welcome.server_time_ms,
            "max_frame_len": welcome.max_frame_len,
            "max_payload_len": welcome.max_payload_len,
            "rtt_ms": rtt_ms,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_default_port() {
        let port = DEFAULT_PORT;
        assert_eq!(
            with_port("relay.example").unwrap(),
            format!("relay.example:{port}")
        );
        assert_eq!(with_port("127.0.0.1:1").unwrap(), "127.0.0.1:1");
        assert_eq!(with_port("[::1]").unwrap(), format!("[::1]:{port}"));
        assert_eq!(with_port("[::1]:7").unwrap(), "[::1]:7");
    }

    #[test]
    fn malformed_addresses_are_usage_errors() {
        for addr in [
            "",
            ":9945",
            "foo bar",
            "host:abc",
            "1.2.3.4:99999",
            "[nope]:1",
        ] {
            let err = with_port(addr).unwrap_err();
            assert!(matches!(err, CliError::BadAddress(_)), "{addr:?}: {err}");
        }
    }
}
