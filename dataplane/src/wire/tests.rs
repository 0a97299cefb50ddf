//! Codec tests in three layers: golden byte vectors written from `docs/PROTOCOL.md`, property
//! round trips, and arbitrary input that must decode to a value or an error without panicking.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, WireError> {
    FrameDecoder::new(1 << 20).decode(&mut BytesMut::from(bytes))
}

fn golden(frame: Frame, hex: &str) {
    let bytes = unhex(hex);
    assert_eq!(
        frame.to_bytes().as_ref(),
        &bytes[..],
        "encoding of {frame:?}"
    );
    assert_eq!(decode_one(&bytes).unwrap(), Some(frame));
}

#[test]
fn golden_control_frames() {
    golden(
        Frame::Ping(Ping {
            timestamp_us: 0x0102030405060708,
        }),
        "00000009 06 0102030405060708",
    );
    golden(
        Frame::Pong(Pong {
            echo_us: 1,
            responder_us: 2,
        }),
        "00000011 07 0000000000000001 0000000000000002",
    );
    golden(
        Frame::Close(Close {
            code: 5,
            text: "no".into(),
        }),
        "00000006 09 0005 02 6e6f",
    );
    golden(
        Frame::Ack(AckBatch::new([MessageId::from_u128(1)])),
        "00000013 04 0001 00000000000000000000000000000001",
    );
    golden(
        Frame::Nack(Nack {
            message_id: MessageId::from_u128(2),
            code: 10,
            text: "x".into(),
        }),
        "00000015 05 00000000000000000000000000000002 000a 01 78",
    );
    golden(
        Frame::GoingAway(GoingAway {
            code: 16,
            drain_ms: 5000,
            redirect: String::new(),
        }),
        "00000008 08 0010 00001388 00",
    );
    golden(
        Frame::Hello(Hello {
            min_version: 2,
            max_version: 2,
            role: Role::Agent,
            features: features::RECEIPTS,
            transports: 1,
            classes: 3,
            max_frame: 0x10000,
            heartbeat_ms: 1000,
            schemas: vec!["a/b@1".into()],
        }),
        "0000001b 01 0002 0002 00 00000001 01 03 00010000 000003e8 01 05 612f624031",
    );
    golden(
        Frame::Welcome(Welcome {
            version: 2,
            role: Role::Agent,
            features: 1,
            session_id: 7,
            relay_id: RelayId([0xaa; 32]),
            agent_id: AgentId([0xbb; 32]),
            heartbeat_ms: 10_000,
            max_frame: 0x10_0000,
            rate_frames: 100,
            rate_bytes: 200,
            max_ttl_ms: 60_000,
            classes: 3,
            key_rotation_s: 300,
            deliver_window: 4096,
            deliver_window_bytes: 0x40_0000,
            send_window: 1024,
        }),
        &format!(
            "0000007d 02 0002 00 00000001 0000000000000007 {} {} 00002710 00100000 00000064 00000000000000c8 000000000000ea60 03 0000012c 00001000 00400000 00000400",
            "aa".repeat(32),
            "bb".repeat(32)
        ),
    );
    golden(
        Frame::Receipt(Receipt {
            message_id: MessageId::from_u128(3),
            status: ReceiptStatus::Expired,
            at_ms: 0x0102,
        }),
        "0000001a 0a 00000000000000000000000000000003 01 0000000000000102",
    );
    golden(
        Frame::LinkHello(LinkHello {
            min_version: 2,
            max_version: 2,
            relay_id: RelayId([0xcc; 32]),
            generation: 9,
            heartbeat_ms: 250,
            max_frame: 0x10_0000,
            window: 8192,
            window_bytes: 0x100_0000,
        }),
        &format!(
            "0000003d 0b 0002 0002 {} 0000000000000009 000000fa 00100000 00002000 01000000",
            "cc".repeat(32)
        ),
    );
    golden(
        Frame::LinkAck(LinkAck::new([1, 0x0203])),
        "00000013 0c 0002 0000000000000001 0000000000000203",
    );
    golden(
        Frame::LinkNack(LinkNack {
            seq: 5,
            code: 31,
            text: "x".into(),
        }),
        "0000000d 0d 0000000000000005 001f 01 78",
    );
    golden(
        Frame::Presence(Presence {
            entries: vec![PresenceEntry {
                agent: AgentId([0xaa; 32]),
                relay: RelayId([0xbb; 32]),
                stamp_ms: 0x0102,
            }],
        }),
        &format!(
            "0000004b 0e 0001 {} {} 0000000000000102",
            "aa".repeat(32),
            "bb".repeat(32)
        ),
    );
}

