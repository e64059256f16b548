//! The relay between an SSH channel and a TCP socket, with a real russh server and client in
//! this process (as russh's own tests run them): the server relays each `direct-tcpip` channel
//! to a TCP target, the client plays the device. Half-close must cross in both directions
//! without ending the other one, and the relay must say how it ended.

use std::sync::Arc;
use std::time::Duration;

use cmx_net::relay::{self, Counters, RelayEnd};
use russh::keys::{Algorithm, PrivateKey, PublicKeyOrCertificate};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelMsg, client, server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// What one server-side relay ended with, and what it counted (to channel, from channel).
type Outcome = (RelayEnd, (u64, u64));

/// Accepts every login, relays each `direct-tcpip` channel to `target`, and reports each relay's
/// outcome.
#[derive(Clone)]
struct RelayServer {
    target: std::net::SocketAddr,
    outcomes: mpsc::UnboundedSender<Outcome>,
}

impl server::Handler for RelayServer {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _host: &str,
        _port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let stream = TcpStream::connect(self.target).await?;
        reply.accept().await;
        let outcomes = self.outcomes.clone();
        tokio::spawn(async move {
            let counters = Arc::new(Counters::default());
            let end = relay::relay(channel, stream, counters.clone(), None).await;
            let _ = outcomes.send((end, counters.get()));
        });
        Ok(())
    }
}

struct Device;

impl client::Handler for Device {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A target listener, a relaying SSH server in front of it, and a client session to that server.
async fn setup() -> (
    TcpListener,
    client::Handle<Device>,
    mpsc::UnboundedReceiver<Outcome>,
) {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, outcomes) = mpsc::unbounded_channel();
    let handler = RelayServer {
        target: target.local_addr().unwrap(),
        outcomes: tx,
    };
    let config = Arc::new(server::Config {
        keys: vec![PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()],
        inactivity_timeout: None,
        ..Default::default()
    });
    let ssh = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = ssh.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = ssh.accept().await.unwrap();
        let running = server::run_stream(config, socket, handler).await.unwrap();
        let _ = running.await;
    });
    let mut session = client::connect(Arc::new(client::Config::default()), addr, Device)
        .await
        .unwrap();
    assert!(session.authenticate_none("device").await.unwrap().success());
    (target, session, outcomes)
}

/// Reads a channel until EOF (or close); returns the data.
async fn read_until_eof(channel: &mut Channel<client::Msg>) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(T, channel.wait())
            .await
            .expect("channel stalled")
        {
            Some(ChannelMsg::Data { data }) => got.extend_from_slice(&data),
            Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => return got,
            Some(_) => {}
        }
    }
}

#[tokio::test]
async fn channel_eof_half_closes_the_socket_and_the_reply_still_flows() {
    let (target, session, mut outcomes) = setup().await;
    let mut channel = session
        .channel_open_direct_tcpip("target", 80, "127.0.0.1", 40000)
        .await
        .unwrap();
    let (mut app, _) = target.accept().await.unwrap();

    // The device sends a request and half-closes: the target sees the bytes, then EOF...
    channel.data(&b"request"[..]).await.unwrap();
    channel.eof().await.unwrap();
    let mut request = Vec::new();
    tokio::time::timeout(T, app.read_to_end(&mut request))
        .await
        .expect("the target never saw EOF")
        .unwrap();
    assert_eq!(request, b"request");

    // ...and can still answer at length afterwards: the other direction is untouched.
    let reply = vec![7u8; 300_000];
    app.write_all(&reply).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(read_until_eof(&mut channel).await, reply);

    let (end, (to_channel, from_channel)) = tokio::time::timeout(T, outcomes.recv()).await.unwrap().unwrap();
    assert_eq!(end, RelayEnd::Done, "EOF both ways is a clean end");
    assert_eq!((to_channel, from_channel), (300_000, 7));
}

#[tokio::test]
async fn socket_eof_becomes_channel_eof_and_the_device_can_keep_sending() {
    let (target, session, mut outcomes) = setup().await;
    let mut channel = session
        .channel_open_direct_tcpip("target", 80, "127.0.0.1", 40001)
        .await
        .unwrap();
    let (app, _) = target.accept().await.unwrap();
    let (mut app_r, mut app_w) = app.into_split();

    // The target speaks first and half-closes (a banner, then nothing more to say).
    app_w.write_all(b"banner").await.unwrap();
    app_w.shutdown().await.unwrap();
    assert_eq!(read_until_eof(&mut channel).await, b"banner");

    // The device keeps sending after that EOF; the target still reads it.
    let upload = vec![3u8; 200_000];
    channel.data(&upload[..]).await.unwrap();
    channel.eof().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, app_r.read_to_end(&mut got))
        .await
        .expect("the upload stalled")
        .unwrap();
    assert_eq!(got.len(), upload.len());

    let (end, counted) = tokio::time::timeout(T, outcomes.recv()).await.unwrap().unwrap();
    assert_eq!(end, RelayEnd::Done);
    assert_eq!(counted, (6, 200_000));
}

#[tokio::test]
async fn a_reset_socket_closes_the_channel_and_says_why() {
    let (target, session, mut outcomes) = setup().await;
    let mut channel = session
        .channel_open_direct_tcpip("target", 80, "127.0.0.1", 40002)
        .await
        .unwrap();
    let (app, _) = target.accept().await.unwrap();
    channel.data(&b"x"[..]).await.unwrap();
    // SO_LINGER 0: close sends RST, the relay's next read or write fails.
    app.set_zero_linger().unwrap();
    drop(app);
    let (end, _) = tokio::time::timeout(T, outcomes.recv()).await.unwrap().unwrap();
    assert!(matches!(end, RelayEnd::TcpError(_)), "{end:?}");
    // The device's channel is closed, not left hanging.
    let closed = tokio::time::timeout(T, async {
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the channel was not closed after the socket failed"
    );
}

#[tokio::test]
async fn the_device_closing_its_channel_ends_the_relay() {
    let (target, session, mut outcomes) = setup().await;
    let channel = session
        .channel_open_direct_tcpip("target", 80, "127.0.0.1", 40003)
        .await
        .unwrap();
    let (mut app, _) = target.accept().await.unwrap();
    channel.close().await.unwrap();
    let (end, _) = tokio::time::timeout(T, outcomes.recv()).await.unwrap().unwrap();
    assert_eq!(end, RelayEnd::ChannelClosed);
    // The target's socket is released too.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(T, app.read_to_end(&mut rest)).await;
    assert!(n.is_ok(), "the target's socket stayed open");
}
