//! The wire endpoint's message parsing, fed as our server feeds it: pgwire's SSL negotiation on
//! the raw bytes, then our frame check (`connectors/src/query/wire/frame.rs`, compiled here by
//! path), then pgwire's decoder on each message the check passed, and the SASL initial response
//! parsed as the SCRAM driver parses it.
//!
//! Must hold on any bytes: no panic, no endless loop, no allocation beyond the input's bound;
//! every message the check passes decodes in full (no byte left for the next message), and
//! what decodes encodes back to bytes that decode and encode to the same bytes.
//!
//! History: without the frame check, pgwire 0.42's Parse decoder panicked on a body shorter
//! than its parameter count ("advance out of bounds"); `corpus/wire_messages` keeps that input.
#![no_main]

#[allow(dead_code)]
#[path = "../../../connectors/src/query/wire/frame.rs"]
mod frame;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire::messages::{DecodeContext, PgWireFrontendMessage, SslNegotiationMetaMessage};

fn context(ssl: bool, startup: bool) -> DecodeContext {
    let mut ctx = DecodeContext::default();
    ctx.awaiting_frontend_ssl = ssl;
    ctx.awaiting_frontend_startup = startup;
    ctx
}

fn reencodes(message: &PgWireFrontendMessage, ctx: &DecodeContext) {
    let mut first = BytesMut::new();
    if message.encode(&mut first).is_err() {
        return;
    }
    let mut buf = first.clone();
    let again = PgWireFrontendMessage::decode(&mut buf, ctx)
        .expect("an encoded message decodes")
        .expect("an encoded message is complete");
    let mut second = BytesMut::new();
    again
        .encode(&mut second)
        .expect("a decoded message encodes");
    assert_eq!(first, second, "{message:?} vs {again:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // pgwire's negotiate_tls: SSL and GSS requests decoded on the raw socket (at most one of
    // each is answered; then the connection is TLS or moves on).
    for _ in 0..2 {
        match PgWireFrontendMessage::decode(&mut buf, &context(true, true)) {
            Ok(Some(PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::None))) => {
                break
            }
            Ok(Some(PgWireFrontendMessage::SslNegotiation(_))) => {}
            Ok(Some(other)) => panic!("negotiation decoded {other:?}"),
            Ok(None) | Err(_) => return,
        }
    }

    let mut checker = frame::FrameChecker::new(1 << 16);
    let mut startup = true;
    let mut passwords = 0;
    // Each round passes at least one byte on, so this bounds the loop.
    for _ in 0..=data.len() {
        let Ok(Some(n)) = checker.check(&buf) else {
            return; // refused (the connection would end) or incomplete
        };
        assert!(n > 0 && n <= buf.len(), "checked {n} of {}", buf.len());
        let mut one = buf.split_to(n);
        let ctx = context(false, startup);
        let message = match PgWireFrontendMessage::decode(&mut one, &ctx) {
            Ok(Some(m)) => m,
            // pgwire may still refuse a well-framed message (a protocol version, a type it
            // does not take): an error, not a panic, and the connection ends.
            Err(_) => return,
            Ok(None) => panic!("a checked message is complete: {:?}", &data[..n.min(64)]),
        };
        let cancel = matches!(message, PgWireFrontendMessage::CancelRequest(_));
        if !cancel {
            // A 3.0 cancel with a longer key leaves bytes, but ends the connection anyway.
            assert!(one.is_empty(), "{} bytes left after {message:?}", one.len());
        }
        reencodes(&message, &ctx);
        match message {
            PgWireFrontendMessage::Startup(_) => startup = false,
            PgWireFrontendMessage::CancelRequest(_) | PgWireFrontendMessage::Terminate(_) => return,
            PgWireFrontendMessage::PasswordMessageFamily(p) => {
                passwords += 1;
                if passwords == 1 {
                    // What pgwire's SCRAM driver does with the first one.
                    let _ = p.into_sasl_initial_response();
                } else {
                    let _ = p.into_sasl_response();
                }
            }
            _ => {}
        }
    }
    panic!("the checker passed more messages than there were bytes");
});
