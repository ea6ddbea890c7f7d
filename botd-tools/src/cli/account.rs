//! Who may reach this identity: `botd ticket create`, `botd policy` and `botd contacts`.

use std::time::Duration;

use botd_protocol::proto::Accept;
use clap::{Subcommand, ValueEnum};
use serde_json::json;

use super::error::CliError;
use super::keys::parse_pubkey;
use super::output::time;
use super::session::connect;
use super::Context;

#[derive(Subcommand, Debug)]
pub enum TicketAction {
    Create {
        /// Lifetime, e.g. 1h, 7d
        #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum ContactsAction {
    Add { pubkey: String },
    Remove { pubkey: String },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PolicyArg {
    Open,
    ContactsOnly,
}

/// `botd ticket create`: a ticket others can use for first contact.
pub async fn ticket(ctx: &Context, action: TicketAction) -> Result<(), CliError> {
    let TicketAction::Create { ttl, uses } = action;
    let ttl_s = u32::try_from(ttl.as_secs().max(1)).map_err(|_| CliError::TtlTooLong)?;
    let s = connect(ctx, &ctx.relay).await?;
    let ticket = s
        .client
        .create_ticket(ttl_s, uses)
        .await
        .map_err(CliError::request("ticket"))?;
    if !ctx.out.json {
        eprintln!(
            "ticket for {} on relay {}: {} use(s), expires {}",
            hex::encode(&ticket.identity),
            hex::encode(&ticket.relay_pubkey),
            ticket.uses,
            time(ticket.expires_at_ms)
        );
    }
    ctx.out.emit(
        hex::encode(&ticket.token),
        json!({
            "token": hex::encode(&ticket.token),
            "identity": hex::encode(&ticket.identity),
            "relay_pubkey": hex::encode(&ticket.relay_pubkey),
            "uses": ticket.uses,
            "expires_at": time(ticket.expires_at_ms),
            "expires_at_ms": ticket.expires_at_ms,
        }),
    );
    Ok(())
}

/// `botd policy open|contacts-only`.
pub async fn policy(ctx: &Context, accept: PolicyArg) -> Result<(), CliError> {
    let s = connect(ctx, &ctx.relay).await?;
    let accept = match accept {
        PolicyArg::Open => Accept::Open,
        PolicyArg::ContactsOnly => Accept::ContactsOnly,
    };
    s.client
        .set_policy(accept)
        .await
        .map_err(CliError::request("policy"))?;
    ctx.out.emit(
        format!("policy set to {}", accept.as_str_name()),
        json!({ "policy": accept.as_str_name() }),
    );
    Ok(())
}

/// `botd contacts add|remove PUBKEY`.
pub async fn contacts(ctx: &Context, action: ContactsAction) -> Result<(), CliError> {
    let (verb, contact) = match &action {
        ContactsAction::Add { pubkey } => ("added", parse_pubkey(pubkey)?),
        ContactsAction::Remove { pubkey } => ("removed", parse_pubkey(pubkey)?),
    };
    let s = connect(ctx, &ctx.relay).await?;
    match action {
        ContactsAction::Add { .. } => s
            .client
            .add_contact(&contact)
            .await
            .map_err(CliError::request("add contact"))?,
        ContactsAction::Remove { .. } => s
            .client
            .remove_contact(&contact)
            .await
            .map_err(CliError::request("remove contact"))?,
    }
    let contact = contact.to_hex();
    ctx.out
        .emit(format!("{verb} {contact}"), json!({ verb: contact }));
    Ok(())
}
