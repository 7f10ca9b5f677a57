//! Property tests over the frame reader and message decoders: arbitrary bytes never panic
//! or over-allocate, and every well-formed message round-trips. (A cargo-fuzz target over
//! the same entry points lives in `protocol/fuzz`.)

use hearth_protocol::exec::{ExecRequest, StdioMode, WinSize};
use hearth_protocol::files::WriteOptions;
use hearth_protocol::frame::{encode, FrameReader};
use hearth_protocol::{
    ClientMsg, Hello, Open, OpenReply, Opened, Request, ServerMsg, StreamTarget,
};
use proptest::prelude::*;

fn decode_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = FrameReader::new(bytes);
        // Stops at the first error or at EOF; must never panic.
        while let Ok(Some(_)) = r.read::<T>().await {}
    });
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        Just(Request::Info),
        (
            proptest::collection::vec(".{0,12}", 0..4),
            any::<Option<u32>>(),
            any::<bool>(),
            any::<Option<(u16, u16)>>()
        )
            .prop_map(|(argv, uid, detached, pty)| Request::Exec(ExecRequest {
                argv,
                uid,
                detached,
                pty: pty.map(|(rows, cols)| WinSize { rows, cols }),
                stdio: StdioMode::Stream,
                ..Default::default()
            })),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(exec_id, data)| Request::ExecInput { exec_id, data }),
        (".{0,20}", any::<bool>()).prop_map(|(path, follow)| Request::Stat { path, follow }),
    ]
}

fn arb_stream_target() -> impl Strategy<Value = StreamTarget> {
    prop_oneof![
        any::<u64>().prop_map(|exec_id| StreamTarget::ExecStdio { exec_id }),
        (".{0,40}", any::<u64>(), any::<Option<u64>>())
            .prop_map(|(path, offset, len)| StreamTarget::FileRead { path, offset, len }),
        (".{0,40}", any::<Option<u64>>()).prop_map(|(path, expected_len)| {
            StreamTarget::FileWrite {
                path,
                opts: WriteOptions {
                    expected_len,
                    ..Default::default()
                },
            }
        }),
        any::<u16>().prop_map(|port| StreamTarget::Port { port }),
        ("[a-z]{0,12}", any::<u16>())
            .prop_map(|(service, instance)| StreamTarget::Kit { service, instance }),
    ]
}

/// A frame's body, without its length prefix.
fn body<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    encode(msg).unwrap()[4..].to_vec()
}

/// Postcard writes an enum's variant index first. Appending variants keeps the old
/// indices; these pin them, so a reorder or an insertion in the middle fails here
/// instead of on a mixed host/agent pair.
#[test]
fn stream_variant_tags_are_append_only() {
    let targets = [
        StreamTarget::ExecStdio { exec_id: 0 },
        StreamTarget::FileRead {
            path: String::new(),
            offset: 0,
            len: None,
        },
        StreamTarget::FileWrite {
            path: String::new(),
            opts: WriteOptions::default(),
        },
        StreamTarget::Port { port: 8080 },
        StreamTarget::Kit {
            service: "files".into(),
            instance: 1,
        },
    ];
    let tags: Vec<u8> = targets.iter().map(|t| body(t)[0]).collect();
    assert_eq!(tags, [0, 1, 2, 3, 4]);
    let opened = [
        Opened::Rpc,
        Opened::FileRead { len: 0 },
        Opened::FileWrite,
        Opened::ExecStdio,
        Opened::Port,
        Opened::Kit,
    ];
    // `Ok` is tag 0 of `Result`; the `Opened` tag follows it.
    let tags: Vec<u8> = opened
        .into_iter()
        .map(|o| body(&OpenReply::Ok(o))[1])
        .collect();
    assert_eq!(tags, [0, 1, 2, 3, 4, 5]);
    // A whole port open, byte for byte: Stream (1), Port (3), 8080 as a varint.
    assert_eq!(
        body(&Open::Stream(StreamTarget::Port { port: 8080 })),
        [1, 3, 0x90, 0x3f]
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all::<ClientMsg>(&bytes);
        decode_all::<ServerMsg>(&bytes);
        decode_all::<Hello>(&bytes);
        decode_all::<Open>(&bytes);
    }

    #[test]
    fn framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        decode_all::<ClientMsg>(&bytes);
        decode_all::<ServerMsg>(&bytes);
        decode_all::<Open>(&bytes);
    }

    #[test]
    fn requests_round_trip(id in any::<u64>(), req in arb_request()) {
        let msg = ClientMsg::Call { id, req };
        let bytes = encode(&msg).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let back: ClientMsg = rt.block_on(async {
            FrameReader::new(&bytes[..]).read().await.unwrap().unwrap()
        });
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn stream_targets_round_trip(target in arb_stream_target()) {
        let open = Open::Stream(target);
        let bytes = encode(&open).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let back: Open = rt.block_on(async {
            FrameReader::new(&bytes[..]).read().await.unwrap().unwrap()
        });
        prop_assert_eq!(back, open);
    }
}