#[test]
fn golden_link_receipt() {
    golden(
        Frame::LinkReceipt(LinkReceipt {
            to: AgentId([0xaa; 32]),
            receipt: Receipt {
                message_id: MessageId::from_u128(3),
                status: ReceiptStatus::Delivered,
                at_ms: 0x0102,
            },
            hops_left: 7,
        }),
        &format!(
            "0000003b 0f {} 00000000000000000000000000000003 00 0000000000000102 07",
            "aa".repeat(32)
        ),
    );
}

#[test]
fn golden_directory_frames() {
    golden(
        Frame::Publish(Publish {
            request_id: 7,
            bundle: Bytes::from_static(b"\x01\x02\x03"),
        }),
        "00000008 10 00000007 010203",
    );
    golden(
        Frame::Lookup(Lookup {
            request_id: 9,
            key: LookupKey::Agent(AgentId([0xaa; 32])),
            limit: 1,
        }),
        &format!("00000028 11 00000009 00 {} 0001", "aa".repeat(32)),
    );
    golden(
        Frame::Lookup(Lookup {
            request_id: 9,
            key: LookupKey::Schema {
                schema: "m@2".into(),
                after: AgentId([0; 32]),
            },
            limit: 64,
        }),
        &format!("0000002c 11 00000009 01 03 6d4032 {} 0040", "00".repeat(32)),
    );
    golden(
        Frame::Directory(DirectoryAnswer {
            request_id: 9,
            code: 0,
            more: true,
            bundles: vec![Bytes::from_static(b"\xab"), Bytes::from_static(b"\xcd\xef")],
        }),
        "00000011 12 00000009 0000 01 0002 0001ab 0002cdef",
    );
    golden(
        Frame::Directory(DirectoryAnswer {
            request_id: 3,
            code: Reason::DirectoryFull as u16,
            more: false,
            bundles: vec![],
        }),
        "0000000a 12 00000003 0021 00 0000",
    );
    // A DIRECTORY whose bundle runs past the frame, or with a bad `more`.
    assert!(decode_one(&unhex("0000000d 12 00000009 0000 00 0001 0005ab")).is_err());
    assert!(decode_one(&unhex("0000000a 12 00000009 0000 02 0000")).is_err());
}

#[test]
fn link_frames_refuse_empty_and_oversized_batches() {
    for bad in [
        "00000003 0c 0000",
        "00000003 0e 0000",
        "00000003 0c 1001",
        "00000003 0e 0401",
    ] {
        assert!(decode_one(&unhex(bad)).is_err(), "{bad} decoded");
    }
}

#[test]
fn an_older_versions_hello_is_read_only_up_to_its_range() {
    // A version-1 HELLO: the range, then fields in version 1's layout.
    let v1 = unhex("00000016 01 0001 0001 01 03 00010000 000003e8 01 05 612f624031");
    let Some(Frame::Hello(h)) = decode_one(&v1).unwrap() else {
        panic!("a HELLO")
    };
    assert_eq!((h.min_version, h.max_version), (1, 1));
    assert_eq!(
        h,
        Hello {
            min_version: 1,
            max_version: 1,
            ..Hello::default()
        }
    );
    // And it re-encodes as just the range.
    assert_eq!(
        Frame::Hello(h).to_bytes().as_ref(),
        &unhex("00000005 01 0001 0001")[..]
    );
    // A range reaching this version must be a whole v2 HELLO.
    assert_eq!(
        decode_one(&unhex("00000005 01 0001 0002")),
        Err(WireError::Truncated("role"))
    );
}

