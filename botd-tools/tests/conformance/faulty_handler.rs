//! Our relay application behind a handler that breaks one rule of PROTOCOL.md in how it reads
//! requests or writes answers (the session layer and the store stay correct).

use std::sync::Arc;

use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::message::DeliverFrame;
use botd_protocol::proto::{self, Body, ErrorCode, Frame};
use botd_relay::app::{Answer, Handler, Outgoing, PushHandle};
use botd_relay::relay::RelaySession;
use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;

use super::faulty_store::FaultyStore;

pub type App = botd_relay::relay::Relay<FaultyStore>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerFault {
    None,
    /// Hands out the same one-time prekey again for a repeated fetch.
    PrekeyTwice,
    /// Serves GetMessage from other identities' mailboxes.
    CrossMailbox,
    /// Executes requests sent with frame id 0.
    ExecutesIdZero,
    /// Replaces a wrong payload_hash by the right one.
    IgnoresHash,
    /// Stores every resend as a new message.
    NoDeduplication,
    /// Answers `Sent { duplicate: false }` to resends.
    DuplicateFlagLost,
    /// Answers the node's Error frames.
    AnswersErrors,
    /// Cuts AckMessages lists to 4096 ids instead of refusing them.
    TruncatesAcks,
    /// Refuses an AckMessages of 4096 ids.
    RefusesAck4096,
    /// `Acked.deleted` counts the ids listed, not the messages deleted.
    AckCountsListed,
    /// Refuses a Register of device 0 before its rate limit is checked.
    ValidatesBeforeLimiting,
    /// `Registered.one_time_prekeys` is 0.
    RegisteredCountZero,
    /// `Unregistered.device_id` is 1.
    UnregisteredDeviceOne,
    /// `PreKeyCount.device_id` is 1.
    PreKeyCountDeviceOne,
    /// `PreKeyCount` after an upload is the count before it.
    UploadCountBefore,
    /// `Subscribed.device_id` is 1.
    SubscribedDeviceOne,
    /// Bundles come in decreasing device order.
    BundlesReversed,
    /// FetchPreKeys is capped at 16 entries whatever `max_devices_per_identity`.
    FetchCapSixteen,
    /// FetchPreKeys lists beyond `max_devices_per_identity` are cut instead of refused.
    FetchNoCap,
    /// FetchPreKeys of the session's own identity is refused.
    FetchOwnRefused,
    /// `Ticket.uses` is 1.
    TicketUsesOne,
    /// `Ticket.expires_at_ms` is an hour late.
    TicketExpiryLate,
    /// Every `Ticket.token` is the first one handed out.
    TicketTokenRepeats,
    /// Errors other than RATE_LIMITED carry `retry_after_ms` 1.
    RetryAfterOnErrors,
    /// RATE_LIMITED carries `retry_after_ms` 0.
    RateLimitedRetryAfterZero,
    /// A Send from device 0 gets BAD_REQUEST.
    SenderDeviceZeroBadRequest,
    /// A Send from an unregistered device gets UNKNOWN_RECIPIENT.
    NotRegisteredAsUnknownRecipient,
    /// A Send's recipient length is checked before its payload length.
    RecipientBeforePayloadLength,
    /// A ticket of the wrong length is dropped instead of refused.
    TicketLengthIgnored,
    /// SetPolicy is answered but the policy stays open.
    PolicyIgnored,
    /// SetPolicy of an unknown value sets ACCEPT_OPEN.
    UnknownPolicyAccepted,
    /// AddContact is answered but adds nothing.
    AddContactNoop,
    /// RemoveContact is answered but removes nothing.
    RemoveContactNoop,
    /// Send.ticket is dropped before the store sees it.
    TicketDropped,
    /// A payload of exactly `max_payload_len` gets PAYLOAD_TOO_LARGE.
    PayloadLimitOffByOne,
    /// An empty payload gets BAD_REQUEST.
    EmptyPayloadRefused,
    /// A 34-byte recipient is cut to 33 bytes.
    RecipientCut,
    /// A 9-byte nonce is cut to 8 bytes.
    NonceCut,
    /// Register of device 0 registers device 1.
    DeviceZeroRegistered,
    /// An identity_key longer than `max_key_len` is cut.
    IdentityKeyCut,
    /// A Register without signed prekey gets one made up.
    SignedPrekeyMadeUp,
    /// More than `max_prekeys_per_upload` one-time prekeys are cut.
    PrekeysCut,
    /// One-time prekeys with the same id are merged.
    PrekeyIdsMerged,
    /// Uploaded prekey ids are moved clear of the stored ones.
    UploadIdsMoved,
    /// A `Sent` from the node is answered `Done`.
    NonRequestServed,
    /// A contacts-only identity's message to itself gets FORBIDDEN.
    SelfSendForbidden,
    /// Subscribe to an unregistered device is answered `Subscribed`.
    SubscribeUnregistered,
    /// GetMessage of a message not stored gets NOT_REGISTERED.
    NotFoundAsNotRegistered,
    /// A ticket lifetime beyond the maximum is cut to it.
    TicketTtlCut,
    /// Ticket uses beyond the maximum are cut to it.
    TicketUsesCut,
    /// AddContact of a 32-byte identity is answered `Done`.
    ShortContactAccepted,
    /// SetPolicy, AddContact, RemoveContact and CreateTicket without a registered device
    /// are served.
    AccountWithoutDevice,
    /// Device 0 in a request is taken for device 1.
    DeviceZeroIsOne,
    /// AckMessages also acks the same ids in other identities' mailboxes.
    AcksOtherIdentities,
    /// A session acts only for the devices it registered itself.
    SessionBoundDevices,
    /// Empty key fields of a Register are filled in.
    FillsEmptyKeys,
    /// Key fields of exactly `max_key_len` bytes are refused.
    KeyLimitOffByOne,
    /// Exactly `max_prekeys_per_upload` one-time prekeys are refused.
    PrekeyLimitOffByOne,
    /// Unregister of a device that is not registered is answered `Unregistered`.
    UnregisterUnknownOk,
    /// Re-registering a device unregisters it first (its mailbox goes).
    ReregisterDropsMailbox,
    /// The signed prekey of an UploadPreKeys is dropped.
    IgnoresUploadedSignedPrekey,
    /// Bundles lose their registration id.
    BundleFieldLost,
    /// A device listed twice in FetchPreKeys gets two bundles.
    DuplicateBundles,
    /// FetchPreKeys merges duplicate ids before counting them.
    MergesBeforeCounting,
    /// FetchPreKeys of an identity that is not 33 bytes gets UNKNOWN_RECIPIENT.
    ShortIdentityUnknown,
    /// FetchPreKeys of an identity without devices gets no bundles.
    FetchUnknownIdentityEmpty,
    /// A Send to a recipient that is not 33 bytes gets UNKNOWN_RECIPIENT.
    ShortRecipientUnknown,
    /// A short nonce is padded to 8 bytes.
    PadsShortNonce,
    /// A short signature is padded to 64 bytes.
    PadsShortSignature,
    /// A payload above `max_payload_len` is cut to it.
    CutsLargePayloads,
    /// A Send to an unknown recipient or device is answered `Sent`.
    UnknownRecipientAccepted,
    /// A Send from a device that is not registered is answered `Sent`.
    SenderDeviceUnchecked,
    /// A Send to oneself gets FORBIDDEN.
    RefusesSelfSend,
    /// `Sent.message_id` is 0.
    MessageIdZero,
    /// A 16-byte ticket towards an open identity gets TICKET_INVALID.
    ChecksTicketWhenOpen,
    /// The idempotency key covers the payload too.
    NonceWithPayload,
    /// A ticket of the wrong length is refused before the other fields are checked.
    TicketFirst,
    /// A wrong payload hash is refused before the ticket's length is checked.
    HashBeforeTicket,
    /// The sender's, the acked or the uploaded device is checked before everything else.
    DeviceCheckedFirst,
    /// A contacts-only recipient refuses a stranger before its device is checked.
    PolicyFirst,
    /// A 16-byte ticket the recipient does not accept is taken anyway.
    TicketNotChecked,
    /// GetMessage on an unregistered device gets NOT_FOUND.
    NotRegisteredAsNotFound,
    /// AckMessages on an unregistered device is answered `Acked`.
    AckNotRegisteredOk,
    /// Unregistering a device resets the account's policy to ACCEPT_OPEN.
    UnregisterResetsPolicy,
    /// RATE_LIMITED is answered as BAD_REQUEST.
    RateLimitedAsBadRequest,
    /// After a refused Send, the next Sends of the identity are refused before their fields
    /// are checked.
    LimitsBeforeFields,
    /// Re-registering a device appends its one-time prekeys instead of replacing them.
    ReregisterAppends,
    /// UploadPreKeys for an unregistered device is answered `PreKeyCount`.
    UploadUnregisteredOk,
    /// A payload hash of the wrong length is replaced by the right hash.
    FixesShortHash,
    /// GetMessage is answered in a frame with id 0.
    GetAnsweredAsPush,
    /// `Subscribed.last_id` is one too high.
    LastIdAhead,
    /// `Sent.message_id` is one too low (the first id is 0).
    IdsStartAtZero,
    /// AddContact and CreateTicket check the registration before their fields.
    RegistrationCheckedFirst,
    /// AddContact of a contact already present gets BAD_REQUEST.
    DuplicateContactRefused,
    /// A ticket lifetime of exactly `max_ticket_ttl` gets BAD_REQUEST.
    TicketTtlOffByOne,
    /// SetPolicy is not served (UNSUPPORTED).
    NoSetPolicy,
    /// Subscribe pushes everything stored, whatever `after_id`.
    IgnoresAfterId,
}

