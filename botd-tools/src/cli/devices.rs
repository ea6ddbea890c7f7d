//! A device's place on the relay: `botd register`, `botd unregister` and `botd prekeys`
//! (upload, fetch, count), and the prekey material they publish.

use std::path::Path;

use botd_protocol::keyfile;
use botd_protocol::keys::{sha256, KeyPair};
use botd_protocol::proto::{self, PreKey, SignedPreKey};
use bytes::Bytes;
use clap::Subcommand;
use serde_json::{json, Value};

use super::error::CliError;
use super::keys::parse_pubkey;
use super::session::connect;
use super::Context;

#[derive(Subcommand, Debug)]
pub enum PrekeysAction {
    /// Upload fresh one-time prekeys (and optionally a new signed prekey)
    Upload {
        #[arg(long, default_value_t = 1)]
        device: u32,
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// Also replace the signed prekey
        #[arg(long)]
        signed: bool,
    },
    /// Fetch prekey bundles of an identity (pops one one-time prekey per device)
    Fetch {
        pubkey: String,
        /// Devices to fetch (all when omitted)
        #[arg(long = "device")]
        devices: Vec<u32>,
    },
    /// How many one-time prekeys a device has left
    Count {
        #[arg(long, default_value_t = 1)]
        device: u32,
    },
}

/// Fresh prekey material: the relay stores it opaquely; private halves go next to the key file.
fn fresh_prekeys(
    identity: &KeyPair,
    key_path: &Path,
    first_id: u32,
    count: u32,
    signed: bool,
) -> Result<(Option<SignedPreKey>, Vec<PreKey>), CliError> {
    let mut secrets = String::new();
    let signed = signed.then(|| {
        let pair = KeyPair::generate();
        secrets.push_str(&format!(
            "signed {first_id} {}\n",
            hex::encode(*pair.secret_bytes())
        ));
        let public = Bytes::copy_from_slice(pair.public().as_bytes());
        let signature = identity.sign(&sha256(&[&public]));
        SignedPreKey {
            id: first_id,
            public_key: public,
            signature: Bytes::copy_from_slice(&signature),
        }
    });
    let one_time = (0..count)
        .map(|i| {
            let pair = KeyPair::generate();
            let id = first_id.wrapping_add(i);
            secrets.push_str(&format!(
                "one-time {id} {}\n",
                hex::encode(*pair.secret_bytes())
            ));
            PreKey {
                id,
                public_key: Bytes::copy_from_slice(pair.public().as_bytes()),
            }
        })
        .collect();
    let path = key_path.with_extension("prekeys");
    keyfile::append_secret(&path, &secrets)
        .map_err(|source| CliError::WriteFile { path, source })?;
    Ok((signed, one_time))
}

/// `botd register`: this identity's device with a signed prekey and one-time prekeys.
pub async fn register(
    ctx: &Context,
    device: u32,
    prekeys: u32,
    registration_id: Option<u32>,
) -> Result<(), CliError> {
    let s = connect(ctx, &ctx.relay).await?;
    let (signed, one_time) = fresh_prekeys(&s.identity, &s.key_path, 1, prekeys, true)?;
    let registered = s
        .client
        .register(proto::Register {
            device_id: device,
            registration_id: registration_id.unwrap_or_else(|| rand::random::<u32>() & 0x3fff),
            identity_key: Bytes::copy_from_slice(s.identity.public().as_bytes()),
            signed_prekey: signed,
            one_time_prekeys: one_time,
        })
        .await
        .map_err(CliError::request("register"))?;
    ctx.out.emit(
        format!(
            "registered {}:{} with {} one-time prekeys",
            s.identity.public(),
            registered.device_id,
            registered.one_time_prekeys
        ),
        json!({
            "identity": s.identity.public().to_hex(),
            "device_id": registered.device_id,
            "one_time_prekeys": registered.one_time_prekeys,
        }),
    );
    Ok(())
}

/// `botd unregister`: the device and its stored messages go.
pub async fn unregister(ctx: &Context, device: u32) -> Result<(), CliError> {
    let s = connect(ctx, &ctx.relay).await?;
    let done = s
        .client
        .unregister(device)
        .await
        .map_err(CliError::request("unregister"))?;
    ctx.out.emit(
        format!("unregistered device {}", done.device_id),
        json!({ "identity": s.identity.public().to_hex(), "device_id": done.device_id }),
    );
    Ok(())
}

