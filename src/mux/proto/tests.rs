//! Unit tests of the parent module (kept apart to keep the module short).

use super::*;

/// The body of a framed packet, checking the header.
fn body(framed: &[u8]) -> &[u8] {
    let n = body_len([framed[0], framed[1], framed[2], framed[3]]).unwrap();
    assert_eq!(n, framed.len() - 4);
    &framed[4..]
}

/// Hand-built body from u32s and strings, to test decoding of bytes
/// exactly as OpenSSH lays them out.
enum F<'a> {
    U(u32),
    S(&'a [u8]),
}

fn raw(fields: &[F<'_>]) -> Vec<u8> {
    let mut w = Writer::default();
    for f in fields {
        match f {
            F::U(v) => w.u32(*v),
            F::S(s) => w.string(s),
        };
    }
    w.buf
}

fn sample_messages() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Hello {
            version: 4,
            extensions: vec![("info".into(), b"0".to_vec())],
        },
        ClientMessage::AliveCheck { rid: 0 },
        ClientMessage::NewSession {
            rid: 1,
            session: NewSession {
                want_tty: true,
                want_x11: false,
                want_agent: true,
                subsystem: false,
                escape_char: Some(b'~'),
                term: "xterm-256color".into(),
                command: b"echo hi".to_vec(),
                env: vec![
                    ("LANG".into(), "C.UTF-8".into()),
                    ("A".into(), "b=c".into()),
                ],
            },
        },
        ClientMessage::NewStdioFwd {
            rid: 2,
            target: MuxAddr::Tcp("db.internal".into(), 5432),
        },
        ClientMessage::NewStdioFwd {
            rid: 2,
            target: MuxAddr::Unix("/run/x.sock".into()),
        },
        ClientMessage::OpenFwd {
            rid: 3,
            forward: Forward {
                kind: ForwardKind::Local,
                listen: MuxAddr::Tcp("127.0.0.1".into(), 8080),
                connect: Some(MuxAddr::Tcp("127.0.0.1".into(), 22)),
            },
        },
        ClientMessage::OpenFwd {
            rid: 4,
            forward: Forward {
                kind: ForwardKind::Remote,
                listen: MuxAddr::Tcp("".into(), 0),
                connect: Some(MuxAddr::Unix("/tmp/s".into())),
            },
        },
        ClientMessage::CloseFwd {
            rid: 5,
            forward: Forward {
                kind: ForwardKind::Dynamic,
                listen: MuxAddr::Tcp("*".into(), 1080),
                connect: None,
            },
        },
        ClientMessage::Terminate { rid: 6 },
        ClientMessage::StopListening { rid: 7 },
        ClientMessage::Proxy { rid: 8 },
        ClientMessage::ExtInfo {
            rid: 9,
            what: "connection".into(),
        },
        ClientMessage::Unknown {
            msg_type: 0x1000_0042,
            rid: 10,
        },
    ]
}

#[test]
fn client_messages_round_trip() {
    for m in sample_messages() {
        let framed = m.encode();
        assert_eq!(decode_client(body(&framed)), Ok(m.clone()), "{m:?}");
    }
}

#[test]
fn server_messages_round_trip() {
    let all = [
        ServerMessage::Hello {
            extensions: vec![("info".into(), b"0".to_vec())],
        },
        ServerMessage::Ok { rid: 1 },
        ServerMessage::PermissionDenied {
            rid: 2,
            reason: "Permission denied".into(),
        },
        ServerMessage::Failure {
            rid: 3,
            reason: "unsupported request".into(),
        },
        ServerMessage::Alive { rid: 4, pid: 4242 },
        ServerMessage::SessionOpened {
            rid: 5,
            session_id: 7,
        },
        ServerMessage::ExitMessage {
            session_id: 7,
            exit_value: 3,
        },
        ServerMessage::TtyAllocFail { session_id: 7 },
        ServerMessage::RemotePort {
            rid: 6,
            port: 40000,
        },
        ServerMessage::ExtInfo {
            rid: 8,
            ok: true,
            message: "x".into(),
        },
    ];
    for m in all {
        assert_eq!(decode_server(body(&m.encode())), Ok(m.clone()), "{m:?}");
    }
}

