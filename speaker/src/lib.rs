//! The ferrolb speaker: layer-2 announcement and the nftables data plane. Built by the speaker issues.