/// Fetch requests (encoded) and the answers first given to them.
type Fetches = Arc<Mutex<Vec<(Vec<u8>, Frame)>>>;

pub struct Faulty {
    pub app: Arc<App>,
    pub fault: HandlerFault,
    fetches: Fetches,
    identities: Arc<Mutex<Vec<PublicKeyBytes>>>,
    /// Identities that asked for ACCEPT_CONTACTS_ONLY, and the first ticket token.
    contacts_only: Arc<Mutex<Vec<PublicKeyBytes>>>,
    first_token: Arc<Mutex<Option<Bytes>>>,
    /// Devices registered, and contacts added, as the answers told.
    registered: Arc<Mutex<std::collections::HashSet<(PublicKeyBytes, u32)>>>,
    contacts: Arc<Mutex<std::collections::HashSet<(PublicKeyBytes, Bytes)>>>,
    /// When each identity's last Send was refused with RATE_LIMITED.
    limited: Arc<Mutex<std::collections::HashMap<PublicKeyBytes, std::time::Instant>>>,
    max_devices: usize,
    max_key_len: usize,
    max_prekeys: usize,
    max_ticket_ttl_s: u32,
    max_ticket_uses: u32,
    max_payload_len: usize,
}

impl Faulty {
    pub fn new(app: Arc<App>, fault: HandlerFault, config: &botd_relay::config::Config) -> Self {
        Self {
            app,
            fault,
            fetches: Arc::default(),
            identities: Arc::default(),
            contacts_only: Arc::default(),
            first_token: Arc::default(),
            registered: Arc::default(),
            contacts: Arc::default(),
            limited: Arc::default(),
            max_devices: config.max_devices_per_identity,
            max_key_len: config.max_key_len,
            max_prekeys: config.max_prekeys_per_upload,
            max_ticket_ttl_s: config.max_ticket_ttl.as_secs() as u32,
            max_ticket_uses: config.max_ticket_uses,
            max_payload_len: config.max_payload_len as usize,
        }
    }
}

