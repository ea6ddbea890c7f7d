//! One module per request kind, in the manner of mini-redis's `cmd/`: each implements
//! [`Request`] for its protobuf message, checking it in the spec's order and starting its work
//! on the store. The requests are listed once, in [`requests!`]; their kind (the metrics label),
//! whether they are barriers, and the dispatch all come from that list.

mod ack_messages;
mod add_contact;
mod create_ticket;
mod fetch_pre_keys;
mod get_message;
mod get_pre_key_count;
mod register;
mod remove_contact;
mod send;
mod set_policy;
mod subscribe;
mod unregister;
mod upload_pre_keys;

use std::future::Future;

use botd_protocol::proto::{self, Body, Frame};
use futures_util::FutureExt as _;

use super::limits::Limit;
use super::{Relay, RelayError, RelaySession};
use crate::app::{Answer, Outgoing};
use crate::store::{Identity, Store};

/// What a request's handling returns: an answer (possibly pending), or an error found before
/// the store was asked.
pub(super) type Reply = Result<Answer, RelayError>;

/// A request the relay serves.
pub(super) trait Request: Sized {
    /// Its label in `botd_requests_total{kind}`.
    const NAME: &'static str;
    /// Its handling pushes frames that must follow its answer (a subscription's first
    /// deliveries): the connection hands it over only once every earlier answer has gone out.
    const BARRIER: bool = false;

    /// Checks the request and starts it; what waits for the store is in the answer.
    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply;
}

/// What a request is executed with: the relay, the session it came from and its frame id.
pub(super) struct Ctx<'a, S: Store> {
    pub relay: &'a Relay<S>,
    pub session: &'a mut RelaySession,
    pub id: u64,
    kind: RequestKind,
}

impl<S: Store> Ctx<'_, S> {
    /// The identity the session authenticated: the sender of every request.
    pub fn me(&self) -> Identity {
        self.session.identity
    }

    /// Takes a token of `limit` for this session (per identity and per address).
    pub fn limit(&self, limit: Limit) -> Result<(), RelayError> {
        self.relay.limits.take(
            limit,
            &self.session.identity,
            &self.session.address,
            self.session.now,
        )
    }

    /// The answer carrying `body`, once `future` resolves to it; counted by kind and outcome.
    /// The future is wrapped, not awaited in an `async` block: a block that awaits a future it
    /// captured holds it twice (as the captured value and as the awaited one), and nested
    /// blocks double at every level, so the boxed answer of a `Send` was 6 KiB moved around
    /// per request; a `map` holds it once.
    pub fn reply(
        self,
        future: impl Future<Output = Result<Body, RelayError>> + Send + 'static,
    ) -> Reply {
        let id = self.id;
        self.reply_with(
            future.map(move |body| body.map(|body| Outgoing::Frame(Frame::new(id, body)))),
        )
    }

    /// As [`Ctx::reply`] for an answer that is not a plain frame (a stored message).
    pub fn reply_with(
        self,
        future: impl Future<Output = Result<Outgoing, RelayError>> + Send + 'static,
    ) -> Reply {
        let (metrics, kind, id) = (self.relay.metrics.clone(), self.kind, self.id);
        Ok(Answer::pending(future.map(move |answer| match answer {
            Ok(answer) => {
                metrics.request(kind, None);
                answer
            }
            Err(err) => {
                metrics.refused(kind, &err);
                Outgoing::Frame(err.to_frame(id))
            }
        })))
    }
}

/// Lists the requests once: `Variant => module`, where `Body::Variant(proto::Variant)` is the
/// request and `module` implements [`Request`] for it.
macro_rules! requests {
    ($($variant:ident => $module:ident),* $(,)?) => {
        /// The kinds of request, for per-kind metrics.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(super) enum RequestKind {
            $($variant),*
        }

        impl RequestKind {
            /// How many kinds there are.
            pub const COUNT: usize = [$(RequestKind::$variant),*].len();

            /// The kind of a body the relay serves as a request.
            pub fn of(body: &Body) -> Option<Self> {
                match body {
                    $(Body::$variant(_) => Some(Self::$variant),)*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => <proto::$variant as Request>::NAME,)*
                }
            }

            pub fn is_barrier(self) -> bool {
                match self {
                    $(Self::$variant => <proto::$variant as Request>::BARRIER,)*
                }
            }
        }

        /// Executes a request of kind `kind` (which `body` is).
        pub(super) fn execute<S: Store>(
            relay: &Relay<S>,
            session: &mut RelaySession,
            kind: RequestKind,
            id: u64,
            body: Body,
        ) -> Reply {
            let ctx = Ctx { relay, session, id, kind };
            match body {
                $(Body::$variant(request) => request.execute(ctx),)*
                other => Err(RelayError::bad_request(format!("{} is not a request", other.kind()))),
            }
        }
    };
}

requests! {
    Register => register,
    Unregister => unregister,
    UploadPreKeys => upload_pre_keys,
    GetPreKeyCount => get_pre_key_count,
    FetchPreKeys => fetch_pre_keys,
    Send => send,
    Subscribe => subscribe,
    GetMessage => get_message,
    AckMessages => ack_messages,
    SetPolicy => set_policy,
    AddContact => add_contact,
    RemoveContact => remove_contact,
    CreateTicket => create_ticket,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_has_its_own_name_and_only_subscribe_is_a_barrier() {
        let kinds = [
            RequestKind::Register,
            RequestKind::Unregister,
            RequestKind::UploadPreKeys,
            RequestKind::GetPreKeyCount,
            RequestKind::FetchPreKeys,
            RequestKind::Send,
            RequestKind::Subscribe,
            RequestKind::GetMessage,
            RequestKind::AckMessages,
            RequestKind::SetPolicy,
            RequestKind::AddContact,
            RequestKind::RemoveContact,
            RequestKind::CreateTicket,
        ];
        assert_eq!(kinds.len(), RequestKind::COUNT);
        let mut names: Vec<_> = kinds.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RequestKind::COUNT);
        let barriers: Vec<_> = kinds.iter().filter(|k| k.is_barrier()).collect();
        assert_eq!(barriers, [&RequestKind::Subscribe]);
        assert_eq!(RequestKind::of(&Body::Ping(proto::Ping::default())), None);
        assert_eq!(
            RequestKind::of(&Body::Send(proto::Send::default())),
            Some(RequestKind::Send)
        );
    }
}