#[test]
fn server_encodings_match_openssh_layout() {
    assert_eq!(
        ServerMessage::Hello { extensions: vec![] }.encode(),
        [0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4]
    );
    assert_eq!(
        ServerMessage::Alive {
            rid: 1,
            pid: 0x0102
        }
        .encode(),
        [0, 0, 0, 12, 0x80, 0, 0, 5, 0, 0, 0, 1, 0, 0, 1, 2]
    );
    assert_eq!(
        ServerMessage::Failure {
            rid: 9,
            reason: "no\0tail".into()
        }
        .encode(),
        [
            0, 0, 0, 14, 0x80, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 2, b'n', b'o'
        ]
    );
}

#[test]
fn new_session_as_openssh_sends_it() {
    let b = raw(&[
        F::U(msg::NEW_SESSION),
        F::U(1),
        F::S(b""),
        F::U(0),
        F::U(0),
        F::U(0),
        F::U(0),
        F::U(0xffff_ffff),
        F::S(b"dumb"),
        F::S(b"ls -l \xff"),
        F::S(b"FOO=bar"),
        F::S(b"noequals"),
        F::S(b"=novalue"),
        F::S(b"BAD=\xff"),
        F::S(b"EMPTY="),
    ]);
    let ClientMessage::NewSession { rid, session } = decode_client(&b).unwrap() else {
        panic!("not a session");
    };
    assert_eq!(rid, 1);
    assert_eq!(session.escape_char, None);
    assert_eq!(session.term, "dumb");
    assert_eq!(session.command, b"ls -l \xff");
    assert_eq!(
        session.env,
        vec![
            ("FOO".into(), "bar".into()),
            ("EMPTY".into(), String::new())
        ]
    );
}

#[test]
fn env_is_capped() {
    let mut fields = vec![
        F::U(msg::NEW_SESSION),
        F::U(1),
        F::S(b""),
        F::U(0),
        F::U(0),
        F::U(0),
        F::U(0),
        F::U(b'~'.into()),
        F::S(b""),
        F::S(b""),
    ];
    fields.extend((0..MAX_ENV_VARS + 10).map(|_| F::S(b"A=1")));
    let ClientMessage::NewSession { session, .. } = decode_client(&raw(&fields)).unwrap() else {
        panic!("not a session");
    };
    assert_eq!(session.env.len(), MAX_ENV_VARS);
    assert_eq!(session.escape_char, Some(b'~'));
}

#[test]
fn forward_validation_mirrors_openssh() {
    let fwd = |kind, lhost: &[u8], lport, chost: &[u8], cport| {
        decode_client(&raw(&[
            F::U(msg::OPEN_FWD),
            F::U(3),
            F::U(kind),
            F::S(lhost),
            F::U(lport),
            F::S(chost),
            F::U(cport),
        ]))
    };
    let invalid = Ok(ClientMessage::Invalid {
        msg_type: msg::OPEN_FWD,
        rid: 3,
        reason: "Invalid forwarding request",
    });
    assert_eq!(fwd(9, b"", 80, b"h", 80), invalid);
    assert_eq!(fwd(3, b"/p", PORT_STREAMLOCAL, b"", 0), invalid);
    assert_eq!(fwd(1, b"", 80, b"h", 0), invalid);
    assert_eq!(fwd(1, b"", 80, b"", 80), invalid);
    assert_eq!(fwd(2, b"", 0, b"", 0), invalid);
    assert_eq!(
        fwd(1, b"", 80, b"h", 70000),
        Err(DecodeError::BadPort("connect port", 70000))
    );
    assert_eq!(
        fwd(2, b"", 65536, b"h", 1),
        Err(DecodeError::BadPort("listen port", 65536))
    );
    // Remote with connect port 0 is allowed (OpenSSH checks only -L).
    assert!(matches!(
        fwd(2, b"", 0, b"h", 0),
        Ok(ClientMessage::OpenFwd { .. })
    ));
    // Unix paths on both sides.
    let Ok(ClientMessage::OpenFwd { forward, .. }) =
        fwd(1, b"/l", PORT_STREAMLOCAL, b"/c", PORT_STREAMLOCAL)
    else {
        panic!("not a forward");
    };
    assert_eq!(forward.listen, MuxAddr::Unix("/l".into()));
    assert_eq!(forward.connect, Some(MuxAddr::Unix("/c".into())));
    assert_eq!(forward.to_string(), "-L /l:/c");
}

