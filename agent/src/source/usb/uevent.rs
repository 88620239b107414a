//! Kernel uevents: the backend trait, the netlink implementation and a test backend.
//!
//! The agent reads `NETLINK_KOBJECT_UEVENT` group 1 (the kernel's own broadcast)
//! directly, so it works without udevd and in containers. Only processes with
//! `CAP_NET_ADMIN` in the socket's network namespace can send to that group, so an
//! unprivileged user cannot forge device events. If the socket's receive queue
//! overflows, the kernel drops uevents and `recv` reports `ENOBUFS`; the backend turns
//! that into [`UeventError::Overflow`] and the source re-enumerates sysfs and reports
//! the loss, rather than silently missing a device.

use std::io;

use kobject_uevent::UEvent;
use netlink_sys::{
    protocols::NETLINK_KOBJECT_UEVENT, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket,
};

use crate::source::BoxFuture;

/// Receive buffer asked of the kernel; bursts of hot-plug events fit easily.
const RCVBUF: usize = 4 * 1024 * 1024;
/// Largest uevent message (the kernel limits the environment to 2 KiB, plus header).
const MAX_MSG: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum UeventError {
    #[error("uevent socket overflowed: the kernel dropped events")]
    Overflow,
    #[error("uevent socket: {0}")]
    Io(#[from] io::Error),
    #[error("uevent stream ended")]
    Closed,
}

/// A stream of kernel uevents.
pub trait UeventStream: Send {
    /// The next uevent. Malformed messages are logged and skipped inside.
    fn next(&mut self) -> BoxFuture<'_, Result<UEvent, UeventError>>;
}

/// Opens uevent streams; the source opens a new one on every (re)start, before it
/// enumerates sysfs, so nothing falls between enumeration and listening.
pub trait UeventBackend: Send + Sync {
    fn open(&mut self) -> Result<Box<dyn UeventStream>, UeventError>;
}

/// The real kernel interface.
#[derive(Debug, Default)]
pub struct NetlinkBackend;

impl UeventBackend for NetlinkBackend {
    fn open(&mut self) -> Result<Box<dyn UeventStream>, UeventError> {
        let mut socket = TokioSocket::new(NETLINK_KOBJECT_UEVENT)?;
        let s = socket.socket_mut();
        s.bind(&SocketAddr::new(0, 1))?;
        // As root, SO_RCVBUFFORCE passes net.core.rmem_max (212 KiB on stock Debian,
        // a few hundred uevents); otherwise take what SO_RCVBUF allows.
        if nix::sys::socket::setsockopt(&*s, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF)
            .is_err()
        {
            if let Err(e) = s.set_rx_buf_sz(RCVBUF) {
                tracing::warn!(error = %e, "could not enlarge the uevent receive buffer");
            }
        }
        Ok(Box::new(NetlinkStream {
            socket,
            buf: Vec::with_capacity(MAX_MSG),
        }))
    }
}

struct NetlinkStream {
    socket: TokioSocket,
    buf: Vec<u8>,
}

impl UeventStream for NetlinkStream {
    fn next(&mut self) -> BoxFuture<'_, Result<UEvent, UeventError>> {
        Box::pin(async move {
            loop {
                self.buf.clear();
                match self.socket.recv_from(&mut self.buf).await {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        return Err(UeventError::Overflow)
                    }
                    Err(e) => return Err(UeventError::Io(e)),
                }
                // libudev's own messages on other groups start with "libudev"; group 1
                // carries kernel messages only, but be strict anyway.
                if self.buf.starts_with(b"libudev") {
                    continue;
                }
                match UEvent::from_netlink_packet(&self.buf) {
                    Ok(ev) => return Ok(ev),
                    Err(e) => {
                        tracing::warn!(error = %e, len = self.buf.len(), "malformed uevent skipped");
                    }
                }
            }
        })
    }
}

/// Test backend: uevents pushed through a channel.
pub mod test_backend {
    use super::*;
    use tokio::sync::mpsc;

    pub struct ChannelBackend {
        pub rx: Option<mpsc::Receiver<Result<UEvent, UeventError>>>,
    }

    struct ChannelStream(mpsc::Receiver<Result<UEvent, UeventError>>);

    impl UeventBackend for ChannelBackend {
        fn open(&mut self) -> Result<Box<dyn UeventStream>, UeventError> {
            let rx = self.rx.take().ok_or(UeventError::Closed)?;
            Ok(Box::new(ChannelStream(rx)))
        }
    }

    impl UeventStream for ChannelStream {
        fn next(&mut self) -> BoxFuture<'_, Result<UEvent, UeventError>> {
            Box::pin(async move { self.0.recv().await.unwrap_or(Err(UeventError::Closed)) })
        }
    }
}
