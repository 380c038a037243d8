//! One-pass decoding of the frame enums, which are internally tagged: a frame is a map whose
//! `type` entry names the variant and whose other entries are that variant's fields.
//!
//! serde's derived decoder for such an enum first copies the whole map into a buffer of generic
//! values, looks for the tag, then decodes the variant from the buffer: an allocation, a copy and
//! a second walk per frame, on the path of every message. Every encoder of ours writes `type`
//! first, so when a frame's bytes start with a map whose first key is `type` ([`type_first`]),
//! [`deserialize_tagged`] reads the tag and decodes the variant straight from the rest of the map.
//! Any other frame (the tag further in, an escaped key, an array) goes to the derived decoder,
//! which stays the type's `Deserialize`, so both paths accept and refuse the same frames.
//!
//! The one-pass path decodes the variant with serde's derive too, in the externally tagged form,
//! through a remote definition that the crate's `tagged_enum!` macro makes from the same enum
//! body, so the fields and their attributes are written once.

use crate::codec::Encoding;
use serde::de::value::{MapAccessDeserializer, StrDeserializer};
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, VariantAccess, Visitor,
};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

/// Defines a frame enum: internally tagged by `type` (snake_case variant names) both ways, plus
/// the one-pass decoder of [`deserialize_tagged`]. `$remote` is the enum's name as a string
/// literal, and `$shadow` names the private remote definition serde derives that decoder from.
macro_rules! tagged_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident (remote $remote:literal, decoder $shadow:ident) { $($body:tt)* }
    ) => {
        $(#[$meta])*
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        $vis enum $name { $($body)* }

        #[derive(serde::Deserialize)]
        #[serde(remote = $remote, rename_all = "snake_case")]
        #[allow(dead_code)]
        enum $shadow { $($body)* }

        impl $crate::tagged::ByVariant for $name {
            fn deserialize_variant<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<Self, D::Error> {
                $shadow::deserialize(d)
            }
        }
    };
}
pub(crate) use tagged_enum;

/// An enum whose variant can be decoded once its tag is known: the externally tagged form, as
/// serde derives it.
pub trait ByVariant: Sized {
    fn deserialize_variant<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

/// Whether `bytes` are a map whose first key is `type`, spelled plainly: a frame that
/// [`deserialize_tagged`] can decode in one pass.
pub fn type_first(bytes: &[u8], encoding: Encoding) -> bool {
    match encoding {
        Encoding::Json => {
            let rest = skip_space(bytes);
            rest.first() == Some(&b'{') && skip_space(&rest[1..]).starts_with(b"\"type\"")
        }
        Encoding::MsgPack => {
            // fixmap, map 16 or map 32, then the fixstr "type".
            let key_at = match bytes.first() {
                Some(0x80..=0x8f) => 1,
                Some(0xde) => 3,
                Some(0xdf) => 5,
                _ => return false,
            };
            bytes.get(key_at..key_at + 5) == Some(&b"\xa4type"[..])
        }
    }
}

fn skip_space(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &b[n..]
}

/// Decodes an internally tagged enum whose first key is `type` (see [`type_first`]).
pub fn deserialize_tagged<'de, D: Deserializer<'de>, T: ByVariant>(d: D) -> Result<T, D::Error> {
    d.deserialize_map(TaggedVisitor(PhantomData))
}

struct TaggedVisitor<T>(PhantomData<T>);

impl<'de, T: ByVariant> Visitor<'de> for TaggedVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a frame: a map with a `type` entry first")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        match map.next_key::<Key<'de>>()? {
            Some(k) if k.as_str() == "type" => {}
            _ => return Err(de::Error::missing_field("type")),
        }
        let tag = map.next_value::<Key<'de>>()?;
        T::deserialize_variant(Tagged {
            tag,
            rest: MapAccessDeserializer::new(map),
        })
    }
}

/// A map key or tag: borrowed from the input where the format allows, owned otherwise.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// The variant named by `tag`, with its fields in `rest`, presented to the derived decoder as an
/// externally tagged enum.
struct Tagged<'de, R> {
    tag: Key<'de>,
    rest: R,
}

impl<'de, R: Deserializer<'de>> Deserializer<'de> for Tagged<'de, R> {
    type Error = R::Error;

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, R::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, R::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

impl<'de, R: Deserializer<'de>> EnumAccess<'de> for Tagged<'de, R> {
    type Error = R::Error;
    type Variant = Fields<R>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Fields<R>), R::Error> {
        let variant = seed.deserialize(StrDeserializer::<R::Error>::new(self.tag.as_str()))?;
        Ok((variant, Fields(self.rest)))
    }
}

/// The fields of the variant: the rest of the frame.
struct Fields<R>(R);