#[test]
fn golden_envelope() {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(1),
        AgentId([0x11; 32]),
        Destination::Agent(AgentId([0x22; 32])),
        100,
        900,
    );
    b.constraints.jurisdictions = vec![Jurisdiction::parse("EU").unwrap()];
    b.constraints.multipath_k = 2;
    b.schema = "a/b@1".into();
    b.flags = flags::RECEIPT_DELIVERED;
    b.extensions = vec![(0x8001, vec![0xcc])];
    let mut env = b.build(b"hi").unwrap();
    env.routing.copy_index = 1;
    let hex = format!(
        "0000008a 03 08 00 01 00000000 00 02 01 {} {} 00 {} 0000000000000064 00000000000003e8 01 00 00 02 00 01 4555 00 00 00 05 612f624031 0005 8001 0001 cc 00000002 6869",
        "00000000000000000000000000000001",
        "11".repeat(32),
        "22".repeat(32)
    );
    golden(Frame::Envelope(env.clone()), &hex);
    assert_eq!(&env.payload()[..], b"hi");
    assert_eq!(env.payload_ref(), b"hi");
    assert_eq!(env.schema(), "a/b@1");
    assert_eq!(
        env.jurisdictions().collect::<Vec<_>>(),
        vec![Jurisdiction(*b"EU")]
    );
    assert!(env.wants_delivery_receipt() && !env.wants_expiry_notice());
    assert_eq!(
        env.extensions().collect::<Vec<_>>(),
        vec![Extension {
            kind: 1,
            critical: true,
            value: &[0xcc]
        }]
    );
    assert_eq!(env.unknown_critical_extension(&[]), Some(1));
    assert_eq!(env.unknown_critical_extension(&[1]), None);
    assert_eq!(env.associated_data().len(), env.immutable.len() - 2);
}

/// An envelope without route constraints (the four lists' counts all zero, read without
/// walking them) and one with only its last list set decode to the same sections as the
/// builder wrote, and a bad count after the zeros is still refused.
#[test]
fn envelopes_without_route_constraints_decode_every_section() {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(7),
        AgentId([0x11; 32]),
        Destination::Agent(AgentId([0x22; 32])),
        100,
        900,
    );
    b.schema = "chat/v2".into();
    b.extensions = vec![(3, vec![1, 2, 3]), (0x8004, vec![])];
    for fallback in [vec![], vec![PathClass::LowCost]] {
        b.constraints.fallback = fallback.clone();
        let env = b.build(b"payload").unwrap();
        let got = match decode_one(&Frame::Envelope(env.clone()).to_bytes()).unwrap() {
            Some(Frame::Envelope(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, env);
        assert_eq!(got.jurisdictions().count(), 0);
        assert_eq!((got.avoid().count(), got.prefer().count()), (0, 0));
        assert_eq!(got.fallback().collect::<Vec<_>>(), fallback);
        assert_eq!(got.schema(), "chat/v2");
        assert_eq!(got.extensions().count(), 2);
        assert_eq!(got.extensions().next().unwrap().value, &[1, 2, 3]);
        assert_eq!(got.payload_ref(), b"payload");
        assert_eq!(got.associated_data().len(), got.immutable.len() - 7);
    }
    // A schema length running past the end, right after the four zero counts (the fixed part
    // is 104 bytes).
    b.constraints.fallback = vec![];
    let env = b.build(b"").unwrap();
    let mut bytes = Frame::Envelope(env.clone()).to_bytes().to_vec();
    let imm_at = bytes.len() - env.immutable.len();
    assert_eq!(&bytes[imm_at + 104..imm_at + 109], &[0, 0, 0, 0, 7]);
    bytes[imm_at + 108] = 250;
    assert!(decode_one(&bytes).is_err());
}

#[test]
fn routing_part_bounds_are_checked() {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(1),
        AgentId([1; 32]),
        Destination::Agent(AgentId([2; 32])),
        0,
        10,
    );
    let env = b.build(b"x").unwrap();
    let wire = Frame::Envelope(env).to_bytes().to_vec();
    // Offsets in the frame: 5 header, then hop_limit, hop_index, copy_index.
    let mut hop = wire.clone();
    hop[6] = 1;
    assert_eq!(decode_one(&hop), Err(WireError::Invalid("hop index")));
    let mut copy = wire.clone();
    copy[7] = 1;
    assert_eq!(decode_one(&copy), Err(WireError::Invalid("copy index")));
    b.constraints.multipath_k = MAX_MULTIPATH + 1;
    assert_eq!(b.build(b"x"), Err(WireError::Invalid("multipath k")));
    b.constraints.multipath_k = 3;
    let mut env = b.build(b"x").unwrap();
    env.routing.copy_index = 2;
    env.routing.path = Bytes::from(vec![7u8; 64]);
    env.routing.hop_index = 1;
    let bytes = Frame::Envelope(env.clone()).to_bytes();
    assert_eq!(decode_one(&bytes).unwrap(), Some(Frame::Envelope(env)));
}

