use super::*;
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::SignedPreKey;

fn state(config: &Config) -> State {
    let config = Config {
        store_shards: 4,
        ..config.clone()
    };
    State::new(&config, None)
}

fn identity() -> Identity {
    *KeyPair::generate().public().as_bytes()
}

fn register(state: &State, who: &Identity) {
    let reg = Registration {
        device: 1,
        registration_id: 1,
        identity_key: Bytes::from_static(&[1; 33]),
        signed_prekey: SignedPreKey {
            id: 1,
            public_key: Bytes::from_static(&[2; 33]),
            signature: Bytes::from_static(&[3; 64]),
        },
        one_time_prekeys: Vec::new(),
    };
    state.register(who, reg, 0).unwrap();
}

fn message(from: &Identity, to: &Identity, nonce: u8, len: usize, at: u64) -> NewMessage {
    let payload = Bytes::from(vec![nonce; len]);
    NewMessage {
        to: MailboxId {
            identity: *to,
            device: 1,
        },
        sender: *from,
        sender_device: 1,
        nonce: [nonce; NONCE_LEN],
        payload_hash: sha256(&[&payload]),
        signature: [0; SIGNATURE_LEN],
        payload,
        ticket: None,
        received_at_ms: at,
        bad_signature: None,
    }
}

fn stored(state: &State, msg: NewMessage) -> u64 {
    match state.append(msg).unwrap().value.0 {
        Appended::Stored(id) | Appended::Duplicate(id) => id,
    }
}

fn mailbox(who: &Identity) -> MailboxId {
    MailboxId {
        identity: *who,
        device: 1,
    }
}

#[test]
fn expiry_removes_the_old_prefix_and_counts_what_stays() {
    let state = state(&Config::default());
    let (alice, bob) = (identity(), identity());
    register(&state, &alice);
    register(&state, &bob);
    for (n, at) in [(1u8, 0u64), (2, 10), (3, 20)] {
        stored(&state, message(&alice, &bob, n, 10, at));
    }
    let swept = state.expire(10, 0);
    let e = swept.expiry;
    assert_eq!(
        (e.expired_messages, e.messages_left, e.payload_bytes_left),
        (2, 1, 10)
    );
    assert_eq!(swept.removed, vec![(mailbox(&bob), vec![1, 2])]);
    assert!(matches!(
        state.get(&mailbox(&bob), 2),
        Err(StoreError::NotFound)
    ));
    assert!(state.get(&mailbox(&bob), 3).is_ok());
}

#[test]
fn stored_messages_written_with_their_payload_hash_still_replay() {
    use prost::Message as _;
    let state = state(&Config::default());
    let (alice, bob) = (identity(), identity());
    register(&state, &bob);
    let stored = ev::MessageStored {
        recipient: Bytes::copy_from_slice(&bob),
        device_id: 1,
        message_id: 7,
        sender: Bytes::copy_from_slice(&alice),
        sender_device: 1,
        sender_nonce: Bytes::from_static(&[1; NONCE_LEN]),
        sender_signature: Bytes::from_static(&[2; SIGNATURE_LEN]),
        payload: Bytes::from_static(b"old"),
        received_at_ms: 5,
        ..Default::default()
    };
    // As files written before field 7 was retired carry it.
    let mut encoded = stored.encode_to_vec();
    prost::encoding::bytes::encode(7, &Bytes::from_static(&[9; 32]), &mut encoded);
    let decoded = ev::MessageStored::decode(&encoded[..]).unwrap();
    state
        .replay(&Event {
            kind: Some(Kind::MessageStored(decoded)),
        })
        .unwrap();
    let delivered = state.get(&mailbox(&bob), 7).unwrap();
    assert_eq!(&delivered.payload[..], b"old");
    assert_eq!(delivered.payload_hash, sha256(&[b"old"]));
}

#[test]
fn senders_are_interned_while_their_messages_are_stored() {
    let state = state(&Config::default());
    let (alice, carol, bob) = (identity(), identity(), identity());
    for who in [&alice, &carol, &bob] {
        register(&state, who);
    }
    let first = stored(&state, message(&alice, &bob, 1, 10, 0));
    stored(&state, message(&alice, &bob, 2, 10, 0));
    // The same nonce from another sender is another message.
    let other = stored(&state, message(&carol, &bob, 1, 10, 0));
    assert_ne!(other, first);
    let retry = state.append(message(&alice, &bob, 1, 10, 0)).unwrap();
    assert_eq!(retry.value.0, Appended::Duplicate(first));
    assert_eq!(state.interned_senders(), 2);
    let delivered = state.get(&mailbox(&bob), other).unwrap();
    assert_eq!(delivered.sender, carol);
    assert_eq!(
        delivered.payload_hash,
        sha256(&[&delivered.payload]),
        "the hash is recomputed at delivery"
    );
    state.ack(&mailbox(&bob), &[other]).unwrap();
    assert_eq!(state.interned_senders(), 1, "carol has nothing stored");
    state.unregister(&bob, 1).unwrap();
    assert_eq!(state.interned_senders(), 0);
}