/// What an answer resolves to.
async fn settle(answer: Answer) -> Option<Outgoing> {
    match answer {
        Answer::None => None,
        Answer::Ready(out) => Some(out),
        Answer::Pending(pending) => Some(pending.await),
    }
}

fn with_id(out: Outgoing, id: u64) -> Outgoing {
    match out {
        Outgoing::Frame(frame) => Outgoing::Frame(Frame { id, ..frame }),
        Outgoing::Deliver(deliver) => Outgoing::Deliver(DeliverFrame {
            frame_id: id,
            ..deliver
        }),
    }
}

/// The answer, with its frame changed by `f` once it is known.
fn rewrite(answer: Answer, f: impl FnOnce(Frame) -> Frame + Send + 'static) -> Answer {
    if matches!(answer, Answer::None) {
        return answer;
    }
    Answer::pending(async move {
        let out = settle(answer).await.expect("a request is answered");
        match out {
            Outgoing::Frame(frame) => Outgoing::Frame(f(frame)),
            other => other,
        }
    })
}

fn error(id: u64, code: ErrorCode) -> Answer {
    Answer::frame(Frame::error(id, code, "planted defect"))
}

fn is_error(frame: &Frame, code: ErrorCode) -> bool {
    matches!(&frame.body, Some(Body::Error(e)) if e.code == code as i32)
}

fn sent() -> Body {
    Body::Sent(proto::Sent {
        message_id: 1,
        duplicate: false,
    })
}

/// The body a fault answers instead of `out`, an error the relay rightly gave to `request`.
fn replacement(fault: HandlerFault, request: &Option<Body>, out: &Frame) -> Option<Body> {
    use HandlerFault as F;
    let not_registered = is_error(out, ErrorCode::NotRegistered);
    match (fault, request) {
        (
            F::AccountWithoutDevice,
            Some(Body::SetPolicy(_) | Body::AddContact(_) | Body::RemoveContact(_)),
        ) if not_registered => Some(Body::Done(proto::Done {})),
        (F::AccountWithoutDevice, Some(Body::CreateTicket(_))) if not_registered => {
            Some(Body::Ticket(proto::Ticket {
                token: Bytes::from(vec![7; 16]),
                uses: 1,
                ..Default::default()
            }))
        }
        (F::UnregisterUnknownOk, Some(Body::Unregister(u))) if not_registered => {
            Some(Body::Unregistered(proto::Unregistered {
                device_id: u.device_id,
            }))
        }
        (F::SenderDeviceUnchecked, Some(Body::Send(_))) if not_registered => Some(sent()),
        (F::UnknownRecipientAccepted, Some(Body::Send(_)))
            if is_error(out, ErrorCode::UnknownRecipient) =>
        {
            Some(sent())
        }
        (F::FetchUnknownIdentityEmpty, Some(Body::FetchPreKeys(f)))
            if f.device_ids.is_empty() && is_error(out, ErrorCode::UnknownRecipient) =>
        {
            Some(Body::PreKeyBundles(proto::PreKeyBundles::default()))
        }
        (F::TicketNotChecked, Some(Body::Send(s)))
            if s.ticket.len() == 16 && is_error(out, ErrorCode::TicketInvalid) =>
        {
            Some(sent())
        }
        (F::NotRegisteredAsNotFound, Some(Body::GetMessage(_))) if not_registered => {
            Some(Body::Error(proto::Error {
                code: ErrorCode::NotFound as i32,
                message: "planted defect".into(),
                retry_after_ms: 0,
            }))
        }
        (F::AckNotRegisteredOk, Some(Body::AckMessages(_))) if not_registered => {
            Some(Body::Acked(proto::Acked { deleted: 0 }))
        }
        (F::UploadUnregisteredOk, Some(Body::UploadPreKeys(u))) if not_registered => {
            Some(Body::PreKeyCount(proto::PreKeyCount {
                device_id: u.device_id,
                count: u.one_time_prekeys.len() as u32,
            }))
        }
        _ => None,
    }
}