#[test]
fn extension_areas_must_be_whole_tlvs() {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(1),
        AgentId([1; 32]),
        Destination::Agent(AgentId([2; 32])),
        0,
        10,
    );
    b.extensions = vec![(0x0001, vec![1, 2, 3])];
    let wire = Frame::Envelope(b.build(b"").unwrap()).to_bytes().to_vec();
    // The TLV's own length is the u16 before its value: claim one byte more than there is.
    let at = wire.len() - 4 - 3 - 2;
    let mut bad = wire.clone();
    bad[at + 1] = 4;
    assert_eq!(
        decode_one(&bad),
        Err(WireError::Truncated("extension value"))
    );
    b.extensions = vec![(1, vec![0; MAX_EXTENSIONS_LEN])];
    assert_eq!(b.build(b""), Err(WireError::Invalid("extension length")));
}

#[test]
fn length_is_checked_before_anything_is_buffered() {
    let d = FrameDecoder::new(1000);
    let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    assert_eq!(
        d.decode(&mut b),
        Err(WireError::FrameTooLarge {
            len: 0xffff_ffff,
            max: 1000
        })
    );
    let mut b = BytesMut::from(&[0, 0, 0, 0][..]);
    assert_eq!(d.decode(&mut b), Err(WireError::EmptyFrame));
    let mut b = BytesMut::from(&[0, 0, 0, 2, 0x06][..]);
    assert_eq!(
        d.decode(&mut b),
        Ok(None),
        "incomplete frame waits for more bytes"
    );
}

#[test]
fn bad_bodies_are_typed_errors() {
    assert_eq!(
        decode_one(&unhex("00000001 ee")),
        Err(WireError::UnknownFrameType(0xee))
    );
    assert_eq!(
        decode_one(&unhex("00000002 06 01")),
        Err(WireError::Truncated("timestamp"))
    );
    assert_eq!(
        decode_one(&unhex("0000000a 06 0000000000000001 00")),
        Err(WireError::TrailingBytes(1))
    );
    assert_eq!(
        decode_one(&unhex("00000003 04 0000")),
        Err(WireError::Invalid("ack count"))
    );
    assert_eq!(
        decode_one(&unhex("0000000f 01 0002 0001 01 03 00010000 000003e8 00")),
        Err(WireError::Invalid("version range"))
    );
    assert_eq!(
        decode_one(&unhex(
            "00000014 01 0002 0002 07 00000000 01 03 00010000 000003e8 00"
        )),
        Err(WireError::Invalid("role"))
    );
    assert_eq!(
        decode_one(&unhex(
            "0000001a 0a 00000000000000000000000000000003 02 0000000000000102"
        )),
        Err(WireError::Invalid("receipt status"))
    );
}

