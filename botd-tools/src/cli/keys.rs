//! Identity keys: `botd keygen` and `botd id`, the key file the other commands load, and public
//! keys given on the command line.

use std::path::{Path, PathBuf};

use botd_protocol::keyfile;
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use serde_json::json;

use super::error::CliError;
use super::Context;

/// `<config dir>/botd/identity.key`, the key file when `--key` is not given.
pub fn default_key_path() -> PathBuf {
    dirs::config_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("botd")
        .join("identity.key")
}

/// The identity of a key file.
pub fn load_key(path: &Path) -> Result<KeyPair, CliError> {
    keyfile::load(path).map_err(CliError::LoadKey)
}

/// A public key argument (66 hex characters).
pub fn parse_pubkey(text: &str) -> Result<PublicKeyBytes, CliError> {
    PublicKeyBytes::from_hex(text).map_err(|source| CliError::BadPublicKey {
        text: text.to_owned(),
        source,
    })
}

/// `botd keygen`: a new identity key file.
pub fn keygen(ctx: &Context) -> Result<(), CliError> {
    let pair = KeyPair::generate();
    keyfile::create(&ctx.key_path, &pair)?;
    eprintln!("wrote {}", ctx.key_path.display());
    ctx.out.emit(
        pair.public(),
        json!({ "identity": pair.public().to_hex(), "key_file": ctx.key_path }),
    );
    Ok(())
}

/// `botd id`: the public key of the key file.
pub fn id(ctx: &Context) -> Result<(), CliError> {
    let public = *load_key(&ctx.key_path)?.public();
    ctx.out.emit(public, json!({ "identity": public.to_hex() }));
    Ok(())
}
