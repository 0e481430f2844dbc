//! One message, one datagram: bytes and the descriptors that belong to them, sent and
//! received with `sendmsg`/`recvmsg` on a `SOCK_SEQPACKET` socket.
//!
//! Received descriptors arrive as [`OwnedFd`]s (close-on-exec, closed when dropped), so
//! a message that is refused cannot leak them.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors Linux attaches to one message (`SCM_MAX_FD`). The receive buffer
/// has room for all of them: were it truncated, the descriptors that did arrive could not
/// be told apart from those that did not.
pub const MAX_FDS: usize = 253;

/// What one `recvmsg` read.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer; 0 with `truncated` false is the end of the stream.
    pub len: usize,
    /// The datagram was longer than the buffer (its tail is lost).
    pub truncated: bool,
    /// More descriptors were attached than fit (those that did arrive are in `fds`).
    pub fds_truncated: bool,
    /// The descriptors attached, in order.
    pub fds: Vec<OwnedFd>,
}

impl Received {
    /// The end of the stream: the peer closed (an empty datagram reads the same).
    pub fn is_end(&self) -> bool {
        self.len == 0 && !self.truncated
    }
}

/// Sends one datagram with `fds` attached. A signal can interrupt a blocking send even
/// under `SA_RESTART` when the socket has a timeout; the send is all or nothing, so it is
/// retried. A non-blocking socket that is full answers `WouldBlock`.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    loop {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        match rustix::net::sendmsg(
            socket,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map(drop).map_err(io::Error::from),
        }
    }
}

/// Receives one datagram into `buf`, with its descriptors. A non-blocking socket with
/// nothing to read answers `WouldBlock`.
pub fn recv(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    Ok(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
        fds,
    })
}

/// Checks that `fd` is a network namespace: an open `/proc/<pid>/ns/net` (its link reads
/// `net:[inode]`) or a bind mount of one (`/run/netns/NAME`, a file on nsfs). Pipes,
/// sockets, devices and other kinds of namespace are refused with what they are.
pub fn check_netns(fd: impl AsFd) -> Result<(), String> {
    let fd = fd.as_fd();
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let target = std::fs::read_link(&link)
        .map_err(|e| format!("cannot inspect the file descriptor: {e}"))?;
    let target = target.to_string_lossy();
    let not = || format!("the file descriptor is not a network namespace (it refers to {target})");
    match target.strip_suffix(']').and_then(|t| t.split_once(":[")) {
        Some(("net", _)) | None => {}
        Some(_) => return Err(not()),
    }
    match nix::sys::statfs::fstatfs(fd) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC => {}
        Ok(_) => return Err(format!("{}: it is not on nsfs", not())),
        Err(e) => {
            return Err(format!(
                "cannot inspect the network namespace {target}: {e}"
            ))
        }
    }
    // An nsfs file is a namespace of some kind: the kind is what setns(CLONE_NEWNET)
    // checks, and the link of a bind mount does not say it. NS_GET_NSTYPE would, but
    // needs an ioctl; a mount's link names its path, which must be the only other case.
    Ok(())
}

/// (device, inode) of a descriptor: what tells two namespaces apart.
pub fn file_id(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn descriptors_travel_with_their_bytes() {
        let (a, b) = UnixDatagram::pair().expect("pair");
        let netns = std::fs::File::open("/proc/self/ns/net").expect("own netns");
        send(a.as_fd(), b"hello", &[netns.as_fd()]).expect("send");
        let mut buf = [0u8; 16];
        let got = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.fds.len(), 1);
        assert_eq!(
            file_id(&got.fds[0]).expect("id"),
            file_id(&netns).expect("id")
        );
        check_netns(&got.fds[0]).expect("a network namespace");
    }

    #[test]
    fn a_long_datagram_is_reported_truncated() {
        let (a, b) = UnixDatagram::pair().expect("pair");
        send(a.as_fd(), &[7u8; 64], &[]).expect("send");
        let mut buf = [0u8; 8];
        let got = recv(b.as_fd(), &mut buf).expect("recv");
        assert!(got.truncated);
        assert!(!got.is_end());
    }

    #[test]
    fn other_descriptors_are_not_network_namespaces() {
        let file = std::fs::File::open("/proc/self/status").expect("a file");
        assert!(check_netns(&file).unwrap_err().contains("not on nsfs"));
        let (a, _b) = UnixDatagram::pair().expect("pair");
        assert!(check_netns(&a).unwrap_err().contains("socket:["));
        let user = std::fs::File::open("/proc/self/ns/user").expect("user ns");
        assert!(check_netns(&user).unwrap_err().contains("user:["));
    }
}
