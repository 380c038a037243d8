//! The two encodings of one frame model: JSON in WebSocket text frames, MessagePack (a map with
//! the same field names as the JSON) in binary frames. A server answers in the encoding the
//! client's last frame used; the first frames use the encoding picked at connect time.

use crate::frame::{ClientFrame, ServerFrame};
use crate::tagged::{deserialize_tagged, type_first, ByVariant};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Json,
    MsgPack,
}

/// Why a frame could not be decoded, in words fit for the `error` frame sent back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid MessagePack frame: {0}")]
    MsgPack(#[from] rmp_serde::decode::Error),
}

/// One encoded frame, ready to be sent as a text or a binary WebSocket message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Encoded {
    Text(String),
    Binary(Vec<u8>),
}

impl Encoded {
    pub fn len(&self) -> usize {
        match self {
            Encoded::Text(s) => s.len(),
            Encoded::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A scratch buffer kept past this size after encoding a large frame (a big `synced` page) is
/// given back rather than held by the thread.
const SCRATCH_KEPT: usize = 64 << 10;

thread_local! {
    /// Where frames are encoded before they are copied out at their exact size.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Encodes any frame. Encoding our own frame types cannot fail (no maps with non-string keys,
/// no unsupported types), so failures are reported as a generic internal error frame instead of
/// a panic, to keep every server path panic-free.
///
/// The frame is written into a per-thread scratch buffer and copied out at its exact size: a
/// buffer without spare capacity becomes a WebSocket message's shared bytes without a further
/// allocation, and the scratch buffer never grows step by step again after the first frames.
pub fn encode<T: Serialize>(frame: &T, encoding: Encoding) -> Encoded {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let out = encode_into(&mut buf, frame, encoding);
            if buf.capacity() > SCRATCH_KEPT {
                *buf = Vec::new();
            }
            out
        }
        // Only if encoding a frame encoded another one on the same thread.
        Err(_) => encode_into(&mut Vec::new(), frame, encoding),
    })
}

fn encode_into<T: Serialize>(buf: &mut Vec<u8>, frame: &T, encoding: Encoding) -> Encoded {
    match encoding {
        Encoding::Json => match serde_json::to_writer(&mut *buf, frame)
            .map_err(|e| e.to_string())
            .and_then(|()| String::from_utf8(buf.to_vec()).map_err(|e| e.to_string()))
        {
            Ok(s) => Encoded::Text(s),
            Err(e) => Encoded::Text(format!(
                "{{\"type\":\"error\",\"code\":\"internal\",\"message\":\"encoding failed: {}\"}}",
                e.replace('"', "'")
            )),
        },
        Encoding::MsgPack => match rmp_serde::encode::write_named(&mut *buf, frame) {
            Ok(()) => Encoded::Binary(buf.to_vec()),
            Err(_) => Encoded::Binary(Vec::new()),
        },
    }
}

pub fn decode_client(bytes: &[u8], encoding: Encoding) -> Result<ClientFrame, DecodeError> {
    decode(bytes, encoding)
}

pub fn decode_server(bytes: &[u8], encoding: Encoding) -> Result<ServerFrame, DecodeError> {
    decode(bytes, encoding)
}

/// A frame with `type` first is decoded in one pass; any other goes through the derived decoder
/// (see [`crate::tagged`]).
fn decode<T: serde::de::DeserializeOwned + ByVariant>(
    bytes: &[u8],
    encoding: Encoding,
) -> Result<T, DecodeError> {
    let fast = type_first(bytes, encoding);
    Ok(match encoding {
        Encoding::Json if fast => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let frame = deserialize_tagged(&mut de)?;
            de.end()?;
            frame
        }
        Encoding::Json => serde_json::from_slice(bytes)?,
        Encoding::MsgPack if fast => {
            deserialize_tagged(&mut rmp_serde::Deserializer::from_read_ref(bytes))?
        }
        Encoding::MsgPack => rmp_serde::from_slice(bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::*;
    use crate::{ErrorCode, Limits};
    use proptest::prelude::*;

    fn roundtrip_server(f: &ServerFrame) {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = match encode(f, enc) {
                Encoded::Text(s) => s.into_bytes(),
                Encoded::Binary(b) => b,
            };
            assert_eq!(&decode_server(&bytes, enc).unwrap(), f, "{enc:?}");
        }
    }

    fn roundtrip_client(f: &ClientFrame) {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = match encode(f, enc) {
                Encoded::Text(s) => s.into_bytes(),
                Encoded::Binary(b) => b,
            };
            assert_eq!(&decode_client(&bytes, enc).unwrap(), f, "{enc:?}");
        }
    }

    /// Message 1 of conversation `team`, from alice's phone.
    fn sample_message(body: &str) -> Message {
        Message {
            conv: "team".into(),
            seq: 1,
            from: "alice".into(),
            device: "phone".into(),
            cmid: "c1".into(),
            body: body.into(),
            reply_to: None,
            ts: 5,
            event: None,
        }
    }

    #[test]
    fn json_shapes_match_the_spec() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"send","conv":"team","cmid":"c1","body":"hi","extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Send {
                conv: Some("team".into()),
                to: None,
                cmid: "c1".into(),
                body: "hi".into(),
                reply_to: None
            }
        );
        let f: ClientFrame = serde_json::from_str(r#"{"type":"convs"}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Convs {
                after: None,
                limit: None
            }
        );
        let s = serde_json::to_string(&ServerFrame::Notify {
            conv: "team".into(),
            max_seq: 7,
        })
        .unwrap();
        assert_eq!(s, r#"{"type":"notify","conv":"team","max_seq":7}"#);
        let s = serde_json::to_string(&ServerFrame::Msg(sample_message("hi").into())).unwrap();
        assert_eq!(
            s,
            r#"{"type":"msg","conv":"team","seq":1,"from":"alice","device":"phone","cmid":"c1","body":"hi","ts":5}"#
        );
    }

    #[test]
    fn frames_are_encoded_at_their_exact_size_large_or_small() {
        let big = ServerFrame::Msg(sample_message(&"x".repeat(200 << 10)).into());
        let small = ServerFrame::Notify {
            conv: "team".into(),
            max_seq: 7,
        };
        for f in [&big, &small, &big, &small] {
            roundtrip_server(f);
            match encode(f, Encoding::MsgPack) {
                Encoded::Binary(b) => assert_eq!(b.len(), b.capacity()),
                other => panic!("{other:?}"),
            }
            match encode(f, Encoding::Json) {
                Encoded::Text(t) => assert_eq!(t.len(), t.capacity()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_client(b"{", Encoding::Json).is_err());
        assert!(decode_client(br#"{"type":"nope"}"#, Encoding::Json).is_err());
        assert!(decode_client(&[0xc1, 0xff, 0x00], Encoding::MsgPack).is_err());
        assert!(decode_client(b"", Encoding::MsgPack).is_err());
    }

    #[test]
    fn fixed_frames_roundtrip() {
        roundtrip_server(&ServerFrame::Welcome {
            user: "u".into(),
            device: "d".into(),
            protocol: 1,
            server_time: 9,
            limits: Limits::default(),
        });
        roundtrip_server(&ServerFrame::rejected(
            "c",
            ErrorCode::RateLimited,
            "slow",
            Some(5),
        ));
        roundtrip_server(&ServerFrame::Convs {
            conversations: vec![ConvInfo {
                conv: "g".into(),
                kind: ConvKind::Group,
                epoch: 3,
                max_seq: 4,
                first_seq: 1,
                delivered: 2,
                read: 1,
                member_count: 1,
                others_delivered: 4,
                others_read: 4,
                name: Some("The team".into()),
                members: vec![MemberPosition {
                    user: "a".into(),
                    delivered: 4,
                    read: 4,
                }],
            }],
            has_more: true,
        });
        roundtrip_server(&ServerFrame::Pong {
            nonce: None,
            server_time: 1,
        });
        roundtrip_client(&ClientFrame::Convs {
            after: None,
            limit: None,
        });
        roundtrip_client(&ClientFrame::Convs {
            after: Some("g".into()),
            limit: Some(10),
        });
        roundtrip_client(&ClientFrame::Ping { nonce: Some(1) });
    }

    fn id() -> impl Strategy<Value = String> {
        "[a-z0-9_]{1,12}"
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            id(),
            any::<u64>(),
            id(),
            id(),
            id(),
            any::<String>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            proptest::option::of(event()),
        )
            .prop_map(
                |(conv, seq, from, device, cmid, body, reply_to, ts, event)| Message {
                    conv,
                    seq,
                    from,
                    device,
                    cmid,
                    body,
                    reply_to,
                    ts,
                    event,
                },
            )
    }

    fn event() -> impl Strategy<Value = ConvEvent> {
        let users = || proptest::collection::vec(id(), 0..4);
        prop_oneof![
            users().prop_map(|users| ConvEvent::Joined { users }),
            users().prop_map(|users| ConvEvent::Left { users }),
            users().prop_map(|users| ConvEvent::Removed { users }),
            any::<String>().prop_map(|name| ConvEvent::Renamed { name }),
        ]
    }

    proptest! {
        #[test]
        fn client_frames_roundtrip(
            conv in proptest::option::of(id()), to in proptest::option::of(id()),
            cmid in id(), body in any::<String>(), reply_to in proptest::option::of(any::<u64>()),
            seq in any::<u64>(), limit in proptest::option::of(any::<u32>()),
        ) {
            roundtrip_client(&ClientFrame::Send { conv: conv.clone(), to, cmid, body, reply_to });
            roundtrip_client(&ClientFrame::Ack { acks: vec![Position { conv: id_or(&conv), seq }] });
            roundtrip_client(&ClientFrame::Read { conv: id_or(&conv), seq });
            roundtrip_client(&ClientFrame::Sync { conv: id_or(&conv), after: seq, limit });
        }

        #[test]
        fn server_frames_roundtrip(m in message(), more in any::<bool>(), epoch in any::<u64>()) {
            roundtrip_server(&ServerFrame::Msg(m.clone().into()));
            roundtrip_server(&ServerFrame::Accepted { cmid: m.cmid.clone(), conv: m.conv.clone(), seq: m.seq, ts: m.ts });
            roundtrip_server(&ServerFrame::Synced {
                conv: m.conv.clone(), epoch, messages: vec![m.clone(), m.clone()],
                has_more: more, first_seq: 1, max_seq: m.seq,
            });
            roundtrip_server(&ServerFrame::Receipt { conv: m.conv, user: m.from, delivered: m.seq, read: epoch });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_client(&bytes, Encoding::Json);
            let _ = decode_client(&bytes, Encoding::MsgPack);
        }
    }

    fn id_or(c: &Option<String>) -> String {
        c.clone().unwrap_or_else(|| "c".into())
    }
}