/// `botd prekeys upload|fetch|count`.
pub async fn prekeys(ctx: &Context, action: PrekeysAction) -> Result<(), CliError> {
    match action {
        PrekeysAction::Upload {
            device,
            count,
            signed,
        } => upload(ctx, device, count, signed).await,
        PrekeysAction::Fetch { pubkey, devices } => fetch(ctx, &pubkey, devices).await,
        PrekeysAction::Count { device } => count(ctx, device).await,
    }
}

/// `botd prekeys upload`: fresh one-time prekeys, and a signed prekey when `signed`.
async fn upload(ctx: &Context, device: u32, count: u32, signed: bool) -> Result<(), CliError> {
    let s = connect(ctx, &ctx.relay).await?;
    let first_id = rand::random::<u32>() & 0x00ff_ffff;
    let (signed_prekey, one_time_prekeys) =
        fresh_prekeys(&s.identity, &s.key_path, first_id, count, signed)?;
    let stored = s
        .client
        .upload_prekeys(proto::UploadPreKeys {
            device_id: device,
            signed_prekey,
            one_time_prekeys,
        })
        .await
        .map_err(CliError::request("upload"))?;
    ctx.out.emit(
        format!(
            "device {} now has {} one-time prekeys",
            stored.device_id, stored.count
        ),
        json!({ "device_id": stored.device_id, "count": stored.count }),
    );
    Ok(())
}

/// `botd prekeys fetch`: the bundles of an identity's devices.
async fn fetch(ctx: &Context, pubkey: &str, devices: Vec<u32>) -> Result<(), CliError> {
    let identity = parse_pubkey(pubkey)?;
    let s = connect(ctx, &ctx.relay).await?;
    let bundles = s
        .client
        .fetch_prekeys(&identity, devices)
        .await
        .map_err(CliError::request("fetch"))?;
    let text = bundles
        .iter()
        .map(bundle_text)
        .collect::<Vec<_>>()
        .join("\n");
    ctx.out.emit(
        text,
        json!({
            "identity": identity.to_hex(),
            "bundles": bundles.iter().map(bundle_json).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

/// `botd prekeys count`: the one-time prekeys a device has left.
async fn count(ctx: &Context, device: u32) -> Result<(), CliError> {
    let s = connect(ctx, &ctx.relay).await?;
    let count = s
        .client
        .prekey_count(device)
        .await
        .map_err(CliError::request("count"))?;
    ctx.out.emit(
        format!(
            "device {} has {} one-time prekeys",
            count.device_id, count.count
        ),
        json!({ "device_id": count.device_id, "count": count.count }),
    );
    Ok(())
}

/// A fetched prekey bundle as the terminal shows it.
fn bundle_text(b: &proto::PreKeyBundle) -> String {
    let one_time = b.one_time_prekey.as_ref().map_or("none".to_owned(), |k| {
        format!("#{} {}", k.id, hex::encode(&k.public_key))
    });
    let signed = b.signed_prekey.clone().unwrap_or_default();
    format!(
        "device {} registration {} identity_key {} signed_prekey #{} {} one_time {}",
        b.device_id,
        b.registration_id,
        hex::encode(&b.identity_key),
        signed.id,
        hex::encode(&signed.public_key),
        one_time
    )
}

/// A fetched prekey bundle as JSON, with the fields the terminal shows.
fn bundle_json(b: &proto::PreKeyBundle) -> Value {
    let signed = b.signed_prekey.clone().unwrap_or_default();
    json!({
        "device_id": b.device_id,
        "registration_id": b.registration_id,
        "identity_key": hex::encode(&b.identity_key),
        "signed_prekey": {
            "id": signed.id,
            "public_key": hex::encode(&signed.public_key),
            "signature": hex::encode(&signed.signature),
        },
        "one_time_prekey": b.one_time_prekey.as_ref().map(|k| json!({
            "id": k.id,
            "public_key": hex::encode(&k.public_key),
        })),
    })
}