#[test]
fn replayed_values_that_would_overflow_are_refused() {
    let state = state(&Config::default());
    let bob = identity();
    let event = |message_id| Event {
        kind: Some(Kind::MessageStored(ev::MessageStored {
            recipient: Bytes::copy_from_slice(&bob),
            device_id: 1,
            message_id,
            sender: Bytes::copy_from_slice(&bob),
            sender_device: 1,
            sender_nonce: Bytes::from_static(&[1; NONCE_LEN]),
            sender_signature: Bytes::from_static(&[2; SIGNATURE_LEN]),
            ..Default::default()
        })),
    };
    for bad in [0, u64::MAX, MAX_SEQUENCE] {
        assert!(
            matches!(
                state.replay(&event(bad)),
                Err(ApplyError::OutOfRange {
                    field: "message_id",
                    ..
                })
            ),
            "{bad}"
        );
    }
    state.replay(&event(MAX_SEQUENCE - 1)).unwrap();
    let removed = Event {
        kind: Some(Kind::AccountRemoved(ev::AccountRemoved {
            identity: Bytes::copy_from_slice(&bob),
            id_floor: u64::MAX,
        })),
    };
    assert!(state.replay(&removed).is_err());
}

#[test]
fn a_removed_account_never_gets_its_old_ids_again() {
    let state = state(&Config::default());
    let (alice, bob) = (identity(), identity());
    register(&state, &alice);
    register(&state, &bob);
    for n in 1..=5 {
        stored(&state, message(&alice, &bob, n, 3, 0));
    }
    state.unregister(&bob, 1).unwrap();
    assert_eq!(state.stats().identities, 1, "bob's account is gone");
    register(&state, &bob);
    let next = stored(&state, message(&alice, &bob, 9, 3, 0));
    assert!(next > 5, "ids continue above the removed account's: {next}");
    // An identity never seen before also starts above the floor: the relay no longer
    // knows which identities it removed.
    let carol = identity();
    register(&state, &carol);
    assert!(stored(&state, message(&alice, &carol, 1, 3, 0)) > 5);
}

#[test]
fn idle_accounts_expire_and_their_mailboxes_close() {
    let state = state(&Config::default());
    let (alice, bob) = (identity(), identity());
    register(&state, &alice);
    register(&state, &bob);
    stored(&state, message(&alice, &bob, 1, 3, 0));
    state.touch(&alice, 1_000_000_000);
    let swept = state.expire(0, 500);
    assert_eq!(swept.expiry.removed_accounts, 1);
    assert_eq!(swept.closed, vec![mailbox(&bob)]);
    assert!(!state.is_registered(&bob, 1));
    assert!(state.is_registered(&alice, 1));
}

#[test]
fn relay_wide_quotas_refuse_with_quota_exceeded() {
    let config = Config {
        max_identities: 2,
        max_stored_bytes: 25,
        max_identity_stored_bytes: 15,
        ..Config::default()
    };
    let state = state(&config);
    let (alice, bob, carol) = (identity(), identity(), identity());
    register(&state, &alice);
    register(&state, &bob);
    let reg = Registration {
        device: 1,
        registration_id: 1,
        identity_key: Bytes::from_static(&[1; 33]),
        signed_prekey: SignedPreKey::default(),
        one_time_prekeys: Vec::new(),
    };
    assert!(matches!(
        state.register(&carol, reg, 0),
        Err(StoreError::QuotaExceeded { .. })
    ));
    stored(&state, message(&alice, &bob, 1, 10, 0));
    assert!(matches!(
        state.append(message(&alice, &bob, 2, 10, 0)),
        Err(StoreError::QuotaExceeded { .. })
    ));
    stored(&state, message(&bob, &alice, 3, 10, 0));
    assert!(matches!(
        state.append(message(&bob, &alice, 4, 10, 0)),
        Err(StoreError::QuotaExceeded { .. })
    ));
}

#[test]
fn shared_fields_are_the_parts_in_order_over_one_buffer() {
    let [a, b, c] = mailboxes::shared_fields([&[1u8, 2][..], &[][..], &[3, 4, 5][..]]);
    assert_eq!(
        (&a[..], &b[..], &c[..]),
        (&[1, 2][..], &[][..], &[3, 4, 5][..])
    );
    // One buffer: each part starts where the one before it ends.
    assert_eq!(c.as_ptr(), a.as_ptr().wrapping_add(2));
}
