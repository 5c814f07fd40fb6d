//! Unit tests of `stream.rs`.

use super::*;

#[test]
fn addresses() {
    assert_eq!(
        Addr::parse("unix:/tmp/x").unwrap(),
        Addr::Unix("/tmp/x".into())
    );
    assert_eq!(
        Addr::parse("tcp:127.0.0.1:4444").unwrap(),
        Addr::Tcp("127.0.0.1:4444".into())
    );
    for bad in ["", "unix:", "tcp:1.2.3.4", "tcp::5", "tcp:h:99999", "udp:x"] {
        assert!(Addr::parse(bad).is_err(), "{bad}");
    }
}

fn pair() -> (Conn, Conn) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (Conn::new(Box::new(a)), Conn::new(Box::new(b)))
}

#[test]
fn frames_round_trip_and_flips_are_caught() {
    let (mut a, mut b) = pair();
    let body = encode_pages(3, &[(1, Some(&[7u8; PAGE][..])), (9, None)]);
    a.send(tag::PAGES, &body).unwrap();
    let (t, got) = b.recv(MAX_PAGES_BODY).unwrap();
    assert_eq!((t, &got), (tag::PAGES, &body));
    let mut seen = Vec::new();
    let (round, n) = decode_pages(&got, 16, |i, d| {
        seen.push((i, d.map(|d| d[0])));
        Ok(())
    })
    .unwrap();
    assert_eq!((round, n), (3, 2));
    assert_eq!(seen, vec![(1, Some(7)), (9, None)]);
    assert!(decode_pages(&got, 5, |_, _| Ok(())).is_err(), "page 9 of 5");
    // Every flipped bit of a framed message is refused with one line.
    let mut framed = Vec::new();
    {
        let (mut x, mut y) = pair();
        x.send(
            tag::HELLO,
            &Hello {
                vcpus: 2,
                memory_mib: 64,
                flags: 2,
                tsc_hz: 1,
            }
            .encode(),
        )
        .unwrap();
        drop(x);
        y.io.read_to_end(&mut framed).unwrap();
    }
    for i in 0..framed.len() {
        let mut f = framed.clone();
        f[i] ^= 0x10;
        let (mut x, mut y) = pair();
        x.io.write_all(&f).unwrap();
        drop(x);
        match y.recv(MAX_CONTROL) {
            Ok(_) => panic!("byte {i} flipped and accepted"),
            Err(e) => assert!(!e.to_string().contains('\n')),
        }
    }
    // Truncations: an error, never a hang or a panic.
    for n in 0..framed.len() {
        let (mut x, mut y) = pair();
        x.io.write_all(&framed[..n]).unwrap();
        drop(x);
        assert!(y.recv(MAX_CONTROL).is_err(), "{n} bytes accepted");
    }
}

#[test]
fn preamble_refuses_foreign_and_newer() {
    let (mut a, mut b) = pair();
    a.send_preamble().unwrap();
    b.recv_preamble().unwrap();
    let (mut a, mut b) = pair();
    a.io.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    assert!(b.recv_preamble().unwrap_err().contains("bad magic"));
    let (mut a, mut b) = pair();
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    a.io.write_all(&p).unwrap();
    assert!(b.recv_preamble().unwrap_err().contains("version 2"));
}

#[test]
fn oversized_frames_are_refused_before_allocation() {
    let (mut a, mut b) = pair();
    let mut f = tag::PAGES.to_vec();
    f.extend_from_slice(&u32::MAX.to_le_bytes());
    a.io.write_all(&f).unwrap();
    let e = b.recv(MAX_PAGES_BODY).unwrap_err().to_string();
    assert!(e.contains("at most"), "{e}");
    let (mut a, mut b) = pair();
    let mut w = Writer::default();
    w.str("no room");
    a.send(tag::ERROR, &w.buf).unwrap();
    assert_eq!(b.recv(16).unwrap_err(), RecvError::Peer("no room".into()));
}
