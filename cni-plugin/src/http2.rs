//! One HTTP/2 request and its response (RFC 9113) over a blocking unix socket: the client side
//! of exactly one stream, with the connection's obligations (SETTINGS and their ACK, PING,
//! flow control both ways, GOAWAY, RST_STREAM, CONTINUATION, padding). In the usual case the
//! preface, SETTINGS, HEADERS and the whole body leave in one `write`, and the agent's answer
//! arrives in one `read`. Every read and write is bounded by the caller's deadline.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::hpack::{self, Field, HpackError};

#[derive(Debug, thiserror::Error)]
pub enum Http2Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no answer before the deadline")]
    Timeout,
    #[error("the connection was closed before the answer was complete")]
    Closed,
    #[error("the call was reset (HTTP/2 error code {0})")]
    Reset(u32),
    #[error("the agent is going away (HTTP/2 error code {0}) and did not take the call")]
    GoAway(u32),
    #[error("HTTP/2 protocol error: {0}")]
    Protocol(&'static str),
    #[error("decoding the answer's headers: {0}")]
    Hpack(#[from] HpackError),
}

/// What the agent answered on the stream.
#[derive(Debug, Default)]
pub struct Response {
    pub headers: Vec<Field>,
    pub body: Vec<u8>,
    /// Empty for a trailers-only answer (then `headers` carries the status).
    pub trailers: Vec<Field>,
}

/// The most response body the plugin takes (a `List` of thousands of attachments fits).
pub const MAX_BODY: usize = 16 << 20;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The one stream of the connection.
const STREAM: u32 = 1;
/// Flow-control windows and frame size before the peer's SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;
const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest frame this side accepts: the default, which the plugin never raises.
const OUR_MAX_FRAME: usize = 16_384;
/// Received bytes after which this side returns flow-control credit.
const CREDIT_AFTER: usize = 16_384;

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[ty, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Strips a PADDED frame's pad length and padding (and a HEADERS frame's priority fields).
fn unpad(flags: u8, payload: &[u8], priority: bool) -> Result<&[u8], Http2Error> {
    let (mut body, pad) = if flags & PADDED != 0 {
        let (&pad, rest) = payload
            .split_first()
            .ok_or(Http2Error::Protocol("padded frame without a pad length"))?;
        (rest, pad as usize)
    } else {
        (payload, 0)
    };
    if priority {
        body = body
            .get(5..)
            .ok_or(Http2Error::Protocol("HEADERS too short for its priority"))?;
    }
    body.len()
        .checked_sub(pad)
        .map(|n| &body[..n])
        .ok_or(Http2Error::Protocol("padding longer than the frame"))
}

struct Conn<'a> {
    sock: &'a mut UnixStream,
    deadline: Instant,
    out: Vec<u8>,
    buf: Vec<u8>,
    have: usize,
}

impl Conn<'_> {
    fn remaining(&self) -> Result<std::time::Duration, Http2Error> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(Http2Error::Timeout)
        } else {
            Ok(left)
        }
    }

    fn timed<T>(r: io::Result<T>) -> Result<T, Http2Error> {
        r.map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Http2Error::Timeout,
            _ => Http2Error::Io(e),
        })
    }

    fn flush(&mut self) -> Result<(), Http2Error> {
        if self.out.is_empty() {
            return Ok(());
        }
        let left = self.remaining()?;
        Self::timed(self.sock.set_write_timeout(Some(left)))?;
        Self::timed(self.sock.write_all(&self.out))?;
        self.out.clear();
        Ok(())
    }

    /// The next frame: (type, flags, stream, payload). `Closed` at end of input.
    fn read_frame(&mut self) -> Result<(u8, u8, u32, Vec<u8>), Http2Error> {
        loop {
            if self.have >= 9 {
                let len = u32_at(&self.buf, 0).map_or(0, |v| v >> 8) as usize;
                if len > OUR_MAX_FRAME {
                    return Err(Http2Error::Protocol(
                        "frame larger than SETTINGS_MAX_FRAME_SIZE",
                    ));
                }
                if self.have >= 9 + len {
                    let (ty, flags) = (self.buf[3], self.buf[4]);
                    let stream = u32_at(&self.buf, 5).map_or(0, |s| s & 0x7fff_ffff);
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.copy_within(9 + len..self.have, 0);
                    self.have -= 9 + len;
                    return Ok((ty, flags, stream, payload));
                }
            }
            if self.have == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let left = self.remaining()?;
            Self::timed(self.sock.set_read_timeout(Some(left)))?;
            let n = match self.sock.read(&mut self.buf[self.have..]) {
                Ok(0) => return Err(Http2Error::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Self::timed(Err(e)),
            };
            self.have += n;
        }
    }
}

