//! What the speaker's two netlink readers (conntrack, the link dump) share: a received
//! datagram cut into its messages.

use netlink_packet_core::NetlinkBuffer;

/// The messages of one received netlink datagram, each as its own bytes (netlink pads messages
/// to 4 bytes). A truncated or zero-length header ends the datagram.
pub fn messages(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = data.get(at..).filter(|r| !r.is_empty())?;
        let len = NetlinkBuffer::new_checked(rest).ok()?.length() as usize;
        if len == 0 {
            return None;
        }
        at += (len + 3) & !3;
        Some(&rest[..len.min(rest.len())])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_is_cut_at_each_padded_length() {
        // Two messages: 17 bytes (padded to 20) and 16 bytes.
        let mut d = vec![0u8; 36];
        d[0] = 17;
        d[20] = 16;
        let lens: Vec<usize> = messages(&d).map(<[u8]>::len).collect();
        assert_eq!(lens, [17, 16]);
        assert_eq!(messages(&[]).count(), 0);
        assert_eq!(messages(&[1, 2, 3]).count(), 0, "a truncated header");
        assert_eq!(messages(&[0u8; 16]).count(), 0, "a zero length");
    }
}