impl<'de, R: Deserializer<'de>> VariantAccess<'de> for Fields<R> {
    type Error = R::Error;

    fn unit_variant(self) -> Result<(), R::Error> {
        // Unknown entries are ignored, as for every other frame.
        IgnoredAny::deserialize(self.0).map(|_| ())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, R::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, R::Error> {
        self.0.deserialize_any(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, R::Error> {
        self.0.deserialize_struct("", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{decode_client, decode_server, Encoding};
    use crate::frame::{ClientFrame, Message, ServerFrame};
    use serde_json::json;

    fn send() -> ClientFrame {
        ClientFrame::Send {
            conv: Some("team".into()),
            to: None,
            cmid: "c1".into(),
            body: "hi".into(),
            reply_to: Some(3),
        }
    }

    fn msgpack(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    #[test]
    fn the_tag_may_come_anywhere_in_the_map() {
        let v = json!({"conv": "team", "cmid": "c1", "type": "send", "body": "hi", "reply_to": 3});
        let text = serde_json::to_vec(&v).unwrap();
        assert_eq!(decode_client(&text, Encoding::Json).unwrap(), send());
        assert_eq!(
            decode_client(&msgpack(&v), Encoding::MsgPack).unwrap(),
            send()
        );
        let last = br#"{"seq":1,"conv":"team","from":"a","device":"d","cmid":"c","body":"b","ts":5,"type":"msg"}"#;
        assert_eq!(
            decode_server(last, Encoding::Json).unwrap(),
            ServerFrame::Msg(
                Message {
                    conv: "team".into(),
                    seq: 1,
                    from: "a".into(),
                    device: "d".into(),
                    cmid: "c".into(),
                    body: "b".into(),
                    reply_to: None,
                    ts: 5,
                    event: None,
                }
                .into()
            )
        );
    }

    #[test]
    fn escaped_keys_and_tags_decode() {
        let f = decode_client(
            br#"{"\u0074ype":"sen\u0064","cmid":"c1","conv":"team","body":"hi","reply_to":3}"#,
            Encoding::Json,
        )
        .unwrap();
        assert_eq!(f, send());
    }

    #[test]
    fn unknown_fields_are_ignored_in_every_variant() {
        let f = decode_client(
            br#"{"type":"convs","since":4,"x":[1,{"y":2}]}"#,
            Encoding::Json,
        );
        assert_eq!(
            f.unwrap(),
            ClientFrame::Convs {
                after: None,
                limit: None
            }
        );
        let v = json!({"type": "ping", "nonce": 7, "extra": {"a": 1}});
        assert_eq!(
            decode_client(&msgpack(&v), Encoding::MsgPack).unwrap(),
            ClientFrame::Ping { nonce: Some(7) }
        );
        let v = json!({"extra": true, "type": "convs"});
        assert_eq!(
            decode_client(&msgpack(&v), Encoding::MsgPack).unwrap(),
            ClientFrame::Convs {
                after: None,
                limit: None
            }
        );
    }

    #[test]
    fn an_array_with_the_tag_first_decodes() {
        let bytes = rmp_serde::to_vec(&("read", "team", 9u64)).unwrap();
        assert_eq!(
            decode_client(&bytes, Encoding::MsgPack).unwrap(),
            ClientFrame::Read {
                conv: "team".into(),
                seq: 9
            }
        );
    }

    #[test]
    fn bad_tags_are_clear_errors() {
        let cases: [(&[u8], &str); 7] = [
            (br#"{}"#, "missing field `type`"),
            (br#"{"cmid":"c1"}"#, "missing field `type`"),
            (br#"{"type":"nope"}"#, "unknown variant `nope`"),
            (br#"{"cmid":"c1","type":"nope"}"#, "unknown variant `nope`"),
            (br#"{"type":5}"#, "expected a string"),
            (br#"{"cmid":"c1","type":5}"#, "expected variant identifier"),
            (br#""send""#, "invalid type"),
        ];
        for (bytes, want) in cases {
            let e = decode_client(bytes, Encoding::Json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(bytes));
        }
        let e = decode_client(
            br#"{"type":"send","conv":"team","body":"hi"}"#,
            Encoding::Json,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing field `cmid`"), "{e}");
        let e = decode_client(&msgpack(&json!([])), Encoding::MsgPack)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `type`"), "{e}");
        assert!(decode_client(br#"{"type":"ping"} x"#, Encoding::Json).is_err());
    }

    #[test]
    fn both_paths_refuse_repeated_fields() {
        for frame in [
            &br#"{"type":"send","conv":"a","cmid":"x","body":"b","conv":"b"}"#[..],
            br#"{"conv":"a","type":"send","cmid":"x","body":"b","conv":"b"}"#,
        ] {
            let e = decode_client(frame, Encoding::Json)
                .unwrap_err()
                .to_string();
            assert!(e.contains("duplicate field `conv`"), "{e}");
        }
    }

    #[test]
    fn binary_values_in_unknown_fields_are_ignored_wherever_the_tag_is() {
        // {"type":"send", ..., "att": <bin 01 02>} with `type` first and last.
        for type_first in [true, false] {
            let mut entries = vec![
                ("conv", Bin::Str("team")),
                ("cmid", Bin::Str("c1")),
                ("body", Bin::Str("hi")),
                ("reply_to", Bin::U(3)),
                ("att", Bin::Bytes(&[1, 2])),
            ];
            if type_first {
                entries.insert(0, ("type", Bin::Str("send")));
            } else {
                entries.push(("type", Bin::Str("send")));
            }
            let bytes = raw_map(&entries);
            assert_eq!(
                crate::tagged::type_first(&bytes, Encoding::MsgPack),
                type_first
            );
            assert_eq!(decode_client(&bytes, Encoding::MsgPack).unwrap(), send());
        }
    }

    /// A MessagePack value, written by hand so that binary values can be put in a frame.
    enum Bin<'a> {
        Str(&'a str),
        U(u8),
        Bytes(&'a [u8]),
    }

    fn raw_map(entries: &[(&str, Bin)]) -> Vec<u8> {
        let mut out = vec![0x80 | entries.len() as u8];
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.push(0xa0 | s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        for (k, v) in entries {
            put_str(&mut out, k);
            match v {
                Bin::Str(s) => put_str(&mut out, s),
                Bin::U(n) => out.push(*n),
                Bin::Bytes(b) => {
                    out.extend_from_slice(&[0xc4, b.len() as u8]);
                    out.extend_from_slice(b);
                }
            }
        }
        out
    }
}
