//! A raw wire-protocol client for tests that must send bytes no driver would send.
#![allow(dead_code)]

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    /// The process id from BackendKeyData, after `login`.
    pub key_pid: Option<i32>,
    /// ParameterStatus values seen during `login`.
    pub params: Vec<(String, String)>,
}

/// One backend message: tag and body.
#[derive(Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        field(&self.body, b'C')
    }

    pub fn message(&self) -> Option<String> {
        field(&self.body, b'M')
    }
}

fn field(body: &[u8], kind: u8) -> Option<String> {
    let mut rest = body;
    while let [k, tail @ ..] = rest {
        if *k == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if *k == kind {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        Raw {
            stream,
            buf: BytesMut::new(),
            key_pid: None,
            params: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads one byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn read_byte(&mut self) -> u8 {
        self.stream.read_u8().await.expect("read byte")
    }

    /// The next backend message, or None at end of stream.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(Msg { tag, body });
                }
            }
            let n = self.stream.read_buf(&mut self.buf).await.ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads until ReadyForQuery; returns everything before it.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            if m.tag == b'Z' {
                return out;
            }
            out.push(m);
        }
        panic!("connection closed before ReadyForQuery: {out:?}");
    }

    /// Sends a StartupMessage for `user` and `db`.
    pub async fn startup(&mut self, user: &str, db: &str) {
        let mut out = BytesMut::new();
        frontend::startup_message([("user", user), ("database", db)], &mut out).unwrap();
        self.send(&out).await;
    }

    /// Startup and SCRAM authentication; returns after the first ReadyForQuery.
    pub async fn login(port: u16, user: &str, password: &str, db: &str) -> Raw {
        let mut raw = Raw::connect(port).await;
        raw.startup(user, db).await;
        let mut out = BytesMut::new();
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        loop {
            let m = raw.recv().await.expect("server closed during login");
            match (
                m.tag,
                m.body
                    .get(..4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            ) {
                (b'R', Some(10)) => {
                    out.clear();
                    frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out)
                        .unwrap();
                    raw.send(&out).await;
                }
                (b'R', Some(11)) => {
                    scram.update(&m.body[4..]).unwrap();
                    out.clear();
                    frontend::sasl_response(scram.message(), &mut out).unwrap();
                    raw.send(&out).await;
                }
                (b'R', Some(12)) => scram.finish(&m.body[4..]).unwrap(),
                (b'R', Some(0)) => {}
                (b'S', _) => {
                    let mut parts = m.body.split(|&b| b == 0);
                    let k = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    let v = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    raw.params.push((k, v));
                }
                (b'K', _) => {
                    raw.key_pid = Some(i32::from_be_bytes([
                        m.body[0], m.body[1], m.body[2], m.body[3],
                    ]));
                }
                (b'Z', _) => return raw,
                other => panic!("unexpected message during login: {other:?} {m:?}"),
            }
        }
    }

    pub fn param(&self, name: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    pub async fn query(&mut self, sql: &str) -> Vec<Msg> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap();
        self.send(&out).await;
        self.until_ready().await
    }
}
