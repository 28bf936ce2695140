//! One wire connection: pgwire's TLS negotiation, then the frame check ([`super::frame`])
//! between the socket and pgwire's decoder, then pgwire's message loop.
//!
//! pgwire's `process_socket` hands the socket straight to its decoder, which panics on some
//! malformed messages and misreads others (see [`super::frame`]). This is the same loop with the
//! check in the read path: pgwire only decodes messages that passed it, and a client that sends
//! anything else gets PostgreSQL's `FATAL 08P01` and a closed connection, counted in
//! `primespark_wire_protocol_violations_total`.
//!
//! The loop also watches the socket for the client hanging up while a statement runs (pgwire
//! reads nothing until the statement is done, so without this a query outlived its client up to
//! `query.timeout`): the statement is dropped, which cancels its DataFusion execution, as
//! PostgreSQL's `client_connection_check_interval` does.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::pgwire::api::{ClientInfo, ErrorHandler, PgWireConnectionState, PgWireServerHandlers};
use ::pgwire::error::{ErrorInfo, PgWireError as ProtocolError, SEVERITY_FATAL};
use ::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use ::pgwire::tokio::server::{negotiate_tls, process_error, process_message};
use ::pgwire::tokio::TlsAcceptor;
use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts};

use super::frame::{FrameChecker, FrameError};
use crate::metrics::{WireClientGone, WireProtocolViolation};

/// A client must be authenticated this long after connecting (PostgreSQL's
/// `authentication_timeout` default).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A socket's read side that lets through only whole messages the [`FrameChecker`] accepted.
///
/// Holds at most one message (bounded by the checker before its body is read) plus one read.
pub(super) struct Checked<S> {
    inner: S,
    checker: FrameChecker,
    /// Read from `inner`, not yet passed on.
    unread: BytesMut,
    /// How many bytes at the front of `unread` are checked.
    passable: usize,
}