#[test]
fn stdio_forward_ports() {
    let stdio = |host: &[u8], port| {
        decode_client(&raw(&[
            F::U(msg::NEW_STDIO_FWD),
            F::U(2),
            F::S(b""),
            F::S(host),
            F::U(port),
        ]))
    };
    assert_eq!(
        stdio(b"h", 22),
        Ok(ClientMessage::NewStdioFwd {
            rid: 2,
            target: MuxAddr::Tcp("h".into(), 22)
        })
    );
    let bad = stdio(b"h", 70000).unwrap();
    assert!(matches!(bad, ClientMessage::Invalid { .. }));
    // The descriptors still follow and must be consumed.
    assert_eq!(bad.fds_following(), 2);
}

#[test]
fn truncated_input_is_an_error_at_every_length() {
    for m in sample_messages() {
        let framed = m.encode();
        let b = body(&framed);
        for cut in 0..b.len() {
            let r = decode_client(&b[..cut]);
            // A shorter HELLO or session may still be valid (trailing
            // pairs/env are optional); it must never panic, and a cut
            // inside the fixed fields must be an error.
            if cut < 8 {
                assert!(r.is_err(), "{m:?} cut at {cut}: {r:?}");
            }
        }
    }
    assert_eq!(
        decode_client(&[]),
        Err(DecodeError::Truncated("message type"))
    );
    assert_eq!(
        decode_client(&[0x10, 0, 0, 4, 0]),
        Err(DecodeError::Truncated("request id"))
    );
}

#[test]
fn hostile_input_never_panics() {
    // Huge string lengths, NULs, bad UTF-8, and a pseudo-random sweep.
    let huge = raw(&[F::U(msg::EXT_INFO), F::U(1), F::U(0xffff_ffff)]);
    assert_eq!(
        decode_client(&huge),
        Err(DecodeError::Truncated("EXT_INFO name"))
    );
    let nul = raw(&[F::U(msg::EXT_INFO), F::U(1), F::S(b"a\0b")]);
    assert_eq!(decode_client(&nul), Err(DecodeError::Nul("EXT_INFO name")));
    let utf = raw(&[F::U(msg::EXT_INFO), F::U(1), F::S(b"\xc3")]);
    assert_eq!(
        decode_client(&utf),
        Err(DecodeError::NotUtf8("EXT_INFO name"))
    );
    assert!(matches!(
        decode_client(&vec![0; MAX_PACKET + 1]),
        Err(DecodeError::TooLarge(_))
    ));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let types = [
        msg::HELLO,
        msg::NEW_SESSION,
        msg::NEW_STDIO_FWD,
        msg::OPEN_FWD,
        msg::CLOSE_FWD,
        msg::EXT_INFO,
    ];
    for i in 0..20_000 {
        let len = (next() % 64) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && b.len() >= 4 {
            b[..4].copy_from_slice(&types[i % types.len()].to_be_bytes());
            // Small string lengths so decoding goes deep.
            for chunk in b[4..].chunks_mut(8) {
                if chunk.len() >= 4 && next() % 2 == 0 {
                    chunk[..4].copy_from_slice(&((next() % 6) as u32).to_be_bytes());
                }
            }
        }
        let _ = decode_client(&b);
        let _ = decode_server(&b);
    }
}

#[test]
fn body_len_limit() {
    assert_eq!(body_len((MAX_PACKET as u32).to_be_bytes()), Ok(MAX_PACKET));
    assert_eq!(
        body_len((MAX_PACKET as u32 + 1).to_be_bytes()),
        Err(DecodeError::TooLarge(MAX_PACKET + 1))
    );
    assert!(body_len([0xff; 4]).is_err());
}
