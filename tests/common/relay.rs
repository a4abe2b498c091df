//! A TCP relay on a loopback port in front of one node, for the proxy's connections only:
//! `cut()` closes every relayed connection and refuses new ones (a partition between the
//! proxy and the node while replication keeps flowing), `restore()` listens again.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Relay {
    pub port: u16,
    target: u16,
    cut: Arc<Mutex<CancellationToken>>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let relay = Relay {
            port,
            target,
            cut: Arc::new(Mutex::new(CancellationToken::new())),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        let token = self.cut.lock().clone();
        let target = self.target;
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
    }

    /// Drops every relayed connection and stops listening.
    pub fn cut(&self) {
        let mut token = self.cut.lock();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind relay");
        self.serve(listener);
    }
}