impl<S> Checked<S> {
    fn new(inner: S, checker: FrameChecker, already_read: BytesMut) -> Self {
        Self {
            inner,
            checker,
            unread: already_read,
            passable: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Checked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.passable > 0 {
                let n = this.passable.min(out.remaining());
                out.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                this.passable -= n;
                return Poll::Ready(Ok(()));
            }
            if !this.unread.is_empty() {
                match this.checker.check(&this.unread) {
                    Ok(Some(n)) => {
                        this.passable = n;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                    }
                }
            }
            this.unread.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.unread
            ))?;
            if n == 0 {
                // End of stream; a partial message is dropped as PostgreSQL drops it.
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Checked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves one connection until the client leaves, a fatal error, or a protocol violation.
pub(super) async fn serve_connection<H>(
    socket: TcpStream,
    tls: Option<TlsAcceptor>,
    handlers: H,
    max_message_bytes: usize,
) -> io::Result<()>
where
    H: PgWireServerHandlers,
{
    let peer = socket.peer_addr()?;
    let hangup = hangup(&socket);
    tokio::pin!(hangup);
    let startup_timeout = tokio::time::sleep(STARTUP_TIMEOUT);
    tokio::pin!(startup_timeout);
    let negotiated = tokio::select! {
        () = &mut startup_timeout => return Ok(()),
        negotiated = negotiate_tls(socket, tls) => negotiated?,
    };
    let Some(negotiated) = negotiated else {
        // Direct TLS without an acceptor: nothing to speak.
        return Ok(());
    };
    let parts = negotiated.into_parts();
    let io = Checked::new(
        parts.io,
        FrameChecker::new(max_message_bytes),
        parts.read_buf,
    );
    let mut rebuilt = FramedParts::new(io, parts.codec);
    rebuilt.write_buf = parts.write_buf;
    let mut socket = Framed::from_parts(rebuilt);

    let startup = handlers.startup_handler();
    let simple = handlers.simple_query_handler();
    let extended = handlers.extended_query_handler();
    let copy = handlers.copy_handler();
    let cancel = handlers.cancel_handler();
    let errors = handlers.error_handler();
    loop {
        let next = if logging_in(socket.state()) {
            tokio::select! {
                () = &mut startup_timeout => None,
                next = socket.next() => next,
            }
        } else {
            socket.next().await
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                refuse(&mut socket, peer, e).await;
                break;
            }
            None => break,
        };
        // Some clients (asyncpg) send Terminate and wait for the server to close.
        if matches!(message, PgWireFrontendMessage::Terminate(_)) {
            break;
        }
        let in_extended_query = match socket.state() {
            PgWireConnectionState::CopyInProgress(extended) => extended,
            _ => message.is_extended_query(),
        };
        let is_cancel = matches!(message, PgWireFrontendMessage::CancelRequest(_));
        // Statements race the client hanging up; a cancel request (whose client may close
        // right after sending it) and the login do not.
        let watch = !is_cancel && !logging_in(socket.state());
        let processing = process_message(
            message,
            &mut socket,
            startup.clone(),
            simple.clone(),
            extended.clone(),
            copy.clone(),
            cancel.clone(),
        );
        let outcome = if watch {
            tokio::select! {
                biased;
                outcome = processing => outcome,
                () = &mut hangup => {
                    // Dropping the statement's future cancels its execution.
                    WireClientGone { peer }.emit();
                    break;
                }
            }
        } else {
            processing.await
        };
        if let Err(mut e) = outcome {
            errors.on_error(&socket, &mut e);
            let fatal = e.is_fatal();
            process_error(&mut socket, e, in_extended_query).await?;
            if fatal {
                break;
            }
        }
        if is_cancel {
            break;
        }
    }
    Ok(())
}

/// Whether the client is still starting up or authenticating (the startup timeout applies).
fn logging_in(state: PgWireConnectionState) -> bool {
    matches!(
        state,
        PgWireConnectionState::AwaitingStartup | PgWireConnectionState::AuthenticationInProgress
    )
}

/// Resolves when the client has closed its side of `socket` (the kernel's `EPOLLRDHUP`), without
/// reading from it: a second descriptor of the same socket, registered with the runtime for
/// readiness alone. Never resolves when the descriptor cannot be made.
fn hangup(socket: &TcpStream) -> impl std::future::Future<Output = ()> {
    // A duplicate descriptor shares the connection but not its registration; closing it on drop
    // releases only the duplicate (std never shuts a socket down on drop).
    let watched: Option<TcpStream> = socket
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::net::TcpStream::from)
        .and_then(|dup| dup.set_nonblocking(true).map(|()| dup).ok())
        .and_then(|dup| TcpStream::from_std(dup).ok());
    async move {
        let Some(dup) = watched else {
            return std::future::pending().await;
        };
        loop {
            let Ok(ready) = dup.ready(Interest::READABLE).await else {
                return std::future::pending().await;
            };
            if ready.is_read_closed() {
                return;
            }
            // Readable because the client sent its next message: pgwire reads it later, through
            // the other descriptor. Readiness is edge-triggered, so wait for the next change.
            // A `WouldBlock` from `try_io` clears the readiness seen, without reading a byte.
            let _ = dup.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }
}

/// Answers a message that failed the frame check or pgwire's decoder as PostgreSQL does
/// (`FATAL 08P01`), counts it, and closes. A failed read of the socket just ends.
async fn refuse<S>(socket: &mut S, peer: SocketAddr, error: ProtocolError)
where
    S: futures::Sink<PgWireBackendMessage> + Unpin,
{
    let (reason, detail) = match &error {
        ProtocolError::IoError(io) => {
            match io.get_ref().and_then(|e| e.downcast_ref::<FrameError>()) {
                Some(frame) => (frame.reason(), frame.to_string()),
                None => {
                    tracing::debug!(%peer, error = %io, "wire connection read failed");
                    return;
                }
            }
        }
        other => ("decode", other.to_string()),
    };
    WireProtocolViolation {
        peer,
        reason,
        detail: &detail,
    }
    .emit();
    let info = ErrorInfo::new(SEVERITY_FATAL.to_owned(), "08P01".to_owned(), detail);
    // The client may be gone already; the connection ends either way.
    let _ = socket
        .send(PgWireBackendMessage::ErrorResponse(info.into()))
        .await;
    let _ = socket.close().await;
}