#[test]
fn forwarding_rewrites_only_the_routing_part_and_shares_the_immutable_bytes() {
    let env = EnvelopeBuilder::new(
        MessageId::from_u128(9),
        AgentId([1; 32]),
        Destination::Agent(AgentId([2; 32])),
        0,
        10,
    )
    .build(&[5u8; 300])
    .unwrap();
    let wire = Frame::Envelope(env.clone()).to_bytes();
    let mut buf = BytesMut::from(&wire[..]);
    let Some(Frame::Envelope(mut got)) = FrameDecoder::new(4096).decode(&mut buf).unwrap() else {
        panic!("not an envelope")
    };
    got.routing.hop_limit -= 1;
    let mut head = BytesMut::new();
    got.encode_head(&mut head);
    let mut out = head.to_vec();
    out.extend_from_slice(&got.immutable);
    assert_eq!(out.len(), wire.len());
    assert_eq!(out[5], 7, "hop limit rewritten");
    assert_eq!(&out[13..], &wire[13..], "immutable part unchanged");
    assert_eq!(got.payload(), env.payload());
}

fn arb_id() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn arb_builder() -> impl Strategy<Value = (EnvelopeBuilder, Vec<u8>)> {
    (
        (
            any::<u128>(),
            arb_id(),
            arb_id(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            0u8..3,
            any::<u8>(),
        ),
        (
            0u8..3,
            (0u8..=MAX_MULTIPATH, 0u8..=100),
            prop::collection::vec("[A-Z]{2}", 0..4),
            prop::collection::vec(arb_id(), 0..3),
            prop::collection::vec(0u8..3, 0..3),
            "[a-z/@.0-9]{0,40}",
            prop::collection::vec(any::<u8>(), 0..600),
            (
                0u8..4,
                prop::collection::vec(
                    (any::<u16>(), prop::collection::vec(any::<u8>(), 0..40)),
                    0..4,
                ),
            ),
        ),
    )
        .prop_map(
            |(
                (id, src, dst, group, created, ttl, class, prio),
                (pc, (k, trust), jur, avoid, fb, schema, payload, (fl, ext)),
            )| {
                let dest = if group {
                    Destination::Group(dst)
                } else {
                    Destination::Agent(AgentId(dst))
                };
                let mut b = EnvelopeBuilder::new(
                    MessageId::from_u128(id),
                    AgentId(src),
                    dest,
                    created,
                    ttl,
                );
                b.class = DeliveryClass::from_u8(class).unwrap();
                b.priority = prio;
                b.path_class = PathClass::from_u8(pc).unwrap();
                b.constraints = Constraints {
                    jurisdictions: jur
                        .iter()
                        .map(|j| Jurisdiction::parse(j).unwrap())
                        .collect(),
                    min_trust: trust,
                    avoid: avoid.iter().map(|a| RelayId(*a)).collect(),
                    prefer: avoid.iter().rev().map(|a| RelayId(*a)).collect(),
                    fallback: fb
                        .into_iter()
                        .map(|p| PathClass::from_u8(p).unwrap())
                        .collect(),
                    multipath_k: k,
                };
                b.schema = schema;
                b.flags = fl;
                b.extensions = ext;
                (b, payload)
            },
        )
}

fn arb_control() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            any::<u8>(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec("[ -~]{0,30}", 0..5),
            (any::<bool>(), any::<u32>()),
        )
            .prop_filter_map(
                "ordered range reaching v2",
                |(a, b, t, c, f, h, s, (relay, feat))| (a <= b && b >= PROTOCOL_VERSION_MIN).then(
                    || Frame::Hello(Hello {
                        min_version: a,
                        max_version: b,
                        role: if relay { Role::RelayLink } else { Role::Agent },
                        features: feat,
                        transports: t,
                        classes: c,
                        max_frame: f,
                        heartbeat_ms: h,
                        schemas: s,
                    })
                )
            ),
        (
            any::<u16>(),
            any::<u64>(),
            arb_id(),
            arb_id(),
            any::<(u32, u32, u32, u64, u64, u8, u32)>(),
            any::<(u32, u32, u32, u32)>(),
        )
            .prop_map(
                |(v, sid, r, a, (hb, mf, re, rb, ttl, cl, rot), (feat, dw, dwb, sw))| {
                    Frame::Welcome(Welcome {
                        version: v,
                        role: Role::Agent,
                        features: feat,
                        session_id: sid,
                        relay_id: RelayId(r),
                        agent_id: AgentId(a),
                        heartbeat_ms: hb,
                        max_frame: mf,
                        rate_frames: re,
                        rate_bytes: rb,
                        max_ttl_ms: ttl,
                        classes: cl,
                        key_rotation_s: rot,
                        deliver_window: dw,
                        deliver_window_bytes: dwb,
                        send_window: sw,
                    })
                }
            ),
        (any::<u128>(), any::<bool>(), any::<u64>()).prop_map(|(id, exp, at)| Frame::Receipt(
            Receipt {
                message_id: MessageId::from_u128(id),
                status: if exp {
                    ReceiptStatus::Expired
                } else {
                    ReceiptStatus::Delivered
                },
                at_ms: at,
            }
        )),
        prop::collection::vec(any::<u64>(), 1..50)
            .prop_map(|seqs| Frame::LinkAck(LinkAck::new(seqs))),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(id, b)| {
            Frame::Publish(Publish {
                request_id: id,
                bundle: Bytes::from(b),
            })
        }),
        (
            any::<u32>(),
            arb_id(),
            "[ -~]{0,60}",
            any::<bool>(),
            any::<u16>()
        )
            .prop_map(|(id, a, schema, by_schema, limit)| Frame::Lookup(Lookup {
                request_id: id,
                key: if by_schema {
                    LookupKey::Schema {
                        schema,
                        after: AgentId(a),
                    }
                } else {
                    LookupKey::Agent(AgentId(a))
                },
                limit,
            })),
        (
            any::<(u32, u16, bool)>(),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 0..8)
        )
            .prop_map(
                |((id, code, more), bundles)| Frame::Directory(DirectoryAnswer {
                    request_id: id,
                    code,
                    more,
                    bundles: bundles.into_iter().map(Bytes::from).collect(),
                })
            ),
        (any::<u64>(), any::<u16>(), "[ -~]{0,60}")
            .prop_map(|(seq, code, text)| Frame::LinkNack(LinkNack { seq, code, text })),
        prop::collection::vec((arb_id(), arb_id(), any::<u64>()), 1..20).prop_map(|v| {
            Frame::Presence(Presence {
                entries: v
                    .into_iter()
                    .map(|(a, r, t)| PresenceEntry {
                        agent: AgentId(a),
                        relay: RelayId(r),
                        stamp_ms: t,
                    })
                    .collect(),
            })
        }),
        (any::<(u16, u16, u64, u32, u32, u32, u32)>(), arb_id()).prop_map(
            |((a, b, g, hb, mf, w, wb), r)| Frame::LinkHello(LinkHello {
                min_version: a,
                max_version: b,
                relay_id: RelayId(r),
                generation: g,
                heartbeat_ms: hb,
                max_frame: mf,
                window: w,
                window_bytes: wb,
            })
        ),
        prop::collection::vec(any::<u128>(), 1..50)
            .prop_map(|ids| Frame::Ack(AckBatch::new(ids.into_iter().map(MessageId::from_u128)))),
        (any::<u128>(), any::<u16>(), "[ -~]{0,60}").prop_map(|(id, code, text)| Frame::Nack(
            Nack {
                message_id: MessageId::from_u128(id),
                code,
                text
            }
        )),
        any::<u64>().prop_map(|t| Frame::Ping(Ping { timestamp_us: t })),
        any::<(u64, u64)>().prop_map(|(e, r)| Frame::Pong(Pong {
            echo_us: e,
            responder_us: r
        })),
        (any::<u16>(), any::<u32>(), "[ -~]{0,40}").prop_map(|(code, drain_ms, redirect)| {
            Frame::GoingAway(GoingAway {
                code,
                drain_ms,
                redirect,
            })
        }),
        (any::<u16>(), "\\PC{0,40}").prop_map(|(code, text)| Frame::Close(Close { code, text })),
    ]
}

