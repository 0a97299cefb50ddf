//! The relay's record layer against a real rustls client, in memory: handshake, data both ways
//! (including a client's frames pipelined behind its Finished), KeyUpdates both ways, close_notify,
//! and a tampered record.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use super::handshake::{Established, Handshake};
use super::record::{Opened, RecordError, RecordLayer, MAX_PLAINTEXT, OVERHEAD};
use super::{client_config, server_config};
use crate::pki::{CertAuthority, Identity};
use crate::policy::AdmissionMode;

struct Pair {
    client: ClientConnection,
    server: Established,
    /// Ciphertext from the client the server has not consumed.
    to_server: Vec<u8>,
}

fn client_to_vec(c: &mut ClientConnection) -> Vec<u8> {
    let mut v = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut v).unwrap();
    }
    v
}

fn feed_client(c: &mut ClientConnection, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        c.read_tls(&mut bytes).unwrap();
        c.process_new_packets().unwrap();
    }
}

fn connect(first_data: &[u8]) -> Pair {
    let ca = CertAuthority::generate("test ca").unwrap();
    let relay = ca.issue_relay("relay", &["localhost".into()]).unwrap();
    let mut scfg = (*server_config(&relay, AdmissionMode::Open, &[]).unwrap()).clone();
    scfg.enable_secret_extraction = true;
    let agent = Identity::generate_self_signed("agent").unwrap();
    let ccfg = client_config(&agent, std::slice::from_ref(&ca.cert)).unwrap();
    let mut client =
        ClientConnection::new(ccfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hs = Handshake::server(Arc::new(scfg)).unwrap();
    let mut to_server = client_to_vec(&mut client);
    let mut sent_first = false;
    for _ in 0..20 {
        let mut out = Vec::new();
        let n = hs.advance(&mut to_server, &mut out).unwrap();
        to_server.drain(..n);
        feed_client(&mut client, &out);
        if !client.is_handshaking() && !sent_first {
            // The client pipelines application data right behind its Finished.
            client.writer().write_all(first_data).unwrap();
            sent_first = true;
        }
        to_server.extend(client_to_vec(&mut client));
        if hs.is_done() {
            break;
        }
    }
    assert!(hs.is_done(), "handshake completes");
    let server = hs.finish().unwrap();
    assert_eq!(server.peer_certificates[0], agent.chain[0]);
    assert_eq!(server.alpn.as_deref(), Some(super::ALPN));
    Pair {
        client,
        server,
        to_server,
    }
}

/// Opens every complete record in `buf`, returns the application data and how records ended.
fn open_all(records: &mut RecordLayer, buf: &mut Vec<u8>) -> (Vec<u8>, Vec<Opened>) {
    let (mut data, mut kinds, mut at) = (Vec::new(), Vec::new(), 0);
    while let Some(n) = RecordLayer::record_len(&buf[at..]).unwrap() {
        let rec = &mut buf[at..at + n];
        let opened = records.open(rec).unwrap();
        if let Opened::Data(r) = &opened {
            data.extend_from_slice(&rec[r.clone()]);
        }
        kinds.push(opened);
        at += n;
    }
    buf.drain(..at);
    (data, kinds)
}

fn read_client(c: &mut ClientConnection) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = c.reader().read_to_end(&mut v);
    v
}