/// The request body and what flow control lets this side send of it.
struct Body<'a> {
    body: &'a [u8],
    sent: usize,
    /// END_STREAM has been sent.
    done: bool,
    conn_window: i64,
    stream_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE, which a change of adjusts the stream window by.
    peer_initial: i64,
    peer_max_frame: usize,
}

impl Body<'_> {
    /// Appends as many DATA frames as the windows and the peer's frame size allow; the last
    /// carries END_STREAM.
    fn send(&mut self, out: &mut Vec<u8>) {
        while !self.done {
            let window = self.conn_window.min(self.stream_window).max(0) as usize;
            let n = (self.body.len() - self.sent)
                .min(window)
                .min(self.peer_max_frame);
            if n == 0 && self.sent < self.body.len() {
                return;
            }
            let last = self.sent + n == self.body.len();
            let flags = if last { END_STREAM } else { 0 };
            frame(
                out,
                DATA,
                flags,
                STREAM,
                &self.body[self.sent..self.sent + n],
            );
            self.sent += n;
            self.conn_window -= n as i64;
            self.stream_window -= n as i64;
            self.done = last;
        }
    }
}

/// Sends one request on a fresh connection and reads its response. `headers` are the
/// request's fields after `:method POST` and `:scheme http`, pseudo-headers first.
pub fn exchange(
    sock: &mut UnixStream,
    headers: &[(&str, &str)],
    body: &[u8],
    deadline: Instant,
) -> Result<Response, Http2Error> {
    let mut c = Conn {
        sock,
        deadline,
        out: Vec::with_capacity(PREFACE.len() + 64 + body.len().min(DEFAULT_WINDOW as usize)),
        buf: vec![0; 4096],
        have: 0,
    };
    c.out.extend_from_slice(PREFACE);
    let mut settings = SETTINGS_ENABLE_PUSH.to_be_bytes().to_vec();
    settings.extend_from_slice(&0u32.to_be_bytes());
    frame(&mut c.out, SETTINGS, 0, 0, &settings);
    let mut block = Vec::with_capacity(256);
    hpack::put_indexed(&mut block, 3); // :method POST
    hpack::put_indexed(&mut block, 6); // :scheme http
    for (name, value) in headers {
        hpack::put_field(&mut block, name, value);
    }
    let mut chunks = block.chunks(DEFAULT_MAX_FRAME).peekable();
    let mut ty = HEADERS;
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        frame(&mut c.out, ty, flags, STREAM, chunk);
        ty = CONTINUATION;
    }

    let mut body_out = Body {
        body,
        sent: 0,
        done: false,
        conn_window: DEFAULT_WINDOW,
        stream_window: DEFAULT_WINDOW,
        peer_initial: DEFAULT_WINDOW,
        peer_max_frame: DEFAULT_MAX_FRAME,
    };
    body_out.send(&mut c.out);
    c.flush()?;

    let mut decoder = hpack::Decoder::default();
    let mut response = Response::default();
    let mut got_headers = false;
    // A header block being continued: its fragments so far and whether it ends the stream.
    let mut pending: Option<(Vec<u8>, bool)> = None;
    let mut uncredited = 0usize;
    loop {
        let (ty, flags, stream, payload) = c.read_frame()?;
        if pending.is_some() && (ty != CONTINUATION || stream != STREAM) {
            return Err(Http2Error::Protocol("a header block was interrupted"));
        }
        let mut ended = false;
        match ty {
            HEADERS | CONTINUATION if stream == STREAM => {
                let (mut fragment, end_stream) = match (ty, pending.take()) {
                    (HEADERS, None) => (
                        unpad(flags, &payload, flags & PRIORITY != 0)?.to_vec(),
                        flags & END_STREAM != 0,
                    ),
                    (CONTINUATION, Some((mut so_far, end_stream))) => {
                        so_far.extend_from_slice(&payload);
                        (so_far, end_stream)
                    }
                    _ => return Err(Http2Error::Protocol("CONTINUATION without HEADERS")),
                };
                if fragment.len() > hpack::MAX_LIST {
                    return Err(Http2Error::Protocol("header block too large"));
                }
                if flags & END_HEADERS == 0 {
                    pending = Some((std::mem::take(&mut fragment), end_stream));
                    continue;
                }
                let fields = decoder.decode(&fragment)?;
                if got_headers {
                    response.trailers = fields;
                } else {
                    response.headers = fields;
                    got_headers = true;
                }
                ended = end_stream;
            }
            DATA if stream == STREAM => {
                if !got_headers {
                    return Err(Http2Error::Protocol("DATA before HEADERS"));
                }
                let data = unpad(flags, &payload, false)?;
                if response.body.len() + data.len() > MAX_BODY {
                    return Err(Http2Error::Protocol("response body too large"));
                }
                response.body.extend_from_slice(data);
                ended = flags & END_STREAM != 0;
                uncredited += payload.len();
                if uncredited >= CREDIT_AFTER && !ended {
                    let credit = (uncredited as u32).to_be_bytes();
                    frame(&mut c.out, WINDOW_UPDATE, 0, 0, &credit);
                    frame(&mut c.out, WINDOW_UPDATE, 0, STREAM, &credit);
                    uncredited = 0;
                }
            }
            HEADERS | DATA | CONTINUATION | PUSH_PROMISE => {
                return Err(Http2Error::Protocol(
                    "a frame on a stream this side never opened",
                ));
            }
            SETTINGS if flags & ACK == 0 => {
                if payload.len() % 6 != 0 {
                    return Err(Http2Error::Protocol("SETTINGS of a bad length"));
                }
                for entry in payload.chunks(6) {
                    let id = u16::from_be_bytes([entry[0], entry[1]]);
                    let value = u32_at(entry, 2).unwrap_or(0);
                    match id {
                        SETTINGS_INITIAL_WINDOW_SIZE => {
                            if value > 0x7fff_ffff {
                                return Err(Http2Error::Protocol("window size over 2^31-1"));
                            }
                            body_out.stream_window += i64::from(value) - body_out.peer_initial;
                            body_out.peer_initial = i64::from(value);
                        }
                        SETTINGS_MAX_FRAME_SIZE => {
                            if !(16_384..=16_777_215).contains(&value) {
                                return Err(Http2Error::Protocol("bad SETTINGS_MAX_FRAME_SIZE"));
                            }
                            body_out.peer_max_frame = value as usize;
                        }
                        _ => {}
                    }
                }
                frame(&mut c.out, SETTINGS, ACK, 0, &[]);
            }
            SETTINGS => {}
            PING if flags & ACK == 0 => frame(&mut c.out, PING, ACK, 0, &payload),
            WINDOW_UPDATE => {
                let increment = i64::from(u32_at(&payload, 0).unwrap_or(0) & 0x7fff_ffff);
                match stream {
                    0 => body_out.conn_window += increment,
                    STREAM => body_out.stream_window += increment,
                    _ => {}
                }
            }
            RST_STREAM if stream == STREAM => {
                return Err(Http2Error::Reset(u32_at(&payload, 0).unwrap_or(0)));
            }
            GOAWAY => {
                let last = u32_at(&payload, 0).map_or(0, |s| s & 0x7fff_ffff);
                if last < STREAM {
                    return Err(Http2Error::GoAway(u32_at(&payload, 4).unwrap_or(0)));
                }
                // The agent still finishes this call; the connection closes after it.
            }
            // PRIORITY, PING ACKs, frames of unknown type: nothing to do (RFC 9113 5.5).
            _ => {}
        }
        if ended {
            return Ok(response);
        }
        body_out.send(&mut c.out);
        // Once the request is out, only control frames (ACKs, credit) are left to write; a
        // peer that has hung up after answering must not turn a complete answer into an
        // error, and an incomplete one shows as `Closed` on the next read.
        if let Err(e) = c.flush() {
            if !body_out.done {
                return Err(e);
            }
            c.out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs `exchange` against a scripted peer: `peer` gets the server end of a socket pair.
    fn against(
        body: &[u8],
        peer: impl FnOnce(UnixStream) + Send + 'static,
    ) -> Result<Response, Http2Error> {
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        let t = std::thread::spawn(move || peer(server));
        let r = exchange(
            &mut client,
            &[(":path", "/sluice.v1.Agent/Attach"), ("te", "trailers")],
            body,
            Instant::now() + Duration::from_secs(5),
        );
        drop(client);
        t.join().expect("peer");
        r
    }

    /// Reads frames until END_STREAM on stream 1; returns (frames seen, body received).
    fn read_request(s: &mut UnixStream) -> (Vec<(u8, u8, u32)>, Vec<u8>) {
        let mut preface = [0u8; 24];
        s.read_exact(&mut preface).expect("preface");
        assert_eq!(&preface[..], PREFACE);
        let (mut seen, mut body) = (Vec::new(), Vec::new());
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).expect("frame head");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            s.read_exact(&mut payload).expect("payload");
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            seen.push((head[3], head[4], stream));
            if head[3] == DATA {
                body.extend_from_slice(&payload);
                if head[4] & END_STREAM != 0 {
                    return (seen, body);
                }
            }
        }
    }

    fn trailers_only(status: &str) -> Vec<u8> {
        let mut block = Vec::new();
        hpack::put_indexed(&mut block, 8); // :status 200
        hpack::put_field(&mut block, "grpc-status", status);
        let mut out = Vec::new();
        frame(&mut out, SETTINGS, 0, 0, &[]);
        frame(&mut out, HEADERS, END_HEADERS | END_STREAM, STREAM, &block);
        out
    }

    #[test]
    fn a_small_request_leaves_in_one_write_and_a_trailers_only_answer_ends_it() {
        let r = against(b"hello", |mut s| {
            let (seen, body) = read_request(&mut s);
            assert_eq!(
                seen,
                [
                    (SETTINGS, 0, 0),
                    (HEADERS, END_HEADERS, 1),
                    (DATA, END_STREAM, 1)
                ]
            );
            assert_eq!(body, b"hello");
            s.write_all(&trailers_only("5")).expect("answer");
        })
        .expect("exchange");
        assert!(
            r.headers
                .contains(&(b"grpc-status".to_vec(), b"5".to_vec()))
        );
        assert!(r.trailers.is_empty() && r.body.is_empty());
    }

    #[test]
    fn a_large_body_waits_for_window_updates_and_respects_the_frame_size() {
        let body = vec![7u8; 200_000];
        let expect = body.clone();
        let r = against(&body, move |mut s| {
            let mut preface = [0u8; 24];
            s.read_exact(&mut preface).expect("preface");
            let (mut got, mut seen_settings) = (Vec::new(), false);
            let mut credited = 0usize;
            loop {
                let mut head = [0u8; 9];
                s.read_exact(&mut head).expect("head");
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                assert!(len <= DEFAULT_MAX_FRAME, "frame of {len} bytes");
                let mut p = vec![0; len];
                s.read_exact(&mut p).expect("payload");
                if head[3] == SETTINGS && head[4] == 0 && !seen_settings {
                    seen_settings = true;
                    let mut out = Vec::new();
                    frame(&mut out, SETTINGS, 0, 0, &[]);
                    s.write_all(&out).expect("settings");
                }
                if head[3] == DATA {
                    got.extend_from_slice(&p);
                    // Never more than the window this side gave.
                    assert!(
                        got.len() <= 65_535 + credited,
                        "{} over the window",
                        got.len()
                    );
                    if head[4] & END_STREAM != 0 {
                        break;
                    }
                    if got.len() == 65_535 + credited {
                        let mut out = Vec::new();
                        let inc = 70_000u32.to_be_bytes();
                        frame(&mut out, WINDOW_UPDATE, 0, 0, &inc);
                        frame(&mut out, WINDOW_UPDATE, 0, STREAM, &inc);
                        s.write_all(&out).expect("credit");
                        credited += 70_000;
                    }
                }
            }
            assert_eq!(got, expect);
            s.write_all(&trailers_only("0")).expect("answer");
        })
        .expect("exchange");
        assert!(
            r.headers
                .contains(&(b"grpc-status".to_vec(), b"0".to_vec()))
        );
    }

    #[test]
    fn continuation_padding_pings_and_trailers_are_handled() {
        let r = against(b"x", |mut s| {
            let _ = read_request(&mut s);
            let mut head = Vec::new();
            hpack::put_indexed(&mut head, 8);
            hpack::put_field(&mut head, "content-type", "application/grpc");
            let mut out = Vec::new();
            frame(&mut out, PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
            let (a, b) = head.split_at(2);
            frame(&mut out, HEADERS, 0, STREAM, a);
            frame(&mut out, CONTINUATION, END_HEADERS, STREAM, b);
            // DATA padded: pad length 3, payload "abc", 3 bytes of padding.
            frame(
                &mut out,
                DATA,
                PADDED,
                STREAM,
                &[3, b'a', b'b', b'c', 0, 0, 0],
            );
            let mut trailers = Vec::new();
            hpack::put_field(&mut trailers, "grpc-status", "0");
            frame(
                &mut out,
                HEADERS,
                END_HEADERS | END_STREAM,
                STREAM,
                &trailers,
            );
            s.write_all(&out).expect("answer");
            // The PING is answered.
            let mut ack = [0u8; 17];
            s.read_exact(&mut ack).expect("ping ack");
            assert_eq!((ack[3], ack[4]), (PING, ACK));
            assert_eq!(&ack[9..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        })
        .expect("exchange");
        assert_eq!(r.body, b"abc");
        assert_eq!(r.trailers, vec![(b"grpc-status".to_vec(), b"0".to_vec())]);
    }

    #[test]
    fn a_peer_that_hangs_up_resets_or_goes_away_is_an_error() {
        let closed = against(b"x", |mut s| {
            let _ = read_request(&mut s);
        });
        assert!(matches!(closed, Err(Http2Error::Closed)), "{closed:?}");
        let reset = against(b"x", |mut s| {
            let _ = read_request(&mut s);
            let mut out = Vec::new();
            frame(&mut out, RST_STREAM, 0, STREAM, &2u32.to_be_bytes());
            s.write_all(&out).expect("rst");
        });
        assert!(matches!(reset, Err(Http2Error::Reset(2))), "{reset:?}");
        let away = against(b"x", |mut s| {
            let _ = read_request(&mut s);
            let mut out = Vec::new();
            frame(&mut out, GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]);
            s.write_all(&out).expect("goaway");
        });
        assert!(matches!(away, Err(Http2Error::GoAway(0))), "{away:?}");
        let huge = against(b"x", |mut s| {
            let _ = read_request(&mut s);
            let mut out = Vec::new();
            frame(&mut out, DATA, 0, STREAM, &vec![0; OUR_MAX_FRAME + 1]);
            let _ = s.write_all(&out);
        });
        assert!(matches!(huge, Err(Http2Error::Protocol(_))), "{huge:?}");
    }

    #[test]
    fn a_silent_peer_ends_at_the_deadline() {
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        let start = Instant::now();
        let r = exchange(
            &mut client,
            &[(":path", "/x")],
            b"x",
            Instant::now() + Duration::from_millis(200),
        );
        assert!(matches!(r, Err(Http2Error::Timeout)), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(server);
    }
}