proptest! {
    #[test]
    fn envelopes_round_trip((b, payload) in arb_builder(), hop in any::<u8>()) {
        let mut env = b.build(&payload).unwrap();
        env.routing.hop_limit = hop;
        let bytes = Frame::Envelope(env.clone()).to_bytes();
        prop_assert_eq!(bytes.len(), env.frame_len());
        let got = decode_one(&bytes).unwrap().unwrap();
        prop_assert_eq!(got, Frame::Envelope(env.clone()));
        prop_assert_eq!(&env.payload()[..], &payload[..]);
        prop_assert_eq!(env.payload_ref(), &payload[..]);
        prop_assert_eq!(env.avoid().count(), b.constraints.avoid.len());
        prop_assert_eq!(env.fallback().collect::<Vec<_>>(), b.constraints.fallback.clone());
        prop_assert_eq!(env.flags(), b.flags & flags::KNOWN);
        let ext: Vec<(u16, Vec<u8>)> = env
            .extensions()
            .map(|e| (e.kind | if e.critical { EXTENSION_CRITICAL } else { 0 }, e.value.to_vec()))
            .collect();
        prop_assert_eq!(ext, b.extensions.clone());
    }

    #[test]
    fn control_frames_round_trip(f in arb_control()) {
        let bytes = f.to_bytes();
        prop_assert_eq!(decode_one(&bytes).unwrap(), Some(f));
    }

    #[test]
    fn a_stream_split_anywhere_decodes_to_the_same_frames(
        frames in prop::collection::vec(arb_control(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut stream = BytesMut::new();
        for f in &frames { f.encode(&mut stream); }
        let stream: Bytes = stream.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len())).collect();
        points.push(stream.len());
        points.sort_unstable();
        let d = FrameDecoder::new(1 << 20);
        let (mut buf, mut got, mut from) = (BytesMut::new(), Vec::new(), 0);
        for p in points {
            buf.extend_from_slice(&stream[from..p]);
            from = p;
            while let Some(f) = d.decode(&mut buf).unwrap() { got.push(f); }
        }
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_decode_to_a_value_or_an_error(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let d = FrameDecoder::new(256);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
        prop_assert!(buf.len() <= data.len());
    }

    #[test]
    fn a_frame_decodes_the_same_with_or_without_its_length_prefix((b, payload) in arb_builder(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
        let mut bytes = Frame::Envelope(b.build(&payload).unwrap()).to_bytes().to_vec();
        for (i, v) in flips { let n = bytes.len(); bytes[4 + i.index(n - 4)] = v; }
        let whole = Frame::decode_prefixed(Bytes::from(bytes.clone()));
        let body = Frame::decode(Bytes::from(bytes[4..].to_vec()));
        let show = |r: Result<Frame, WireError>| r.map(|f| f.to_bytes());
        prop_assert_eq!(show(whole), show(body));
    }

    #[test]
    fn mutated_envelopes_never_panic((b, payload) in arb_builder(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = Frame::Envelope(b.build(&payload).unwrap()).to_bytes().to_vec();
        for (i, v) in flips { let n = bytes.len(); bytes[4 + i.index(n - 4)] = v; }
        if let Ok(Some(Frame::Envelope(e))) = decode_one(&bytes) {
            // Whatever decoded must be internally consistent.
            let _ = (e.payload(), e.schema(), e.jurisdictions().count(), e.avoid().count(), e.prefer().count());
            let _ = (e.extensions().count(), e.flags(), e.unknown_critical_extension(&[]));
        }
    }
}