#[test]
fn data_flows_both_ways_through_the_relays_record_layer() {
    let mut p = connect(b"HELLO frames pipelined behind Finished");
    let (data, _) = open_all(&mut p.server.records, &mut p.to_server);
    let mut got = p.server.early_plaintext.clone();
    got.extend(data);
    assert_eq!(&got[..], b"HELLO frames pipelined behind Finished");

    // Server to client: a big slice sealed from where it lies, then a tail.
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut tail = Vec::with_capacity(64);
    tail.extend_from_slice(b"tail bytes");
    let mut out = vec![0u8; 64 << 10];
    let n = p
        .server
        .records
        .sealer()
        .seal(&mut out, &big, &mut tail)
        .unwrap();
    assert_eq!(n, OVERHEAD + big.len() + tail.len());
    assert_eq!(&tail[..], b"tail bytes", "tail given back as it was");
    feed_client(&mut p.client, &out[..n]);
    let mut want = big.clone();
    want.extend_from_slice(b"tail bytes");
    assert_eq!(read_client(&mut p.client), want);

    // Client to server, many records in one buffer.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    for chunk in payload.chunks(20_000) {
        p.client.writer().write_all(chunk).unwrap();
        p.to_server.extend(client_to_vec(&mut p.client));
    }
    let (data, _) = open_all(&mut p.server.records, &mut p.to_server);
    assert_eq!(data, payload);
}

#[test]
fn key_updates_both_ways() {
    let mut p = connect(b"x");
    open_all(&mut p.server.records, &mut p.to_server);
    for round in 0..3u8 {
        // The client rotates its keys (and rustls asks the relay to rotate too).
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer().write_all(&[round; 300]).unwrap();
        p.to_server.extend(client_to_vec(&mut p.client));
        let (data, kinds) = open_all(&mut p.server.records, &mut p.to_server);
        assert_eq!(data, vec![round; 300]);
        assert!(kinds.contains(&Opened::Control), "a KeyUpdate arrived");
        // The relay's next record carries its own KeyUpdate first if one was asked for; the
        // relay also rotates on its own.
        let mut out = vec![0u8; 4096];
        let mut n = p.server.records.sealer().key_update(&mut out).unwrap();
        let mut tail = Vec::with_capacity(32);
        tail.extend_from_slice(&[round + 100; 20]);
        n += p
            .server
            .records
            .sealer()
            .seal(&mut out[n..], &[], &mut tail)
            .unwrap();
        assert!(!p.server.records.sealer().owes_key_update());
        feed_client(&mut p.client, &out[..n]);
        assert_eq!(read_client(&mut p.client), vec![round + 100; 20]);
    }
}

#[test]
fn split_halves_answer_a_requested_key_update_on_the_next_record() {
    let mut p = connect(b"x");
    open_all(&mut p.server.records, &mut p.to_server);
    let Pair {
        mut client,
        server,
        mut to_server,
    } = p;
    let (mut opener, mut sealer) = server.records.split();
    for round in 0..2u8 {
        // rustls sends a KeyUpdate that asks the peer to update too.
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(&[round; 50]).unwrap();
        to_server.extend(client_to_vec(&mut client));
        assert!(!sealer.owes_key_update());
        let mut kinds = Vec::new();
        let mut at = 0;
        while let Some(n) = RecordLayer::record_len(&to_server[at..]).unwrap() {
            kinds.push(opener.open(&mut to_server[at..at + n]).unwrap());
            at += n;
        }
        to_server.drain(..at);
        assert!(kinds.contains(&Opened::Control), "a KeyUpdate arrived");
        // The opener's half saw the request; the sealer's half owes the answer and sends it
        // in front of its next data, unasked.
        assert!(sealer.owes_key_update());
        let mut out = vec![0u8; 4096];
        let mut tail = Vec::with_capacity(32);
        tail.extend_from_slice(&[round + 100; 20]);
        let n = sealer.seal(&mut out, &[], &mut tail).unwrap();
        assert!(!sealer.owes_key_update());
        assert_eq!(
            n,
            2 * OVERHEAD + 5 + 20,
            "a KeyUpdate record, then the data"
        );
        feed_client(&mut client, &out[..n]);
        assert_eq!(read_client(&mut client), vec![round + 100; 20]);
    }
}