impl Handler for Faulty {
    type Session = (RelaySession, PublicKeyBytes, Vec<u32>);

    fn connect(
        &self,
        peer: PublicKeyBytes,
        addr: std::net::SocketAddr,
        push: PushHandle,
    ) -> Self::Session {
        self.identities.lock().push(peer);
        (self.app.connect(peer, addr, push), peer, Vec::new())
    }

    fn request(&self, session: &mut Self::Session, mut frame: Frame) -> Answer {
        use HandlerFault as F;
        let id = frame.id;
        let me = session.1;
        if self.fault == F::DeviceZeroIsOne {
            let one = |d: &mut u32| {
                if *d == 0 {
                    *d = 1;
                }
            };
            match &mut frame.body {
                Some(Body::Unregister(r)) => one(&mut r.device_id),
                Some(Body::UploadPreKeys(r)) => one(&mut r.device_id),
                Some(Body::GetPreKeyCount(r)) => one(&mut r.device_id),
                Some(Body::Subscribe(r)) => one(&mut r.device_id),
                Some(Body::GetMessage(r)) => one(&mut r.device_id),
                Some(Body::AckMessages(r)) => one(&mut r.device_id),
                Some(Body::FetchPreKeys(r)) => r.device_ids.iter_mut().for_each(one),
                Some(Body::Send(r)) => {
                    one(&mut r.sender_device);
                    one(&mut r.recipient_device);
                }
                _ => {}
            }
        }
        if self.fault == F::SessionBoundDevices {
            let device = match &frame.body {
                Some(Body::Register(r)) => {
                    session.2.push(r.device_id);
                    None
                }
                Some(Body::GetMessage(r)) => Some(r.device_id),
                Some(Body::Subscribe(r)) => Some(r.device_id),
                Some(Body::AckMessages(r)) => Some(r.device_id),
                Some(Body::Send(r)) => Some(r.sender_device),
                _ => None,
            };
            if device.is_some_and(|d| !session.2.contains(&d)) {
                return error(id, ErrorCode::NotRegistered);
            }
        }
        let has_device = |me: PublicKeyBytes| self.registered.lock().iter().any(|(k, _)| *k == me);
        match (self.fault, &mut frame.body) {
            (F::NoSetPolicy, Some(Body::SetPolicy(_))) => return error(id, ErrorCode::Unsupported),
            (F::IgnoresAfterId, Some(Body::Subscribe(s))) => s.after_id = 0,
            (F::LimitsBeforeFields, Some(Body::Send(_)))
                if self
                    .limited
                    .lock()
                    .get(&me)
                    .is_some_and(|at| at.elapsed() < std::time::Duration::from_millis(200)) =>
            {
                let mut e = Frame::error(id, ErrorCode::RateLimited, "planted defect");
                if let Some(Body::Error(err)) = e.body.as_mut() {
                    err.retry_after_ms = 1;
                }
                return Answer::frame(e);
            }
            (F::ReregisterAppends, Some(Body::Register(r)))
                if self.registered.lock().contains(&(me, r.device_id)) =>
            {
                let upload = Frame::new(
                    id,
                    Body::UploadPreKeys(proto::UploadPreKeys {
                        device_id: r.device_id,
                        signed_prekey: r.signed_prekey.clone(),
                        one_time_prekeys: std::mem::take(&mut r.one_time_prekeys),
                    }),
                );
                let device = r.device_id;
                return rewrite(self.app.request(&mut session.0, upload), move |mut out| {
                    if let Some(Body::PreKeyCount(c)) = &out.body {
                        out.body = Some(Body::Registered(proto::Registered {
                            device_id: device,
                            one_time_prekeys: c.count,
                        }));
                    }
                    out
                });
            }
            (F::FixesShortHash, Some(Body::Send(s))) if s.payload_hash.len() != 32 => {
                s.payload_hash =
                    Bytes::copy_from_slice(&botd_protocol::keys::sha256(&[&s.payload]));
            }
            (F::RegistrationCheckedFirst, Some(Body::AddContact(_) | Body::CreateTicket(_)))
                if !has_device(me) =>
            {
                return error(id, ErrorCode::NotRegistered);
            }
            (F::DuplicateContactRefused, Some(Body::AddContact(c)))
                if self.contacts.lock().contains(&(me, c.identity.clone())) =>
            {
                return error(id, ErrorCode::BadRequest);
            }
            (F::TicketTtlOffByOne, Some(Body::CreateTicket(t)))
                if t.ttl_s >= self.max_ticket_ttl_s =>
            {
                return error(id, ErrorCode::BadRequest);
            }
            (F::FillsEmptyKeys, Some(Body::Register(r))) => {
                let fill = |b: &mut Bytes| {
                    if b.is_empty() {
                        *b = Bytes::from_static(&[1]);
                    }
                };
                fill(&mut r.identity_key);
                if let Some(spk) = r.signed_prekey.as_mut() {
                    fill(&mut spk.public_key);
                    fill(&mut spk.signature);
                }
                r.one_time_prekeys
                    .iter_mut()
                    .for_each(|k| fill(&mut k.public_key));
            }
            (F::KeyLimitOffByOne, Some(Body::Register(r)))
                if r.identity_key.len() >= self.max_key_len =>
            {
                return error(id, ErrorCode::BadRequest);
            }
            (F::PrekeyLimitOffByOne, Some(Body::Register(r)))
                if r.one_time_prekeys.len() >= self.max_prekeys =>
            {
                return error(id, ErrorCode::BadRequest);
            }
            (F::ReregisterDropsMailbox, Some(Body::Register(r))) => {
                let unregister = Frame::new(
                    u64::MAX,
                    Body::Unregister(proto::Unregister {
                        device_id: r.device_id,
                    }),
                );
                let first = self.app.request(&mut session.0, unregister);
                let answer = self.app.request(&mut session.0, frame);
                return Answer::pending(async move {
                    let _ = settle(first).await;
                    settle(answer).await.expect("a register is answered")
                });
            }
            (F::IgnoresUploadedSignedPrekey, Some(Body::UploadPreKeys(u))) => {
                u.signed_prekey = None
            }
            (F::MergesBeforeCounting, Some(Body::FetchPreKeys(f))) => {
                f.device_ids.sort_unstable();
                f.device_ids.dedup();
            }
            (F::ShortIdentityUnknown, Some(Body::FetchPreKeys(f))) if f.identity.len() != 33 => {
                return error(id, ErrorCode::UnknownRecipient);
            }
            (F::ShortRecipientUnknown, Some(Body::Send(s))) if s.recipient.len() != 33 => {
                return error(id, ErrorCode::UnknownRecipient);
            }
            (F::PadsShortNonce, Some(Body::Send(s))) if s.sender_nonce.len() < 8 => {
                let mut n = s.sender_nonce.to_vec();
                n.resize(8, 0);
                s.sender_nonce = n.into();
            }
            (F::PadsShortSignature, Some(Body::Send(s))) if s.sender_signature.len() < 64 => {
                let mut n = s.sender_signature.to_vec();
                n.resize(64, 0);
                s.sender_signature = n.into();
            }
            (F::CutsLargePayloads, Some(Body::Send(s)))
                if s.payload.len() > self.max_payload_len =>
            {
                s.payload.truncate(self.max_payload_len);
                s.payload_hash =
                    Bytes::copy_from_slice(&botd_protocol::keys::sha256(&[&s.payload]));
            }
            (F::RefusesSelfSend, Some(Body::Send(s))) if s.recipient[..] == me.as_bytes()[..] => {
                return error(id, ErrorCode::Forbidden);
            }
            (F::ChecksTicketWhenOpen, Some(Body::SetPolicy(p)))
            | (F::PolicyFirst, Some(Body::SetPolicy(p))) => {
                let mut list = self.contacts_only.lock();
                list.retain(|k| *k != me);
                if p.accept == 1 {
                    list.push(me);
                }
            }
            (F::ChecksTicketWhenOpen, Some(Body::Send(s)))
                if s.ticket.len() == 16
                    && !self
                        .contacts_only
                        .lock()
                        .iter()
                        .any(|k| k.as_bytes()[..] == s.recipient[..]) =>
            {
                return error(id, ErrorCode::TicketInvalid);
            }
            (F::PolicyFirst, Some(Body::Send(s)))
                if s.ticket.is_empty()
                    && s.recipient[..] != me.as_bytes()[..]
                    && self
                        .contacts_only
                        .lock()
                        .iter()
                        .any(|k| k.as_bytes()[..] == s.recipient[..]) =>
            {
                return error(id, ErrorCode::Forbidden);
            }
            (F::NonceWithPayload, Some(Body::Send(s))) if s.sender_nonce.len() == 8 => {
                let digest = botd_protocol::keys::sha256(&[&s.payload]);
                let nonce: Vec<u8> = s
                    .sender_nonce
                    .iter()
                    .zip(digest)
                    .map(|(a, b)| a ^ b)
                    .collect();
                s.sender_nonce = nonce.into();
            }
            (F::TicketFirst, Some(Body::Send(s))) if !matches!(s.ticket.len(), 0 | 16) => {
                return error(id, ErrorCode::TicketInvalid);
            }
            (F::HashBeforeTicket, Some(Body::Send(s)))
                if s.payload_hash.len() == 32
                    && s.payload_hash[..] != botd_protocol::keys::sha256(&[&s.payload])[..] =>
            {
                return error(id, ErrorCode::BadRequest);
            }
            (F::PrekeyTwice, Some(Body::FetchPreKeys(f))) => {
                let key = f.encode_to_vec();
                if let Some((_, cached)) = self.fetches.lock().iter().find(|(k, _)| *k == key) {
                    return Answer::frame(Frame {
                        id,
                        ..cached.clone()
                    });
                }
                let answer = self.app.request(&mut session.0, frame);
                let fetches = self.fetches.clone();
                return Answer::pending(async move {
                    let out = settle(answer).await.expect("a fetch is answered");
                    fetches.lock().push((key, out.clone().into_frame()));
                    out
                });
            }
            (F::CrossMailbox, Some(Body::GetMessage(_))) => {
                let answer = self.app.request(&mut session.0, frame.clone());
                let (app, identities) = (self.app.clone(), self.identities.clone());
                return Answer::pending(async move {
                    let out = settle(answer).await.expect("a get is answered");
                    if !matches!(
                        &out,
                        Outgoing::Frame(Frame {
                            body: Some(Body::Error(_)),
                            ..
                        })
                    ) {
                        return out;
                    }
                    let others: Vec<_> = identities
                        .lock()
                        .iter()
                        .copied()
                        .filter(|k| *k != me)
                        .collect();
                    for other in others {
                        let (push, _rx) = botd_relay::app::push_channel(1 << 20);
                        let mut s = app.connect(other, "127.0.0.1:1".parse().unwrap(), push);
                        let theirs = settle(app.request(&mut s, frame.clone())).await;
                        app.disconnect(s);
                        if let Some(found @ Outgoing::Deliver { .. }) = theirs {
                            return found;
                        }
                    }
                    out
                });
            }
            (F::ExecutesIdZero, Some(_)) if id == 0 => {
                frame.id = u64::MAX;
                let answer = self.app.request(&mut session.0, frame);
                return Answer::pending(async move {
                    let out = settle(answer).await.expect("a request is answered");
                    if out.frame_id() == u64::MAX {
                        with_id(out, 0)
                    } else {
                        out
                    }
                });
            }
            (F::IgnoresHash, Some(Body::Send(s))) => {
                s.payload_hash =
                    Bytes::copy_from_slice(&botd_protocol::keys::sha256(&[&s.payload]));
            }
            (F::NoDeduplication, Some(Body::Send(s))) => {
                s.sender_nonce = Bytes::copy_from_slice(&rand::random::<[u8; 8]>());
            }
            (F::AnswersErrors, Some(Body::Error(_))) => {
                return error(id, ErrorCode::Unsupported);
            }
            (F::TruncatesAcks, Some(Body::AckMessages(a))) => a.message_ids.truncate(4096),
            (F::RefusesAck4096, Some(Body::AckMessages(a))) if a.message_ids.len() >= 4096 => {
                return error(id, ErrorCode::BadRequest);
            }
            (F::ValidatesBeforeLimiting, Some(Body::Register(r))) if r.device_id == 0 => {
                return error(id, ErrorCode::BadRequest);
            }
            (F::FetchCapSixteen, Some(Body::FetchPreKeys(f))) if f.device_ids.len() > 16 => {
                return error(id, ErrorCode::BadRequest);
            }
            (F::FetchNoCap, Some(Body::FetchPreKeys(f))) => f.device_ids.truncate(self.max_devices),
            (F::FetchOwnRefused, Some(Body::FetchPreKeys(f)))
                if f.identity[..] == me.as_bytes()[..] =>
            {
                return error(id, ErrorCode::UnknownRecipient);
            }
            (F::SenderDeviceZeroBadRequest, Some(Body::Send(s))) if s.sender_device == 0 => {
                return error(id, ErrorCode::BadRequest);
            }
            (F::RecipientBeforePayloadLength, Some(Body::Send(s))) if s.recipient.len() != 33 => {
                return error(id, ErrorCode::BadRequest);
            }
            (F::TicketLengthIgnored, Some(Body::Send(s))) if s.ticket.len() != 16 => {
                s.ticket = Bytes::new();
            }
            (F::PolicyIgnored, Some(Body::SetPolicy(p))) => p.accept = 0,
            (F::UnknownPolicyAccepted, Some(Body::SetPolicy(p))) if p.accept > 1 => p.accept = 0,
            (F::AddContactNoop, Some(Body::AddContact(_)))
            | (F::RemoveContactNoop, Some(Body::RemoveContact(_))) => {
                return Answer::frame(Frame::new(id, Body::Done(proto::Done {})));
            }
            (F::TicketDropped, Some(Body::Send(s))) => s.ticket = Bytes::new(),
            (F::PayloadLimitOffByOne, Some(Body::Send(s)))
                if s.payload.len() == self.max_payload_len =>
            {
                return error(id, ErrorCode::PayloadTooLarge);
            }
            (F::EmptyPayloadRefused, Some(Body::Send(s))) if s.payload.is_empty() => {
                return error(id, ErrorCode::BadRequest);
            }
            (F::RecipientCut, Some(Body::Send(s))) if s.recipient.len() > 33 => {
                s.recipient = s.recipient.slice(..33);
            }
            (F::NonceCut, Some(Body::Send(s))) if s.sender_nonce.len() > 8 => {
                s.sender_nonce = s.sender_nonce.slice(..8);
            }
            (F::DeviceZeroRegistered, Some(Body::Register(r))) if r.device_id == 0 => {
                r.device_id = 1;
            }
            (F::IdentityKeyCut, Some(Body::Register(r))) => {
                r.identity_key.truncate(self.max_key_len);
            }
            (F::SignedPrekeyMadeUp, Some(Body::Register(r))) if r.signed_prekey.is_none() => {
                r.signed_prekey = Some(proto::SignedPreKey {
                    id: 1,
                    public_key: Bytes::from_static(b"made up"),
                    signature: Bytes::from_static(b"made up"),
                });
            }
            (F::PrekeysCut, Some(Body::Register(r))) => {
                r.one_time_prekeys.truncate(self.max_prekeys)
            }
            (F::PrekeysCut, Some(Body::UploadPreKeys(u))) => {
                u.one_time_prekeys.truncate(self.max_prekeys)
            }
            (F::PrekeyIdsMerged, Some(Body::UploadPreKeys(u))) => {
                let mut seen = std::collections::HashSet::new();
                u.one_time_prekeys.retain(|k| seen.insert(k.id));
            }
            (F::PrekeyIdsMerged, Some(Body::Register(r))) => {
                let mut seen = std::collections::HashSet::new();
                r.one_time_prekeys.retain(|k| seen.insert(k.id));
            }
            (F::UploadIdsMoved, Some(Body::UploadPreKeys(u))) => {
                for k in &mut u.one_time_prekeys {
                    k.id = k.id.wrapping_add(1 << 30);
                }
            }
            (F::NonRequestServed, Some(Body::Sent(_))) => {
                return Answer::frame(Frame::new(id, Body::Done(proto::Done {})));
            }
            (F::SelfSendForbidden, Some(Body::SetPolicy(p))) => {
                let mut list = self.contacts_only.lock();
                list.retain(|k| *k != me);
                if p.accept == 1 {
                    list.push(me);
                }
            }
            (F::SelfSendForbidden, Some(Body::Send(s)))
                if s.recipient[..] == me.as_bytes()[..]
                    && self.contacts_only.lock().contains(&me) =>
            {
                return error(id, ErrorCode::Forbidden);
            }
            (F::TicketTtlCut, Some(Body::CreateTicket(t))) => {
                t.ttl_s = t.ttl_s.min(self.max_ticket_ttl_s);
            }
            (F::TicketUsesCut, Some(Body::CreateTicket(t))) => {
                t.uses = t.uses.min(self.max_ticket_uses);
            }
            (F::ShortContactAccepted, Some(Body::AddContact(proto::AddContact { identity })))
            | (
                F::ShortContactAccepted,
                Some(Body::RemoveContact(proto::RemoveContact { identity })),
            ) if identity.len() != 33 => {
                return Answer::frame(Frame::new(id, Body::Done(proto::Done {})));
            }
            _ => {}
        }
        // Defects in the answer.
        let uploaded = match &frame.body {
            Some(Body::UploadPreKeys(u)) => u.one_time_prekeys.len() as u32,
            _ => 0,
        };
        let listed = match &frame.body {
            Some(Body::AckMessages(a)) => a.message_ids.len() as u32,
            _ => 0,
        };
        let subscribed_device = match &frame.body {
            Some(Body::Subscribe(s)) => s.device_id,
            _ => 0,
        };
        let kind = frame.body.clone();
        let checked_device = match &frame.body {
            Some(Body::Send(s)) => Some(s.sender_device),
            Some(Body::AckMessages(a)) => Some(a.device_id),
            Some(Body::UploadPreKeys(u)) => Some(u.device_id),
            _ => None,
        };
        let fetch_counts: Vec<u32> = match &frame.body {
            Some(Body::FetchPreKeys(f)) => f.device_ids.clone(),
            _ => Vec::new(),
        };
        let answer = self.app.request(&mut session.0, frame);
        if self.fault == F::None {
            return answer;
        }
        if let (F::AcksOtherIdentities, Some(Body::AckMessages(_))) = (self.fault, &kind) {
            let others: Vec<_> = self
                .identities
                .lock()
                .iter()
                .copied()
                .filter(|k| *k != me)
                .collect();
            let extra: Vec<Answer> = others
                .into_iter()
                .map(|other| {
                    let (push, _rx) = botd_relay::app::push_channel(1 << 20);
                    let mut s = self
                        .app
                        .connect(other, "127.0.0.1:1".parse().unwrap(), push);
                    let body = kind.clone().expect("an ack");
                    let a = self.app.request(&mut s, Frame::new(u64::MAX, body));
                    self.app.disconnect(s);
                    a
                })
                .collect();
            return Answer::pending(async move {
                for a in extra {
                    let _ = settle(a).await;
                }
                settle(answer).await.expect("an ack is answered")
            });
        }
        if let (F::DeviceCheckedFirst, Some(device)) = (self.fault, checked_device) {
            use botd_relay::store::Store as _;
            // A device that is not registered has no prekey count.
            let registered = self.app.store().prekey_count(me.as_bytes(), device);
            return Answer::pending(async move {
                let out = settle(answer).await.expect("a request is answered");
                if registered.await.is_err() {
                    return Outgoing::Frame(Frame::error(
                        id,
                        ErrorCode::NotRegistered,
                        "planted defect",
                    ));
                }
                out
            });
        }
        if let (F::UnregisterResetsPolicy, Some(Body::Unregister(_))) = (self.fault, &kind) {
            let open = self.app.request(
                &mut session.0,
                Frame::new(u64::MAX, Body::SetPolicy(proto::SetPolicy { accept: 0 })),
            );
            return Answer::pending(async move {
                let out = settle(answer).await.expect("an unregister is answered");
                let _ = settle(open).await;
                out
            });
        }
        let first_token = self.first_token.clone();
        let fault = self.fault;
        let (registered, contacts, limited) = (
            self.registered.clone(),
            self.contacts.clone(),
            self.limited.clone(),
        );
        if fault == F::GetAnsweredAsPush && matches!(kind, Some(Body::GetMessage(_))) {
            return Answer::pending(async move {
                with_id(settle(answer).await.expect("a get is answered"), 0)
            });
        }
        rewrite(answer, move |mut out| {
            match (&kind, &out.body) {
                (_, Some(Body::Registered(r))) => {
                    registered.lock().insert((me, r.device_id));
                }
                (Some(Body::Unregister(u)), Some(Body::Unregistered(_))) => {
                    registered.lock().remove(&(me, u.device_id));
                }
                (Some(Body::AddContact(c)), Some(Body::Done(_))) => {
                    contacts.lock().insert((me, c.identity.clone()));
                }
                (Some(Body::Send(_)), Some(Body::Error(e)))
                    if e.code == ErrorCode::RateLimited as i32 =>
                {
                    limited.lock().insert(me, std::time::Instant::now());
                }
                _ => {}
            }
            match (fault, &kind, &mut out.body) {
                (F::RegisteredCountZero, _, Some(Body::Registered(r))) => r.one_time_prekeys = 0,
                (F::UnregisteredDeviceOne, _, Some(Body::Unregistered(u))) => u.device_id = 1,
                (F::PreKeyCountDeviceOne, _, Some(Body::PreKeyCount(c))) => c.device_id = 1,
                (
                    F::UploadCountBefore,
                    Some(Body::UploadPreKeys(_)),
                    Some(Body::PreKeyCount(c)),
                ) => c.count = c.count.saturating_sub(uploaded),
                (F::SubscribedDeviceOne, _, Some(Body::Subscribed(s))) => s.device_id = 1,
                (F::BundlesReversed, _, Some(Body::PreKeyBundles(b))) => b.bundles.reverse(),
                (F::TicketUsesOne, _, Some(Body::Ticket(t))) => t.uses = 1,
                (F::TicketExpiryLate, _, Some(Body::Ticket(t))) => t.expires_at_ms += 3_600_000,
                (F::TicketTokenRepeats, _, Some(Body::Ticket(t))) => {
                    t.token = first_token.lock().get_or_insert(t.token.clone()).clone();
                }
                (F::AckCountsListed, _, Some(Body::Acked(a))) => a.deleted = listed,
                (F::BundleFieldLost, _, Some(Body::PreKeyBundles(b))) => {
                    b.bundles.iter_mut().for_each(|b| b.registration_id = 0)
                }
                (F::DuplicateBundles, _, Some(Body::PreKeyBundles(b)))
                    if !fetch_counts.is_empty() =>
                {
                    b.bundles = fetch_counts
                        .iter()
                        .filter_map(|d| b.bundles.iter().find(|x| x.device_id == *d).cloned())
                        .collect();
                }
                (F::MessageIdZero, _, Some(Body::Sent(s))) => s.message_id = 0,
                (F::IdsStartAtZero, _, Some(Body::Sent(s))) => s.message_id -= 1,
                (F::LastIdAhead, _, Some(Body::Subscribed(s))) => s.last_id += 1,
                (F::RateLimitedAsBadRequest, _, Some(Body::Error(e)))
                    if e.code == ErrorCode::RateLimited as i32 =>
                {
                    e.code = ErrorCode::BadRequest as i32;
                    e.retry_after_ms = 0;
                }
                (F::DuplicateFlagLost, _, Some(Body::Sent(s))) => s.duplicate = false,
                (F::RetryAfterOnErrors, _, Some(Body::Error(e)))
                    if e.code != ErrorCode::RateLimited as i32 =>
                {
                    e.retry_after_ms = 1
                }
                (F::RateLimitedRetryAfterZero, _, Some(Body::Error(e)))
                    if e.code == ErrorCode::RateLimited as i32 =>
                {
                    e.retry_after_ms = 0
                }
                (F::NotRegisteredAsUnknownRecipient, Some(Body::Send(_)), Some(Body::Error(e)))
                    if e.code == ErrorCode::NotRegistered as i32 =>
                {
                    e.code = ErrorCode::UnknownRecipient as i32
                }
                (F::NotFoundAsNotRegistered, _, Some(Body::Error(e)))
                    if e.code == ErrorCode::NotFound as i32 =>
                {
                    e.code = ErrorCode::NotRegistered as i32
                }
                _ => {}
            }
            if fault == F::SubscribeUnregistered
                && matches!(kind, Some(Body::Subscribe(_)))
                && is_error(&out, ErrorCode::NotRegistered)
            {
                out.body = Some(Body::Subscribed(proto::Subscribed {
                    device_id: subscribed_device,
                    last_id: 0,
                }));
            }
            if let Some(body) = replacement(fault, &kind, &out) {
                out.body = Some(body);
            }
            out
        })
    }

    fn is_barrier(&self, frame: &Frame) -> bool {
        self.app.is_barrier(frame)
    }

    fn max_pipelined(&self) -> usize {
        self.app.max_pipelined()
    }

    fn resume(&self, session: &mut Self::Session) {
        self.app.resume(&mut session.0)
    }

    fn disconnect(&self, session: Self::Session) {
        self.app.disconnect(session.0)
    }
}