#[test]
fn close_notify_and_tampering() {
    let mut p = connect(b"x");
    open_all(&mut p.server.records, &mut p.to_server);
    // A flipped ciphertext byte does not authenticate.
    p.client.writer().write_all(b"secret").unwrap();
    let mut rec = client_to_vec(&mut p.client);
    rec[7] ^= 1;
    let n = RecordLayer::record_len(&rec).unwrap().unwrap();
    assert!(matches!(
        p.server.records.open(&mut rec[..n]),
        Err(RecordError::Decrypt)
    ));

    let mut p = connect(b"x");
    open_all(&mut p.server.records, &mut p.to_server);
    p.client.send_close_notify();
    p.to_server.extend(client_to_vec(&mut p.client));
    let (_, kinds) = open_all(&mut p.server.records, &mut p.to_server);
    assert_eq!(kinds, vec![Opened::PeerClosed]);
    let mut out = vec![0u8; 256];
    let n = p.server.records.sealer().close_notify(&mut out).unwrap();
    p.client.read_tls(&mut &out[..n]).unwrap();
    let st = p.client.process_new_packets().unwrap();
    assert!(st.peer_has_closed());
}

#[test]
fn record_headers_are_checked_before_the_body_is_buffered() {
    type R = RecordLayer;
    assert!(matches!(R::record_len(&[23, 3, 3]), Ok(None)));
    assert!(matches!(
        R::record_len(&[22, 3, 3, 0, 40]),
        Err(RecordError::BadHeader)
    ));
    let too_long = (MAX_PLAINTEXT + 257) as u16;
    let h = too_long.to_be_bytes();
    assert!(matches!(
        R::record_len(&[23, 3, 3, h[0], h[1]]),
        Err(RecordError::BadHeader)
    ));
    assert!(matches!(R::record_len(&[23, 3, 3, 0, 40, 1, 2]), Ok(None)));
}

/// Runs a handshake between rustls connections in memory; the first error either side raises.
fn link_handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    name: String,
) -> Result<(), rustls::Error> {
    let mut c = ClientConnection::new(client, ServerName::try_from(name).unwrap())?;
    let mut s = rustls::ServerConnection::new(server)?;
    for _ in 0..8 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn a_link_admits_fleet_relays_only() {
    use super::{link_client_config, link_server_config};
    use crate::pki::relay_link_name;
    let fleet = CertAuthority::generate("fleet CA").unwrap();
    let a = fleet.issue_fleet_relay("relay a", &[]).unwrap();
    let b = fleet
        .issue_fleet_relay("relay b", &["127.0.0.1".into()])
        .unwrap();
    let ca = [fleet.cert.clone()];
    let server = link_server_config(&b, &ca).unwrap();
    let b_name = relay_link_name(&b.relay_id());
    // Two relays of the fleet.
    link_handshake(
        link_client_config(&a, &ca).unwrap(),
        server.clone(),
        b_name.clone(),
    )
    .unwrap();
    // An agent certificate of the same CA: refused by the listener.
    let agent = fleet.issue_agent("agent").unwrap();
    let e = link_handshake(
        link_client_config(&agent, &ca).unwrap(),
        server.clone(),
        b_name.clone(),
    )
    .unwrap_err();
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    // A relay certificate of another CA: refused.
    let other = CertAuthority::generate("other CA").unwrap();
    let stranger = other.issue_fleet_relay("stranger", &[]).unwrap();
    let e = link_handshake(
        link_client_config(&stranger, &ca).unwrap(),
        server.clone(),
        b_name.clone(),
    )
    .unwrap_err();
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    // The dialler checks it reached the relay it dialled: b's certificate does not name a.
    let e = link_handshake(
        link_client_config(&a, &ca).unwrap(),
        server.clone(),
        relay_link_name(&a.relay_id()),
    )
    .unwrap_err();
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    // A listener whose certificate has no relay role (an agent's): the dialler refuses it.
    let fake = fleet
        .issue_relay("not a fleet relay", std::slice::from_ref(&b_name))
        .unwrap();
    let e = link_handshake(
        link_client_config(&a, &ca).unwrap(),
        link_server_config(&fake, &ca).unwrap(),
        b_name,
    )
    .unwrap_err();
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
}
